"""SERAC on tiny models: the scope classifier's probability against the formula written out with plain
tensors and an unbatched forward, routing on a constructed memory, the memory growing batch by batch, the
classifier learning its training pairs, an interrupted training resumed to the uninterrupted result, and
a context-routed perplexity against the same text scored by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ece.config import Params, load_params
from ece.data.editor_data import TrainingRecord
from ece.data.facts import Fact
from ece.editing.editor_io import TrainingCheckpoint
from ece.editing.serac import EditMemory, MemoryRouter, ScopeClassifier, SeracEditor, statement, train
from ece.eval.general_ability import perplexity
from ece.model.adapter import ModelAdapter
from ece.model.prompts import document_start

ROOT = Path(__file__).resolve().parents[2]
LAYER = 2  # of the 4-layer tiny models: hidden_states[LAYER + 1] is its output, before the final norm


def params(**train_editor: object) -> Params:
    overrides = [f"train_editor.{k}={v}" for k, v in train_editor.items()]
    return load_params(
        ROOT / "params.yaml",
        [
            "method=serac",
            f"serac.embed_layer={LAYER}",
            "serac.dim=8",
            "serac.batch_records=2",
            "serac.lr=1e-2",
            *overrides,
        ],
    )


def records() -> list[TrainingRecord]:
    people = [
        ("Anna Berg", "Oslo"),
        ("Tom Hale", "Lima"),
        ("Kim Soo", "Seoul"),
        ("Joe Park", "Kyiv"),
        ("Ida Holm", "Turku"),
    ]
    return [
        TrainingRecord(
            Fact(f"t{i}", s, "{} works in the city of", o),
            f"The workplace of {s} is the city of",
            f"Ravi Shankar{i} works in the city of",
            "Delhi",
            (f"The workplace of {s} is the city of", f"{s} is employed in the city of"),
            (f"Ravi Shankar{i} works in the city of", f"Mo Li{i} works in the city of"),
        )
        for i, (s, o) in enumerate(people)
    ]


def classifier(d: int, seed: int = 1) -> ScopeClassifier:
    torch.manual_seed(seed)
    clf = ScopeClassifier(d, 8, 0.3)
    with torch.no_grad():
        clf.bias.fill_(-0.7)
        clf.center.normal_()
    return clf


def pooled_by_hand(model: torch.nn.Module, tok, text: str) -> torch.Tensor:
    """Mean of block LAYER's output over the text's tokens after the document start, one text at a time."""
    start = document_start(tok)
    ids = torch.tensor([start + list(tok(text).input_ids)])
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1][0]
    return hidden[len(start) :].mean(0)


def test_probability_equals_the_formula_written_out(tiny_llama, facts: list[Fact]) -> None:
    """p = σ(cos(W(e − c), W(q − c))/τ + b) with e, q pooled states, for every (entry, query) pair."""
    model, tok = tiny_llama
    adapter = ModelAdapter(model)
    clf = classifier(adapter.hidden_size)
    memory = SeracEditor(clf, LAYER).memory(adapter, tok, [facts[:2], facts[2:]], 0.5)
    queries = ["Paris is the capital of", "Toko Yasuda is a musician who plays", "A short unrelated text"]
    got = MemoryRouter(memory, adapter, tok).probabilities(queries)
    W, c = clf.proj.detach(), clf.center
    inv_tau, b = math.exp(clf.log_scale.item()), clf.bias.item()
    with torch.no_grad():
        for i, f in enumerate(facts):
            e = W @ (pooled_by_hand(model, tok, statement(f)) - c)
            for j, q_text in enumerate(queries):
                q = W @ (pooled_by_hand(model, tok, q_text) - c)
                cos = float(e @ q) / (float(e.norm()) * float(q.norm()))
                assert float(got[i, j]) == pytest.approx(1 / (1 + math.exp(-(cos * inv_tau + b))), abs=1e-5)


def test_routing_picks_the_entry_whose_key_matches_and_otherwise_the_base_model(tiny_llama) -> None:
    """A memory whose first key IS the query's embedding (cos 1) answers the query with that entry's
    statement in context; a memory whose only key points the other way (cos −1) leaves it to the base."""
    model, tok = tiny_llama
    adapter = ModelAdapter(model)
    clf = classifier(adapter.hidden_size)
    with torch.no_grad():
        clf.log_scale.fill_(math.log(10.0))
        clf.bias.fill_(-5.0)  # p(cos 1) = σ(5), p(cos −1) = σ(−15)
    query = "Danielle Darrieux speaks"
    key = clf.embed(pooled_by_hand(model, tok, query).detach()[None])
    match = EditMemory(["a", "b"], [0, 0], ["A is X", "B is Y"], torch.cat([key, -key]), clf, LAYER, 0.5, "-")
    router = MemoryRouter(match, adapter, tok)
    assert router([query, query]) == ["A is X. ", "A is X. "]
    routing = router.routing()
    assert routing["memory_id"].to_list() == ["a"] and routing["probability"][0] == pytest.approx(
        1 / (1 + math.exp(-5))
    )
    away = MemoryRouter(EditMemory(["b"], [0], ["B is Y"], -key, clf, LAYER, 0.5, "-"), adapter, tok)
    assert away([query]) == [""]
    assert away.routing()["memory_id"].to_list() == [None]


def test_memory_grows_across_sequential_batches(tiny_llama, facts: list[Fact]) -> None:
    """After batch 1 the memory holds batch 0's entries unchanged, then batch 1's; `upto(0)` is the memory
    a run of batch 0 alone builds."""
    model, tok = tiny_llama
    adapter = ModelAdapter(model)
    editor = SeracEditor(classifier(adapter.hidden_size), LAYER)
    first = editor.memory(adapter, tok, [facts[:2]], 0.5)
    both = editor.memory(adapter, tok, [facts[:2], facts[2:]], 0.5)
    assert both.ids == [f.id for f in facts] and both.batches == [0, 0, 1, 1]
    assert both.statements == [statement(f) for f in facts]
    assert both.upto(0).ids == first.ids
    assert torch.allclose(both.upto(0).keys, first.keys, atol=1e-6)
    assert editor.deltas(adapter, tok, facts) == {} and editor.layers == []  # no weight is ever written


def test_training_learns_the_training_pairs(tiny_llama, tmp_path: Path) -> None:
    """After training, every training statement scores its own prompts above its neighbourhood prompts
    (the loss it was trained on fell, and the curve says so)."""
    model, tok = tiny_llama
    adapter = ModelAdapter(model)
    rec = records()
    out = train(adapter, tok, params(max_steps=60, eval_every=30, heldout=2, patience=0), rec[:3], rec[3:],
                TrainingCheckpoint(tmp_path / "c"), log=lambda _: None)  # fmt: skip
    clf = ScopeClassifier(adapter.hidden_size, 8, 1.0)
    clf.load_state_dict(out.tensors)
    memory = SeracEditor(clf, LAYER).memory(adapter, tok, [[r.fact for r in rec[:3]]], 0.5)
    router = MemoryRouter(memory, adapter, tok)
    for i, r in enumerate(rec[:3]):
        own = router.probabilities([r.fact.prompt.replace("{}", r.fact.subject), *r.paraphrases])[i]
        other = router.probabilities(list(r.neighborhoods))[i]
        assert own.min() > other.max()
    assert out.config["steps"] == 60 and len(out.curve) == 2


def test_interrupted_training_resumes_to_the_uninterrupted_result(tiny_llama, tmp_path: Path) -> None:
    model, tok = tiny_llama
    adapter = ModelAdapter(model)
    p = params(max_steps=6, eval_every=2, heldout=2, patience=0)
    rec = records()
    quiet = lambda _: None  # noqa: E731
    whole = train(adapter, tok, p, rec[:3], rec[3:], TrainingCheckpoint(tmp_path / "a"), log=quiet)

    def kill(step: int) -> None:
        if step == 5:
            raise KeyboardInterrupt

    checkpoint = TrainingCheckpoint(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        train(adapter, tok, p, rec[:3], rec[3:], checkpoint, log=quiet, on_step=kill)
    logged: list[str] = []
    resumed = train(adapter, tok, p, rec[:3], rec[3:], checkpoint, log=logged.append)
    assert "train_editor: resuming from the checkpoint at step 4" in logged
    assert all(torch.equal(whole.tensors[k], resumed.tensors[k]) for k in whole.tensors)
    assert [c["heldout_loss"] for c in whole.curve] == [c["heldout_loss"] for c in resumed.curve]


def test_routed_perplexity_scores_only_the_window_after_its_context(tiny_llama) -> None:
    """With a router that puts a fixed context before every window, perplexity = exp(mean NLL of the
    window's tokens) computed by hand on [start] + context + window."""
    model, tok = tiny_llama
    ids = list(tok("the cat sat on the mat and then it slept", add_special_tokens=False).input_ids)
    ctx = "A is X. "
    got = perplexity(model, tok, ids, 16, 2, router=lambda texts: [ctx] * len(texts))
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), 16):
            pre = document_start(tok) + list(tok(ctx, add_special_tokens=False).input_ids)
            row = torch.tensor([pre + ids[s : s + 16]])
            logp = F.log_softmax(model(input_ids=row).logits[0].float(), -1)
            for t in range(len(pre), row.shape[1]):
                nll -= float(logp[t - 1, row[0, t]])
                n += 1
    assert got == pytest.approx(math.exp(nll / n), rel=1e-5)
