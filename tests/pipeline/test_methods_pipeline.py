"""Every editing method through the real stages on tiny-llama: cluster → precompute_z → apply_edits →
evaluate with `method=<m>` (prepare, covariance and attribute read no method param, so their outputs
are the scratch project's, as `dvc repro` would keep them).

What each method must satisfy is checked against the ORIGINAL tiny model and the saved files, not
against what the stage code computed: the edited folder loads with plain transformers; only W_out
(down_proj) of the method's layers changed; the per-batch deltas replay from the original weights to
the edited ones; the ledger has one row per batch and layer; and per method: ECE changed only the
columns its attribution selected (as the ledger records them), ROME writes rank one per fact, AlphaEdit's
updates lie in C0's null space, FT-L/FT-M keep every entry of a batch's update within ±ft.norm_constraint,
UltraEdit computes no z and changes every column, and its checkpoint carries its feature moments;
SERAC changes no weight and answers through the edit memory saved inside the edited folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml
from safetensors.torch import load_file
from scratch_project import FACTS, N_BATCHES, inside, method_project, run_stage_inprocess
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from ece.model.loading import tiny_model

METHODS = ("ece", "memit", "alphaedit", "rome", "ft-l", "ft-m", "ultraedit", "mend", "serac")
SINGLE_LAYER = 2  # rome.layer and ft.layer: one of the scratch project's edit.layers
# The tiny model's C0 eigenvalues all lie below AlphaEdit's 2e-2 (largest ~5e-4), which makes the null
# space the whole space and the null-space check empty; 1e-5 splits the 64 directions roughly in half.
NULLSPACE_THRESHOLD = 1e-5
ULTRAEDIT_LR = 1e-3  # the reference's 1e-6 moves the tiny model's weights by about a hundred ulps
W_OUT = "model.layers.{}.mlp.down_proj.weight"
EPS32 = torch.finfo(torch.float32).eps


@dataclass
class Edited:
    """One method's scratch project after apply_edits and evaluate, with the weights to compare."""

    method: str
    work: Path
    params: dict
    layers: list[int]  # the W_out the method may write, from params.yaml (not from ece.config)
    original: dict[str, Tensor]
    edited: dict[str, Tensor]

    def deltas(self) -> list[dict[str, Tensor]]:
        return [load_file(self.work / f"artifacts/edited/delta-batch-{b:04d}.safetensors") for b in range(N_BATCHES)]

    def ledger(self) -> pl.DataFrame:
        return pl.read_parquet(self.work / "artifacts/edited/ledger.parquet")


def expected_layers(params: dict) -> list[int]:
    """ROME and fine-tuning write one layer (rome.layer / ft.layer), MEND and UltraEdit their own `layers`,
    SERAC none (it answers through its edit memory), the others every edit.layers."""
    if params["method"] == "serac":
        return []
    single = {"rome": params["rome"]["layer"], "ft-l": params["ft"]["layer"], "ft-m": params["ft"]["layer"]}
    if params["method"] in ("mend", "ultraedit"):
        return list(params[params["method"]]["layers"])
    return [single[params["method"]]] if params["method"] in single else list(params["edit"]["layers"])


def build(factory: pytest.TempPathFactory, method: str) -> Edited:
    work = method_project(
        factory,
        f"method_{method}",
        {
            "method": method,
            "rome.layer": SINGLE_LAYER,
            "ft.layer": SINGLE_LAYER,
            "alphaedit.nullspace_threshold": NULLSPACE_THRESHOLD,
            "ultraedit.lr": ULTRAEDIT_LR,
        },
    )
    for stage in ("apply_edits", "evaluate"):
        run_stage_inprocess(work, stage)
    params = yaml.safe_load((work / "params.yaml").read_text())
    original = tiny_model(params["model"]["name"], params["model"]["seed"])[0].state_dict()
    edited = AutoModelForCausalLM.from_pretrained(work / "artifacts/edited/model").state_dict()
    return Edited(method, work, params, expected_layers(params), original, edited)


