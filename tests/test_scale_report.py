"""bench/scale.py's report and the row helpers of bench/rows.py it uses: ECE's row judged against the
benchmark's targets from hand-made rows, each target flipping on exactly the number it names."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import rows as report_rows  # noqa: E402
import scale  # noqa: E402

PRE = {"efficacy": 0.26, "generalization": 0.20, "specificity": 0.74, "perplexity": 30.0, "score": 0.29}
GOOD = {"efficacy": 0.995, "generalization": 0.91, "specificity": 0.72, "perplexity": 30.5, "score": 0.85}


def _row(method: str, post: dict[str, float], dataset: str = "cf", variant: str = "") -> dict[str, Any]:
    return {"row": f"{dataset}-{method}{variant}", "method": method, "pre": PRE, "post": post}


def _verdicts(dataset: str, rows: list[dict[str, Any]]) -> dict[str, str]:
    lines = [line for line in scale.targets(dataset, rows) if line.startswith("- ")]
    return dict(line[2:].split(": ", 1) for line in lines)


def test_every_cf_target_met_by_a_row_that_meets_them() -> None:
    rows = [_row("ece", GOOD), _row("memit", {**GOOD, "score": 0.80}), _row("alphaedit", {**GOOD, "score": 0.84})]
    assert set(_verdicts("cf", rows).values()) == {"met"}


@pytest.mark.parametrize(
    "change, target",
    [
        ({"efficacy": 0.985}, "efficacy >= 0.99"),
        ({"generalization": 0.89}, "generalization >= 0.90"),
        ({"specificity": 0.70}, "specificity within 0.03 of unedited"),  # 0.74 - 0.70 = 0.04
        ({"perplexity": 30.7}, "perplexity within 2 % of unedited"),  # 30 * 1.02 = 30.6
        ({"score": 0.83}, "score ahead of MEMIT and AlphaEdit"),  # AlphaEdit has 0.84
    ],
)
def test_each_cf_target_fails_on_its_own_number(change: dict[str, float], target: str) -> None:
    rows = [
        _row("ece", {**GOOD, **change}),
        _row("memit", {**GOOD, "score": 0.80}),
        _row("alphaedit", {**GOOD, "score": 0.84}),
    ]
    verdicts = _verdicts("cf", rows)
    assert verdicts.pop(target) == "**NOT met**"
    assert set(verdicts.values()) == {"met"}


def test_score_target_waits_for_both_baselines_and_zsre_has_its_own() -> None:
    assert (
        "not judged" in _verdicts("cf", [_row("ece", GOOD), _row("memit", GOOD)])["score ahead of MEMIT and AlphaEdit"]
    )
    zsre = _verdicts("zsre", [_row("ece", {**GOOD, "efficacy": 0.96, "specificity": 0.735}, "zsre")])
    assert zsre == {"efficacy >= 0.95": "met", "generalization >= 0.90": "met", "specificity >= unedited - 0.01": "met"}
    assert scale.targets("cf", [_row("memit", GOOD)]) == []  # no ECE row, nothing to judge


def test_variant_rows_are_listed_but_never_judged() -> None:
    """A variant (one setting changed) is neither ECE's row nor a baseline: ECE is judged against the
    released MEMIT and AlphaEdit, and a variant of ECE alone leaves nothing to judge."""
    rows = [
        _row("ece", GOOD),
        _row("memit", {**GOOD, "score": 0.80}),
        _row("alphaedit", {**GOOD, "score": 0.84}),
        _row("alphaedit", {**GOOD, "score": 0.95}, variant="-e10"),  # ahead of ECE, but not AlphaEdit as released
    ]
    assert _verdicts("cf", rows)["score ahead of MEMIT and AlphaEdit"] == "met"
    assert scale.targets("cf", [_row("ece", {**GOOD, "efficacy": 0.5}, variant="-nowarm")]) == []
    assert {"cf-alphaedit-e10", "cf-ece-nowarm", "zsre-ece-nowarm"} <= set(scale.ROWS)
    assert (
        "method=alphaedit" in scale.ROWS["cf-alphaedit-e10"]
        and "alphaedit.nullspace_energy=0.1" in scale.ROWS["cf-alphaedit-e10"]
    )
    assert not set(scale.VARIANTS) & {r.split("-", 1)[1] for r in scale.DEFAULT_ROWS}
    base = {"n_facts": 2000, "family": "comparison", "pre": PRE, "seconds_per_batch": {}, "seconds_total": {}}
    table = scale.markdown([{**base, **r, "eval_seconds": {}, "z_row_steps": None} for r in rows])
    assert "| alphaedit-e10 | " in table and "| alphaedit | " in table


def test_z_row_steps_summed_over_batches_and_shown_per_row() -> None:
    runs = [{"batch": 0, "z_row_steps": 650}, {"batch": 1, "z_row_steps": 590}]
    assert report_rows.z_row_steps(runs) == 1240
    assert report_rows.z_row_steps([{"batch": 0, "update": 1.0}]) is None  # UltraEdit: no z
    assert report_rows.z_row_steps(None) is None  # an experiment without the file
    base = {
        "n_facts": 200,
        "family": "comparison",
        "pre": PRE,
        "post": GOOD,
        "seconds_per_batch": {},
        "seconds_total": {},
        "eval_seconds": {},
    }
    rows = [
        {**base, "row": "cf-ece", "method": "ece", "z_row_steps": 1240},
        {**base, "row": "cf-ultraedit", "method": "ultraedit", "z_row_steps": None},
    ]
    table = {
        line.split(" | ")[0]: line.split(" | ") for line in scale.markdown(rows).splitlines() if line.startswith("| ")
    }
    column = table["| model"].index("z row-steps")
    assert table["| ece"][column] == "1240"
    assert table["| ultraedit"][column] == "–"


def test_z_seconds_of_a_row_that_reused_another_rows_z() -> None:
    """DVC's timings hold NaN for a phase the run did not compute; read back from YAML it is the string
    'NaN'. Such a row shows `reused` for z and no edit total, not a sum that leaves z out."""
    assert report_rows.seconds_of("NaN") is None and report_rows.seconds_of(float("nan")) is None
    assert report_rows.seconds_of(12) == 12.0
    assert report_rows.edit_seconds({"z": "NaN", "update": 2768.0}) is None
    assert report_rows.edit_seconds({"attribution": 10.0, "z": 3000.0, "update": 2000.0}) == 5010.0
    base = {"n_facts": 2000, "family": "comparison", "pre": PRE, "post": GOOD, "eval_seconds": {}}
    rows = [
        {
            **base,
            "row": "cf-memit",
            "method": "memit",
            "z_row_steps": 14777,
            "seconds_per_batch": {"z": "NaN", "update": 190.37},
            "seconds_total": {"z": "NaN", "update": 3807.4},
        },
        {
            **base,
            "row": "cf-ece",
            "method": "ece",
            "z_row_steps": 12723,
            "seconds_per_batch": {"attribution": 16.6, "clustering": 0.1, "z": 162.3, "update": 107.3},
            "seconds_total": {"attribution": 333.0, "clustering": 2.0, "z": 3247.0, "update": 2147.0},
        },
    ]
    lines = scale.markdown(rows).splitlines()
    head = next(line for line in lines if line.startswith("| model")).split(" | ")
    memit = next(line for line in lines if line.startswith("| memit")).split(" | ")
    ece = next(line for line in lines if line.startswith("| ece")).split(" | ")
    at = {name: head.index(name) for name in ("z s/batch", "update s/batch", "edit s")}
    assert (memit[at["z s/batch"]], memit[at["update s/batch"]], memit[at["edit s"]]) == ("reused", "190.4", "–")
    assert (ece[at["z s/batch"]], ece[at["update s/batch"]], ece[at["edit s"]]) == ("179.0", "107.3", "5729")


def test_merge_keeps_stored_rows_whose_experiments_are_gone_and_replaces_found_ones() -> None:
    stored = [
        {"row": "zsre-ece", "rev": "a", "score": 0.2},
        {"row": "cf-memit", "rev": "b", "score": 0.6},
        {"row": "cf-ece", "rev": "c", "score": 0.7},
    ]
    found = [{"row": "cf-ece", "rev": "d", "score": 0.8}, {"row": "cf-alphaedit", "rev": "e", "score": 0.5}]
    merged = report_rows.merge(stored, found, list(scale.ROWS))
    # The issue's row order (ROWS: CounterFact before zsRE, ECE, MEMIT, AlphaEdit), not the input order.
    assert [(r["row"], r["rev"]) for r in merged] == [
        ("cf-ece", "d"),
        ("cf-memit", "b"),
        ("cf-alphaedit", "e"),
        ("zsre-ece", "a"),
    ]
    assert report_rows.merge([], [], list(scale.ROWS)) == []


def test_merge_keeps_an_earlier_codes_row_under_its_commit_when_asked() -> None:
    """A row run again from other code: with keep_earlier, the stored run stays as `<row>@<code>`, right
    after its row; from the same code it is replaced; without keep_earlier it is replaced either way."""
    stored = [
        {"row": "cf-ece", "rev": "a", "code": "111aaaa"},
        {"row": "cf-memit", "rev": "b", "code": "222bbbb"},
        {"row": "zsre-ece", "rev": "c", "code": "333cccc"},
    ]
    found = [
        {"row": "cf-ece", "rev": "d", "code": "444dddd"},
        {"row": "zsre-ece", "rev": "e", "code": "333ccccd"},  # git's abbreviation grew by a digit
    ]
    merged = report_rows.merge(stored, found, list(scale.ROWS), keep_earlier=True)
    assert [(r["row"], r["rev"]) for r in merged] == [
        ("cf-ece", "d"),
        ("cf-ece@111aaaa", "a"),
        ("cf-memit", "b"),
        ("zsre-ece", "e"),
    ]
    # merging the report's own output again changes nothing
    assert report_rows.merge(merged, found, list(scale.ROWS), keep_earlier=True) == merged
    assert [r["row"] for r in report_rows.merge(stored, found, list(scale.ROWS))] == ["cf-ece", "cf-memit", "zsre-ece"]
    assert scale.label(merged[1]) == "ece@111aaaa"
