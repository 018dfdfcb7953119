"""Stage 1 scorers and the eq. 8 selection rule, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from ece.editing.attribution import SCORERS, batch_selection, fact_selections, neuron_scores, select_prefix
from ece.errors import EceError

# Two facts, f = 3 neurons, d = 2. Column L1 norms of W: [3, 1, 4]; L2 norms: [sqrt5, 1, sqrt8].
KEYS = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, -1.0]])
WEIGHT = torch.tensor([[1.0, -1.0, 2.0], [2.0, 0.0, -2.0]])


def ids(t: torch.Tensor) -> list[int]:
    return t.tolist()


@pytest.mark.parametrize(
    ("scorer", "expected"),
    [
        ("as", [[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]]),
        ("wi", [[3.0, 2.0, 0.0], [9.0, 0.0, 4.0]]),
        ("wi_static", [[3.0, 1.0, 4.0], [3.0, 1.0, 4.0]]),
        ("rs", [[math.sqrt(5), 2.0, 0.0], [3 * math.sqrt(5), 0.0, math.sqrt(8)]]),
    ],
)
def test_scorers_by_hand(scorer: str, expected: list[list[float]]) -> None:
    scores = neuron_scores(KEYS, WEIGHT, scorer)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.tensor(expected))


def test_wi_static_is_the_same_for_every_fact() -> None:
    scores = neuron_scores(torch.randn(5, 3), WEIGHT, "wi_static")
    assert torch.equal(scores, scores[:1].expand(5, 3))


def test_rs_projects_on_the_residual_and_falls_back_on_zero_norm() -> None:
    residual = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    scores = neuron_scores(KEYS, WEIGHT, "rs", residual)
    # Fact 0: <W[:, j], r> = [11, -3, -2], / ||r|| = 5, times |k| = [1, 2, 0]. Fact 1: no direction.
    expected = torch.tensor([[2.2, 1.2, 0.0], [3 * math.sqrt(5), 0.0, math.sqrt(8)]])
    assert not scores.isnan().any()
    torch.testing.assert_close(scores, expected)


def test_residual_is_ignored_by_other_scorers_and_input_dtype_is_upcast() -> None:
    residual = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    with_r = neuron_scores(KEYS.half(), WEIGHT.half(), "wi", residual)
    torch.testing.assert_close(with_r, neuron_scores(KEYS, WEIGHT, "wi"))


def test_unknown_scorer_lists_the_valid_ones() -> None:
    with pytest.raises(EceError) as err:
        neuron_scores(KEYS, WEIGHT, "magic")
    assert all(name in str(err.value) for name in SCORERS)


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError):
        neuron_scores(KEYS, WEIGHT.T, "as")
    with pytest.raises(ValueError):
        neuron_scores(KEYS, WEIGHT, "rs", torch.ones(2, 3))


@pytest.mark.parametrize(
    ("scores", "p", "expected"),
    [
        ([5, 3, 1, 1], 0.8, [0, 1]),
        ([5, 3, 1, 1], 0.5, [0]),
        ([5, 3, 1, 1], 0.81, [0, 1, 2]),
        ([1, 5, 1, 3], 0.8, [1, 3]),  # indices come back ascending, not by score
        ([2, 2, 2, 2], 0.5, [0, 1]),  # ties: lower index first
        ([2, 2, 2, 2], 0.3, [0, 1]),
        ([1, 2, 2, 1], 0.5, [1, 2]),
        ([0.1, 0.2, 0.3, 0.0, 0.4], 1.0, [0, 1, 2, 4]),  # p = 1: exactly the non-zero neurons
    ],
)
def test_select_prefix_smallest_prefix_reaching_the_mass(scores: list[float], p: float, expected: list[int]) -> None:
    selected = select_prefix(torch.tensor(scores), p)
    assert selected.dtype == torch.long
    assert ids(selected) == expected


def test_select_prefix_is_robust_to_float_rounding() -> None:
    tenths = torch.full((10,), 0.1, dtype=torch.float32)
    assert len(select_prefix(tenths, 0.7)) == 7
    assert len(select_prefix(tenths, 1.0)) == 10
    assert len(select_prefix(torch.cat([tenths, torch.zeros(5)]), 1.0)) == 10


def test_select_prefix_all_zero_selects_nothing() -> None:
    assert ids(select_prefix(torch.zeros(4), 0.8)) == []
    assert ids(select_prefix(torch.zeros(0), 0.8)) == []


def test_fact_selections_per_row() -> None:
    scores = torch.tensor([[5.0, 3.0, 1.0, 1.0], [1.0, 1.0, 1.0, 7.0]])
    assert [ids(s) for s in fact_selections(scores, 0.8)] == [[0, 1], [0, 3]]


def test_batch_aggregations_differ_as_defined() -> None:
    scores = torch.tensor([[3.0, 0.0, 2.0], [0.0, 3.0, 2.0]])
    # sum: [3, 3, 4], 60% of 10 -> neuron 2 then neuron 0. union: each fact keeps only its 3.
    assert ids(batch_selection(scores, 0.6, "sum")) == [0, 2]
    assert ids(batch_selection(scores, 0.6, "union")) == [0, 1]


def test_batch_union_is_sorted_unique() -> None:
    scores = torch.tensor([[0.0, 1.0, 0.0, 9.0], [0.0, 0.0, 1.0, 9.0], [0.0, 9.0, 0.0, 0.0]])
    assert ids(batch_selection(scores, 0.5, "union")) == [1, 3]


def test_unknown_aggregation_lists_the_valid_ones() -> None:
    with pytest.raises(EceError) as err:
        batch_selection(torch.ones(2, 3), 0.8, "mean")
    assert "sum" in str(err.value) and "union" in str(err.value)
