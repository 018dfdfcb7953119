"""Rewrite metrics of an edit: efficacy, generalization, specificity (SPEC "Evaluation protocol").

Two families, chosen by what a fact carries:
- comparison (CounterFact, or any fact with target_true): [P(new) > P(true)] on the edit prompt and
  its paraphrases, [P(true) > P(new)] on neighbourhood prompts, P the mean per-token probability;
- accuracy (zsRE, or facts without target_true): teacher-forced top-1 token accuracy of target_new on
  the prompt and paraphrases, and of the neighbourhood's own answer on the neighbourhood prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import harmonic_mean

import polars as pl
from torch import nn
from transformers import PreTrainedTokenizerBase

from ece.scoring import continuation_scores

REWRITE_METRICS = ("efficacy", "generalization", "specificity")


@dataclass(frozen=True)
class Query:
    """One scored continuation, tagged with the fact and metric it feeds."""

    fact: int
    metric: str
    text: str
    target: str


def _fill(prompt: str, subject: str) -> str:
    return prompt.replace("{}", subject, 1)


def queries(df: pl.DataFrame, family: str) -> list[Query]:
    """Every (text, continuation) pair the metrics of `family` need, for every fact."""
    out: list[Query] = []
    for i, r in enumerate(df.iter_rows(named=True)):
        prompts = {
            "efficacy": [_fill(r["prompt"], r["subject"])],
            "generalization": list(r["paraphrase_prompts"] or []),
            "specificity": list(r["neighborhood_prompts"] or []),
        }
        neighbour_answer = r["neighborhood_target"] or r["target_true"]
        for metric, texts in prompts.items():
            for text in texts:
                if family == "comparison":
                    wanted, unwanted = (
                        (neighbour_answer, r["target_new"]) if metric == "specificity" else (r["target_new"], r["target_true"])
                    )
                    out.append(Query(i, metric, text, wanted))
                    out.append(Query(i, metric, text, unwanted))
                elif metric == "specificity":
                    if neighbour_answer:
                        out.append(Query(i, metric, text, neighbour_answer))
                else:
                    out.append(Query(i, metric, text, r["target_new"]))
    return out


def family_of(df: pl.DataFrame) -> str:
    return "comparison" if df["target_true"].null_count() == 0 else "accuracy"


def fact_metrics(model: nn.Module, tok: PreTrainedTokenizerBase, df: pl.DataFrame, batch_size: int = 32) -> pl.DataFrame:
    """Per-fact efficacy / generalization / specificity (null where a fact has no such prompt)."""
    family = family_of(df)
    qs = queries(df, family)
    logprob, accuracy = continuation_scores(model, tok, [q.text for q in qs], [q.target for q in qs], batch_size)
    per: dict[tuple[int, str], list[float]] = {}
    if family == "comparison":
        # queries come in pairs: (wanted, unwanted) — the first must be the more probable
        for j in range(0, len(qs), 2):
            q = qs[j]
            per.setdefault((q.fact, q.metric), []).append(float(logprob[j] > logprob[j + 1]))
    else:
        for j, q in enumerate(qs):
            per.setdefault((q.fact, q.metric), []).append(float(accuracy[j]))
    rows = []
    for i, fid in enumerate(df["id"].to_list()):
        row = {"id": fid}
        for m in REWRITE_METRICS:
            vals = per.get((i, m))
            row[m] = sum(vals) / len(vals) if vals else None
        rows.append(row)
    return pl.DataFrame(rows, schema={"id": pl.Utf8, **{m: pl.Float64 for m in REWRITE_METRICS}})


def summarise(per_fact: pl.DataFrame) -> dict[str, float | None]:
    """Means over facts, and the harmonic-mean score of the three when all are defined."""
    out: dict[str, float | None] = {m: per_fact[m].mean() for m in REWRITE_METRICS}  # type: ignore[misc]
    vals = [out[m] for m in REWRITE_METRICS]
    out["score"] = harmonic_mean(vals) if all(v is not None for v in vals) else None  # type: ignore[arg-type]
    return out
