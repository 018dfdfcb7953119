"""Stage `evaluate`: the unedited and the edited model on ALL edited facts, after the last batch.

Both models are scored in the same run with the same code, so "pre" and "post" differ only in the
weights. Per model ("phase"):
- rewrite metrics of every fact (ece.eval.metrics: efficacy, generalization, specificity, score);
- fluency and consistency of sampled generations (ece.generation; CounterFact-style facts with
  generation prompts only, null otherwise). Without MEMIT's reference files consistency is
  APPROXIMATE (Wikipedia references; `consistency_approximate` in metrics.json);
- general ability (ece.eval.general_ability: zero-shot SST-2, MRPC, CoLA, RTE, NLI, MMLU) and perplexity on
  WikiText-2 test.
With `evaluate.curve_every = j > 0` the rewrite metrics of all facts are also measured after every j-th
batch (and the last), by replaying the stored per-batch column changes
(artifacts/edited/delta-batch-XXXX.safetensors: W[:, cols] = new, batch after batch) onto the
original weights; reports/curve.json always holds the pre point (0 facts edited) and the post point.

The unedited model's results are cached in .cache/evaluate_pre/ under a key of the model fingerprint,
the facts, the evaluation params, the contents of the data files they name and the code this script
runs (machine-local scratch, like the apply_edits checkpoint): comparing methods on the same facts
measures "pre" once.

Outputs: reports/per_fact.parquet (one row per fact and phase), reports/metrics.json,
reports/summary.md, reports/curve.json, reports/plots/{metrics,curve}.png.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import polars as pl
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ece.artifacts import EDITED
from ece.audit.ledger import delta_files, load_deltas, put_columns
from ece.config import Params
from ece.data.codehash import code_hash
from ece.data.facts import read_facts
from ece.data.io import atomic_dir, atomic_path, sha256_json, sha256_tree, write_json, write_text
from ece.eval.general_ability import general_ability, perplexity, read_tokens
from ece.eval.generation import References, fact_references, generation_metrics
from ece.eval.metrics import REWRITE_METRICS, fact_metrics, family_of, summarise
from ece.methods import describe, edited_layers
from ece.model.adapter import ModelAdapter
from ece.model.loading import load_model, model_fingerprint
from ece.stage import run_stage

PER_FACT = "reports/per_fact.parquet"
METRICS = "reports/metrics.json"
SUMMARY = "reports/summary.md"
CURVE = "reports/curve.json"
PLOTS = Path("reports/plots")
APPROX = "approximate"
PRE_CACHE = Path(".cache/evaluate_pre")
# evaluate params that name data files or folders: the pre-evaluation key holds their contents
DATA_PARAMS = ("general_dir", "ppl_corpus", "reference_corpus", "attribute_snippets", "idf", "tfidf_vocab")


# ---------------------------------------------------------------------------------------------
# Measuring


def evaluate_model(
    model: nn.Module, tok: PreTrainedTokenizerBase, df: pl.DataFrame, p: Params, refs: References | None
) -> tuple[dict[str, Any], pl.DataFrame, dict[str, float]]:
    """Every metric of one model: (summary, per-fact table, seconds per part)."""
    e = p.evaluate
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    per_fact = fact_metrics(model, tok, df, e.batch_size)
    summary: dict[str, Any] = summarise(per_fact)
    seconds["rewrite"] = time.perf_counter() - t

    t = time.perf_counter()
    prompts = [list(g or [])[: e.gen_per_fact] for g in df["generation_prompts"].to_list()]
    if refs is not None and any(prompts):
        flu, con, gens = generation_metrics(model, tok, prompts, refs, e.gen_max_new_tokens, e.gen_top_k, e.seed, e.batch_size)
    else:
        flu, con, gens = [None] * df.height, [None] * df.height, [[] for _ in range(df.height)]
    per_fact = per_fact.with_columns(
        pl.Series("fluency", flu, dtype=pl.Float64),
        pl.Series("consistency", con, dtype=pl.Float64),
        pl.Series("generations", gens, dtype=pl.List(pl.Utf8)),
    )
    summary["fluency"] = per_fact["fluency"].mean()
    summary["consistency"] = per_fact["consistency"].mean()
    seconds["generation"] = time.perf_counter() - t

    t = time.perf_counter()
    summary["general"] = general_ability(model, tok, e.general_dir, list(e.general_tasks), e.n_general, e.batch_size)
    seconds["general"] = time.perf_counter() - t

    t = time.perf_counter()
    ids = read_tokens(tok, e.ppl_corpus, e.ppl_tokens)
    summary["perplexity"] = perplexity(model, tok, ids, e.ppl_window, max(1, e.batch_size // 4))
    summary["perplexity_tokens"] = len(ids)
    seconds["perplexity"] = time.perf_counter() - t
    return summary, per_fact, seconds


def evaluate_pre(
    model: nn.Module, tok: PreTrainedTokenizerBase, df: pl.DataFrame, p: Params, refs: References | None
) -> tuple[dict[str, Any], pl.DataFrame, dict[str, float]]:
    """`evaluate_model` of the unedited model, reused when nothing it depends on changed."""
    settings = {k: v for k, v in asdict(p.evaluate).items() if k not in ("threads", "curve_every", *DATA_PARAMS)}
    data = {k: sha256_tree(v) if v is not None else None for k, v in asdict(p.evaluate).items() if k in DATA_PARAMS}
    key = sha256_json({
        "model": model_fingerprint(model), "facts": df.select("id", "content_hash").rows(), "settings": settings,
        "data": data, "code": code_hash(__file__),
    })
    folder = PRE_CACHE / key[:32]
    if (folder / "summary.json").exists():
        print(f"evaluate pre: reusing {folder}")
        return (json.loads((folder / "summary.json").read_text()), pl.read_parquet(folder / "per_fact.parquet"),
                json.loads((folder / "seconds.json").read_text()))
    summary, per_fact, seconds = evaluate_model(model, tok, df, p, refs)
    with atomic_dir(folder) as tmp:
        write_json(tmp / "summary.json", summary)
        per_fact.write_parquet(tmp / "per_fact.parquet")
        write_json(tmp / "seconds.json", seconds)
    return summary, per_fact, seconds


def facts_per_batch(n_batches: int, n_facts: int) -> list[int]:
    """Cumulative number of facts written after each batch (from apply_edits' batch table)."""
    table = EDITED / "batches.parquet"
    if table.exists():
        counts = pl.read_parquet(table).sort("batch")["n_facts"].to_list()
        if len(counts) == n_batches:
            out, total = [], 0
            for c in counts:
                total += int(c)
                out.append(total)
            return out
    size = -(-n_facts // max(n_batches, 1))
    return [min((b + 1) * size, n_facts) for b in range(n_batches)]


@torch.no_grad()
def replay_curve(
    model: nn.Module, tok: PreTrainedTokenizerBase, df: pl.DataFrame, p: Params
) -> tuple[list[dict[str, Any]], dict[int, Tensor]]:
    """Write the stored batches into the (original) model one by one; rewrite metrics of ALL facts
    after every `curve_every`-th batch and after the last. Returns the points and the replayed
    weights of the touched layers (to check them against the saved edited model)."""
    deltas = load_deltas(EDITED)
    adapter = ModelAdapter(model)
    cumulative = facts_per_batch(len(deltas), df.height)
    points = []
    for b, changes in enumerate(deltas):
        put_columns(adapter, changes, "new")
        if (b + 1) % p.evaluate.curve_every == 0 or b == len(deltas) - 1:
            t = time.perf_counter()
            point = summarise(fact_metrics(model, tok, df, p.evaluate.batch_size))
            points.append({"batch": b + 1, "facts_edited": cumulative[b], **point})
            print(f"evaluate curve: after batch {b + 1} ({cumulative[b]} facts) " + _fmt(point) + f" [{time.perf_counter() - t:.1f} s]")
    touched = {l for changes in deltas for l in changes}
    return points, {l: adapter.w_out_weight(l).detach().clone() for l in touched}


def max_weight_diff(model: nn.Module, replayed: dict[int, Tensor]) -> float:
    adapter = ModelAdapter(model)
    return max((float((adapter.w_out_weight(l) - w).abs().max()) for l, w in replayed.items()), default=0.0)


# ---------------------------------------------------------------------------------------------
# Reporting


def _fmt(summary: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if isinstance(v, float))


def _round(x: Any, digits: int = 4) -> Any:
    if isinstance(x, float):
        return round(x, digits)
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [_round(v, digits) for v in x]
    return x


def metric_rows(results: dict[str, dict[str, Any]], approximate: bool | None) -> list[tuple[str, Any, Any]]:
    """(label, pre, post) for every reported metric, in report order."""
    pre, post = results["pre"], results["post"]
    rows = [(m, pre[m], post[m]) for m in (*REWRITE_METRICS, "score")]
    rows.append(("fluency (n-gram entropy ×100)", pre["fluency"], post["fluency"]))
    rows.append((f"consistency (TF-IDF cosine{', ' + APPROX if approximate else ''})", pre["consistency"], post["consistency"]))
    for task, m in pre["general"].items():
        for key in ("accuracy", "f1", "mcc"):
            if key in m:
                label = "macro-F1" if key == "f1" and task == "mmlu" else key
                rows.append((f"{task} {label} (n={m['n']})", m[key], post["general"][task][key]))
    rows.append((f"perplexity, WikiText-2 ({pre['perplexity_tokens']} tokens)", pre["perplexity"], post["perplexity"]))
    return rows


def _cell(x: Any) -> str:
    if x is None:
        return "n/a"
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}"


def render_summary(p: Params, df: pl.DataFrame, meta: dict[str, Any], results: dict[str, dict[str, Any]],
                   approximate: bool | None, seconds: dict[str, dict[str, float]], curve: list[dict[str, Any]],
                   replay_diff: float | None) -> str:
    lines = [f"# Evaluation: {p.method} on {df.height} facts ({family_of(df)})", ""]
    lines += [
        f"- model: `{p.model.name}` (pre) vs `{EDITED / 'model'}` (post), seed {p.model.seed}",
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
    lines.append(
        f"- evaluation: general ability on the first {e.n_general or 'all'} examples of {', '.join(e.general_tasks)}; "
        f"perplexity {e.ppl_tokens} tokens in windows of {e.ppl_window}; {e.gen_per_fact} generation prompt(s) per fact, "
        f"{e.gen_max_new_tokens} new tokens, top-k {e.gen_top_k}, seed {e.seed}"
    )
    if approximate:
        lines += ["", f"**Consistency is {APPROX}**: no MEMIT attribute snippets / IDF files were given (or not for every fact), "
                  "so the references are Wikipedia lead paragraphs about or mentioning the new object and the IDF table "
                  "comes from that corpus (see ece/eval/generation.py). Compare pre with post; do not compare with published numbers."]
    lines += ["", "| metric | pre | post | Δ (post − pre) |", "|---|---:|---:|---:|"]
    for label, a, b in metric_rows(results, approximate):
        delta = _cell(b - a) if a is not None and b is not None else "n/a"
        lines.append(f"| {label} | {_cell(a)} | {_cell(b)} | {delta} |")
    if len(curve) > 2 or e.curve_every:
        lines += ["", f"## Curve (rewrite metrics of all {df.height} facts; curve_every = {e.curve_every})", "",
                  "| facts edited | efficacy | generalization | specificity | score |", "|---:|---:|---:|---:|---:|"]
        for pt in curve:
            lines.append(f"| {pt['facts_edited']} | " + " | ".join(_cell(pt[m]) for m in (*REWRITE_METRICS, "score")) + " |")
        if replay_diff is not None:
            lines.append(f"\nReplayed deltas vs saved edited model: max |ΔW| = {replay_diff:.3g} on the edited layers.")
    lines += ["", "## Evaluation time (seconds)", "", "| part | pre | post |", "|---|---:|---:|"]
    for part in seconds["pre"]:
        lines.append(f"| {part} | {seconds['pre'][part]:.1f} | {seconds['post'].get(part, 0.0):.1f} |")
    lines += ["", "Per-fact results: `reports/per_fact.parquet`; plots: `reports/plots/`.", ""]
    return "\n".join(lines)


def plot_metrics(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
            bars = ax.bar([x + offset for x in xs], [v if v is not None else 0 for v in vals], 0.4, label=phase, color=color)
            for bar, v in zip(bars, vals):
                ax.annotate("n/a" if v is None else f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.set_xticks(xs, names)
        ax.set_ylim(0, 1.25)
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("share of facts / accuracy")
    axes[0].legend(loc="upper left", ncol=2)
    fig.suptitle("Pre vs post editing")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_curve(curve: list[dict[str, Any]], curve_every: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    xs = [pt["facts_edited"] for pt in curve]
    styles = {"efficacy": "o-", "generalization": "s--", "specificity": "^-", "score": "D:"}  # equal values stay visible
    for m in (*REWRITE_METRICS, "score"):
        ax.plot(xs, [pt[m] if pt[m] is not None else float("nan") for pt in curve], styles.get(m, "o-"), label=m,
                markersize=7 if m == "efficacy" else 5)
    ax.set_xlabel("facts edited (sequential batches)")
    ax.set_ylabel("metric over ALL facts")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    note = f"after every {curve_every} batch(es)" if curve_every else "curve_every = 0: pre and post only"
    ax.set_title(f"Rewrite metrics while editing ({note})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def main(p: Params) -> None:
    e = p.evaluate
    if e.threads > 0:
        torch.set_num_threads(e.threads)
    torch.manual_seed(e.seed)
    df, _ = read_facts()
    meta = json.loads(Path("artifacts/prepared/meta.json").read_text())
    refs = None
    has_prompts = e.gen_per_fact > 0 and any(g for g in df["generation_prompts"].to_list())
    if has_prompts:
        t = time.perf_counter()
        refs = fact_references(
            df["target_new"].to_list(), df["id"].to_list(), e.reference_corpus, e.reference_articles,
            e.attribute_snippets, e.idf, e.tfidf_vocab, meta.get("source", {}).get("path"),
        )
        print(f"evaluate: consistency references in {time.perf_counter() - t:.1f} s "
              f"({sum(s is not None for s in refs.sources)}/{df.height} facts have one{', ' + APPROX if refs.approximate else ''})")
    approximate = refs.approximate if refs is not None else None

    results: dict[str, dict[str, Any]] = {}
    seconds: dict[str, dict[str, float]] = {}
    tables = []
    curve: list[dict[str, Any]] = []
    replayed: dict[int, Tensor] = {}
    replay_diff: float | None = None
    for phase, name in (("pre", p.model.name), ("post", str(EDITED / "model"))):
        model, tok = load_model(name, p.model.seed)
        measure = evaluate_pre if phase == "pre" else evaluate_model
        results[phase], per_fact, seconds[phase] = measure(model, tok, df, p, refs)
        tables.append(per_fact.with_columns(
            pl.lit(phase).alias("phase"),
            pl.Series("consistency_reference", refs.sources if refs else [None] * df.height, dtype=pl.Utf8),
        ))
        print(f"evaluate {phase}: " + _fmt(results[phase]) + " | seconds " + _fmt(seconds[phase]))
        if phase == "pre":
            curve.append({"batch": 0, "facts_edited": 0, **{m: results["pre"][m] for m in (*REWRITE_METRICS, "score")}})
            if e.curve_every > 0:
                t = time.perf_counter()
                points, replayed = replay_curve(model, tok, df, p)
                curve += points
                seconds["pre"]["curve"] = time.perf_counter() - t
        elif replayed:
            replay_diff = max_weight_diff(model, replayed)
            print(f"evaluate curve: replayed weights vs saved edited model, max |ΔW| = {replay_diff:.3g}")
        del model
    if e.curve_every == 0:
        n_batches = len(delta_files(EDITED))
        curve.append({"batch": n_batches, "facts_edited": df.height, **{m: results["post"][m] for m in (*REWRITE_METRICS, "score")}})

    with atomic_path(PER_FACT) as tmp:
        pl.concat(tables).write_parquet(tmp)
    write_json(METRICS, {
        "method": p.method, "n_facts": df.height, "family": family_of(df), "dataset_hash": meta["dataset_hash"],
        "consistency_approximate": approximate,
        **{phase: _round(r) for phase, r in results.items()},
        "seconds": _round(seconds, 1),
        **({"curve_replay_max_abs_diff": replay_diff} if replay_diff is not None else {}),
    })
    write_json(CURVE, _round(curve))
    write_text(SUMMARY, render_summary(p, df, meta, results, approximate, seconds, curve, replay_diff))
    plot_metrics(results, PLOTS / "metrics.png")
    plot_curve(curve, e.curve_every, PLOTS / "curve.png")


if __name__ == "__main__":
    run_stage(main)
