"""Judge modes as objects: per-judge selection, the registry, and the both-orders primitive
(batching and failure rules) shared by annotate, QuRating and CritiQ. Scripted engine
double only (tests/support): these are pure-logic checks."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from prefcurate.tasks.annotate import (
    AnnotateParams,
    JudgeSpec,
    annotate,
    calibrate_judge,
    judge_mode,
    judge_pairs,
    judge_template_hashes,
    load_template,
    schedule_pairs,
)
from prefcurate.tasks.judge_modes import (
    JUDGE_MODES,
    JudgeMode,
    PairVerdicts,
    ask_both_orders,
    available_modes,
    mode_class,
    register_mode,
    score_options,
)

from prefcurate.inference.base import ChoiceScore, InferenceError
from prefcurate.inference.scoring import PoolCapabilityError
from prefcurate.templates import read_template_text
from tests.support.engines import ScriptedEngine
from tests.unit.test_annotate import QUALITY, _frames, _last_case, biased_pairwise


class Recorder(ScriptedEngine):
    def __init__(self, choice_fn=None, generate_fn=None, model="m"):
        super().__init__(choice_fn=choice_fn, generate_fn=generate_fn, model=model)
        self.choice_batches: list[list] = []

    def score_choices(self, requests):
        self.choice_batches.append(list(requests))
        return super().score_choices(requests)


def _verdict_after_evidence(prompt, options):
    """P("A") 0.9 after any evidence text: the rationale judge always favours the first."""
    return [0.9, 0.1] if "### Evidence" in prompt else biased_pairwise(prompt, options)


# --------------------------------------------------------------- the both-orders primitive

QUESTION = load_template("qurating_v1")


def _pairs(n: int) -> pl.DataFrame:
    return pl.DataFrame({"description": ["is better."] * n, "text_a": [f"a{k}" for k in range(n)],
                         "text_b": [f"b{k}" for k in range(n)]})


def test_both_orders_are_adjacent_in_batches_of_even_size_and_swapped():
    engine = Recorder(choice_fn=lambda prompt, options: [0.7, 0.3] if "... a" in prompt.split("[Option B]")[0]
                      else [0.4, 0.6])
    asked = ask_both_orders(engine, QUESTION, _pairs(5), "text_a", "text_b", ("A", "B"), batch_size=5)
    assert [len(b) for b in engine.choice_batches] == [4, 4, 2]  # 5 rounded down to even
    flat = [r.prompt for b in engine.choice_batches for r in b]
    for k in range(5):
        assert f"... a{k} ..." in flat[2 * k].split("[Option B]")[0]  # ab: text_a shown first
        assert f"... b{k} ..." in flat[2 * k + 1].split("[Option B]")[0]  # ba: text_b shown first
    assert asked.ab[:, 0] == pytest.approx([0.7] * 5) and asked.ba[:, 0] == pytest.approx([0.4] * 5)
    assert asked.errors() == [None] * 5
    one = ask_both_orders(Recorder(choice_fn=lambda p, o: [0.5, 0.5]), QUESTION, _pairs(3), "text_a",
                          "text_b", ("A", "B"), both_orders=False, batch_size=None)
    assert one.ba is None and one.ab.shape == (3, 2)


def test_the_primitives_failure_rules():
    def answers(requests):
        out = []
        for k, _ in enumerate(requests):
            out.append([ChoiceScore((0.2, 0.8)), ChoiceScore((), error="prompt_too_long"),
                        ChoiceScore((0.5,)), ChoiceScore((2.0, 2.0)), ChoiceScore((np.nan, 1.0)),
                        ChoiceScore((-0.1, 1.1))][k % 6])
        return out

    class Mixed(ScriptedEngine):
        def score_choices(self, requests):
            return answers(requests)

    probs, errors = score_options(Mixed(), ["p"] * 6, ("A", "B"), batch_size=None)
    # valid: kept; an error: NaN with the error; wrong length, NaN or negative: NaN with a
    # message; probabilities that do not sum to 1 are renormalised
    assert probs[0] == pytest.approx([0.2, 0.8]) and probs[3] == pytest.approx([0.5, 0.5])
    assert np.isnan(probs[[1, 2, 4, 5]]).all()
    assert errors[0] is None and errors[1] == "prompt_too_long" and errors[3] is None
    assert all(e.startswith("no valid probability") for e in (errors[2], errors[4], errors[5]))

    class Dead(ScriptedEngine):
        def score_choices(self, requests):
            return [ChoiceScore((), error="engine died") for _ in requests]

    with pytest.raises(InferenceError, match="every request of a batch of 4 .* engine died"):
        ask_both_orders(Dead(), QUESTION, _pairs(2), "text_a", "text_b", ("A", "B"))
    kept = ask_both_orders(Dead(), QUESTION, _pairs(2), "text_a", "text_b", ("A", "B"), all_failed="keep")
    assert kept.errors() == ["ab: engine died; ba: engine died"] * 2

    class Short(ScriptedEngine):
        def score_choices(self, requests):
            return [ChoiceScore((0.5, 0.5))]

    with pytest.raises(RuntimeError, match="answered 1 of 4"):
        ask_both_orders(Short(), QUESTION, _pairs(2), "text_a", "text_b", ("A", "B"))


# ------------------------------------------------------------------------ per-judge modes


def test_a_rationale_judge_and_a_default_judge_in_one_jury():
    prompts, responses = _frames()
    careful = JudgeSpec(name="careful", mode="rationale", mode_options={"k": 2, "max_tokens": 16})
    quick = JudgeSpec(name="quick")
    params = AnnotateParams(judges=[careful, quick], rubric_aspects=[])
    engines = {"careful": Recorder(choice_fn=_verdict_after_evidence, generate_fn=lambda r, i: f" evidence {i}\n"),
               "quick": Recorder(choice_fn=biased_pairwise)}
    result = annotate(responses, prompts, params, engines)
    by_judge = {judge: rows for (judge,), rows in result.judgments.group_by("judge")}
    assert set(by_judge["careful"]["mode"]) == {"rationale"} and set(by_judge["quick"]["mode"]) == {"probability"}
    assert set(by_judge["careful"]["template_hash"]) == {load_template("rationale_v2").hash}
    assert set(by_judge["quick"]["template_hash"]) == {load_template("pairwise_v3").hash}
    # the rationale judge sampled k=2 evidence texts per order and read the verdict after each
    generated = engines["careful"].calls.count("generate")
    assert generated == 2 * by_judge["careful"].height
    assert by_judge["careful"]["p_first_ab"].to_list() == pytest.approx([0.9] * by_judge["careful"].height)
    assert engines["quick"].calls == ["score_choices"] * (2 * by_judge["quick"].height)
    text = dict(responses.select("response_id", "text").iter_rows())
    for row in by_judge["quick"].iter_rows(named=True):
        qa, qb = QUALITY[text[row["response_a"]]], QUALITY[text[row["response_b"]]]
        assert (row["p_a"] > 0.5) == (qa > qb)
    assert set(by_judge["careful"]["judgment_id"]).isdisjoint(by_judge["quick"]["judgment_id"])
    # each judge's unit-key templates follow its own mode
    assert set(judge_template_hashes(careful, params)) == {"rationale"}
    assert set(judge_template_hashes(quick, params)) == {"pairwise"}


def test_the_older_stage_wide_rationale_k_is_the_same_judgment_as_a_rationale_mode():
    """Configs written before modes keep their judgment ids: ``rationale_k`` puts judges
    without a mode of their own in rationale mode with the stage's settings."""
    prompts, responses = _frames()
    pairs = schedule_pairs(responses, "all").head(2)
    legacy = AnnotateParams(judges=[JudgeSpec(name="j")], rubric_aspects=[], rationale_k=2)
    explicit_judge = JudgeSpec(name="j", mode="rationale", mode_options={"k": 2})
    explicit = AnnotateParams(judges=[explicit_judge], rubric_aspects=[])
    engine = Recorder(choice_fn=_verdict_after_evidence, generate_fn=lambda r, i: f" evidence {i}\n")
    old = judge_pairs(pairs, responses, prompts, legacy.judges[0], engine, legacy)
    new = judge_pairs(pairs, responses, prompts, explicit_judge, engine, explicit)
    assert old["judgment_id"].to_list() == new["judgment_id"].to_list()
    assert judge_mode(JudgeSpec(name="j", mode="probability"), legacy).name == "probability"  # its own wins


