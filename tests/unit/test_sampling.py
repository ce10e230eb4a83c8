import numpy as np
import pytest
from prefcurate.tasks.sampling import gumbel_keys, gumbel_topk, take_within_budget, zscore


def _inclusion_frequencies(quality, k, tau, trials, seed):
    rng = np.random.default_rng(seed)
    counts = np.zeros(len(quality))
    for _ in range(trials):
        counts[gumbel_topk(quality, k, tau, rng)] += 1
    return counts / trials


def test_zscore_standardises_and_handles_constant():
    z = zscore([1.0, 2.0, 3.0, 4.0])
    assert abs(z.mean()) < 1e-12
    assert z.std() == pytest.approx(1.0)
    assert np.all(np.diff(z) > 0)
    assert np.array_equal(zscore([5.0, 5.0, 5.0]), np.zeros(3))
    with pytest.raises(ValueError):
        zscore([1.0, np.nan])


def test_tau_zero_is_exact_topk_in_quality_order_with_ties_to_lower_index():
    quality = np.array([0.3, 2.0, -1.0, 2.0, 0.9, 0.1])
    assert gumbel_topk(quality, 3, tau=0.0).tolist() == [1, 3, 4]
    # a shift and a scale of quality change nothing (z-scoring)
    assert gumbel_topk(10 * quality + 7, 3, tau=0.0).tolist() == [1, 3, 4]


def test_small_tau_is_topk_for_every_seed():
    quality = np.random.default_rng(0).normal(size=200)
    expected = set(np.argsort(-quality)[:20].tolist())
    for seed in range(20):
        assert set(gumbel_topk(quality, 20, tau=1e-6, rng=seed).tolist()) == expected


def test_large_tau_is_near_uniform():
    quality = np.linspace(-3.0, 3.0, 20)  # strongly graded quality
    k, trials = 5, 4000
    freq = _inclusion_frequencies(quality, k, tau=1e6, trials=trials, seed=1)
    # each item is included with probability k/n = 0.25; sd of a frequency ~ 0.0068
    assert np.max(np.abs(freq - k / len(quality))) < 0.035
    counts = freq * trials
    expected = trials * k / len(quality)
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 45.0  # chi-square with ~19 dof: 45 is far in the tail (p ~ 7e-4)
    # infinite temperature is exactly uniform sampling
    freq_inf = _inclusion_frequencies(quality, k, tau=float("inf"), trials=trials, seed=2)
    assert np.max(np.abs(freq_inf - 0.25)) < 0.035


def test_first_pick_follows_softmax_of_z_over_tau():
    quality = np.array([0.0, 1.0, 2.0, 4.0, 4.5])
    tau = 1.0
    z = zscore(quality)
    softmax = np.exp(z / tau) / np.exp(z / tau).sum()
    freq = _inclusion_frequencies(quality, k=1, tau=tau, trials=20000, seed=3)
    assert np.max(np.abs(freq - softmax)) < 0.015  # sd <= 0.0035


def test_inclusion_is_monotone_in_quality_at_moderate_tau():
    quality = np.arange(10, dtype=float)
    freq = _inclusion_frequencies(quality, k=3, tau=2.0, trials=3000, seed=4)
    assert freq[-1] > freq[5] > freq[0]
    assert 0.0 < freq[0] < freq[-1] < 1.0


def test_output_contract():
    quality = np.random.default_rng(5).normal(size=50)
    picks = gumbel_topk(quality, 10, tau=1.0, rng=7)
    assert picks.dtype == np.int64 and len(picks) == 10 and len(set(picks.tolist())) == 10
    keys = gumbel_keys(quality, 1.0, rng=7)
    assert np.all(np.diff(keys[picks]) < 0)  # draw order: largest key first
    assert np.array_equal(picks, gumbel_topk(quality, 10, tau=1.0, rng=7))  # reproducible
    assert len(gumbel_topk(quality, 500, tau=1.0, rng=7)) == 50  # k is capped at n
    assert len(gumbel_topk(quality, 0, tau=1.0, rng=7)) == 0
    with pytest.raises(ValueError):
        gumbel_topk(quality, 3, tau=-1.0)


def test_take_within_budget_is_a_hard_cap():
    order = np.array([3, 0, 2, 1])
    costs = np.array([5.0, 1.0, 4.0, 3.0])  # by item
    assert take_within_budget(order, costs, budget=8.0).tolist() == [3, 0]
    assert take_within_budget(order, costs, budget=13.0).tolist() == [3, 0, 2, 1]
    assert take_within_budget(order, costs, budget=2.0).tolist() == []
