"""How z should be optimised: step size, clamp, stop rule, and what the shared phase starts members from.

Not a test: a measurement. Every configuration runs the real stages (prepare → apply_edits, the
functions of bench/sweep.py) on the same CounterFact facts in its own scratch folder, with one
covariance computed once and copied in, and is then scored after the last batch. Per configuration:
z row-steps (one row = one fact in one forward/backward of the z descent), z seconds, mean target NLL
of z, mean ‖δ‖/‖h‖, and efficacy / generalization / specificity / score of the edited model.

    python bench/z_design.py --grid step      # lr × clamp × stop rule, MEMIT z (reports/z_step.md)
    python bench/z_design.py --grid design    # shared-phase designs at the chosen step rule (reports/z_design.md)
    python bench/z_design.py --grid design --only ece-object memit

Rows already in reports/z_<grid>.json are kept and skipped (rerun a row with --redo), so a killed run
resumes. Seconds are only comparable between rows measured on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import polars as pl
import torch
from safetensors import safe_open
from sweep import ROOT, inside, run_stages

from ece.eval.metrics import fact_metrics, summarise
from ece.model.loading import load_model

WORK = ROOT / ".cache" / "z_bench"
STAGES = ["prepare", "attribute", "cluster", "precompute_z", "apply_edits"]
MEMIT_Z = ["method=memit", "z.shared_steps=0", "z.instance_steps=25"]


def _step_grid() -> dict[str, list[str]]:
    grid = {}
    for lr_name, lr in (
        ("0.5", ["z.lr=0.5"]),
        ("1", ["z.lr=1.0"]),
        ("2", ["z.lr=2.0"]),
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
        "update_seconds": update.get("seconds_total", {}).get("update"),
    }


def run_config(name: str, overrides: list[str], common: list[str]) -> dict[str, Any]:
    work = WORK / "".join(c if c.isalnum() else "-" for c in name)
    shutil.rmtree(work, ignore_errors=True)  # nothing cached: every z is computed
    shutil.copytree(covariance_folder(common), work / "artifacts" / "covariance")
    start = time.perf_counter()
    run_stages(common + overrides, work, STAGES)
    seconds = time.perf_counter() - start
    with inside(work):
        facts = pl.read_parquet("artifacts/prepared/edits.parquet")
        post = summarise(fact_metrics(*load_model("artifacts/edited/model"), facts))
    return {"name": name, "overrides": overrides, **z_stats(work), "post": post, "pipeline_seconds": round(seconds, 1)}


def render(grid: str, results: dict[str, Any]) -> str:
    pre = results["pre"]
    lines = [
        f"# z: {grid} grid",
        "",
        f"Generated by `bench/z_design.py --grid {grid}` on {results['date']} ({results['machine']}). "
        f"SmolLM2-135M, CounterFact, first {results['n_facts']} facts in batches of {results['batch_size']}, "
        f"layers and λ from params.yaml, common overrides `{' '.join(results['common'])}`; every fact scored "
        f"after the last batch. Unedited: efficacy {pre['efficacy']:.2f}, generalization "
        f"{pre['generalization']:.2f}, specificity {pre['specificity']:.2f}. A row-step is one fact in one "
        "forward/backward of the z descent.",
        "",
        "| config | z row-steps | max steps | z s | z NLL | ‖δ‖/‖h‖ | efficacy | generalization | specificity | score |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        post = r["post"]
        lines.append(
            f"| {r['name']} | {r['row_steps']} | {r['steps_max']} | {r['z_seconds']:.1f} | {r['z_nll']:.3f} | "
            f"{r['delta_over_h']:.2f} | "
            + " | ".join(f"{post[m]:.3f}" for m in ("efficacy", "generalization", "specificity", "score"))
            + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", choices=["step", "design"], required=True)
    ap.add_argument("--only", nargs="*", default=None, help="run only configs whose name starts with one of these")
    ap.add_argument("--step", default="", help="design grid: space-separated step-rule overrides for every row")
    ap.add_argument("--redo", action="store_true", help="recompute rows already in the report")
    ap.add_argument("--n-facts", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=25)
    args = ap.parse_args()
    grid = _step_grid() if args.grid == "step" else {k: [*v, *args.step.split()] for k, v in DESIGNS.items()}
    common = [f"data.n_facts={args.n_facts}", f"edit.batch_size={args.batch_size}"]
    out = ROOT / "reports" / f"z_{args.grid}"
    results = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {"rows": []}
    results.update(
        {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{torch.get_num_threads()} threads, CPU",
            "n_facts": args.n_facts,
            "batch_size": args.batch_size,
            "common": common,
        }
    )
    if "pre" not in results:
        run_stages(common, WORK / "_pre", ["prepare"])
        with inside(WORK / "_pre"):
            facts = pl.read_parquet("artifacts/prepared/edits.parquet")
        results["pre"] = summarise(fact_metrics(*load_model("smollm2-135m"), facts))
    done = {r["name"] for r in results["rows"]}
    for name, overrides in grid.items():
        if args.only is not None and not any(name.startswith(o) for o in args.only):
            continue
        if name in done and not args.redo:
            continue
        print(f"== z {args.grid}: {name}: {' '.join(overrides)}", flush=True)
        row = run_config(name, overrides, common)
        results["rows"] = [r for r in results["rows"] if r["name"] != name] + [row]
        out.with_suffix(".json").write_text(json.dumps(results, indent=2))
        out.with_suffix(".md").write_text(render(args.grid, results))
        print(render(args.grid, {**results, "rows": [row]}), flush=True)


if __name__ == "__main__":
    main()