def test_an_edited_template_changes_the_keys_and_judgment_ids(tmp_path):
    prompts, responses = _frames()
    pairs = schedule_pairs(responses, "all").head(2)
    mine = tmp_path / "my_rationale.txt"
    mine.write_text(read_template_text("rationale_v2"))
    judge = JudgeSpec(name="j", mode="rationale", rationale_template=str(mine), mode_options={"k": 1})
    params = AnnotateParams(judges=[judge], rubric_aspects=["helpfulness"])
    engine = Recorder(choice_fn=_verdict_after_evidence, generate_fn=lambda r, i: " evidence\n")
    before_keys = judge_template_hashes(judge, params)
    before = judge_pairs(pairs, responses, prompts, judge, engine, params)
    assert judge_template_hashes(judge, params) == before_keys  # nothing changed: same keys
    mine.write_text(mine.read_text().replace("### Evidence", "### Reasons", 1))
    after_keys = judge_template_hashes(judge, params)
    assert after_keys["rationale"] != before_keys["rationale"] and after_keys["rubric"] == before_keys["rubric"]
    after = judge_pairs(pairs, responses, prompts, judge, engine, params)
    assert set(after["judgment_id"]).isdisjoint(before["judgment_id"])
    # a changed mode setting is a new judgment too
    more = judge.model_copy(update={"mode_options": {"k": 2}})
    assert set(judge_pairs(pairs, responses, prompts, more, engine, params)["judgment_id"]).isdisjoint(after["judgment_id"])


