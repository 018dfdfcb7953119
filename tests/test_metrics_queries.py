"""Which continuation each rewrite metric wants to win: a swapped pair silently inverts a metric."""

from __future__ import annotations

import polars as pl

from ece.metrics import queries


def facts(neighborhood_target: str | None) -> pl.DataFrame:
    return pl.DataFrame([{
        "id": "f0", "subject": "Paris", "prompt": "{} is the capital of", "target_new": "Italy",
        "target_true": "France", "paraphrase_prompts": ["The capital city of France is Paris, of"],
        "neighborhood_prompts": ["Lyon is a city in"], "neighborhood_target": neighborhood_target,
    }])


def pairs(df: pl.DataFrame) -> dict[str, tuple[str, str, str]]:
    qs = queries(df, "comparison")
    return {qs[j].metric: (qs[j].text, qs[j].target, qs[j + 1].target) for j in range(0, len(qs), 2)}


def test_efficacy_and_generalization_want_the_new_object() -> None:
    p = pairs(facts(None))
    assert p["efficacy"] == ("Paris is the capital of", "Italy", "France")
    assert p["generalization"][1:] == ("Italy", "France")


def test_specificity_wants_the_neighbourhood_answer_over_the_new_object() -> None:
    assert pairs(facts(None))["specificity"] == ("Lyon is a city in", "France", "Italy")
    assert pairs(facts("Europe"))["specificity"] == ("Lyon is a city in", "Europe", "Italy")


def test_accuracy_family_scores_target_new_and_the_neighbourhood_answer() -> None:
    qs = queries(facts("Europe"), "accuracy")
    assert [(q.metric, q.target) for q in qs] == [
        ("efficacy", "Italy"), ("generalization", "Italy"), ("specificity", "Europe"),
    ]
