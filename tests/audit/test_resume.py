"""Crash-safe and incremental sequential editing: apply_edits killed (SIGKILL) between batches and rerun
resumes from its checkpoint and ends with exactly the weights of an uninterrupted run, no batch applied
twice; a crash in the middle of a checkpoint commit and a checkpoint of other inputs are handled too.
Facts appended to a finished run cost only the new batches, and the result equals a from-scratch run
bit for bit; a changed early fact redoes every batch after it."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file
from scratch_project import (
    FACTS,
    N_BATCHES,
    ROOT,
    UPSTREAM,
    base_project,
    method_project,
    run_stage_inprocess,
    run_stage_subprocess,
    stage_env,
    write_facts,
)

import ece.audit.checkpoint

CKPT = Path(".cache/checkpoint/apply_edits")  # one folder per lineage below it
ULTRAEDIT = {"method": "ultraedit", "ultraedit.lr": 1e-3}  # its updates depend on moments carried across batches


def state_files(work: Path) -> list[Path]:
    return list((work / CKPT).glob("*/state.json"))


def stored_batches(work: Path) -> int:
    (state,) = state_files(work)
    return len(json.loads(state.read_text())["prefix_keys"])


def weights(work: Path) -> dict[str, torch.Tensor]:
    return load_file(work / "artifacts/edited/model/model.safetensors")


def deltas(work: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(work / f"artifacts/edited/delta-batch-{b:04d}.safetensors") for b in range(N_BATCHES)]


def assert_same_result(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), (
        "weights differ from the reference run"
    )
    for da, db in zip(deltas(a), deltas(b)):
        assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)
    files = [
        {f.relative_to(w): f.read_bytes() for f in (w / "artifacts/edited").rglob("*") if f.is_file()} for w in (a, b)
    ]
    assert files[0] == files[1], "the cached output (model, deltas, ledger) is byte for byte that of the reference run"
    assert stored_batches(b) == len(deltas(b)), "the checkpoint keeps every batch for later runs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run, as a subprocess like the killed one."""
    work = base_project(tmp_path_factory, "reference")
    run = run_stage_subprocess(work, "apply_edits")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resuming" not in run.stdout
    return work


