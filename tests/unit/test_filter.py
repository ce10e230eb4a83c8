"""Consistency filters and pair construction (prefcurate.tasks.filter) on constructed cases."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from prefcurate.schemas import tables
from prefcurate.schemas.ids import content_id
from prefcurate.tasks import filter as F

# the row builders are shared with the benches (tests/support/rows.py)
from tests.support.rows import TEXTS, judgment, judgments, ratings, responses  # noqa: F401

NO_RATINGS = ratings({})


def run(jud, resp=None, rat=NO_RATINGS, **params):
    resp = resp if resp is not None else responses()
    return F.apply_filters(jud, rat, resp, F.FilterParams(**params))


def reasons_of(drops: pl.DataFrame, a: str, b: str) -> set[str]:
    a, b = min(a, b), max(a, b)
    return set(drops.filter((pl.col("response_a") == a) & (pl.col("response_b") == b))["reason"].to_list())


def check_accounting(jud: pl.DataFrame, pairs: pl.DataFrame, drops: pl.DataFrame) -> None:
    """Every candidate is either an emitted pair or has at least one drop row, never both."""
    candidates = set(jud.select(F.PAIR_KEY).unique().iter_rows())
    kept = {
        (p, min(c, r), max(c, r))
        for p, c, r in pairs.select("prompt_id", "chosen_id", "rejected_id").iter_rows()
    }
    dropped = set(drops.select(F.PAIR_KEY).unique().iter_rows())
    assert kept | dropped == candidates
    assert not kept & dropped


# --- schema -------------------------------------------------------------------------------
def test_outputs_have_the_table_columns():
    jud = judgments(judgment("A", "B", 0.9), judgment("B", "C", 0.2))
    pairs, drops, report = run(jud)
    assert pairs.columns == [f.name for f in tables.PAIRS if f.name not in F._PROVENANCE]
    assert drops.columns == [f.name for f in tables.FILTER_DROPS if f.name not in F._PROVENANCE]
    assert set(drops["reason"].to_list()) <= set(F.REASONS)
    jury = F.aggregate_jury(jud)
    assert jury.columns == [f.name for f in tables.JURY if f.name not in F._PROVENANCE]
    assert report["candidates"] == 2


def test_empty_input_gives_empty_tables():
    jud = judgments(judgment("A", "B", 0.9)).head(0)
    pairs, drops, report = run(jud)
    assert pairs.height == 0 and drops.height == 0
    assert report["candidates"] == 0 and report["kept_share"] == 0.0


# --- jury -----------------------------------------------------------------------------------
def test_aggregate_jury_methods_and_validity():
    jud = judgments(
        judgment("A", "B", 0.9, judge="j1"),
        judgment("A", "B", 0.7, judge="j2"),
        judgment("A", "B", 0.2, judge="j3"),
        judgment("A", "B", 0.0, judge="j4", valid=False),  # invalid: never counts
        judgment("A", "B", 0.6, judge="j1", criterion="style"),
    )
    mean = F.aggregate_jury(jud).filter(pl.col("criterion") == "overall").row(0, named=True)
    assert mean["p_a"] == pytest.approx((0.9 + 0.7 + 0.2) / 3)
    assert mean["n_judges"] == 3
    assert mean["agreement"] == pytest.approx(2 / 3)
    assert mean["method"] == "mean"
    majority = F.aggregate_jury(jud, method="majority").filter(pl.col("criterion") == "overall")
    assert majority["p_a"].item() == pytest.approx(2 / 3)
    weighted = F.aggregate_jury(jud, method="weighted", judge_weights={"j1": 2.0, "j3": 0.0})
    assert weighted.filter(pl.col("criterion") == "overall")["p_a"].item() == pytest.approx(
        (2 * 0.9 + 0.7) / 3
    )
    assert F.aggregate_jury(jud).filter(pl.col("criterion") == "style")["n_judges"].item() == 1
    with pytest.raises(ValueError):
        F.aggregate_jury(jud, method="median")


# --- Fleiss' kappa ------------------------------------------------------------------------
def test_fleiss_kappa_textbook_example():
    # Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories -> 0.210
    counts = np.array(
        [
            [0, 0, 0, 0, 14],
            [0, 2, 6, 4, 2],
            [0, 0, 3, 5, 6],
            [0, 3, 9, 2, 0],
            [2, 2, 8, 1, 1],
            [7, 7, 0, 0, 0],
            [3, 2, 6, 3, 0],
            [2, 5, 3, 2, 2],
            [6, 5, 2, 1, 0],
            [0, 2, 2, 3, 7],
        ]
    )
    assert F.fleiss_kappa(counts) == pytest.approx(0.20993, abs=1e-4)


def test_fleiss_kappa_edges():
    assert F.fleiss_kappa([[3, 0], [0, 3], [3, 0]]) == pytest.approx(1.0)
    assert math.isnan(F.fleiss_kappa([[3, 0], [3, 0]]))  # one category only: undefined
    with pytest.raises(ValueError):
        F.fleiss_kappa([[2, 0], [1, 2]])  # unequal raters


def test_verdict_kappa_uses_items_with_the_modal_judge_count():
    jud = judgments(
        *[judgment("A", "B", p, judge=j) for j, p in (("j1", 0.9), ("j2", 0.8), ("j3", 0.7))],
        *[judgment("C", "D", p, judge=j) for j, p in (("j1", 0.1), ("j2", 0.2), ("j3", 0.3))],
        *[judgment("A", "C", p, judge=j) for j, p in (("j1", 0.9), ("j2", 0.1))],  # 2 judges: left out
    )
    kappa = F.verdict_fleiss_kappa(F.judge_verdicts(jud, by_criterion=False))
    assert kappa == {"fleiss_kappa": pytest.approx(1.0), "items": 2, "raters": 3}
    _, _, report = run(jud)
    assert report["fleiss_kappa"] == pytest.approx(1.0)


# --- individual checks ----------------------------------------------------------------------
def test_three_cycle_is_dropped_as_intransitive():
    jud = judgments(judgment("A", "B", 0.9), judgment("B", "C", 0.9), judgment("C", "A", 0.9))
    pairs, drops, report = run(jud)
    assert pairs.height == 0
    for a, b in (("A", "B"), ("B", "C"), ("A", "C")):
        assert F.INTRANSITIVE in reasons_of(drops, a, b)
    assert report["drops_per_reason"][F.INTRANSITIVE] == 3
    check_accounting(jud, pairs, drops)


def test_unequal_cycle_drops_only_the_edge_against_bradley_terry():
    # A>B 0.95 and B>C 0.9 outweigh C>A 0.6: Bradley-Terry orders A > B > C
    jud = judgments(judgment("A", "B", 0.95), judgment("B", "C", 0.9), judgment("C", "A", 0.6))
    pairs, drops, _ = run(jud, strategy="all_above_margin", pairs_per_prompt=None)
    intransitive = drops.filter(pl.col("reason") == F.INTRANSITIVE)
    assert intransitive.select("response_a", "response_b").rows() == [("A", "C")]
    assert intransitive["value"].item() < 0  # BT margin of the jury's verdict (C over A)
    assert {(c, r) for c, r in pairs.select("chosen_id", "rejected_id").iter_rows()} == {
        ("A", "B"),
        ("B", "C"),
    }
    assert (pairs["margin"] > 0).all()


def test_transitive_prompt_has_no_intransitive_drop():
    jud = judgments(judgment("A", "B", 0.9), judgment("B", "C", 0.8), judgment("A", "C", 0.95))
    _, drops, _ = run(jud)
    assert F.INTRANSITIVE not in set(drops["reason"].to_list())


def test_thresholds_are_inclusive_despite_rounding():
    # 0.6 - 0.5 is 0.0999... in floats; a pair exactly at the margin passes
    jud = judgments(judgment("A", "B", 0.6))
    pairs, drops, _ = run(jud)
    assert drops.height == 0 and pairs.height == 1


def test_exact_tie_and_low_confidence():
    jud = judgments(judgment("A", "B", 0.5), judgment("A", "C", 0.56), judgment("A", "D", 0.8))
    pairs, drops, _ = run(jud, strategy="all_above_margin", pairs_per_prompt=None)
    # the lone judge at 0.5 took no side: it abstains too (the tie is the primary reason)
    assert reasons_of(drops, "A", "B") == {F.TIE, F.LOW_CONFIDENCE, F.JUDGE_ABSTAINED}
    assert reasons_of(drops, "A", "C") == {F.LOW_CONFIDENCE}
    low = drops.filter((pl.col("reason") == F.LOW_CONFIDENCE) & (pl.col("response_b") == "C")).row(
        0, named=True
    )
    assert low["value"] == pytest.approx(0.06) and low["threshold"] == pytest.approx(0.1)
    assert pairs.select("chosen_id", "rejected_id").rows() == [("A", "D")]
    # disabled, the low-confidence pair survives; the exact tie never does (no side to choose)
    pairs, drops, _ = run(
        jud, confidence={"enabled": False}, strategy="all_above_margin", pairs_per_prompt=None
    )
    assert reasons_of(drops, "A", "B") == {F.TIE, F.JUDGE_ABSTAINED}
    assert pairs.height == 2


def test_near_duplicates():
    texts = {
        "A": "The answer is 42.\n\nBecause   six times seven is forty-two.",
        "B": "the answer is 42. because six times seven is forty-two.",  # equal after normalising
        "C": "The answer is 42. Because six times seven is forty two!",  # small edits
        "D": "Nobody knows; the question itself was never written down anywhere.",
    }
    resp = responses(texts=texts)
    sims = F.pair_text_similarity(
        pl.DataFrame({"response_a": ["A", "A", "A"], "response_b": ["B", "C", "D"]}), resp, ngram=5
    )["similarity"].to_list()
    assert sims[0] == 1.0
    assert 0.8 < sims[1] < 1.0
    assert sims[2] < 0.2
    jud = judgments(judgment("A", "B", 0.9), judgment("A", "C", 0.9), judgment("A", "D", 0.9))
    _, drops, _ = run(jud, resp, near_duplicate={"threshold": 0.8})
    assert F.NEAR_DUPLICATE in reasons_of(drops, "A", "B")
    assert F.NEAR_DUPLICATE in reasons_of(drops, "A", "C")
    assert F.NEAR_DUPLICATE not in reasons_of(drops, "A", "D")


def test_short_texts_compare_whole():
    resp = responses(ids=("A", "B", "C"), texts={"A": "Yes", "B": "yes", "C": "No"})
    sims = F.pair_text_similarity(pl.DataFrame({"response_a": ["A", "A"], "response_b": ["B", "C"]}), resp)
    assert sims["similarity"].to_list() == [1.0, 0.0]


def test_position_flip_single_judge():
    # the judge says "A" in both orders: a-first 0.8 for a, b-first 0.8 for b
    jud = judgments(judgment("A", "B", 0.8, p_ba=0.8), judgment("A", "C", 0.9))
    _, drops, report = run(jud)
    flip = drops.filter(pl.col("reason") == F.POSITION_FLIP).row(0, named=True)
    assert (flip["response_a"], flip["response_b"], flip["judge"]) == ("A", "B", "j1")
    assert flip["value"] == pytest.approx(0.6)  # first-position pull: 0.8 + 0.8 - 1
    assert reasons_of(drops, "A", "C") <= {F.NOT_SELECTED}
    assert report["judges"]["j1"]["position_flip_rate"] == pytest.approx(0.5)
    assert report["drops_per_judge"]["j1"][F.POSITION_FLIP] == 1


def test_position_flip_share_across_the_jury():
    jud = judgments(
        judgment("A", "B", 0.8, p_ba=0.7, judge="j1"),  # flips
        judgment("A", "B", 0.9, judge="j2"),
        judgment("A", "B", 0.9, judge="j3"),
    )
    pairs, drops, _ = run(jud)  # default: a majority must flip
    assert F.POSITION_FLIP not in set(drops["reason"].to_list())
    assert pairs.height == 1
    _, drops, _ = run(jud, position_flip={"max_flip_share": 0.0})
    flips = drops.filter(pl.col("reason") == F.POSITION_FLIP)
    assert flips["judge"].to_list() == ["j1"]
    # a flip within the tolerance of 0.5 does not count
    _, drops, _ = run(jud, position_flip={"max_flip_share": 0.0, "tolerance": 0.25})
    assert F.POSITION_FLIP not in set(drops["reason"].to_list())


def test_jury_disagreement():
    split = judgments(judgment("A", "B", 0.9, judge="j1"), judgment("A", "B", 0.2, judge="j2"))
    _, drops, _ = run(split, confidence={"enabled": False})
    row = drops.filter(pl.col("reason") == F.JURY_DISAGREEMENT).row(0, named=True)
    assert row["value"] == pytest.approx(0.5) and row["judge"] is None
    assert row["detail"] == "1 for a, 1 for b, of 2 judges"
    two_to_one = judgments(
        *[judgment("A", "B", p, judge=j) for j, p in (("j1", 0.9), ("j2", 0.8), ("j3", 0.4))]
    )
    pairs, drops, _ = run(two_to_one)
    assert F.JURY_DISAGREEMENT not in set(drops["reason"].to_list()) and pairs.height == 1


def test_rating_vs_ranking():
    jud = judgments(judgment("A", "B", 0.9), judgment("A", "C", 0.9))
    rat = ratings({"A": 2.0, "B": 4.5, "C": 2.3})  # B rated far above A, C within tolerance
    pairs, drops, _ = run(jud, rat=rat, strategy="all_above_margin", pairs_per_prompt=None)
    row = drops.filter(pl.col("reason") == F.RATING_VS_RANKING).row(0, named=True)
    assert (row["response_a"], row["response_b"]) == ("A", "B")
    assert row["value"] == pytest.approx(-2.5) and row["threshold"] == pytest.approx(-0.5)
    kept = pairs.row(0, named=True)
    assert (kept["chosen_id"], kept["rejected_id"]) == ("A", "C")
    assert (kept["chosen_score"], kept["rejected_score"]) == (pytest.approx(2.0), pytest.approx(2.3))
    # without ratings the check cannot run and drops nothing
    _, drops, _ = run(jud, strategy="all_above_margin", pairs_per_prompt=None)
    assert drops.height == 0


def test_truncation_and_missing_response():
    jud = judgments(judgment("A", "B", 0.9), judgment("A", "C", 0.9), judgment("A", "E", 0.9))
    pairs, drops, _ = run(
        jud, responses(truncated=("B",)), strategy="all_above_margin", pairs_per_prompt=None
    )
    trunc = drops.filter(pl.col("reason") == F.TRUNCATED).row(0, named=True)
    assert (trunc["response_b"], trunc["detail"], trunc["value"]) == ("B", "response_b", 1.0)
    assert reasons_of(drops, "A", "E") == {F.MISSING_RESPONSE}
    assert pairs.select("chosen_id", "rejected_id").rows() == [("A", "C")]
    _, drops, _ = run(jud, responses(truncated=("B",)), truncation={"enabled": False})
    assert F.TRUNCATED not in set(drops["reason"].to_list())


def test_no_valid_judgment():
    jud = judgments(judgment("A", "B", 0.9, valid=False), judgment("A", "C", 0.9))
    pairs, drops, _ = run(jud)
    assert reasons_of(drops, "A", "B") == {F.NO_VALID_JUDGMENT}
    assert pairs.height == 1
    check_accounting(jud, pairs, drops)


def test_length_bias_guard_caps_the_long_chosen_share():
    rows, texts, ids, prompts = [], {}, [], []
    # four prompts; in three the chosen text is 3x longer; margins grow with the prompt number
    for k, (long_chosen, p) in enumerate([(True, 0.7), (True, 0.8), (True, 0.9), (False, 0.9)]):
        chosen, rejected = f"c{k}", f"r{k}"
        rows.append(judgment(chosen, rejected, p, prompt=f"p{k}"))
        texts[chosen] = ("long answer text " * 3 if long_chosen else "short one ") + str(k)
        texts[rejected] = "short one " + str(k) + "!"
        ids += [chosen, rejected]
        prompts += [f"p{k}", f"p{k}"]
    resp = pl.concat(
        [responses(ids=(ids[i], ids[i + 1]), prompt=prompts[i], texts=texts) for i in range(0, len(ids), 2)]
    )
    jud = judgments(*rows)
    pairs, _, _ = run(jud, resp)
    assert pairs.height == 4  # off by default
    pairs, drops, _ = run(jud, resp, length_bias={"enabled": True, "ratio": 1.5, "max_share": 0.5})
    # at most 1 long-chosen pair next to the 1 short one; the least confident two go
    assert sorted(pairs["chosen_id"].to_list()) == ["c2", "c3"]
    removed = drops.filter(pl.col("reason") == F.LENGTH_BIAS)
    assert sorted(removed["prompt_id"].to_list()) == ["p0", "p1"]
    assert (removed["value"] >= 1.5).all()
    check_accounting(jud, pairs, drops)


def test_self_preference_guard():
    resp = responses(ids=("A", "B"), model={"A": "google/gemma-3-1b-it", "B": "Qwen/Qwen2.5-0.5B"})
    favouring_own = judgments(judgment("A", "B", 0.9, model="google/gemma-2-9b"))
    pairs, drops, _ = run(favouring_own, resp)
    assert pairs.height == 1  # off by default
    pairs, drops, _ = run(favouring_own, resp, self_preference={"enabled": True})
    row = drops.filter(pl.col("reason") == F.SELF_PREFERENCE).row(0, named=True)
    assert row["judge"] == "j1" and row["value"] == pytest.approx(0.9)
    assert "gemma" in row["detail"] and pairs.height == 0
    # voting against its own family is no self-preference
    against_own = judgments(judgment("A", "B", 0.1, model="google/gemma-2-9b"))
    pairs, drops, _ = run(against_own, resp, self_preference={"enabled": True})
    assert pairs.height == 1 and drops.height == 0
    # families can be named explicitly
    custom = judgments(judgment("A", "B", 0.1, model="in-house-judge"))
    _, drops, _ = run(custom, resp, self_preference={"enabled": True, "families": {"in-house-judge": "qwen"}})
    assert set(drops["reason"].to_list()) == {F.SELF_PREFERENCE}


def test_a_pair_can_fail_several_checks():
    jud = judgments(judgment("A", "B", 0.55, judge="j1"), judgment("A", "B", 0.48, judge="j2"))
    _, drops, _ = run(jud, responses(truncated=("A",)))
    assert reasons_of(drops, "A", "B") == {F.LOW_CONFIDENCE, F.JURY_DISAGREEMENT, F.TRUNCATED}


# --- pair construction --------------------------------------------------------------------
def transitive_prompt() -> pl.DataFrame:
    """A > B > C > D with confidences growing with the quality gap."""
    order = ["A", "B", "C", "D"]
    rows = []
    for i, x in enumerate(order):
        for j in range(i + 1, len(order)):
            rows.append(judgment(x, order[j], 0.6 + 0.1 * (j - i)))
    return judgments(*rows)


def test_best_vs_worst():
    jud = transitive_prompt()
    pairs, drops, report = run(jud)
    row = pairs.row(0, named=True)
    assert (row["chosen_id"], row["rejected_id"], row["strategy"]) == ("A", "D", "best_vs_worst")
    assert row["p_chosen"] == pytest.approx(0.9)
    assert row["pair_id"] == content_id("p1", "A", "D")
    assert row["margin"] > 0 and row["agreement"] == 1.0
    assert report["passed_checks"] == 6 and report["pairs"] == 1
    assert set(drops["reason"].to_list()) == {F.NOT_SELECTED}
    check_accounting(jud, pairs, drops)
    pairs, _, _ = run(jud, pairs_per_prompt=2)
    assert pairs.height == 2 and pairs.sort("margin", descending=True)["rejected_id"][0] == "D"


def test_best_vs_random_is_seeded():
    jud = transitive_prompt()
    seen = set()
    for seed in range(8):
        pairs, drops, _ = run(jud, strategy="best_vs_random", seed=seed)
        assert pairs["chosen_id"].to_list() == ["A"]
        seen.add(pairs["rejected_id"].item())
        again, _, _ = run(jud, strategy="best_vs_random", seed=seed)
        assert again.equals(pairs)
        check_accounting(jud, pairs, drops)
    assert seen <= {"B", "C", "D"} and len(seen) >= 2
    pairs, _, _ = run(jud, strategy="best_vs_random", pairs_per_prompt=None)
    assert sorted(pairs["rejected_id"].to_list()) == ["B", "C", "D"]


def test_all_above_margin():
    jud = transitive_prompt()
    pairs, _, _ = run(jud, strategy="all_above_margin", pairs_per_prompt=None)
    assert pairs.height == 6
    cut = float(np.median(pairs["margin"].to_numpy()))
    pairs, drops, _ = run(jud, strategy="all_above_margin", pairs_per_prompt=None, margin=cut)
    assert (pairs["margin"] >= cut).all() and pairs.height >= 3
    below = drops.filter(pl.col("reason") == F.BELOW_MARGIN)
    assert below.height == 6 - pairs.height and (below["value"] < cut).all()
    check_accounting(jud, pairs, drops)


# --- accounting and reports ---------------------------------------------------------------
def test_every_candidate_is_kept_or_explained_on_random_data():
    rng = np.random.default_rng(7)
    rows, resp = [], []
    for prompt in range(30):
        ids = [f"p{prompt}-{k}" for k in range(4)]
        resp.append(
            responses(
                ids=tuple(ids),
                prompt=f"p{prompt}",
                texts={i: f"text {rng.integers(1000)} " * int(rng.integers(1, 5)) for i in ids},
                truncated=tuple(i for i in ids if rng.random() < 0.1),
                generator={i: ["g1", "g2"][int(rng.integers(2))] for i in ids},
            )
        )
        for i in range(4):
            for j in range(i + 1, 4):
                for judge in ("j1", "j2", "j3"):
                    rows.append(
                        judgment(
                            ids[i],
                            ids[j],
                            float(rng.uniform(0.05, 0.95)),
                            p_ba=float(rng.uniform(0.05, 0.95)),
                            judge=judge,
                            prompt=f"p{prompt}",
                            valid=bool(rng.random() > 0.05),
                        )
                    )
    jud = judgments(*rows)
    resp_frame = pl.concat(resp)
    rat = pl.concat([ratings({i: float(rng.uniform(1, 5))}, prompt="p") for i in resp_frame["response_id"]])
    for strategy in ("best_vs_worst", "best_vs_random", "all_above_margin"):
        pairs, drops, report = F.apply_filters(
            jud, rat, resp_frame, F.FilterParams(strategy=strategy, length_bias={"enabled": True})
        )
        check_accounting(jud, pairs, drops)
        assert report["candidates"] == 30 * 6
        assert report["pairs"] == pairs.height
        assert 0.0 <= report["kept_share"] <= 1.0
        assert pairs["pair_id"].n_unique() == pairs.height
        # failed_per_reason: distinct pairs per reason; drops_per_reason: each dropped pair
        # once, under its primary reason, so they add up with the pairs to the candidates
        for reason, n in report["failed_per_reason"].items():
            assert n == drops.filter(pl.col("reason") == reason).select(F.PAIR_KEY).unique().height
        dropped = drops.select(F.PAIR_KEY).unique().height
        assert sum(report["drops_per_reason"].values()) == dropped
        assert dropped + pairs.height == report["candidates"]

    frame = F.filter_report_frame(drops, pairs, resp_frame)
    assert frame.columns == ["reason", "judge", "generator", "n_pairs", "n_pairs_any"]
    kept = frame.filter(pl.col("reason") == "kept")
    # each pair counts once per distinct generator of its two responses
    generators = resp_frame.select("response_id", "generator")
    expected = (
        pairs.join(generators.rename({"response_id": "chosen_id", "generator": "gc"}), on="chosen_id")
        .join(generators.rename({"response_id": "rejected_id", "generator": "gr"}), on="rejected_id")
        .select((pl.col("gc") != pl.col("gr")).cast(pl.Int64) + 1)
        .sum()
        .item()
    )
    assert kept["n_pairs"].sum() == expected


def test_report_counts_per_judge_and_generator():
    resp = responses(generator={"A": "g1", "B": "g2", "C": "g2", "D": "g2"})
    # j1 flips on (A, B) yet leans to A overall (p_a 0.625); (C, D) is an exact tie
    jud = judgments(judgment("A", "B", 0.95, p_ba=0.7, judge="j1"), judgment("C", "D", 0.5))
    pairs, drops, report = run(jud, resp)
    # primary reasons: the flip (A, B) and the tie (C, D); j1's abstentions are secondary
    assert report["drops_per_judge"] == {"j1": {F.POSITION_FLIP: 1}}
    assert report["failed_per_reason"][F.JUDGE_ABSTAINED] == 2
    assert report["drops_per_generator"]["g1"] == {F.POSITION_FLIP: 1}
    assert report["drops_per_generator"]["g2"] == {F.POSITION_FLIP: 1, F.TIE: 1}
    frame = F.filter_report_frame(drops, pairs, resp)
    flips = frame.filter(pl.col("reason") == F.POSITION_FLIP)
    assert sorted(flips.select("judge", "generator", "n_pairs").rows()) == [("j1", "g1", 1), ("j1", "g2", 1)]
    ties = frame.filter(pl.col("reason") == F.TIE)
    assert ties.select("judge", "generator", "n_pairs").rows() == [(None, "g2", 1)]
    abstained = frame.filter(pl.col("reason") == F.JUDGE_ABSTAINED)
    assert abstained.select("generator", "n_pairs", "n_pairs_any").sort("generator").rows() == [
        ("g1", 0, 1),
        ("g2", 0, 2),
    ]


# --- baselines ----------------------------------------------------------------------------
def test_argmax_baseline_pairs():
    resp = responses()
    rat = pl.concat(
        [ratings({"A": 3.0, "B": 4.5, "C": 1.5, "D": 3.0}), ratings({"A": 4.0, "B": 4.5}, judge="j2")]
    )
    pairs = F.argmax_baseline_pairs(rat, resp)
    row = pairs.row(0, named=True)
    assert (row["chosen_id"], row["rejected_id"]) == ("B", "C")
    assert row["margin"] == pytest.approx(3.0) and math.isnan(row["p_chosen"])
    assert row["strategy"] == "argmax_baseline"


def test_single_order_pairs_trust_the_first_order_only():
    # a-first says A (0.7), b-first also says "first" (0.7): the single-order judge keeps A
    jud = judgments(
        judgment("A", "B", 0.7, p_ba=0.7), judgment("A", "C", 0.4, p_ba=0.4), judgment("B", "C", 0.6)
    )
    every = F.single_order_pairs(jud, per_prompt="all")
    assert set(every.select("chosen_id", "rejected_id").iter_rows()) == {("A", "B"), ("C", "A"), ("B", "C")}
    best = F.single_order_pairs(jud)
    assert best.height == 1  # a cycle: Copeland ties, the more confident verdict wins
    assert best.select("chosen_id", "rejected_id").row(0) == ("A", "B")
