"""Exact and semantic de-duplication: planted duplicates are found, the best copy is kept."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from prefcurate.tasks.dedup import (
    DedupParams,
    exact_duplicates,
    groups_from_pairs,
    kmeans_partition,
    near_duplicate_pairs,
    normalize_texts,
    pair_dedup_text,
    representatives,
    semantic_duplicates,
)

THRESHOLD = 0.95


def planted(n_base: int, n_dup: int, *, d: int = 64, n_centers: int = 20, seed: int = 0):
    """Clustered unit vectors (within-cluster cosine ~0.5) plus copies at cosine 0.965-0.995.

    Returns (x, planted pairs (source, copy) sorted, number of base vectors).
    """
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_centers, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    noise = rng.standard_normal((n_base, d))
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    base = centers[rng.integers(0, n_centers, n_base)] + noise
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    source = rng.choice(n_base, n_dup, replace=False)
    target = rng.uniform(0.965, 0.995, n_dup)[:, None]
    ortho = rng.standard_normal((n_dup, d))
    ortho -= (ortho * base[source]).sum(1, keepdims=True) * base[source]
    ortho /= np.linalg.norm(ortho, axis=1, keepdims=True)
    copies = target * base[source] + np.sqrt(1 - target**2) * ortho
    x = np.vstack([base, copies]).astype(np.float32)
    pairs = np.stack([source, np.arange(n_base, n_base + n_dup)], axis=1)
    return x, pairs, n_base


def brute_force(x: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    found: set[tuple[int, int]] = set()
    for start in range(0, len(x), 1024):
        i, j = np.nonzero(x[start : start + 1024] @ x.T >= threshold)
        found |= {(a + start, b) for a, b in zip(i.tolist(), j.tolist(), strict=True) if b > a + start}
    return found


def as_set(pairs: np.ndarray) -> set[tuple[int, int]]:
    return set(map(tuple, pairs.tolist()))


def test_exact_duplicates_normalise_and_keep_best():
    texts = ["Hello  World", "hello world", "ﬁsh", "fish", " other ", "Other", None, ""]
    quality = [0.1, 0.9, 0.5, np.nan, 0.3, 0.3, 0.0, 0.2]
    keep, duplicate_of = exact_duplicates(texts, quality)
    assert normalize_texts(["  A\tB\n"]).to_list() == ["a b"]
    # "Hello  World" ~ "hello world": the higher quality (index 1) is kept
    assert not keep[0] and keep[1] and duplicate_of[0] == 1
    # NFKC folds the ligature; NaN quality never represents a group
    assert keep[2] and not keep[3] and duplicate_of[3] == 2
    # equal quality: the lower index wins
    assert keep[4] and not keep[5] and duplicate_of[5] == 4
    # None and "" are the same (empty) text
    assert keep[7] and not keep[6] and duplicate_of[6] == 7
    assert (duplicate_of[keep] == -1).all()


def test_representatives_and_groups():
    group = groups_from_pairs(6, np.array([[0, 1], [1, 2], [4, 5]]))
    assert group[0] == group[1] == group[2] != group[3]
    assert group[4] == group[5]
    keep, duplicate_of = representatives(group, [1.0, 3.0, 2.0, 0.0, 5.0, 5.0])
    assert keep.tolist() == [False, True, False, True, True, False]
    assert duplicate_of.tolist() == [1, -1, 1, -1, -1, 4]


def test_brute_force_path_finds_planted_pairs():
    x, pairs, _ = planted(1500, 150, seed=1)
    found, sims, partition = near_duplicate_pairs(x, THRESHOLD)
    assert partition is None  # small: exact path
    assert as_set(found) == brute_force(x, THRESHOLD)
    assert as_set(pairs) <= as_set(found)
    assert np.all(sims >= THRESHOLD) and np.all(found[:, 0] < found[:, 1])


def test_index_path_recall_and_precision_on_planted_duplicates():
    x, pairs, n_base = planted(6_000, 600, d=96, n_centers=40, seed=2)
    params = DedupParams(exact_below=0, seed=3)
    found, sims, partition = near_duplicate_pairs(x, THRESHOLD, params)
    assert partition is not None and partition.n_cells == round(2 * np.sqrt(len(x)))
    truth = brute_force(x, THRESHOLD)
    got = as_set(found)
    recall = len(got & truth) / len(truth)
    assert recall >= 0.95
    assert got <= truth  # every reported pair is a real one (similarities are exact)
    planted_recall = len(as_set(pairs) & got) / len(pairs)
    assert planted_recall >= 0.95
    np.testing.assert_allclose(sims, (x[found[:, 0]] * x[found[:, 1]]).sum(1), atol=1e-5)


def test_semantic_duplicates_keep_the_best_copy():
    x, pairs, n_base = planted(3000, 300, seed=4)
    quality = np.random.default_rng(0).normal(size=len(x))
    keep, duplicate_of = semantic_duplicates(x, quality, THRESHOLD, DedupParams(exact_below=0))
    dropped = np.flatnonzero(~keep)
    # each planted pair loses exactly its lower-quality member (sources are distinct)
    lower = np.where(quality[pairs[:, 0]] < quality[pairs[:, 1]], pairs[:, 0], pairs[:, 1])
    higher = np.where(quality[pairs[:, 0]] < quality[pairs[:, 1]], pairs[:, 1], pairs[:, 0])
    recall = np.isin(lower, dropped).mean()
    assert recall >= 0.95
    assert set(dropped.tolist()) <= set(lower.tolist())  # precision 1: nothing else dropped
    hit = np.isin(lower, dropped)
    assert (duplicate_of[lower[hit]] == higher[hit]).all()
    assert (duplicate_of[keep] == -1).all() and keep[duplicate_of[dropped]].all()


def test_large_clique_is_reduced_but_stays_one_group():
    rng = np.random.default_rng(5)
    base = rng.standard_normal(32)
    clique = base + 0.01 * rng.standard_normal((600, 32))
    others = rng.standard_normal((400, 32))
    x = np.vstack([clique, others]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    pairs, _, _ = near_duplicate_pairs(x, 0.99, DedupParams(exact_below=0, n_clusters=2, project_dim=None))
    assert len(pairs) < 600 * 599 // 2  # not every clique edge is kept...
    keep, duplicate_of = semantic_duplicates(
        x, np.arange(len(x), dtype=float), 0.99, DedupParams(exact_below=0, n_clusters=2)
    )
    assert keep[:600].sum() == 1 and keep[599]  # ...but the clique is one group, best (last) kept
    assert keep[600:].all()


def test_partition_probes_are_ordered():
    x, _, _ = planted(2000, 0, seed=6)
    part = kmeans_partition(x, 16, n_probe=3, seed=0, project_dim=16)
    assert part.probes.shape == (2000, 3) and (part.probes[:, 0] == part.labels).all()
    assert np.all(np.diff(part.probe_scores, axis=1) <= 1e-6)
    sub = part.subset(np.arange(10))
    assert sub.labels.shape == (10,) and sub.n_cells == 16


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_inputs(n):
    x = np.ones((n, 8), dtype=np.float32)
    keep, duplicate_of = semantic_duplicates(x, np.zeros(n))
    assert keep.shape == (n,) and keep.all() and (duplicate_of == -1).all()


def test_pair_dedup_text_keeps_the_columns_apart():
    pairs = pl.DataFrame({"prompt": ["p", "p", "p", "P "], "chosen": ["a\x1fb", "a", "x  y", "X y"],
                          "rejected": ["c", "b\x1fc", "z", "Z"]})
    text = pair_dedup_text(pairs)
    keep, duplicate_of = exact_duplicates(text)
    # a separator character inside a text no longer joins two different pairs; case and spaces still do
    assert keep.tolist() == [True, True, True, False] and duplicate_of[3] == 2
    assert normalize_texts(text).to_list() == text.to_list()
