"""Prompt encoding (subject position, padding, document start) and template-averaged keys."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from ece.editing.keys import LayerKeys, keys_and_hidden, templated
from ece.errors import EceError
from ece.model import prompts
from ece.model.adapter import ModelAdapter
from ece.model.loading import tiny_model
from ece.model.prompts import context_templates, document_start, encode

CASES = [  # (prompt, subject): subject at the start, in the middle, at the end
    ("{} is the capital of", "Paris"),
    ("The mother tongue of {} is", "Danielle Darrieux"),
    ("My favourite place is {}", "Café Noir"),  # multi-byte last character
    ("{}", "Toko Yasuda"),
    ("In {}, people speak", "Quebec"),
]


@pytest.fixture(scope="module")
def bpe_with_bos() -> PreTrainedTokenizerFast:
    """A byte-level BPE with real merges (tokens span several characters) that adds its own BOS."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [p.replace("{}", s) for p, s in CASES] + ["Paris is the capital of France. Danielle Darrieux speaks."]
    core.train_from_iterator(corpus * 20, trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", pad_token="<pad>")


def _check_positions(tok, enc, prompts, subjects, start_ids):
    width = enc.input_ids.shape[1]
    for i, (prompt, subject) in enumerate(zip(prompts, subjects)):
        text = prompt.replace("{}", subject)
        n = int(enc.lengths[i])
        assert enc.attention_mask[i, :n].all() and not enc.attention_mask[i, n:].any()  # right padding
        assert (enc.input_ids[i, n:] == tok.pad_token_id).all()
        row = enc.input_ids[i, :n].tolist()
        assert row[: len(start_ids)] == start_ids
        assert tok.decode(row, skip_special_tokens=True) == text
        pos = int(enc.subject_pos[i])
        assert len(start_ids) <= pos < n <= width
        # the prefix up to and including subject_pos ends with the subject ...
        upto = tok.decode(row[: pos + 1], skip_special_tokens=True)
        assert upto.endswith(subject), (upto, subject)
        # ... and the token before it does not yet contain the subject's last character
        before = tok.decode(row[:pos], skip_special_tokens=True)
        assert not before.endswith(subject)
        assert len(before) < len(text[: text.index(subject) + len(subject)])


def test_encode_subject_position_byte_tokenizer(tiny_llama):
    _, tok = tiny_llama
    prompts = [p for p, _ in CASES]
    subjects = [s for _, s in CASES]
    enc = encode(tok, prompts, subjects)
    assert enc.input_ids.shape[0] == len(CASES)
    assert len(set(enc.lengths.tolist())) > 1  # padding is exercised
    _check_positions(tok, enc, prompts, subjects, [tok.eos_token_id])
    # byte tokenizer: the token at subject_pos is exactly the last byte of the subject
    for i, (_, subject) in enumerate(CASES):
        if subject.isascii():
            assert tok.decode([int(enc.input_ids[i, enc.subject_pos[i]])]) == subject[-1]


def test_encode_subject_position_bpe_with_merges(bpe_with_bos):
    tok = bpe_with_bos
    prompts = [p for p, _ in CASES]
    subjects = [s for _, s in CASES]
    enc = encode(tok, prompts, subjects)
    # the tokenizer adds its own BOS: no document start is prepended, and the BOS is there once
    assert document_start(tok) == []
    assert (enc.input_ids[:, 0] == tok.bos_token_id).all()
    assert (enc.input_ids[:, 1] != tok.bos_token_id).all()
    _check_positions(tok, enc, prompts, subjects, [tok.bos_token_id])
    # multi-character tokens: " Darrieux" is one token here, so the position is that token
    i = 1
    assert tok.decode([int(enc.input_ids[i, enc.subject_pos[i]])]).strip() == "Darrieux"


def test_encode_suffixes_are_appended_after_the_prompt(tiny_gpt2):
    _, tok = tiny_gpt2
    suffix = tok(" Rome", add_special_tokens=False).input_ids
    enc = encode(tok, ["{} is in", "The city of {} is in the country of"], ["Paris", "Paris"], [suffix, suffix[:2]])
    for i, s in enumerate([suffix, suffix[:2]]):
        n = int(enc.lengths[i])
        assert enc.input_ids[i, n - len(s) : n].tolist() == s
    # the suffix does not move the subject position
    plain = encode(tok, ["{} is in", "The city of {} is in the country of"], ["Paris", "Paris"])
    assert torch.equal(plain.subject_pos, enc.subject_pos)
    assert torch.equal(plain.lengths + torch.tensor([len(suffix), 2]), enc.lengths)


def test_encode_up_to_subject_ends_each_row_at_its_subject(bpe_with_bos):
    tok = bpe_with_bos
    prompts = [p for p, _ in CASES]
    subjects = [s for _, s in CASES]
    full = encode(tok, prompts, subjects)
    cut = encode(tok, prompts, subjects, up_to_subject=True)
    assert torch.equal(cut.subject_pos, full.subject_pos)
    assert torch.equal(cut.lengths, full.subject_pos + 1)
    assert cut.input_ids.shape[1] == int(full.subject_pos.max()) + 1 < full.input_ids.shape[1]
    for i in range(len(CASES)):
        n = int(cut.lengths[i])
        assert cut.input_ids[i, :n].tolist() == full.input_ids[i, :n].tolist()  # a prefix of the full row
        assert not cut.attention_mask[i, n:].any()
    with pytest.raises(AssertionError, match="suffix"):
        encode(tok, prompts[:1], subjects[:1], [[1]], up_to_subject=True)


def test_length_sorted_blocks_cover_every_row_once_within_its_width(bpe_with_bos):
    from ece.editing.keys import length_sorted_blocks

    tok = bpe_with_bos
    enc = encode(tok, [p for p, _ in CASES] * 3, [s for _, s in CASES] * 3, up_to_subject=True)
    blocks = length_sorted_blocks(enc)
    rows = torch.cat([r for r, _ in blocks])
    assert sorted(rows.tolist()) == list(range(len(CASES) * 3))
    for r, width in blocks:
        assert int(enc.lengths[r].max()) == width  # cut to the block's longest row, no shorter
    # these lengths differ by a few tokens: with a free forward every length is its own block
    assert len(prompts.length_blocks(enc.lengths.sort().values, 0)) == len(set(enc.lengths.tolist())) > 1


def test_document_start_byte_tokenizer(tiny_llama):
    _, tok = tiny_llama
    assert document_start(tok) == [tok.convert_tokens_to_ids("<|endoftext|>")]
    enc = encode(tok, ["{} is"], ["Paris"])
    assert enc.input_ids[0, 0].item() == tok.eos_token_id
    assert enc.input_ids[0, 1:].tolist() == tok("Paris is", add_special_tokens=False).input_ids
    assert int(enc.subject_pos[0]) == len("Paris")  # shifted by the prepended token


def test_encode_subject_not_visible():
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"a": 0}, merges=[])))
    with pytest.raises(EceError, match="not visible"):
        encode(tok, ["{} is"], [""])