@pytest.fixture(scope="module")
def edited(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Edited]:
    """method → its edited project, built once per module on first use (~1-2 s each, the base ~8 s)."""
    built: dict[str, Edited] = {}

    def get(method: str) -> Edited:
        if method not in built:
            built[method] = build(tmp_path_factory, method)
        return built[method]

    return get


def w_out_change(run: Edited, layer: int) -> Tensor:
    return run.edited[W_OUT.format(layer)].double() - run.original[W_OUT.format(layer)].double()


@pytest.mark.parametrize("method", METHODS)
def test_edited_model_loads_and_only_the_methods_w_out_changed(edited: Callable[[str], Edited], method: str) -> None:
    run = edited(method)
    folder = run.work / "artifacts/edited/model"
    tok = AutoTokenizer.from_pretrained(folder)
    assert run.edited.keys() == run.original.keys()
    changed = {name for name in run.original if not torch.equal(run.original[name], run.edited[name])}
    assert changed == {W_OUT.format(l) for l in run.layers}
    model = AutoModelForCausalLM.from_pretrained(folder)
    logits = model(**tok(["Paris is the capital of"], return_tensors="pt")).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("method", METHODS)
def test_ledger_has_one_row_per_batch_and_layer(edited: Callable[[str], Edited], method: str) -> None:
    run = edited(method)
    ledger = run.ledger()
    written = run.layers or [None]  # a method that writes no layer (SERAC): one row per batch, no layer
    assert list(zip(ledger["batch"], ledger["layer"])) == [(b, l) for b in range(N_BATCHES) for l in written]
    assert set(ledger["method"]) == {method}
    batch_size = run.params["edit"]["batch_size"]
    for r in ledger.iter_rows(named=True):
        assert r["fact_ids"] == [f["id"] for f in FACTS[r["batch"] * batch_size : (r["batch"] + 1) * batch_size]]


@pytest.mark.parametrize("method", METHODS)
def test_deltas_replay_from_the_original_to_the_edited_weights(edited: Callable[[str], Edited], method: str) -> None:
    """Each batch's `old` columns are the weights right before it and its `new` ones, written batch
    after batch onto the original model, give the saved model: the deltas account for every change."""
    run = edited(method)
    weights = {l: run.original[W_OUT.format(l)].clone() for l in run.layers}
    for d in run.deltas():
        assert sorted(int(k.split(".")[1]) for k in d if k.endswith(".cols")) == run.layers
        for l, w in weights.items():
            cols = d[f"layer.{l}.cols"]
            assert torch.equal(w[:, cols], d[f"layer.{l}.old"])
            w[:, cols] = d[f"layer.{l}.new"]
    assert all(torch.equal(w, run.edited[W_OUT.format(l)]) for l, w in weights.items())


def test_ece_changes_only_the_selected_columns(edited: Callable[[str], Edited]) -> None:
    """The columns that differ from the original are those the ledger records, and the ledger's
    columns of each batch and layer are the attribution stage's selection for it."""
    run = edited("ece")
    ledger = run.ledger()
    selected = pl.read_parquet(run.work / "artifacts/attribution/batches.parquet")
    for r in ledger.iter_rows(named=True):
        row = selected.filter((pl.col("batch") == r["batch"]) & (pl.col("layer") == r["layer"]))
        assert r["neurons"] == sorted(row["selected"][0])
    for l in run.layers:
        changed = set(torch.nonzero(w_out_change(run, l).ne(0).any(dim=0)).flatten().tolist())
        recorded = {n for ns in ledger.filter(pl.col("layer") == l)["neurons"] for n in ns}
        assert changed == recorded and len(recorded) < run.original[W_OUT.format(l)].shape[1]


def test_memit_changes_every_column(edited: Callable[[str], Edited]) -> None:
    run = edited("memit")
    for l in run.layers:
        assert w_out_change(run, l).ne(0).any(dim=0).all()


