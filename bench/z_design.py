"""How z should be optimised: step size, clamp, stop rule, and what the shared phase starts members from.

Not a test: a measurement. Every configuration runs the real stages (prepare → apply_edits, the
functions of bench/scratch.py) on the same CounterFact facts in its own scratch folder, with one
covariance computed once and copied in, and is then scored after the last batch. Per configuration:
z row-steps (one row = one fact in one forward/backward of the z descent), z seconds, mean target NLL
of z, mean ‖δ‖/‖h‖, and efficacy / generalization / specificity / score of the edited model.

    python bench/z_design.py --grid step      # lr × clamp × stop rule, MEMIT z (reports/z_step.md)
    python bench/z_design.py --grid design    # shared-phase designs at the chosen step rule (reports/z_design.md)
    python bench/z_design.py --grid design --only ece-object memit
    python bench/z_design.py --grid loop --batch-size 25 100   # ECE's z in one loop vs two phases (reports/z_loop.md)
    python bench/z_design.py --grid dtype --batch-size 100     # z's descent in float32 vs a bfloat16 copy (reports/z_dtype.md)
    python bench/z_design.py --grid earlier --n-facts 400 --batch-size 100   # ECE anchors from earlier batches' δ (reports/z_earlier.md)

Rows already in reports/z_<grid>.json are kept and skipped (rerun a row with --redo), so a killed run
resumes; --tag T runs them again as new rows named "... (T)". Every row runs in a process of its own (the loop grid's two-phase rows run the zvec of
TWO_PHASE_REV through bench/code_at.py). Seconds are only comparable between rows measured on an
otherwise idle machine, or within one run whose rows alternate; the load average before each row is
in the report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch
from safetensors import safe_open
from scratch import ROOT, inside, run_stages

from ece.config import load_params
from ece.eval.general_ability import perplexity, read_tokens
from ece.eval.metrics import fact_metrics, summarise
from ece.model.loading import load_model

WORK = ROOT / ".cache" / "z_bench"
STAGES = ["prepare", "attribute", "cluster", "precompute_z", "apply_edits"]
MEMIT_Z = ["method=memit", "z.shared_steps=0", "z.instance_steps=25"]
# The last commit whose zvec ran ECE's shared phase on every anchor and then the instance phase.
TWO_PHASE_REV = "9e72903"
THREADS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # shown in the report's command


@dataclass(frozen=True)
class Config:
    overrides: list[str]
    zvec_rev: str | None = None  # run ece/editing/zvec.py as of this git revision (None: this tree's)


def _step_grid() -> dict[str, list[str]]:
    grid = {}
    for lr_name, lr in (
        ("0.5", ["z.lr=0.5"]),
        ("1", ["z.lr=1.0"]),
        ("2", ["z.lr=2.0"]),
        ("3", ["z.lr=3.0"]),
        ("4", ["z.lr=4.0"]),
        ("norm0.25", ["z.lr=0.25", "z.lr_scale=norm"]),
    ):
        for clamp in ("0.75", "4.0"):
            for stop_name, stop in (
                ("loss", ["z.stop_loss=0.05", "z.stop_nll=0"]),
                ("nll", ["z.stop_loss=0", "z.stop_nll=0.1"]),
            ):
                grid[f"lr {lr_name}, clamp {clamp}, stop {stop_name}"] = [
                    *MEMIT_Z,
                    *lr,
                    f"z.clamp_norm_factor={clamp}",
                    *stop,
                ]
    return grid


# The shared-phase designs, all at the step rule chosen from the step grid (`--step`); the number of
# steps is the same 25 everywhere, split between the phases as named.
DESIGNS: dict[str, list[str]] = {
    "memit": MEMIT_Z,
    "ece, paper split 20+5, neuron clusters": [
        "method=ece",
        "z.shared_steps=20",
        "z.instance_steps=5",
        "z.warm_start=cluster",
    ],
    "ece, 5+20, neuron clusters": ["method=ece", "z.shared_steps=5", "z.instance_steps=20", "z.warm_start=cluster"],
    "ece, 25 on the anchor, same object": [
        "method=ece",
        "z.shared_steps=25",
        "z.instance_steps=25",
        "z.warm_start=object",
    ],
    "ece, 25 on the anchor, same object, fresh Adam": [
        "method=ece",
        "z.shared_steps=25",
        "z.instance_steps=25",
        "z.warm_start=object",
        "z.carry_adam=false",
    ],
    "ece, 25 on the anchor, neuron cluster x object": [
        "method=ece",
        "z.shared_steps=25",
        "z.instance_steps=25",
        "z.warm_start=cluster_object",
    ],
    "ece, no shared phase": ["method=ece", "z.shared_steps=0", "z.instance_steps=25", "z.warm_start=none"],
}


def _loop_grid(batch_sizes: list[int]) -> dict[str, Config]:
    """MEMIT, ECE's two phases (TWO_PHASE_REV's zvec) and ECE's one loop, at params.yaml's z, per batch size."""
    rows = {
        "memit (same step rule)": Config(MEMIT_Z),
        f"ece, two phases ({TWO_PHASE_REV})": Config(["method=ece"], TWO_PHASE_REV),
        "ece, one loop": Config(["method=ece"]),
    }
    return _per_batch_size(rows, batch_sizes)


def _dtype_grid(batch_sizes: list[int]) -> dict[str, Config]:
    """ECE and MEMIT (same step rule) with z's descent in the float32 model and in a bfloat16 copy."""
    rows = {
        f"{name}, z {dtype}": Config([*overrides, f"z.dtype={dtype}"])
        for name, overrides in (("ece", ["method=ece"]), ("memit (same step rule)", MEMIT_Z))
        for dtype in ("float32", "bfloat16")
    }
    return _per_batch_size(rows, batch_sizes)


