"""General ability (ece.eval.general_ability): metrics by hand, label mapping, label scoring, perplexity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ece.eval.general_ability as ga
import ece.eval.scoring
from ece.eval.general_ability import (
    Example,
    accuracy,
    f1,
    general_ability,
    label_scores,
    load_task,
    macro_f1,
    mcc,
    perplexity,
    predict,
    read_tokens,
    task_metrics,
)
from ece.eval.scoring import continuation_scores
from ece.model.prompts import document_start

DATA = "data/general"


def test_f1_mcc_accuracy_by_hand():
    pred = [1, 1, 0, 0, 1]
    gold = [1, 0, 0, 1, 1]  # TP = 2, FP = 1, FN = 1, TN = 1
    assert accuracy(pred, gold) == pytest.approx(3 / 5)
    assert f1(pred, gold, positive=1) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert mcc(pred, gold, positive=1) == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))
    # the other class as positive: TP = 1, FP = 1, FN = 1
    assert f1(pred, gold, positive=0) == pytest.approx(2 / 4)
    assert macro_f1(pred, gold, 2) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_metrics_degenerate_cases():
    assert f1([0, 0, 0], [1, 0, 1], positive=1) == 0.0  # no predicted positive
    assert mcc([0, 0, 0], [1, 0, 1], positive=1) == 0.0  # zero denominator
    assert mcc([1, 0, 1], [1, 0, 1], positive=1) == pytest.approx(1.0)
    assert mcc([0, 1, 0], [1, 0, 1], positive=1) == pytest.approx(-1.0)
    assert f1([0, 0], [0, 0], positive=1) == 0.0


def test_task_metrics_fields():
    # label index 0 is the positive class of the binary templates
    cola = task_metrics("cola", [0, 0, 1, 1], [0, 1, 1, 1])
    assert cola == {"n": 4, "accuracy": 0.75, "f1": pytest.approx(2 / 3), "mcc": pytest.approx(1 / math.sqrt(3))}
    assert set(task_metrics("sst2", [0], [0])) == {"n", "accuracy", "f1"}
    assert task_metrics("mmlu", [0, 1, 2, 3], [0, 1, 2, 2])["f1"] == pytest.approx((1 + 1 + 2 / 3 + 0) / 4)


def test_load_task_maps_labels_and_takes_the_first_n():
    sst2 = load_task(DATA, "sst2", 3)
    assert len(sst2) == 3 and sst2[0].labels == ("positive", "negative")
    assert sst2[0].gold == 0 and sst2[0].prompt.startswith("Review: an exhilarating")  # label 1 = positive
    rte = load_task(DATA, "rte", 2)
    assert [e.gold for e in rte] == [1, 0]  # GLUE RTE: 1 = not_entailment -> "False"
    nli = load_task(DATA, "nli", 2)
    assert [e.gold for e in nli] == [1, 0]  # not_entailment, entailment
    mmlu = load_task(DATA, "mmlu", 1)[0]
    assert mmlu.labels == ("A", "B", "C", "D") and mmlu.gold == 0 and mmlu.prompt.endswith("Answer:")
    assert len(load_task(DATA, "mrpc", 0)) == 258  # 0 = all


def test_predict_picks_the_most_likely_label(monkeypatch, tiny_llama):
    model, tok = tiny_llama
    examples = [Example("p1", ("yes", "no"), 0), Example("p2", ("A", "B", "C", "D"), 2)]
    favoured = {("p1", "no"), ("p2", "C")}

    def fake(model, tok, texts, conts, batch_size=32, router=None):
        return torch.tensor([0.0 if (t, c) in favoured else -5.0 for t, c in zip(texts, conts)]), torch.zeros(
            len(texts)
        )

    monkeypatch.setattr(ga, "continuation_scores", fake)
    assert predict(model, tok, examples) == [1, 2]


@pytest.mark.parametrize("one_token_labels", [True, False])
def test_label_scores_are_each_pair_scored_alone(monkeypatch, tiny_llama, one_token_labels: bool):
    """Labels of one token share their prompt's forward pass; the scores are those of each pair alone."""
    model, tok = tiny_llama
    if one_token_labels:  # the byte tokenizer splits " yes"; make every label one token

        def one_token(tok, label):
            return tok(label[:1], add_special_tokens=False).input_ids

        monkeypatch.setattr(ece.eval.scoring, "target_ids", one_token)
    examples = [
        Example("Is it raining? Answer:", ("yes", "no"), 0),
        Example("Pick one:", ("A", "B", "C"), 1),
        Example("x", ("yes", "no"), 1),
    ]
    shared = label_scores(model, tok, examples, batch_size=2)
    alone = [
        [float(continuation_scores(model, tok, [e.prompt], [label])[0][0]) for label in e.labels] for e in examples
    ]
    assert [len(r) for r in shared] == [2, 3, 2]
    assert [x for r in shared for x in r] == pytest.approx([x for r in alone for x in r], abs=1e-5)


def test_general_ability_runs_on_a_tiny_model(tiny_gpt2):
    model, tok = tiny_gpt2
    out = general_ability(model, tok, DATA, ["sst2", "cola"], 2, batch_size=4)
    assert out["sst2"]["n"] == 2 and 0 <= out["sst2"]["accuracy"] <= 1 and "mcc" in out["cola"]


def test_perplexity_is_exp_of_the_mean_nll(tiny_llama):
    model, tok = tiny_llama
    ids = tok("Robert Boulter is an English film actor.", add_special_tokens=False).input_ids
    window = 16
    start = document_start(tok)
    assert start  # the byte tokenizer adds no BOS: windows start with <|endoftext|>
    nll, count = 0.0, 0
    for s in range(0, len(ids), window):  # one window at a time, no padding
        row = torch.tensor([start + ids[s : s + window]])
        logp = F.log_softmax(model(input_ids=row).logits[0].float(), dim=-1)
        for t in range(1, row.shape[1]):
            nll -= float(logp[t - 1, row[0, t]])
            count += 1
    assert count == len(ids)  # every token predicted
    assert perplexity(model, tok, ids, window, batch_size=2) == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_read_tokens(tmp_path, tiny_llama):
    _, tok = tiny_llama
    path = tmp_path / "t.txt"
    path.write_text("hello world " * 50)
    assert read_tokens(tok, path, 7) == tok("hello world " * 50, add_special_tokens=False).input_ids[:7]
    assert len(read_tokens(tok, path, 10_000)) == len("hello world " * 50)  # bytes: one token each
