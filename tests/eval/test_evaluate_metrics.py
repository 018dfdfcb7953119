"""Rewrite metrics (ece.eval.metrics) and the `evaluate` stage end to end on a tiny model."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from eval_project import ROOT, STAGE_OVERRIDES, build_eval_project, facts_table, load_evaluate_stage
from torch import nn

import ece.eval.metrics
from ece.config import load_params
from ece.editing.zvec import target_ids
from ece.eval.metrics import fact_metrics, summarise
from ece.model.adapter import ModelAdapter
from ece.model.loading import tiny_model


def new_object_always_wins(monkeypatch, tiny_llama) -> pl.DataFrame:
    """Per-fact metrics with scores stubbed so that every target_new beats every other continuation."""
    model, tok = tiny_llama
    df = facts_table()
    new = set(df["target_new"].to_list())

    def fake(model, tok, texts, conts, batch_size=32, router=None):
        wins = torch.tensor([0.0 if c in new else -3.0 for c in conts])
        return wins, (wins == 0).float()

    monkeypatch.setattr(ece.eval.metrics, "continuation_scores", fake)
    return fact_metrics(model, tok, df)


def test_stubbed_scores_new_object_wins(monkeypatch, tiny_llama):
    per_fact = new_object_always_wins(monkeypatch, tiny_llama)
    assert per_fact["efficacy"].to_list() == [1.0] * 4
    assert per_fact["generalization"].to_list() == [1.0] * 4
    assert summarise(per_fact)["efficacy"] == 1.0


def test_stubbed_scores_new_object_wins_on_neighbours_too(monkeypatch, tiny_llama):
    per_fact = new_object_always_wins(monkeypatch, tiny_llama)
    assert per_fact["specificity"].to_list() == [0.0] * 4  # the neighbours flipped too: none keeps its answer
    assert summarise(per_fact)["score"] == 0.0


def test_score_is_the_harmonic_mean_of_the_three_means():
    per_fact = pl.DataFrame(
        {
            "id": ["a", "b"],
            "efficacy": [1.0, 0.8],
            "generalization": [0.5, 0.7],
            "specificity": [0.75, None],  # a fact without neighbourhood prompts does not count
        }
    )
    out = summarise(per_fact)
    assert [out["efficacy"], out["generalization"], out["specificity"]] == pytest.approx([0.9, 0.6, 0.75])
    assert out["score"] == pytest.approx(3 / (1 / 0.9 + 1 / 0.6 + 1 / 0.75))  # 0.7297…, below the arithmetic 0.75


class Favour(nn.Module):
    """A model whose logits favour the tokens of some words at every position."""

    def __init__(self, model: nn.Module, ids: list[int], bonus: float = 30.0) -> None:
        super().__init__()
        self.model, self.ids, self.bonus = model, torch.tensor(sorted(set(ids))), bonus

    def forward(self, input_ids, attention_mask=None, **kw):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
        out.logits[..., self.ids] += self.bonus
        return out


def test_constructed_model_favouring_the_new_object_has_efficacy_one(tiny_llama):
    model, tok = tiny_llama
    df = facts_table(1)  # new "English", true "French": " E n g l i s h" boosted, " F r e n c h" mostly not
    forced = Favour(model, target_ids(tok, "English"))
    per_fact = fact_metrics(forced, tok, df)
    assert per_fact["efficacy"][0] == 1.0 and per_fact["generalization"][0] == 1.0


def test_constructed_model_favouring_the_new_object_fails_specificity(tiny_llama):
    model, tok = tiny_llama
    per_fact = fact_metrics(Favour(model, target_ids(tok, "English")), tok, facts_table(1))
    assert per_fact["specificity"][0] == 0.0


def test_metrics_follow_the_weights(tiny_llama):
    model, tok = tiny_llama
    df = facts_table()
    before = ece.eval.metrics.continuation_scores(model, tok, ["Paris is the capital of"], [" Italy"])[0]
    first = fact_metrics(model, tok, df)
    with torch.no_grad():
        ModelAdapter(model).w_out_weight(1)[:, :8] += 1.0
    after = ece.eval.metrics.continuation_scores(model, tok, ["Paris is the capital of"], [" Italy"])[0]
    assert not torch.allclose(before, after)
    fresh, _ = tiny_model("tiny-llama", seed=0)  # the unedited weights give the first numbers again
    assert fact_metrics(fresh, tok, df).equals(first)


# ---------------------------------------------------------------------------------------------
# The stage, in a scratch project with a tiny model


@pytest.fixture
def project(tmp_path, monkeypatch):
    """artifacts/prepared + artifacts/edited (3 batches of random column changes) for tiny-llama."""
    df, model, tok = build_eval_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path, df, model, tok


def test_stage_pre_is_unedited_post_is_edited_and_curve_replays(project):
    root, df, edited, tok = project
    p = load_params(ROOT / "params.yaml", [*STAGE_OVERRIDES, "evaluate.curve_every=2"])
    load_evaluate_stage().main(p)

    metrics = json.loads((root / "reports/metrics.json").read_text())
    per_fact = pl.read_parquet(root / "reports/per_fact.parquet")
    original, _ = tiny_model("tiny-llama", 0)
    cols = ["id", "efficacy", "generalization", "specificity"]
    pre = per_fact.filter(pl.col("phase") == "pre").select(cols)
    post = per_fact.filter(pl.col("phase") == "post").select(cols)
    assert pre.equals(fact_metrics(original, tok, df).select(cols))
    assert post.equals(fact_metrics(edited, tok, df).select(cols))
    assert not pre.equals(post)

    assert metrics["consistency_approximate"] is True and metrics["dataset_hash"] == "abc"
    for phase in ("pre", "post"):
        assert {"efficacy", "score", "fluency", "consistency", "general", "perplexity"} <= set(metrics[phase])
        assert metrics[phase]["general"]["sst2"]["n"] == 2
    assert per_fact["fluency"].null_count() == 0 and per_fact["generations"].list.len().to_list() == [1] * 8

    curve = json.loads((root / "reports/curve.json").read_text())
    assert [pt["facts_edited"] for pt in curve] == [0, 3, 4]  # pre, after batch 2, after the last batch
    assert curve[0]["efficacy"] == metrics["pre"]["efficacy"]
    assert all(curve[-1][m] == metrics["post"][m] for m in ("efficacy", "generalization", "specificity"))
    assert metrics["curve_replay_max_abs_diff"] == 0.0

    summary = (root / "reports/summary.md").read_text()
    assert "approximate" in summary and "abc" in summary and "| efficacy |" in summary
    for png in ("metrics.png", "curve.png"):
        assert (root / "reports/plots" / png).read_bytes()[:4] == b"\x89PNG"


def test_stage_reuses_the_unedited_evaluation_only_when_nothing_it_depends_on_changed(project, capsys):
    root, *_ = project
    stage = load_evaluate_stage()
    stage.main(load_params(ROOT / "params.yaml", STAGE_OVERRIDES))
    first = json.loads((root / "reports/metrics.json").read_text())
    assert "reusing" not in capsys.readouterr().out
    stage.main(load_params(ROOT / "params.yaml", STAGE_OVERRIDES))
    assert "evaluate pre: reusing" in capsys.readouterr().out
    again = json.loads((root / "reports/metrics.json").read_text())
    assert again["pre"] == first["pre"] and again["post"] == first["post"]
    stage.main(
        load_params(ROOT / "params.yaml", [*STAGE_OVERRIDES, "evaluate.n_general=3"])
    )  # another setting: measured anew
    assert "reusing" not in capsys.readouterr().out
    assert json.loads((root / "reports/metrics.json").read_text())["pre"]["general"]["sst2"]["n"] == 3
    assert len(list((root / ".cache/evaluate_pre").iterdir())) == 2


def test_stage_samples_generations_for_gen_facts_facts_spread_evenly(project):
    root, *_ = project
    overrides = ["model.name=tiny-llama", "edit.layers=[1,2]", "evaluate.n_general=1", "evaluate.general_tasks=[sst2]"]
    overrides += ["evaluate.ppl_tokens=32", "evaluate.ppl_window=32", "evaluate.gen_max_new_tokens=4"]
    load_evaluate_stage().main(load_params(ROOT / "params.yaml", [*overrides, "evaluate.gen_facts=2"]))
    per_fact = pl.read_parquet(root / "reports/per_fact.parquet").sort("phase", "id")
    sampled = per_fact.filter(pl.col("fluency").is_not_null())
    assert sampled["id"].to_list() == ["t:0", "t:2"] * 2  # facts 0 and 2 of 4, pre and post
    assert per_fact["generations"].list.len().to_list() == [1, 0, 1, 0] * 2
    assert (
        "1 generation prompt(s) per fact of 2 facts spread evenly over the 4"
        in (root / "reports/summary.md").read_text()
    )
