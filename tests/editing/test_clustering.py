"""Stage 2a: Jaccard distances, k-medoids, silhouette and the auto-k rule."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ece.editing.clustering import cluster_facts, jaccard_distances, kmedoids, silhouette


def line_distances(points: list[float]) -> np.ndarray:
    x = np.array(points, dtype=float)
    return np.abs(x[:, None] - x[None, :])


def neurons(layer: int, indices: range) -> frozenset[tuple[int, int]]:
    return frozenset((layer, j) for j in indices)


def test_jaccard_by_hand() -> None:
    sets = [frozenset({1, 2, 3}), frozenset({2, 3, 4}), frozenset(), frozenset(), frozenset({(0, 1)})]
    d = jaccard_distances(sets)
    assert d[0, 1] == pytest.approx(0.5)
    assert d[0, 2] == 1.0 and d[2, 4] == 1.0
    assert d[2, 3] == 0.0
    assert d[0, 4] == 1.0
    assert np.array_equal(np.diag(d), np.zeros(5))
    assert np.array_equal(d, d.T)


def test_jaccard_matches_sets_and_is_fast() -> None:
    rng = np.random.default_rng(0)
    sets = [frozenset((int(l), int(j)) for l, j in rng.integers(0, [5, 2000], size=(1000, 2))) for _ in range(100)]
    start = time.perf_counter()
    d = jaccard_distances(sets)
    assert time.perf_counter() - start < 2.0
    for i, j in [(0, 1), (7, 42), (99, 3)]:
        assert d[i, j] == pytest.approx(1 - len(sets[i] & sets[j]) / len(sets[i] | sets[j]))


def test_medoid_is_the_smallest_distance_sum_lowest_index_on_ties() -> None:
    # Sums of distances: 13, 11, 11, 27 -> points 1 and 2 tie, eq. 10 takes point 1.
    dist = line_distances([0, 1, 2, 10])
    for seed in range(5):
        labels, medoids = kmedoids(dist, 1, seed)
        assert medoids.tolist() == [1]
        assert labels.tolist() == [0, 0, 0, 0]


def test_kmedoids_splits_two_groups_and_clips_k() -> None:
    dist = line_distances([0, 1, 2, 100, 101, 102])
    labels, medoids = kmedoids(dist, 2, seed=3)
    assert sorted(medoids.tolist()) == [1, 4]
    assert len(set(labels[:3])) == 1 and len(set(labels[3:])) == 1 and labels[0] != labels[3]
    labels, medoids = kmedoids(dist[:2, :2], 5, seed=0)
    assert len(medoids) == 2 and sorted(labels.tolist()) == [0, 1]


def test_kmedoids_never_leaves_a_cluster_empty_on_duplicates() -> None:
    dist = np.zeros((4, 4))
    labels, medoids = kmedoids(dist, 3, seed=0)
    assert len(set(medoids.tolist())) == 3
    assert set(labels.tolist()) == {0, 1, 2}


def test_silhouette_by_hand() -> None:
    dist = np.array([[0, 0.2, 1, 1], [0.2, 0, 1, 1], [1, 1, 0, 0.2], [1, 1, 0.2, 0]])
    assert silhouette(dist, np.array([0, 0, 1, 1])) == pytest.approx(0.8)
    assert silhouette(dist, np.array([0, 1, 2, 3])) == 0.0  # singletons
    assert silhouette(dist, np.array([5, 5, 5, 5])) == 0.0  # one cluster


def test_identical_sets_make_one_cluster_under_auto() -> None:
    result = cluster_facts([neurons(3, range(10))] * 6, "auto", k_max=8, seed=0)
    assert result.labels.tolist() == [0] * 6
    assert result.anchors.tolist() == [0]
    assert result.dist_to_anchor.tolist() == [0.0] * 6


def test_two_separated_groups_under_auto_with_eq10_anchors() -> None:
    # Group a: 10, 9 and 8 neurons of layer 3; group b: the same shapes on layer 4. Interleaved input.
    # Within a group the middle set (9 neurons) has the smallest distance sum, so it is the anchor.
    a = [neurons(3, range(10)), neurons(3, range(9)), neurons(3, range(8))]
    b = [neurons(4, range(10)), neurons(4, range(9)), neurons(4, range(8))]
    sets = [a[0], b[0], a[1], b[1], a[2], b[2]]
    result = cluster_facts(sets, "auto", k_max=8, seed=0)
    assert result.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert result.anchors.tolist() == [2, 3]
    np.testing.assert_allclose(result.dist_to_anchor, [0.1, 0.1, 0.0, 0.0, 1 - 8 / 9, 1 - 8 / 9])


def test_same_seed_same_result() -> None:
    rng = np.random.default_rng(1)
    sets = [frozenset(rng.choice(60, size=15, replace=False).tolist()) for _ in range(30)]
    for k in ("auto", 4):
        first, second = (cluster_facts(sets, k, k_max=6, seed=7) for _ in range(2))
        assert np.array_equal(first.labels, second.labels)
        assert np.array_equal(first.anchors, second.anchors)


def test_never_more_clusters_than_facts() -> None:
    sets = [neurons(0, range(3)), neurons(1, range(3)), neurons(2, range(3))]
    result = cluster_facts(sets, 10, k_max=8, seed=0)
    assert result.labels.tolist() == [0, 1, 2]
    assert result.anchors.tolist() == [0, 1, 2]
    assert len(cluster_facts(sets, "auto", k_max=10, seed=0).anchors) <= 3
    assert cluster_facts(sets[:1], "auto", k_max=8, seed=0).labels.tolist() == [0]


def test_labels_are_numbered_by_first_appearance_and_anchors_belong_to_their_cluster() -> None:
    rng = np.random.default_rng(2)
    sets = [frozenset(rng.choice(40, size=10, replace=False).tolist()) for _ in range(20)]
    result = cluster_facts(sets, 5, k_max=8, seed=0)
    first_seen = list(dict.fromkeys(result.labels.tolist()))
    assert first_seen == list(range(len(result.anchors)))
    assert result.labels[result.anchors].tolist() == list(range(len(result.anchors)))


def test_empty_batch() -> None:
    result = cluster_facts([], "auto", k_max=8, seed=0)
    assert len(result.labels) == 0 and len(result.anchors) == 0
