"""Bad inputs end to end: every one stops with an error that names the problem and how to fix it
(`error: ...` plus `hint: ...`, exit status 2, no traceback) and leaves the existing outputs untouched.

Covered elsewhere, not repeated here:
- dataset files: malformed JSON/JSONL (line named), CSV with a missing required column or too many
  fields, wrong JSON shapes, non-UTF-8 bytes (byte offset named), non-string values, unknown format:
  tests/data/test_data.py (test_malformed_json_names_the_line, test_csv_missing_required_columns,
  test_non_utf8_names_the_byte_offset, ...);
- dataset content: prompt without "{}" or with two, empty subject/target, target_new == target_true
  (ignoring case and spacing), duplicate or missing ids, over-long strings, and the prepare stage
  leaving artifacts/prepared and reports/validation.md untouched on all of them: tests/data/test_validation.py
  (test_each_defect_names_its_rule_and_row, test_duplicate_ids_list_every_copy,
  test_prepare_publishes_only_valid_data);
- covariance files missing, corrupted, truncated, non-finite, without metadata or for another model, at
  load level: tests/editing/test_covariance.py; layers out of range and unloadable model names at library level:
  tests/model/test_models_adapter.py; non-PD, NaN and exploding updates inside the Editor: tests/editing/test_update.py.

Added here: the same failures through the stages' real entry point (`run_stage`: params → main →
exit 2) on a finished tiny-llama project, checking that artifacts/ and reports/ are byte-for-byte
unchanged; a trained editor (MEND) that is missing, the marker of another method, damaged, trained for
another model, from other settings, or on a fact being edited; params errors (wrong types, unknown
choices, broken YAML, non-UTF-8); a huge string; CLI misuse; and that no pickle is ever loaded.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import runpy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from scratch_project import FACTS, ROOT, TRAIN, base_project, inside, method_project, run_stage_inprocess, stage_env

from ece import cli
from ece.config import load_params
from ece.editing.covariance import save_covariance
from ece.errors import EceError
from ece.stage import run_stage


def snapshot(work: Path) -> dict[str, str]:
    return {
        str(p.relative_to(work)): hashlib.sha256(p.read_bytes()).hexdigest()
        for d in ("artifacts", "reports")
        for p in sorted((work / d).rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = base_project(tmp_path_factory, "bad_inputs_base")
    run_stage_inprocess(work, "apply_edits")
    return work


@pytest.fixture
def project(finished: Path, tmp_path: Path) -> Path:
    import shutil

    work = tmp_path / "project"
    shutil.copytree(finished, work)
    return work


def set_params(work: Path, section: str, key: str, value: object) -> None:
    params = yaml.safe_load((work / "params.yaml").read_text())
    params[section][key] = value
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def fails(work: Path, stage: str, capsys: pytest.CaptureFixture, report: str | None = None) -> str:
    """Run a stage through its entry point; it must exit 2 with a hint and change no output (it may
    add its error `report`)."""
    before = snapshot(work)
    capsys.readouterr()
    main = runpy.run_path(str(ROOT / "stages" / f"{stage}.py"))["main"]
    with inside(work), pytest.raises(SystemExit) as exit_info:
        run_stage(main)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    err = err[err.find("error: ") :] if "error: " in err else err  # after transformers' loading bars, if any
    assert err.startswith("error: ") and "\n  hint: " in err, err
    after = snapshot(work)
    if report is not None:
        assert after.pop(report, None) is not None, f"no {report}"
    assert after == before, "a failing run changed existing outputs"
    return err


# --- trained editor (MEND) ---------------------------------------------------------------------------


TRAINED = ("mend", "serac")  # the methods with a trained editor


@pytest.fixture(scope="module")
def trained_finished(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """method → its project after apply_edits, built once per module on first use."""
    built: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in built:
            built[method] = method_project(tmp_path_factory, f"bad_inputs_{method}", {"method": method})
            run_stage_inprocess(built[method], "apply_edits")
        return built[method]

    return get


@pytest.fixture(params=TRAINED)
def trained_project(trained_finished: Callable[[str], Path], tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    import shutil

    work = tmp_path / f"{request.param}_project"
    shutil.copytree(trained_finished(request.param), work)
    return work


def _remove(work: Path) -> None:
    import shutil

    shutil.rmtree(work / "artifacts/editor")


def _truncate(work: Path) -> None:
    path = work / "artifacts/editor/editor.safetensors"
    path.write_bytes(path.read_bytes()[:200])


def _other_model(work: Path) -> None:
    path = work / "artifacts/editor/editor.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "model_fingerprint": "0123456789abcdef"}))


def _marker(work: Path) -> None:
    (work / "artifacts/editor/editor.safetensors").unlink()
    (work / "artifacts/editor/editor.json").write_text(json.dumps({"trained_editor": None}))


def _other_settings(work: Path) -> None:
    set_params(work, "train_editor", "id_range", [100, 150])


def _trained_on_an_edited_fact(work: Path) -> None:
    """The training file also holds fact f0 (edited in batch 0): an overlapping choice, trained for real."""
    extra = {**TRAIN[0], **{k: FACTS[0][k] for k in ("subject", "prompt", "target_new")}, "id": "train:150"}
    (work / "data/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*TRAIN, extra]))
    run_stage_inprocess(work, "train_editor")


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (_remove, "no trained editor in artifacts/editor (method {method} needs one)"),
        (_marker, "holds no editor trained for method {method}"),
        (_truncate, "the editor in artifacts/editor is missing or damaged"),
        (_other_model, "was trained for another model (fingerprint 0123456789abcdef"),
        (_other_settings, "trained from other data or settings than params.yaml names now: train_editor:"),
        (_trained_on_an_edited_fact, "the trained editor was trained on 1 of the facts being edited, e.g. ['f0']"),
    ],
    ids=lambda x: getattr(x, "__name__", "")[1:] or None,
)
def test_bad_trained_editor_stops_before_anything_is_edited(
    trained_project: Path, capsys: pytest.CaptureFixture, damage, expected: str
) -> None:
    method = yaml.safe_load((trained_project / "params.yaml").read_text())["method"]
    damage(trained_project)
    err = fails(trained_project, "apply_edits", capsys)
    assert expected.format(method=method) in err and "dvc repro train_editor" in err, err


@pytest.mark.parametrize("change", ["corpus", "general_negatives"])
def test_serac_classifier_trained_on_other_general_texts_is_refused(
    trained_finished: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture, change: str
) -> None:
    """SERAC's classifier also learnt from covariance.corpus (its general-text negatives): another corpus,
    or another number of them per step, and apply_edits refuses it with the train_editor fix."""
    import shutil

    work = tmp_path / "serac_project"
    shutil.copytree(trained_finished("serac"), work)
    if change == "corpus":
        with open(work / "data/corpus.txt", "a") as f:
            f.write("\n\nOne more document about lakes.")
    else:
        set_params(work, "serac", "general_negatives", 1)
    err = fails(work, "apply_edits", capsys)
    assert "trained from other data or settings" in err and "dvc repro train_editor" in err, err
    assert ("corpus_sha256:" if change == "corpus" else "serac: {") in err, err


@pytest.mark.parametrize("damage", ["truncate", "other_model"])
def test_bad_edit_memory_stops_the_evaluation(
    trained_finished: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture, damage: str
) -> None:
    """SERAC's edit memory damaged, or built on other weights than the folder's: evaluate stops, names
    apply_edits as the fix, and writes no report."""
    import shutil

    work = tmp_path / "serac_project"
    shutil.copytree(trained_finished("serac"), work)
    folder = work / "artifacts/edited/model/edit_memory"
    if damage == "truncate":
        path = folder / "memory.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    else:
        path = folder / "memory.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "base_weights": "0123456789abcdef"}))
    err = fails(work, "evaluate", capsys)
    assert ("no readable edit memory" if damage == "truncate" else "was built on another model") in err, err
    assert "dvc repro apply_edits" in err, err


# --- params ---------------------------------------------------------------------------------------


def test_wrong_type_through_the_command_line(project: Path) -> None:
    set_params(project, "edit", "batch_size", "ten")
    before = snapshot(project)
    run = subprocess.run(
        [sys.executable, str(ROOT / "stages/apply_edits.py")],
        cwd=project,
        env=stage_env(),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "at 'edit.batch_size'" in run.stderr and "'ten'" in run.stderr and "hint: check the type" in run.stderr
    assert snapshot(project) == before


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("update", "max_update_norm", "huge", "at 'update.max_update_norm'"),
        ("edit", "layers", "three", "at 'edit.layers'"),
        ("z", "lr", [0.5], "at 'z.lr'"),
        ("method", None, "magic", "unknown method 'magic'"),
        ("serac", "threshold", 1.0, "serac.threshold must be in (0, 1)"),
        ("ece", "scorer", "gradient", "unknown ece.scorer 'gradient'"),
        ("ece", "aggregation", "mean", "unknown ece.aggregation 'mean'"),
        ("update", "max_update_norm", 0.0, "update.max_update_norm must be > 0"),
    ],
)
def test_params_wrong_type_or_unknown_choice(
    project: Path, section: str, key: str | None, value: object, expected: str
) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    if key is None:
        params[section] = value
    else:
        params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(EceError) as info:
        load_params(project / "params.yaml")
    assert expected in str(info.value) and info.value.hint
    if "unknown" in expected:
        assert "use one of" in info.value.hint  # the valid choices are listed


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"model:\n  name: [unclosed\n", "is not valid YAML"),
        (b"edit:\n  layers: [1]\n  layers: [2]\n", "duplicate key"),
        (b"model:\n  name: caf\xe9\n", "is not UTF-8 text (byte 0xe9 at byte offset 18)"),
    ],
)
def test_broken_params_file(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    with pytest.raises(EceError) as info:
        load_params(path)
    assert expected in str(info.value) and info.value.hint


# --- apply_edits: model, layers, covariance, z, guards ---------------------------------------------


def test_layers_out_of_range_for_the_model(project: Path, capsys: pytest.CaptureFixture) -> None:
    set_params(project, "edit", "layers", [1, 9])
    err = fails(project, "apply_edits", capsys)
    assert "edit layers [9] are out of range: the model has 4 layers" in err and "edit.layers" in err


def test_model_that_cannot_be_loaded_offline(
    project: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    set_params(project, "model", "name", "no-such-org/no-such-model")
    err = fails(project, "apply_edits", capsys)
    assert "cannot load model 'no-such-org/no-such-model' offline" in err and "local Hugging Face folder" in err


def test_covariance_of_another_model(project: Path, capsys: pytest.CaptureFixture) -> None:
    path = project / "artifacts/covariance/c0.safetensors"
    save_covariance(
        path, {int(k.split(".")[1]): v for k, v in load_file(path).items()}, {"model_fingerprint": "0123456789abcdef"}
    )
    err = fails(project, "apply_edits", capsys)
    assert "was computed for another model (fingerprint 0123456789abcdef" in err and "rerun the covariance stage" in err


def test_corrupted_covariance(project: Path, capsys: pytest.CaptureFixture) -> None:
    path = project / "artifacts/covariance/c0.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    err = fails(project, "apply_edits", capsys)
    assert "is not a readable safetensors file" in err and "rerun the covariance stage" in err


def test_nan_in_z_stops_before_anything_is_saved(project: Path, capsys: pytest.CaptureFixture) -> None:
    cache = sorted((project / "artifacts/z/cache").glob("*.safetensors"))[1]  # some batch's z
    tensors = load_file(cache)
    tensors["z"][0, 0] = float("nan")
    save_file(tensors, str(cache))
    err = fails(project, "apply_edits", capsys)
    assert re.search(r"batch \d: layer 1: the update is not finite", err) and "mom2_update_weight" in err


def test_exploding_update_names_the_param(project: Path, capsys: pytest.CaptureFixture) -> None:
    set_params(project, "update", "max_update_norm", 1e-9)
    err = fails(project, "apply_edits", capsys)
    assert "batch 0: layer 1: the update is not finite or explodes" in err
    assert "raise update.max_update_norm (now 1e-09)" in err and "Nothing was saved" in err


def test_solve_that_is_not_positive_definite(project: Path, capsys: pytest.CaptureFixture) -> None:
    set_params(project, "update", "mom2_update_weight", 0.0)  # K Kᵀ of 2 facts on ~30 columns: singular
    err = fails(project, "apply_edits", capsys)
    assert "not positive definite" in err and "raise update.mom2_update_weight" in err


def test_huge_string_is_rejected_and_prepared_data_kept(project: Path, capsys: pytest.CaptureFixture) -> None:
    facts = (project / "data/facts.jsonl").read_text().splitlines()
    record = json.loads(facts[1]) | {"target_new": "Rome " * 200_000}  # 1 MB
    (project / "data/facts.jsonl").write_text("\n".join([facts[0], json.dumps(record), *facts[2:]]) + "\n")
    err = fails(project, "prepare", capsys, report="reports/validation_errors.md")
    assert "target_new_max_chars" in err and "#1 f1" in err and "left untouched" in err


# --- the CLI ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["edit", "--subject", "Eiffel Tower", "--prompt", "located in the city of", "--new", "Rome"],
            "exactly one '{}'",
        ),
        (["edit", "--subject", "Eiffel Tower", "--prompt", "{} is in {}", "--new", "Rome"], "exactly one '{}'"),
        (["edit", "--subject", "Eiffel Tower", "--prompt", "{} is in", "--new", " "], "must not be empty"),
        (["audit", "--fact", "no-such-fact"], "fact 'no-such-fact' is not in the ledger"),
        (["audit", "--layer", "3", "--neuron", "1"], "layer 3 was not edited"),
        (["rollback", "--batches", "4"], "--batches 4 is out of range: there are 3 batches"),
        (["rollback", "--to-batch", "-2"], "--to-batch -2 is out of range"),
        (["rollback", "--batches", "1", "--out", "artifacts/edited/model"], "is inside artifacts/edited"),
    ],
)
def test_cli_misuse(project: Path, capsys: pytest.CaptureFixture, argv: list[str], expected: str) -> None:
    before = snapshot(project)
    with inside(project):
        assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "hint: " in err
    assert snapshot(project) == before


def test_cli_edit_without_covariance_and_audit_without_ledger(project: Path, capsys: pytest.CaptureFixture) -> None:
    (project / "artifacts/covariance/c0.safetensors").unlink()
    assert cli.main(["-C", str(project), "edit", "--subject", "Lyon", "--prompt", "{} is in", "--new", "Spain"]) == 2
    err = capsys.readouterr().err
    assert "covariance file not found" in err and "dvc repro covariance" in err
    (project / "artifacts/edited/ledger.parquet").unlink()
    assert cli.main(["-C", str(project), "audit", "--fact", "f0"]) == 2
    assert "run the apply_edits stage" in capsys.readouterr().err


# --- no pickle --------------------------------------------------------------------------------------


def test_no_pickle_in_the_code() -> None:
    """Models load from safetensors, arrays with allow_pickle=False, tables from parquet/JSON."""
    offenders = []
    for path in [*(ROOT / "ece").rglob("*.py"), *(ROOT / "stages").rglob("*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if (
                re.search(r"\b(pickle|cPickle|dill|joblib|cloudpickle|shelve)\b", code)
                and "allow_pickle=False" not in code
                and "no pickles" not in line
            ):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
            if re.search(r"torch\.load\(", code) and "weights_only=True" not in code:
                offenders.append(f"{path.name}:{n}: {line.strip()}")
            if re.search(r"np\.load\(", code) and "allow_pickle=False" not in code:
                offenders.append(f"{path.name}:{n}: {line.strip()}")
            if re.search(r"read_pickle|use_safetensors=False|from_pretrained\([^)]*\.bin", code):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_no_pickle_is_loaded_at_run_time(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def refuse(*_a, **_k):
        raise AssertionError("a pickle was loaded")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    set_params(project, "update", "mom2_update_weight", 14000.0)  # a new key: a full run, not a resume
    run_stage_inprocess(project, "apply_edits")
    for argv in (["audit", "--fact", "f2"], ["audit", "--diff"], ["rollback", "--batches", "1"]):
        assert cli.main(["-C", str(project), *argv, "--json"]) == 0, capsys.readouterr().err
