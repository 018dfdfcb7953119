"""Stage 2a of ECE: group the facts of a batch by the overlap of their neuron sets.

Facts are compared by the Jaccard distance of their neuron sets and grouped by k-medoids (seeded
k-medoids++ initialisation, then alternating assignment and the medoid update of paper eq. 10). Each
cluster's anchor is its member with the smallest sum of Jaccard distances to the other members, ties
to the lowest index. Everything is deterministic given the seed.

Choice of k when `k = "auto"`: for every k in 2..min(k_max, n - 1), run k-medoids (same seed) and
compute the mean silhouette; take the k with the highest mean silhouette, the smaller k on ties. If that
range is empty (n <= 2 or k_max < 2) or no k reaches a mean silhouette above 0 (no cluster structure,
e.g. identical sets or all-equal distances), the batch is one cluster. An integer k gives min(k, n)
clusters.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ece.config import Params
from ece.methods import Method


@dataclass(frozen=True, eq=False)
class Clustering:
    """Cluster ids are numbered in order of first appearance among the facts, so outputs are stable."""

    labels: np.ndarray  # (n,) cluster id of each fact
    anchors: np.ndarray  # (k,) fact index of each cluster's anchor, by cluster id
    dist_to_anchor: np.ndarray  # (n,) Jaccard distance of each fact to its cluster's anchor


def jaccard_distances(sets: Sequence[frozenset[Hashable]]) -> np.ndarray:
    """(n, n) 1 - |A & B| / |A | B|, 0 between two empty sets; one matrix product, not n^2 set ops.

    The float32 incidence product counts exactly (integers below 2^24).
    """
    column = {element: j for j, element in enumerate(frozenset().union(*sets))}
    incidence = np.zeros((len(sets), len(column)), dtype=np.float32)
    rows = np.repeat(np.arange(len(sets)), [len(s) for s in sets])
    incidence[rows, np.fromiter((column[e] for s in sets for e in s), dtype=np.int64, count=len(rows))] = 1.0
    inter = (incidence @ incidence.T).astype(np.float64)
    sizes = np.diag(inter)
    union = sizes[:, None] + sizes[None, :] - inter
    return 1.0 - np.divide(inter, union, out=np.ones_like(inter), where=union > 0)


def _medoid(dist: np.ndarray, members: np.ndarray) -> int:
    """Paper eq. 10: the member closest in sum to the others; argmin keeps the lowest index on ties."""
    return int(members[np.argmin(dist[np.ix_(members, members)].sum(axis=1))])


def _assign(dist: np.ndarray, medoids: np.ndarray) -> np.ndarray:
    """Nearest medoid; each medoid keeps its own cluster so duplicate points cannot empty one."""
    labels = np.argmin(dist[:, medoids], axis=1)
    labels[medoids] = np.arange(len(medoids))
    return labels


def _init_medoids(dist: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-medoids++: draw each next medoid with probability ~ squared distance to the chosen ones."""
    n = len(dist)
    medoids = [int(rng.integers(n))]
    while len(medoids) < k:
        weights = dist[:, medoids].min(axis=1) ** 2
        weights[medoids] = 0.0
        if weights.sum() <= 0:  # every remaining point duplicates a medoid: pick any unused one
            weights = np.ones(n)
            weights[medoids] = 0.0
        medoids.append(int(rng.choice(n, p=weights / weights.sum())))
    return np.array(medoids)


