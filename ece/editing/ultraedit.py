"""UltraEdit (Gu et al., 2025): a closed-form update from one forward/backward pass, with a lifelong
normalisation of its features carried from batch to batch.

Per batch, on the current weights, for every edited layer l and every target token t of every fact
(the positions whose next-token label is a target token: the reference's `token: ans`):
    k_t = the input of W_out^l, g_t = ∂L/∂(output of W_out^l), L = the mean target-token NLL of the batch.
The features x_t = [k_t, g_t] update running moments (one set for every edited W_out, since they share
a shape: the reference keeps one normaliser per module shape), then are normalised with them,
x̂_t = (x_t − μ) / (σ + ε) = [k̂_t, ĝ_t], and give a pseudo value v_t = −lr · ‖k̂_t‖² · ĝ_t: the change of
the layer's output that a normalised gradient step −lr · ĝ k̂ᵀ would make at its own normalised key.
The update is the ridge regression of V on the raw keys K:
    Δ^l = Vᵀ K (Kᵀ K + I)⁻¹        (the reference: solve(KᵀK + I, KᵀV), transposed into W's d × f).
No z, no covariance statistics, no memory of earlier keys: only the moments carry over.

The moments follow the reference's RunningMeanStd update literally, including that a chunk's own
spread enters as m·var_unbiased (not the (m−1)·var of Chan's exact merge), so they depend slightly on
how rows are chunked: here a chunk is one batch's rows of one layer, layers in ascending order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from ece.data.facts import Fact
from ece.editing.finetune import finetune_labels
from ece.model.adapter import ModelAdapter

EPS = torch.finfo(torch.float32).eps  # the reference's ε: finfo of its float32 features
RIDGE = 1.0  # weight of ‖Δ‖² in the solve: the reference's identity matrix in KᵀK + I
STATE = ("n", "mean", "var", "std")


@dataclass(frozen=True)
class Moments:
    """Running statistics of the features [k, g] (float64); `var` is the reference's accumulated sum."""

    n: Tensor  # (1,) rows seen
    mean: Tensor  # (f + d,)
    var: Tensor  # (f + d,)
    std: Tensor  # (f + d,)

    @classmethod
    def empty(cls, size: int) -> Moments:
        return cls(*(torch.zeros(1 if name == "n" else size, dtype=torch.float64) for name in STATE))

    def tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in STATE}


def update_moments(m: Moments, x: Tensor) -> Moments:
    """The moments after the rows x (m, f + d), as the reference's RunningMeanStd.update computes them.
    One row has no unbiased variance (the reference would get NaN): its own spread counts as 0."""
    x = x.double()
    rows = x.shape[0]
    n = m.n + rows
    delta = x.mean(0) - m.mean
    spread = rows * x.var(0) if rows > 1 else torch.zeros_like(m.var)
    var = m.var + spread + m.n * rows * delta.pow(2) / n
    return Moments(n, m.mean + rows * delta / n, var, (var / (n - 1 + EPS)).sqrt())


def normalise(m: Moments, x: Tensor) -> Tensor:
    return (x.double() - m.mean) / (m.std + EPS)


def pseudo_values(m: Moments, keys: Tensor, grads: Tensor, lr: float) -> Tensor:
    """V (rows, d): v_t = −lr · ‖k̂_t‖² · ĝ_t with [k̂_t, ĝ_t] the features normalised by `m`."""
    k_hat, g_hat = normalise(m, torch.cat([keys, grads], dim=1)).split([keys.shape[1], grads.shape[1]], dim=1)
    return -lr * k_hat.pow(2).sum(1, keepdim=True) * g_hat


def token_features(
    adapter: ModelAdapter, tok: PreTrainedTokenizerBase, facts: list[Fact], layers: list[int]
) -> dict[int, tuple[Tensor, Tensor]]:
    """Per layer, the keys (rows, f) and output gradients (rows, d) at every target token of every fact
    (fact-major), from one forward/backward of the batch's mean target NLL on the current weights."""
    ids, mask, labels = finetune_labels(tok, facts, target_only=True)

    def loss(logits: Tensor) -> Tensor:
        return F.cross_entropy(logits.flatten(0, 1), labels.to(logits.device).flatten(), ignore_index=-100)

    keys, grads = adapter.trace_grads(ids, mask, layers, loss)
    where = labels != -100  # the features go to the CPU, where the moments live
    return {l: (keys[l].cpu()[where], grads[l].cpu()[where]) for l in layers}
