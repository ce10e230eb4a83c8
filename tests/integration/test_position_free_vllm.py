"""Position-free judges on real vLLM (CPU): the seeded reward checkpoint on the pooling
runner (in-process and a ``vllm serve --runner pooling`` replica) and response
log-likelihoods on the generative embedded model (in-process and the shared replicas).

Plumbing tests: the seeded reward head is random, so no quality is claimed. Slow: every
class starts its own engine or server (~1-2 min each on 2 cores).
"""

from __future__ import annotations

import math

import httpx
import numpy as np
import polars as pl
import pytest

from prefcurate.inference.models import is_prepared
from prefcurate.inference.scoring import ContinuationRequest, PoolCapabilityError, RewardRequest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not is_prepared(), reason="embedded model not prepared (prefcurate models prepare)"),
]

PAIRS = [
    ("What is the capital of France?", "Paris."),
    ("What is the capital of France?", "The capital of France is Lyon, a city on the Rhone."),
    ("Name a primary color.", "Red."),
]
LONG = "word " * 1100  # > max_model_len 1024 tokens


@pytest.fixture(scope="module")
def reward_folder():
    from prefcurate.inference.reward_models import prepare_seeded_reward_model

    return str(prepare_seeded_reward_model())


@pytest.fixture(scope="module")
def reference_rewards(reward_folder):
    """The checkpoint's rewards computed with transformers from the same token ids the
    engines send: the seeded score row times the base model's final (normed) hidden state
    of the last token."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel

    from prefcurate.inference.prompting import LocalPromptTokenizer
    from prefcurate.inference.scoring import reward_text

    tokenizer = LocalPromptTokenizer.from_folder(reward_folder)
    head = load_file(f"{reward_folder}/score.safetensors")["score.weight"][0]
    model = AutoModel.from_pretrained(reward_folder, dtype=torch.float32).eval()
    values = []
    with torch.no_grad():
        for prompt, response in PAIRS:
            ids = tokenizer.prompt_ids(reward_text(tokenizer.tokenizer, prompt, response))
            values.append(float(model(torch.tensor([ids])).last_hidden_state[0, -1] @ head))
    del model
    return values


def gold_jobs(n: int = 6) -> pl.DataFrame:
    from prefcurate.tasks.annotate import load_gold_pairs, resolve_criteria

    gold = load_gold_pairs().head(n)
    return gold.with_row_index("job").select(
        "job", "prompt", pl.col("response_a").alias("text_a"), pl.col("response_b").alias("text_b"),
        pl.lit(resolve_criteria(["overall"])["overall"]).alias("criterion_description"),
    )  # fmt: skip


def swapped(jobs: pl.DataFrame) -> pl.DataFrame:
    return jobs.with_columns(pl.col("text_b").alias("text_a"), pl.col("text_a").alias("text_b"))


def judge(mode: str, **options):
    from prefcurate.tasks.annotate import JudgeSpec
    from prefcurate.tasks.judge_modes import mode_class

    cls = mode_class(mode)
    return cls(JudgeSpec(name=f"{mode}-judge", pool="pool-under-test"), cls.Options(**options))


# ------------------------------------------------------------------ in-process, pooling runner
class TestInProcessRewardModel:
    @pytest.fixture(scope="class")
    def engine(self, reward_folder):
        from prefcurate.inference.vllm_engine import VLLMEngine

        engine = VLLMEngine(reward_folder, name="rewards", kv_cache_space_gb=1, max_num_seqs=16)
        yield engine
        engine.close()

    def test_rewards_are_the_score_head_on_the_last_hidden_state(self, engine, reference_rewards):
        assert engine.runner == "pooling"
        out = engine.score_rewards([RewardRequest(p, r) for p, r in PAIRS + [PAIRS[0], ("q", LONG)]])
        assert [o.error for o in out[:4]] == [None] * 4
        rewards = [o.reward for o in out[:3]]
        assert rewards == pytest.approx(reference_rewards, rel=1e-3, abs=1e-3)
        assert out[3].reward == out[0].reward  # the same input, the same reward
        assert len({round(r, 4) for r in rewards}) == 3
        assert out[4].error.startswith("prompt_too_long") and math.isnan(out[4].reward)
        rows = engine.drain_metrics()
        assert [r["kind"] for r in rows] == ["score_rewards"] * 5 and sum(r["ok"] for r in rows) == 4

    def test_reward_mode_verdicts_are_position_free(self, engine):
        mode = judge("reward_model")
        mode.check_engine(engine, "reward_model-judge")
        jobs = gold_jobs()
        verdicts = mode.judge(jobs, engine)
        assert verdicts.errors == [None] * jobs.height
        assert ((verdicts.p_a >= 0) & (verdicts.p_a <= 1)).all()
        np.testing.assert_allclose(mode.judge(swapped(jobs), engine).p_a, 1.0 - verdicts.p_a, atol=1e-9)
        with pytest.raises(PoolCapabilityError, match="judge 'x'.*pool 'rewards'.*'pooling' runner"):
            judge("density_ratio").check_engine(engine, "x")
        with pytest.raises(PoolCapabilityError, match="pool 'rewards'"):
            engine.continuation_logprobs([ContinuationRequest("Question: hi\nAnswer:", " yes")])
        from prefcurate.inference.base import ChoiceRequest

        (choice,) = engine.score_choices([ChoiceRequest("Question: hi\nAnswer:", ("A", "B"))])
        assert choice.error.startswith("wrong_runner: pool 'rewards'")


# --------------------------------------------------------------- in-process, generate runner
class TestInProcessDensityRatio:
    @pytest.fixture(scope="class")
    def engine(self, prepared_model):
        from prefcurate.inference.vllm_engine import VLLMEngine

        engine = VLLMEngine("default", name="judges", kv_cache_space_gb=1, max_num_seqs=16)
        yield engine
        engine.close()

    def test_continuation_logprobs(self, engine):
        context = "Question: What is the capital of France?\nAnswer:"
        out = engine.continuation_logprobs([
            ContinuationRequest(context, " Paris."),
            ContinuationRequest(context, " Paris is the capital of France."),
            ContinuationRequest(context, ""),
            ContinuationRequest(LONG, " x"),
        ])  # fmt: skip
        assert out[0].error is None and out[1].error is None
        expected_tokens = len(engine.tokenizer.tokenizer.encode(" Paris.", add_special_tokens=False))
        assert out[0].tokens == expected_tokens and out[1].tokens > out[0].tokens
        assert out[0].logprob < 0 and out[1].logprob < out[0].logprob  # more tokens, less likely
        assert out[1].mean_logprob == pytest.approx(out[1].logprob / out[1].tokens)
        assert out[2].error.startswith("empty_continuation") and out[3].error.startswith("prompt_too_long")
        # the first token's log-probability equals the next-token logprob after the context
        first = engine.tokenizer.tokenizer.encode(" Paris", add_special_tokens=False)[0]
        one = engine.continuation_logprobs([ContinuationRequest(context, engine.tokenizer.tokenizer.decode([first]))])[0]
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = engine.tokenizer.prompt_ids(context)
        step = engine.llm.generate([TokensPrompt(prompt_token_ids=ids)],
                                   SamplingParams(max_tokens=1, logprobs=1, logprob_token_ids=[first]), use_tqdm=False)
        assert one.logprob == pytest.approx(step[0].outputs[0].logprobs[0][first].logprob, abs=1e-3)

    def test_density_ratio_mode_and_bad_input(self, engine):
        mode = judge("density_ratio", length_normalise=True)
        mode.check_engine(engine, "density_ratio-judge")
        jobs = gold_jobs()
        verdicts = mode.judge(jobs, engine)
        assert verdicts.errors == [None] * jobs.height and np.isfinite(verdicts.p_a).all()
        np.testing.assert_allclose(mode.judge(swapped(jobs), engine).p_a, 1.0 - verdicts.p_a, atol=1e-9)
        with pytest.raises(PoolCapabilityError, match="judge 'rm'.*pool 'judges'.*'generate' runner"):
            judge("reward_model").check_engine(engine, "rm")
        with pytest.raises(PoolCapabilityError, match="reward"):
            engine.score_rewards([RewardRequest("q", "a")])


# ------------------------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def reward_server(reward_folder, launcher, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reward-server")
    spec = launcher.LaunchSpec(
        model=reward_folder, served_model_name="seeded-reward", device="cpu", replicas=1, base_port=0,
        max_model_len=1024, kv_cache_space_gb=1, max_num_seqs=16, extra_args=["--runner", "pooling"],
    )  # fmt: skip
    replicas = launcher.start(spec, workdir / "replicas.json", log_dir=workdir / "logs", wait_timeout_s=900)
    try:
        yield replicas[0]
    finally:
        launcher.stop(workdir / "replicas.json")


def server_pool(name, urls, model, served):
    from prefcurate.inference.pools import ServersPoolConfig, open_engine

    return open_engine(name, ServersPoolConfig(model=model, served_model_name=served, urls=urls, timeout_s=300))


def test_reward_server_serves_classify_and_refuses_the_density_ratio(reward_server, reward_folder, reference_rewards):
    pool = server_pool("reward-servers", [reward_server.url], reward_folder, "seeded-reward")
    try:
        pool.check_serves("classify")
        out = pool.score_rewards([RewardRequest(p, r) for p, r in PAIRS])
        assert [o.error for o in out] == [None] * 3
        assert [o.reward for o in out] == pytest.approx(reference_rewards, rel=1e-3, abs=1e-3)
        assert {o.replica for o in out} == {reward_server.url}
        verdicts = judge("reward_model", temperature=1.0).judge(gold_jobs(3), pool)
        assert np.isfinite(verdicts.p_a).all()
        with pytest.raises(PoolCapabilityError, match="judge 'cdr'.*pool 'reward-servers'.*/v1/completions"):
            judge("density_ratio").check_engine(pool, "cdr")
    finally:
        pool.close()


def test_generative_servers_give_logprobs_and_refuse_a_reward_judge(vllm_replicas, prepared_model):
    pool = server_pool("judge-servers", [r.url for r in vllm_replicas], prepared_model, "gemma3-270m")
    try:
        with pytest.raises(PoolCapabilityError, match="judge 'rm'.*pool 'judge-servers'.*/classify answered http_404"):
            judge("reward_model").check_engine(pool, "rm")
        context = "Question: What is the capital of France?\nAnswer:"
        (out,) = pool.continuation_logprobs([ContinuationRequest(context, " Paris.")])
        assert out.error is None
        ids = pool.tokenizer.prompt_ids(context)
        tail = pool.tokenizer.tokenizer.encode(" Paris.", add_special_tokens=False)
        body = httpx.post(f"{vllm_replicas[0].url}/v1/completions", timeout=300, json={
            "model": "gemma3-270m", "prompt": ids + tail, "max_tokens": 1, "prompt_logprobs": 0,
        }).json()  # fmt: skip
        rows = body["choices"][0]["prompt_logprobs"]
        reference = sum(rows[i][str((ids + tail)[i])]["logprob"] for i in range(len(ids), len(ids) + len(tail)))
        assert out.logprob == pytest.approx(reference, abs=1e-4) and out.tokens == len(tail)
    finally:
        pool.close()
