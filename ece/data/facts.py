"""The canonical edit request as editing sees it, the prepared table it comes from, and its batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from ece.artifacts import PREPARED
from ece.errors import EceError


@dataclass(frozen=True)
class Fact:
    """What editing needs of one canonical edit request."""

    id: str
    subject: str
    prompt: str  # contains exactly one "{}" for the subject
    target_new: str

    @classmethod
    def from_row(cls, row: dict) -> Fact:
        return cls(row["id"], row["subject"], row["prompt"], row["target_new"])


def read_facts(path: Path = PREPARED) -> tuple[pl.DataFrame, list[Fact]]:
    if not path.exists():
        raise EceError(f"{path} not found", "run the prepare stage first: dvc repro prepare")
    df = pl.read_parquet(path)
    return df, [Fact.from_row(r) for r in df.iter_rows(named=True)]


def batch_ranges(n: int, batch_size: int) -> list[range]:
    """Sequential batches in dataset order; the last one may be short."""
    return [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def batch_windows(n_batches: int, window: int) -> list[range]:
    """Consecutive batches taken `window` at a time (z.window_batches); the last window may be short."""
    return [range(s, min(s + window, n_batches)) for s in range(0, n_batches, window)]


def batch_rows(table: pl.DataFrame, b: int) -> list[dict[str, Any]]:
    """Batch `b`'s rows of a per-batch artifact table (clusters, attribution selections), in stored order."""
    return table.filter(pl.col("batch") == b).to_dicts()
