"""Selection to a budget: budgets, quotas, the quality-diversity knob, the SELECTIONS frame."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from prefcurate.schemas import tables
from prefcurate.tasks.selection import (
    BUDGET,
    EXACT_DUPLICATE,
    NEAR_DUPLICATE,
    SELECTED,
    SelectParams,
    allocate_quotas,
    blockwise_greedy,
    select_items,
    selection_report,
)

METHODS = ["top_k", "gumbel", "cluster_quota", "kcenter", "facility_location"]


def clustered(n: int = 1200, *, d: int = 48, n_centers: int = 12, seed: int = 0):
    """Clustered unit vectors; quality is high in cluster 0 only, so quality alone is not diverse."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_centers, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    label = rng.integers(0, n_centers, n)
    noise = rng.standard_normal((n, d))
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    x = centers[label] + 0.9 * noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    quality = rng.normal(size=n) + 3.0 * (label == 0)
    return x.astype(np.float32), quality, label


@pytest.mark.parametrize("method", METHODS)
def test_budget_ranks_and_reasons(method):
    x, quality, _ = clustered(seed=1)
    result = select_items(
        x, quality, SelectParams(method=method, budget=150, diversity_weight=0.5, block_size=256)
    )
    assert result.selected.sum() == 150
    assert sorted(result.rank[result.selected].tolist()) == list(range(1, 151))
    assert (result.rank[~result.selected] == 0).all()
    assert set(result.reason[result.selected]) == {SELECTED}
    assert set(result.reason[~result.selected]) <= {BUDGET, NEAR_DUPLICATE, EXACT_DUPLICATE}
    assert len(result.order) == 150 and result.rank[result.order[0]] == 1


@pytest.mark.parametrize("method", METHODS)
def test_zero_diversity_weight_is_quality_top_k(method):
    x, quality, _ = clustered(seed=2)
    result = select_items(
        x, quality, SelectParams(method=method, budget=100, diversity_weight=0.0, block_size=256)
    )
    top = np.argsort(-quality, kind="stable")[:100]
    assert set(np.flatnonzero(result.selected).tolist()) == set(top.tolist())


@pytest.mark.parametrize("method", ["kcenter", "facility_location", "cluster_quota", "gumbel"])
def test_diversity_weight_one_is_more_diverse_than_zero(method):
    x, quality, label = clustered(n=1500, seed=3)
    reports = {}
    for lam in (0.0, 1.0):
        params = SelectParams(method=method, budget=120, diversity_weight=lam, block_size=256, n_clusters=12)
        result = select_items(x, quality, params)
        reports[lam] = selection_report(x, quality, result, seed=0)["selected"]
    assert (
        reports[1.0]["mean_pairwise_cosine_distance"] > reports[0.0]["mean_pairwise_cosine_distance"] + 0.05
    )
    assert reports[1.0]["cluster_entropy"] > reports[0.0]["cluster_entropy"]
    assert reports[1.0]["pool_coverage_similarity"] > reports[0.0]["pool_coverage_similarity"]
    assert reports[0.0]["mean_quality"] > reports[1.0]["mean_quality"]  # the trade-off is real


def test_cluster_quotas_equal_and_proportional():
    x, quality, _ = clustered(n=1200, seed=4)
    equal = select_items(
        x,
        quality,
        SelectParams(method="cluster_quota", budget=120, diversity_weight=1.0, quota="equal", n_clusters=8),
    )
    counts = np.bincount(equal.cluster[equal.selected], minlength=8)
    capacity = np.bincount(equal.cluster[equal.reason != NEAR_DUPLICATE], minlength=8)
    assert counts.sum() == 120
    assert counts.max() - counts[capacity > counts].min() <= 1  # equal wherever capacity allows
    proportional = select_items(
        x, quality, SelectParams(method="cluster_quota", budget=120, diversity_weight=1.0, n_clusters=8)
    )
    pool = proportional.reason != NEAR_DUPLICATE
    sizes = np.bincount(proportional.cluster[pool], minlength=8)
    got = np.bincount(proportional.cluster[proportional.selected], minlength=8)
    assert np.abs(got - 120 * sizes / sizes.sum()).max() < 1.0
    # within a cluster, the quota goes to the best items
    for c in range(8):
        chosen = proportional.selected & (proportional.cluster == c)
        rest = pool & ~proportional.selected & (proportional.cluster == c)
        if chosen.any() and rest.any():
            assert quality[chosen].min() >= quality[rest].max()


