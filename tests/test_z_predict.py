"""bench/z_predict.py's start kinds against hand-worked vectors."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import z_predict  # noqa: E402


def test_starts_prediction_mean_and_centered_by_hand() -> None:
    """Mean δ (2, 0): `mean` gives it to every fact; `centered` drops each prediction's first coordinate
    (its part along (1, 0)); `prediction` is the prediction."""
    prediction = torch.tensor([[3.0, 4.0], [-1.0, 2.0]])
    mean = torch.tensor([2.0, 0.0])
    assert torch.equal(z_predict.start_from("prediction", prediction, mean), prediction)
    assert z_predict.start_from("mean", prediction, mean).tolist() == [[2.0, 0.0], [2.0, 0.0]]
    assert z_predict.start_from("centered", prediction, mean).tolist() == [[0.0, 4.0], [0.0, 2.0]]
