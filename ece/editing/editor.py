"""Sequential batch editing: for each batch and each edited layer (ascending), keys on the current
model, the residual spread over the remaining layers, the method's solve, and the reference-knowledge
cache P that makes later batches protect what earlier batches wrote (ECE, AlphaEdit). UltraEdit
instead reads every layer's keys and output gradients in one pass before writing, and carries its
feature moments from batch to batch (ece.editing.ultraedit).
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
from ece.editing.editor_io import TrainedEditor
from ece.editing.finetune import finetune_delta
from ece.editing.keys import LayerKeys
from ece.editing.solve import nullspace_basis, projected_update, restricted_update
from ece.editing.ultraedit import RIDGE, Moments, pseudo_values, token_features, update_moments
from ece.errors import EceError
from ece.methods import Method
from ece.model.adapter import ModelAdapter

PHASES = ("keys", "solve", "cache")  # where an update's seconds go: keys on the current model (UltraEdit:
# with the gradients), the solve (fine-tuning counts as solve), and growing the cache P (UltraEdit: its moments)
Features = dict[int, tuple[Tensor, Tensor]]  # UltraEdit: per layer, the batch's keys and output gradients


@dataclass
class LayerChange:
    cols: Tensor  # changed column indices (ascending), on the CPU
    old: Tensor  # (d, |cols|) before, on the CPU in the model's dtype
    new: Tensor  # (d, |cols|) after
    cond: float = float("nan")  # largest condition number of the systems solved (NaN: no solve)


@dataclass
class Editor:
    """Holds what persists across batches: C0, the cache P of edited keys (ECE, AlphaEdit), the feature
    moments (UltraEdit), the method, and for a method with a trained editor (MEND) that editor."""

    adapter: ModelAdapter
    tok: PreTrainedTokenizerBase
    method: Method
    templates: list[str]
    c0: dict[int, Tensor]
    max_update_norm: float = 1e4
    trained: TrainedEditor | None = None
    cache: dict[int, Tensor] = field(default_factory=dict)
    nullspace: dict[int, Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))  # of the last batch
    moments: Moments | None = None  # UltraEdit's running feature statistics, after the last batch
    carried: dict[str, Tensor] = field(default_factory=dict)  # what the last batch carries to the next (`carry`)

    def __post_init__(self) -> None:
        assert not (self.method.use_cache and self.method.per_fact), "the cache reuses one solve's keys per layer"
        if self.method.trained_editor and self.trained is None:
            raise EceError(f"method {self.method.name} needs its trained editor", "run `dvc repro train_editor`")
        f = self.adapter.inner_size
        # C0, P and the solves live where the layer's W_out does (float64 whatever the model's dtype)
        self.c0 = {l: c.to(self.adapter.layer_device(l)) for l, c in self.c0.items()}
        for l in self.layers:
            self.cache.setdefault(l, torch.zeros(f, f, dtype=torch.float64, device=self.adapter.layer_device(l)))
            if self.method.nullspace_threshold is not None and l not in self.nullspace:
                self.nullspace[l] = nullspace_basis(
                    self.c0[l], self.method.nullspace_threshold, self.method.nullspace_energy
                )
        if self.method.ultraedit is not None and self.moments is None:
            self.moments = Moments.empty(self.adapter.inner_size + self.adapter.hidden_size)

    @property
    def layers(self) -> list[int]:
        return list(self.method.layers)

    def _delta(
        self,
        facts: list[Fact],
        z: Tensor | None,
        i: int,
        sel: Tensor,
        conditions: list[float],
        lifelong: tuple[Features, Moments] | None,
        trained: dict[int, Tensor] | None,
        layer_keys: LayerKeys | None,
    ) -> tuple[Tensor, Tensor | None]:
        """The method's change of W_out[:, sel] of the i-th edited layer on the current weights, and
        the keys (n, f) it solved with (None for fine-tuning, UltraEdit and trained editors, which feed no
        cache). `lifelong`: UltraEdit's features and moments of the batch; `trained`: the trained editor's
        changes of every layer, computed for the batch before its first layer is written; `layer_keys`:
        the group's keys layer after layer, for the methods that solve for z."""
        layer, m = self.layers[i], self.method
        if trained is not None:
            return trained[layer], None
        if m.ft is not None:
            with self._timed("solve"):
                return finetune_delta(self.adapter, self.tok, facts, layer, m.ft, m.target_only), None
        if m.ultraedit is not None:
            assert lifelong is not None, "UltraEdit's features are read before the batch's first write"
            (keys, grads), moments = lifelong[0][layer], lifelong[1]
            with self._timed("solve"):
                values = pseudo_values(moments, keys, grads, m.ultraedit.lr)
                ridge = RIDGE * torch.eye(self.adapter.inner_size, dtype=torch.float64)
                return restricted_update(keys, values, ridge, sel, conditions), None
        assert z is not None and layer_keys is not None, f"method {m.name} needs z"
        with self._timed("keys"):
            keys, hidden = layer_keys(layer)
        residuals = self.adapter.w_out_target(
            layer, keys[layer], (z.to(hidden.device).double() - hidden.double()) / (len(self.layers) - i)
        )
        with self._timed("solve"):
            if m.nullspace_threshold is not None:
                penalty = self.cache[layer] + m.l2 * torch.eye(
                    self.adapter.inner_size, dtype=torch.float64, device=self.cache[layer].device
                )
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
        self,
        facts: list[Fact],
        z: Tensor | None,
        i: int,
        cols: Tensor | None,
        lifelong: tuple[Features, Moments] | None,
        trained: dict[int, Tensor] | None,
        layer_keys: LayerKeys | None,
    ) -> tuple[LayerChange, Tensor | None]:
        layer = self.layers[i]
        sel = cols if cols is not None else torch.arange(self.adapter.inner_size)
        conditions: list[float] = []
        try:
            delta, keys = self._delta(facts, z, i, sel, conditions, lifelong, trained, layer_keys)
        except EceError as exc:
            raise EceError(f"layer {layer}: {exc.args[0]}", exc.hint) from None
        norm = float(delta.norm())
        if not torch.isfinite(delta).all() or norm > self.max_update_norm:
            raise EceError(
                f"layer {layer}: the update is not finite or explodes (‖Δ‖ = {norm:.3g})",
                "check the covariance statistics and z; raise update.mom2_update_weight",
            )
        weight = self.adapter.w_out_weight(layer)
        on_device = sel.to(weight.device)
        old = weight[:, on_device].cpu()
        with torch.no_grad():
            weight[:, on_device] += delta.to(weight)
        return LayerChange(sel, old, weight[:, on_device].cpu(), max(conditions, default=float("nan"))), keys

    def grow_cache(self, keys: dict[int, Tensor]) -> None:
        """P += Kᵀ K per layer with the keys a batch's solve used."""
        for layer, k in keys.items():
            k64 = k.double()
            self.cache[layer] += k64.T @ k64

    def _lifelong(self, facts: list[Fact]) -> tuple[Features, Moments]:
        """UltraEdit: every layer's keys and output gradients on the weights before the batch, and the
        moments after them (updated layer by layer, ascending), for every layer's solve to use."""
        assert self.moments is not None
        with self._timed("keys"):
            features = token_features(self.adapter, self.tok, facts, self.layers)
        moments = self.moments
        with self._timed("cache"):
            for keys, grads in features.values():
                moments = update_moments(moments, torch.cat([keys, grads], dim=1))
        return features, moments

    def carry(self, carried: dict[str, Tensor]) -> None:
        """Replay one finished batch's `carried` state (as a checkpoint stored it): P grows by its keys
        (`keys.{l}`), the moments become its moments (`moments.{name}`). A resumed run calls this for
        every stored batch in batch order, so its state is exactly the uninterrupted run's."""
        self.grow_cache({int(k.split(".")[1]): t for k, t in carried.items() if k.startswith("keys.")})
        moments = {k.split(".")[1]: t for k, t in carried.items() if k.startswith("moments.")}
        if moments:
            self.moments = Moments(**moments)

    def revert(self, changes: dict[int, LayerChange]) -> None:
        """Put back the columns a (partial) batch changed."""
        with torch.no_grad():
            for layer, change in changes.items():
                weight = self.adapter.w_out_weight(layer)
                weight[:, change.cols.to(weight.device)] = change.old.to(weight)

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
        lifelong = self._lifelong(facts) if self.method.ultraedit is not None else None
        changes: dict[int, list[LayerChange]] = {}
        solved: dict[int, Tensor | None] = {}
        try:
            for g in groups:
                group = [facts[j] for j in g]
                trained = None
                if self.trained is not None:  # MEND: every layer's change from one gradient, before any is written
                    with self._timed("solve"):
                        trained = self.trained.deltas(self.adapter, self.tok, group)
                layer_keys = (
                    LayerKeys(self.adapter, self.tok, group, self.templates, self.layers[-1]) if z is not None else None
                )
                for i, layer in enumerate(self.layers):
                    change, solved[layer] = self._apply_layer(
                        group,
                        z[g] if z is not None else None,
                        i,
                        cols[layer] if cols is not None else None,
                        lifelong,
                        trained,
                        layer_keys,
                    )
                    changes.setdefault(layer, []).append(change)
        except BaseException:
            self.revert({l: c[0] for l, c in changes.items()})  # the values before the batch's first change
            raise
        keys = {l: k for l, k in solved.items() if k is not None} if self.method.use_cache else {}
        self.carried = {f"keys.{l}": k for l, k in keys.items()}
        if lifelong is not None:  # the moments change only once the whole batch is written
            self.carried.update({f"moments.{name}": t for name, t in lifelong[1].tensors().items()})
        with self._timed("cache"):
            self.carry(self.carried)
        return {l: LayerChange(c[0].cols, c[0].old, c[-1].new, max(x.cond for x in c)) for l, c in changes.items()}
