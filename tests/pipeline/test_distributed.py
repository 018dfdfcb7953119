"""Data-parallel covariance and evaluate (ece.model.distributed) on CPU with the gloo backend.

Two processes get torchrun's environment (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT) and run the stages'
`main`, each in its own copy of the projects: the copies of rank 1 show that only rank 0 writes (every
file of them, the evaluate pre cache included, stays as it was). The results are compared with the stages
run by one process without WORLD_SIZE. Both stages run in one pair of processes (starting a process that
imports torch and transformers is most of the cost); one more test runs the real
`torchrun ... -m stages.covariance` command.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import torch
import torch.multiprocessing as mp
from eval_project import STAGE_OVERRIDES, build_eval_project, load_evaluate_stage
from safetensors.torch import load_file
from scratch_project import ROOT, base_project, inside, run_stage_inprocess, set_params, stage_env

from ece.config import load_params
from ece.errors import EceError

C0 = "artifacts/covariance/c0.safetensors"
EVAL_OUTPUTS = ("reports/metrics.json", "reports/edit_metrics.json", "reports/curve.json")
# gen_batch_size 1: each rank samples some of the generation prompts (the texts must still be one process's)
EVAL_OVERRIDES = [
    *STAGE_OVERRIDES,
    "evaluate.curve_every=2",
    "evaluate.reference_corpus=refs.jsonl",
    "evaluate.gen_batch_size=1",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, folders: list[Path], run: Callable[[], None]) -> None:
    os.environ.update(
        WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    with inside(folders[rank]):
        run()


def run_ranks(folders: list[Path], run: Callable[[], None]) -> None:
    """`run()` in len(folders) processes of one gloo group, rank r inside folders[r]."""
    mp.spawn(_worker, args=(len(folders), free_port(), folders, run), nprocs=len(folders))


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def copies(source: Path, tmp: Path, names: list[str]) -> list[Path]:
    for name in names:
        shutil.copytree(source, tmp / name, symlinks=True)
    return [tmp / name for name in names]


# ---------------------------------------------------------------------------------------------
# one pair of processes runs covariance and evaluate


def run_both_stages() -> None:
    """Covariance in ./cov; evaluate (curve on) twice in ./eval: the second run reuses the pre cache of
    rank 0, which decides for all (rank 1's copy has none)."""
    run_stage_inprocess(Path("cov"), "covariance")
    with inside(Path("eval")):
        for _ in range(2):
            load_evaluate_stage().main(load_params(ROOT / "params.yaml", EVAL_OVERRIDES))


@pytest.fixture(scope="module")
def cov_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The scratch tiny-llama project (covariance already run by one process) with its outputs moved
    aside: 2000 tokens in 63 chunks of 32, so two ranks run 32 and 31 chunks."""
    work = base_project(tmp_path_factory, "distributed_cov")
    (work / "single").mkdir()
    for out in (C0, "reports/covariance.json"):
        (work / out).rename(work / "single" / Path(out).name)
    return work


@pytest.fixture(scope="module")
def eval_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny evaluate project with a small reference corpus (consistency) of its own."""
    work = tmp_path_factory.mktemp("distributed_eval")
    build_eval_project(work)
    lines = (ROOT / "data/corpus/wikipedia_vital_summaries_en.jsonl").read_text().splitlines()[:300]
    (work / "refs.jsonl").write_text("\n".join(lines) + "\n")
    return work


@dataclass
class Runs:
    one: Path  # evaluate by one process
    r0: Path  # cov/ and eval/ of rank 0
    r1: Path
    r1_before: dict[str, bytes]  # rank 1's files before the run


@pytest.fixture(scope="module")
def runs(cov_project: Path, eval_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    tmp = tmp_path_factory.mktemp("distributed_runs")
    with inside(copies(eval_project, tmp, ["one"])[0]):
        load_evaluate_stage().main(load_params(ROOT / "params.yaml", EVAL_OVERRIDES))
    ranks = [tmp / "r0", tmp / "r1"]
    for folder in ranks:
        shutil.copytree(cov_project, folder / "cov")
        shutil.copytree(eval_project, folder / "eval", symlinks=True)
    before = files(ranks[1])
    run_ranks(ranks, run_both_stages)
    return Runs(tmp / "one", ranks[0], ranks[1], before)


def test_only_rank_0_writes(runs: Runs) -> None:
    assert files(runs.r1) == runs.r1_before
    assert (runs.r0 / "cov" / C0).exists() and (runs.r0 / "eval/reports/metrics.json").exists()
    assert len(list((runs.r0 / "eval/.cache/evaluate_pre").iterdir())) == 1


def assert_c0_close(single: Path, parallel: Path) -> None:
    expected, got = load_file(single / "c0.safetensors"), load_file(parallel / C0)
    assert expected.keys() == got.keys() == {"layer.1", "layer.2"}
    for name, c0 in expected.items():
        assert got[name].dtype == torch.float64
        assert float((got[name] - c0).abs().max() / c0.abs().max()) < 1e-6
    # each chunk counted once: two ranks each running every chunk would give the same C0 but twice the tokens
    meta = json.loads((parallel / "reports/covariance.json").read_text())
    assert meta["n_tokens"] == json.loads((single / "covariance.json").read_text())["n_tokens"] == 2000


def test_covariance_from_two_ranks_equals_one(runs: Runs, cov_project: Path) -> None:
    assert_c0_close(cov_project / "single", runs.r0 / "cov")


def test_evaluate_from_two_ranks_equals_one(runs: Runs) -> None:
    one, r0 = runs.one, runs.r0 / "eval"
    for out in EVAL_OUTPUTS:
        single, both = json.loads((one / out).read_text()), json.loads((r0 / out).read_text())
        if out.endswith("/metrics.json"):  # the seconds of a run are not a result
            single.pop("seconds"), both.pop("seconds")
        assert both == single
    per_fact = pl.read_parquet(r0 / "reports/per_fact.parquet")
    assert per_fact.equals(pl.read_parquet(one / "reports/per_fact.parquet"))
    assert per_fact["fluency"].null_count() == 0  # the sampled generations reached rank 0's table


def test_torchrun_runs_the_covariance_stage_as_a_module(cov_project: Path, tmp_path: Path) -> None:
    """The command the README gives for a cluster, as dvc.yaml's cmd would run it."""
    (work,) = copies(cov_project, tmp_path, ["work"])
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "stages.covariance"]
    result = subprocess.run(cmd, cwd=work, env=stage_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_c0_close(cov_project / "single", work)


# ---------------------------------------------------------------------------------------------
# a world larger than the work


def test_more_ranks_than_corpus_chunks_stops_before_anything_runs(
    cov_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (work,) = copies(cov_project, tmp_path, ["work"])
    set_params(work, {"covariance.n_tokens": 64})  # 2 chunks of 32 tokens
    before = files(work)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(EceError, match=r"3 processes \(WORLD_SIZE\) for 2 corpus chunks of 32 tokens"):
        run_stage_inprocess(work, "covariance")
    assert files(work) == before


def test_more_ranks_than_facts_stops_before_anything_runs(
    eval_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (work,) = copies(eval_project, tmp_path, ["work"])
    before = files(work)
    monkeypatch.setenv("WORLD_SIZE", "5")
    with inside(work), pytest.raises(EceError, match=r"5 processes \(WORLD_SIZE\) for 4 facts"):
        load_evaluate_stage().main(load_params(ROOT / "params.yaml", EVAL_OVERRIDES))
    assert files(work) == before
