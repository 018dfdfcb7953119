"""Stage `attribute`: per fact and edited layer, score the neurons of W_out and keep the top mass.

Writes a per-fact table (which neurons each fact uses) and the per-batch aggregated selection (the
columns the update may change), computed by ece.editing.selection.attribute_batch. Seconds per batch go to
reports/attribution_timings.json, outside the cached output.
"""

from __future__ import annotations

import time

import polars as pl

from ece.artifacts import ATTRIBUTION, ATTRIBUTION_TIMINGS
from ece.config import Params
from ece.data.facts import batch_ranges, read_facts
from ece.data.io import atomic_dir, write_json
from ece.editing.selection import attribute_batch
from ece.model.workbench import Workbench
from ece.stage import run_stage


def main(p: Params) -> None:
    _, facts = read_facts()
    wb = Workbench.open(p)
    fact_rows, batch_rows, timings = [], [], {}
    for b, rng in enumerate(batch_ranges(len(facts), p.edit.batch_size)):
        start = time.perf_counter()
        rows = attribute_batch(wb, p, b, [facts[i] for i in rng])
        fact_rows += rows[0]
        batch_rows += rows[1]
        timings[b] = time.perf_counter() - start
    with atomic_dir(ATTRIBUTION) as tmp:
        pl.DataFrame(fact_rows).write_parquet(tmp / "facts.parquet")
        pl.DataFrame(batch_rows).write_parquet(tmp / "batches.parquet")
    write_json(ATTRIBUTION_TIMINGS, timings)
    share = pl.DataFrame(batch_rows)["n_selected"].mean() / wb.adapter.inner_size
    print(
        f"attribute: {len(facts)} facts, scorer {p.ece.scorer}, mean {share:.1%} of columns selected per batch and layer"
    )


if __name__ == "__main__":
    run_stage(main)
