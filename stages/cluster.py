"""Stage `cluster`: per sequential batch, k-medoids on the Jaccard distance of the facts' neuron sets.

A fact's set is the union over edited layers of its selected (layer, neuron) pairs; the anchor of a
cluster is its medoid (paper eq. 10). Only ECE clusters; MEMIT's facts are each their own cluster.
Seconds per batch go to reports/cluster_timings.json, outside the cached output.
"""

from __future__ import annotations

import time

import polars as pl

from ece.artifacts import ATTRIBUTION, CLUSTER_TIMINGS, CLUSTERS
from ece.config import Params
from ece.data.facts import batch_ranges, read_facts
from ece.data.io import atomic_dir, write_json
from ece.edit.clustering import cluster_facts
from ece.methods import method_of
from ece.stage import run_stage


def main(p: Params) -> None:
    df, facts = read_facts()
    selections = pl.read_parquet(ATTRIBUTION / "facts.parquet")
    sets: dict[str, set[tuple[int, int]]] = {f.id: set() for f in facts}
    for row in selections.iter_rows(named=True):
        sets[row["id"]].update((row["layer"], n) for n in row["selected"])
    rows, timings = [], {}
    for b, rng in enumerate(batch_ranges(len(facts), p.edit.batch_size)):
        start = time.perf_counter()
        ids = [facts[i].id for i in rng]
        if method_of(p).clusters:
            c = cluster_facts([frozenset(sets[i]) for i in ids], p.cluster.k, p.cluster.k_max, p.cluster.seed)
            labels, anchors, dist = c.labels.tolist(), c.anchors.tolist(), c.dist_to_anchor.tolist()
        else:
            labels, anchors, dist = list(range(len(ids))), list(range(len(ids))), [0.0] * len(ids)
        for j, fid in enumerate(ids):
            anchor = anchors[labels[j]]
            rows.append({
                "id": fid, "batch": b, "cluster": labels[j], "is_anchor": anchor == j,
                "anchor_id": ids[anchor], "dist_to_anchor": float(dist[j]),
            })
        timings[b] = time.perf_counter() - start
    table = pl.DataFrame(rows)
    with atomic_dir(CLUSTERS) as tmp:
        table.write_parquet(tmp / "clusters.parquet")
    write_json(CLUSTER_TIMINGS, timings)
    sizes = table.group_by("batch").agg(pl.col("cluster").n_unique())["cluster"]
    print(f"cluster: {table['batch'].n_unique()} batches, {sizes.sum()} clusters for {len(facts)} facts")


if __name__ == "__main__":
    run_stage(main)
