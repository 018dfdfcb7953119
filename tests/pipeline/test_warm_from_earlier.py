"""`z.warm_from_earlier` through the real stages on tiny-llama: an anchor (mode `all`: every fact) whose new
object an earlier batch edited starts from those facts' mean δ, the z cache follows the earlier batches it depends on, and the
Python API gives the stages' weights and ledger bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch
from reference import ridge_fit
from safetensors.torch import load_file
from scratch_project import FACTS, base_project, inside, run_stage_inprocess, set_params

from ece import cli
from ece.audit.ledger import LEDGER_SCHEMA
from ece.config import load_params
from ece.data.facts import Fact
from ece.editing.zvec import EarlierObjects, object_embeddings
from ece.model.adapter import ModelAdapter
from ece.model.loading import tiny_model

# batches of 2: [f0 Italy, f1 English], [f2 piano, f3 English], [f4 English, f5 Italy]
TARGETS = {"f3": "English", "f4": "English", "f5": "Italy"}
RERUN = ["prepare", "attribute", "cluster", "precompute_z"]


def write(work: Path, targets: dict[str, str]) -> None:
    facts = [{**f, "target_new": targets.get(f["id"], f["target_new"])} for f in FACTS]
    (work / "data/facts.jsonl").write_text("".join(json.dumps(f) + "\n" for f in facts))
    for stage in RERUN:
        run_stage_inprocess(work, stage)


def index(work: Path) -> pl.DataFrame:
    return pl.read_parquet(work / "artifacts/z/index.parquet")


def deltas(work: Path) -> dict[str, torch.Tensor]:
    """Every fact's stored final δ, by id."""
    out = {}
    for r in index(work).iter_rows(named=True):
        out[r["id"]] = load_file(work / "artifacts/z/cache" / r["file"])["delta"][r["row"]]
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = base_project(tmp_path_factory, "warm_from_earlier")
    set_params(work, {"method": "ece", "z.warm_start": "object", "z.warm_from_earlier": "anchors"})
    write(work, TARGETS)
    return work


def test_anchors_count_the_earlier_facts_of_their_object(work: Path) -> None:
    """f3 starts from f1's δ, f4 from f1's and f3's, f5 from f0's; the first batch and f2 from zero."""
    rows = index(work).sort("id")
    assert dict(zip(rows["id"], rows["earlier"])) == {"f0": 0, "f1": 0, "f2": 0, "f3": 1, "f4": 2, "f5": 1}
    assert (rows["anchor"] == rows["id"]).all()  # distinct objects within each batch: every fact anchors


def test_the_start_is_the_mean_of_the_earlier_deltas(work: Path) -> None:
    """The history rebuilt from the δ the stage stored gives f4 the hand mean (δ_f1 + δ_f3) / 2 and f5
    δ_f0 (that a descent from a given start is exact is tests/editing/test_zvec.py's)."""
    delta = deltas(work)
    history = EarlierObjects("anchors")
    by_id = {f["id"]: Fact(f["id"], f["subject"], f["prompt"], TARGETS.get(f["id"], f["target_new"])) for f in FACTS}
    for b in ("f0", "f1"), ("f2", "f3"):
        history.add([by_id[i] for i in b], torch.stack([delta[i] for i in b]))
    start, counts, _ = history.starts([by_id["f4"], by_id["f5"]], torch.tensor([0, 1]), torch.tensor([0, 1]), 32)
    assert counts.tolist() == [2, 1] and start is not None
    assert torch.allclose(start[0], (delta["f1"].double() + delta["f3"].double()).float() / 2)
    assert torch.equal(start[1], delta["f0"])


def test_a_changed_earlier_fact_recomputes_the_batches_that_started_from_it(work: Path, tmp_path: Path) -> None:
    """f3 English → French: batch 1 (its own) and batch 2 (whose English anchor started from f3's δ) are
    computed again, batch 0 is reused; then back to English reuses all three."""
    before = dict(zip(index(work)["batch"], index(work)["file"]))
    write(work, {**TARGETS, "f3": "French"})
    changed = dict(zip(index(work)["batch"], index(work)["file"]))
    assert changed[0] == before[0] and changed[1] != before[1] and changed[2] != before[2]
    assert index(work).filter(pl.col("id") == "f4")["earlier"].item() == 1  # only f1 now
    write(work, TARGETS)
    assert dict(zip(index(work)["batch"], index(work)["file"])) == before


