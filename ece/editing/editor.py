"""Sequential batch editing: for each batch and each edited layer (ascending), keys on the current
model, the residual spread over the remaining layers, the method's solve, and the reference-knowledge
cache P that makes later batches protect what earlier batches wrote (ECE, AlphaEdit).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from ece.data.facts import Fact
from ece.editing.finetune import finetune_delta
from ece.editing.keys import keys_and_hidden
from ece.editing.solve import nullspace_basis, projected_update, restricted_update
from ece.errors import EceError
from ece.methods import Method
from ece.model.adapter import ModelAdapter

PHASES = ("keys", "solve", "cache")  # where an update's seconds go: keys on the current model, the
# solve (fine-tuning counts as solve), and growing the cache P


@dataclass
class LayerChange:
    cols: Tensor  # changed column indices (ascending)
    old: Tensor  # (d, |cols|) before
    new: Tensor  # (d, |cols|) after
    cond: float = float("nan")  # largest condition number of the systems solved (NaN: no solve)


@dataclass
class Editor:
    """Holds what persists across batches: C0, the cache P of edited keys, and the method."""

    adapter: ModelAdapter
    tok: PreTrainedTokenizerBase
    method: Method
    templates: list[str]
    c0: dict[int, Tensor]
    max_update_norm: float = 1e4
    cache: dict[int, Tensor] = field(default_factory=dict)
    nullspace: dict[int, Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))  # of the last batch
    solved_keys: dict[int, Tensor] = field(default_factory=dict)  # keys the last batch added to P (cache methods)

    def __post_init__(self) -> None:
        assert not (self.method.use_cache and self.method.per_fact), "the cache reuses one solve's keys per layer"
        f = self.adapter.inner_size
        for l in self.layers:
            self.cache.setdefault(l, torch.zeros(f, f, dtype=torch.float64))
            if self.method.nullspace_threshold is not None and l not in self.nullspace:
                self.nullspace[l] = nullspace_basis(self.c0[l], self.method.nullspace_threshold)

    @property
    def layers(self) -> list[int]:
        return list(self.method.layers)

    def _delta(
        self, facts: list[Fact], z: Tensor | None, i: int, sel: Tensor, conditions: list[float]
    ) -> tuple[Tensor, Tensor | None]:
        """The method's change of W_out[:, sel] of the i-th edited layer on the current weights, and
        the keys (n, f) it solved with (None for fine-tuning)."""
        layer, m = self.layers[i], self.method
        if m.ft is not None:
            with self._timed("solve"):
                return finetune_delta(self.adapter, self.tok, facts, layer, m.ft, m.target_only), None
        assert z is not None, f"method {m.name} needs z"
        with self._timed("keys"):
            keys, hidden = keys_and_hidden(self.adapter, self.tok, facts, self.templates, [layer], self.layers[-1])
        assert hidden is not None
        residuals = self.adapter.w_out_target(
            layer, keys[layer], (z.double() - hidden.double()) / (len(self.layers) - i)
        )
        with self._timed("solve"):
            if m.nullspace_threshold is not None:
                penalty = self.cache[layer] + m.l2 * torch.eye(self.adapter.inner_size, dtype=torch.float64)
                return projected_update(keys[layer], residuals, penalty, self.nullspace[layer], conditions), keys[layer]
            penalty = m.mom2_weight * self.c0[layer] + self.cache[layer]
            return restricted_update(keys[layer], residuals, penalty, sel, conditions), keys[layer]

    @contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    def _apply_layer(
        self, facts: list[Fact], z: Tensor | None, i: int, cols: Tensor | None
    ) -> tuple[LayerChange, Tensor | None]:
        layer = self.layers[i]
        sel = cols if cols is not None else torch.arange(self.adapter.inner_size)
        conditions: list[float] = []
        try:
            delta, keys = self._delta(facts, z, i, sel, conditions)
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
        return LayerChange(sel, old, weight[:, sel].clone(), max(conditions, default=float("nan"))), keys

    def grow_cache(self, keys: dict[int, Tensor]) -> None:
        """P += Kᵀ K per layer with the keys a batch's solve used. A resumed run rebuilds P by calling this
        with every stored batch's keys in batch order, so it adds exactly what the uninterrupted run added."""
        for layer, k in keys.items():
            k64 = k.double()
            self.cache[layer] += k64.T @ k64

    def revert(self, changes: dict[int, LayerChange]) -> None:
        """Put back the columns a (partial) batch changed."""
        with torch.no_grad():
            for layer, change in changes.items():
                self.adapter.w_out_weight(layer)[:, change.cols] = change.old

    def apply_batch(
        self, facts: list[Fact], z: Tensor | None, cols: dict[int, Tensor] | None
    ) -> dict[int, LayerChange]:
        """Write one batch into the model in place; `cols[l]` restricts layer l (None: all columns).

        ROME writes the batch's facts one after another (one rank-one update each); the batch is
        still written whole or not at all. `seconds` afterwards holds this batch's time per phase.

        P grows by the keys each layer's solve used: keys at layer l do not depend on W_out of layers
        >= l, so they are already the keys of the edited model (one group; methods with a cache do not
        write per fact).
        """
        self.seconds = dict.fromkeys(PHASES, 0.0)
        groups = [[j] for j in range(len(facts))] if self.method.per_fact else [list(range(len(facts)))]
        changes: dict[int, list[LayerChange]] = {}
        solved: dict[int, Tensor | None] = {}
        try:
            for g in groups:
                for i, layer in enumerate(self.layers):
                    change, solved[layer] = self._apply_layer(
                        [facts[j] for j in g],
                        z[g] if z is not None else None,
                        i,
                        cols[layer] if cols is not None else None,
                    )
                    changes.setdefault(layer, []).append(change)
        except BaseException:
            self.revert({l: c[0] for l, c in changes.items()})  # the values before the batch's first change
            raise
        self.solved_keys = {l: k for l, k in solved.items() if k is not None} if self.method.use_cache else {}
        if self.method.use_cache:
            with self._timed("cache"):
                self.grow_cache(self.solved_keys)
        return {l: LayerChange(c[0].cols, c[0].old, c[-1].new, max(x.cond for x in c)) for l, c in changes.items()}
