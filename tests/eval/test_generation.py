"""Fluency and consistency (ece.eval.generation): hand-computed values on tiny inputs, and batched sampling."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ece.errors import EceError
from ece.eval.generation import (
    RowStreamTopK,
    TfIdf,
    WikiReferences,
    build_tfidf,
    consistency,
    fact_references,
    fluency,
    generate,
    load_tfidf,
    ngram_entropy,
    prompt_stream,
    spread,
    terms,
    text_fluency,
)

WORDS9 = "one two three four five six seven eight nine"


def test_entropy_of_a_repeated_string_is_zero():
    assert ngram_entropy("la la la la la la", 2) == 0.0
    assert ngram_entropy("la la la la la la", 3) == 0.0


def test_entropy_of_distinct_ngrams_is_log2_of_their_number():
    assert ngram_entropy(WORDS9, 2) == pytest.approx(math.log2(8))  # 8 distinct bigrams
    assert ngram_entropy(WORDS9, 3) == pytest.approx(math.log2(7))


def test_entropy_hand_computed_and_degenerate():
    # bigrams of "a b a b a": ab, ba, ab, ba -> p = 1/2, 1/2 -> 1 bit
    assert ngram_entropy("a b a b a", 2) == pytest.approx(1.0)
    # bigrams of "a b a b b": ab, ba, ab, bb -> p = 1/2, 1/4, 1/4 -> 1.5 bits
    assert ngram_entropy("a b a b b", 2) == pytest.approx(1.5)
    assert ngram_entropy("word", 2) == 0.0  # fewer tokens than n
    assert ngram_entropy("", 3) == 0.0
    assert ngram_entropy("a  b\n a\tb a", 2) == pytest.approx(1.0)  # whitespace tokens


def test_fluency_formula():
    one = (2 / 3 * math.log2(8) + 4 / 3 * math.log2(7)) / 2  # the MEAN of 2/3·H2 and 4/3·H3
    assert text_fluency(WORDS9) == pytest.approx(one)
    assert fluency([WORDS9]) == pytest.approx(100 * one)
    assert fluency([WORDS9, "la la la la"]) == pytest.approx(100 * (one + 0.0) / 2)
    assert fluency([]) is None


def test_terms_follow_sklearn_default_analyzer():
    assert terms("The Cat's a CAT, 42 x") == ["the", "cat", "cat", "42"]


def test_tfidf_cosine_identical_disjoint_and_hand_computed():
    tfidf = build_tfidf(["apple banana", "apple cherry"])
    assert tfidf.cosine("apple banana cherry", "apple banana cherry") == pytest.approx(1.0)
    assert tfidf.cosine("banana banana", "cherry") == 0.0  # disjoint vocabulary
    assert tfidf.cosine("durian", "durian") == 0.0  # out of vocabulary: empty vectors
    # idf = ln((1 + N) / (1 + df)) + 1 with N = 2: apple 1, banana = cherry = ln(3/2) + 1
    b = math.log(1.5) + 1
    assert tfidf.cosine("apple banana", "apple cherry") == pytest.approx(1 / (1 + b * b))
    assert consistency(["apple banana"], ["apple banana"], tfidf) == pytest.approx(1.0)
    assert consistency([], ["apple"], tfidf) is None
    assert consistency(["apple"], [], tfidf) is None


def test_memit_tfidf_files_load_without_pickle(tmp_path):
    np.save(tmp_path / "idf.npy", np.array([1.0, 2.0]))
    (tmp_path / "vocab.json").write_text(json.dumps({"apple": 0, "pear": 1}))
    tfidf = load_tfidf(tmp_path / "idf.npy", tmp_path / "vocab.json")
    assert isinstance(tfidf, TfIdf)
    assert tfidf.vector("Apple pear pear") == {0: 1.0, 1: 4.0}
    np.save(tmp_path / "bad.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(EceError):
        load_tfidf(tmp_path / "bad.npy", tmp_path / "vocab.json")  # a pickle is refused


@pytest.fixture
def wiki() -> WikiReferences:
    titles = ["Piano", "Franz Liszt", "Mercury (planet)", "Dodge City", "Chess"]
    texts = [
        "The piano is a keyboard instrument.",
        "Liszt was a composer for the piano. He played the piano and the Piano in Weimar.",
        "Mercury is the smallest planet.",
        "Dodge City is a city in Kansas. Dodge was a fort.",
        "Players dodge the pieces in chess.",
    ]
    return WikiReferences(titles, texts, n_articles=2)


def test_references_title_first_then_most_mentions(wiki):
    assert [wiki.titles[i] for i in wiki.articles("piano")] == ["Piano", "Franz Liszt"]
    assert [wiki.titles[i] for i in wiki.articles("MERCURY")] == ["Mercury (planet)"]  # title match, qualifier dropped
    assert wiki.articles("Dodge") == [3]  # capitalised: "dodge" in the chess text is not a mention
    assert wiki.articles("violin") == []
    assert wiki.articles("pian") == []  # whole words only


def test_fact_references_memit_snippets_and_fallback(tmp_path, wiki):
    corpus = tmp_path / "wiki.jsonl"
    corpus.write_text("".join(json.dumps({"title": t, "text": x}) + "\n" for t, x in zip(wiki.titles, wiki.texts)))
    snippets = tmp_path / "attribute_snippets.json"
    snippets.write_text(
        json.dumps(
            [{"relation_id": "P1303", "target_id": "Q5994", "samples": [{"text": "He plays piano.", "name": "X"}]}]
        )
    )
    dataset = tmp_path / "multi_counterfact.json"
    dataset.write_text(
        json.dumps(
            [
                {
                    "case_id": 7,
                    "requested_rewrite": {"relation_id": "P1303", "target_new": {"str": "piano", "id": "Q5994"}},
                },
            ]
        )
    )
    np.save(tmp_path / "idf.npy", np.array([1.0, 1.0]))
    (tmp_path / "vocab.json").write_text(json.dumps({"piano": 0, "plays": 1}))
    refs = fact_references(
        ["piano", "Mercury"],
        ["counterfact:7", "counterfact:8"],
        corpus,
        2,
        snippets,
        tmp_path / "idf.npy",
        tmp_path / "vocab.json",
        dataset,
    )
    assert refs.texts[0] == ["He plays piano."] and refs.sources[0] == "snippets"
    assert refs.sources[1] == "wikipedia" and refs.approximate
    only_memit = fact_references(
        ["piano"], ["counterfact:7"], corpus, 2, snippets, tmp_path / "idf.npy", tmp_path / "vocab.json", dataset
    )
    assert not only_memit.approximate
    approx = fact_references(["piano", "violin"], ["a", "b"], corpus, 2)
    assert approx.approximate and approx.sources == ["wikipedia", None] and approx.texts[1] == []


def test_generate_left_padded_batch_matches_one_by_one(tiny_llama):
    model, tok = tiny_llama
    prompts = ["Paris is", "The mother tongue of Danielle Darrieux is", "A"]
    batched = generate(model, tok, prompts, max_new_tokens=6, seed=0, batch_size=3, top_k=1)  # top-1 = greedy
    single = [generate(model, tok, [p], max_new_tokens=6, seed=0, batch_size=1, top_k=1)[0] for p in prompts]
    assert batched == single
    assert all(t.startswith(p) for t, p in zip(batched, prompts))


def test_sampled_texts_do_not_depend_on_batching(tiny_llama):
    """Each prompt samples from its own stream: the same texts whatever the batches (sizes 1, 2, 4 cut
    and order the length-sorted prompts differently), and another seed draws other texts."""
    model, tok = tiny_llama
    prompts = ["Paris is", "The mother tongue of Danielle Darrieux is", "A", "Toko Yasuda plays the", "B is"]
    alone = [generate(model, tok, prompts, max_new_tokens=8, seed=1, batch_size=b) for b in (1, 2, 4)]
    assert alone[0] == alone[1] == alone[2]
    assert generate(model, tok, prompts, max_new_tokens=8, seed=2, batch_size=4) != alone[0]


def test_row_stream_top_k_samples_the_softmax_of_the_top_k():
    """The Gumbel-max draw against the reference: token frequencies over many draws match softmax of
    the k largest logits (renormalised), and no token outside the top k is ever drawn."""
    logits = torch.tensor([[2.0, 0.5, 1.0, -1.0, 3.0, 0.0]])
    n, k = 20000, 3
    sampler = RowStreamTopK([prompt_stream(0, 7)], k)
    counts = torch.zeros(6)
    for _ in range(n):
        counts[int(sampler(torch.zeros(1, 1), logits.clone()).argmax())] += 1
    top = [4, 0, 2]  # logits 3.0, 2.0, 1.0
    expected = torch.zeros(6)
    expected[top] = torch.softmax(logits[0, top], 0)
    assert counts[[1, 3, 5]].sum() == 0
    assert torch.allclose(counts / n, expected, atol=0.015)  # binomial sd <= 0.0036


def test_generate_is_seeded(tiny_gpt2):
    model, tok = tiny_gpt2
    prompts = ["Paris is", "The capital of France is"]
    a = generate(model, tok, prompts, max_new_tokens=8, seed=3, batch_size=2)
    b = generate(model, tok, prompts, max_new_tokens=8, seed=3, batch_size=2)
    assert a == b and len(a) == 2
    assert generate(model, tok, [], max_new_tokens=8) == []


def test_spread_picks_evenly_spaced_facts_or_all():
    assert spread(10, 3) == [0, 3, 6] and spread(2000, 500)[:3] == [0, 4, 8] and len(spread(2000, 500)) == 500
    assert spread(5, 0) == spread(5, 5) == spread(5, 7) == [0, 1, 2, 3, 4]
