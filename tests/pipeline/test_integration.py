"""End to end on the real SmolLM2: the stage scripts, run in order in a scratch project, edit ten
CounterFact facts; the new objects must win where they did not before, and the saved folder must
reload to exactly the weights the stored per-batch deltas describe."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch
import yaml
from safetensors.torch import load_file
from scratch_project import run_stage_subprocess

from ece.eval.metrics import fact_metrics
from ece.model.adapter import ModelAdapter
from ece.model.loading import load_model

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["prepare", "covariance", "attribute", "cluster", "precompute_z", "apply_edits"]
N_FACTS = 10

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("project")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key in ("edit_dataset", "generation_prompts"):
        params["data"][key] = str(ROOT / params["data"][key])
    params["covariance"]["corpus"] = str(ROOT / params["covariance"]["corpus"])
    params["data"]["n_facts"] = N_FACTS
    params["edit"]["batch_size"] = N_FACTS
    params["covariance"]["n_tokens"] = 20_000
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in STAGES:
        run = run_stage_subprocess(work, stage)
        assert run.returncode == 0, f"{stage} failed:\n{run.stderr[-3000:]}"
    return work


def test_edits_make_new_objects_win(project: Path) -> None:
    facts = pl.read_parquet(project / "artifacts/prepared/edits.parquet")
    before = fact_metrics(*load_model("smollm2-135m"), facts)["efficacy"].to_numpy()
    after = fact_metrics(*load_model(str(project / "artifacts/edited/model")), facts)["efficacy"].to_numpy()
    lost_before = before == 0
    assert lost_before.sum() >= N_FACTS // 2, "the facts should mostly be unknown-new before editing"
    flipped = (after[lost_before] == 1).mean()
    assert flipped > 0.5, f"only {flipped:.0%} of the edits that did not win before win after ({after})"


def test_saved_model_equals_original_plus_stored_deltas(project: Path) -> None:
    original, tok = load_model("smollm2-135m")
    adapter = ModelAdapter(original)
    for delta_file in sorted((project / "artifacts/edited").glob("delta-batch-*.safetensors")):
        tensors = load_file(delta_file)
        for name in tensors:
            if name.endswith(".cols"):
                layer = int(name.split(".")[1])
                with torch.no_grad():
                    adapter.w_out_weight(layer)[:, tensors[name]] = tensors[f"layer.{layer}.new"]
    edited, _ = load_model(str(project / "artifacts/edited/model"))
    ids = tok("The Eiffel Tower is located in the city of", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(original(ids).logits, edited(ids).logits)
    for a, b in zip(original.state_dict().values(), edited.state_dict().values()):
        assert torch.equal(a, b)