# --- templates and keys ------------------------------------------------------------------------


def test_templated_is_fact_major(facts):
    prompts, subjects = templated(facts[:2], ["{}", "Hello. {}"])
    assert prompts == [facts[0].prompt, "Hello. " + facts[0].prompt, facts[1].prompt, "Hello. " + facts[1].prompt]
    assert subjects == [facts[0].subject] * 2 + [facts[1].subject] * 2


def test_context_templates_deterministic(tiny_gpt2):
    model, tok = tiny_gpt2
    a = context_templates(model, tok, 3, 4)
    assert a == context_templates(model, tok, 3, 4)
    assert len(a) == 4 and a[0] == "{}"
    for t in a[1:]:
        assert t.endswith(". {}") and t.count("{") == 1 and t.count("}") == 1
    assert a[1].startswith("The") and a[2].startswith("Therefore") and a[3].startswith("Because")
    with pytest.raises(EceError, match="n_context"):
        context_templates(model, tok, 11, 4)


def test_context_templates_start_from_the_tokenizers_own_bos(tiny_llama, byte_tok_with_bos, monkeypatch):
    """The context prefixes are generated after the document start, once, whichever way the tokenizer gives it."""
    model, tok = tiny_llama
    seen: list[list[int]] = []
    real = prompts.greedy_rows
    monkeypatch.setattr(prompts, "greedy_rows", lambda m, t, rows, n: seen.extend(rows) or real(m, t, rows, n))
    context_templates(model, byte_tok_with_bos, 3, 6)
    context_templates(model, tok, 3, 6)
    starters = [tok(s, add_special_tokens=False).input_ids for s in prompts.STARTERS[:3]]
    assert seen == [[tok.eos_token_id] + ids for ids in starters] * 2


