"""SERAC on tiny models: the scope classifier's probability against the formula written out with plain
tensors and an unbatched forward, routing on a constructed memory, the memory growing batch by batch, the
classifier learning its training pairs, an interrupted training resumed to the uninterrupted result, a
context-routed perplexity against the same text scored by hand, and the general-text negatives: their
windows, their pairs in the loss and the held-out routing table against plain loops, and a training with
them scoring general texts lower than one without."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from training_records import assert_training_resumes_exactly, records

from ece.config import Params, load_params
from ece.data.facts import Fact
from ece.editing.editor_io import TrainingCheckpoint
from ece.editing.serac import (
    EditMemory,
    MemoryRouter,
    ScopeClassifier,
    SeracEditor,
    Split,
    general_windows,
    heldout_routing,
    pair_losses,
    statement,
    train,
)
from ece.editing.trained import editor_inputs
from ece.eval.general_ability import perplexity
from ece.model.adapter import ModelAdapter
from ece.model.prompts import document_start

ROOT = Path(__file__).resolve().parents[2]
LAYER = 2  # of the 4-layer tiny models: hidden_states[LAYER + 1] is its output, before the final norm


CORPUS = ROOT / "data/corpus/wikipedia_vital_summaries_en.jsonl"


def params(*serac: str, **train_editor: object) -> Params:
    overrides = [f"train_editor.{k}={v}" for k, v in train_editor.items()]
    return load_params(
        ROOT / "params.yaml",
        [
            "method=serac",
            f"covariance.corpus={CORPUS}",
            f"serac.embed_layer={LAYER}",
            "serac.dim=8",
            "serac.batch_records=2",
            "serac.lr=1e-2",
            "serac.general_texts=12",
            "serac.general_words=[4,16]",
            "serac.general_negatives=4",
            *serac,
            *overrides,
        ],
    )


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
    p = params(max_steps=6, eval_every=2, heldout=2, patience=0)
    assert_training_resumes_exactly(train, ModelAdapter(model), tok, p, tmp_path)


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


def test_general_windows_are_runs_of_whole_words_of_the_first_documents(tmp_path: Path) -> None:
    docs = [" ".join(f"d{i}w{j}" for j in range(n)) for i, n in enumerate([30, 3, 30, 30])]
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(docs))
    got = general_windows(corpus, 3, [5, 9], seed=0)
    assert len(got) == 3 and got[1] == docs[1]  # a document shorter than the window: all of it
    for i in (0, 2):
        words = got[i].split()
        assert 5 <= len(words) <= 9 and got[i] in docs[i] and words[0].startswith(f"d{i}w")
    assert got == general_windows(corpus, 3, [5, 9], seed=0) != general_windows(corpus, 3, [5, 9], seed=1)


def constructed(d: int = 6) -> Split:
    """Three records (own prompt, paraphrase, neighbourhood prompt each) and four general texts."""
    torch.manual_seed(3)
    return Split(
        torch.randn(3, d), torch.randn(9, d), torch.arange(3).repeat_interleave(3), torch.tensor([0, 1, 2] * 3),
        torch.randn(4, d),
    )  # fmt: skip


def p_by_hand(clf: ScopeClassifier, e: torch.Tensor, q: torch.Tensor) -> float:
    W, c = clf.proj.detach(), clf.center
    a, b = W @ (e - c), W @ (q - c)
    cos = float(a @ b) / (float(a.norm()) * float(b.norm()))
    return 1 / (1 + math.exp(-(cos * math.exp(clf.log_scale.item()) + clf.bias.item())))


def test_general_texts_are_negatives_of_every_statement_in_the_loss() -> None:
    """Loss of records {0, 2} with general texts {1, 3}: the mean −log p of the 4 in-scope pairs (each
    statement with its own prompt and paraphrase) and the mean −log(1 − p) of the 8 other query pairs and
    the 4 general pairs, averaged."""
    data, clf = constructed(), classifier(6)
    records, general = torch.tensor([0, 2]), torch.tensor([1, 3])
    pos, neg = [], []
    with torch.no_grad():
        for i in (0, 2):
            for j in range(9):
                if data.owner[j] in (0, 2):
                    pr = p_by_hand(clf, data.statements[i], data.queries[j])
                    inside = data.owner[j] == i and data.kind[j] < 2
                    (pos if inside else neg).append(-math.log(pr) if inside else -math.log(1 - pr))
            neg += [-math.log(1 - p_by_hand(clf, data.statements[i], data.general[g])) for g in (1, 3)]
        got = float(pair_losses(clf, data, records, general))
    assert (len(pos), len(neg)) == (4, 12)
    assert got == pytest.approx(0.5 * (sum(pos) / 4 + sum(neg) / 12), rel=1e-5)
    assert got != pytest.approx(float(pair_losses(clf, data, records, torch.tensor([], dtype=torch.long)).detach()))


def test_heldout_routing_follows_the_routers_rule() -> None:
    """Per threshold: an own prompt or paraphrase counts when its most probable statement is its own
    record's and above the threshold; a neighbourhood prompt or general text when any statement is."""
    data, clf = constructed(), classifier(6)  # its best probabilities lie in 0.82-0.93
    rows = heldout_routing(clf, data, (0.8, 0.9, 0.915, 0.95))
    with torch.no_grad():
        for row in rows:
            t, counts = row["threshold"], {k: [] for k in ("own prompt", "paraphrase", "neighbourhood")}
            for j in range(9):
                ps = [p_by_hand(clf, data.statements[i], data.queries[j]) for i in range(3)]
                best = max(range(3), key=lambda i: ps[i])
                kind = ("own prompt", "paraphrase", "neighbourhood")[int(data.kind[j])]
                ok = ps[best] > t and (best == int(data.owner[j]) or kind == "neighbourhood")
                counts[kind].append(ok)
            for k, v in counts.items():
                assert row[k] == pytest.approx(sum(v) / 3)
            general = [max(p_by_hand(clf, e, g) for e in data.statements) > t for g in data.general]
            assert row["general text"] == pytest.approx(sum(general) / 4)
    assert len({r["general text"] for r in rows}) > 2 and len({r["neighbourhood"] for r in rows}) > 2  # not all 0 or 1