def api_matches_stages(work: Path) -> pl.DataFrame:
    """Run apply_edits, then `ece.edit` on a fresh copy of the model: the same weights bit for bit and the
    same ledger; returns the stages' ledger."""
    import ece
    from ece.config import load_params

    run_stage_inprocess(work, "apply_edits")
    facts = [json.loads(line) for line in (work / "data/facts.jsonl").read_text().splitlines()]
    with inside(work):
        p = load_params("params.yaml")
        model, tok = tiny_model(p.model.name, p.model.seed)
        result = ece.edit(
            model, tok, facts, params=p, covariance="artifacts/covariance/c0.safetensors", log=lambda _: None
        )
    edited = load_file(work / "artifacts/edited/model/model.safetensors")
    weights = model.state_dict()
    assert all(torch.equal(weights[name], edited[name]) for name in edited)
    ledger = pl.read_parquet(work / "artifacts/edited/ledger.parquet")
    same = [
        c for c in LEDGER_SCHEMA if c.startswith("z_") or c in ("batch", "layer", "fact_ids", "neurons", "delta_norm")
    ]
    assert result.ledger.select(same).equals(ledger.select(same))
    return ledger


def test_api_edit_equals_the_stages_with_earlier_starts(work: Path) -> None:
    ledger = api_matches_stages(work)
    assert ledger.filter(pl.col("batch") == 2)["z_earlier"][0].to_list() == [2, 1]


@pytest.fixture(scope="module")
def windowed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same project with z of two batches at a time: window 0 = batches 0 and 1, window 1 = batch 2."""
    work = base_project(tmp_path_factory, "z_windows")
    set_params(
        work, {"method": "ece", "z.warm_start": "object", "z.warm_from_earlier": "anchors", "z.window_batches": 2}
    )
    write(work, TARGETS)
    return work


def test_a_window_is_one_z_batch_and_later_windows_start_from_it(windowed: Path) -> None:
    """In window 0, f3 (English, batch 1) is a member of f1 (English, batch 0) instead of starting from
    f1's final δ; in window 1, f4 starts from f1 and f3, f5 from f0. Batches 0 and 1 share one file,
    each batch's rows where the index says."""
    rows = index(windowed).sort("id")
    assert dict(zip(rows["id"], rows["anchor"])) == {
        "f0": "f0",
        "f1": "f1",
        "f2": "f2",
        "f3": "f1",
        "f4": "f4",
        "f5": "f5",
    }
    assert dict(zip(rows["id"], rows["earlier"])) == {"f0": 0, "f1": 0, "f2": 0, "f3": 0, "f4": 2, "f5": 1}
    files = dict(zip(rows["id"], rows["file"]))
    assert files["f0"] == files["f3"] != files["f4"] == files["f5"]
    assert dict(zip(rows["id"], rows["row"])) == {"f0": 0, "f1": 1, "f2": 2, "f3": 3, "f4": 0, "f5": 1}
    for name in rows["file"].unique():
        stored = load_file(windowed / "artifacts/z/cache" / name)
        for r in rows.filter(pl.col("file") == name).iter_rows(named=True):
            assert float(stored["delta"][r["row"]].norm()) == pytest.approx(r["delta_norm"])


def test_api_edit_equals_the_stages_with_windows(windowed: Path) -> None:
    ledger = api_matches_stages(windowed)
    assert ledger.filter(pl.col("batch") == 2)["z_earlier"][0].to_list() == [2, 1]


