"""QuRating-style scoring: prompts, comparison sampling, both-order math, BT ratings."""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest
from prefcurate.schemas.tables import QUALITY
from prefcurate.tasks.qurating import (
    QURATING_CRITERIA,
    QuRatingCriterion,
    QuRatingParams,
    build_judge_prompt,
    fit_ratings,
    judge_all_criteria,
    judge_criterion_pairs,
    make_excerpts,
    sample_comparisons,
    sample_items,
    score_items,
)
from pydantic import ValidationError

from prefcurate.inference.base import ChoiceScore
from tests.support.engines import ScriptedEngine

EDU = next(c for c in QURATING_CRITERIA if c.name == "educational_value")

_OPTION_A = re.compile(r"\[Option A\]\n\.\.\. (.*?) \.\.\.\n", re.DOTALL)
_OPTION_B = re.compile(r"\[Option B\]\n\.\.\. (.*?) \.\.\.\n", re.DOTALL)


def shown_texts(prompt: str) -> tuple[str, str]:
    return _OPTION_A.search(prompt).group(1), _OPTION_B.search(prompt).group(1)


class BatchCountingEngine(ScriptedEngine):
    """Counts score_choices calls (batches), not requests."""

    def __init__(self, choice_fn):
        super().__init__(choice_fn=choice_fn)
        self.batches: list[int] = []

    def score_choices(self, requests):
        self.batches.append(len(requests))
        return super().score_choices(requests)


def quality_judge(quality: dict[str, float]):
    """A judge whose P("B") is sigmoid(q(B) - q(A)): Bradley-Terry with known strengths."""

    def choice_fn(prompt, options):
        a, b = shown_texts(prompt)
        p_b = 1.0 / (1.0 + np.exp(-(quality[b] - quality[a])))
        return (1.0 - p_b, p_b)

    return choice_fn


# ------------------------------------------------------------------ prompt


def test_judge_prompt_uses_qurating_wording_and_ends_where_the_verdict_is_due():
    prompt = build_judge_prompt(EDU, "first text", "second text")
    assert prompt.startswith(
        "Compare two text excerpts and choose the text which has more educational value, "
        "e.g., it includes clear explanations, step-by-step reasoning, or questions and answers."
    )
    assert "3. The order in which the texts are presented" in prompt
    assert "[Option A]\n... first text ...\n" in prompt
    assert "[Option B]\n... second text ...\n" in prompt
    assert prompt.index("[Option A]") < prompt.index("[Option B]")
    assert "Respond only with a single word." in prompt
    assert prompt.endswith("Answer:")


def test_default_criteria_are_qurating_four():
    assert [c.name for c in QURATING_CRITERIA] == [
        "writing_style",
        "required_expertise",
        "facts_and_trivia",
        "educational_value",
    ]
    style = build_judge_prompt(QURATING_CRITERIA[0], "x", "y")
    assert "choose the text which has a more polished and beautiful writing style." in style


def test_params_add_user_criteria_and_reject_duplicates_and_unknown_fields():
    params = QuRatingParams(extra_criteria=[{"name": "humour", "description": "is funnier."}])
    assert [c.name for c in params.all_criteria][-1] == "humour"
    assert len(params.all_criteria) == 5
    with pytest.raises(ValidationError):
        QuRatingParams(extra_criteria=[{"name": "writing_style", "description": "dup"}])
    with pytest.raises(ValidationError):
        QuRatingParams(sample_sizes=3)
    with pytest.raises(ValidationError):
        QuRatingParams(item_kind="document")
    assert QuRatingParams().confidence == 0.25
    with pytest.raises(ValidationError):
        QuRatingCriterion(name="  ", description="is better.")
    assert QuRatingCriterion(name=" humour ", description=" is funnier. ").name == "humour"


# ------------------------------------------------------------------ sampling


