"""Seconds per batch of ECE and MEMIT on the same facts, side by side, in one process.

Not a test: a measurement. Each configuration runs the real stage scripts (attribute → apply_edits,
bench/scratch.run_stages) in a fresh scratch folder .cache/speed/<config>, with the covariance
statistics of the main pipeline copied in (run `make run` or `dvc repro covariance` first), and reads
the per-batch phase timings and z row-steps the pipeline itself records (reports/ledger_runs.json).

    python bench/speed.py                      # batch sizes 25 and 100, every configuration
    python bench/speed.py --sizes 25 --configs ece memit
    python bench/speed.py --sizes 100 --batches 4 --configs ece ece-within memit   # 4 sequential batches

Configurations:
- ece: params.yaml as it is (ECE's defaults);
- memit: MEMIT with the same z step rule (lr, clamp, early stop) as ece, at most 25 steps per fact;
- memit-published: MEMIT's released compute_z: lr 0.5, clamp 0.75, 25 forward passes (24 Adam
  updates), stop at total loss < 5e-2, one fact at a time, in the model's float32;
- ece-within: ECE with warm starts within a batch only (`z.warm_from_earlier=none`; the default also
  starts facts from earlier batches' δ of the same new object, which shows only with --batches > 1);
- ece-anchors, ece-all: ECE with `z.warm_from_earlier=anchors` (a group's anchor starts from earlier
  batches' δ, its members from the anchor once it stops) and `=all` (every fact with an earlier object
  starts from that δ at once);
- ece-warm0.5, ece-warm0.75: ECE with every warm start at 0.5 / 0.75 × the borrowed δ (`z.warm_scale`;
  0.75 is the default since 4dc9d5b, 0.5 was before it: the names keep the reports of either rerunnable);
- ece-predict1, ece-predict2: ECE with new objects' anchors started from 1 / 2 × a ridge prediction of δ
  from the object's embedding, fitted on the earlier batches' δ (`z.predict_cold`; only with --batches > 1);
- ece-calibrated: ECE with that prediction times the fit's own held-out least-squares scale
  (`z.predict_cold=1`, `z.predict_calibrate=true`; scale.py's row of the same name);
- ece-center: ECE with that prediction less its component along the fitted facts' mean δ
  (`z.predict_cold=1`, `z.predict_center=true`; scale.py's row of the same name);
- ece-window4, memit-window4: ece and memit with the z of 4 batches in one loop (`z.window_batches=4`;
  the tail of one batch's descent fills passes with the next batch's facts) and `z.facts_per_pass=100`;
- ece-pass25, memit-pass25: ece and memit with `z.facts_per_pass=25` (the same descent, each pass run
  25 facts at a time; pays off where a 100-fact pass is slower per row than four of 25);
- ultraedit: UltraEdit with its defaults (no z: one forward/backward per batch, then the solves).

With --batches N each configuration edits N sequential batches of the size (the first N·size facts) and
the table gives the mean per batch. With --score each configuration's edited model is also scored on its
facts (efficacy, generalization, specificity; every fact after the last batch), so a faster
configuration's quality is read in the same run, and every configuration's per-fact scores minus ECE's
on the same facts get a 95 % paired bootstrap interval (ece.eval.paired): whether a gap is noise.

Prints and writes reports/speed.md / .json: per batch size and configuration, seconds per batch split
by phase (update = keys + solve + cache P), z row-steps per batch (one row = one fact in one
forward/backward), and each configuration's time over ECE's (the `ece` row, else the first ece-* row).
With --batches > 1 also every batch's seconds and row-steps (a table, and reports/plots/<out>.png): ECE
starts facts from earlier batches' δ of the same new object, so its batches get cheaper as objects
repeat, and the mean depends on how many batches ran. And every configuration's z row-steps on the
facts grouped by how ECE's descent of each started: cold (as MEMIT), from a batch-mate with the same new
object, or from earlier batches' δ. Timings are only comparable when nothing else runs.

    python bench/speed.py --render --out speed_2000   # the report again from reports/speed_2000.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import polars as pl
from scratch import ROOT, cpu_name, inside, run_stages

from ece.artifacts import Z_DIR
from ece.audit.ledger import LEDGER_RUNS
from ece.eval.metrics import REWRITE_METRICS, fact_metrics, summarise
from ece.eval.paired import paired_difference
from ece.eval.plotting import pyplot, save_png
from ece.model.loading import load_model

PHASES = ("attribution", "clustering", "z", "update_keys", "update_solve", "update_cache")
CONFIGS = {
    "ece": ["method=ece"],
    "ece-within": ["method=ece", "z.warm_from_earlier=none"],
    "ece-anchors": ["method=ece", "z.warm_from_earlier=anchors"],
    "ece-all": ["method=ece", "z.warm_from_earlier=all"],
    "ece-warm0.5": ["method=ece", "z.warm_scale=0.5"],
    "ece-warm0.75": ["method=ece", "z.warm_scale=0.75"],
    "ece-predict1": ["method=ece", "z.predict_cold=1"],
    "ece-predict2": ["method=ece", "z.predict_cold=2"],
    "ece-calibrated": ["method=ece", "z.predict_cold=1", "z.predict_calibrate=true"],
    "ece-center": ["method=ece", "z.predict_cold=1", "z.predict_center=true"],
    # z of 4 batches in one loop (z.window_batches), 100 facts per forward/backward (memory as one batch's)
    "ece-window4": ["method=ece", "z.window_batches=4", "z.facts_per_pass=100"],
    "memit-window4": [
        "method=memit",
        "z.shared_steps=0",
        "z.instance_steps=25",
        "z.window_batches=4",
        "z.facts_per_pass=100",
    ],
    # z's passes 25 facts at a time (z.facts_per_pass; the same descent): on a CPU a pass over 100 facts'
    # rows can cost more per row than four passes of 25 (caches)
    "ece-pass25": ["method=ece", "z.facts_per_pass=25"],
    "memit": ["method=memit", "z.shared_steps=0", "z.instance_steps=25"],
    "memit-pass25": ["method=memit", "z.shared_steps=0", "z.instance_steps=25", "z.facts_per_pass=25"],
    "memit-published": [
        "method=memit",
        "z.lr=0.5",
        "z.lr_scale=none",
        "z.clamp_norm_factor=0.75",
        "z.stop_loss=0.05",
        "z.stop_nll=0",
        "z.shared_steps=0",
        "z.instance_steps=24",
        "z.facts_per_pass=1",
        "z.dtype=float32",
    ],
    "ultraedit": ["method=ultraedit"],
}
STAGES = ["prepare", "attribute", "cluster", "precompute_z", "apply_edits"]
RESAMPLES = 10_000  # of the facts, for each paired interval of the quality table


def scratch_dir(config: str, n_facts: int, batch_size: int) -> Path:
    """The folder one configuration's run works in (kept after the run: `score` and `fact_starts` read it)."""
    return ROOT / ".cache" / "speed" / f"{config}-{n_facts}x{batch_size}"


