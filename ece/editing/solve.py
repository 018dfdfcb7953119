"""The least-squares update of one W_out, shared by every closed-form method.

Minimise ‖Δ K_S − R‖² + tr(Δ (λ·C0 + P)_SS Δᵀ) over Δ = W[:, S]'s change:
    Δ_S = R K_Sᵀ (λ·C0_SS + P_SS + K_S K_Sᵀ)⁻¹
solved in float64 through a Cholesky factorisation, never an explicit inverse. ECE restricts S to
the selected columns (eq. 11); MEMIT frees every column; ROME is one key with λ → 0 (Sherman-Morrison
turns the solve into its rank-one Δ = r (C0⁻¹k)ᵀ / (λ + kᵀC0⁻¹k)); AlphaEdit solves the same problem
for Δ = B Uᵀ in a basis U of C0's null space (`projected_update`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ece.errors import EceError


def condition_number(system: Tensor) -> float:
    """2-norm condition number of a symmetric positive definite matrix (inf when singular)."""
    if system.shape[0] == 0:
        return 1.0
    # One thread: a ~1000² eigvalsh takes 0.1 s on one core, but can take 10+ s with several threads
    # on a busy machine (OpenMP spin-waiting), and the result only goes into the ledger.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        eig = torch.linalg.eigvalsh(system.double())
    finally:
        torch.set_num_threads(threads)
    lo, hi = float(eig[0]), float(eig[-1])
    return hi / lo if lo > 0 else float("inf")


def restricted_update(
    keys: Tensor, residuals: Tensor, penalty: Tensor, cols: Tensor | None = None, conditions: list[float] | None = None
) -> Tensor:
    """Δ for the columns `cols` (all when None), shape (d, |S|).

    keys (n, f): W_out inputs of the batch; residuals (n, d): what the layer's output must gain;
    penalty (f, f): λ·C0 + P, the keys whose outputs must not move. The condition number of the
    solved system is appended to `conditions` when given (it goes into the audit ledger).
    """
    keys, residuals, penalty = keys.double(), residuals.double(), penalty.double()
    if cols is not None:
        cols = cols.to(keys.device)
        keys, penalty = keys[:, cols], penalty[cols][:, cols]
    if keys.shape[1] == 0:
        return torch.zeros(residuals.shape[1], 0, dtype=torch.float64, device=keys.device)
    system = penalty + keys.T @ keys
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:
        raise EceError(
            f"the update's normal equations are not positive definite (pivot {int(info)} of {system.shape[0]})",
            "raise update.mom2_update_weight or covariance.n_tokens so that λ·C0 regularises the solve",
        )
    if conditions is not None:
        conditions.append(condition_number(system))
    return torch.cholesky_solve(keys.T @ residuals, factor).T


def nullspace_basis(c0: Tensor, threshold: float, energy: float = 0.0) -> Tensor:
    """Orthonormal basis (f, m) of the eigenvectors of C0 with eigenvalue below `threshold` (AlphaEdit):
    directions that ordinary text barely excites, so an update confined to them leaves its outputs.

    With `energy` > 0 the basis is instead the smallest-eigenvalue directions whose eigenvalues sum to
    at most that share of tr(C0): the same idea without a scale. AlphaEdit's absolute 2e-2 was set for
    its models' keys; on SmolLM2 the eigenvalues average 0.013-0.026, so 2e-2 calls directions holding
    29-60 % of the keys' energy "null" (reports/update_energy.md)."""
    values, vectors = torch.linalg.eigh(c0.double())  # ascending
    if energy > 0:
        spectrum = values.clamp_min(0)  # round-off can leave tiny negative eigenvalues
        below = spectrum.cumsum(0) <= energy * spectrum.sum()
        what, fix = f"alphaedit.nullspace_energy = {energy:g} of tr(C0)", "raise alphaedit.nullspace_energy"
    else:
        below = values < threshold
        what, fix = f"alphaedit.nullspace_threshold = {threshold:g}", "raise alphaedit.nullspace_threshold"
    basis = vectors[:, below]
    if basis.shape[1] == 0:
        raise EceError(
            f"C0 has no eigen-direction within {what} (smallest eigenvalue {float(values[0]):.3g}): the null space is empty",
            fix,
        )
    return basis


def projected_update(
    keys: Tensor, residuals: Tensor, penalty: Tensor, basis: Tensor, conditions: list[float] | None = None
) -> Tensor:
    """AlphaEdit's Δ = B Uᵀ (d, f), with B the solve of the same problem on the keys' coordinates K U.

    Equals AlphaEdit's (P(K_p K_pᵀ + K Kᵀ) + l2·I)⁻¹ P K Rᵀ with P = U Uᵀ, in a Cholesky-solvable form;
    every Δ it returns satisfies Δ (I − U Uᵀ) = 0.
    """
    basis = basis.double()
    coords = restricted_update(keys.double() @ basis, residuals, basis.T @ penalty.double() @ basis, None, conditions)
    return coords @ basis.T
