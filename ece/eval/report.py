"""The evaluation's human-readable side: the summary markdown, the two offline plots and the number
formatting they (and the console lines of ece.eval.run) share. Nothing here measures anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from ece.config import Params
from ece.eval.generation import spread
from ece.eval.metrics import REWRITE_METRICS, family_of
from ece.eval.plotting import pyplot, save_png
from ece.methods import describe, edited_layers

APPROX = "approximate"


def fmt_number(x: float | None) -> str:
    """A table cell: four decimals for shares and small deltas, two for large values (perplexity, fluency)."""
    if x is None:
        return "n/a"
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}"


def fmt_floats(summary: dict[str, Any]) -> str:
    """The float entries of a summary on one console line ("efficacy 0.750, score 0.450")."""
    return ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if isinstance(v, float))


def round_floats(x: Any, digits: int = 4) -> Any:
    """`x` with every float inside (dicts and lists followed) rounded: the JSON reports stay readable and
    their diffs between runs show real changes, not float noise."""
    if isinstance(x, float):
        return round(x, digits)
    if isinstance(x, dict):
        return {k: round_floats(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [round_floats(v, digits) for v in x]
    return x


def metric_rows(results: dict[str, dict[str, Any]], approximate: bool | None) -> list[tuple[str, Any, Any]]:
    """(label, pre, post) for every reported metric, in report order."""
    pre, post = results["pre"], results["post"]
    rows = [(m, pre[m], post[m]) for m in (*REWRITE_METRICS, "score")]
    rows.append(("fluency (n-gram entropy ×100)", pre["fluency"], post["fluency"]))
    rows.append(
        (f"consistency (TF-IDF cosine{', ' + APPROX if approximate else ''})", pre["consistency"], post["consistency"])
    )
    for task, m in pre["general"].items():
        for key in ("accuracy", "f1", "mcc"):
            if key in m:
                label = "macro-F1" if key == "f1" and task == "mmlu" else key
                rows.append((f"{task} {label} (n={m['n']})", m[key], post["general"][task][key]))
    rows.append((f"perplexity, WikiText-2 ({pre['perplexity_tokens']} tokens)", pre["perplexity"], post["perplexity"]))
    return rows


def render_summary(
    p: Params,
    df: pl.DataFrame,
    meta: dict[str, Any],
    edited_dir: Path,
    results: dict[str, dict[str, Any]],
    approximate: bool | None,
    seconds: dict[str, dict[str, float]],
    curve: list[dict[str, Any]],
    replay_diff: float | None,
) -> str:
    """reports/summary.md: the run's setup, pre vs post of every metric, the curve and the time per part."""
    lines = [f"# Evaluation: {p.method} on {df.height} facts ({family_of(df)})", ""]
    lines += [
        f"- model: `{p.model.name}` (pre) vs `{edited_dir / 'model'}` (post), seed {p.model.seed}",
        f"- dataset: `{meta.get('source', {}).get('path', '?')}` ({meta.get('format', '?')}), "
        f"dataset hash `{meta.get('dataset_hash', '?')}`",
        f"- editing: method `{p.method}`, layers {edited_layers(p)}, batch size {p.edit.batch_size} "
        f"(sequential; every fact evaluated after the LAST batch)",
    ]
    if p.method == "ece":
        lines.append(
            f"- ECE: scorer `{p.ece.scorer}`, neuron threshold {p.ece.neuron_threshold}, aggregation `{p.ece.aggregation}`, "
            f"clusters k={p.cluster.k} (k_max {p.cluster.k_max}), z steps {p.z.shared_steps}+{p.z.instance_steps}"
        )
    lines.append(f"- update: {describe(p)}")
    e = p.evaluate
    sampled = len(spread(df.height, e.gen_facts))
    subset = f" of {sampled} facts spread evenly over the {df.height}" if sampled < df.height else ""
    lines.append(
        f"- evaluation: general ability on the first {e.n_general or 'all'} examples of {', '.join(e.general_tasks)}; "
        f"perplexity {e.ppl_tokens} tokens in windows of {e.ppl_window}; {e.gen_per_fact} generation prompt(s) per fact{subset}, "
        f"{e.gen_max_new_tokens} new tokens, top-k {e.gen_top_k}, seed {e.seed}"
    )
    if approximate:
        lines += [
            "",
            f"**Consistency is {APPROX}**: no MEMIT attribute snippets / IDF files were given (or not for every fact), "
            "so the references are Wikipedia lead paragraphs about or mentioning the new object and the IDF table "
            "comes from that corpus (see ece/eval/generation.py). Compare pre with post; do not compare with published numbers.",
        ]
    lines += ["", "| metric | pre | post | Δ (post − pre) |", "|---|---:|---:|---:|"]
    for label, a, b in metric_rows(results, approximate):
        delta = fmt_number(b - a) if a is not None and b is not None else "n/a"
        lines.append(f"| {label} | {fmt_number(a)} | {fmt_number(b)} | {delta} |")
    if len(curve) > 2 or e.curve_every:
        lines += [
            "",
            f"## Curve (rewrite metrics of all {df.height} facts; curve_every = {e.curve_every})",
            "",
            "| facts edited | efficacy | generalization | specificity | score |",
            "|---:|---:|---:|---:|---:|",
        ]
        for pt in curve:
            lines.append(
                f"| {pt['facts_edited']} | " + " | ".join(fmt_number(pt[m]) for m in (*REWRITE_METRICS, "score")) + " |"
            )
        if replay_diff is not None:
            lines.append(f"\nReplayed deltas vs saved edited model: max |ΔW| = {replay_diff:.3g} on the edited layers.")
    lines += ["", "## Evaluation time (seconds)", "", "| part | pre | post |", "|---|---:|---:|"]
    for part in seconds["pre"]:
        lines.append(f"| {part} | {seconds['pre'][part]:.1f} | {seconds['post'].get(part, 0.0):.1f} |")
    lines += ["", "Per-fact results: `reports/per_fact.parquet`; plots: `reports/plots/`.", ""]
    return "\n".join(lines)


