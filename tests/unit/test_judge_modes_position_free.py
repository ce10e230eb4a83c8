"""Reward-model and density-ratio judge modes: the verdict math, de-duplication, failures and
the checks that refuse a pool before any work (scripted scoring double; the real engines are
in tests/integration/test_position_free_vllm.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from prefcurate.tasks.annotate import JudgeSpec, load_gold_pairs
from prefcurate.tasks.judge_modes import mode_class
from prefcurate.tasks.judge_modes_position_free import (
    DensityRatioMode,
    DensityRatioOptions,
    RewardModelMode,
    RewardModelOptions,
    fit_temperature,
    verdicts_from_scores,
)

from prefcurate.inference.models import is_prepared
from prefcurate.inference.scoring import PoolCapabilityError, folder_runner
from tests.support.scoring_engines import ScriptedScoringEngine


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def jobs_frame(rows):
    return pl.DataFrame(
        [{"job": i, "prompt": p, "text_a": a, "text_b": b, "criterion_description": c} for i, (p, a, b, c) in enumerate(rows)]
    ).with_columns(pl.col("job").cast(pl.UInt32))


JOBS = jobs_frame([
    ("p1", "short", "a longer answer", "crit one"),
    ("p1", "short", "mid answer", "crit one"),
    ("p1", "short", "a longer answer", "crit two"),  # same texts, another criterion
    ("p2", "short", "x", "crit one"),  # same text, another prompt: scored again
])  # fmt: skip


def reward_mode(**options):
    return RewardModelMode(JudgeSpec(name="rm-judge", pool="rewards"), RewardModelOptions(**options))


def density_mode(**options):
    return DensityRatioMode(JudgeSpec(name="cdr-judge", pool="judges"), DensityRatioOptions(**options))


def test_modes_are_registered_and_position_free():
    assert mode_class("reward_model") is RewardModelMode and mode_class("density_ratio") is DensityRatioMode
    assert not RewardModelMode.needs_both_orders and not DensityRatioMode.needs_both_orders


def test_fit_temperature_recovers_a_known_temperature_and_refuses_inverted_scores():
    rng = np.random.default_rng(1)
    d = rng.normal(0.0, 3.0, size=20_000)
    a_wins = rng.random(d.size) < sigmoid(d / 1.5)
    assert fit_temperature(d, a_wins) == pytest.approx(1.5, rel=0.05)
    assert math.isinf(fit_temperature(-d, a_wins))  # scores against the labels: no trust
    assert math.isinf(fit_temperature(np.zeros(5), np.ones(5, bool)))
    assert math.isinf(fit_temperature(np.array([np.nan]), np.array([True])))
    # perfectly separated labels still give a finite temperature (the ridge)
    assert 0 < fit_temperature(np.array([1.0, 2.0, -1.0]), np.array([True, True, False])) < math.inf
    assert verdicts_from_scores(np.array([1.0, np.nan]), np.array([0.0, 0.0]), math.inf).tolist()[0] == 0.5


def test_reward_mode_scores_each_response_once_and_is_symmetric():
    engine = ScriptedScoringEngine(reward_fn=lambda prompt, response: len(response))
    mode = reward_mode(temperature=2.0)
    verdicts = mode.judge(JOBS, engine, batch_size=2)
    expected = sigmoid((np.array([5, 5, 5, 5]) - np.array([15, 10, 15, 1])) / 2.0)
    np.testing.assert_allclose(verdicts.p_a, expected)
    assert verdicts.errors == [None] * 4
    assert np.isnan(verdicts.p_first_ab).all() and np.isnan(verdicts.bpde).all()
    # distinct (prompt, text): p1 {short, a longer answer, mid answer}, p2 {short, x}
    assert engine.requests["score_rewards"] == 5
    swapped = JOBS.with_columns(pl.col("text_b").alias("text_a"), pl.col("text_a").alias("text_b"))
    np.testing.assert_allclose(mode.judge(swapped, engine).p_a, 1.0 - verdicts.p_a)


def test_a_failed_reward_invalidates_only_its_pairs_and_names_the_side():
    def reward(prompt, response):
        if response == "mid answer":
            raise RuntimeError("boom")
        return len(response)

    verdicts = reward_mode(temperature=1.0).judge(JOBS, ScriptedScoringEngine(reward_fn=reward))
    assert np.isnan(verdicts.p_a[1]) and verdicts.errors[1] == "b: scripted: boom"
    assert np.isfinite(verdicts.p_a[[0, 2, 3]]).all()


def test_temperature_is_fitted_on_the_gold_pairs_and_an_uninformative_judge_abstains():
    gold = load_gold_pairs()
    winners = set(gold.filter(pl.col("winner") == "A")["response_a"]) | set(gold.filter(pl.col("winner") == "B")["response_b"])
    informative = ScriptedScoringEngine(reward_fn=lambda p, r: 1.0 if r in winners else 0.0, model="good")
    mode = reward_mode()
    t = mode.temperature(informative)
    assert 0 < t < math.inf
    assert mode.judge(JOBS.head(1), informative).p_a[0] == pytest.approx(0.5)  # both score 0
    inverted = ScriptedScoringEngine(reward_fn=lambda p, r: 0.0 if r in winners else 1.0, model="inverted")
    assert math.isinf(mode.temperature(inverted))
    assert reward_mode().judge(JOBS, inverted).p_a.tolist() == [0.5] * 4
    # the gold set enters the judgment ids when t is fitted, not when it is given
    assert "gold" in reward_mode().identity() and "gold" not in reward_mode(temperature=1.0).identity()


def test_density_ratio_reads_the_expert_over_the_plain_context_per_criterion():
    seen = []

    def logprob(context, continuation):
        seen.append((context, continuation))
        tokens = len(continuation.split())
        return (-1.0 if context.startswith("The answers below") else -3.0) * tokens, tokens

    engine = ScriptedScoringEngine(logprob_fn=logprob)
    verdicts = density_mode(temperature=1.0).judge(JOBS, engine)
    # ratio = 2 per token: short 2, "a longer answer" 6, "mid answer" 4, "x" 2
    np.testing.assert_allclose(verdicts.p_a, sigmoid(np.array([2 - 6, 2 - 4, 2 - 6, 2 - 2])))
    # distinct (prompt, text, criterion) = 6, two configurations each
    assert engine.requests["continuation_logprobs"] == 12
    strong = [c for c, _ in seen if c.startswith("The answers below")]
    assert any("crit two" in c for c in strong) and all(c.endswith(("Question: p1\nAnswer:", "Question: p2\nAnswer:")) for c, _ in seen)
    assert all(y.startswith(" ") for _, y in seen)
    normalised = density_mode(temperature=1.0, length_normalise=True).judge(JOBS, engine)
    np.testing.assert_allclose(normalised.p_a, 0.5)  # the same 2 nats per token everywhere


def test_a_mode_refuses_an_engine_without_its_call_or_on_the_wrong_runner():
    with pytest.raises(ValueError, match="judge 'rm-judge'.*score_rewards"):
        reward_mode().check_engine(SimpleNamespace(model="gen"), "rm-judge")
    generative = ScriptedScoringEngine(reward_fn=len)
    generative.runner = "generate"
    with pytest.raises(PoolCapabilityError, match="judge 'rm-judge'.*pool 'scripted'.*'generate' runner"):
        reward_mode().check_engine(generative, "rm-judge")
    pooling = ScriptedScoringEngine(logprob_fn=lambda c, y: (0.0, 1))
    pooling.runner = "pooling"
    with pytest.raises(PoolCapabilityError, match="judge 'cdr-judge'.*generative"):
        density_mode().check_engine(pooling, "cdr-judge")


@pytest.mark.skipif(not is_prepared(), reason="embedded model not prepared (prefcurate models prepare)")
def test_check_pool_refuses_at_plan_time_from_the_model_folder():
    from prefcurate.inference.pools import EmbeddedPoolConfig, ServersPoolConfig
    from prefcurate.inference.reward_models import prepare_seeded_reward_model

    reward_folder = str(prepare_seeded_reward_model())
    assert folder_runner(reward_folder) == "pooling"
    generative = EmbeddedPoolConfig()
    with pytest.raises(PoolCapabilityError, match="judge 'rm'.*pool 'judges'.*'generate' runner"):
        reward_mode().check_pool("judges", generative, "rm")
    reward_mode().check_pool("rewards", EmbeddedPoolConfig(model=reward_folder), "rm")
    with pytest.raises(PoolCapabilityError, match="judge 'cdr'.*pool 'rewards'.*'pooling' runner"):
        density_mode().check_pool("rewards", ServersPoolConfig(model=reward_folder, urls=["http://x:1"]), "cdr")
    density_mode().check_pool("judges", generative, "cdr")
    # a server pool whose model is not on this host: left to the engine check (asks the servers)
    reward_mode().check_pool("remote", ServersPoolConfig(model="/srv/models/rm", urls=["http://x:1"]), "rm")
    with pytest.raises(PoolCapabilityError, match="kind 'openai'"):
        reward_mode().check_pool("hosted", SimpleNamespace(kind="openai", model="gpt"), "rm")


def test_annotate_stores_position_free_judgments_and_calibrates_them():
    from prefcurate.tasks.annotate import AnnotateParams, calibrate_judge, judge_pairs

    prompts = pl.DataFrame({"prompt_id": ["p1"], "prompt": ["Name a primary color."]})
    responses = pl.DataFrame({"response_id": ["r1", "r2", "r3"], "prompt_id": ["p1"] * 3,
                              "text": ["Red.", "Brown.", "Blue, a primary color."]})
    pairs = pl.DataFrame({"prompt_id": ["p1"] * 3, "response_a": ["r1", "r1", "r2"], "response_b": ["r2", "r3", "r3"]})
    judge = JudgeSpec(name="rm", pool="rewards", mode="reward_model", mode_options={"temperature": 1.0})
    params = AnnotateParams(judges=[judge], rubric_aspects=[], criteria=["overall", "helpfulness"])
    engine = ScriptedScoringEngine(reward_fn=lambda p, r: len(r))
    rows = judge_pairs(pairs, responses, prompts, judge, engine, params)
    assert rows.height == 6 and set(rows["mode"]) == {"reward_model"} and rows["valid"].all()
    assert rows["p_first_ab"].is_null().all() and rows["bpde"].is_null().all()
    assert engine.requests["score_rewards"] == 3  # each response once, for both criteria
    first = rows.filter((pl.col("response_a") == "r1") & (pl.col("response_b") == "r2"))["p_a"]
    np.testing.assert_allclose(first.to_numpy(), sigmoid(len("Red.") - len("Brown.")))
    calibration = calibrate_judge(load_gold_pairs(), judge, engine, params)
    assert calibration["gold_pairs"][0] == 42 and calibration["position_flip_rate"].is_null().all()

    # the dataset's bias view: no flip rate for a judge that asked no orders (not a perfect 0.0),
    # beside a both-orders judge with one consistent verdict and one flip
    import duckdb
    from prefcurate.schemas.views import REPORT_VIEWS

    both_orders = rows.head(2).with_columns(pl.lit("j2").alias("judge"), pl.lit("pairwise").alias("mode"),
                                           pl.Series("p_first_ab", [0.8, 0.8]), pl.Series("p_first_ba", [0.3, 0.7]))
    current_judgments = pl.concat([rows, both_orders], how="vertical_relaxed")  # noqa: F841 (DuckDB reads it by name)
    bias = {row["judge"]: row for row in duckdb.sql(REPORT_VIEWS["judge_position_bias"]).pl()
            .group_by("judge").agg(pl.col("judgments").sum(), pl.col("position_flip_rate").mean()).to_dicts()}
    assert bias["rm"]["judgments"] == 6 and bias["rm"]["position_flip_rate"] is None
    assert bias["j2"]["position_flip_rate"] == 0.5


# ------------------------------------------------------------- server pool, fake replica
class _CharTokenizer:
    """Test double: one token per character, no chat template, no BOS."""

    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]


class _CharPromptTokenizer:
    tokenizer = _CharTokenizer()

    def prompt_ids(self, text):
        return [ord(c) for c in text]


@pytest.fixture()
def fake_server():
    """A loopback test double of one ``vllm serve`` replica: ``/classify`` answers the token
    count as the reward when ``pooling`` is set (else 404, as a generative server does);
    ``/v1/completions`` answers prompt logprobs of -0.5 per token unless ``pooling``."""
    import json

    from tests.support.loopback import QuietHandler, serve

    state = {"pooling": True, "bodies": []}

    class Handler(QuietHandler):
        def do_GET(self):
            self.send_json(200, {})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["bodies"].append((self.path, body))
            if self.path == "/classify" and state["pooling"]:
                if 0 in body["input"]:
                    return self.send_json(400, {"error": {"message": "token 0 is not allowed"}})
                return self.send_json(200, {"data": [{"index": 0, "probs": [float(len(body["input"]))], "num_classes": 1}]})
            if self.path == "/v1/completions" and not state["pooling"]:
                rows = [None] + [{str(t): {"logprob": -0.5}} for t in body["prompt"][1:]]
                return self.send_json(200, {"choices": [{"text": "", "prompt_logprobs": rows}]})
            self.send_json(404, {"detail": "Not Found"})

    server, _, state["url"] = serve(Handler)
    yield state
    server.shutdown()


def test_server_pool_rewards_logprobs_and_route_checks(fake_server):
    from prefcurate.inference.scoring import ContinuationRequest, RewardRequest
    from prefcurate.inference.server_pool import ServerPool

    pool = ServerPool("rm-servers", [fake_server["url"]], "rm", tokenizer=_CharPromptTokenizer(), retries=0)
    try:
        pool.check_serves("classify")
        good, bad = pool.score_rewards([RewardRequest("Hi", "yo"), RewardRequest("Hi", "a\x00b")])
        assert good.error is None and good.reward == len("Question: Hi\nAnswer: yo")
        assert bad.error.startswith("http_400") and math.isnan(bad.reward)  # fails alone
        assert fake_server["bodies"][-1][1]["use_activation"] is False
        with pytest.raises(PoolCapabilityError, match="judge 'cdr'.*pool 'rm-servers'.*/v1/completions answered http_404"):
            density_mode().check_engine(pool, "cdr")
        fake_server["pooling"] = False
        with pytest.raises(PoolCapabilityError, match="judge 'rm'.*pool 'rm-servers'.*/classify answered http_404"):
            reward_mode().check_engine(pool, "rm")
        (out,) = pool.continuation_logprobs([ContinuationRequest("Q:", " abc")])
        assert out.error is None and out.tokens == 4 and out.logprob == pytest.approx(-2.0)
        assert [r["kind"] for r in pool.drain_metrics()].count("continuation_logprobs") == 1
    finally:
        pool.close()


@pytest.mark.skipif(not is_prepared(), reason="embedded model not prepared (prefcurate models prepare)")
def test_the_annotate_plan_check_refuses_a_reward_judge_on_a_generative_pool():
    from prefcurate.tasks.annotate import AnnotateParams, check_judge_pools

    judge = JudgeSpec(name="rm", pool="judges", mode="reward_model")
    params = AnnotateParams(judges=[judge], rubric_aspects=[])
    with pytest.raises(PoolCapabilityError, match="judge 'rm' \\(mode 'reward_model'\\).*pool 'judges'"):
        check_judge_pools(params.judges, {"judges": {"kind": "embedded"}}, params)


def test_position_free_judges_rate_no_responses_and_keep_the_rubric_out_of_their_keys():
    from prefcurate.tasks.annotate import AnnotateParams, judge_template_hashes, rate_responses

    judge = JudgeSpec(name="rm", pool="rewards", mode="reward_model")
    params = AnnotateParams(judges=[judge])  # the default rubric aspects
    responses = pl.DataFrame({"response_id": ["r1"], "prompt_id": ["p1"], "text": ["Red."]})
    prompts = pl.DataFrame({"prompt_id": ["p1"], "prompt": ["Name a primary color."]})
    engine = ScriptedScoringEngine(reward_fn=lambda p, r: 0.0)
    assert rate_responses(responses, prompts, judge, engine, params).height == 0
    assert "rubric" not in judge_template_hashes(judge, params)


@pytest.mark.skipif(not is_prepared(), reason="embedded model not prepared (prefcurate models prepare)")
def test_load_config_refuses_a_reward_judge_on_a_generative_pool_before_any_stage(tmp_path):
    from prefcurate.config import ConfigError, load_config

    path = tmp_path / "bad.yaml"
    path.write_text(
        "pools:\n  generators: {kind: embedded}\n  judges: {kind: embedded}\n"
        "annotate:\n  judges:\n    - {name: ok, pool: judges}\n    - {name: rm, pool: judges, mode: reward_model}\n"
    )
    with pytest.raises(ConfigError, match=r"bad.yaml:7: annotate.judges.1.pool: judge 'rm' \(mode 'reward_model'\).*pool 'judges'"):
        load_config(path)


def test_the_steps_timing_view_passes_the_scoring_calls_through_only_when_the_engine_has_them():
    from prefcurate.inference.scoring import RewardRequest
    from prefcurate.steps.engines import TimedEngine

    timed = TimedEngine(ScriptedScoringEngine(reward_fn=lambda p, r: 2.0))
    (score,) = timed.score_rewards([RewardRequest("q", "a")])
    assert score.reward == 2.0 and timed.name == "scripted"
    reward_mode().check_engine(timed, "rm")  # the mode sees the engine's call through the view
    bare = TimedEngine(SimpleNamespace(model="generative-only"))
    with pytest.raises(ValueError, match="judge 'rm'.*score_rewards"):
        reward_mode().check_engine(bare, "rm")
