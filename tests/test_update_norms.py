"""bench/update_norms.py on a hand-made ledger: one row per batch, layers in numeric order, the growth
line from the first and last batch."""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import update_norms  # noqa: E402


def test_norm_table_pivots_batches_by_layer_and_report_gives_growth() -> None:
    ledger = pl.DataFrame(  # layers out of order, 10 after 9 (a string sort would put "10" first)
        {
            "batch": [1, 0, 0, 1, 0, 1],
            "layer": [10, 9, 10, 9, 3, 3],
            "delta_norm": [40.0, 2.0, 5.0, 3.0, 8.0, 4.0],
            "fact_ids": [["a"]] * 6,  # other ledger columns are ignored
        }
    )
    table = update_norms.norm_table(ledger)
    assert table.columns == ["batch", "3", "9", "10"]
    assert table.rows() == [(0, 8.0, 2.0, 5.0), (1, 4.0, 3.0, 40.0)]
    text = update_norms.markdown("exp", table, "A note.")
    assert "layer 3 ×0.5, layer 9 ×1.5, layer 10 ×8.0. A note." in text
    assert "| 1 | 4.0 | 3.0 | 40.0 |" in text.splitlines()
