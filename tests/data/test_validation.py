"""Validation rules name every defect and its rows; the prepare stage publishes only data that passes."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from ece.config import DataCfg, Params
from ece.data.loaders import dataset_hash, load_edits
from ece.data.validation import validate_edits
from ece.errors import EceError

ROOT = Path(__file__).resolve().parents[2]
COMPACT = ROOT / "data/counterfact/counterfact_compact_0-19999.json"
FACT = {"subject": "Ada Lovelace", "prompt": "{} was born in", "target_new": "Paris", "target_true": "London"}


def facts(tmp_path: Path, *changes: dict[str, Any], name: str = "facts.jsonl") -> Path:
    """A JSONL of valid facts with ids f0, f1, ...; each dict of `changes` alters one of them."""
    path = tmp_path / name
    path.write_text("".join(json.dumps({"id": f"f{i}", **FACT, **c}) + "\n" for i, c in enumerate(changes)))
    return path


def failures(path: Path, max_chars: int = 2000) -> dict[str, list[str]]:
    result = validate_edits(load_edits(DataCfg(edit_dataset=str(path))), max_chars)
    assert result.ok == (not result.failures)
    for f in result.failures:
        assert f.rule in result.summary() and ", ".join(f.rows) in result.summary() and f.count >= len(f.rows)
    return {f.rule: f.rows for f in result.failures}


def test_shipped_counterfact_passes() -> None:
    result = validate_edits(load_edits(DataCfg(edit_dataset=str(COMPACT), n_facts=100)), 2000)
    assert result.ok and result.n_rows == 100 and len(result.rules) >= 20


DEFECTS: list[tuple[dict[str, Any], str]] = [
    ({"prompt": "Ada Lovelace was born in"}, "prompt_one_placeholder"),
    ({"prompt": "{} was born in {}"}, "prompt_one_placeholder"),
    ({"subject": ""}, "subject_not_blank"),
    ({"subject": "  "}, "subject_not_blank"),
    ({"subject": None}, "subject_present"),
    ({"target_new": ""}, "target_new_not_blank"),
    ({"target_new": None}, "target_new_present"),
    ({"target_new": " LONDON  "}, "targets_differ"),
    ({"target_true": ""}, "target_true_not_blank"),
    ({"prompt": "{} was born in " + "x" * 60}, "prompt_max_chars"),
    ({"paraphrase_prompts": ["fine", "y" * 61]}, "paraphrase_prompts_max_chars"),
    ({"neighborhood_prompts": ["fine", ""]}, "neighborhood_prompts_elements"),
    ({"generation_prompts": [" "]}, "generation_prompts_elements"),
]


def test_each_defect_names_its_rule_and_row(tmp_path: Path) -> None:
    """One valid fact, then one fact per defect (one validation run: GE costs ~0.2 s a run)."""
    expected: dict[str, list[str]] = {}
    for i, (_, rule) in enumerate(DEFECTS, start=1):
        expected.setdefault(rule, []).append(f"#{i} f{i}")
    assert failures(facts(tmp_path, {}, *(change for change, _ in DEFECTS)), max_chars=60) == expected


def test_duplicate_ids_list_every_copy(tmp_path: Path) -> None:
    assert failures(facts(tmp_path, {}, {"id": "f0"}, {"id": "f0"})) == {"id_unique": ["#0 f0", "#1 f0", "#2 f0"]}


def test_missing_id_when_the_file_has_ids(tmp_path: Path) -> None:
    path = facts(tmp_path, {}, {})
    path.write_text(path.read_text() + json.dumps(FACT) + "\n")
    assert failures(path) == {"id_present": ["#2"]}


def test_compact_prompt_without_its_subject_is_a_validation_error(tmp_path: Path) -> None:
    record = {
        "case_id": 9,
        "prompt": "The capital of France is",
        "subject": "Italy",
        "target_new": "Rome",
        "ground_truth": "Paris",
        "rephrase_prompt": "Italy's capital is",
        "locality_prompt": "France's capital is",
        "locality_ground_truth": "Paris",
    }
    path = tmp_path / "compact.json"
    path.write_text(json.dumps([{**record, "case_id": 8, "prompt": "The capital of Italy is"}, record]))
    assert failures(path) == {"prompt_one_placeholder": ["#1 counterfact:9"]}


def test_non_string_column_is_flagged(tmp_path: Path) -> None:
    df = load_edits(DataCfg(edit_dataset=str(facts(tmp_path, {}, {}))))
    result = validate_edits(df.with_columns(pl.Series("target_new", [1990, 1991])), 2000)
    assert {f.rule: f.rows for f in result.failures} == {"target_new_is_text": ["#0 f0", "#1 f1"]}


def test_many_offenders_are_counted_and_listed_up_to_twenty(tmp_path: Path) -> None:
    result = validate_edits(load_edits(DataCfg(edit_dataset=str(facts(tmp_path, *[{"prompt": "no slot"}] * 25)))), 2000)
    (f,) = result.failures
    assert (f.count, len(f.rows), f.rows[0]) == (25, 20, "#0 f0")
    assert "(+5 more)" in result.summary()
    report = result.to_markdown({"file": "facts.jsonl"})
    assert "FAILED: 1 of" in report and "| prompt_one_placeholder |" in report and "failed (25)" in report


# --- the prepare stage ------------------------------------------------------------------------------


def run_prepare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dataset: Path) -> None:
    """Call the stage's main in-process (GE is already imported), in tmp_path as the project root."""
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "stages/prepare.py"))["main"](Params(data=DataCfg(edit_dataset=str(dataset))))