def test_ultraedit_needs_no_z_changes_every_column_and_carries_its_moments(edited: Callable[[str], Edited]) -> None:
    """No z rows (precompute_z skipped it), every column of every edited W_out changed, and the
    checkpoint holds, after each batch, moments over every target token seen so far (one row per target
    token and layer: the tokenizer here is byte-level, so a target of c characters has c + 1 tokens)."""
    run = edited("ultraedit")
    assert pl.read_parquet(run.work / "artifacts/z/index.parquet").height == 0
    for l in run.layers:
        assert w_out_change(run, l).ne(0).any(dim=0).all()
    (folder,) = {p.parent for p in (run.work / ".cache/checkpoint/apply_edits").glob("*/state.json")}
    batch_size, seen = run.params["edit"]["batch_size"], 0
    for b in range(N_BATCHES):
        seen += sum(len(f["target_new"]) + 1 for f in FACTS[b * batch_size : (b + 1) * batch_size]) * len(run.layers)
        carried = load_file(folder / f"carry-{b:04d}.safetensors")
        assert sorted(carried) == ["moments.mean", "moments.n", "moments.std", "moments.var"]
        assert float(carried["moments.n"]) == seen


@pytest.mark.parametrize("method", ["ft-l", "ft-m"])
def test_fine_tuning_stays_in_the_linf_ball(edited: Callable[[str], Edited], method: str) -> None:
    """Each batch fine-tunes from the weights the batches before it left, inside ±norm_constraint of
    them (ROME's FT-L bounds each call against the weights at its start); so the saved model lies within
    N_BATCHES·norm_constraint of the original. Tolerance: float32 rounding of the weights (a few ulps)."""
    run = edited(method)
    bound = run.params["ft"]["norm_constraint"]
    ulps = 2 * EPS32 * float(run.edited[W_OUT.format(SINGLE_LAYER)].abs().max())
    for d in run.deltas():
        step = d[f"layer.{SINGLE_LAYER}.new"].double() - d[f"layer.{SINGLE_LAYER}.old"].double()
        assert step.ne(0).any() and step.abs().max() <= bound + ulps
    assert w_out_change(run, SINGLE_LAYER).abs().max() <= N_BATCHES * (bound + ulps)


def test_rome_writes_rank_one_per_fact(edited: Callable[[str], Edited]) -> None:
    run = edited("rome")
    batch_size = run.params["edit"]["batch_size"]
    for d in run.deltas():
        s = torch.linalg.svdvals(d[f"layer.{SINGLE_LAYER}.new"].double() - d[f"layer.{SINGLE_LAYER}.old"].double())
        assert s[batch_size - 1] > 1e-3 * s[0] and s[batch_size] < 1e-5 * s[0]


def test_alphaedit_updates_lie_in_the_null_space_of_c0(edited: Callable[[str], Edited]) -> None:
    """Δ C0-eigenvectors with eigenvalue >= the threshold is zero up to the float32 rounding of writing Δ
    into the weights (bounded by half an ulp of the largest weight per entry)."""
    run = edited("alphaedit")
    c0 = load_file(run.work / "artifacts/covariance/c0.safetensors")
    for l in run.layers:
        values, vectors = torch.linalg.eigh(c0[f"layer.{l}"].double())
        kept = vectors[:, values >= NULLSPACE_THRESHOLD]
        assert 0 < kept.shape[1] < len(values), "the threshold must split C0's spectrum for the check to mean anything"
        for d in run.deltas():
            new, old = d[f"layer.{l}.new"].double(), d[f"layer.{l}.old"].double()
            step = new - old
            rounding = EPS32 * new.abs().max() * step.numel() ** 0.5
            assert (step @ kept).norm() <= rounding < 0.1 * step.norm()


@pytest.mark.parametrize("method", METHODS)
def test_evaluate_reports_the_method_and_the_same_pre_phase(edited: Callable[[str], Edited], method: str) -> None:
    """evaluate runs on every method's output; its "pre" phase (the unedited model) is method-independent."""
    metrics = json.loads((edited(method).work / "reports/metrics.json").read_text())
    assert metrics["method"] == method and metrics["n_facts"] == len(FACTS)
    assert 0 <= metrics["post"]["efficacy"] <= 1
    per_fact = pl.read_parquet(edited(method).work / "reports/per_fact.parquet")
    assert per_fact.height == 2 * len(FACTS)
    reference = json.loads((edited("ece").work / "reports/metrics.json").read_text())
    assert metrics["pre"] == reference["pre"]


