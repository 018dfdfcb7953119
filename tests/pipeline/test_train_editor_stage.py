"""Stage train_editor on the tiny-llama scratch project: a method without a trained editor skips it
cleanly (a fixed marker, no model loaded, the same bytes for every such method); MEND writes its editor
as safetensors + JSON naming the base model and what it was trained from, and its training curve."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from scratch_project import method_project, run_stage_inprocess, set_params

from ece.model.loading import model_fingerprint, tiny_model
from ece.model.workbench import Workbench


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_methods_without_a_trained_editor_write_the_same_marker(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = method_project(tmp_path_factory, "skip_train_editor", {"method": "ece"})
    editor = work / "artifacts/editor"
    assert json.loads((editor / "editor.json").read_text()) == {"trained_editor": None}
    assert [p.name for p in editor.iterdir()] == ["editor.json"]
    first = digest(editor)

    def no_model(*_args: object) -> None:
        raise AssertionError("the skip must not load the model")

    monkeypatch.setattr(Workbench, "open", no_model)
    for method in ("memit", "alphaedit"):
        set_params(work, {"method": method})
        run_stage_inprocess(work, "train_editor")
        assert digest(editor) == first  # DVC sees an unchanged output: nothing after it reruns
        curve = json.loads((work / "reports/editor_curve.json").read_text())
        assert curve == {"method": method, "trained_editor": False, "curve": []}
        assert (work / "reports/plots/editor_curve.png").stat().st_size > 0


def test_mend_writes_its_editor_and_training_curve(tmp_path_factory: pytest.TempPathFactory) -> None:
    work = method_project(tmp_path_factory, "mend_train_editor", {"method": "mend"})
    editor = work / "artifacts/editor"
    assert sorted(p.name for p in editor.iterdir()) == ["editor.json", "editor.safetensors", "train_facts.parquet"]
    config = json.loads((editor / "editor.json").read_text())
    params = yaml.safe_load((work / "params.yaml").read_text())
    assert config["method"] == "mend" and config["layers"] == params["mend"]["layers"]
    assert config["model_fingerprint"] == model_fingerprint(tiny_model("tiny-llama", 0)[0])
    assert config["inputs"]["train_editor"] == params["train_editor"] and config["inputs"]["mend"] == params["mend"]
    assert config["inputs"]["data_sha256"] == hashlib.sha256((work / "data/train.jsonl").read_bytes()).hexdigest()
    assert (
        config["n_train"] == 6 and config["n_heldout"] == 2 and config["steps"] == params["train_editor"]["max_steps"]
    )
    tensors = load_file(editor / "editor.safetensors")
    assert {"alpha", "net.U", "net.V", "net.count"} <= tensors.keys()
    curve = json.loads((work / "reports/editor_curve.json").read_text())["curve"]
    every = params["train_editor"]["eval_every"]
    assert [c["step"] for c in curve] == list(range(every, params["train_editor"]["max_steps"] + 1, every))
    assert all(c["train_loss"] > 0 and c["heldout_loss"] > 0 for c in curve)
    assert (work / "reports/plots/editor_curve.png").stat().st_size > 0
