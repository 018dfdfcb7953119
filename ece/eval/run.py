"""The evaluation run: the unedited and the edited model on ALL edited facts, after the last batch.

Both models are scored in the same run with the same code, so "pre" and "post" differ only in the
weights. Per model ("phase"):
- rewrite metrics of every fact (ece.eval.metrics: efficacy, generalization, specificity, score);
- fluency and consistency of sampled generations (ece.eval.generation; CounterFact-style facts with
  generation prompts only, null otherwise; at most `evaluate.gen_facts` facts spread evenly over them,
  null for the others). Without MEMIT's reference files consistency is
  APPROXIMATE (Wikipedia references; `consistency_approximate` in the metrics);
- general ability (ece.eval.general_ability: zero-shot SST-2, MRPC, CoLA, RTE, NLI, MMLU) and perplexity on
  WikiText-2 test.
With `evaluate.curve_every = j > 0` the rewrite metrics of all facts are also measured after every j-th
batch (and the last), by replaying the stored per-batch column changes
(<edited>/delta-batch-XXXX.safetensors: W[:, cols] = new, batch after batch) onto the original
weights; the curve always holds the pre point (0 facts edited) and the post point.

The unedited model's results are cached in $ECE_SCRATCH/evaluate_pre/ (default .cache/) under a key of the model fingerprint,
the facts, the evaluation params, the contents of the data files they name and the code this module
runs (machine-local scratch, like the apply_edits checkpoint): comparing methods on the same facts
measures "pre" once.

Under torchrun (ece.model.distributed) every process runs this with the same facts; the forward batches
are shared out and the numbers are those of one process (tests/pipeline/test_distributed.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ece.artifacts import SCRATCH
from ece.audit.ledger import delta_files, load_deltas, put_columns
from ece.config import EvaluateCfg, Params
from ece.data.codehash import code_hash
from ece.data.io import atomic_dir, sha256_json, sha256_tree, write_json
from ece.editing.serac import ROUTING_SCHEMA, MemoryRouter, open_router
from ece.eval.general_ability import general_ability, perplexity, read_tokens
from ece.eval.generation import References, fact_references, generation_metrics, spread
from ece.eval.metrics import REWRITE_METRICS, fact_metrics, family_of, summarise
from ece.eval.report import APPROX, fmt_floats, render_summary, round_floats
from ece.eval.scoring import Router
from ece.methods import REGISTRY
from ece.model import distributed
from ece.model.adapter import ModelAdapter
from ece.model.loading import load_for, model_fingerprint

PRE_CACHE = SCRATCH / "evaluate_pre"
# evaluate params that name data files or folders: the pre-evaluation key holds their contents
DATA_PARAMS = ("general_dir", "ppl_corpus", "reference_corpus", "attribute_snippets", "idf", "tfidf_vocab")


@dataclass
class Evaluation:
    """What one evaluation run found; the caller decides where it goes."""

    metrics: dict[str, Any]  # JSON-ready, floats rounded: reports/metrics.json
    results: dict[str, dict[str, Any]]  # "pre"/"post" -> every summary metric at full precision
    per_fact: pl.DataFrame  # one row per fact and phase
    curve: list[dict[str, Any]]  # after 0 facts, every curve_every-th batch and the last; full precision
    seconds: dict[str, dict[str, float]]  # per phase and part
    summary: str  # the markdown report
    routing: pl.DataFrame  # a memory method (SERAC): per text of the post phase, the memory entry that answered it


def evaluate_model(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    df: pl.DataFrame,
    p: Params,
    refs: References | None,
    router: Router | None = None,
) -> tuple[dict[str, Any], pl.DataFrame, dict[str, float]]:
    """Every metric of one model: (summary, per-fact table, seconds per part). With `router` the model
    answers through an edit memory (SERAC): every prompt, generation prompt, general-ability prompt and
    perplexity window is routed, and read after the context the router gives it.

    Under torchrun the forward batches of the rewrite metrics, general ability and perplexity are shared
    out (ece.model.distributed), the generations' batches too (each prompt samples from its own random
    stream, so the texts are those of one process)."""
    e = p.evaluate
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    per_fact = fact_metrics(model, tok, df, e.batch_size, router)
    summary: dict[str, Any] = summarise(per_fact)
    seconds["rewrite"] = time.perf_counter() - t

    t = time.perf_counter()
    sampled = set(spread(df.height, e.gen_facts))
    prompts = [
        list(g or [])[: e.gen_per_fact] if i in sampled else []
        for i, g in enumerate(df["generation_prompts"].to_list())
    ]
    if refs is not None and any(prompts):
        flu, con, gens = generation_metrics(
            model, tok, prompts, refs, e.gen_max_new_tokens, e.gen_top_k, e.seed, e.gen_batch_size, router
        )
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
    summary["general"] = general_ability(
        model, tok, e.general_dir, list(e.general_tasks), e.n_general, e.batch_size, router
    )
    seconds["general"] = time.perf_counter() - t

    t = time.perf_counter()
    ids = read_tokens(tok, e.ppl_corpus, e.ppl_tokens)
    summary["perplexity"] = perplexity(model, tok, ids, e.ppl_window, max(1, e.batch_size // 4), router)
    summary["perplexity_tokens"] = len(ids)
    seconds["perplexity"] = time.perf_counter() - t
    return summary, per_fact, seconds


def evaluate_pre(
    model: nn.Module, tok: PreTrainedTokenizerBase, df: pl.DataFrame, p: Params, refs: References | None
) -> tuple[dict[str, Any], pl.DataFrame, dict[str, float]]:
    """`evaluate_model` of the unedited model, reused when nothing it depends on changed.

    The code part of the key is the import closure of this module, so it covers every function the
    measurement runs (and the report code beside it: a change there costs one re-measurement, never a
    stale result). Under torchrun rank 0 alone reads and writes the cache and sends what it read to the
    others, so all processes take the same path even where each machine has its own scratch folder."""
    settings = {k: v for k, v in asdict(p.evaluate).items() if k not in ("threads", "curve_every", *DATA_PARAMS)}
    data = {k: sha256_tree(v) if v is not None else None for k, v in asdict(p.evaluate).items() if k in DATA_PARAMS}
    key = sha256_json(
        {
            "model": model_fingerprint(model),
            "facts": df.select("id", "content_hash").rows(),
            "settings": settings,
            "data": data,
            "code": code_hash(__file__),
        }
    )
    folder = PRE_CACHE / key[:32]
    if distributed.from_rank((folder / "summary.json").exists(), 0):
        print(f"evaluate pre: reusing {folder}")
        return distributed.from_rank(
            (
                json.loads((folder / "summary.json").read_text()),
                pl.read_parquet(folder / "per_fact.parquet"),
                json.loads((folder / "seconds.json").read_text()),
            )
            if distributed.is_main()
            else None,
            0,
        )
    summary, per_fact, seconds = evaluate_model(model, tok, df, p, refs)
    if distributed.is_main():
        with atomic_dir(folder) as tmp:
            write_json(tmp / "summary.json", summary)
            per_fact.write_parquet(tmp / "per_fact.parquet")
            write_json(tmp / "seconds.json", seconds)
    return summary, per_fact, seconds


def facts_per_batch(edited_dir: Path, n_batches: int, n_facts: int) -> list[int]:
    """Cumulative number of facts written after each batch (from apply_edits' batch table); equal
    batches of the facts when the table is missing or does not match the deltas."""
    table = edited_dir / "batches.parquet"
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
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    df: pl.DataFrame,
    p: Params,
    edited_dir: Path,
    router: MemoryRouter | None = None,
) -> tuple[list[dict[str, Any]], dict[int, Tensor]]:
    """Write the stored batches into the (original) model one by one; rewrite metrics of ALL facts
    after every `curve_every`-th batch and after the last (a memory method: through its memory as it
    stood after that batch). Returns the points and the replayed weights of the touched layers (to check
    them against the saved edited model)."""
    deltas = load_deltas(edited_dir)
    adapter = ModelAdapter(model)
    cumulative = facts_per_batch(edited_dir, len(deltas), df.height)
    points = []
    for b, changes in enumerate(deltas):
        put_columns(adapter, changes, "new")
        if (b + 1) % p.evaluate.curve_every == 0 or b == len(deltas) - 1:
            t = time.perf_counter()
            at = router.upto(b) if router is not None else None
            point = summarise(fact_metrics(model, tok, df, p.evaluate.batch_size, at))
            points.append({"batch": b + 1, "facts_edited": cumulative[b], **point})
            print(
                f"evaluate curve: after batch {b + 1} ({cumulative[b]} facts) "
                + fmt_floats(point)
                + f" [{time.perf_counter() - t:.1f} s]"
            )
    touched = {l for changes in deltas for l in changes}
    return points, {l: adapter.w_out_weight(l).detach().clone() for l in touched}


def max_weight_diff(model: nn.Module, replayed: dict[int, Tensor]) -> float:
    """Largest |ΔW| between `model`'s W_out and the replayed weights: 0 when the deltas rebuild the saved model."""
    adapter = ModelAdapter(model)
    return max((float((adapter.w_out_weight(l) - w).abs().max()) for l, w in replayed.items()), default=0.0)


def consistency_references(e: EvaluateCfg, df: pl.DataFrame, dataset: str | Path | None) -> References:
    """The consistency references of the facts `df` as `e` configures them (`dataset`: the edit file they
    came from, where MEMIT's snippets are looked up by its relation and target ids)."""
    return fact_references(
        df["target_new"].to_list(),
        df["id"].to_list(),
        e.reference_corpus,
        e.reference_articles,
        e.attribute_snippets,
        e.idf,
        e.tfidf_vocab,
        dataset,
    )


def run_evaluation(p: Params, df: pl.DataFrame, meta: dict[str, Any], edited_dir: Path) -> Evaluation:
    """Pre (`p.model.name`) vs post (`edited_dir`/model) on the prepared facts `df` (`meta`: their
    prepare metadata), with the curve and the consistency references; writes nothing but the pre cache."""
    e = p.evaluate
    if e.threads > 0:
        torch.set_num_threads(e.threads)
    torch.manual_seed(e.seed)
    refs = None
    has_prompts = e.gen_per_fact > 0 and any(g for g in df["generation_prompts"].to_list())
    if has_prompts:
        t = time.perf_counter()
        refs = consistency_references(e, df, meta.get("source", {}).get("path"))
        print(
            f"evaluate: consistency references in {time.perf_counter() - t:.1f} s "
            f"({sum(s is not None for s in refs.sources)}/{df.height} facts have one{', ' + APPROX if refs.approximate else ''})"
        )
    approximate = refs.approximate if refs is not None else None

    results: dict[str, dict[str, Any]] = {}
    seconds: dict[str, dict[str, float]] = {}
    tables = []
    curve: list[dict[str, Any]] = []
    replayed: dict[int, Tensor] = {}
    replay_diff: float | None = None
    memory = REGISTRY[p.method].memory  # the edited model answers through an edit memory (SERAC)
    router: MemoryRouter | None = None
    for phase, name in (("pre", p.model.name), ("post", str(edited_dir / "model"))):
        model, tok = load_for(p, name)
        if phase == "pre":
            results[phase], per_fact, seconds[phase] = evaluate_pre(model, tok, df, p, refs)
        else:
            router = open_router(edited_dir / "model", model, tok) if memory else None
            results[phase], per_fact, seconds[phase] = evaluate_model(model, tok, df, p, refs, router)
        tables.append(
            per_fact.with_columns(
                pl.lit(phase).alias("phase"),
                pl.Series("consistency_reference", refs.sources if refs else [None] * df.height, dtype=pl.Utf8),
            )
        )
        print(f"evaluate {phase}: " + fmt_floats(results[phase]) + " | seconds " + fmt_floats(seconds[phase]))
        if phase == "pre":
            curve.append({"batch": 0, "facts_edited": 0, **{m: results["pre"][m] for m in (*REWRITE_METRICS, "score")}})
            if e.curve_every > 0:
                t = time.perf_counter()
                curve_router = open_router(edited_dir / "model", model, tok) if memory else None
                points, replayed = replay_curve(model, tok, df, p, edited_dir, curve_router)
                curve += points
                seconds["pre"]["curve"] = time.perf_counter() - t
        elif replayed:
            replay_diff = max_weight_diff(model, replayed)
            print(f"evaluate curve: replayed weights vs saved edited model, max |ΔW| = {replay_diff:.3g}")
        del model
    if e.curve_every == 0:
        n_batches = len(delta_files(edited_dir))
        curve.append(
            {
                "batch": n_batches,
                "facts_edited": df.height,
                **{m: results["post"][m] for m in (*REWRITE_METRICS, "score")},
            }
        )

    metrics = {
        "method": p.method,
        "n_facts": df.height,
        "family": family_of(df),
        "dataset_hash": meta["dataset_hash"],
        "consistency_approximate": approximate,
        **{phase: round_floats(r) for phase, r in results.items()},
        "seconds": round_floats(seconds, 1),
        **({"curve_replay_max_abs_diff": replay_diff} if replay_diff is not None else {}),
    }
    summary = render_summary(p, df, meta, edited_dir, results, approximate, seconds, curve, replay_diff)
    routing = router.routing() if router is not None else pl.DataFrame(schema=ROUTING_SCHEMA)
    if router is not None:
        answered = routing["memory_id"].is_not_null().sum()
        print(f"evaluate post: {answered} of {routing.height} distinct texts answered from the edit memory")
    return Evaluation(metrics, results, pl.concat(tables), curve, seconds, summary, routing)
