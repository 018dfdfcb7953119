"""Stage `cluster`: per sequential batch, k-medoids on the Jaccard distance of the facts' neuron sets.

A fact's set is the union over edited layers of its selected (layer, neuron) pairs; the anchor of a
cluster is its medoid (paper eq. 10); ece.editing.clustering.cluster_batch. Only a method whose registry entry
clusters (ECE) does; for the others every fact is its own cluster. Seconds per batch go to
reports/cluster_timings.json, outside the cached output.
"""

from __future__ import annotations

import time

import polars as pl

from ece.artifacts import ATTRIBUTION, CLUSTER_TIMINGS, CLUSTERS
from ece.config import Params
from ece.data.facts import batch_ranges, read_facts
from ece.data.io import atomic_dir, write_json
from ece.editing.clustering import cluster_batch, neuron_sets
from ece.methods import method_of
from ece.stage import run_stage


def main(p: Params) -> None:
    _, facts = read_facts()
    sets = neuron_sets(pl.read_parquet(ATTRIBUTION / "facts.parquet").to_dicts())
    rows, timings = [], {}
    for b, rng in enumerate(batch_ranges(len(facts), p.edit.batch_size)):
        start = time.perf_counter()
        rows += cluster_batch(p, method_of(p), b, [facts[i].id for i in rng], sets)
        timings[b] = time.perf_counter() - start
    table = pl.DataFrame(rows)
    with atomic_dir(CLUSTERS) as tmp:
        table.write_parquet(tmp / "clusters.parquet")
    write_json(CLUSTER_TIMINGS, timings)
    sizes = table.group_by("batch").agg(pl.col("cluster").n_unique())["cluster"]
    print(f"cluster: {table['batch'].n_unique()} batches, {sizes.sum()} clusters for {len(facts)} facts")


if __name__ == "__main__":
    run_stage(main)