def measure(config: str, n_facts: int, batch_size: int) -> list[dict[str, Any]]:
    """Per-batch phase seconds and z row-steps of one configuration on the first n_facts CounterFact facts."""
    work = scratch_dir(config, n_facts, batch_size)
    shutil.rmtree(work, ignore_errors=True)  # no cached z: every batch is computed
    covariance = ROOT / "artifacts" / "covariance"
    if not covariance.exists():
        raise SystemExit("no artifacts/covariance: run `make run` or `dvc repro covariance` first")
    shutil.copytree(covariance, work / "artifacts" / "covariance")
    run_stages([*CONFIGS[config], f"data.n_facts={n_facts}", f"edit.batch_size={batch_size}"], work, STAGES)
    with inside(work):
        runs = sorted(json.loads(Path(LEDGER_RUNS).read_text()), key=lambda r: r["batch"])
    return [
        {
            "batch": r["batch"],
            "n_facts": r["n_facts"],
            "z_row_steps": r["z_row_steps"],
            **{ph: round(r[ph], 2) for ph in PHASES},
        }
        for r in runs
    ]


def score(config: str, n_facts: int, batch_size: int) -> tuple[dict[str, float | None], dict[str, list[Any]]]:
    """Rewrite metrics of the model `measure` edited, every fact scored after the last batch: the means,
    and every fact's scores (id order), which the paired comparison between configurations reads."""
    with inside(scratch_dir(config, n_facts, batch_size)):
        facts = pl.read_parquet("artifacts/prepared/edits.parquet")
        per_fact = fact_metrics(*load_model("artifacts/edited/model"), facts).sort("id")
    scores = {m: [None if v is None else round(v, 4) for v in per_fact[m].to_list()] for m in REWRITE_METRICS}
    return summarise(per_fact), {"id": per_fact["id"].to_list(), **scores}


