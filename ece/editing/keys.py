"""Keys: the inputs of W_out at the subject's last token, averaged over the context templates."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from ece.data.facts import Fact
from ece.model.adapter import ModelAdapter
from ece.model.prompts import at_positions, encode


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


def _template_mean(keys: dict[int, Tensor], subject_pos: Tensor, n: int, t: int) -> dict[int, Tensor]:
    """Per layer, (n·t, seq, f) W_out inputs → (n, f): each row's key at its subject, weighted over templates."""
    w = template_weights(t)[None, :, None]
    return {l: (at_positions(k, subject_pos).reshape(n, t, -1) * w.to(k.device)).sum(1) for l, k in keys.items()}


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
    at the subject on the bare prompt (template "{}", which must come first)."""
    prompts, subjects = templated(facts, templates)
    enc = encode(tok, prompts, subjects, up_to_subject=True)
    keys, outs = adapter.trace(
        enc.input_ids, enc.attention_mask, key_layers, [out_layer] if out_layer is not None else []
    )
    n, t = len(facts), len(templates)
    hidden = None
    if out_layer is not None:
        hidden = at_positions(outs[out_layer], enc.subject_pos).reshape(n, t, -1)[:, 0]
    return _template_mean(keys, enc.subject_pos, n, t), hidden


class LayerKeys:
    """`keys_and_hidden(…, [layer], out_layer)` for the edited layers of one batch in MEMIT's order: each
    layer's keys on the model in which the layers below it have just been written.

    Only the blocks from the last written layer up are run again: a call for layer l also keeps the
    residual stream entering block l, and block l is the only one written before the next call, so
    that call starts from there. The block output at `out_layer` (z's layer) needs only the bare
    prompts, so it is traced on those rows alone. For layers 3-7 of SmolLM2 this runs 2 blocks per
    layer for the keys instead of all blocks up to out_layer, about 2.5x fewer block passes; the result
    equals `keys_and_hidden` up to float rounding (tested).

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
        self.bare = torch.arange(self.n) * self.t  # rows of template "{}"
        self.resume: tuple[int, Tensor] | None = None  # (block b, the stream entering b for every row)
        self.last = -1

    def _trace(
        self, rows: Tensor | None, key_layers: list[int], out_layers: list[int]
    ) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """Trace the prompts `rows` (None: all of them, without copying the kept stream)."""
        ids, mask = self.enc.input_ids, self.enc.attention_mask
        if rows is not None:
            ids, mask = ids[rows], mask[rows]
        if self.resume is None:
            return self.adapter.trace(ids, mask, key_layers, out_layers)
        block, stream = self.resume
        stream = stream if rows is None else stream[rows.to(stream.device)]
        return self.adapter.trace_from(block, stream, mask, key_layers, out_layers)

    @torch.no_grad()
    def __call__(self, layer: int) -> tuple[dict[int, Tensor], Tensor]:
        assert self.last < layer <= self.out_layer, "layers must come in increasing order, up to out_layer"
        entering = [layer - 1] if layer >= 1 else []  # the stream entering `layer`, for the next call
        outs_wanted = [*entering, *([self.out_layer] if layer == self.out_layer else [])]
        keys, outs = self._trace(None, [layer], outs_wanted)
        if layer == self.out_layer:
            hidden = at_positions(outs[layer], self.enc.subject_pos)[self.bare.to(outs[layer].device)]
        else:  # from the same starting point, before `resume` moves up
            _, bare_outs = self._trace(self.bare, [], [self.out_layer])
            hidden = at_positions(bare_outs[self.out_layer], self.enc.subject_pos[self.bare])
        if entering:
            self.resume = (layer, outs[layer - 1])
        self.last = layer
        return _template_mean(keys, self.enc.subject_pos, self.n, self.t), hidden