def test_allocate_quotas_caps_and_redistributes():
    quotas = allocate_quotas(10, np.array([1, 100, 100]), np.array([1 / 3, 1 / 3, 1 / 3]))
    assert quotas.tolist()[0] == 1 and quotas.sum() == 10 and abs(quotas[1] - quotas[2]) <= 1
    assert allocate_quotas(50, np.array([3, 4]), np.array([0.5, 0.5])).tolist() == [3, 4]
    assert allocate_quotas(7, np.array([10, 10, 10]), np.array([0.0, 0.0, 1.0])).tolist() == [0, 0, 7]


def naive_block_greedy(x, quality_rank, blocks, k, lam, method):
    """Plain greedy over the whole set with block-diagonal similarities (the reference)."""
    n = len(x)
    block_of = np.empty(n, dtype=int)
    for b, members in enumerate(blocks):
        block_of[members] = b
    same = block_of[:, None] == block_of[None, :]
    sims = np.where(same, x @ x.T, 0.0)
    picked: list[int] = []
    if method == "facility_location":
        covered = np.zeros(n)
        for _ in range(k):
            gain = (1 - lam) / k * quality_rank + lam / n * np.maximum(np.maximum(sims, 0) - covered, 0).sum(
                1
            )
            gain[picked] = -np.inf
            i = int(np.argmax(gain))
            picked.append(i)
            covered = np.maximum(covered, np.maximum(sims[i], 0))
    else:
        distance = np.full(n, 2.0)
        for _ in range(k):
            score = (1 - lam) * quality_rank + lam * distance / 2
            score[picked] = -np.inf
            i = int(np.argmax(score))
            picked.append(i)
            distance = np.where(same[i], np.minimum(distance, 1 - sims[i]), distance)
    return picked


@pytest.mark.parametrize("method", ["facility_location", "kcenter"])
def test_blockwise_greedy_matches_plain_greedy(method):
    x, quality, label = clustered(n=400, seed=5)
    quality_rank = (np.argsort(np.argsort(quality)) / 399.0).astype(np.float64)
    blocks = [np.flatnonzero(label % 4 == b) for b in range(4)]
    k = 60
    fast = blockwise_greedy(x, np.arange(400), quality_rank, blocks, k, 0.7, method, threads=1)
    slow = naive_block_greedy(x.astype(np.float64), quality_rank, blocks, k, 0.7, method)
    assert set(fast.tolist()) == set(slow)
    assert fast.tolist()[:10] == slow[:10]


def test_duplicates_are_dropped_and_point_to_kept_items():
    x, quality, _ = clustered(n=600, seed=6)
    x = np.vstack([x, x[:20], x[20:40] + 0.02 * np.random.default_rng(0).standard_normal((20, x.shape[1]))])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    quality = np.concatenate([quality, quality[:20] - 1.0, quality[20:40] + 1.0])
    texts = (
        [f"text {i}" for i in range(600)]
        + [f"TEXT  {i}" for i in range(20)]
        + [f"para {i}" for i in range(20)]
    )
    result = select_items(x, quality, SelectParams(method="facility_location", budget=100), texts=texts)
    assert (result.reason[600:620] == EXACT_DUPLICATE).all()
    assert (result.duplicate_of[600:620] == np.arange(20)).all()
    # the near-duplicate copies have higher quality: the originals are dropped for them
    assert (result.reason[20:40] == NEAR_DUPLICATE).all()
    assert (result.duplicate_of[20:40] == np.arange(620, 640)).all()
    dropped = result.duplicate_of >= 0
    assert not result.selected[dropped].any()
    assert (result.reason[result.duplicate_of[dropped]] != NEAR_DUPLICATE).all()
    assert (result.cluster[dropped] == result.cluster[result.duplicate_of[dropped]]).all()
    assert result.info["n_candidates"] == 600


