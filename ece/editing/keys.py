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
    enc = encode(tok, prompts, subjects)
    keys, outs = adapter.trace(
        enc.input_ids, enc.attention_mask, key_layers, [out_layer] if out_layer is not None else []
    )
    n, t = len(facts), len(templates)
    w = template_weights(t)[None, :, None]
    mean_keys = {
        l: (at_positions(k, enc.subject_pos).reshape(n, t, -1) * w.to(k.device)).sum(1) for l, k in keys.items()
    }
    hidden = None
    if out_layer is not None:
        hidden = at_positions(outs[out_layer], enc.subject_pos).reshape(n, t, -1)[:, 0]
    return mean_keys, hidden