def _earlier_grid(batch_sizes: list[int]) -> dict[str, Config]:
    """ECE with and without z.warm_from_earlier (anchors start from the mean δ of earlier batches' facts
    with the same new object), with every warm start scaled down (z.warm_scale), and MEMIT with the same
    step rule."""
    rows = {
        "memit (same step rule)": Config(MEMIT_Z),
        "ece": Config(["method=ece", "z.warm_from_earlier=none"]),
        "ece, warm from earlier batches": Config(["method=ece", "z.warm_from_earlier=anchors"]),
        **{
            f"ece, warm from earlier batches, warm starts at {scale} x the borrowed δ": Config(
                ["method=ece", "z.warm_from_earlier=anchors", f"z.warm_scale={scale}"]
            )
            for scale in (0.75, 0.5)
        },
    }
    return _per_batch_size(rows, batch_sizes)


def _per_batch_size(rows: dict[str, Config], batch_sizes: list[int]) -> dict[str, Config]:
    """Every row at every batch size; the order alternates between batch sizes so that a drift in the
    machine's load does not favour one row."""
    grid = {}
    for k, batch in enumerate(batch_sizes):
        for name, row in list(rows.items())[:: (-1) ** k]:
            grid[f"batch {batch}: {name}"] = Config([*row.overrides, f"edit.batch_size={batch}"], row.zvec_rev)
    return grid


def covariance_folder(common: list[str]) -> Path:
    """One covariance for every configuration (it depends only on the model, layers and corpus)."""
    folder = WORK / "_covariance"
    if not (folder / "artifacts" / "covariance" / "c0.safetensors").exists():
        run_stages(common, folder, ["covariance"])
    return folder / "artifacts" / "covariance"


