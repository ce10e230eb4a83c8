"""Jury aggregation that learns whom to trust (tasks/jury.py): EM, calibrated weights, overrides."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from prefcurate.tasks.jury import (
    PAIR_KEY,
    accuracy_weight,
    aggregate_jury,
    jury_from_verdicts,
    latent_jury,
    moment_accuracy,
    one_coin_em,
    override_with_labels,
    vote_expr,
    weighted_vote_posterior,
)


def _votes(accuracy, n=4000, abstain=0.1, seed=0, copy=None):
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < 0.5
    correct = rng.random((n, len(accuracy))) < np.asarray(accuracy)
    if copy is not None:  # judge copy[1] repeats judge copy[0]'s vote 90% of the time
        same = rng.random(n) < 0.9
        correct[same, copy[1]] = correct[same, copy[0]]
    side_a = np.where(correct, truth[:, None], ~truth[:, None])
    votes = np.where(side_a, 1, -1) * (rng.random(correct.shape) >= abstain)
    return votes, truth


def test_em_recovers_known_accuracies_without_labels():
    accuracy = [0.9, 0.7, 0.65, 0.6, 0.3]
    votes, truth = _votes(accuracy)
    fit = one_coin_em(votes)
    assert fit.converged
    np.testing.assert_allclose(fit.accuracy, accuracy, atol=0.03)
    assert ((fit.posterior > 0.5) == truth).mean() > 0.87
    # a judge that is consistently wrong is read inverted, not trusted
    assert fit.accuracy[-1] < 0.5


def test_em_beats_the_majority_with_one_accurate_judge_among_weak_ones():
    votes, truth = _votes([0.95, 0.6, 0.6, 0.6, 0.6])
    majority = votes.sum(axis=1)
    decided = majority != 0
    majority_acc = ((majority[decided] > 0) == truth[decided]).mean()
    fit = one_coin_em(votes)
    assert ((fit.posterior > 0.5) == truth).mean() > majority_acc + 0.05


def test_em_does_not_follow_two_weak_judges_that_copy_each_other():
    votes, _ = _votes([0.92, 0.6, 0.6, 0.6, 0.6], copy=(1, 2))
    fit = one_coin_em(votes)
    assert fit.blocks[1] == fit.blocks[2] and len(set(fit.blocks)) == 4
    assert fit.accuracy[0] > 0.85 and fit.accuracy[1] < 0.7
    moments, _, _ = moment_accuracy(votes)
    assert abs(moments[0] - 0.92) < 0.2


def test_em_shape_errors_and_empty_rows():
    with pytest.raises(ValueError, match="2-d"):
        one_coin_em(np.zeros(3))
    votes = np.array([[1, 1, -1], [0, 0, 0], [1, 1, 1], [-1, -1, -1]])
    assert one_coin_em(votes).posterior[1] == 0.5


def test_calibrated_weights_are_log_odds_and_invert_a_wrong_judge():
    weights = accuracy_weight(np.array([40, 20, 5]), np.array([42, 40, 42]))
    assert weights[0] > 2 and abs(weights[1]) < 0.1 and weights[2] < -1.5
    votes = np.array([[1, -1, -1], [0, 0, 0]])
    posterior = weighted_vote_posterior(votes, weights)
    # the accurate judge and the inverted wrong one agree on a; the chance judge does not matter
    assert posterior[0] > 0.95 and posterior[1] == 0.5


def _verdicts(rows):
    return pl.DataFrame(
        rows, schema=["prompt_id", "response_a", "response_b", "judge", "p_a", "p_first_ab", "p_first_ba"],
        orient="row",
    )


def test_a_flipped_judge_abstains():
    frame = _verdicts([
        ("p", "a", "b", "j1", 0.8, 0.8, 0.2),  # consistent for a
        ("p", "a", "b", "j2", 0.55, 0.9, 0.8),  # first slot wins both times: flipped
        ("p", "a", "b", "j3", 0.5, 0.5, 0.5),  # tie
        ("p", "a", "b", "j4", 0.3, None, None),  # single order: its balanced p_a
    ])
    assert frame.select(vote_expr()).to_series().to_list() == [1, 0, 0, -1]


def test_latent_jury_frames_and_calibrated_needs_weights():
    frame = _verdicts([
        ("p", "a", "b", "good", 0.9, 0.9, 0.1),
        ("p", "a", "b", "bad", 0.2, 0.2, 0.8),
        ("q", "a", "b", "good", 0.2, 0.2, 0.8),
        ("q", "a", "b", "bad", 0.9, 0.9, 0.1),
    ])
    with pytest.raises(ValueError, match="needs judge weights"):
        latent_jury(frame, PAIR_KEY, "calibrated")
    jury, table = latent_jury(frame, PAIR_KEY, "calibrated", {"good": 2.0, "bad": 0.5})
    assert jury["p_a"][0] > 0.8 and jury["p_a"][1] < 0.2
    assert set(jury.columns) >= {"n_judges", "n_for_a", "n_for_b", "n_abstain", "agreement"}
    assert table["weight"].to_list() == [0.5, 2.0]  # judges sorted: bad, good
    mean = jury_from_verdicts(frame, PAIR_KEY, "mean", None)
    assert mean["p_a"].to_list() == pytest.approx([0.55, 0.55])


def test_human_labels_override_the_jury_and_leave_the_judges_out():
    frame = _verdicts([("p", "a", "b", "j", 0.9, 0.9, 0.1), ("q", "a", "b", "j", 0.9, 0.9, 0.1)])
    jury = jury_from_verdicts(frame, PAIR_KEY, "mean", None)
    labels = pl.DataFrame({"prompt_id": ["p"], "response_a": ["a"], "response_b": ["b"], "winner": ["B"]})
    jury, verdicts = override_with_labels(jury, frame, labels)
    assert jury.sort("prompt_id")["p_a"].to_list() == [0.0, 0.9]
    assert verdicts["prompt_id"].to_list() == ["q"]


def test_aggregate_jury_unsupervised_per_criterion_and_human_method():
    votes, truth = _votes([0.9, 0.7, 0.6], n=300, abstain=0.0, seed=3)
    rows = []
    for criterion in ("overall", "style"):
        for i in range(votes.shape[0]):
            for j in range(votes.shape[1]):
                p = 0.8 if votes[i, j] > 0 else 0.2
                rows.append((f"p{i}", "a", "b", f"j{j}", "m", criterion, True, p, 1 - p, p))
    judgments = pl.DataFrame(rows, orient="row", schema=[
        "prompt_id", "response_a", "response_b", "judge", "judge_model", "criterion", "valid",
        "p_first_ab", "p_first_ba", "p_a"])
    labels = pl.DataFrame({"prompt_id": ["p0"], "response_a": ["a"], "response_b": ["b"], "winner": ["tie"]})
    jury = aggregate_jury(judgments, "unsupervised", human_labels=labels)
    assert jury.height == 600 and set(jury["criterion"]) == {"overall", "style"}
    human = jury.filter(pl.col("method") == "human")
    assert human.height == 2 and human["p_a"].to_list() == [0.5, 0.5]
    rest = jury.filter((pl.col("criterion") == "overall") & (pl.col("method") == "unsupervised")).sort("prompt_id")
    order = pl.Series([f"p{i}" for i in range(300)]).sort()
    truth_by_id = dict(zip([f"p{i}" for i in range(300)], truth))
    right = [(p > 0.5) == truth_by_id[k] for k, p in zip(rest["prompt_id"], rest["p_a"])]
    assert len(order) == 300 and np.mean(right) > 0.85
