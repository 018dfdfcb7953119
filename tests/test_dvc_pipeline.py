"""The DVC pipeline itself, on a tiny random model in a scratch repository: a full `dvc repro`, the
per-batch z cache, and that a change reruns exactly the stages that depend on it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scratch_project import write_data, write_facts, write_params

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # dvc runs the stages as `python stages/...`: this interpreter's venv must come first on PATH
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(ROOT), "PATH": path}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("repo")
    for name in ("ece", "stages"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    write_data(work, n_facts=4)
    write_params(work)
    for cmd in (["git", "init", "-q"], [DVC, "init", "-q"]):
        assert run(cmd, work).returncode == 0
    result = run([DVC, "repro", "apply_edits"], work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work


def stale_stages(work: Path) -> set[str]:
    """The stages `dvc repro` would run now (downstream ones included, unlike `dvc status`)."""
    out = run([DVC, "repro", "--dry", "apply_edits"], work)
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"Running stage '([\w-]+)'", out.stdout))


def set_param(work: Path, section: str, key: str, value: object) -> None:
    params = yaml.safe_load((work / "params.yaml").read_text())
    params[section][key] = value
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_repro_builds_every_artifact(repo: Path) -> None:
    assert (repo / "artifacts/edited/model/model.safetensors").exists()
    assert (repo / "artifacts/covariance/c0.safetensors").exists()
    assert stale_stages(repo) == set()


def test_edit_param_change_reruns_attribution_onwards_but_not_covariance(repo: Path) -> None:
    set_param(repo, "ece", "neuron_threshold", 0.7)
    assert {"attribute", "apply_edits"} <= stale_stages(repo)
    result = run([DVC, "repro", "apply_edits"], repo)
    assert result.returncode == 0, result.stderr[-3000:]
    ran = set(re.findall(r"Running stage '([\w-]+)'", result.stdout))
    assert {"attribute", "cluster", "apply_edits"} <= ran  # cluster: its input table changed
    assert not {"prepare", "covariance"} & ran
    assert stale_stages(repo) == set()


def test_appending_facts_computes_z_only_for_new_batches(repo: Path) -> None:
    write_facts(repo, 6)
    result = run([DVC, "repro", "precompute_z"], repo)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 batches computed, 2 reused" in result.stdout
