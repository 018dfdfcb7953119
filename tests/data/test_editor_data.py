"""The training records of a trained editor: selected by id, never a fact that is edited.

The default selection is checked on the shipped CounterFact file against a plain reading of the raw
JSON (case_id ranges, (subject, prompt, target) triples), not against the selection code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ece.config import TrainEditorCfg, load_params
from ece.data.editor_data import check_disjoint, fact_keys, training_records, training_table
from ece.data.loaders import from_records
from ece.errors import EceError

ROOT = Path(__file__).resolve().parents[2]
COUNTERFACT = ROOT / "data/counterfact/counterfact_compact_0-19999.json"


def triple(r: dict) -> tuple[str, str, str]:
    return (r["subject"], r["prompt"], r["target_new"])


def test_default_training_records_never_meet_the_facts_a_run_edits() -> None:
    """The shipped params train on case_ids 10000-19999 less the facts CounterFact repeats below 10000:
    no benchmark run (the first N <= 10000 records) edits a fact the editor has seen."""
    cfg = load_params(ROOT / "params.yaml").train_editor
    raw = json.loads(COUNTERFACT.read_text())
    edited = {triple(r) for r in raw if r["case_id"] < 10000}
    in_range = [r for r in raw if cfg.id_range[0] <= r["case_id"] <= cfg.id_range[1]]
    expected = [r["case_id"] for r in in_range if triple(r) not in edited]
    assert len(expected) < len(in_range)  # the repeats exist, so the rule is exercised

    table, left_out = training_table(cfg)
    assert [int(i.split(":")[1]) for i in table["id"]] == expected
    assert left_out == len(in_range) - len(expected)
    full = {
        (r.fact.subject, r.fact.prompt.replace("{}", r.fact.subject), r.fact.target_new)
        for r in training_records(table)
    }
    assert not full & edited
    check_disjoint(set(), table)  # nothing trained: nothing refused


def records(ids: list[int], subject: str = "Person") -> list[dict]:
    return [
        {
            "id": f"cf:{i}",
            "subject": f"{subject} {i}",
            "prompt": "{} works in",
            "target_new": "Oslo",
            "paraphrase_prompts": [f"{subject} {i} has a job in"],
            "neighborhood_prompts": ["Ravi works in"],
            "neighborhood_target": "Delhi",
        }
        for i in ids
    ]


def write(tmp_path: Path, rows: list[dict]) -> str:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_an_overlapping_choice_is_refused(tmp_path: Path) -> None:
    """Training on ids 0-9 and editing ids 5-14 of the same file: the five shared facts are named."""
    path = write(tmp_path, records(list(range(20))))
    table, _ = training_table(TrainEditorCfg(data=path, id_range=[0, 9], heldout=2))
    edits = from_records(records(list(range(5, 15))))
    with pytest.raises(EceError) as info:
        check_disjoint(set(fact_keys(table)), edits)
    assert "trained on 5 of the facts being edited" in str(info.value) and "'cf:5'" in str(info.value)
    assert "train_editor.id_range" in (info.value.hint or "") and "dvc repro train_editor" in (info.value.hint or "")
    check_disjoint(set(fact_keys(table)), from_records(records(list(range(10, 20)))))  # disjoint: accepted


def test_a_repeated_fact_outside_the_range_is_left_out(tmp_path: Path) -> None:
    rows = records([0, 1, 2, 3, 4, 5])
    rows[4] = {**rows[4], "subject": rows[0]["subject"], "paraphrase_prompts": ["other words"]}  # same fact as id 0
    table, left_out = training_table(TrainEditorCfg(data=write(tmp_path, rows), id_range=[2, 5], heldout=1))
    assert table["id"].to_list() == ["cf:2", "cf:3", "cf:5"] and left_out == 1


@pytest.mark.parametrize(
    ("change", "id_range", "expected"),
    [
        ({"id": "abc"}, [0, 9], "ends with no number"),
        ({}, [50, 60], "selects 0 records"),
        ({"paraphrase_prompts": []}, [0, 9], "lack a '{}' prompt, a paraphrase"),
    ],
)
def test_unusable_selection_names_the_fix(tmp_path: Path, change: dict, id_range: list[int], expected: str) -> None:
    rows = records(list(range(6)))
    rows[1] = {**rows[1], **change}
    with pytest.raises(EceError) as info:
        training_table(TrainEditorCfg(data=write(tmp_path, rows), id_range=id_range, heldout=2))
    assert expected in str(info.value) and info.value.hint