def kmedoids(dist: np.ndarray, k: int, seed: int, max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Labels (n,) and medoid indices (k,) of k-medoids on a precomputed distance; k is clipped to n."""
    n = len(dist)
    if n < 1 or k < 1:
        raise ValueError(f"k-medoids needs at least one point and one cluster, got n={n}, k={k}")
    medoids = _init_medoids(dist, min(k, n), np.random.default_rng(seed))
    for _ in range(max_iter):
        labels = _assign(dist, medoids)
        updated = np.array([_medoid(dist, np.flatnonzero(labels == c)) for c in range(len(medoids))])
        if np.array_equal(updated, medoids):
            break
        medoids = updated
    return _assign(dist, medoids), medoids


def silhouette(dist: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette on a precomputed distance; singletons score 0, and so does a single cluster."""
    ids, labels = np.unique(labels, return_inverse=True)
    if len(ids) < 2:
        return 0.0
    n = len(labels)
    onehot = np.zeros((n, len(ids)))
    onehot[np.arange(n), labels] = 1.0
    sizes = onehot.sum(axis=0)
    sums = dist @ onehot
    own_size = sizes[labels]
    a = sums[np.arange(n), labels] / np.maximum(own_size - 1, 1)
    means = sums / sizes
    means[np.arange(n), labels] = np.inf
    b = means.min(axis=1)
    denom = np.maximum(a, b)
    s = np.divide(b - a, denom, out=np.zeros(n), where=(own_size > 1) & (denom > 0))
    return float(s.mean())


def _auto_labels(dist: np.ndarray, k_max: int, seed: int) -> np.ndarray:
    """The module docstring's rule: best silhouette above 0 over k in 2..min(k_max, n - 1), else one cluster."""
    n = len(dist)
    best_labels, best_score = np.zeros(n, dtype=np.int64), 0.0
    for k in range(2, min(k_max, n - 1) + 1):
        labels, _ = kmedoids(dist, k, seed)
        score = silhouette(dist, labels)
        if score > best_score:
            best_labels, best_score = labels, score
    return best_labels


def cluster_facts(sets: Sequence[frozenset[Hashable]], k: int | str, k_max: int, seed: int) -> Clustering:
    """Cluster facts by their neuron sets ((layer, neuron) pairs) and pick each cluster's anchor."""
    n = len(sets)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Clustering(labels=empty, anchors=empty, dist_to_anchor=np.zeros(0))
    dist = jaccard_distances(sets)
    raw = _auto_labels(dist, k_max, seed) if k == "auto" else kmedoids(dist, int(k), seed)[0]
    renumber = {old: new for new, old in enumerate(dict.fromkeys(raw.tolist()))}
    labels = np.array([renumber[c] for c in raw.tolist()], dtype=np.int64)
    anchors = np.array([_medoid(dist, np.flatnonzero(labels == c)) for c in range(len(renumber))], dtype=np.int64)
    return Clustering(labels=labels, anchors=anchors, dist_to_anchor=dist[np.arange(n), anchors[labels]])


NeuronSet = frozenset[tuple[int, int]]  # (layer, neuron) pairs a fact uses


def neuron_sets(fact_rows: list[dict[str, Any]]) -> dict[str, NeuronSet]:
    """A fact's set: the union over edited layers of its selected (layer, neuron) pairs."""
    sets: dict[str, set[tuple[int, int]]] = {}
    for row in fact_rows:
        sets.setdefault(row["id"], set()).update((row["layer"], n) for n in row["selected"])
    return {k: frozenset(v) for k, v in sets.items()}


def cluster_batch(
    p: Params, method: Method, b: int, ids: list[str], sets: dict[str, NeuronSet]
) -> list[dict[str, Any]]:
    """Clusters of batch `b` (rows of artifacts/clusters/clusters.parquet): k-medoids on the Jaccard
    distance of the facts' neuron sets, anchor = medoid (paper eq. 10), for a method that clusters;
    every fact its own cluster otherwise."""
    if method.clusters:
        c = cluster_facts([sets.get(i, frozenset()) for i in ids], p.cluster.k, p.cluster.k_max, p.cluster.seed)
        labels, anchors, dist = c.labels.tolist(), c.anchors.tolist(), c.dist_to_anchor.tolist()
    else:
        labels, anchors, dist = list(range(len(ids))), list(range(len(ids))), [0.0] * len(ids)
    return [
        {
            "id": fid,
            "batch": b,
            "cluster": labels[j],
            "is_anchor": anchors[labels[j]] == j,
            "anchor_id": ids[anchors[labels[j]]],
            "dist_to_anchor": float(dist[j]),
        }
        for j, fid in enumerate(ids)
    ]
