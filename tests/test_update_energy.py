"""bench/update_energy.py: the output energy against a plain loop over keys, and the summed update of
sequential batches against the weight they leave behind."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import update_energy  # noqa: E402


def test_output_energy_is_the_mean_squared_output_change_over_the_keys() -> None:
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(200, 6, generator=g, dtype=torch.float64)
    delta = torch.randn(4, 6, generator=g, dtype=torch.float64)
    c0 = sum(torch.outer(k, k) for k in keys) / len(keys)
    by_loop = sum(float((delta @ k) @ (delta @ k)) for k in keys) / len(keys)
    assert abs(update_energy.output_energy(delta, c0) - by_loop) < 1e-9 * by_loop


def test_total_delta_telescopes_sequential_column_writes(monkeypatch) -> None:
    w0 = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    w1 = w0.clone()
    w1[:, [1, 3]] += torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    w2 = w1.clone()
    w2[:, [0, 1]] -= 0.5  # batch 1 rewrites a column batch 0 already changed
    batches = [
        {"layer.2.cols": torch.tensor([1, 3]), "layer.2.old": w0[:, [1, 3]], "layer.2.new": w1[:, [1, 3]]},
        {"layer.2.cols": torch.tensor([0, 1]), "layer.2.old": w1[:, [0, 1]], "layer.2.new": w2[:, [0, 1]]},
    ]
    names = [update_energy.EDITED / update_energy.delta_name(b) for b in range(2)]
    monkeypatch.setattr(update_energy, "_read", lambda path, rev: batches[names.index(path)] if path in names else None)
    totals, n = update_energy.total_delta("rev", {2: w0, 5: w0})
    assert n == 2
    assert torch.equal(totals[2], w2 - w0)
    assert not totals[5].any()  # a layer no batch wrote


def test_null_energy_share_of_a_hand_made_spectrum() -> None:
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    c0 = q @ torch.diag(torch.tensor([0.01, 0.015, 0.5, 1.0], dtype=torch.float64)) @ q.T
    dims, share = update_energy.null_energy_share(c0, 0.02)
    assert dims == 2
    assert abs(share - 0.025 / 1.525) < 1e-12