def test_prepare_publishes_only_valid_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = facts(tmp_path, {}, {"subject": "Alan Turing"}, name="good.jsonl")
    run_prepare(tmp_path, monkeypatch, good)
    parquet, report = tmp_path / "artifacts/prepared/edits.parquet", tmp_path / "reports/validation.md"
    meta = json.loads((tmp_path / "artifacts/prepared/meta.json").read_text())
    df = pl.read_parquet(parquet)
    assert meta["n_rows"] == 2 and meta["format"] == "jsonl" and meta["dataset_hash"] == dataset_hash(df)
    assert meta["source"]["path"] == str(good) and len(meta["source"]["sha256"]) == 64
    assert "all rules passed" in report.read_text() and meta["dataset_hash"] in report.read_text()
    before = parquet.read_bytes(), report.read_bytes()

    # A dataset that fails validation, through the real command line.
    bad = facts(tmp_path, {}, {"prompt": "{} {}"}, {"target_new": "london"}, name="bad.jsonl")
    (tmp_path / "params.yaml").write_text(f"data:\n  edit_dataset: {bad}\ncovariance:\n  corpus: unused.txt\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "stages/prepare.py")], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "prompt_one_placeholder" in proc.stderr and "#1 f1" in proc.stderr
    assert "targets_differ" in proc.stderr and "#2 f2" in proc.stderr
    errors = (tmp_path / "reports/validation_errors.md").read_text()
    assert "failed (1) | #1 f1" in errors and "failed (1) | #2 f2" in errors
    assert (parquet.read_bytes(), report.read_bytes()) == before

    # A file that cannot even be read: same guarantee, the error report says where.
    broken = tmp_path / "broken.json"
    broken.write_text('[{"src": "a",}]')
    with pytest.raises(EceError, match="malformed JSON at line 1"):
        run_prepare(tmp_path, monkeypatch, broken)
    assert "malformed JSON" in (tmp_path / "reports/validation_errors.md").read_text()
    assert (parquet.read_bytes(), report.read_bytes()) == before

    # Fixing the data clears the stale error report.
    run_prepare(tmp_path, monkeypatch, good)
    assert not (tmp_path / "reports/validation_errors.md").exists()
    assert parquet.read_bytes() == before[0]
