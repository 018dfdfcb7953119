"""The DVC pipeline itself, on a tiny random model in a scratch repository: a full `dvc repro` (evaluate
included), the per-batch z cache (appended facts leave the earlier batches' z files and clusters as
they were), that a change of a param or of a library module reruns exactly the stages that depend on
it, and that recomputing a stage from the same inputs gives the same hashes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from polars.testing import assert_frame_equal
from scratch_project import DVC, dvc_repo, run_dvc, set_params, write_facts

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dvc_repo(tmp_path_factory.mktemp("repo"), n_facts=4)


def stale_stages(work: Path) -> set[str]:
    """The stages whose own deps or params changed: what `dvc repro --dry` lists. (A stage after them
    reruns only if their outputs then change.)"""
    out = run_dvc([DVC, "repro", "--dry"], work)
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"Running stage '([\w-]+)'", out.stdout))


def locked_outs(work: Path, stage: str) -> dict[str, str]:
    """path → md5 of the stage's DVC-cached outputs (not the `cache: false` ones), as dvc.lock records them."""
    declared = yaml.safe_load((work / "dvc.yaml").read_text())["stages"][stage]
    uncached = {
        next(iter(o))
        for kind in ("outs", "metrics", "plots")
        for o in declared.get(kind, [])
        if isinstance(o, dict) and next(iter(o.values())).get("cache") is False
    }
    lock = yaml.safe_load((work / "dvc.lock").read_text())["stages"][stage]
    return {o["path"]: o["md5"] for o in lock["outs"] if o["path"] not in uncached}


def test_repro_builds_every_artifact(repo: Path) -> None:
    assert (repo / "artifacts/edited/model/model.safetensors").exists()
    assert (repo / "artifacts/covariance/c0.safetensors").exists()
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert metrics["n_facts"] == 4 and 0 <= metrics["post"]["efficacy"] <= 1
    for timings in ("attribution_timings", "cluster_timings", "ledger_runs"):
        assert (repo / f"reports/{timings}.json").exists()
    assert stale_stages(repo) == set()


