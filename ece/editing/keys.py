"""Keys: the inputs of W_out at the subject's last token, averaged over the context templates."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from ece.data.facts import Fact
from ece.model.adapter import ModelAdapter
from ece.model.prompts import Encoded, at_positions, encode, length_blocks


def templated(facts: list[Fact], templates: list[str]) -> tuple[list[str], list[str]]:
    """Prompts and subjects for every (fact, template) pair, fact-major."""
    prompts = [t.replace("{}", f.prompt) for f in facts for t in templates]
    subjects = [f.subject for f in facts for _ in templates]
    return prompts, subjects


def template_weights(n_templates: int) -> Tensor:
    """Weights of the templates in a fact's key, MEMIT's: averaged within each kind of context (the
    bare prompt; the generated prefixes) and then across the kinds, so the bare prompt weighs ½ and
    each of the n−1 prefixes ½/(n−1)."""
    if n_templates == 1:
        return torch.ones(1)
    return torch.tensor([0.5] + [0.5 / (n_templates - 1)] * (n_templates - 1))


# One more forward of the keys' trace costs about as much as this many more tokens in one (z's measured
# value, ece.editing.zvec.BLOCK_FORWARD_COST; a forward without backward is cheaper, so this merges less).
KEY_BLOCK_COST = 64


def _template_mean(keys: dict[int, Tensor], n: int, t: int) -> dict[int, Tensor]:
    """Per layer, (n·t, f) keys of every (fact, template) row → (n, f) weighted over templates."""
    w = template_weights(t)[None, :, None]
    return {l: (k.reshape(n, t, -1) * w.to(k.device)).sum(1) for l, k in keys.items()}


def length_sorted_blocks(enc: Encoded) -> list[tuple[Tensor, int]]:
    """The rows of `enc` in blocks of about one length (`length_blocks`): (row indices, width). Each block
    is traced cut to its longest row: with right padding and causal attention a row's tokens do not
    depend on the padding after them, and a batch of prompts cut at their subjects varies in length by
    ~40 % of its padded tokens."""
    order = torch.argsort(enc.lengths, stable=True)
    return [(order[s:e], w) for s, e, w in length_blocks(enc.lengths[order], KEY_BLOCK_COST)]


def _put(into: dict[int, Tensor], got: dict[int, Tensor], rows: Tensor, pos: Tensor, n_rows: int) -> None:
    """into[l][rows] = got[l] at each row's `pos` (into[l] made (n_rows, f) on first use)."""
    for l, x in got.items():
        if l not in into:
            into[l] = x.new_empty(n_rows, x.shape[-1])
        into[l][rows.to(x.device)] = at_positions(x, pos)


@torch.no_grad()
def keys_and_hidden(
    adapter: ModelAdapter,
    tok: PreTrainedTokenizerBase,
    facts: list[Fact],
    templates: list[str],
    key_layers: list[int],
    out_layer: int | None = None,
) -> tuple[dict[int, Tensor], Tensor | None]:
    """Keys (n, f) per layer averaged over templates (`template_weights`), and the block output of `out_layer` (n, d)
    at the subject on the bare prompt (template "{}", which must come first). Every prompt is traced only
    up to its subject's last token, in blocks of about one length."""
    prompts, subjects = templated(facts, templates)
    enc = encode(tok, prompts, subjects, up_to_subject=True)
    n, t = len(facts), len(templates)
    keys: dict[int, Tensor] = {}
    outs: dict[int, Tensor] = {}
    for rows, width in length_sorted_blocks(enc):
        got_keys, got_outs = adapter.trace(
            enc.input_ids[rows, :width],
            enc.attention_mask[rows, :width],
            key_layers,
            [out_layer] if out_layer is not None else [],
        )
        _put(keys, got_keys, rows, enc.subject_pos[rows], n * t)
        _put(outs, got_outs, rows, enc.subject_pos[rows], n * t)
    hidden = outs[out_layer].reshape(n, t, -1)[:, 0] if out_layer is not None else None
    return _template_mean(keys, n, t), hidden