def test_memit_z_does_not_depend_on_the_window(tmp_path_factory: pytest.TempPathFactory) -> None:
    """MEMIT's facts descend alone, so z of two batches in one loop equals z batch by batch (up to the
    rounding of differently sized passes)."""
    z = {}
    for window in (1, 2):
        work = base_project(tmp_path_factory, f"memit_window_{window}")
        set_params(work, {"method": "memit", "z.window_batches": window})
        write(work, {})
        rows = index(work).sort("id")
        z[window] = torch.stack(
            [load_file(work / "artifacts/z/cache" / r["file"])["z"][r["row"]] for r in rows.iter_rows(named=True)]
        )
        assert rows["file"].n_unique() == (3 if window == 1 else 2)
    assert torch.allclose(z[1], z[2], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def all_at_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Batch 2 holds two English facts, both with an earlier English fact (f1, f3), under mode `all`."""
    work = base_project(tmp_path_factory, "warm_all")
    set_params(work, {"method": "ece", "z.warm_start": "object", "z.warm_from_earlier": "all"})
    write(work, {**TARGETS, "f5": "English"})
    return work


def test_all_starts_every_fact_with_an_earlier_object_at_once(all_at_once: Path) -> None:
    """Mode `all`: f5 does not wait for f4 (which `anchors` would make its anchor): both start from the
    mean δ of f1 and f3, each in a group of its own."""
    rows = index(all_at_once).sort("id")
    assert dict(zip(rows["id"], rows["anchor"])) == {f"f{i}": f"f{i}" for i in range(6)}
    assert dict(zip(rows["id"], rows["earlier"])) == {"f0": 0, "f1": 0, "f2": 0, "f3": 1, "f4": 2, "f5": 2}


def test_anchors_makes_the_second_fact_a_member(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The same facts under mode `anchors`: f5 is f4's member and starts from f4's δ (no earlier count)."""
    work = base_project(tmp_path_factory, "warm_anchors")
    set_params(work, {"method": "ece", "z.warm_start": "object", "z.warm_from_earlier": "anchors"})
    write(work, {**TARGETS, "f5": "English"})
    rows = index(work).sort("id")
    assert rows.filter(pl.col("id") == "f5").select("anchor", "earlier").row(0) == ("f4", 0)
    assert rows.filter(pl.col("id") == "f4").select("anchor", "earlier").row(0) == ("f4", 2)


def test_api_edit_equals_the_stages_with_all_at_once(all_at_once: Path) -> None:
    ledger = api_matches_stages(all_at_once)
    assert ledger.filter(pl.col("batch") == 2)["z_earlier"][0].to_list() == [2, 2]


def test_predicted_cold_starts_change_only_the_facts_after_the_fit(
    work: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture
) -> None:
    """`z.predict_cold` with a fit on 2 facts: batch 0 has nothing to fit on, so its δ equal the run
    without prediction; f2 (piano, an object no earlier fact had) starts from the δ predicted by a fit
    on f0 and f1, so its δ differs and the index and ledger say so (the other facts' objects are known,
    so they borrow); the API gives the stages' weights and ledger bit for bit; `ece audit --fact f2` says
    where its descent started."""
    predicted = base_project(tmp_path_factory, "predict_cold")
    set_params(
        predicted,
        {
            "method": "ece",
            "z.warm_start": "object",
            "z.warm_from_earlier": "anchors",
            "z.predict_cold": 1.0,
            "z.predict_min_facts": 2,
        },
    )
    write(predicted, TARGETS)
    plain, guessed = deltas(work), deltas(predicted)
    assert torch.equal(plain["f0"], guessed["f0"]) and torch.equal(plain["f1"], guessed["f1"])
    assert not torch.allclose(plain["f2"], guessed["f2"], atol=1e-4)
    rows = index(predicted).sort("id")
    assert dict(zip(rows["id"], rows["predicted"])) == {"f0": 0, "f1": 0, "f2": 2, "f3": 0, "f4": 0, "f5": 0}
    assert dict(zip(rows["id"], rows["earlier"])) == {"f0": 0, "f1": 0, "f2": 0, "f3": 1, "f4": 2, "f5": 1}
    ledger = api_matches_stages(predicted)
    assert ledger.filter(pl.col("batch") == 1)["z_predicted"][0].to_list() == [2, 0]
    capsys.readouterr()
    assert cli.main(["-C", str(predicted), "audit", "--fact", "f2"]) == 0
    assert "predicted from its new object by a fit on 2 earlier facts" in " ".join(capsys.readouterr().out.split())


def test_calibrated_prediction_waits_for_a_held_out_batch(
    work: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture
) -> None:
    """`z.predict_calibrate` with a fit on 2 facts: batch 1's new object (f2, organ) starts from zero, as
    nothing has measured the fit's scale yet (batch 0 equals the run without prediction). f2's δ
    measures the scale s, computed here independently (ridge as augmented least squares on f0, f1,
    then ⟨p, δ⟩ / ‖p‖² at least 0); batch 2's new object (f5, Russian) starts from s × the prediction
    and the stage prints s; the API matches the stages."""
    calibrated = base_project(tmp_path_factory, "predict_calibrated")
    set_params(
        calibrated,
        {
            "method": "ece",
            "z.warm_start": "object",
            "z.warm_from_earlier": "anchors",
            "z.predict_cold": 1.0,
            "z.predict_calibrate": True,
            "z.predict_min_facts": 2,
        },
    )
    targets = {**TARGETS, "f2": "organ", "f5": "Russian"}
    capsys.readouterr()
    write(calibrated, targets)
    printed = capsys.readouterr().out
    plain, guessed = deltas(work), deltas(calibrated)
    assert all(torch.equal(plain[f"f{i}"], guessed[f"f{i}"]) for i in range(2))
    with inside(calibrated):
        p = load_params("params.yaml")
    model, tok = tiny_model(p.model.name, p.model.seed)
    by_id = {f["id"]: Fact(f["id"], f["subject"], f["prompt"], targets.get(f["id"], f["target_new"])) for f in FACTS}
    x = object_embeddings(ModelAdapter(model), tok, [by_id[i] for i in ("f0", "f1", "f2")]).double()
    y = torch.stack([guessed[i] for i in ("f0", "f1")]).double()
    prediction = x[2] @ ridge_fit(x[:2], y, p.z.predict_ridge)
    scale = max(float(prediction @ guessed["f2"].double() / prediction.square().sum()), 0.0)
    assert f"factor on the prediction now: {scale:.3f}" in printed
    rows = index(calibrated).sort("id")
    assert scale > 0  # (with these objects; at 0 batch 2 would be held out too)
    expected = {"f0": 0, "f1": 0, "f2": 0, "f3": 0, "f4": 0, "f5": 4}
    assert dict(zip(rows["id"], rows["predicted"])) == expected
    api_matches_stages(calibrated)
