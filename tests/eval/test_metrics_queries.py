"""Which continuation each rewrite metric wants to win, and which family scores a fact: a swapped pair
silently inverts a metric, a wrong family silently measures something else."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from ece.config import DataCfg
from ece.data.loaders import load_edits
from ece.eval.metrics import families, family_of, queries

ROOT = Path(__file__).resolve().parents[2]
ZSRE = ROOT / "data/zsre/zsre_mem_eval_837.json"
COMPACT = ROOT / "data/counterfact/counterfact_compact_0-19999.json"
MEMIT_RECORD = {
    "case_id": 7,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": {"str": "English"},
        "target_true": {"str": "French"},
    },
    "paraphrase_prompts": ["Danielle Darrieux spoke the language"],
    "neighborhood_prompts": ["The mother tongue of Michel Rocard is"],
    "generation_prompts": [],
}


def facts(neighborhood_target: str | None) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "id": "f0",
                "subject": "Paris",
                "prompt": "{} is the capital of",
                "target_new": "Italy",
                "target_true": "France",
                "paraphrase_prompts": ["The capital city of France is Paris, of"],
                "neighborhood_prompts": ["Lyon is a city in"],
                "neighborhood_target": neighborhood_target,
            }
        ]
    )


def pairs(df: pl.DataFrame) -> dict[str, tuple[str, str, str]]:
    qs = queries(df, ["comparison"])
    return {qs[j].metric: (qs[j].text, qs[j].target, qs[j + 1].target) for j in range(0, len(qs), 2)}


def load(path: Path, n_facts: int = 0) -> pl.DataFrame:
    return load_edits(DataCfg(edit_dataset=str(path), n_facts=n_facts))


def test_efficacy_and_generalization_want_the_new_object() -> None:
    p = pairs(facts(None))
    assert p["efficacy"] == ("Paris is the capital of", "Italy", "France")
    assert p["generalization"][1:] == ("Italy", "France")


def test_specificity_wants_the_neighbourhood_answer_over_the_new_object() -> None:
    assert pairs(facts(None))["specificity"] == ("Lyon is a city in", "France", "Italy")
    assert pairs(facts("Europe"))["specificity"] == ("Lyon is a city in", "Europe", "Italy")


def test_accuracy_family_scores_target_new_and_the_neighbourhood_answer() -> None:
    qs = queries(facts("Europe"), ["accuracy"])
    assert [(q.metric, q.target) for q in qs] == [
        ("efficacy", "Italy"),
        ("generalization", "Italy"),
        ("specificity", "Europe"),
    ]


def test_accuracy_family_never_scores_neighbours_with_target_true() -> None:
    """target_true answers the edit prompt, not the neighbour's question: without its own answer a
    neighbourhood prompt is not scored."""
    assert [q.metric for q in queries(facts(None), ["accuracy"])] == ["efficacy", "generalization"]


def test_zsre_is_scored_by_accuracy() -> None:
    df = load(ZSRE, n_facts=3)
    assert families(df) == ["accuracy"] * 3 and family_of(df) == "accuracy"
    assert [(q.metric, q.text, q.target) for q in queries(df.head(1), families(df))] == [
        ("efficacy", "When was the inception of IAAF Combined Events Challenge?", "1998"),
        ("generalization", "When was the IAAF Combined Events Challenge launched?", "1998"),
        ("specificity", "nq question: what is the name of the last episode of spongebob?", "The String"),
    ]  # MEMIT's zsRE: the edit writes answers[0]; specificity is loc + "?" with its loc_ans


def test_counterfact_shapes_are_scored_by_comparison(tmp_path: Path) -> None:
    memit = tmp_path / "multi_counterfact.json"
    memit.write_text(json.dumps([MEMIT_RECORD]))
    for df in (load(memit), load(COMPACT, n_facts=3)):
        assert set(families(df)) == {"comparison"} and family_of(df) == "comparison"


def test_own_facts_are_scored_per_fact_and_a_mixed_table_says_so(tmp_path: Path) -> None:
    path = tmp_path / "facts.jsonl"
    rows = [
        {"subject": "Ada Lovelace", "prompt": "{} was born in", "target_new": "Paris", "target_true": "London"},
        {"subject": "Alan Turing", "prompt": "{} worked in", "target_new": "Berlin"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    df = load(path)
    assert families(df) == ["comparison", "accuracy"]
    assert family_of(df) == "mixed (1 comparison, 1 accuracy)"
    assert [(q.fact, q.target) for q in queries(df, families(df))] == [(0, "Paris"), (0, "London"), (1, "Berlin")]