def test_frame_matches_selections_table():
    x, quality, _ = clustered(n=300, seed=7)
    x = np.vstack([x, x[:5]])
    quality = np.concatenate([quality, quality[:5] - 1])
    quality[3] = np.nan
    result = select_items(x, quality, SelectParams(method="kcenter", budget=30))
    ids = [f"pair-{i}" for i in range(len(x))]
    frame = result.to_frame(ids)
    schema = pa.schema([f for f in tables.SELECTIONS if f.name not in {p.name for p in tables.PROVENANCE}])
    assert frame.columns == schema.names
    frame.to_arrow().cast(schema)  # types line up with the contract
    assert frame.filter(pl.col("selected"))["rank"].null_count() == 0
    assert frame.filter(~pl.col("selected"))["rank"].null_count() == frame.height - 30
    dup = frame.filter(pl.col("duplicate_of").is_not_null())
    assert dup.height == 5 and set(dup["reason"]) == {NEAR_DUPLICATE}
    # copies point at the originals, except where the original's quality is NaN (unscored loses)
    expected = [ids[i] for i in range(5) if i != 3] + [ids[300 + 3]]
    assert sorted(dup["duplicate_of"].to_list()) == sorted(expected)
    assert frame["quality"][3] is None


def test_report_compares_with_random():
    x, quality, _ = clustered(n=1000, seed=8)
    result = select_items(
        x, quality, SelectParams(method="facility_location", budget=100, diversity_weight=0.5)
    )
    report = selection_report(x, quality, result)
    assert report["selected"]["n"] == report["random"]["n"] == 100
    assert report["selected"]["mean_quality"] > report["random"]["mean_quality"]
    assert 0 < report["selected"]["cluster_coverage"] <= 1
    assert report["budget"] == 100 and report["n_items"] == 1000


def test_params_validation_and_tau():
    with pytest.raises(ValueError):
        SelectParams(budget=3, budget_share=0.5)
    with pytest.raises(ValueError):
        SelectParams(unknown=1)
    assert SelectParams(diversity_weight=0.5).resolved_tau() == 1.0
    assert SelectParams(diversity_weight=2 / 3).resolved_tau() == pytest.approx(2.0)
    assert SelectParams(diversity_weight=1.0).resolved_tau() == float("inf")
    x, quality, _ = clustered(n=200, seed=9)
    share = select_items(x, quality, SelectParams(method="top_k", budget_share=0.25, dedup_threshold=None))
    assert share.selected.sum() == 50


def test_second_embeddings_must_be_near_too_for_a_near_duplicate():
    x, quality, _ = clustered(n=200, seed=9)
    second, _, _ = clustered(n=200, seed=10)
    # items 200-209 repeat items 0-9 in both vectors; items 210-219 only in the first
    first = np.vstack([x, x[:10], x[10:20]])
    other = np.vstack([second, second[:10], clustered(n=10, seed=11)[0]])
    quality = np.concatenate([quality, quality[:10] - 1.0, quality[10:20] - 1.0])
    params = SelectParams(method="top_k", budget=None)
    alone = select_items(first, quality, params)
    assert (alone.reason[200:220] == NEAR_DUPLICATE).all()  # one vector: both copies are duplicates
    both = select_items(first, quality, params, second_embeddings=other)
    assert (both.reason[200:210] == NEAR_DUPLICATE).all() and (both.duplicate_of[200:210] == np.arange(10)).all()
    assert (both.reason[210:220] == SELECTED).all() and (both.reason[10:20] == SELECTED).all()
    with pytest.raises(ValueError, match="second_embeddings"):
        select_items(first, quality, params, second_embeddings=other[:5])


@pytest.mark.timeout(60, method="thread")  # the loop runs in a worker thread: end the process
def test_facility_location_ends_when_many_items_tie():
    # 10 vectors 47 times each, one quality: once each is covered, 460 items share one bound,
    # more than a refresh batch, and the lazy greedy once refreshed the others forever
    rng = np.random.default_rng(0)
    base = rng.standard_normal((10, 32))
    x = np.repeat(base / np.linalg.norm(base, axis=1, keepdims=True), 47, axis=0).astype(np.float32)
    result = select_items(x, np.zeros(len(x)), SelectParams(method="facility_location", dedup_threshold=None))
    assert result.selected.all() and sorted(result.rank.tolist()) == list(range(1, len(x) + 1))
    # the first ten picks cover the ten vectors, one each
    assert len({int(i) // 47 for i in result.order[:10]}) == 10
