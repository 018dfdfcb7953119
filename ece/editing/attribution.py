"""Stage 1 of ECE: score the neurons of one MLP output projection per fact, then keep the top mass.

Pure functions over tensors; the caller extracts the keys (inputs of W_out) and, for `rs`, the residual
r_i = z_i - h_i. Scores are computed in float32 and summed in float64 during selection.

Scorers, for fact i and neuron j (W is d x f, out x in, as an `nn.Linear` weight):
- `as`:        |k_ij|
- `wi`:        |k_ij| * ||W[:, j]||_1   (depends on the fact through its key)
- `wi_static`: ||W[:, j]||_1            (the authors' code: the same for every fact, so every fact selects
                                          the same neurons and clustering degenerates to one cluster)
- `rs`:        |k_ij * <W[:, j], r_i>| / ||r_i||  when r_i is known, else |k_ij| * ||W[:, j]||_2.
               The fallback is the directional score maximised over unit directions (Cauchy-Schwarz),
               and it is also used for any fact whose residual has zero norm (no direction to project on).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ece.config import AGGREGATIONS, SCORERS
from ece.errors import EceError

# Relative slack on the target mass, so float rounding never drops the last non-zero neuron at p = 1.
_MASS_RTOL = 1e-9


def _as(abs_keys: Tensor, weight: Tensor, residual: Tensor | None) -> Tensor:
    return abs_keys


def _wi(abs_keys: Tensor, weight: Tensor, residual: Tensor | None) -> Tensor:
    return abs_keys * weight.abs().sum(dim=0)


def _wi_static(abs_keys: Tensor, weight: Tensor, residual: Tensor | None) -> Tensor:
    return weight.abs().sum(dim=0).expand_as(abs_keys).clone()


def _rs(abs_keys: Tensor, weight: Tensor, residual: Tensor | None) -> Tensor:
    column_norms = weight.norm(dim=0).expand_as(abs_keys)
    if residual is None:
        return abs_keys * column_norms
    r = residual.to(torch.float32)
    r_norm = r.norm(dim=1, keepdim=True)
    directional = (r @ weight).abs() / r_norm.clamp_min(torch.finfo(torch.float32).tiny)
    return abs_keys * torch.where(r_norm > 0, directional, column_norms)


_SCORERS: dict[str, Callable[[Tensor, Tensor, Tensor | None], Tensor]] = {
    "as": _as,
    "wi": _wi,
    "wi_static": _wi_static,
    "rs": _rs,
}
assert tuple(_SCORERS) == SCORERS, "ece.config.SCORERS lists the scorers implemented here"


def neuron_scores(keys: Tensor, weight: Tensor, scorer: str, residual: Tensor | None = None) -> Tensor:
    """Non-negative (n, f) float32 importance of each neuron for each of n facts at one layer.

    keys: (n, f) inputs of W_out; weight: (d, f) W_out; residual: (n, d) z - h, read only by `rs`.
    """
    if scorer not in _SCORERS:
        raise EceError(f"unknown neuron scorer '{scorer}'", f"use one of {', '.join(SCORERS)}")
    if keys.ndim != 2 or weight.ndim != 2 or keys.shape[1] != weight.shape[1]:
        raise ValueError(f"keys (n, f) and weight (d, f) disagree: {tuple(keys.shape)} vs {tuple(weight.shape)}")
    if residual is not None and residual.shape != (keys.shape[0], weight.shape[0]):
        raise ValueError(f"residual must be (n, d) = {(keys.shape[0], weight.shape[0])}, got {tuple(residual.shape)}")
    return _SCORERS[scorer](keys.to(torch.float32).abs(), weight.to(torch.float32), residual)


def select_prefix(scores: Tensor, threshold: float) -> Tensor:
    """Ascending indices of the smallest top-scored prefix holding `threshold` of the total (paper eq. 8).

    Ties keep the lower index first. Zero-score neurons are never selected, so all-zero scores select
    nothing (no neuron carries any of the fact) and threshold 1.0 selects exactly the non-zero ones.
    """
    values, order = torch.sort(scores.to(torch.float64), descending=True, stable=True)
    total = values.sum()
    if total <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    target = threshold * total * (1.0 - _MASS_RTOL)
    count = int(torch.searchsorted(values.cumsum(0), target).item()) + 1
    count = min(count, int((values > 0).sum().item()))
    return order[:count].sort().values


def fact_selections(scores: Tensor, threshold: float) -> list[Tensor]:
    """Each fact's own neuron selection from its (f,) row of the (n, f) scores."""
    return [select_prefix(row, threshold) for row in scores]


def batch_selection(scores: Tensor, threshold: float, aggregation: str) -> Tensor:
    """Ascending neuron indices one batch edits at one layer, from its facts' (n, f) scores.

    `sum` selects from the batch-summed scores (the paper); `union` joins every fact's own selection.
    """
    if aggregation == "sum":
        return select_prefix(scores.to(torch.float64).sum(dim=0), threshold)
    if aggregation == "union":
        chosen = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
        for selection in fact_selections(scores, threshold):
            chosen[selection] = True
        return chosen.nonzero().squeeze(1)
    raise EceError(f"unknown neuron aggregation '{aggregation}'", f"use one of {', '.join(AGGREGATIONS)}")
