"""ece.eval.paired: the paired bootstrap against hand-worked values and the normal-theory interval."""

from __future__ import annotations

import math

import pytest
import torch

from ece.eval.paired import paired_difference


def test_constant_difference_has_a_zero_width_interval():
    got = paired_difference([0.5, 0.25, 1.0], [0.75, 0.5, 1.25])
    assert got.n == 3
    assert got.mean == pytest.approx(0.25) and got.low == pytest.approx(0.25) and got.high == pytest.approx(0.25)
    assert got.excludes_zero()


def test_facts_missing_a_score_on_either_side_are_left_out():
    # kept pairs: (1, 0) and (0.5, 1) -> differences -1 and 0.5, mean -0.25
    got = paired_difference([1.0, None, 0.5, float("nan")], [0.0, 1.0, 1.0, 0.0])
    assert got.n == 2 and got.mean == pytest.approx(-0.25)
    assert -1.0 <= got.low <= got.mean <= got.high <= 0.5


def test_interval_matches_the_normal_theory_one_on_a_large_sample():
    gen = torch.Generator().manual_seed(1)
    n, sd = 4000, 0.3
    a = torch.rand(n, generator=gen)
    b = a + 0.01 + sd * torch.randn(n, generator=gen)
    got = paired_difference(a.tolist(), b.tolist(), resamples=4000)
    d = (b - a).double()
    half = 1.959964 * float(d.std()) / math.sqrt(n)  # the textbook 95 % interval of a mean
    assert got.mean == pytest.approx(float(d.mean()))
    assert got.high - got.low == pytest.approx(2 * half, rel=0.1)
    assert (got.low + got.high) / 2 == pytest.approx(float(d.mean()), abs=0.1 * half)


def test_pairing_finds_a_small_shift_that_the_facts_own_spread_would_hide():
    # every fact's scores vary widely between facts (0..1) but b is a's plus 0.02 up to a little noise
    gen = torch.Generator().manual_seed(2)
    a = torch.rand(500, generator=gen)
    b = a + 0.02 + 0.01 * torch.randn(500, generator=gen)
    got = paired_difference(a.tolist(), b.tolist())
    unpaired_half = 1.96 * math.sqrt(float(a.var()) / 500 + float(b.var()) / 500)
    assert unpaired_half > 0.02  # two separate means' intervals would overlap
    assert got.excludes_zero() and got.low > 0.015


def test_same_seed_same_interval_and_bad_input_is_refused():
    a, b = [0.0, 1.0, 0.5, 0.25], [1.0, 1.0, 0.0, 0.5]
    assert paired_difference(a, b) == paired_difference(a, b)
    with pytest.raises(ValueError, match="same facts"):
        paired_difference([0.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="no fact"):
        paired_difference([None], [1.0])
