"""Model loading / saving / fingerprinting and the architecture adapter, on every tiny architecture."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from ece.editing.zvec import split_at_subject
from ece.errors import EceError
from ece.model.adapter import ARCHITECTURES, ModelAdapter
from ece.model.loading import load_model, model_fingerprint, save_model, tiny_model


def _batch(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask for texts of different lengths."""
    rows = [tok(t, add_special_tokens=False).input_ids for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


KINDS = ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-gemma3"]
TEXTS = ["The Eiffel Tower is in Paris.", "Hi there", "A much longer sentence that needs no padding at all."]


# --- w_out_weight ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_w_out_weight_is_d_by_f(kind):
    model, _ = tiny_model(kind)
    adapter = ModelAdapter(model)
    assert (adapter.hidden_size, adapter.inner_size) == (32, 64)
    for l in range(adapter.n_layers):
        w = adapter.w_out_weight(l)
        assert tuple(w.shape) == (32, 64)
        module = adapter.w_out_module(l)
        if kind == "tiny-gpt2":
            # Conv1D stores (in, out) = (f, d): the adapter must transpose it.
            assert tuple(module.weight.shape) == (64, 32)
            assert torch.equal(w, module.weight.T)
        else:
            assert tuple(module.weight.shape) == (32, 64)
            assert torch.equal(w, module.weight)
        # w_out_name points at the very same tensor in the state dict
        assert adapter.w_out_name(l) in model.state_dict()
        assert model.state_dict()[adapter.w_out_name(l)].data_ptr() == module.weight.data_ptr()


@pytest.mark.parametrize("kind", KINDS)
def test_w_out_weight_is_a_view_that_edits_the_model(kind):
    model, tok = tiny_model(kind)
    adapter = ModelAdapter(model)
    ids, mask = _batch(tok, TEXTS[:1])
    before = model(input_ids=ids, attention_mask=mask).logits.clone()
    w = adapter.w_out_weight(1)
    keys, _ = adapter.trace(ids, mask, key_layers=[1])
    k = keys[1][0, -1]  # W_out input at the last token
    col = int(k.abs().argmax())  # a neuron that is active there
    bump = torch.randn(32) * 5.0  # not constant across d: GPT-2's LayerNorm would remove a constant shift
    with torch.no_grad():
        w[:, col] += bump
    after = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(before, after, atol=1e-3)
    # exactly that column of the stored weight changed (row of the Conv1D weight for GPT-2)
    stored = adapter.w_out_module(1).weight
    column = stored[col] if kind == "tiny-gpt2" else stored[:, col]
    fresh, _ = tiny_model(kind)
    fresh_stored = ModelAdapter(fresh).w_out_module(1).weight
    fresh_column = fresh_stored[col] if kind == "tiny-gpt2" else fresh_stored[:, col]
    assert torch.allclose(column, fresh_column + bump)
    diff = (stored != fresh_stored).nonzero()
    axis = 0 if kind == "tiny-gpt2" else 1
    assert set(diff[:, axis].tolist()) == {col}


# --- trace -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_trace_matches_manual_hooks(kind):
    model, tok = tiny_model(kind)
    adapter = ModelAdapter(model)
    ids, mask = _batch(tok, TEXTS)
    seen_in: dict[int, torch.Tensor] = {}
    seen_out: dict[int, torch.Tensor] = {}
    handles = []
    for l in range(adapter.n_layers):
        handles.append(
            adapter.w_out_module(l).register_forward_hook(
                lambda _m, inp, _o, l=l: seen_in.__setitem__(l, inp[0].detach().clone())
            )
        )
        handles.append(
            adapter.blocks[l].register_forward_hook(
                lambda _m, _i, out, l=l: seen_out.__setitem__(
                    l, (out[0] if isinstance(out, tuple) else out).detach().clone()
                )
            )
        )
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for h in handles:
        h.remove()

    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    keys, outs = adapter.trace(ids, mask, key_layers=[0, 2], out_layers=[1, 2])
    assert sorted(keys) == [0, 2] and sorted(outs) == [1, 2]
    for l in (0, 2):
        assert keys[l].shape == (3, ids.shape[1], 64)
        assert torch.equal(keys[l], seen_in[l])
    for l in (1, 2):
        assert outs[l].shape == (3, ids.shape[1], 32)
        assert torch.equal(outs[l], seen_out[l])
        # also the residual stream HF reports after block l
        assert torch.allclose(outs[l], full.hidden_states[l + 1], atol=1e-6)
    # no hook is left behind
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == n_hooks


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("key_layers", "out_layers", "top"), [([1], [], 1), ([0], [2], 2), ([], [0], 0), ([3], [1], 3)]
)
def test_trace_stops_after_highest_requested_layer(kind, key_layers, out_layers, top):
    model, tok = tiny_model(kind)
    adapter = ModelAdapter(model)
    ids, mask = _batch(tok, TEXTS)
    calls = [0] * adapter.n_layers
    handles = [
        adapter.blocks[l].register_forward_pre_hook(lambda _m, _i, l=l: calls.__setitem__(l, calls[l] + 1))
        for l in range(adapter.n_layers)
    ]
    w_out_calls = [0] * adapter.n_layers
    handles += [
        adapter.w_out_module(l).register_forward_hook(lambda *_a, l=l: w_out_calls.__setitem__(l, w_out_calls[l] + 1))
        for l in range(adapter.n_layers)
    ]
    lm_head_calls = []
    handles.append(model.get_output_embeddings().register_forward_hook(lambda *a: lm_head_calls.append(1)))
    try:
        adapter.trace(ids, mask, key_layers=key_layers, out_layers=out_layers)
    finally:
        for h in handles:
            h.remove()
    assert calls == [1 if l <= top else 0 for l in range(adapter.n_layers)]
    # the top layer's W_out runs only when its block output is asked for: its input is the key
    assert w_out_calls == [1 if l < top or (l == top and top in out_layers) else 0 for l in range(adapter.n_layers)]
    assert lm_head_calls == []


