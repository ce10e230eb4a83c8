import time

import numpy as np
import pytest
import torch
from prefcurate.tasks.bradley_terry import pairwise_accuracy
from prefcurate.tasks.scorer import (
    PairwiseScorer,
    ScorerParams,
    pairwise_bt_loss,
    train_pairwise_scorer,
    train_reward_model,
)


def _planted(n_items=1000, n_pairs=8000, dim=384, scale=6.0, seed=0, direction_seed=99):
    """Unit-norm embeddings whose quality is a planted linear direction; soft judge labels."""
    direction = np.random.default_rng(direction_seed).normal(size=dim)
    direction /= np.linalg.norm(direction)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_items, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    quality = x @ direction
    quality = scale * (quality - quality.mean()) / quality.std()
    i = rng.integers(0, n_items, n_pairs)
    j = rng.integers(0, n_items, n_pairs)
    keep = i != j
    i, j = i[keep], j[keep]
    p = 1.0 / (1.0 + np.exp(-(quality[j] - quality[i])))
    return x, quality, i, j, p


def test_learns_a_planted_linear_quality_direction_quickly():
    x, quality, i, j, p = _planted()
    started = time.process_time()  # CPU time: robust to a busy shared host
    scorer, report = train_pairwise_scorer(x, i, j, p, ScorerParams(epochs=15), seed=0)
    cpu_seconds = time.process_time() - started
    assert report.heldout_accuracy is not None and report.heldout_accuracy > 0.9
    assert report.heldout_accuracy_80 is not None and report.heldout_accuracy_80 >= report.heldout_accuracy
    assert report.n_heldout_pairs == pytest.approx(0.1 * len(i), abs=1)
    assert report.n_train_pairs < len(i) - report.n_heldout_pairs  # confident-only training
    assert cpu_seconds < 20.0
    # the learnt scores rank fresh items like the planted quality
    fresh_x, fresh_q, fi, fj, fp = _planted(n_items=400, n_pairs=3000, seed=10)
    assert pairwise_accuracy(scorer.score(fresh_x), fi, fj, fp) > 0.9
    assert np.corrcoef(scorer.score(fresh_x), fresh_q)[0, 1] > 0.9


def test_mlp_scorer_also_learns():
    x, _, i, j, p = _planted(n_items=800, n_pairs=6000, seed=1)
    _, report = train_pairwise_scorer(x, i, j, p, ScorerParams(hidden_dim=32, epochs=15), seed=1)
    assert report.heldout_accuracy > 0.85


def test_reward_model_on_hard_labels_is_the_p_equals_one_loss():
    s_chosen = torch.tensor([2.0, -1.0, 0.5])
    s_rejected = torch.tensor([0.0, 1.0, 0.5])
    expected = -torch.nn.functional.logsigmoid(s_chosen - s_rejected).mean()
    assert torch.allclose(pairwise_bt_loss(s_rejected, s_chosen, torch.ones(3)), expected)

    x, quality, i, j, _ = _planted(n_items=800, n_pairs=6000, seed=2)
    chosen = np.where(quality[j] > quality[i], j, i)
    rejected = np.where(quality[j] > quality[i], i, j)
    scorer, report = train_reward_model(x, chosen, rejected, ScorerParams(epochs=15), seed=2)
    assert report.heldout_accuracy > 0.9
    scores = scorer.score(x)
    assert np.mean(scores[chosen] > scores[rejected]) > 0.9


def test_seeded_training_is_reproducible_and_keeps_global_rng():
    x, _, i, j, p = _planted(n_items=300, n_pairs=2000, seed=3)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, report_a = train_pairwise_scorer(x, i, j, p, ScorerParams(epochs=3), seed=7)
    after = torch.rand(1)
    b, report_b = train_pairwise_scorer(x, i, j, p, ScorerParams(epochs=3), seed=7)
    assert torch.equal(before, after)
    np.testing.assert_array_equal(a.score(x), b.score(x))
    assert report_a.heldout_accuracy == report_b.heldout_accuracy


def test_save_and_load_round_trip(tmp_path):
    x, _, i, j, p = _planted(n_items=300, n_pairs=2000, seed=4)
    params = ScorerParams(hidden_dim=8, epochs=2)
    scorer, _ = train_pairwise_scorer(x, i, j, p, params, seed=0)
    path = tmp_path / "scorer.pt"
    scorer.save(path)
    loaded = PairwiseScorer.load(path)
    assert loaded.params == params
    np.testing.assert_allclose(loaded.score(x), scorer.score(x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        loaded.score(x[:, :10])


def test_params_forbid_unknown_fields_and_bad_inputs_fail():
    with pytest.raises(ValueError):
        ScorerParams(hidden_layers=2)
    x = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(ValueError):
        train_pairwise_scorer(x, [0], [5], [1.0])
    with pytest.raises(ValueError):
        train_pairwise_scorer(x, [0], [1], [1.5])
    # only undecided labels: nothing confident to train on
    with pytest.raises(ValueError):
        train_pairwise_scorer(x, [0, 1], [1, 2], [0.5, 0.5], ScorerParams(holdout_fraction=0.0))
