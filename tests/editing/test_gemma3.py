"""Gemma-3 through the adapter, on a tiny random Gemma3ForCausalLM (d = 32, f = 64, local and global
layers alternating, random norm gains): keys, hidden states, the post-MLP norm's target map, z and one
MEMIT and one ECE batch.

The references are computed here without the adapter: each MLP's input captured with a plain forward
hook and its down_proj input formed by hand (gelu_tanh(gate x) * up x), HF's own hidden states, and the
real post_feedforward_layernorm module for the target map.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma3ForCausalLM

import ece
from ece.config import EditCfg, Params, UpdateCfg, ZCfg
from ece.editing.covariance import second_moments
from ece.editing.keys import keys_and_hidden
from ece.editing.zvec import split_at_subject
from ece.errors import EceError
from ece.model.adapter import ModelAdapter
from ece.model.loading import tiny_model

LAYERS = [1, 2]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Paris is the capital of France, and Rome is the capital of Italy. " * 3,
    "Knowledge editing rewrites facts stored in the weights of a model. " * 3,
]


@pytest.fixture
def gemma():
    return tiny_model("tiny-gemma3", seed=0)


def _by_hand(model, tok, fact) -> tuple[dict[int, torch.Tensor], tuple[torch.Tensor, ...], int]:
    """down_proj's input per layer formed from the MLP's captured input, HF's hidden states, and the
    subject's last position, for one fact run alone (byte tokenizer: one token per ASCII byte, after
    the document start <|endoftext|>)."""
    text = fact.prompt.replace("{}", fact.subject)
    end = text.index(fact.subject) + len(fact.subject)
    ids = torch.tensor([[tok.eos_token_id] + tok(text).input_ids])
    assert ids.shape[1] == 1 + len(text.encode())  # one token per byte, nothing added
    mlp_in: dict[int, torch.Tensor] = {}
    hooks = [
        model.model.layers[l].mlp.register_forward_hook(lambda _m, inp, _o, l=l: mlp_in.__setitem__(l, inp[0]))
        for l in LAYERS
    ]
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    keys = {}
    for l in LAYERS:
        mlp = model.model.layers[l].mlp
        x = mlp_in[l][0]
        keys[l] = F.gelu(x @ mlp.gate_proj.weight.T, approximate="tanh") * (x @ mlp.up_proj.weight.T)
    return keys, out.hidden_states, end  # position of the subject's last byte = end (after the start token)


def test_keys_and_hidden_are_down_proj_input_and_residual_stream(gemma, facts):
    model, tok = gemma
    adapter = ModelAdapter(model)
    assert (adapter.hidden_size, adapter.inner_size) == (32, 64)
    keys, hidden = keys_and_hidden(adapter, tok, facts, ["{}"], LAYERS, LAYERS[-1])
    for i, fact in enumerate(facts):
        ref_keys, states, pos = _by_hand(model, tok, fact)
        for l in LAYERS:
            assert torch.allclose(keys[l][i], ref_keys[l][pos], atol=1e-6), (fact.id, l)
        # the block output is the residual stream HF reports after block l (the scaled embedding below
        # it, the post-feedforward norm inside it). Entries reach ~15, where float32's spacing is ~1e-6: a
        # padded batch and a single row sum in different orders (8e-6 seen on an AVX2 CPU), hence 1e-5.
        assert torch.allclose(hidden[i], states[LAYERS[-1] + 1][0, pos], atol=1e-5), fact.id


def test_w_out_target_points_the_normed_output_at_y_plus_r(gemma, facts):
    """Writing t = w_out_target(r) into W_out's output m makes the real post-feedforward norm's output
    exactly parallel to y + r; writing r itself (right for Llama) does not."""
    model, tok = gemma
    adapter = ModelAdapter(model)
    keys, _ = keys_and_hidden(adapter, tok, facts, ["{}"], LAYERS)
    g = torch.Generator().manual_seed(0)
    for l in LAYERS:
        norm = model.model.layers[l].post_feedforward_layernorm
        m = keys[l].double() @ adapter.w_out_weight(l).double().T
        y = norm(m.float()).double()
        r = 0.3 * y.norm(dim=1, keepdim=True) * torch.randn(y.shape, generator=g, dtype=torch.float64) / 32**0.5
        t = adapter.w_out_target(l, keys[l], r)
        moved = norm((m + t).float()).double()
        assert (F.cosine_similarity(moved, y + r, dim=1) > 1 - 1e-5).all()
        naive = norm((m + r).float()).double()
        assert (F.cosine_similarity(naive, y + r, dim=1) < 1 - 1e-3).all()
    # a coordinate the layer does not write (gain 0, as a few of Gemma-3-270M's): nothing asked of it there
    with torch.no_grad():
        model.model.layers[1].post_feedforward_layernorm.weight[5] = -1.0
    t = adapter.w_out_target(1, keys[1], torch.ones(len(facts), 32))
    assert torch.isfinite(t).all() and (t[:, 5] == 0).all() and (t[:, :5] != 0).all()
    llama = ModelAdapter(tiny_model("tiny-llama")[0])
    r = torch.randn(4, 32)
    assert llama.w_out_target(1, torch.randn(4, 64), r) is r  # no post-MLP norm: the residual itself


@pytest.mark.parametrize("method", ["memit", "ece"])
def test_one_batch_edits_only_w_out_of_the_edited_layers_towards_z(gemma, facts, method):
    model, tok = gemma
    adapter = ModelAdapter(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c0, _ = second_moments(adapter, tok, LAYERS, CORPUS, 400, seq_len=32, batch_size=4, progress=False)
    p = Params(
        method=method,
        edit=EditCfg(layers=LAYERS, batch_size=len(facts)),
        # the bare prompt only: the solve's key is then the bare prompt's key, whose hidden state is
        # compared with z below (a random model's generated contexts give it unrelated keys)
        z=ZCfg(shared_steps=5, instance_steps=10, lr=0.5, n_context=0),
        update=UpdateCfg(mom2_update_weight=1.0),
    )
    _, h0 = keys_and_hidden(adapter, tok, facts, ["{}"], [], LAYERS[-1])
    result = ece.edit(model, tok, facts, params=p, covariance=c0, log=lambda _: None)
    z = result.plans[0].z
    assert z is not None and z.shape == (len(facts), 32)
    edited = {adapter.w_out_name(l) for l in LAYERS}
    after = model.state_dict()
    for name, old in before.items():
        if name in edited:
            assert not torch.equal(old, after[name]), f"{name} did not change"
        else:
            assert torch.equal(old, after[name]), f"{name} changed"
    # the write moved the last edited layer's output towards z, fact by fact
    _, h1 = keys_and_hidden(adapter, tok, facts, ["{}"], [], LAYERS[-1])
    assert ((h1 - z).norm(dim=1) < (h0 - z).norm(dim=1)).all()


def test_blocks_above_keep_their_sliding_windows():
    """With a window shorter than the text, running the blocks above l from the residual stream gives
    the full forward's logits: each block keeps its own layer type (mask and rope base)."""
    model, tok = tiny_model("tiny-gemma3")
    config = copy.deepcopy(model.config)
    config.sliding_window = 6
    small = Gemma3ForCausalLM(config).eval()
    adapter = ModelAdapter(small)
    ids = torch.tensor([tok("Knowledge editing rewrites facts.").input_ids])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = small(input_ids=ids, attention_mask=mask).logits
        full_window = model(input_ids=ids, attention_mask=mask).logits
        _, outs = adapter.trace(ids, mask, out_layers=list(range(adapter.n_layers)))
        for l in range(adapter.n_layers):
            assert torch.allclose(adapter.lm_head(adapter.final_hidden_from(l, outs[l], mask)), ref, atol=1e-5), l
    assert not torch.allclose(ref, full_window, atol=1e-3)  # the window does change the output
    assert small.config.layer_types == config.layer_types  # restored


def test_frozen_prefix_longer_than_the_window_is_refused():
    model, tok = tiny_model("tiny-gemma3")
    model.config.sliding_window = 6
    adapter = ModelAdapter(model)
    ids = torch.tensor([tok("Knowledge editing").input_ids])
    mask = torch.ones_like(ids)
    _, outs = adapter.trace(ids, mask, out_layers=[1])
    n_prefix, index, _, attn = split_at_subject(mask, torch.tensor([4]))
    prefix = adapter.prefix_kv(1, outs[1][:, :n_prefix], mask[:, :n_prefix])
    with pytest.raises(EceError, match="sliding window"):
        adapter.final_hidden_from(1, outs[1][:, index[0]], attn, index, prefix)
