"""Seconds of the evaluation's parts for one model: the code at the branch's base revision against today's.

Not a test: a measurement. ece/eval/scoring.py and ece/eval/general_ability.py at `--base` (default
827c57d: one forward per scored row) are read from git into modules of their own and patched into
`evaluate_model` for the "old" side; "new" is today's code. Both run on the same loaded SmolLM2-135M and
the same N CounterFact facts (params.yaml's data section, first N records), old and new alternately
`--reps` times, with the consistency references built once (the stage builds them once per run):

- rewrite: `fact_metrics`, old scorer vs new; the per-fact tables must be equal;
- generation: sampled for every fact (old) vs for `evaluate.gen_facts` facts spread evenly (new), the
  same sampling code otherwise, so both are equal while N <= gen_facts;
- general: general ability on --n-general examples per task, timed task by task (equal predictions);
- perplexity: as params.yaml says (equal).

Then extrapolates to --target facts: the rewrite by the model tokens each side runs (counted for N and
for the target), the generation by the number of facts sampled, general ability per example. The
machine is shared, so the extrapolation is also scaled to the speed of the default run recorded at
`--base` (reports/metrics.json there: the same old code, both models): part by part, by the ratio of
the old code's seconds per fact there and here. Writes reports/eval_speed.md.

    python bench/eval_speed.py --facts 200 --reps 2
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

import ece.eval.metrics
import ece.eval.run
from ece.config import Params, load_params
from ece.data.loaders import load_edits
from ece.eval import general_ability
from ece.eval.generation import spread
from ece.eval.metrics import families, queries
from ece.eval.run import consistency_references, evaluate_model
from ece.eval.scoring import distinct_inputs
from ece.model.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("rewrite", "generation", "general", "perplexity")
BUDGET_S = 300  # the benchmark issue's target for rewrite + generation of 2000 facts, per model


def git_show(revision: str, path: str) -> str:
    return subprocess.run(
        ["git", "show", f"{revision}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout


def module_at(revision: str, path: str, name: str, imports: dict[str, str]) -> ModuleType:
    """`path` at `revision` as a module `name`, its `from A import` lines rewritten by `imports`."""
    source = git_show(revision, path)
    for old, new in imports.items():
        source = source.replace(f"from {old} import", f"from {new} import")
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def by_task(score: Callable[..., dict[str, Any]], seconds: dict[str, float]) -> Callable[..., dict[str, Any]]:
    """`general_ability` run one task at a time, each task's seconds added to `seconds`."""

    def run(model: Any, tok: Any, data_dir: str, tasks: list[str], n: int, batch_size: int = 16) -> dict[str, Any]:
        out = {}
        for task in tasks:
            t = time.perf_counter()
            out |= score(model, tok, data_dir, [task], n, batch_size)
            seconds[task] = seconds.get(task, 0.0) + time.perf_counter() - t
        return out

    return run


@contextlib.contextmanager
def patched(targets: dict[tuple[ModuleType, str], Any]) -> Iterator[None]:
    saved = {key: getattr(*key) for key in targets}
    for (module, name), value in targets.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)


def facts_and_references(p: Params) -> tuple[Any, Any]:
    """The evaluated facts and their consistency references, as the evaluate stage builds them (once per run)."""
    df = load_edits(p.data)
    return df, consistency_references(p.evaluate, df, p.data.edit_dataset)