def _one_at_a_time(model, ids: list[int], n: int) -> torch.Tensor:
    x = torch.tensor([ids])
    return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)[0]


@pytest.mark.parametrize("kind_fixture", ["tiny_llama", "tiny_gpt2"])
def test_context_templates_decode_starters_of_one_length_together_as_alone(request, kind_fixture):
    """Ten starters of byte lengths 1-9 (groups of up to three decode as one batch) give the templates
    that decoding each starter alone with generate gives."""
    model, tok = request.getfixturevalue(kind_fixture)
    expected = ["{}"]
    for starter in prompts.STARTERS:
        ids = document_start(tok) + tok(starter).input_ids
        text = tok.decode(_one_at_a_time(model, ids, 6), skip_special_tokens=True)
        expected.append(" ".join(text.replace("{", " ").replace("}", " ").split()) + ". {}")
    assert context_templates(model, tok, len(prompts.STARTERS), 6) == expected


def test_greedy_rows_cut_each_row_at_its_own_end(tiny_llama):
    """A row of a batch that reaches an end-of-sequence token before the others ends there, as it does alone."""
    model, tok = tiny_llama
    rows = [[tok.eos_token_id] + tok(s).input_ids for s in ("The", "You", "She")]
    model.generation_config.eos_token_id = None
    free = [_one_at_a_time(model, r, 8) for r in rows]
    end = int(free[0][len(rows[0]) + 2])  # row 0 stops at or before its third new token
    model.generation_config.eos_token_id = end
    alone = [_one_at_a_time(model, r, 8) for r in rows]
    assert int(alone[0][-1]) == end and len(alone[0]) <= len(rows[0]) + 3 < max(len(a) for a in alone)
    got = prompts.greedy_rows(model, tok, rows, 8)
    assert [g.tolist() for g in got] == [a.tolist() for a in alone]
    with pytest.raises(ValueError, match="one length"):
        prompts.greedy_rows(model, tok, [rows[0], rows[0][:2]], 8)


@pytest.mark.parametrize("kind_fixture", ["tiny_llama", "tiny_gpt2"])
def test_greedy_continues_texts_of_mixed_lengths_as_each_alone(request, kind_fixture):
    """`greedy` decodes texts of one token length together and returns every text's own continuation, in
    the texts' order, as decoding it alone after the document start does."""
    model, tok = request.getfixturevalue(kind_fixture)
    texts = ["The", "Paris is", "You", "A cat sat", "It is"]  # byte lengths 3, 8, 3, 9, 5
    expected = []
    for text in texts:
        ids = document_start(tok) + tok(text).input_ids
        expected.append(tok.decode(_one_at_a_time(model, ids, 5)[len(ids) :], skip_special_tokens=True))
    assert prompts.greedy(model, tok, texts, 5) == expected
    assert len(set(expected)) > 1  # the texts do not all continue alike, so an order mix-up would show


