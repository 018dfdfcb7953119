"""The ledger and the `ece` command line on a tiny-llama run: audit a fact, a neuron and the whole
weight diff (every changed column attributed to a batch), roll back bit for bit, edit one fact, and
generate; every --json output parses."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file
from scratch_project import N_BATCHES, base_project, run_stage_inprocess, set_params

from ece import cli
from ece.model.adapter import ModelAdapter
from ece.model.loading import load_model, tiny_model

LAYERS = [1, 2]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = base_project(tmp_path_factory, "audit_cli")
    run_stage_inprocess(work, "apply_edits")
    return work


def ece_json(work: Path, capsys: pytest.CaptureFixture, *argv: str) -> dict:
    capsys.readouterr()
    code = cli.main(["-C", str(work), *argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def deltas(work: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(work / f"artifacts/edited/delta-batch-{b:04d}.safetensors") for b in range(N_BATCHES)]


def edited_dir_hash(work: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((work / "artifacts/edited").rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


# --- the ledger -----------------------------------------------------------------------------------


def test_ledger_records_every_batch_and_layer(work: Path) -> None:
    ledger = pl.read_parquet(work / "artifacts/edited/ledger.parquet")
    assert ledger.height == N_BATCHES * len(LAYERS)
    meta = json.loads((work / "artifacts/prepared/meta.json").read_text())
    facts = pl.read_parquet(work / "artifacts/prepared/edits.parquet")
    assert set(ledger["dataset_hash"]) == {meta["dataset_hash"]}
    runs = json.loads((work / "reports/ledger_runs.json").read_text())  # the run facts, outside the cached ledger
    assert [r["batch"] for r in runs] == list(range(N_BATCHES)) and {r["git_revision"] for r in runs} == {"unknown"}
    assert all(r["update"] > 0 and r["finished_at"] for r in runs)
    assert ledger["params_hash"].str.len_chars().to_list() == [64] * ledger.height
    for r in ledger.iter_rows(named=True):
        d = deltas(work)[r["batch"]]
        cols, diff = (
            d[f"layer.{r['layer']}.cols"],
            (d[f"layer.{r['layer']}.new"].double() - d[f"layer.{r['layer']}.old"].double()),
        )
        assert r["neurons"] == cols.tolist() and r["n_neurons"] == len(cols)
        assert r["delta_norm"] == pytest.approx(float(diff.norm()), rel=1e-12)
        assert r["col_norms"] == pytest.approx(diff.norm(dim=0).tolist(), rel=1e-12)
        assert 1 <= r["cond"] < 1e12
        ids = facts["id"][2 * r["batch"] : 2 * r["batch"] + 2].to_list()
        assert (
            r["fact_ids"] == ids
            and r["content_hashes"] == facts.filter(pl.col("id").is_in(ids))["content_hash"].to_list()
        )
        assert len(r["z_loss"]) == len(r["clusters"]) == len(r["anchor_ids"]) == 2
    report = (work / "reports/ledger.md").read_text()
    assert "# Edit ledger" in report and meta["dataset_hash"] in report and "| f5 |" in report


# --- audit ------------------------------------------------------------------------------------------


def test_audit_fact(work: Path, capsys: pytest.CaptureFixture) -> None:
    r = ece_json(work, capsys, "audit", "--fact", "f3")
    clusters = (
        pl.read_parquet(work / "artifacts/clusters/clusters.parquet").filter(pl.col("id") == "f3").row(0, named=True)
    )
    assert (r["batch"], r["cluster"], r["anchor"]) == (1, clusters["cluster"], clusters["anchor_id"])
    assert r["request"]["subject"] == "Edwin of Northumbria" and "f3" in r["cluster_members"]
    assert [l["layer"] for l in r["layers"]] == LAYERS
    d = deltas(work)[1]
    for l in r["layers"]:
        assert (
            l["batch_neurons"] == len(d[f"layer.{l['layer']}.cols"])
            and l["fact_neurons"] >= l["fact_neurons_changed"] >= 1
        )
        assert l["top_neurons"] and all(x["neuron"] in d[f"layer.{l['layer']}.cols"].tolist() for x in l["top_neurons"])
    assert r["batch_delta_norm"] > 0
    z = pl.read_parquet(work / "artifacts/z/index.parquet").filter(pl.col("id") == "f3").row(0, named=True)
    assert (r["z_steps"], r["z_start"]) == (z["steps"], z["anchor"]) and r["z_steps"] >= 0  # from the z stage
    capsys.readouterr()
    assert cli.main(["-C", str(work), "audit", "--fact", "f3"]) == 0  # the table view renders
    assert "ece audit --fact f3" in capsys.readouterr().out


def test_audit_neuron(work: Path, capsys: pytest.CaptureFixture) -> None:
    ds = deltas(work)
    touched = [set(d["layer.2.cols"].tolist()) for d in ds]
    col = min(set.intersection(*touched[:2]) or touched[0])  # a column written by several batches if any
    r = ece_json(work, capsys, "audit", "--layer", "2", "--neuron", str(col))
    expected = [b for b in range(N_BATCHES) if col in touched[b]]
    assert [b["batch"] for b in r["batches"]] == expected
    for b in r["batches"]:
        d = ds[b["batch"]]
        j = d["layer.2.cols"].tolist().index(col)
        assert b["col_norm"] == pytest.approx(
            float((d["layer.2.new"][:, j].double() - d["layer.2.old"][:, j].double()).norm()), rel=1e-12
        )
        assert b["fact_ids"] == [f"f{2 * b['batch']}", f"f{2 * b['batch'] + 1}"]
    untouched = next(c for c in range(64) if not any(c in t for t in touched))
    assert ece_json(work, capsys, "audit", "--layer", "2", "--neuron", str(untouched))["batches"] == []


def test_audit_diff_attributes_every_changed_column(work: Path, capsys: pytest.CaptureFixture) -> None:
    r = ece_json(work, capsys, "audit", "--diff")
    assert r["all_attributed"] and not r["other_changed_tensors"]
    original = ModelAdapter(tiny_model("tiny-llama", 0)[0])
    edited = ModelAdapter(load_model(str(work / "artifacts/edited/model"))[0])
    assert [l["layer"] for l in r["layers"]] == LAYERS
    for l in r["layers"]:
        changed = (
            (original.w_out_weight(l["layer"]) != edited.w_out_weight(l["layer"])).any(0).nonzero().squeeze(1).tolist()
        )
        assert sorted(map(int, l["columns"])) == changed and l["unattributed"] == []
        for col, batches in l["columns"].items():
            assert all(int(col) in deltas(work)[b][f"layer.{l['layer']}.cols"].tolist() for b in batches)
        assert sum(l["last_written_by_batch"].values()) == len(changed)


# --- rollback ---------------------------------------------------------------------------------------


def test_rollback_to_the_original_is_bit_exact(work: Path, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    before = edited_dir_hash(work)
    r = ece_json(work, capsys, "rollback", "--to-batch", "-1", "--out", str(tmp_path / "original"))
    assert r["undone_batches"] == [2, 1, 0]
    original = tiny_model("tiny-llama", 0)[0].state_dict()
    rolled = weights_of(tmp_path / "original")
    assert all(torch.equal(rolled[k], original[k]) for k in rolled)
    assert edited_dir_hash(work) == before, "artifacts/edited is never modified"


def test_rollback_last_batch_equals_state_after_the_previous_one(work: Path, capsys: pytest.CaptureFixture) -> None:
    r = ece_json(work, capsys, "rollback", "--batches", "1")
    assert r["to_batch"] == N_BATCHES - 2 and r["out"] == "artifacts/rollback/model"
    model, _ = tiny_model("tiny-llama", 0)
    adapter = ModelAdapter(model)
    for d in deltas(work)[: N_BATCHES - 1]:  # replay the stored new columns forward
        for l in LAYERS:
            with torch.no_grad():
                adapter.w_out_weight(l)[:, d[f"layer.{l}.cols"]] = d[f"layer.{l}.new"]
    rolled = weights_of(work / "artifacts/rollback/model")
    state = model.state_dict()
    assert all(torch.equal(rolled[k], state[k]) for k in rolled)  # (the tied lm_head is not stored)
    edited = weights_of(work / "artifacts/edited/model")
    assert any(not torch.equal(rolled[k], edited[k]) for k in rolled)
    provenance = json.loads((work / "artifacts/rollback/model/ece_provenance.json").read_text())
    assert provenance["undone_batches"] == [N_BATCHES - 1] and provenance["base_model"] == "tiny-llama"


# --- edit and generate --------------------------------------------------------------------------------


def test_edit_changes_the_model(work: Path, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    out = tmp_path / "one_edit"
    r = ece_json(
        work,
        capsys,
        "edit",
        "--subject",
        "Eiffel Tower",
        "--prompt",
        "{} is located in the city of",
        "--new",
        "Rome",
        "--out",
        str(out),
    )
    assert r["changed"] and r["model"] == "artifacts/edited/model" and r["saved_to"] == str(out)
    assert len(r["before"]) == len(r["after"]) == 2 and r["texts"][0] == "Eiffel Tower is located in the city of"
    assert [l["layer"] for l in r["layers"]] == LAYERS and all(l["delta_norm"] > 0 for l in r["layers"])
    edited, saved = weights_of(work / "artifacts/edited/model"), weights_of(out)
    differ = {k for k in saved if not torch.equal(saved[k], edited[k])}
    assert differ == {f"model.layers.{l}.mlp.down_proj.weight" for l in LAYERS}
    # The saved folder keeps the original's fingerprint, so it can be edited again with the same C0.
    assert json.loads((out / "ece_provenance.json").read_text())["base_model"] == "tiny-llama"
    again = ece_json(
        work,
        capsys,
        "edit",
        "--model",
        str(out),
        "--subject",
        "Lyon",
        "--prompt",
        "{} is a city in",
        "--new",
        "Spain",
        "--paraphrase",
        "People say {} is a city in",
    )
    assert again["changed"] and again["texts"][1] == "People say Lyon is a city in" and again["saved_to"] is None


def test_edit_with_a_method_that_needs_no_covariance(work: Path, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """UltraEdit (like fine-tuning) edits without C0: `ece edit` works where no covariance file exists."""
    project = tmp_path / "no_c0"
    shutil.copytree(work, project)
    (project / "artifacts/covariance/c0.safetensors").unlink()
    set_params(project, {"method": "ultraedit", "ultraedit.lr": 1e-3, "ultraedit.layers": LAYERS})
    r = ece_json(project, capsys, "edit", "--subject", "Eiffel Tower", "--prompt", "{} is in", "--new", "Rome")
    assert (
        r["changed"] and [l["layer"] for l in r["layers"]] == LAYERS and all(l["delta_norm"] > 0 for l in r["layers"])
    )


def test_generate_side_by_side(work: Path, capsys: pytest.CaptureFixture) -> None:
    r = ece_json(
        work, capsys, "generate", "--prompt", "Paris is the capital of", "--prompt", "Lyon is", "--max-new-tokens", "4"
    )
    assert r["models"] == ["tiny-llama", "artifacts/edited/model"]
    assert [c["prompt"] for c in r["completions"]] == ["Paris is the capital of", "Lyon is"]
    assert all(isinstance(c[m], str) for c in r["completions"] for m in r["models"])
    single = ece_json(work, capsys, "generate", "--prompt", "Paris is", "--compare", "none", "--max-new-tokens", "2")
    assert single["models"] == ["tiny-llama"]


def test_console_script_and_help(work: Path, capsys: pytest.CaptureFixture) -> None:
    for command in ("audit", "rollback", "edit", "generate"):
        with pytest.raises(SystemExit) as info:
            cli.main([command, "--help"])
        assert info.value.code == 0 and f"usage: ece {command}" in capsys.readouterr().out
    script = shutil.which("ece") or str(Path(sys.executable).with_name("ece"))
    run = subprocess.run([script, "-C", str(work), "audit", "--fact", "f0", "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["batch"] == 0