def model_tokens(tok: Any, p: Params, n: int) -> tuple[int, int]:
    """Tokens the rewrite metrics of the first `n` facts feed the model: (one input per row, as the base
    scorer runs them; the distinct inputs today's scorer runs). Padding not counted."""
    df = load_edits(dataclasses.replace(p.data, n_facts=n))
    qs = queries(df, families(df))
    rows, readers = distinct_inputs(tok, [q.text for q in qs], [q.target for q in qs])
    return sum(len(t) + len(c) - 1 for t, c in rows), sum(len(x) for x in readers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="827c57d")
    ap.add_argument("--facts", type=int, default=200)
    ap.add_argument("--target", type=int, default=2000)
    ap.add_argument("--n-general", type=int, default=50)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.chdir(ROOT)
    torch.set_num_threads(args.threads)
    old_scoring = module_at(args.base, "ece/eval/scoring.py", "scoring_base", {})
    old_general = module_at(
        args.base, "ece/eval/general_ability.py", "general_ability_base", {"ece.eval.scoring": "scoring_base"}
    )
    p = load_params(ROOT / "params.yaml", [f"data.n_facts={args.facts}", f"evaluate.n_general={args.n_general}"])
    e = p.evaluate
    df, refs = facts_and_references(p)
    model, tok = load_model(p.model.name, p.model.seed)
    sides: dict[str, tuple[Params, dict[tuple[ModuleType, str], Any]]] = {
        "old": (
            dataclasses.replace(p, evaluate=dataclasses.replace(e, gen_facts=0)),  # the base sampled every fact
            {
                (ece.eval.metrics, "continuation_scores"): old_scoring.continuation_scores,
                (ece.eval.run, "perplexity"): old_general.perplexity,
            },
        ),
        "new": (p, {}),
    }
    scorers = {"old": old_general.general_ability, "new": general_ability.general_ability}
    load = [os.getloadavg()[0]]
    seconds: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    task_seconds: dict[str, dict[str, float]] = {side: {} for side in sides}
    results: dict[str, tuple[dict[str, Any], Any]] = {}
    for rep in range(args.reps):
        for side, (params, targets) in sides.items():
            general = by_task(scorers[side], task_seconds[side])
            with patched({**targets, (ece.eval.run, "general_ability"): general}):
                summary, per_fact, secs = evaluate_model(model, tok, df, params, refs)
            seconds[side].append(secs)
            results[side] = (summary, per_fact)
            print(f"rep {rep} {side}: " + ", ".join(f"{k} {v:.1f} s" for k, v in secs.items()), flush=True)
    load.append(os.getloadavg()[0])

    (old_summary, old_table), (new_summary, new_table) = results["old"], results["new"]
    sampled = {"old": args.facts, "new": len(spread(args.facts, e.gen_facts))}
    gen_cols = ["fluency", "consistency", "generations"]
    equal = {
        "rewrite": new_table.drop(gen_cols).equals(old_table.drop(gen_cols)),
        "generation": new_table.select(gen_cols).equals(old_table.select(gen_cols))
        if sampled["new"] == sampled["old"]
        else "subset",
        "general": new_summary["general"] == old_summary["general"],
        "perplexity": new_summary["perplexity"] == old_summary["perplexity"],
    }
    median = {side: {k: statistics.median(s[k] for s in seconds[side]) for k in PARTS} for side in sides}
    tokens = {n: model_tokens(tok, p, n) for n in (args.facts, args.target)}
    scale = {side: tokens[args.target][i] / tokens[args.facts][i] for i, side in enumerate(sides)}
    target_sampled = {"old": args.target, "new": len(spread(args.target, e.gen_facts))}
    projected = {
        side: {
            "rewrite": median[side]["rewrite"] * scale[side],
            "generation": median[side]["generation"] / sampled[side] * target_sampled[side],
        }
        for side in sides
    }
    # the default run at the base revision: the old code's seconds per fact and model on the reference machine
    recorded = json.loads(git_show(args.base, "reports/metrics.json"))
    speed = {
        part: statistics.mean(recorded["seconds"][phase][part] for phase in ("pre", "post"))
        / recorded["n_facts"]
        / (median["old"][part] / args.facts)
        for part in projected["new"]
    }
    scaled = {part: projected["new"][part] * speed[part] for part in speed}

    def cell(side: str, part: str) -> str:
        return " / ".join(f"{s[part]:.1f}" for s in seconds[side])

    lines = [
        "# Evaluation speed: base scoring vs today's",
        "",
        f"Generated by `bench/eval_speed.py` on {time.strftime('%Y-%m-%d')}: SmolLM2-135M, {args.threads} torch "
        f"thread(s), the first {args.facts} facts of `{p.data.edit_dataset}`, batch size {e.batch_size}, "
        f"{e.gen_per_fact} generation prompt per fact of {e.gen_max_new_tokens} new tokens, general ability on "
        f"{args.n_general} examples per task. Old = ece/eval/scoring.py and general_ability.py at {args.base} (and "
        f"every fact sampled); new = this revision (evaluate.gen_facts = {e.gen_facts}). Old and new ran alternately "
        f"in one process, {args.reps} times each, on a shared 2-core machine (1-min load average "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end): the seconds are noisy, each run is listed.",
        "",
        f"## Measured, {args.facts} facts, one model",
        "",
        "| part | old s (each run) | new s (each run) | old / new (medians) | results equal |",
        "|---|---:|---:|---:|---|",
    ]
    for part in PARTS:
        ratio = median["old"][part] / median["new"][part]
        lines.append(f"| {part} | {cell('old', part)} | {cell('new', part)} | {ratio:.2f} | {equal[part]} |")
    rg = {side: median[side]["rewrite"] + median[side]["generation"] for side in sides}
    lines.append(
        f"| rewrite + generation (medians) | {rg['old']:.1f} | {rg['new']:.1f} | {rg['old'] / rg['new']:.2f} | |"
    )
    lines += [
        "",
        "Model tokens of the rewrite metrics (unpadded): "
        + "; ".join(
            f"{n} facts: {old} one input per row (old), {new} distinct inputs (new, {new / old:.0%})"
            for n, (old, new) in tokens.items()
        )
        + ".",
        "",
        f"## Extrapolated to {args.target} facts, one model (an EXTRAPOLATION, not a measurement)",
        "",
        f"Rewrite: the median seconds × the ratio of model tokens ({args.target} facts / {args.facts}); generation: "
        f"seconds per sampled fact × facts sampled ({target_sampled['old']} old, {target_sampled['new']} new).",
        "",
        "| part | old s | new s | new s at the default run's speed |",
        "|---|---:|---:|---:|",
    ]
    for part in ("rewrite", "generation"):
        lines.append(f"| {part} | {projected['old'][part]:.0f} | {projected['new'][part]:.0f} | {scaled[part]:.0f} |")
    total = {side: sum(projected[side].values()) for side in sides}
    lines += [
        f"| rewrite + generation | {total['old']:.0f} | {total['new']:.0f} | {sum(scaled.values()):.0f} |",
        "",
        f"Target <= {BUDGET_S} s per model for rewrite + generation: {'met' if total['new'] <= BUDGET_S else 'NOT met'} "
        f"at this machine's load; {'met' if sum(scaled.values()) <= BUDGET_S else 'NOT met'} at the default run's "
        f"speed (the old code's rewrite and generation took {speed['rewrite']:.2f}× and {speed['generation']:.2f}× "
        f"the seconds per fact there that they took here: reports/metrics.json at {args.base}, "
        f"{recorded['n_facts']} facts, both models).",
        "",
        "## General ability, seconds per example (each task, summed over the runs)",
        "",
        "| task | old | new | new × 200 examples |",
        "|---|---:|---:|---:|",
    ]
    per_example = {
        side: {task: s / (args.reps * args.n_general) for task, s in task_seconds[side].items()} for side in sides
    }
    for task in e.general_tasks:
        new = per_example["new"][task]
        lines.append(f"| {task} | {per_example['old'][task]:.3f} | {new:.3f} | {200 * new:.0f} |")
    all_new = sum(per_example["new"].values())
    lines.append(
        f"| all {len(e.general_tasks)} | {sum(per_example['old'].values()):.3f} | {all_new:.3f} | {200 * all_new:.0f} |"
    )
    md = "\n".join(lines) + "\n"
    (ROOT / "reports" / "eval_speed.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
