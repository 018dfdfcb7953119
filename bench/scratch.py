"""The stage scripts run in-process in a scratch folder: for measurements that time phases or read a
stage's outputs directly (speed, z design, covariance sampling, GPU checks). Rows of a results table
(methods compared, parameter sweeps, the scale benchmark) are DVC experiments instead: bench/experiments.py.

`run_stages` imports each stage's `main` and calls it with params.yaml plus overrides inside the scratch
folder, with the project's data paths made absolute, so the numbers are those of the pipeline itself.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import torch
from safetensors.torch import load

from ece.config import Params, load_params
from ece.data.facts import Fact
from ece.data.loaders import load_edits
from ece.eval.metrics import fact_metrics, summarise
from ece.model.loading import load_model
from ece.model.workbench import Workbench

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the stage scripts are imported as modules of `stages`
STAGES = ["prepare", "covariance", "attribute", "cluster", "precompute_z", "train_editor", "apply_edits"]
# params that name a file of the project: read from the scratch folder by absolute path
PATHS = (
    ("data", "edit_dataset"),
    ("data", "generation_prompts"),
    ("covariance", "corpus"),
    ("train_editor", "data"),
    ("evaluate", "general_dir"),
    ("evaluate", "ppl_corpus"),
    ("evaluate", "reference_corpus"),
)


def stored_z(read: Callable[[str], bytes]) -> tuple[pl.DataFrame, torch.Tensor]:
    """A finished run's z index (artifacts/z/index.parquet) and every fact's final δ (n, d) in index
    order, as stored. `read` gives a run-relative path's bytes: a scratch folder's file, or a DVC
    experiment's output (bench/experiments.py: read_output)."""
    index = pl.read_parquet(io.BytesIO(read("artifacts/z/index.parquet")))
    files = {name: load(read(f"artifacts/z/cache/{name}"))["delta"] for name in index["file"].unique()}
    return index, torch.stack([files[f][r] for f, r in zip(index["file"], index["row"])])


def stored_facts(read: Callable[[str], bytes], ids: list[str]) -> list[Fact]:
    """The run's edit facts (artifacts/prepared/edits.parquet) with these ids, in this order."""
    edits = pl.read_parquet(io.BytesIO(read("artifacts/prepared/edits.parquet")))
    by_id = {r["id"]: r for r in edits.iter_rows(named=True)}
    return [Fact.from_row(by_id[i]) for i in ids]


def cpu_name() -> str:
    """The CPU's model name as the kernel reports it (platform.processor() is empty on Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown"


def first_facts(n_facts: int) -> tuple[Params, Workbench, list[Fact]]:
    """params.yaml with data.n_facts = `n_facts`, its model opened and those first facts of the edit
    dataset: how a bench that times z, keys or a pass on the real model starts."""
    p = load_params(ROOT / "params.yaml", [f"data.n_facts={n_facts}"])
    return p, Workbench.open(p), [Fact.from_row(r) for r in load_edits(p.data).iter_rows(named=True)]


def median_seconds(runs: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    """Median seconds of each callable, one warm-up each, then `reps` rounds alternating between them."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


@contextlib.contextmanager
def inside(folder: Path) -> Iterator[None]:
    old = Path.cwd()
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def run_stages(overrides: list[str], work: Path, stages: list[str] = STAGES) -> tuple[Params, dict[str, float]]:
    """Run the stage scripts' `main` in order inside `work` (outputs land there); seconds per stage."""
    p = load_params(ROOT / "params.yaml", overrides)
    for section, key in PATHS:
        cfg = getattr(p, section)
        if getattr(cfg, key) is not None:
            setattr(cfg, key, str(ROOT / getattr(cfg, key)))
    seconds = {}
    with inside(work):
        for stage in stages:
            start = time.perf_counter()
            importlib.import_module(f"stages.{stage}").main(p)
            seconds[stage] = round(time.perf_counter() - start, 1)
    return p, seconds


def run_config(overrides: list[str], work: Path) -> dict[str, Any]:
    """prepare → apply_edits in `work`, then the rewrite metrics of the unedited and the edited model
    (no general ability, fluency or perplexity: a quick look at one configuration)."""
    p, seconds = run_stages(overrides, work)
    with inside(work):
        facts = pl.read_parquet("artifacts/prepared/edits.parquet")
        post = summarise(fact_metrics(*load_model("artifacts/edited/model"), facts))
        pre = summarise(fact_metrics(*load_model(p.model.name), facts))
        z = pl.read_parquet("artifacts/z/index.parquet")
    return {"overrides": overrides, "pre": pre, "post": post, "z_nll": z["nll"].mean(), "seconds": seconds}
