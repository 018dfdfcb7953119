"""Sequential batch editing: for each batch and each edited layer (ascending), keys on the current
model, the residual spread over the remaining layers, the restricted solve, and the reference-knowledge
cache P that makes later batches protect what earlier batches wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from ece.adapter import ModelAdapter
from ece.errors import EceError
from ece.keys import Fact, keys_and_hidden
from ece.update import restricted_update


@dataclass
class LayerChange:
    cols: Tensor  # changed column indices (ascending)
    old: Tensor  # (d, |cols|) before
    new: Tensor  # (d, |cols|) after


@dataclass
class Editor:
    """Holds what persists across batches: C0, the cache P of edited keys, and the settings."""

    adapter: ModelAdapter
    tok: PreTrainedTokenizerBase
    layers: list[int]
    templates: list[str]
    c0: dict[int, Tensor]
    mom2_update_weight: float
    use_cache: bool  # ECE/AlphaEdit accumulate P; MEMIT does not
    max_update_norm: float = 1e4
    cache: dict[int, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        f = self.adapter.inner_size
        for l in self.layers:
            self.cache.setdefault(l, torch.zeros(f, f, dtype=torch.float64))

    def _apply_layer(self, facts: list[Fact], z: Tensor, i: int, cols: Tensor | None) -> LayerChange:
        layer = self.layers[i]
        keys, hidden = keys_and_hidden(self.adapter, self.tok, facts, self.templates, [layer], self.layers[-1])
        assert hidden is not None
        residuals = (z.double() - hidden.double()) / (len(self.layers) - i)
        penalty = self.mom2_update_weight * self.c0[layer] + self.cache[layer]
        sel = cols if cols is not None else torch.arange(self.adapter.inner_size)
        try:
            delta = restricted_update(keys[layer], residuals, penalty, sel)
        except EceError as exc:
            raise EceError(f"layer {layer}: {exc.args[0]}", exc.hint) from None
        norm = float(delta.norm())
        if not torch.isfinite(delta).all() or norm > self.max_update_norm:
            raise EceError(
                f"layer {layer}: the update is not finite or explodes (‖Δ‖ = {norm:.3g})",
                "check the covariance statistics and z; raise update.mom2_update_weight",
            )
        weight = self.adapter.w_out_weight(layer)
        old = weight[:, sel].clone()
        with torch.no_grad():
            weight[:, sel] += delta.to(weight.dtype)
        return LayerChange(sel, old, weight[:, sel].clone())

    def revert(self, changes: dict[int, LayerChange]) -> None:
        """Put back the columns a (partial) batch changed."""
        with torch.no_grad():
            for layer, change in changes.items():
                self.adapter.w_out_weight(layer)[:, change.cols] = change.old

    def apply_batch(self, facts: list[Fact], z: Tensor, cols: dict[int, Tensor] | None) -> dict[int, LayerChange]:
        """Write one batch into the model in place; `cols[l]` restricts layer l (None: all columns)."""
        changes: dict[int, LayerChange] = {}
        try:
            for i, layer in enumerate(self.layers):
                changes[layer] = self._apply_layer(facts, z, i, cols[layer] if cols is not None else None)
        except BaseException:
            self.revert(changes)  # a batch is written whole or not at all
            raise
        if self.use_cache:
            keys, _ = keys_and_hidden(self.adapter, self.tok, facts, self.templates, self.layers)
            for layer in self.layers:
                k = keys[layer].double()
                self.cache[layer] += k.T @ k
        return changes