# --- final_hidden_from -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_final_hidden_from_reproduces_full_logits_every_layer(kind):
    model, tok = tiny_model(kind)
    adapter = ModelAdapter(model)
    ids, mask = _batch(tok, TEXTS)
    assert (mask == 0).any()  # right padding is exercised
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        _, outs = adapter.trace(ids, mask, out_layers=list(range(adapter.n_layers)))
        for l in range(adapter.n_layers):
            logits = adapter.lm_head(adapter.final_hidden_from(l, outs[l], mask))
            real = mask.bool()
            assert torch.allclose(logits[real], ref[real], atol=1e-5), f"layer {l}"
    # the blocks are restored afterwards
    assert adapter.model.get_submodule(adapter.spec.blocks) is adapter.blocks
    assert len(adapter.blocks) == 4


@pytest.mark.parametrize("kind", KINDS)
def test_final_hidden_from_runs_only_blocks_above_and_is_differentiable(kind):
    model, tok = tiny_model(kind)
    adapter = ModelAdapter(model)
    ids, mask = _batch(tok, TEXTS[:2])
    _, outs = adapter.trace(ids, mask, out_layers=[1])
    calls = [0] * adapter.n_layers
    handles = [
        adapter.blocks[l].register_forward_pre_hook(lambda _m, _i, l=l: calls.__setitem__(l, calls[l] + 1))
        for l in range(adapter.n_layers)
    ]
    hidden = outs[1].clone().requires_grad_(True)
    try:
        final = adapter.final_hidden_from(1, hidden, mask)
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 0, 1, 1]
    final.sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layer", [0, 2])
def test_frozen_prefix_gives_the_full_forward_on_the_later_tokens(kind, layer):
    """Running only each row's tokens from `pos` on against the cached prefix equals the full forward,
    with rows of different prefix lengths (one of them empty) and padding."""
    model, tok = tiny_model(kind)
    adapter = ModelAdapter(model)
    ids, mask = _batch(tok, TEXTS)
    pos = torch.tensor([5, 0, 11])
    with torch.no_grad():
        _, outs = adapter.trace(ids, mask, out_layers=[layer])
        full = adapter.final_hidden_from(layer, outs[layer], mask)
        n_prefix, index, real, attn = split_at_subject(mask, pos)
        rows = torch.arange(len(pos))[:, None]
        prefix = adapter.prefix_kv(layer, outs[layer][:, :n_prefix], mask[:, :n_prefix])
        part = adapter.final_hidden_from(layer, outs[layer][rows, index], attn, index, prefix)
    assert set(prefix) == set(range(layer + 1, adapter.n_layers))
    assert torch.allclose(part[real], full[rows, index][real], atol=1e-5)
    # the prefix is not extended by use: a second call gives the same
    again = adapter.final_hidden_from(layer, outs[layer][rows, index], attn, index, prefix)
    assert torch.equal(again, part)