START_KINDS = {
    "cold": "a new object no earlier fact had (from δ = 0, as MEMIT)",
    "member": "a new object an earlier fact of its batch had (from that fact's final δ)",
    "earlier": "a new object only earlier batches had (from their mean final δ)",
}


def fact_starts(config: str, n_facts: int, batch_size: int) -> dict[str, list[Any]] | None:
    """Each fact's z row-steps and how its descent started (`START_KINDS`), from the z index the run wrote
    (None when its scratch folder is gone, or for a method without z, whose index holds no fact)."""
    index = scratch_dir(config, n_facts, batch_size) / Z_DIR / "index.parquet"
    if not index.exists():
        return None
    z = pl.read_parquet(index).sort("id")
    if z.is_empty():
        return None
    start = (
        pl.when(pl.col("anchor") != pl.col("id"))
        .then(pl.lit("member"))
        .when(pl.col("earlier") > 0)
        .then(pl.lit("earlier"))
        .otherwise(pl.lit("cold"))
    )
    z = z.with_columns(start=start)
    return {k: z[k].to_list() for k in ("id", "batch", "steps", "start")}


def add_starts(results: dict[str, Any], size: int, config: str) -> None:
    """Put `fact_starts` of a configuration's run into results["starts"], if its scratch folder is there."""
    starts = fact_starts(config, size * results.get("batches", 1), size)
    if starts is not None:
        results.setdefault("starts", {}).setdefault(str(size), {})[config] = starts


def base_config(per_config: dict[str, Any]) -> str | None:
    """The configuration the others are compared with: `ece`, else the first ece-* one (None: no ECE ran)."""
    return "ece" if "ece" in per_config else next((c for c in per_config if c.startswith("ece")), None)


def compared(per_config: dict[str, Any], base: str) -> list[str]:
    """The configurations other than `base`, each checked to cover the same facts in the same order (a
    per-fact table of two runs over different facts would pair the wrong rows)."""
    others = [c for c in per_config if c != base]
    for config in others:
        if per_config[config]["id"] != per_config[base]["id"]:
            raise ValueError(f"{config} and {base} cover different facts: no per-fact comparison")
    return others


def start_lines(results: dict[str, Any]) -> list[str]:
    """z row-steps by how ECE's descent of each fact started, with every other configuration's row-steps on
    the same facts: where ECE's savings come from, and the floor its cold facts set."""
    lines = []
    for size, per_config in results.get("starts", {}).items():
        base = base_config(per_config)
        if base is None:  # the start kinds are ECE's
            continue
        others = compared(per_config, base)
        kinds = per_config[base]["start"]
        lines += [
            "",
            f"z row-steps of batches of {size} by how {base}'s descent of a fact started ("
            + "; ".join(f"{k}: {v}" for k, v in START_KINDS.items())
            + "):",
            "",
            f"| start | facts | {base} row-steps | " + " | ".join(f"{c} row-steps" for c in others) + " |",
            "|---|---:|---:|" + "---:|" * len(others),
        ]
        batches = per_config[base]["batch"]
        for which, keep in (("all batches", lambda b: True), ("first batch", lambda b: b == 0)):
            for kind in START_KINDS:
                rows = [i for i, k in enumerate(kinds) if k == kind and keep(batches[i])]
                steps = [sum(per_config[c]["steps"][i] for i in rows) for c in [base, *others]]
                lines.append(f"| {which}: {kind} | {len(rows)} | " + " | ".join(str(n) for n in steps) + " |")
    return lines