@pytest.mark.parametrize("kind_fixture", ["tiny_llama", "tiny_gpt2"])
def test_keys_and_hidden_average_over_templates(request, kind_fixture, facts):
    model, tok = request.getfixturevalue(kind_fixture)
    adapter = ModelAdapter(model)
    templates = ["{}", "Once upon a time there was a story. {}"]
    layers, top = [1, 2], 3
    keys, hidden = keys_and_hidden(adapter, tok, facts, templates, layers, top)
    assert sorted(keys) == layers and hidden is not None
    assert hidden.shape == (len(facts), 32)
    for l in layers:
        assert keys[l].shape == (len(facts), 64)
    for i, fact in enumerate(facts):
        per_template = {l: [] for l in layers}
        for j, t in enumerate(templates):
            prompt = t.replace("{}", fact.prompt)
            enc = encode(tok, [prompt], [fact.subject])  # alone: no padding at all
            ks, outs = adapter.trace(enc.input_ids, enc.attention_mask, layers, [top])
            pos = int(enc.subject_pos[0])
            for l in layers:
                per_template[l].append(ks[l][0, pos])
            if j == 0:
                assert torch.allclose(hidden[i], outs[top][0, pos], atol=1e-5)
        for l in layers:
            manual = (per_template[l][0] + per_template[l][1]) / 2
            assert torch.allclose(keys[l][i], manual, atol=1e-5)
            # really an average, not one of the two templates
            assert not torch.allclose(keys[l][i], per_template[l][0], atol=1e-4)
    no_hidden_keys, none = keys_and_hidden(adapter, tok, facts, templates, [1])
    assert none is None
    assert torch.allclose(no_hidden_keys[1], keys[1], atol=1e-6)


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-gemma3"])
def test_layer_keys_equal_a_full_trace_while_the_layers_are_written(kind, facts):
    """MEMIT's order: keys of layer l, write W_out of l, keys of l+1, …; LayerKeys (which reruns only the
    blocks from the last written layer up) against `keys_and_hidden` (every block from the tokens) on the
    same, progressively edited, model."""
    model, tok = tiny_model(kind, seed=0, n_layers=6)
    adapter = ModelAdapter(model)
    templates = ["{}", "Once upon a time there was a story. {}", "Well. {}"]
    layers, out_layer = [1, 2, 4], 4
    walker = LayerKeys(adapter, tok, facts, templates, out_layer)
    gen = torch.Generator().manual_seed(1)
    for l in layers:
        keys, hidden = walker(l)
        full_keys, full_hidden = keys_and_hidden(adapter, tok, facts, templates, [l], out_layer)
        assert torch.allclose(keys[l], full_keys[l], rtol=1e-5, atol=1e-5)
        assert torch.allclose(hidden, full_hidden, rtol=1e-5, atol=1e-5)
        weight = adapter.w_out_weight(l)
        with torch.no_grad():  # an edit large enough that keys read on the unedited layer would differ
            weight += 0.5 * torch.randn(weight.shape, generator=gen)


def test_layer_keys_run_only_the_blocks_above_the_last_written_layer(facts):
    """The saving is real: after the first layer, block 0 never runs again (so a change to it, which the
    contract forbids, goes unseen), and each later call runs the blocks from the previous layer up."""
    model, tok = tiny_model("tiny-llama", seed=0, n_layers=6)
    adapter = ModelAdapter(model)
    runs: list[int] = []
    for b, block in enumerate(adapter.blocks):
        block.register_forward_pre_hook(lambda _m, _i, b=b: runs.append(b))
    walker = LayerKeys(adapter, tok, facts, ["{}", "Well. {}"], out_layer=4)
    with_bare = [len(b) > 0 for b in walker.bare]  # per row block (of one length), whether it holds bare prompts

    def per_block(keys: list[int], bare: list[int]) -> list[int]:
        return [b for has_bare in with_bare for b in keys + (bare if has_bare else [])]

    walker(2)
    assert runs == per_block([0, 1, 2], [0, 1, 2, 3, 4])  # keys of every row to 2; z's layer on the bare rows
    runs.clear()
    walker(3)
    assert runs == per_block([2, 3], [2, 3, 4])
    runs.clear()
    walker(4)
    assert runs == per_block([3, 4], [])  # z's layer is this one: one trace serves both
    with pytest.raises(AssertionError, match="increasing"):
        walker(4)
