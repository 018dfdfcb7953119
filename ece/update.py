"""The restricted least-squares update of one W_out (ECE eq. 11; MEMIT when every column is free).

Minimise ‖Δ K_S − R‖² + tr(Δ (λ·C0 + P)_SS Δᵀ) over Δ = W[:, S]'s change:
    Δ_S = R K_Sᵀ (λ·C0_SS + P_SS + K_S K_Sᵀ)⁻¹
solved in float64 through a Cholesky factorisation, never an explicit inverse.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ece.errors import EceError


def restricted_update(keys: Tensor, residuals: Tensor, penalty: Tensor, cols: Tensor | None = None) -> Tensor:
    """Δ for the columns `cols` (all when None), shape (d, |S|).

    keys (n, f): W_out inputs of the batch; residuals (n, d): what the layer's output must gain;
    penalty (f, f): λ·C0 + P, the keys whose outputs must not move.
    """
    keys, residuals, penalty = keys.double(), residuals.double(), penalty.double()
    if cols is not None:
        keys, penalty = keys[:, cols], penalty[cols][:, cols]
    if keys.shape[1] == 0:
        return torch.zeros(residuals.shape[1], 0, dtype=torch.float64)
    system = penalty + keys.T @ keys
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:
        raise EceError(
            f"the update's normal equations are not positive definite (pivot {int(info)} of {system.shape[0]})",
            "raise update.mom2_update_weight or covariance.n_tokens so that λ·C0 regularises the solve",
        )
    return torch.cholesky_solve(keys.T @ residuals, factor).T