def mean_batch(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Phase seconds and z row-steps of one configuration's batches, averaged per batch."""
    return {k: sum(r[k] for r in rows) / len(rows) for k in (*PHASES, "z_row_steps")}


def total(row: dict[str, Any]) -> float:
    return sum(row[ph] for ph in PHASES)


def render(results: dict[str, Any]) -> str:
    lines = [
        "# Speed: ECE vs MEMIT on the same facts",
        "",
        f"Generated by `bench/speed.py` on {results['date']} ({results['machine']}). SmolLM2-135M, CounterFact, "
        f"params.yaml defaults (edit layers 3-7); {results.get('batches', 1)} sequential batch(es) of each size, "
        "from nothing (no cached z), mean per batch. Seconds per batch from the pipeline's own phase timings; update = keys + solve + cache P. memit uses ECE's z step "
        "rule; memit-published is MEMIT's released compute_z (lr 0.5, clamp 0.75, 24 updates, stop at total "
        "loss < 5e-2, one fact at a time, float32); ece and memit run z in params.yaml's z.dtype.",
        "",
        "| batch size | config | attribution | clustering | z | keys | solve | cache P | total | z row-steps | config / ECE's |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size, per_config in results["sizes"].items():
        base = base_config(per_config)
        ece = total(mean_batch(per_config[base])) if base else None
        for config, rows in per_config.items():
            r = mean_batch(rows)
            ratio = f"{total(r) / ece:.2f}×" if ece else "–"
            lines.append(
                f"| {size} | {config} | "
                + " | ".join(f"{r[ph]:.1f}" for ph in PHASES)
                + f" | {total(r):.1f} | {r['z_row_steps']:.0f} | {ratio} |"
            )
    if results.get("batches", 1) > 1:
        lines += per_batch_lines(results)
    lines += start_lines(results)
    if results.get("scores"):
        lines += [
            "",
            "Rewrite metrics of each configuration's edited model (every fact after the last batch):",
            "",
            "| batch size | config | efficacy | generalization | specificity | score |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for size, per_config in results["scores"].items():
            for config, m in per_config.items():
                cells = " | ".join(f"{m[k]:.3f}" for k in ("efficacy", "generalization", "specificity", "score"))
                lines.append(f"| {size} | {config} | {cells} |")
    lines += paired_lines(results)
    return "\n".join(lines) + "\n"


def paired_lines(results: dict[str, Any]) -> list[str]:
    """Each configuration's per-fact rewrite metrics minus the base configuration's on the same facts, with
    a 95 % paired bootstrap interval (ece.eval.paired): whether a gap between two means is more than noise."""
    lines = []
    for size, per_config in results.get("per_fact", {}).items():
        base = base_config(per_config)
        if base is None:
            continue
        others = compared(per_config, base)
        if not others:
            continue
        lines += [
            "",
            f"Per fact, each configuration minus {base} on the same {len(per_config[base]['id'])} facts (batches of "
            f"{size}): mean difference [95 % paired bootstrap interval, {RESAMPLES:,} resamples of the facts]; "
            "* = the interval excludes 0:",
            "",
            "| config | " + " | ".join(REWRITE_METRICS) + " |",
            "|---|" + "---|" * len(REWRITE_METRICS),
        ]
        for config in others:
            cells = []
            for m in REWRITE_METRICS:
                d = paired_difference(per_config[base][m], per_config[config][m], resamples=RESAMPLES)
                star = "*" if d.excludes_zero() else ""
                cells.append(f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]{star}")
            lines.append(f"| {config} − {base} | " + " | ".join(cells) + " |")
    return lines


def per_batch_lines(results: dict[str, Any]) -> list[str]:
    """Every batch's total seconds and z row-steps, one column pair per configuration, and the ratio of
    each configuration's batch time to ECE's (the same base as the mean table)."""
    lines = []
    for size, per_config in results["sizes"].items():
        configs = list(per_config)
        base = base_config(per_config)
        lines += [
            "",
            f"Every batch of {size} (seconds = all phases; row-steps = z's; the plot: reports/plots/"
            f"{results.get('out', 'speed')}.png):",
            "",
            "| batch | " + " | ".join(f"{c} s | {c} row-steps" for c in configs) + f" | s over {base or 'ECE'}'s |",
            "|---:|" + "---:|---:|" * len(configs) + "---|",
        ]
        for i in range(min(len(rows) for rows in per_config.values())):
            cells = [(total(per_config[c][i]), per_config[c][i]["z_row_steps"]) for c in configs]
            ratios = base and ", ".join(
                f"{c} {total(per_config[c][i]) / total(per_config[base][i]):.2f}×" for c in configs if c != base
            )
            lines.append(f"| {i} | " + " | ".join(f"{t:.1f} | {n}" for t, n in cells) + f" | {ratios or '–'} |")
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    """Seconds and z row-steps of every batch, one line per configuration (one figure row per batch size)."""
    plt = pyplot()
    sizes = results["sizes"]
    fig, axes = plt.subplots(len(sizes), 2, figsize=(11, 3.6 * len(sizes)), squeeze=False)
    for (size, per_config), (ax_s, ax_n) in zip(sizes.items(), axes):
        for config, rows in per_config.items():
            batches = [r["batch"] for r in rows]
            ax_s.plot(batches, [total(r) for r in rows], marker="o", label=config)
            ax_n.plot(batches, [r["z_row_steps"] for r in rows], marker="o", label=config)
        ax_s.set(xlabel="batch", ylabel="seconds (all phases)", title=f"batches of {size}: seconds per batch")
        ax_n.set(xlabel="batch", ylabel="z row-steps", title=f"batches of {size}: z row-steps per batch")
        for ax in (ax_s, ax_n):
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    save_png(fig, path)


# A JSON list holding no list or object: brackets around anything but brackets, braces and strings, and
# strings (with their escapes) in between.
FLAT_LIST = re.compile(r'\[(?:[^\[\]{}"]|"(?:[^"\\]|\\.)*")*\]')


def write_json(results: dict[str, Any], out: Path) -> None:
    """reports/<out>.json, indented, with every list of plain values on one line: the per-fact lists (ids,
    row-steps, scores of 2000 facts per configuration) one value per line made a 2000-edit run's file 0.6 MB."""
    text = json.dumps(results, indent=1)
    flat = re.sub(FLAT_LIST, lambda m: json.dumps(json.loads(m.group())), text)
    out.with_suffix(".json").write_text(flat + "\n")


def write(results: dict[str, Any], out: Path) -> None:
    """reports/<out>.md, and with more than one batch reports/plots/<out>.png."""
    out.with_suffix(".md").write_text(render(results))
    if results.get("batches", 1) > 1:
        plot(results, ROOT / "reports" / "plots" / f"{out.name}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="*", type=int, default=[25, 100])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--batches", type=int, default=1, help="sequential batches per size (mean per batch reported)")
    ap.add_argument("--out", default="speed", help="report name: reports/<out>.md / .json")
    ap.add_argument("--score", action="store_true", help="also score each edited model's rewrite metrics")
    ap.add_argument("--render", action="store_true", help="only write the report again from reports/<out>.json")
    args = ap.parse_args()
    out = ROOT / "reports" / args.out
    if args.render:  # the json as measured, plus how each fact started where the run's scratch is still here
        results = json.loads(out.with_suffix(".json").read_text()) | {"out": args.out}
        for size, per_config in results["sizes"].items():
            for config in per_config:
                add_starts(results, int(size), config)
        write_json(results, out)
        write(results, out)
        print(render(results))
        return
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores ({cpu_name()}), no GPU",
        "batches": args.batches,
        "out": args.out,
        "sizes": {},
    }
    for size in args.sizes:
        for config in args.configs:
            print(f"== speed: {config}, {args.batches} batch(es) of {size}", flush=True)
            results["sizes"].setdefault(str(size), {})[config] = measure(config, size * args.batches, size)
            add_starts(results, size, config)
            if args.score:
                means, per_fact = score(config, size * args.batches, size)
                results.setdefault("scores", {}).setdefault(str(size), {})[config] = means
                results.setdefault("per_fact", {}).setdefault(str(size), {})[config] = per_fact
            write_json(results, out)
            print(render(results), flush=True)
    write(results, out)
    print(render(results))


if __name__ == "__main__":
    main()
