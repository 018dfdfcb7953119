"""Is one edited model's metric really lower than another's? A paired comparison over the same facts.

Two configurations edited the same facts; each fact has a score under both (efficacy, say, the share
of its prompts where the new object wins). Over the facts scored under both, the mean of the per-fact
differences is the difference of the two means, and because both scores come from the same fact, its
spread is far smaller than the two means' own spreads would suggest: facts that are hard for one are
mostly hard for the other.
A 0.002 gap in specificity over 2000 facts can be a real cost or noise; the paired bootstrap
(resample the facts with replacement, keep each fact's pair together, take the percentiles of the
resampled mean difference) says which. Used by the benchmark reports; no stage imports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PairedDifference:
    """mean(b − a) over the facts scored under both, with a percentile bootstrap interval."""

    n: int  # facts with a score under both
    mean: float
    low: float
    high: float
    level: float

    def excludes_zero(self) -> bool:
        """The interval lies wholly on one side of 0: a difference the resampling does not explain away."""
        return self.low > 0 or self.high < 0


def paired_difference(
    a: Sequence[float | None],
    b: Sequence[float | None],
    level: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> PairedDifference:
    """mean(b_i − a_i) over the facts i where both are defined, and its `level` percentile bootstrap interval.

    Facts with a missing score on either side (None or NaN: no neighbourhood prompt, say) are left out
    of both. The resampling is seeded, so a report shows the same interval every time it is rendered."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same facts: {len(a)} vs {len(b)}")
    pairs = [
        (x, y) for x, y in zip(a, b) if x is not None and y is not None and not math.isnan(x) and not math.isnan(y)
    ]
    if not pairs:
        raise ValueError("no fact is scored under both")
    diff = torch.tensor([y - x for x, y in pairs], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    means = torch.empty(resamples, dtype=torch.float64)
    for s in range(0, resamples, 1000):  # 1000 resamples at a time: 2000 facts × 10k would be 160 MB at once
        k = min(1000, resamples - s)
        means[s : s + k] = diff[torch.randint(len(diff), (k, len(diff)), generator=gen)].mean(dim=1)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return PairedDifference(len(diff), float(diff.mean()), low, high, level)