def test_final_hidden_from_restores_blocks_after_an_error(tiny_llama):
    model, _ = tiny_llama
    adapter = ModelAdapter(model)
    with pytest.raises(RuntimeError, match="size of tensor"):
        adapter.final_hidden_from(1, torch.zeros(1, 3, 7), torch.ones(1, 3, dtype=torch.long))  # wrong d
    assert model.model.layers is adapter.blocks


# --- errors -----------------------------------------------------------------------------------


def test_unknown_architecture_names_supported_ones(tiny_llama):
    model, _ = tiny_llama
    model.config.model_type = "bert-like-thing"
    with pytest.raises(EceError) as err:
        ModelAdapter(model)
    text = str(err.value)
    assert "bert-like-thing" in text
    for name in ARCHITECTURES:
        assert name in text


@pytest.mark.parametrize("bad", [[4], [-1], [0, 7]])
def test_check_layers_out_of_range(tiny_gpt2, bad):
    adapter = ModelAdapter(tiny_gpt2[0])
    with pytest.raises(EceError, match="out of range"):
        adapter.check_layers(bad)
    adapter.check_layers([0, 1, 2, 3])  # in range: no error


def test_tiny_model_unknown_kind():
    with pytest.raises(EceError, match="tiny-llama"):
        tiny_model("tiny-bert")


# --- load_model --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["/nonexistent/model/folder", "./no-such-model-dir"])
def test_load_model_missing_local_path(name):
    with pytest.raises(EceError) as err:
        load_model(name)
    assert name in str(err.value)


def test_load_model_existing_path_without_config(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(EceError, match="not a Hugging Face model folder"):
        load_model(str(f))


def test_load_model_empty_folder(tmp_path):
    with pytest.raises(EceError, match="cannot load model"):
        load_model(str(tmp_path))


def test_load_model_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "no-such-org-xyz/no-such-model-xyz"
    with pytest.raises(EceError) as err:
        load_model(name)
    assert name in str(err.value)
    assert "offline" in str(err.value)
    assert err.value.hint and "local" in err.value.hint


def test_load_model_tiny_names():
    model, tok = load_model("tiny-gpt2")
    assert model.config.model_type == "gpt2" and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token_id is not None


# --- fingerprint -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_model_fingerprint_stable_and_discriminating(kind):
    a, _ = tiny_model(kind, seed=0)
    b, _ = tiny_model(kind, seed=0)
    fp = model_fingerprint(a)
    assert fp == model_fingerprint(a) == model_fingerprint(b)
    assert len(fp) == 16
    adapter = ModelAdapter(a)
    with torch.no_grad():
        adapter.w_out_weight(2)[0, 0] += 1.0  # index 0 is in the strided sample
    assert model_fingerprint(a) != fp
    c, _ = tiny_model(kind, seed=1)
    assert model_fingerprint(c) != fp


def test_model_fingerprint_differs_between_architectures():
    assert model_fingerprint(tiny_model("tiny-llama")[0]) != model_fingerprint(tiny_model("tiny-gpt2")[0])


# --- save_model --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_save_model_round_trip(kind, tmp_path):
    model, tok = tiny_model(kind)
    adapter = ModelAdapter(model)
    with torch.no_grad():
        adapter.w_out_weight(1)[:, 3] += 0.5  # an edited model must save its edit
    folder = tmp_path / "out" / "edited"
    save_model(model, tok, folder)
    assert (folder / "config.json").exists()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids, mask = _batch(tok, TEXTS)
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, attention_mask=mask).logits, loaded(input_ids=ids, attention_mask=mask).logits
        )
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # and through the project's own loader (local folder), with the tokenizer
    again, tok2 = load_model(str(folder))
    assert tok2("hello").input_ids == tok("hello").input_ids
    with torch.no_grad():
        assert torch.equal(
            again(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits
        )
    # saving again over an existing folder replaces it
    save_model(model, tok, folder)
    assert (folder / "config.json").exists()


def test_model_fingerprint_does_not_depend_on_the_folder(tmp_path):
    model, tok = tiny_model("tiny-llama")
    save_model(model, tok, tmp_path / "a")
    save_model(model, tok, tmp_path / "b")
    a, _ = load_model(str(tmp_path / "a"))
    b, _ = load_model(str(tmp_path / "b"))
    assert model_fingerprint(a) == model_fingerprint(b)