@pytest.mark.parametrize("n_items,pairs_per_item", [(2, 4), (5, 2), (50, 4), (101, 5)])
def test_sample_comparisons_is_connected_without_self_or_duplicate_pairs(n_items, pairs_per_item):
    i, j = sample_comparisons(n_items, pairs_per_item, seed=3)
    assert len(i) == len(j) > 0
    assert np.all(i != j)
    keys = np.minimum(i, j) * n_items + np.maximum(i, j)
    assert len(np.unique(keys)) == len(keys)
    degree = np.bincount(np.concatenate([i, j]), minlength=n_items)
    assert degree.min() >= 1
    if n_items > 10:
        assert abs(degree.mean() - 2 * -(-pairs_per_item // 2)) < 0.5
    # connected: a union-find over the edges ends with one root
    parent = list(range(n_items))

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(i.tolist(), j.tolist()):
        parent[root(a)] = root(b)
    assert len({root(x) for x in range(n_items)}) == 1
    again = sample_comparisons(n_items, pairs_per_item, seed=3)
    assert np.array_equal(i, again[0]) and np.array_equal(j, again[1])


def test_sample_comparisons_both_orientations_occur():
    i, j = sample_comparisons(200, 4, seed=0)
    assert 0.35 < np.mean(i < j) < 0.65


def test_sample_items_and_excerpts():
    assert np.array_equal(sample_items(5, 10, 0), np.arange(5))
    picked = sample_items(100, 10, 0)
    assert len(picked) == len(np.unique(picked)) == 10
    text = " ".join(f"word{k}" for k in range(500))
    short, long = make_excerpts(["short text", text], 200, seed=1)
    assert short == "short text"
    assert len(long) <= 200 and long in text
    assert long.split()[0].startswith("word") and long == long.strip()
    # same text, same excerpt, wherever it sits
    assert make_excerpts(["x", text], 200, seed=1)[1] == long
    assert make_excerpts([text], 200, seed=2)[0] != long


# ------------------------------------------------------------------ judging


def test_both_orders_are_averaged_in_one_batch():
    texts = ["alpha", "beta", "gamma"]
    # P("B") for each (shown first, shown second); position bias deliberately large
    p_b = {
        ("alpha", "beta"): 0.9,
        ("beta", "alpha"): 0.6,
        ("beta", "gamma"): 0.2,
        ("gamma", "beta"): 0.7,
    }
    engine = BatchCountingEngine(lambda prompt, options: (1 - p_b[shown_texts(prompt)], p_b[shown_texts(prompt)]))
    frame = judge_criterion_pairs(engine, texts, [0, 1], [1, 2], EDU)
    assert engine.batches == [4]
    assert frame.columns == ["criterion", "i", "j", "p_ab", "p_ba", "p_j_beats_i", "valid"]
    row = frame.row(0, named=True)
    assert (row["i"], row["j"]) == (0, 1)
    assert row["p_ab"] == pytest.approx(0.9)  # beta (j) shown second, chosen
    assert row["p_ba"] == pytest.approx(0.6)  # alpha (i) shown second, chosen
    assert row["p_j_beats_i"] == pytest.approx((0.9 + 1 - 0.6) / 2)
    row = frame.row(1, named=True)
    assert row["p_j_beats_i"] == pytest.approx((0.2 + 1 - 0.7) / 2)
    assert frame["valid"].to_list() == [True, True]


def test_a_failed_order_invalidates_the_pair():
    class OneFails(ScriptedEngine):
        def score_choices(self, requests):
            out = super().score_choices(requests)
            # the second pair (b, c) in forward order, wherever it sits in the batch
            return [ChoiceScore((), error="boom") if shown_texts(r.prompt) == ("b", "c") else s
                    for r, s in zip(requests, out)]

    engine = OneFails(choice_fn=lambda prompt, options: (0.3, 0.7))
    frame = judge_criterion_pairs(engine, ["a", "b", "c"], [0, 1], [1, 2], EDU)
    assert frame["valid"].to_list() == [True, False]
    assert frame["p_j_beats_i"][1] is None and frame["p_ab"][1] is None
    assert frame["p_ba"][1] == pytest.approx(0.7)


def test_all_criteria_go_in_one_batch_with_their_own_prompts():
    seen = []

    def choice_fn(prompt, options):
        seen.append(prompt.split("\n", 1)[0])
        return (0.5, 0.5)

    engine = BatchCountingEngine(choice_fn)
    frame = judge_all_criteria(engine, ["a", "b", "c"], [0, 1], [1, 2], QURATING_CRITERIA)
    assert engine.batches == [16]
    assert frame.height == 8
    assert frame["criterion"].unique(maintain_order=True).to_list() == [c.name for c in QURATING_CRITERIA]
    assert len(set(seen)) == 4


# ------------------------------------------------------------------ ratings


def test_fit_ratings_recovers_the_judges_order_as_quality_rows():
    names = [f"text{k}" for k in range(12)]
    quality = {name: 0.6 * k for k, name in enumerate(names)}
    engine = ScriptedEngine(choice_fn=quality_judge(quality))
    i, j = sample_comparisons(len(names), 6, seed=0)
    judgments = judge_criterion_pairs(engine, names, i, j, EDU)
    ids = [f"id{k}" for k in range(12)]
    rows = fit_ratings(judgments, ids, "response", confidence=0.0)
    assert rows.columns == [f.name for f in QUALITY if f.name not in ("run_id", "stage", "code_version", "created_at")]
    assert rows["method"].unique().to_list() == ["qurating_bt"]
    assert rows["item_kind"].unique().to_list() == ["response"]
    assert rows.height == 12
    by_id = dict(zip(rows["item_id"], rows["score"]))
    scores = np.array([by_id[x] for x in ids])
    assert np.all(np.diff(scores) > 0)  # strictly increasing with the planted quality
    assert rows["z_score"].mean() == pytest.approx(0.0, abs=1e-9)
    assert rows["z_score"].std(ddof=0) == pytest.approx(1.0)
    # soft targets carry the strength gaps: with a weak prior the planted 0.6 per step returns
    weak = fit_ratings(judgments, ids, "response", confidence=0.0, l2=1e-5)
    by_id = dict(zip(weak["item_id"], weak["score"]))
    assert np.diff([by_id[x] for x in ids]) == pytest.approx(np.full(11, 0.6), rel=0.05)


def test_confidence_threshold_drops_close_calls_and_items_left_without_a_verdict():
    judgments = pl.DataFrame(
        {
            "criterion": ["c"] * 3,
            "i": [0, 1, 2],
            "j": [1, 2, 3],
            "p_ab": [0.9, 0.9, 0.6],
            "p_ba": [0.1, 0.1, 0.4],
            "p_j_beats_i": [0.9, 0.9, 0.6],  # the last is not confident (|0.6 - 0.5| < 0.25)
            "valid": [True, True, True],
        }
    )
    rows = fit_ratings(judgments, ["a", "b", "c", "d"], "prompt", confidence=0.25)
    assert sorted(rows["item_id"].to_list()) == ["a", "b", "c"]
    by_id = dict(zip(rows["item_id"], rows["score"]))
    assert by_id["a"] < by_id["b"] < by_id["c"]
    kept_all = fit_ratings(judgments, ["a", "b", "c", "d"], "prompt", confidence=0.0)
    assert kept_all.height == 4


def test_invalid_judgments_never_enter_the_fit():
    judgments = pl.DataFrame(
        {
            "criterion": ["c", "c"],
            "i": [0, 1],
            "j": [1, 2],
            "p_ab": [0.9, None],
            "p_ba": [0.1, 0.1],
            "p_j_beats_i": [0.9, None],
            "valid": [True, False],
        }
    )
    rows = fit_ratings(judgments, ["a", "b", "c"], "pair")
    assert sorted(rows["item_id"].to_list()) == ["a", "b"]


def test_score_items_end_to_end_scores_every_item_with_the_scorer():
    rng = np.random.default_rng(0)
    n = 60
    names = [f"doc{k}" for k in range(n)]
    direction = rng.normal(size=16)
    embeddings = rng.normal(size=(n, 16)).astype(np.float32)
    latent = embeddings @ direction
    quality = {name: 1.5 * float(q) for name, q in zip(names, latent / latent.std())}
    engine = BatchCountingEngine(quality_judge(quality))
    params = QuRatingParams(
        criteria=[EDU], sample_size=40, pairs_per_item=6, item_kind="prompt", seed=1,
        scorer={"epochs": 300, "holdout_fraction": 0.2},
    )
    result = score_items(engine, [f"id{k}" for k in range(n)], names, params, embeddings=embeddings)
    assert len(engine.batches) == 1
    assert len(result.sample) == 40
    bt = result.quality.filter(pl.col("method") == "qurating_bt")
    scored = result.quality.filter(pl.col("method") == "scorer")
    assert 0 < bt.height <= 40
    assert scored.height == n
    assert set(scored["item_kind"]) == {"prompt"}
    # the scorer generalises to the 20 unjudged items: ranks agree with the latent quality
    by_id = dict(zip(scored["item_id"], scored["score"]))
    unjudged = np.setdiff1d(np.arange(n), result.sample)
    s = np.array([by_id[f"id{k}"] for k in unjudged])
    q = latent[unjudged]
    upper = np.triu_indices(len(unjudged), k=1)
    agree = np.mean(np.sign(s[:, None] - s[None, :])[upper] == np.sign(q[:, None] - q[None, :])[upper])
    assert agree > 0.8
    report = result.scorer_reports["educational_value"]
    assert report["n_heldout_pairs"] > 0 and report["heldout_accuracy"] > 0.75
    assert result.summary()["valid_share"] == 1.0


def test_item_texts_per_kind():
    from prefcurate.tasks.qurating import item_texts

    prompts = pl.DataFrame({"prompt_id": ["p1", "p2"], "prompt": ["Q1?", "Q2?"]})
    responses = pl.DataFrame(
        {"response_id": ["r1", "r2", "r3"], "prompt_id": ["p1", "p1", "p2"], "text": ["ans1", "ans2", None]}
    )
    pairs = pl.DataFrame({"pair_id": ["x"], "prompt_id": ["p1"], "chosen_id": ["r2"], "rejected_id": ["r1"]})
    assert item_texts("prompt", prompts).rows() == [("p1", "Q1?"), ("p2", "Q2?")]
    assert item_texts("response", prompts, responses).sort("item_id").rows() == [
        ("r1", "Q1?\n\nans1"),
        ("r2", "Q1?\n\nans2"),
    ]
    assert item_texts("pair", prompts, responses, pairs).rows() == [("x", "Q1?\n\nans2")]
    with pytest.raises(ValueError):
        item_texts("pair", prompts, responses)


def test_a_dead_engine_raises_instead_of_returning_an_all_invalid_frame():
    from prefcurate.inference.base import InferenceError

    class Dead(ScriptedEngine):
        def score_choices(self, requests):
            return [ChoiceScore((), error="engine died") for _ in requests]

    with pytest.raises(InferenceError, match="engine died"):
        judge_criterion_pairs(Dead(), ["a", "b"], [0], [1], EDU)
