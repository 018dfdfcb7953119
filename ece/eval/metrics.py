"""Rewrite metrics of an edit: efficacy, generalization, specificity (SPEC "Evaluation protocol").

Two families, as in the papers that introduced each dataset's protocol:
- comparison (CounterFact): [P(new) > P(true)] on the edit prompt and its paraphrases,
  [P(neighbour's answer) > P(new)] on the neighbourhood prompts, P the mean per-token probability;
- accuracy (zsRE, MEMIT's metric): teacher-forced token accuracy, the share of a target's tokens that
  are the argmax given the prompt and the earlier target tokens: target_new on the edit prompt and the
  paraphrases, the neighbourhood's own answer (`neighborhood_target`, zsRE's loc_ans) on the
  neighbourhood prompts.

The family is decided per fact from what the data is (`families`): every fact of a table read as zsRE
(the format in its `source` column) is scored by accuracy, although it carries zsRE's original answer
in target_true (kept for validation and the audit trail, not a rival to compare with: zsRE was never
scored that way). Any other fact is scored by comparison when it has a target_true and by accuracy
when it has none, since there is nothing to compare with. A user's table can therefore mix the two:
each fact is scored by its own family (the per-fact table's `family` column), the means in `summarise`
average both kinds of hit, and `family_of` names the table "mixed" so that no report hides it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from statistics import harmonic_mean

import polars as pl
from torch import nn
from transformers import PreTrainedTokenizerBase

from ece.data.loaders import source_format
from ece.eval.scoring import Router, continuation_scores

REWRITE_METRICS = ("efficacy", "generalization", "specificity")
COMPARISON, ACCURACY = "comparison", "accuracy"
ACCURACY_FORMATS = frozenset({"zsre"})  # dataset formats whose protocol is token accuracy throughout


@dataclass(frozen=True)
class Query:
    """One scored continuation, tagged with the fact and metric it feeds."""

    fact: int
    metric: str
    text: str
    target: str


def _fill(prompt: str, subject: str) -> str:
    return prompt.replace("{}", subject, 1)


def families(df: pl.DataFrame) -> list[str]:
    """The metric family of every fact (see the module docstring for the rule and why)."""
    if df.height and source_format(df) in ACCURACY_FORMATS:
        return [ACCURACY] * df.height
    return [COMPARISON if true is not None else ACCURACY for true in df["target_true"].to_list()]


def family_of(df: pl.DataFrame) -> str:
    """The family of the whole table for reports: one name, or "mixed (n comparison, m accuracy)"."""
    counts = Counter(families(df))
    if len(counts) == 1:
        return next(iter(counts))
    return "mixed (" + ", ".join(f"{counts[f]} {f}" for f in (COMPARISON, ACCURACY)) + ")"


def queries(df: pl.DataFrame, fams: list[str]) -> list[Query]:
    """Every (text, continuation) the metrics need, fact by fact, `fams[i]` the family of fact i.

    A comparison fact gives a (wanted, unwanted) pair of queries per prompt; an accuracy fact one query
    per prompt, and none on neighbourhood prompts without their own answer (target_true is another
    question's answer there).
    """
    out: list[Query] = []
    for i, r in enumerate(df.iter_rows(named=True)):
        prompts = {
            "efficacy": [_fill(r["prompt"], r["subject"])],
            "generalization": list(r["paraphrase_prompts"] or []),
            "specificity": list(r["neighborhood_prompts"] or []),
        }
        for metric, texts in prompts.items():
            for text in texts:
                if fams[i] == COMPARISON:
                    # CounterFact's neighbours share the true object unless the data names their own answer
                    neighbour_answer = r["neighborhood_target"] or r["target_true"]
                    wanted, unwanted = (
                        (neighbour_answer, r["target_new"])
                        if metric == "specificity"
                        else (r["target_new"], r["target_true"])
                    )
                    out.append(Query(i, metric, text, wanted))
                    out.append(Query(i, metric, text, unwanted))
                elif metric == "specificity":
                    if r["neighborhood_target"]:
                        out.append(Query(i, metric, text, r["neighborhood_target"]))
                else:
                    out.append(Query(i, metric, text, r["target_new"]))
    return out


def fact_metrics(
    model: nn.Module, tok: PreTrainedTokenizerBase, df: pl.DataFrame, batch_size: int = 32, router: Router | None = None
) -> pl.DataFrame:
    """Per-fact efficacy / generalization / specificity (null where a fact has no such prompt) and the
    family each fact was scored with; `router`: the model answers through an edit memory (SERAC)."""
    fams = families(df)
    qs = queries(df, fams)
    texts, targets = [q.text for q in qs], [q.target for q in qs]
    logprob, accuracy = continuation_scores(model, tok, texts, targets, batch_size, router)
    per: dict[tuple[int, str], list[float]] = {}
    j = 0
    while j < len(qs):
        q = qs[j]
        if fams[q.fact] == COMPARISON:  # a (wanted, unwanted) pair: the first must be the more probable
            hit, j = float(logprob[j] > logprob[j + 1]), j + 2
        else:
            hit, j = float(accuracy[j]), j + 1
        per.setdefault((q.fact, q.metric), []).append(hit)
    rows = []
    for i, fid in enumerate(df["id"].to_list()):
        row: dict[str, str | float | None] = {"id": fid, "family": fams[i]}
        for m in REWRITE_METRICS:
            vals = per.get((i, m))
            row[m] = sum(vals) / len(vals) if vals else None
        rows.append(row)
    return pl.DataFrame(rows, schema={"id": pl.Utf8, "family": pl.Utf8, **{m: pl.Float64 for m in REWRITE_METRICS}})


def summarise(per_fact: pl.DataFrame) -> dict[str, float | None]:
    """Means over facts, and the harmonic-mean score of the three when all are defined."""
    out: dict[str, float | None] = {m: per_fact[m].mean() for m in REWRITE_METRICS}  # type: ignore[misc]
    vals = [out[m] for m in REWRITE_METRICS]
    out["score"] = harmonic_mean(vals) if all(v is not None for v in vals) else None  # type: ignore[arg-type]
    return out