def plot_metrics(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Bars of pre vs post: the rewrite metrics, and the accuracy of every general-ability task."""
    plt = pyplot()
    pre, post = results["pre"], results["post"]
    groups = [
        ("Rewrite metrics (all facts)", [m for m in (*REWRITE_METRICS, "score")], lambda r, m: r[m]),
        ("General ability (accuracy)", list(pre["general"]), lambda r, m: r["general"][m]["accuracy"]),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [4, max(len(groups[1][1]), 1)]})
    for ax, (title, names, get) in zip(axes, groups):
        xs = list(range(len(names)))
        for offset, (phase, r, color) in zip((-0.2, 0.2), (("pre", pre, "#8c9eb5"), ("post", post, "#d9534f"))):
            vals = [get(r, m) for m in names]
            bars = ax.bar(
                [x + offset for x in xs], [v if v is not None else 0 for v in vals], 0.4, label=phase, color=color
            )
            for bar, v in zip(bars, vals):
                ax.annotate(
                    "n/a" if v is None else f"{v:.2f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
        ax.set_xticks(xs, names)
        ax.set_ylim(0, 1.25)
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("share of facts / accuracy")
    axes[0].legend(loc="upper left", ncol=2)
    fig.suptitle("Pre vs post editing")
    fig.tight_layout()
    save_png(fig, path)


def plot_curve(curve: list[dict[str, Any]], curve_every: int, path: Path) -> None:
    """The rewrite metrics of all facts against the number of facts edited so far."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    xs = [pt["facts_edited"] for pt in curve]
    styles = {
        "efficacy": "o-",
        "generalization": "s--",
        "specificity": "^-",
        "score": "D:",
    }  # equal values stay visible
    for m in (*REWRITE_METRICS, "score"):
        ax.plot(
            xs,
            [pt[m] if pt[m] is not None else float("nan") for pt in curve],
            styles.get(m, "o-"),
            label=m,
            markersize=7 if m == "efficacy" else 5,
        )
    ax.set_xlabel("facts edited (sequential batches)")
    ax.set_ylabel("metric over ALL facts")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    note = f"after every {curve_every} batch(es)" if curve_every else "curve_every = 0: pre and post only"
    ax.set_title(f"Rewrite metrics while editing ({note})")
    fig.tight_layout()
    save_png(fig, path)


HEADLINE = ("efficacy", "generalization", "specificity", "perplexity", "score")


def headline(metrics: dict[str, Any]) -> str:
    """reports/edit_metrics.json: the edited model's headline metrics, in this order (not sorted), so that
    `dvc exp show` and `dvc metrics show` lead with them; everything else stays in metrics.json."""
    return json.dumps({m: metrics["post"].get(m) for m in HEADLINE}, indent=2) + "\n"
