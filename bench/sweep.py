"""Sweep params over the real pipeline and tabulate the rewrite metrics, pre vs post.

Each configuration runs the stage functions themselves (prepare → apply_edits) in a scratch folder,
so the numbers are those of the pipeline, not of a re-implementation. Example:

    python bench/sweep.py --name layers --n-facts 40 \
        --grid "edit.layers=[2,3,4,5,6]" --grid "edit.layers=[4,5,6,7,8]"

Writes reports/sweep_<name>.md and .json (appending rows; rerun a name to extend it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from ece.config import Params, load_params
from ece.eval.metrics import fact_metrics, summarise
from ece.model.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the stage scripts are imported as modules of `stages`
STAGES = ["prepare", "covariance", "attribute", "cluster", "precompute_z", "train_editor", "apply_edits"]


def cpu_name() -> str:
    """The CPU's model name as the kernel reports it (platform.processor() is empty on Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown"


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
def inside(folder: Path):
    old = Path.cwd()
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


PATHS = (
    ("data", "edit_dataset"),
    ("data", "generation_prompts"),
    ("covariance", "corpus"),
    ("train_editor", "data"),
    ("evaluate", "general_dir"),
    ("evaluate", "ppl_corpus"),
    ("evaluate", "reference_corpus"),
)


def run_stages(overrides: list[str], work: Path, stages: list[str] = STAGES) -> tuple[Params, dict[str, float]]:
    """Run the stage scripts' `main` in order inside `work` (outputs land there); seconds per stage."""
    p = load_params(ROOT / "params.yaml", overrides)
    for section, key in PATHS:  # the project's data, read from the scratch folder
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


def run_config(overrides: list[str], work: Path) -> dict:
    p, seconds = run_stages(overrides, work)
    with inside(work):
        facts = pl.read_parquet("artifacts/prepared/edits.parquet")
        post = summarise(fact_metrics(*load_model("artifacts/edited/model"), facts))
        pre = summarise(fact_metrics(*load_model(p.model.name), facts))
        z = pl.read_parquet("artifacts/z/index.parquet")
    return {"overrides": overrides, "pre": pre, "post": post, "z_nll": z["nll"].mean(), "seconds": seconds}


def table(rows: list[dict]) -> str:
    head = "| config | efficacy | generalization | specificity | score | mean z NLL | z s | update s |\n|---|---|---|---|---|---|---|---|\n"
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines = []
    for r in rows:
        pre, post = r["pre"], r["post"]
        cells = [f"{fmt(pre[m])} → **{fmt(post[m])}**" for m in ("efficacy", "generalization", "specificity", "score")]
        lines.append(
            f"| `{' '.join(r['overrides'])}` | "
            + " | ".join(cells)
            + f" | {r['z_nll']:.3f} | {r['seconds']['precompute_z']} | {r['seconds']['apply_edits']} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="sweep name: reports/sweep_<name>.md")
    ap.add_argument("--grid", action="append", required=True, help="space-separated a.b=value overrides for one run")
    ap.add_argument("--common", default="", help="overrides applied to every run")
    ap.add_argument("--n-facts", type=int, default=40)
    args = ap.parse_args()
    out = ROOT / "reports" / f"sweep_{args.name}.json"
    rows = json.loads(out.read_text()) if out.exists() else []
    common = [f"data.n_facts={args.n_facts}", *args.common.split()]
    for i, grid in enumerate(args.grid):
        overrides = grid.split()
        print(f"== {args.name} {i + 1}/{len(args.grid)}: {overrides}", flush=True)
        # one scratch folder per sweep: the z cache is reused by configs that differ only after z
        row = run_config(common + overrides, ROOT / ".cache" / "sweeps" / args.name)
        row["overrides"] = overrides
        rows.append(row)
        out.write_text(json.dumps(rows, indent=2))
        md = (
            f"# Sweep `{args.name}`\n\nCounterFact, first {args.n_facts} facts, common overrides "
            f"`{' '.join(common)}`; pre → **post**, evaluated after the last batch. Generated by bench/sweep.py "
            f"on {time.strftime('%Y-%m-%d')}.\n\n" + table(rows)
        )
        (ROOT / "reports" / f"sweep_{args.name}.md").write_text(md)
        print(table([row]), flush=True)


if __name__ == "__main__":
    main()
