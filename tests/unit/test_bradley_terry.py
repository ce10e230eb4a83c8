import time
import warnings

import numpy as np
import pytest
from prefcurate.tasks import bradley_terry as bt
from prefcurate.tasks.bradley_terry import (
    confident_mask,
    fit_bradley_terry,
    normalise,
    pairwise_accuracy,
)
from scipy.special import expit
from scipy.stats import spearmanr


def _synthetic(n_items, n_comparisons, seed, soft=False, spread=1.0):
    rng = np.random.default_rng(seed)
    true = spread * rng.normal(size=n_items)
    i = rng.integers(0, n_items, n_comparisons)
    j = rng.integers(0, n_items, n_comparisons)
    keep = i != j
    i, j = i[keep], j[keep]
    prob = expit(true[j] - true[i])
    p = prob if soft else (rng.random(i.size) < prob).astype(np.float64)
    return true, i, j, p


def _gradient(s, i, j, p, l2, w=None):
    w = np.ones_like(p) if w is None else w
    r = w * (expit(s[j] - s[i]) - p)
    n = len(s)
    return np.bincount(j, r, n) - np.bincount(i, r, n) + 2 * l2 * s


def _choix_data(i, j, p):
    """choix's (winner, loser) list for hard outcomes."""
    return [(int(b), int(a)) if outcome == 1.0 else (int(a), int(b)) for a, b, outcome in zip(i, j, p)]


@pytest.mark.parametrize("n_items", [40, 400])  # dense Newton path and PCG path
def test_recovers_known_ratings(n_items):
    true, i, j, p = _synthetic(n_items, 40 * n_items, seed=1, spread=2.0)
    s = fit_bradley_terry(i, j, p, n_items)
    assert spearmanr(s, true).statistic > 0.95
    assert abs(s.mean()) < 1e-9
    assert np.max(np.abs(_gradient(s, i, j, p, bt.DEFAULT_L2))) < 1e-5  # a stationary point


def test_soft_outcomes_are_fractional_wins():
    true, i, j, p = _synthetic(300, 20000, seed=2, soft=True, spread=1.5)
    s = fit_bradley_terry(i, j, p, 300)
    # soft targets = exact expected outcomes: the estimate sits close to the truth
    assert np.max(np.abs(s - normalise(true))) < 0.15
    assert spearmanr(s, true).statistic > 0.99
    # a soft label p is the same as a win with weight p plus a loss with weight 1 - p
    ii, jj = np.concatenate([i, i]), np.concatenate([j, j])
    hard = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    weights = np.concatenate([p, 1.0 - p])
    s_weighted = fit_bradley_terry(ii, jj, hard, 300, weights=weights)
    np.testing.assert_allclose(s, s_weighted, atol=1e-6)


@pytest.mark.parametrize("n_items", [30, 80])  # dense Newton path and PCG path
def test_matches_choix_opt_pairwise(n_items):
    choix = pytest.importorskip("choix")
    _, i, j, p = _synthetic(n_items, 15 * n_items, seed=3)
    l2 = bt.DEFAULT_L2
    ours = fit_bradley_terry(i, j, p, n_items, l2=l2)
    # Same objective: choix's opt_pairwise minimises sum softplus(-(s_w - s_l)) + alpha ||s||^2.
    theirs = choix.opt_pairwise(n_items, _choix_data(i, j, p), alpha=l2, method="BFGS", tol=1e-9)
    assert np.max(np.abs(normalise(ours) - normalise(theirs))) < 1e-3


def test_swapping_the_pair_order_is_the_same_verdict():
    _, i, j, p = _synthetic(100, 2000, seed=4, soft=True)
    np.testing.assert_allclose(fit_bradley_terry(i, j, p, 100), fit_bradley_terry(j, i, 1.0 - p, 100), atol=1e-9)


def test_disconnected_graph_stays_finite_and_components_fit_independently():
    _, i1, j1, p1 = _synthetic(5, 30, seed=5)
    _, i2, j2, p2 = _synthetic(7, 40, seed=6)
    # component 2 offset by 5 items; item 12 is in no comparison at all
    i = np.concatenate([i1, i2 + 5])
    j = np.concatenate([j1, j2 + 5])
    p = np.concatenate([p1, p2])
    for n_extra in (1, 100):  # dense and PCG solvers
        joint = fit_bradley_terry(i, j, p, 12 + n_extra)
        assert np.all(np.isfinite(joint))
        np.testing.assert_allclose(joint[:5], fit_bradley_terry(i1, j1, p1, 5), atol=1e-6)
        np.testing.assert_allclose(joint[5:12], fit_bradley_terry(i2, j2, p2, 7), atol=1e-6)
        np.testing.assert_allclose(joint[12:], 0.0, atol=1e-7)  # 0 up to the solver tolerance