def z_stats(work: Path) -> dict[str, Any]:
    with inside(work):
        index = pl.read_parquet("artifacts/z/index.parquet")
        ratios = []
        for name in index["file"].unique().to_list():
            with safe_open(f"artifacts/z/cache/{name}", framework="pt") as f:
                ratios += (f.get_tensor("delta").norm(dim=1) / f.get_tensor("h").norm(dim=1)).tolist()
        seconds = json.loads(Path("reports/z_timings.json").read_text())
        update = json.loads(Path("reports/timings.json").read_text()) if Path("reports/timings.json").exists() else {}
    return {
        "row_steps": int(index["steps"].sum()),
        "z_nll": float(index["nll"].mean()),
        "z_seconds": round(sum(seconds.values()), 1),
        "delta_over_h": sum(ratios) / len(ratios),
        "steps_max": int(index["steps"].max()),
        "z_kl": float(index["kl"].mean()),
        "update_seconds": update.get("seconds_total", {}).get("update"),
    }


def scored(model_dir: str, facts: pl.DataFrame) -> dict[str, Any]:
    """Rewrite metrics of a model on `facts` and its perplexity as the evaluate stage measures it
    (params.yaml's evaluate.ppl_corpus, ppl_tokens and ppl_window)."""
    e = load_params(ROOT / "params.yaml").evaluate
    model, tok = load_model(model_dir)
    ids = read_tokens(tok, ROOT / e.ppl_corpus, e.ppl_tokens)
    return {**summarise(fact_metrics(model, tok, facts)), "perplexity": perplexity(model, tok, ids, e.ppl_window)}


def run_config(name: str, overrides: list[str], common: list[str]) -> dict[str, Any]:
    work = WORK / "".join(c if c.isalnum() else "-" for c in name)
    shutil.rmtree(work, ignore_errors=True)  # nothing cached: every z is computed
    shutil.copytree(covariance_folder(common), work / "artifacts" / "covariance")
    start = time.perf_counter()
    cpu = {}
    for stage in STAGES:
        before = time.process_time()
        run_stages(common + overrides, work, [stage])
        cpu[stage] = time.process_time() - before
    seconds = time.perf_counter() - start
    with inside(work):
        facts = pl.read_parquet("artifacts/prepared/edits.parquet")
        post = scored("artifacts/edited/model", facts)
    return {
        "name": name,
        "overrides": overrides,
        **z_stats(work),
        # CPU seconds of this process in the precompute_z stage (its model load included): with one
        # thread, far less sensitive than wall seconds to what else runs on the machine
        "z_cpu_seconds": round(cpu["precompute_z"], 1),
        "post": post,
        "pipeline_seconds": round(seconds, 1),
    }