def test_training_with_general_negatives_scores_general_texts_lower(tiny_llama, tmp_path: Path) -> None:
    """The same records trained with and without general-text negatives: with them, the held-out
    general texts' best probability over the held-out statements is lower, and the held-out loss,
    which counts them, too."""
    model, tok = tiny_llama
    adapter = ModelAdapter(model)
    rec, quiet = records(), lambda _: None
    out = {}
    for n in (0, 4):
        p = params(f"serac.general_negatives={n}", max_steps=60, eval_every=60, heldout=2, patience=0)
        out[n] = train(adapter, tok, p, rec[:3], rec[3:], TrainingCheckpoint(tmp_path / str(n)), log=quiet)
    general = general_windows(CORPUS, 12, [4, 16], 0)[-5:]  # the windows held out with the 2 held-out records
    assert out[4].config["general_texts"] == {"train": 7, "heldout": 5} and out[0].config["general_texts"]["train"] == 0
    best = {}
    for n, result in out.items():
        clf = ScopeClassifier(adapter.hidden_size, 8, 1.0)
        clf.load_state_dict(result.tensors)
        router = MemoryRouter(
            SeracEditor(clf, LAYER).memory(adapter, tok, [[r.fact for r in rec[3:]]], 0.5), adapter, tok
        )
        best[n] = router.probabilities(general).max(0).values
    assert bool((best[4] < best[0]).all())
    assert [r["threshold"] for r in out[4].config["heldout_routing"]] == [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]


def test_what_the_classifier_was_trained_from_names_the_corpus_and_the_general_settings(tmp_path: Path) -> None:
    """The inputs an editor is checked against change with the corpus's bytes and the general-text
    settings, not with the threshold (used only when editing)."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("one text\n\nanother text")

    def inputs(*overrides: str) -> dict:
        return editor_inputs(params(f"covariance.corpus={corpus}", *overrides))

    before = inputs()
    assert inputs("serac.threshold=0.9") == before
    assert inputs("serac.general_negatives=8")["serac"]["general_negatives"] == 8
    assert inputs("serac.general_words=[2,3]") != before and inputs("serac.general_texts=5") != before
    corpus.write_text("one text\n\nanother text, changed")
    changed = inputs()
    assert changed["corpus_sha256"] != before["corpus_sha256"] and {**changed, "corpus_sha256": 0} == {
        **before,
        "corpus_sha256": 0,
    }
