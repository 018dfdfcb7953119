"""Reference computations the tests check library code against, written the plain way (not the
library's), so that a test compares two independent routes to one number."""

from __future__ import annotations

import torch


def ridge_fit(x: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_A ‖XA − Y‖² + ridge·‖A‖² (f, d), solved as the ordinary least squares of
    [X; √ridge·I] A ≈ [Y; 0] in float64 (not through the normal equations `DeltaPredictor` solves)."""
    x, y = x.double(), y.double()
    eye = ridge**0.5 * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.lstsq(torch.cat([x, eye]), torch.cat([y, y.new_zeros(x.shape[1], y.shape[1])])).solution
