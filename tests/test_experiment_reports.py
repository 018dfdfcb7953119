"""The reports built on DVC experiments (bench/experiments.py, bench/rows.py, bench/sweep.py, bench/compare.py,
bench/gemma3_compare.py), from
hand-made params and rows: the overrides read back from two params files, sweep experiment names that
git accepts, and the table cells a reader relies on. The queued run itself is tested end to end in
tests/pipeline/test_dvc_pipeline.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import compare  # noqa: E402
import experiments  # noqa: E402
import gemma3_compare  # noqa: E402
import rows  # noqa: E402
import sweep  # noqa: E402

from ece.errors import EceError  # noqa: E402

SUMMARY = {"efficacy": 0.2, "generalization": 0.1, "specificity": 0.7, "score": 0.25}


def test_changed_params_lists_exactly_what_differs_in_dvc_spelling() -> None:
    base = {"method": "ece", "edit": {"layers": [3, 4], "batch_size": 25}, "z": {"lr": 0.5, "stop": None}}
    run = {"method": "memit", "edit": {"layers": [3, 5], "batch_size": 25}, "z": {"lr": 0.5, "stop": True, "k": 2}}
    assert experiments.changed_params(base, run) == ["method=memit", "edit.layers=[3,5]", "z.stop=true", "z.k=2"]
    assert experiments.changed_params(run, run) == []


def test_sweep_experiment_names_are_git_refs_and_stable() -> None:
    a = sweep.experiment_name("layers", ["data.n_facts=40", "edit.layers=[2,3,4]"])
    assert a == sweep.experiment_name("layers", ["data.n_facts=40", "edit.layers=[2,3,4]"])
    assert a != sweep.experiment_name("layers", ["data.n_facts=40", "edit.layers=[2,3,5]"])
    checked = subprocess.run(["git", "check-ref-format", f"refs/exps/{a}"], capture_output=True)
    assert checked.returncode == 0 and a.startswith("sweep-layers-")


def test_sweep_refuses_bad_names_typos_and_the_earlier_reports() -> None:
    with pytest.raises(EceError, match="sweep name"):
        sweep.check_name("a/b")
    with pytest.raises(EceError, match="earlier in-process sweep"):
        sweep.check_name("layers")  # reports/sweep_layers.json: rows of the old in-process script
    with pytest.raises(SystemExit, match="layerz"):  # checked before anything is queued
        experiments.queue(sweep.plan("t", ["edit.layerz=[1]"], ["data.n_facts=4"]))


def _sweep_row(overrides: list[str], z: Any) -> dict[str, Any]:
    return {
        "row": "sweep-t-" + overrides[-1],
        "overrides": overrides,
        "pre": SUMMARY,
        "post": {**SUMMARY, "efficacy": 0.9},
        "z_nll": 0.05,
        "z_row_steps": 120,
        "seconds_per_batch": {"attribution": 1.0, "clustering": 0.5, "z": z, "update": 2.0},
    }


def test_sweep_table_splits_common_overrides_from_each_config() -> None:
    rows = [_sweep_row(["data.n_facts=40", "z.lr=1.0"], 10.0), _sweep_row(["data.n_facts=40", "z.lr=2.0"], "NaN")]
    table = sweep.markdown("t", rows)
    assert "Every row ran with `data.n_facts=40`" in table
    cells = [line.split(" | ") for line in table.splitlines() if line.startswith("| `")]
    assert [c[0] for c in cells] == ["| `z.lr=1.0`", "| `z.lr=2.0`"]
    assert [c[7] for c in cells] == ["11.5", "reused"]  # z + attribution + clustering; NaN = z from the cache
    assert "(nothing in common)" in sweep.markdown("t", rows[:1])  # one row: its overrides are its config


def test_compare_table_shows_reused_z_and_no_total_for_it() -> None:
    def row(method: str, z: Any, row_steps: int | None = None) -> dict[str, Any]:
        summary = {**SUMMARY, "fluency": 500.0, "perplexity": 30.0, "general": {}}
        return {
            "row": f"zsre-{method}",
            "method": method,
            "dataset": "zsre",
            "n_facts": 50,
            "batch_size": 25,
            "date": "2026-12-03",
            "pre": summary,
            "post": summary,
            "seconds_per_batch": {"z": z, "update": 4.0},
            "code": "abc1234",
            "z_row_steps": row_steps,
        }

    lines = compare.markdown([row("memit", 70.0, 376), row("alphaedit", "NaN")]).splitlines()
    memit = next(line for line in lines if line.startswith("| memit"))
    alphaedit = next(line for line in lines if line.startswith("| alphaedit"))
    assert memit.split(" | ")[-7:] == ["376", "0.0", "0.0", "70.0", "4.0", "74.0", "abc1234 |"]
    assert alphaedit.split(" | ")[-7:] == ["–", "0.0", "0.0", "reused", "4.0", "–", "abc1234 |"]


def test_experiment_row_reads_what_every_report_keeps_and_cost_cells_show_it() -> None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    parent = subprocess.run(["git", "rev-parse", "--short", "HEAD^"], capture_output=True, text=True, check=True)
    metrics = {"n_facts": 40, "pre": SUMMARY, "post": {**SUMMARY, "efficacy": 0.9}}
    runs = [{"batch": 0, "z_row_steps": 120}, {"batch": 1}, {"batch": 2, "z_row_steps": 80}]
    timings = {"seconds_per_batch": {"z": 30.0, "attribution": 2.5, "clustering": 0.5, "update": 4.25}}
    r = {"rev": head, "metrics": metrics, "params": {"edit": {"batch_size": 20}}, "timings": timings, "runs": runs}
    row = rows.experiment_row(r)
    assert row == {
        "rev": head,
        "code": parent.stdout.strip(),  # the experiment commit's parent: the code it ran from
        "n_facts": 40,
        "batch_size": 20,
        "pre": SUMMARY,
        "post": metrics["post"],
        "seconds_per_batch": timings["seconds_per_batch"],
        "z_row_steps": 200,  # 120 + 80; a batch that recorded none adds nothing
    }
    assert rows.cost_cells(row) == ["200", "33.0", "4.2"]  # z + attribution + clustering; update to 0.1 s
    bare = rows.experiment_row({**r, "params": None, "timings": None, "runs": None})
    assert (bare["batch_size"], bare["seconds_per_batch"], bare["z_row_steps"]) == (None, {}, None)
    assert rows.cost_cells(bare) == ["–", "–", "–"]
    reused = {**row, "seconds_per_batch": {"z": "NaN", "update": 1.0}}  # z from the scratch cache
    assert rows.cost_cells(reused) == ["200", "reused", "1.0"]


def test_gemma3_table_per_size_each_under_its_own_unedited_model() -> None:
    def row(name: str, n: int, batch: int, pre_efficacy: float, post_efficacy: float) -> dict[str, Any]:
        return {
            "row": name,
            "n_facts": n,
            "batch_size": batch,
            "pre": {**SUMMARY, "efficacy": pre_efficacy},
            "post": {**SUMMARY, "efficacy": post_efficacy},
            "seconds_per_batch": {"z": 10.0, "update": 2.0},
            "z_row_steps": 5,
            "code": "abc1234",
        }

    table = gemma3_compare.markdown(
        [row("ece", 100, 25, 0.2, 0.9), row("memit", 100, 25, 0.2, 0.8), row("ece-2000", 2000, 100, 0.25, 0.7)]
    )
    sections = table.split("\n## ")[1:]
    assert [s.splitlines()[0] for s in sections] == ["100 facts in batches of 25", "2000 facts in batches of 100"]
    first = [line.split(" | ")[:2] for line in sections[0].splitlines() if line.startswith("| ") and "---" not in line]
    second = [line.split(" | ")[:2] for line in sections[1].splitlines() if line.startswith("| ") and "---" not in line]
    assert first[1:] == [["| unedited", "0.200"], ["| ece", "0.900"], ["| memit", "0.800"]]
    assert second[1:] == [["| unedited", "0.250"], ["| ece-2000", "0.700"]]
    assert "`gemma3`, `gemma3-memit`, `gemma3-cf2000`" in table  # the experiments the rows came from


def test_required_output_returns_the_bytes_or_exits_naming_run_path_and_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = {("rev1", "artifacts/a.parquet"): b"data"}
    monkeypatch.setattr(experiments, "read_output", lambda rev, path: cache.get((rev, path)))
    assert experiments.required_output("rev1", "artifacts/a.parquet", "row", "hint") == b"data"
    with pytest.raises(SystemExit, match=r"^row: artifacts/b\.parquet is not in this machine's DVC cache \(hint\)$"):
        experiments.required_output("rev1", "artifacts/b.parquet", "row", "hint")
