"""Teacher-forced scores (ece.eval.scoring) and zsRE token accuracy against values computed independently.

The reference values come from plain loops over the model or from a hand-made model whose argmax is
known, never from the batched code under test, so a padding, ordering or off-by-one error shows.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ece.config import DataCfg
from ece.data.loaders import load_edits
from ece.eval.metrics import fact_metrics, family_of
from ece.eval.scoring import continuation_scores
from ece.model.loading import tiny_model

DOC_START = "<|endoftext|>"
TEXTS = ["Paris is the capital of", "The mother tongue of Danielle Darrieux is", "Toko Yasuda plays the"]
CONTINUATIONS = ["Italy", " English", "piano"]


def by_hand(model: nn.Module, ids: list[int], target: list[int]) -> tuple[float, int]:
    """(summed log-probability, number of argmax hits) of `target` after `ids`: one forward per token
    of the growing sequence, unbatched and unpadded."""
    seq, total, hits = list(ids), 0.0, 0
    for t in target:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
        total += float(F.log_softmax(logits.double(), dim=-1)[t])
        hits += int(logits.argmax()) == t
        seq.append(t)
    return total, hits


def test_continuation_scores_match_a_plain_loop_on_the_tiny_model() -> None:
    model, tok = tiny_model("tiny-llama", 0)
    # the byte tokenizer adds no BOS, so the scorer opens each text with the document separator
    assert tok("a").input_ids == tok("a", add_special_tokens=False).input_ids
    start = [tok.convert_tokens_to_ids(DOC_START)]
    logprob, accuracy = continuation_scores(model, tok, TEXTS, CONTINUATIONS, batch_size=2)  # padding and reordering
    for i, (text, cont) in enumerate(zip(TEXTS, CONTINUATIONS)):
        ids = tok(text, add_special_tokens=False).input_ids
        target = tok(" " + cont.lstrip(" "), add_special_tokens=False).input_ids  # a continuation starts with a space
        assert len(ids) == len(text.encode()) and len(target) == len(cont.lstrip(" ").encode()) + 1  # one token a byte
        total, hits = by_hand(model, start + ids, target)
        assert float(logprob[i]) == pytest.approx(
            total / len(target), abs=1e-5
        )  # the scorer returns the per-token mean
        assert float(accuracy[i]) == pytest.approx(hits / len(target))


# Rows whose inputs (text + continuation minus its last token; the byte tokenizer has one token a
# byte) coincide or extend one another: the scorer runs 3 inputs for these 7 rows (<s>: the document start).
SHARED = [
    ("Paris is the capital of", "Italy"),  # runs "<s>Paris is the capital of Ital"
    ("Paris is the capital of", "Iceland"),  # runs "<s>Paris is the capital of Icelan"
    ("Paris is the capital of", "I"),  # "... of " is a prefix of both: read from one of them
    ("Paris is the capital of", "Italy"),  # the same row twice
    ("Paris is", "the capital"),  # another text: "Paris is the capita" is a prefix of the first
    ("Toko Yasuda plays the", "piano"),  # a prefix of the next one's input
    ("Toko Yasuda plays the", "piano forte"),  # runs "<s>Toko Yasuda plays the piano fort"
]


class Counting(nn.Module):
    """The wrapped model, recording the rows it is asked to run and whether it was asked for all logits."""

    def __init__(self, model: nn.Module, takes_keep: bool) -> None:
        super().__init__()
        self.model, self.rows, self.full_logits = model, [], []
        if not takes_keep:  # a forward without the `logits_to_keep` parameter: the scorer must slice itself
            self.forward = self.forward_without_keep  # type: ignore[method-assign]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, logits_to_keep: Tensor | int = 0) -> SimpleNamespace:
        self.rows += [tuple(r[m.bool()].tolist()) for r, m in zip(input_ids, attention_mask)]
        self.full_logits.append(isinstance(logits_to_keep, int))
        return self.model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep)

    def forward_without_keep(self, input_ids: Tensor, attention_mask: Tensor) -> SimpleNamespace:
        return self.__class__.forward(self, input_ids, attention_mask)


@pytest.mark.parametrize("takes_keep", [True, False])
@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_each_distinct_input_runs_once_and_scores_match_a_plain_loop(takes_keep: bool, batch_size: int) -> None:
    model, tok = tiny_model("tiny-llama", 0)
    start = [tok.convert_tokens_to_ids(DOC_START)]
    counting = Counting(model, takes_keep)
    logprob, accuracy = continuation_scores(counting, tok, *map(list, zip(*SHARED)), batch_size=batch_size)

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False).input_ids

    paris, toko = start + ids("Paris is the capital of"), start + ids("Toko Yasuda plays the")
    runs = [paris + ids(" Ital"), paris + ids(" Icelan"), toko + ids(" piano fort")]
    assert sorted(counting.rows) == sorted(map(tuple, runs))
    assert counting.full_logits == [not takes_keep] * len(counting.full_logits)  # else only the positions read
    for i, (text, cont) in enumerate(SHARED):
        target = ids(" " + cont)
        total, hits = by_hand(model, start + ids(text), target)
        assert float(logprob[i]) == pytest.approx(total / len(target), abs=1e-5)
        assert float(accuracy[i]) == pytest.approx(hits / len(target))


class Bigram(nn.Module):
    """A hand-made model: at every position the argmax is `table[current token]` (else `default`)."""

    def __init__(self, table: dict[int, int], vocab: int, default: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.next = torch.full((vocab,), default)
        for current, following in table.items():
            self.next[current] = following

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=10.0 * F.one_hot(self.next[input_ids], self.vocab).float())


@pytest.fixture
def bigram() -> tuple[Bigram, object]:
    """After "?" it predicts " ", then "2", then "0" for ever: a question is answered " 2000…"."""
    _, tok = tiny_model("tiny-llama", 0)

    def one(ch: str) -> int:
        (i,) = tok(ch, add_special_tokens=False).input_ids
        return i

    table = {one("?"): one(" "), one(" "): one("2"), one("2"): one("0"), one("0"): one("0")}
    return Bigram(table, len(tok), tok.eos_token_id), tok


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("20", 1.0),  # " 2 0": every token is the argmax
        ("2006", 4 / 5),  # " 2 0 0 6": the last one is not ("0" follows "0")
        ("5", 1 / 2),  # " 5": the space is, "5" is not ("2" follows " ")
        ("99", 1 / 3),  # " 9 9": only the space
    ],
)
def test_token_accuracy_is_the_share_of_argmax_target_tokens(bigram, target: str, expected: float) -> None:
    model, tok = bigram
    assert float(continuation_scores(model, tok, ["When was Ada born?"], [target])[1][0]) == pytest.approx(expected)


def test_zsre_facts_are_scored_by_token_accuracy(bigram, tmp_path: Path) -> None:
    model, tok = bigram
    record = {
        "subject": "Ada Lovelace",
        "src": "When was Ada Lovelace born?",
        "pred": "1815",
        "rephrase": "In which year was Ada Lovelace born?",
        "alt": "1815",
        "answers": ["2006"],
        "loc": "nq question: how many legs does a spider have",
        "loc_ans": "8",
    }
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps([record]))
    df = load_edits(DataCfg(edit_dataset=str(path)))
    assert df["target_new"].to_list() == ["2006"] and df["target_true"].to_list() == [None]  # MEMIT: answers[0]
    assert family_of(df) == "accuracy"
    row = fact_metrics(model, tok, df).row(0, named=True)
    # " 2006" after "?": 4 of 5 tokens; " 8" after the loc question (+ "?", as MEMIT asks it): the space only.
    assert row["family"] == "accuracy"
    assert [row["efficacy"], row["generalization"], row["specificity"]] == pytest.approx([0.8, 0.8, 0.5])
