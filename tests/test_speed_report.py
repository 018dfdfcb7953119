"""bench/speed.py's report tables (pure functions of a results dict), against hand-worked figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import speed  # noqa: E402

from ece.editing.zcache import INDEX_SCHEMA  # noqa: E402

PHASES0 = dict.fromkeys(speed.PHASES, 0.0)


def _batch(i: int, z: float, keys: float, row_steps: int) -> dict:
    return PHASES0 | {"batch": i, "n_facts": 2, "z": z, "update_keys": keys, "z_row_steps": row_steps}


RESULTS = {
    "date": "2026-12-03",
    "machine": "test",
    "batches": 2,
    "out": "speed_test",
    "sizes": {
        "2": {
            "ece": [_batch(0, 9.0, 1.0, 10), _batch(1, 3.0, 1.0, 4)],
            "memit": [_batch(0, 11.0, 1.0, 12), _batch(1, 11.0, 1.0, 12)],
        }
    },
    # four facts over two batches: one cold, one batch-mate, two started from the earlier batch
    "starts": {
        "2": {
            "ece": {
                "id": ["a", "b", "c", "d"],
                "batch": [0, 0, 1, 1],
                "steps": [7, 3, 2, 2],
                "start": ["cold", "member", "earlier", "earlier"],
            },
            "memit": {
                "id": ["a", "b", "c", "d"],
                "batch": [0, 0, 1, 1],
                "steps": [7, 5, 6, 6],
                "start": ["cold", "cold", "cold", "cold"],
            },
        }
    },
}


def test_mean_and_per_batch_ratios_are_the_hand_worked_ones():
    text = speed.render(RESULTS)
    # means: ece (10 + 4) / 2 = 7 s, memit 12 s -> 12 / 7 = 1.71x; row-steps 7 and 12
    assert "| 2 | ece | 0.0 | 0.0 | 6.0 | 1.0 | 0.0 | 0.0 | 7.0 | 7 | 1.00× |" in text
    assert "| 2 | memit | 0.0 | 0.0 | 11.0 | 1.0 | 0.0 | 0.0 | 12.0 | 12 | 1.71× |" in text
    # per batch: 12 / 10 = 1.20x, 12 / 4 = 3.00x
    assert "| 0 | 10.0 | 10 | 12.0 | 12 | memit 1.20× |" in text
    assert "| 1 | 4.0 | 4 | 12.0 | 12 | memit 3.00× |" in text


def test_row_steps_by_how_ece_started_are_summed_over_the_same_facts():
    rows = [line for line in speed.start_lines(RESULTS) if line.startswith("| all") or line.startswith("| first")]
    assert rows == [
        "| all batches: cold | 1 | 7 | 7 |",
        "| all batches: member | 1 | 3 | 5 |",
        "| all batches: earlier | 2 | 4 | 12 |",
        "| first batch: cold | 1 | 7 | 7 |",
        "| first batch: member | 1 | 3 | 5 |",
        "| first batch: earlier | 0 | 0 | 0 |",
    ]


def test_a_report_without_starts_or_several_batches_has_neither_table():
    single = {k: v for k, v in RESULTS.items() if k != "starts"} | {"batches": 1}
    text = speed.render(single)
    assert "Every batch" not in text and "by how" not in text


def test_every_table_compares_with_the_same_ece_row_when_no_plain_ece_ran():
    """Without an `ece` row the mean table and the per-batch one both divide by the first ece-* row, even
    when another configuration ran first."""
    sizes = {"2": {"memit": RESULTS["sizes"]["2"]["memit"], "ece-within": RESULTS["sizes"]["2"]["ece"]}}
    text = speed.render(RESULTS | {"sizes": sizes, "starts": {}})
    assert "| 2 | memit | 0.0 | 0.0 | 11.0 | 1.0 | 0.0 | 0.0 | 12.0 | 12 | 1.71× |" in text
    assert "| 0 | 12.0 | 12 | 10.0 | 10 | memit 1.20× |" in text and "s over ece-within's" in text


def test_paired_differences_are_memit_minus_ece_on_the_same_facts():
    """Hand-worked: differences that are the same on every fact give that value and a zero-width interval;
    a fact without a score on one side drops out of that metric only."""
    per_fact = {
        "2": {
            "ece": {
                "id": ["a", "b", "c", "d"],
                "efficacy": [1.0, 1.0, 0.0, 0.5],
                "generalization": [0.5, 0.5, 0.5, None],
                "specificity": [0.5, 0.4, 0.3, 0.2],
            },
            "memit": {
                "id": ["a", "b", "c", "d"],
                "efficacy": [0.75, 0.75, -0.25, 0.25],  # -0.25 on every fact
                "generalization": [0.5, 0.5, 0.5, 1.0],  # the same where both are scored
                "specificity": [0.6, 0.5, 0.4, 0.3],  # +0.1 on every fact
            },
        }
    }
    lines = speed.paired_lines(RESULTS | {"per_fact": per_fact})
    assert "the same 4 facts" in lines[1]
    assert lines[-1] == (
        "| memit − ece | -0.250 [-0.250, -0.250]* | +0.000 [+0.000, +0.000] | +0.100 [+0.100, +0.100]* |"
    )
    shuffled = per_fact["2"]["memit"] | {"id": ["b", "a", "c", "d"]}
    with pytest.raises(ValueError, match="different facts"):
        speed.paired_lines(RESULTS | {"per_fact": {"2": {"ece": per_fact["2"]["ece"], "memit": shuffled}}})


def test_report_json_puts_each_flat_list_on_one_line_and_reads_back_the_same(tmp_path):
    results = RESULTS | {
        "per_fact": {"2": {"ece": {"id": ['a "quoted" [x]', "b\\]", "{c}"], "efficacy": [1.0, None, 0.5]}}}
    }
    speed.write_json(results, tmp_path / "r")
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text) == results
    assert '"efficacy": [1.0, null, 0.5]' in text
    assert '"id": ["a \\"quoted\\" [x]", "b\\\\]", "{c}"]' in text
    assert '"steps": [7, 3, 2, 2]' in text  # inside nested objects too


def test_start_table_leaves_out_a_configuration_without_z(tmp_path, monkeypatch):
    """UltraEdit has no z: the empty z index its run writes gives no start entry, so the table gets no
    column for it; a configuration over other facts is refused, as in the paired table."""
    monkeypatch.setattr(speed, "ROOT", tmp_path)
    index = speed.scratch_dir("ultraedit", 4, 2) / speed.Z_DIR / "index.parquet"
    index.parent.mkdir(parents=True)
    pl.DataFrame(schema=INDEX_SCHEMA).write_parquet(index)  # what precompute_z writes for a method without z
    results = json.loads(json.dumps(RESULTS))
    speed.add_starts(results, 2, "ultraedit")
    rows = speed.start_lines(results)
    assert "| start | facts | ece row-steps | memit row-steps |" in rows
    assert "| all batches: cold | 1 | 7 | 7 |" in rows
    other = results["starts"]["2"]["memit"] | {"id": ["b", "a", "c", "d"]}
    with pytest.raises(ValueError, match="different facts"):
        speed.start_lines(results | {"starts": {"2": results["starts"]["2"] | {"memit": other}}})