@pytest.mark.parametrize("method", METHODS)
def test_api_edit_equals_the_stages(edited: Callable[[str], Edited], method: str) -> None:
    """`ece.edit` in memory (one call, no artifacts in between) writes the same weights, bit for bit, and
    the same ledger as the stages with their cached artifacts: one edit sequence, two ways to drive it."""
    import ece
    from ece.config import load_params

    run = edited(method)
    with inside(run.work):
        p = load_params("params.yaml")
        model, tok = tiny_model(p.model.name, p.model.seed)
        result = ece.edit(
            model,
            tok,
            [dict(f) for f in FACTS],
            params=p,
            covariance="artifacts/covariance/c0.safetensors",
            log=lambda _: None,
        )
    weights = model.state_dict()
    assert all(torch.equal(weights[name], run.edited[name]) for name in run.edited)
    same = [
        "batch",
        "layer",
        "fact_ids",
        "content_hashes",
        "clusters",
        "anchor_ids",
        "z_loss",
        "z_nll",
        "z_steps",
        "z_start",
        "z_earlier",
        "z_predicted",
        "neurons",
        "delta_norm",
        "col_norms",
        "dataset_hash",
        "params_hash",
        "model_fingerprint",
    ]
    assert result.ledger.select(same).equals(run.ledger().select(same))
    if result.memory is not None:  # SERAC: the same edit memory as the stage saved
        from ece.editing.serac import EditMemory

        saved = EditMemory.load(run.work / "artifacts/edited/model/edit_memory")
        assert (result.memory.ids, result.memory.batches) == (saved.ids, saved.batches)
        assert torch.equal(result.memory.keys, saved.keys)


def test_serac_answers_through_a_memory_that_grows_batch_by_batch(edited: Callable[[str], Edited]) -> None:
    """No weight changed (checked above for every method); the edited folder holds the memory: one entry
    per fact, in dataset order, tagged with the batch that appended it, its statement the filled prompt and
    the new object; reports/routing.parquet names, for every evaluated text, the entry that answered it
    (or none), and only entries of the memory."""
    run = edited("serac")
    memory = pl.read_parquet(run.work / "artifacts/edited/model/edit_memory/memory.parquet")
    batch_size = run.params["edit"]["batch_size"]
    assert memory["id"].to_list() == [f["id"] for f in FACTS]
    assert memory["batch"].to_list() == [i // batch_size for i in range(len(FACTS))]
    assert memory["statement"].to_list() == [
        f["prompt"].replace("{}", f["subject"]) + " " + f["target_new"] for f in FACTS
    ]
    routing = pl.read_parquet(run.work / "reports/routing.parquet")
    assert {f["prompt"].replace("{}", f["subject"]) for f in FACTS} <= set(routing["text"])
    assert set(routing["memory_id"].drop_nulls()) <= set(memory["id"])
    assert routing["probability"].is_between(0, 1).all()
    others = pl.read_parquet(edited("memit").work / "reports/routing.parquet")
    assert others.height == 0  # a method that edits weights routes nothing


@pytest.mark.parametrize("method", ["ece", "serac"])
def test_api_evaluate_equals_the_evaluate_stage(edited: Callable[[str], Edited], method: str) -> None:
    """`ece.evaluate` on the edited folder gives the stage's post-edit rewrite metrics (reports/metrics.json);
    SERAC's through the edit memory the folder holds."""
    import ece
    from ece.config import load_params

    run = edited(method)
    memory = "artifacts/edited/model" if method == "serac" else None
    with inside(run.work):
        p = load_params("params.yaml")
        model = AutoModelForCausalLM.from_pretrained("artifacts/edited/model")
        tok = AutoTokenizer.from_pretrained("artifacts/edited/model")
        facts = pl.read_parquet("artifacts/prepared/edits.parquet")
        got = ece.evaluate(model, tok, facts, params=p, memory=memory)["summary"]
    post = json.loads((run.work / "reports/metrics.json").read_text())["post"]
    for metric in ("efficacy", "generalization", "specificity"):
        assert got[metric] == pytest.approx(post[metric], abs=1e-4), metric