def test_perfect_winner_stays_finite_and_on_top():
    # item 0 wins every comparison, item 3 loses every one
    i = np.array([1, 2, 3, 1, 2, 3, 1, 3])
    j = np.array([0, 0, 0, 2, 1, 2, 3, 1])
    p = np.array([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    for n_items in (4, 100):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # must converge, no warning
            s = fit_bradley_terry(i, j, p, n_items)
        assert np.all(np.isfinite(s))
        assert np.argmax(s[:4]) == 0 and np.argmin(s[:4]) == 3
        assert s[0] < 10.0
    # one comparison, one win: the documented ~2.2 gap at the default l2
    s = fit_bradley_terry([0], [1], [1.0], 2)
    assert s[1] - s[0] == pytest.approx(2.2, abs=0.1)
    # a weaker prior lets it run further, still finite
    gap = np.diff(fit_bradley_terry([0], [1], [1.0], 2, l2=1e-6))[0]
    assert 10.0 < gap < 40.0


def test_small_graphs_are_fast():
    rng = np.random.default_rng(7)
    graphs = []
    for _ in range(200):
        n = int(rng.integers(3, 9))
        i, j = np.triu_indices(n, 1)
        graphs.append((i, j, rng.random(i.size), n))
    started = time.process_time()
    for i, j, p, n in graphs:
        fit_bradley_terry(i, j, p, n)
    per_fit = (time.process_time() - started) / len(graphs)
    assert per_fit < 0.01


def test_input_validation_and_trivial_inputs():
    assert fit_bradley_terry([], [], [], 3).tolist() == [0.0, 0.0, 0.0]
    assert fit_bradley_terry([], [], [], 0).shape == (0,)
    assert fit_bradley_terry([1], [1], [1.0], 2).tolist() == [0.0, 0.0]  # self-comparison ignored
    with pytest.raises(ValueError):
        fit_bradley_terry([0], [3], [1.0], 3)
    with pytest.raises(ValueError):
        fit_bradley_terry([0], [1], [1.2], 2)
    with pytest.raises(ValueError):
        fit_bradley_terry([0], [1], [np.nan], 2)
    with pytest.raises(ValueError):
        fit_bradley_terry([0], [1], [1.0], 2, l2=0.0)
    with pytest.raises(ValueError):
        fit_bradley_terry([0], [1], [1.0], 2, weights=[-1.0])


def test_max_iter_exhaustion_warns():
    _, i, j, p = _synthetic(200, 4000, seed=8)
    with pytest.warns(RuntimeWarning):
        fit_bradley_terry(i, j, p, 200, max_iter=1)


def test_confident_mask_follows_qurating_threshold():
    p = np.array([0.0, 0.2, 0.25, 0.5, 0.74, 0.75, 0.8, 1.0])
    assert confident_mask(p).tolist() == [True, True, True, False, False, True, True, True]
    assert confident_mask(p, threshold=0.3).tolist() == [True, True, False, False, False, False, True, True]


def test_pairwise_accuracy():
    scores = np.array([0.0, 1.0, 2.0, 2.0])
    i = np.array([0, 1, 2, 0, 1])
    j = np.array([1, 0, 3, 2, 2])
    p = np.array([0.9, 0.6, 0.9, 0.5, 0.7])
    # pair 0 right, pair 1 wrong, pair 2 a score tie (half), pair 3 undecided (skipped), pair 4 right
    assert pairwise_accuracy(scores, i, j, p) == pytest.approx(2.5 / 4)
    # at 80% confidence only pairs 0 and 2 count
    assert pairwise_accuracy(scores, i, j, p, min_confidence=bt.QURATING_HIGH_CONFIDENCE) == pytest.approx(0.75)
    assert np.isnan(pairwise_accuracy(scores, i[:1], j[:1], np.array([0.5])))


def test_normalise_centres():
    assert normalise([1.0, 2.0, 3.0]).tolist() == [-1.0, 0.0, 1.0]
    assert normalise([]).shape == (0,)


@pytest.mark.parametrize("n_items", [5, bt.DENSE_MAX_ITEMS + 10])
def test_all_ties_give_equal_strengths_without_failing(n_items):
    # every verdict 0.5 (identical responses, a judge that always abstains): the start is
    # already the optimum, so the first Newton system has a zero right-hand side
    rng = np.random.default_rng(0)
    i = rng.integers(0, n_items, 4 * n_items)
    j = (i + 1 + rng.integers(0, n_items - 1, i.size)) % n_items
    strengths = fit_bradley_terry(i, j, np.full(i.size, 0.5), n_items)
    np.testing.assert_array_equal(strengths, np.zeros(n_items))