class LayerKeys:
    """`keys_and_hidden(…, [layer], out_layer)` for the edited layers of one batch in MEMIT's order: each
    layer's keys on the model in which the layers below it have just been written.

    Only the blocks from the last written layer up are run again: a call for layer l also keeps the
    residual stream entering block l, and block l is the only one written before the next call, so
    that call starts from there. The block output at `out_layer` (z's layer) needs only the bare
    prompts, so it is traced on those rows alone. For layers 3-7 of SmolLM2 this runs 2 blocks per
    layer for the keys instead of all blocks up to out_layer, about 2.5x fewer block passes; the result
    equals `keys_and_hidden` up to float rounding (tested). As there, prompts end at their subject and
    run in blocks of about one length (`length_sorted_blocks`), each keeping its own stream.

    The caller must ask for strictly increasing layers, no higher than `out_layer`, and change no
    block between calls except the layer it last asked for.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        tok: PreTrainedTokenizerBase,
        facts: list[Fact],
        templates: list[str],
        out_layer: int,
    ) -> None:
        prompts, subjects = templated(facts, templates)
        self.adapter, self.out_layer = adapter, out_layer
        self.enc = encode(tok, prompts, subjects, up_to_subject=True)
        self.n, self.t = len(facts), len(templates)
        self.blocks = length_sorted_blocks(self.enc)
        # per block, which of its rows are bare prompts (template "{}": row index divisible by t)
        self.bare = [torch.nonzero(rows % self.t == 0).squeeze(1) for rows, _ in self.blocks]
        self.resume: tuple[int, list[Tensor]] | None = None  # (block b, per row block the stream entering b)
        self.last = -1

    def _trace(
        self, i: int, sel: Tensor | None, key_layers: list[int], out_layers: list[int]
    ) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """Trace row block i (only its rows `sel` when given, without copying the kept stream otherwise)."""
        rows, width = self.blocks[i]
        ids, mask = self.enc.input_ids[rows, :width], self.enc.attention_mask[rows, :width]
        if sel is not None:
            ids, mask = ids[sel], mask[sel]
        if self.resume is None:
            return self.adapter.trace(ids, mask, key_layers, out_layers)
        block, streams = self.resume
        stream = streams[i] if sel is None else streams[i][sel.to(streams[i].device)]
        return self.adapter.trace_from(block, stream, mask, key_layers, out_layers)

    @torch.no_grad()
    def __call__(self, layer: int) -> tuple[dict[int, Tensor], Tensor]:
        assert self.last < layer <= self.out_layer, "layers must come in increasing order, up to out_layer"
        entering = [layer - 1] if layer >= 1 else []  # the stream entering `layer`, for the next call
        outs_wanted = [*entering, *([self.out_layer] if layer == self.out_layer else [])]
        keys: dict[int, Tensor] = {}
        outs: dict[int, Tensor] = {}
        streams = []
        for i, (rows, _) in enumerate(self.blocks):
            pos = self.enc.subject_pos[rows]
            got_keys, got_outs = self._trace(i, None, [layer], outs_wanted)
            _put(keys, got_keys, rows, pos, self.n * self.t)
            if layer == self.out_layer:
                _put(outs, {layer: got_outs[layer]}, rows, pos, self.n * self.t)
            else:  # from the same starting point, before `resume` moves up
                bare = self.bare[i]
                if len(bare):
                    _, bare_outs = self._trace(i, bare, [], [self.out_layer])
                    _put(outs, bare_outs, rows[bare], pos[bare], self.n * self.t)
            if entering:
                streams.append(got_outs[layer - 1])
        if entering:
            self.resume = (layer, streams)
        self.last = layer
        hidden = outs[self.out_layer].reshape(self.n, self.t, -1)[:, 0]
        return _template_mean(keys, self.n, self.t), hidden