def test_unknown_modes_and_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown judge mode 'vibes'; known: .*probability.*rationale"):
        JudgeSpec(name="j", mode="vibes")
    with pytest.raises(ValueError, match="judge 'j', mode 'rationale': bad mode_options"):
        JudgeSpec(name="j", mode="rationale", mode_options={"samples": 3})
    with pytest.raises(ValueError, match="judge 'j': mode_options given without a mode"):
        JudgeSpec(name="j", mode_options={"k": 3})
    with pytest.raises(ValueError, match="is missing placeholder"):
        AnnotateParams(judges=[JudgeSpec(name="j", mode="rationale", rationale_template="pairwise_v3")])
    assert {"probability", "rationale"} <= set(available_modes())


# ---------------------------------------------------------- a position-free mode plugs in


class _LengthOptions(JudgeMode.Options):
    temperature: float = 1.0


class LengthMode(JudgeMode):
    """Test-only position-free mode: the longer response wins, sigmoid(len diff / t)."""

    name = "test_length"
    Options = _LengthOptions
    needs_both_orders = False
    engine_calls = ()
    rates_responses = False

    def template_names(self):
        return {"pairwise": (self.judge_spec.template, "pairwise")}

    def judge(self, jobs, engine, *, batch_size=64, progress=None):
        lengths = jobs.select(pl.col("text_a", "text_b").str.len_chars().cast(pl.Float64))
        gap = (lengths["text_a"] - lengths["text_b"]).to_numpy()
        p_a = 1.0 / (1.0 + np.exp(-gap / self.options.temperature))
        return PairVerdicts.position_free(p_a, [None] * jobs.height)


@pytest.fixture
def length_mode():
    register_mode(LengthMode)
    yield LengthMode
    JUDGE_MODES.pop(LengthMode.name, None)


def test_a_position_free_mode_joins_the_jury_without_a_second_order(length_mode):
    prompts, responses = _frames()
    free = JudgeSpec(name="free", mode="test_length")
    engine = Recorder(choice_fn=biased_pairwise)
    quick = JudgeSpec(name="quick")
    params = AnnotateParams(judges=[free, quick], rubric_aspects=["honesty"])

    def any_choice(prompt, options):
        return biased_pairwise(prompt, options) if options == ("A", "B") else [1, 1, 1, 1, 1]

    result = annotate(responses, prompts, params, {"free": engine, "quick": Recorder(choice_fn=any_choice)})
    mine = result.judgments.filter(pl.col("judge") == "free")
    assert engine.choice_batches == [] and mine.height == 4 and mine["valid"].all()
    # it rates nothing (its engine may not read option probabilities): no rubric in its keys
    assert set(result.ratings["judge"]) == {"quick"}
    assert "rubric" not in judge_template_hashes(free, params) and "rubric" in judge_template_hashes(quick, params)
    assert mine["p_first_ab"].null_count() == mine.height and mine["bpde"].null_count() == mine.height
    assert set(mine["mode"]) == {"test_length"}
    assert mode_class("test_length") is LengthMode
    gold = pl.DataFrame({"id": ["g1", "g2"], "prompt": ["q", "q"], "response_a": ["long answer", "no"],
                         "response_b": ["short", "a longer one"], "winner": ["A", "B"]})
    row = calibrate_judge(gold, free, engine, params).row(0, named=True)
    assert row["gold_pairs"] == 2 and row["accuracy"] == 1.0 and row["position_flip_rate"] is None


def test_a_mode_whose_engine_lacks_a_call_fails_before_any_work(length_mode):
    class NeedsRewards(LengthMode):
        name = "test_needs_rewards"
        engine_calls = ("score_rewards",)

    register_mode(NeedsRewards)
    try:
        prompts, responses = _frames()
        params = AnnotateParams(judges=[JudgeSpec(name="rm", mode="test_needs_rewards")], rubric_aspects=[])
        engine = Recorder(choice_fn=biased_pairwise)
        with pytest.raises(PoolCapabilityError, match="judge 'rm' .* needs engine call\\(s\\) score_rewards"):
            annotate(responses, prompts, params, {"rm": engine})
        assert engine.calls == []
    finally:
        JUDGE_MODES.pop(NeedsRewards.name, None)


def test_rendered_orders_of_the_probability_mode_are_swapped_copies():
    prompts, responses = _frames()
    engine = Recorder(choice_fn=biased_pairwise)
    judge_pairs(schedule_pairs(responses, "all"), responses, prompts, JudgeSpec(name="j"), engine,
                AnnotateParams(judges=[JudgeSpec(name="j")], rubric_aspects=[], criteria=["overall"]))
    flat = [r for b in engine.choice_batches for r in b]
    for ab, ba in zip(flat[0::2], flat[1::2]):
        assert (_last_case(ab.prompt)["Answer A"], _last_case(ab.prompt)["Answer B"]) == (
            _last_case(ba.prompt)["Answer B"], _last_case(ba.prompt)["Answer A"])