def run_worker(name: str, config: Config, common: list[str]) -> dict[str, Any]:
    """run_config in a process of its own (with TWO_PHASE_REV's zvec where the row asks for it), with
    no shared scratch folder (ECE_SCRATCH): its z is computed, never reused."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        job = json.dumps({"name": name, "overrides": config.overrides, "common": common, "out": str(out)})
        code_at = [str(ROOT / "bench" / "code_at.py"), config.zvec_rev, "ece/editing/zvec.py", "--"]
        command = [
            sys.executable,
            *(code_at if config.zvec_rev else []),
            str(Path(__file__).resolve()),
            "--worker",
            job,
        ]
        env = {k: v for k, v in os.environ.items() if k != "ECE_SCRATCH"}
        # this tree's ece before any installed copy (scratch imports ece before it puts ROOT on sys.path)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        load = os.getloadavg()[0]
        subprocess.run(command, check=True, env=env)
        return {**json.loads(out.read_text()), "zvec_rev": config.zvec_rev, "load_before": load}


def render(grid: str, results: dict[str, Any]) -> str:
    pre = results["pre"]
    lines = [
        f"# z: {grid} grid",
        "",
        f"Generated by {', then '.join(f'`{c}`' for c in results['commands'])} on {results['date']} ({results['machine']}). "
        f"SmolLM2-135M, CounterFact, first {results['n_facts']} facts in batches of {results['batch_size']}, "
        f"layers and λ from params.yaml, common overrides `{' '.join(results['common'])}`; every fact scored "
        f"after the last batch. Unedited: efficacy {pre['efficacy']:.2f}, generalization "
        f"{pre['generalization']:.2f}, specificity {pre['specificity']:.2f}"
        + (f", perplexity {pre['perplexity']:.2f}" if "perplexity" in pre else "")
        + ". A row-step is one fact in one forward/backward of the z descent; z KL is the mean KL of z's final δ "
        "on the '{subject} is a' prompt (the term of z's loss that keeps the subject's other facts).",
        "",
        *([*NOTES[grid], ""] if grid in NOTES else []),
        "| config | z row-steps | max steps | z s | z CPU s | CPU ms / row-step | load before | z NLL | z KL | ‖δ‖/‖h‖ "
        "| efficacy | generalization | specificity | score | perplexity | zvec.py sha256 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results["rows"]:
        post = r["post"]
        load = f"{r['load_before']:.1f}" if "load_before" in r else "–"
        cpu, per_row = (
            (f"{r['z_cpu_seconds']:.1f}", f"{1000 * r['z_cpu_seconds'] / r['row_steps']:.0f}")
            if "z_cpu_seconds" in r
            else ("–", "–")
        )
        lines.append(
            f"| {r['name']} | {r['row_steps']} | {r['steps_max']} | {r['z_seconds']:.1f} | {cpu} | {per_row} | {load} | "
            f"{r['z_nll']:.3f} | {_num(r.get('z_kl'), 3)} | {r['delta_over_h']:.2f} | "
            + " | ".join(f"{post[m]:.3f}" for m in ("efficacy", "generalization", "specificity", "score"))
            + f" | {_num(post.get('perplexity'), 2)} | {r.get('zvec_sha256', '–')} |"
        )
    return "\n".join(lines) + "\n"


def _num(value: float | None, digits: int) -> str:
    """A table cell: the value to `digits` places, or – for a row measured before the column existed."""
    return "–" if value is None else f"{value:.{digits}f}"


NOTES = {
    "earlier": [
        "ECE's anchors from zero (within-batch warm starts only: members from their batch's anchor with the same "
        "new object) and with z.warm_from_earlier (an anchor whose new object an earlier batch edited starts from "
        "the mean final δ of those facts; every batch's z is computed on the original model, so they share one "
        "space); MEMIT with the same step rule. Row-steps and metrics do not depend on the machine's load; "
        "seconds do (the load average before each row is listed).",
    ],
    "dtype": [
        "z's descent in the float32 model (z.dtype float32) and in a bfloat16 copy of it (z.dtype bfloat16: δ "
        "from the copy, h, keys, the update and the edited weights in float32; ece/editing/zvec.py z_adapter). "
        "Rows ran one after the other in the order listed, each in a process of its own with z computed from "
        "nothing; z s is the sum of the batches' z wall seconds, z CPU s the CPU seconds of the row's process "
        "in the precompute_z stage (model load and problem set-up included). Wall seconds depend on the "
        "machine's load (the 1-minute load average before each row is listed): compare only within this table.",
        "",
        "Run of 2026-12-02: the first row ran while two other benchmark processes shared the two cores (load "
        "4.5), which inflates its seconds, CPU seconds included (the same configuration took 265–291 z CPU s "
        "at lower load, reports/z_loop.md); the MEMIT pair ran back to back at load 1.1: 315.6 vs 131.2 z CPU "
        "s, 2.4x. The zvec.py hash differs between the pairs because a warning (bfloat16 on a CPU without "
        "bfloat16 units) was added in between; the computation is the same.",
    ],
    "loop": [
        "ECE's z with the instance phase run after the whole shared phase (the zvec of "
        f"{TWO_PHASE_REV}, through bench/code_at.py) and in one loop, where a member joins as soon as its own "
        "anchor is through its shared steps; MEMIT with the same step rule. Both ECE rows compute the same "
        "descent per fact (tests/editing/test_zvec.py), so their row-steps and metrics should agree and only "
        "the seconds differ. Rows ran one after the other in the order listed, each in a process of its own "
        "with z computed from nothing; z s is the sum of the batches' z wall seconds, z CPU s the CPU "
        "seconds of the row's process in the precompute_z stage (model load and problem set-up included). "
        "Wall seconds depend on the machine's load (the 1-minute load average before each row is listed), "
        "CPU seconds much less (one thread, but caches and memory bandwidth are shared): compare either only "
        "within this table. Row-steps do not depend on load.",
    ],
}


def save(out: Path, grid: str, results: dict[str, Any]) -> None:
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(render(grid, results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", choices=["step", "design", "loop", "dtype", "earlier"])
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # one row, run by run_worker in its own process
    ap.add_argument("--only", nargs="*", default=None, help="run only configs whose name starts with one of these")
    ap.add_argument("--step", default="", help="design grid: space-separated step-rule overrides for every row")
    ap.add_argument("--redo", action="store_true", help="recompute rows already in the report")
    ap.add_argument("--tag", default="", help="run the rows again as new rows, their names followed by (TAG)")
    ap.add_argument("--set", action="append", default=[], help="extra a.b=value override for every row")
    ap.add_argument("--n-facts", type=int, default=100)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[25], help="loop grid: one set of rows per size")
    args = ap.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        row = run_config(job["name"], job["overrides"], job["common"])
        zvec_source = Path(sys.modules["ece.editing.zvec"].__file__).read_bytes()  # which z code the row ran
        row["zvec_sha256"] = hashlib.sha256(zvec_source).hexdigest()[:12]
        Path(job["out"]).write_text(json.dumps(row))
        return
    per_size = {"loop": _loop_grid, "dtype": _dtype_grid, "earlier": _earlier_grid}
    if args.grid is None or (args.grid not in per_size and len(args.batch_size) != 1):
        ap.error("--grid is required; --batch-size takes several sizes only with --grid loop, dtype or earlier")
    if args.grid in per_size:
        grid = per_size[args.grid](args.batch_size)
    else:
        rows = _step_grid() if args.grid == "step" else {k: [*v, *args.step.split()] for k, v in DESIGNS.items()}
        grid = {k: Config(v) for k, v in rows.items()}
    common = [f"data.n_facts={args.n_facts}", *args.set] + (
        [] if args.grid in per_size else [f"edit.batch_size={args.batch_size[0]}"]
    )
    out = ROOT / "reports" / f"z_{args.grid}"
    results = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {"rows": []}
    env = [f"{k}={os.environ[k]}" for k in THREADS if k in os.environ]
    command = " ".join([*env, "python bench/z_design.py", *map(shlex.quote, sys.argv[1:])])
    commands = results.get("commands", [])  # every invocation that wrote rows of this report, in order
    results.update(
        {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{torch.get_num_threads()} threads, CPU",
            "n_facts": args.n_facts,
            "batch_size": " and ".join(map(str, args.batch_size)),
            "common": common,
            "commands": commands if command in commands else [*commands, command],
        }
    )
    if "perplexity" not in results.get("pre", {}):  # reports from before perplexity was measured get it now
        run_stages(common, WORK / "_pre", ["prepare"])
        with inside(WORK / "_pre"):
            facts = pl.read_parquet("artifacts/prepared/edits.parquet")
        results["pre"] = scored("smollm2-135m", facts)
    done = {r["name"] for r in results["rows"]}
    for name, config in grid.items():
        if args.only is not None and not any(name.startswith(o) for o in args.only):
            continue
        name = f"{name} ({args.tag})" if args.tag else name
        if name in done and not args.redo:
            continue
        print(f"== z {args.grid}: {name}: {' '.join(config.overrides)} (zvec {config.zvec_rev or 'here'})", flush=True)
        row = run_worker(name, config, common)
        results["rows"] = [r for r in results["rows"] if r["name"] != name] + [row]
        save(out, args.grid, results)
        print(render(args.grid, {**results, "rows": [row]}), flush=True)
    save(out, args.grid, results)  # also when every row was there: the report in the current format


if __name__ == "__main__":
    main()