def test_killed_run_resumes_bit_exactly(reference: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    work = base_project(tmp_path_factory, "killed")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "stages/apply_edits.py")],
        cwd=work,
        env=stage_env({"ECE_TEST_BATCH_DELAY": "60"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not state_files(work):
            assert proc.poll() is None, f"apply_edits ended early: {proc.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.1)
        assert not (work / "artifacts/edited").exists(), "outputs must appear only at the end"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        out, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done = stored_batches(work) - 1
    assert 0 <= done < N_BATCHES - 1
    assert not any(f"batch {b}:" in out for b in range(done + 1, N_BATCHES))
    assert not (work / "artifacts/edited").exists()

    rerun = run_stage_subprocess(work, "apply_edits")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from the checkpoint: batches 0..{done} restored" in rerun.stdout
    computed = [b for b in range(N_BATCHES) if f"batch {b}:" in rerun.stdout]
    assert computed == list(range(done + 1, N_BATCHES)), "a finished batch was computed again"
    assert_same_result(reference, work)

    ledger = pl.read_parquet(work / "artifacts/edited/ledger.parquet")
    per_batch = ledger.group_by("batch").agg(pl.len()).sort("batch")
    assert per_batch["batch"].to_list() == list(range(N_BATCHES)) and set(per_batch["len"]) == {
        2
    }  # 2 layers, once each
    runs = json.loads((work / "reports/ledger_runs.json").read_text())
    assert [r["batch"] for r in runs] == list(range(N_BATCHES))
    sessions = [r["session"] for r in runs]
    assert len(set(sessions[: done + 1])) == 1 and sessions[0] != sessions[-1], (
        "restored batches keep their first session"
    )


def test_crash_inside_a_commit_redoes_only_the_unfinished_batch(
    reference: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """Killed after batch 1's delta and rows were written but before its state.json: batch 1 is not done."""
    work = base_project(tmp_path_factory, "commit_crash")
    real = ece.audit.checkpoint.write_json

    def crash(path, obj):
        if Path(path).name == "state.json" and len(obj["prefix_keys"]) == 2:
            raise KeyboardInterrupt("simulated kill")
        real(path, obj)

    monkeypatch.setattr(ece.audit.checkpoint, "write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        run_stage_inprocess(work, "apply_edits")
    (state,) = state_files(work)
    assert (state.parent / "delta-batch-0001.safetensors").exists() and not (work / "artifacts/edited").exists()
    monkeypatch.setattr(ece.audit.checkpoint, "write_json", real)
    capsys.readouterr()
    run_stage_inprocess(work, "apply_edits")
    out = capsys.readouterr().out
    assert "batches 0..0 restored" in out and "batch 0:" not in out and "batch 1:" in out
    assert_same_result(reference, work)


def test_checkpoint_of_other_inputs_is_not_used(
    reference: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture
) -> None:
    """A stored state whose prefix keys are not this run's (other facts, z, selections) restores nothing."""
    work = base_project(tmp_path_factory, "stale")
    (stored,) = state_files(reference)
    folder = work / CKPT / stored.parent.name
    shutil.copytree(stored.parent, folder)
    (folder / "state.json").write_text(json.dumps({"prefix_keys": ["made-from-other-inputs"] * N_BATCHES}))
    run_stage_inprocess(work, "apply_edits")
    out = capsys.readouterr().out
    assert "none of the 3 stored batches" in out and "resuming" not in out
    assert_same_result(reference, work)


def project_with(tmp_path_factory: pytest.TempPathFactory, name: str, n_facts: int) -> Path:
    """The scratch project with its first `n_facts` facts, prepared through precompute_z."""
    work = base_project(tmp_path_factory, name)
    write_facts(work, n_facts)
    for stage in UPSTREAM:
        run_stage_inprocess(work, stage)
    return work


def test_appended_facts_cost_only_the_new_batches(
    reference: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture
) -> None:
    work = project_with(tmp_path_factory, "append", 4)  # batches 0 and 1
    run_stage_inprocess(work, "apply_edits")
    write_facts(work, len(FACTS))  # batch 2 appended
    for stage in UPSTREAM:
        run_stage_inprocess(work, stage)
    capsys.readouterr()
    run_stage_inprocess(work, "apply_edits")
    out = capsys.readouterr().out
    assert "batches 0..1 restored, 1 to go" in out and "batch 0:" not in out and "batch 2:" in out
    assert_same_result(reference, work)  # equals the run that had all facts from the start, bit for bit


def test_a_changed_early_fact_redoes_every_batch_after_it(
    reference: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture
) -> None:
    work = base_project(tmp_path_factory, "changed")
    shutil.copytree(reference / CKPT, work / CKPT)  # the stored state of the unchanged facts
    facts = work / "data/facts.jsonl"
    rows = [json.loads(line) for line in facts.read_text().splitlines()]
    rows[1]["target_new"] = "Spanish"  # batch 0
    facts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for stage in UPSTREAM:
        run_stage_inprocess(work, stage)
    capsys.readouterr()
    run_stage_inprocess(work, "apply_edits")
    out = capsys.readouterr().out
    assert "resuming" not in out and all(f"batch {b}:" in out for b in range(N_BATCHES))
    assert stored_batches(work) == N_BATCHES


@pytest.fixture(scope="module")
def ultraedit_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = method_project(tmp_path_factory, "ultraedit_reference", ULTRAEDIT)
    run_stage_inprocess(work, "apply_edits")
    return work


def test_ultraedit_resumed_after_batch_1_equals_an_uninterrupted_run(
    ultraedit_reference: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """Killed while committing batch 2: batches 0 and 1 are restored with the feature moments they
    carried, and batch 2, computed from those moments, ends bit for bit as in the uninterrupted run."""
    work = method_project(tmp_path_factory, "ultraedit_resumed", ULTRAEDIT)
    real = ece.audit.checkpoint.write_json

    def crash(path, obj):
        if Path(path).name == "state.json" and len(obj["prefix_keys"]) == 3:
            raise KeyboardInterrupt("simulated kill")
        real(path, obj)

    monkeypatch.setattr(ece.audit.checkpoint, "write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        run_stage_inprocess(work, "apply_edits")
    assert stored_batches(work) == 2 and not (work / "artifacts/edited").exists()
    monkeypatch.setattr(ece.audit.checkpoint, "write_json", real)
    capsys.readouterr()
    run_stage_inprocess(work, "apply_edits")
    out = capsys.readouterr().out
    assert "batches 0..1 restored, 1 to go" in out and "batch 1:" not in out and "batch 2:" in out
    assert_same_result(ultraedit_reference, work)