def recompute(work: Path, stage: str) -> tuple[dict[str, str], dict[str, str]]:
    """The stage's cached outputs' md5s before and after `dvc repro -f -s stage` (same inputs)."""
    before = locked_outs(work, stage)
    result = run_dvc([DVC, "repro", "-f", "-s", stage], work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"Running stage '{stage}'" in result.stdout
    return before, locked_outs(work, stage)


@pytest.mark.parametrize("stage", ["attribute", "cluster", "apply_edits"])
def test_identical_recompute_keeps_every_hash(repo: Path, stage: str) -> None:
    """Timings and other run facts live outside the cached outputs, so a forced rerun from the same
    inputs records the same md5s, and nothing downstream becomes stale."""
    before, after = recompute(repo, stage)
    assert after == before
    assert stale_stages(repo) == set()


@pytest.mark.parametrize(
    ("module", "importers"),
    [
        ("ece/editing/clustering.py", {"cluster"}),
        ("ece/eval/generation.py", {"evaluate"}),
        ("ece/editing/covariance.py", {"covariance", "apply_edits", "train_editor", "evaluate"}),
    ],
)
def test_library_change_makes_exactly_its_importers_stale(repo: Path, module: str, importers: set[str]) -> None:
    path = repo / module
    original = path.read_text()
    path.write_text(original + "\n# changed\n")
    try:
        assert stale_stages(repo) == importers
    finally:
        path.write_text(original)
    assert stale_stages(repo) == set()


def test_library_change_that_keeps_the_results_stops_at_its_stage(repo: Path) -> None:
    """cluster reruns after its module changed; its output has the same bytes, so nothing after it runs
    (and prepare, covariance, attribute do not import the module)."""
    path = repo / "ece/editing/clustering.py"
    original = path.read_text()
    path.write_text(original + "\n# a comment\n")
    try:
        result = run_dvc([DVC, "repro"], repo)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert set(re.findall(r"Running stage '([\w-]+)'", result.stdout)) == {"cluster"}
    finally:
        path.write_text(original)
    assert run_dvc([DVC, "repro"], repo).returncode == 0
    assert stale_stages(repo) == set()


def test_edit_param_change_reruns_attribution_onwards_but_not_covariance(repo: Path) -> None:
    set_params(repo, {"ece.neuron_threshold": 0.7})
    assert {"attribute", "apply_edits"} <= stale_stages(repo)
    result = run_dvc([DVC, "repro"], repo)
    assert result.returncode == 0, result.stderr[-3000:]
    ran = set(re.findall(r"Running stage '([\w-]+)'", result.stdout))
    assert {"attribute", "cluster", "apply_edits", "evaluate"} <= ran  # cluster: its input table changed
    assert not {"prepare", "covariance"} & ran
    assert stale_stages(repo) == set()


def z_files(work: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in (work / "artifacts/z/cache").glob("*.safetensors")}


def test_appending_facts_computes_z_only_for_new_batches(repo: Path) -> None:
    """4 facts → 6 (batch_size 2): the two earlier batches keep their clusters and their z files byte
    for byte, and exactly one new z file appears, holding the new batch."""
    old_files = z_files(repo)
    old_clusters = pl.read_parquet(repo / "artifacts/clusters/clusters.parquet")
    assert len(old_files) == 2 and set(old_clusters["batch"]) == {0, 1}
    write_facts(repo, 6)
    result = run_dvc([DVC, "repro", "precompute_z"], repo)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 batches computed, 2 reused" in result.stdout
    new_files = z_files(repo)
    assert {name: new_files.get(name) for name in old_files} == old_files
    (added,) = new_files.keys() - old_files.keys()
    clusters = pl.read_parquet(repo / "artifacts/clusters/clusters.parquet")
    assert_frame_equal(clusters.filter(pl.col("batch") < 2), old_clusters)
    index = pl.read_parquet(repo / "artifacts/z/index.parquet")
    assert index.filter(pl.col("file") == added)["id"].to_list() == ["f4", "f5"]
    assert set(index.filter(pl.col("batch") < 2)["file"]) == old_files.keys()


def test_identical_recompute_keeps_the_covariance_hash(repo: Path) -> None:
    """Last in this module: were it to fail, the rerun would leave everything downstream of covariance stale."""
    before, after = recompute(repo, "covariance")
    assert after == before


def test_queued_experiment_runs_from_a_clean_commit(repo: Path, tmp_path: Path) -> None:
    """The documented way to queue work (bench/experiments.py, here through bench/sweep.py): `dvc exp run
    --queue` + `dvc queue start`, run by DVC in a temporary copy of the repository, finds this environment's
    interpreter and the copy's own ece/; the experiment's metrics, the overrides it ran with and its z
    (from the DVC cache) come back into a sweep report."""
    work = tmp_path / "queued"
    shutil.copytree(repo, work, ignore=shutil.ignore_patterns(".cache"))
    (work / "bench").mkdir()
    for script in ("experiments.py", "rows.py", "sweep.py"):
        shutil.copy(ROOT / "bench" / script, work / "bench" / script)
    identity = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    env = {**os.environ, **identity, "DVC_NO_ANALYTICS": "1"}
    env.pop("PYTHONPATH", None)  # the queued stages must find ece/ in their own copy, not through this test
    env.pop("ECE_SCRATCH", None)

    def call(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=work, env=env, capture_output=True, text=True)

    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "base"]):
        assert call(*cmd).returncode == 0
    experiments, sweep = str(work / "bench/experiments.py"), str(work / "bench/sweep.py")
    typo = call(sys.executable, sweep, "queue", "--name", "t", "--grid", "method=memit edit.layerz=[1]")
    assert typo.returncode != 0 and "layerz" in typo.stderr + typo.stdout
    assert "sweep-t-" not in call(DVC, "queue", "status").stdout, "a bad grid queues nothing"
    for args in (
        [sweep, "queue", "--name", "t", "--n-facts", "3", "--grid", "method=memit"],
        [experiments, "start"],
        [experiments, "wait"],
    ):
        done = call(sys.executable, *args)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = json.loads(call(sys.executable, experiments, "results", "sweep-t-").stdout)
    assert len(found) == 1
    (result,) = found.values()
    assert sorted(result["overrides"]) == ["data.n_facts=3", "method=memit"]  # params.yaml against its commit
    metrics = result["metrics"]
    assert metrics["method"] == "memit" and metrics["n_facts"] == 3 and 0 <= metrics["post"]["efficacy"] <= 1
    assert (work / ".cache").is_dir(), "queued runs share the repository's .cache as their scratch (ECE_SCRATCH)"

    reported = call(sys.executable, sweep, "report", "--name", "t")
    assert reported.returncode == 0, reported.stderr[-3000:]
    (row,) = json.loads((work / "reports/sweep_t.json").read_text())
    assert row["post"] == metrics["post"] and row["overrides"] == result["overrides"]
    assert row["z_nll"] is not None and row["z_nll"] >= 0, "z's index read back from the DVC cache"
    table = (work / "reports/sweep_t.md").read_text()
    assert f"**{metrics['post']['efficacy']:.3f}**" in table and "method=memit" in table
