"""Generate and judge on the real in-process vLLM engine (embedded Gemma 3 270M, CPU).

Small on purpose: 2 prompts x 2 samples, one judge. Checks what only a real model can
break: the templates fit the context, the verdict tokens resolve to probabilities for
every request, and ids/columns line up end to end.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from prefcurate.tasks.annotate import (
    AnnotateParams,
    JudgeSpec,
    calibrate_judge,
    judge_pairs,
    load_gold_pairs,
    load_template,
    rate_responses,
    schedule_pairs,
)
from prefcurate.tasks.generate import GeneratorSpec, SamplingConfig, run_generation

from prefcurate.inference.models import is_prepared

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not is_prepared(), reason="embedded model not prepared (prefcurate models prepare)"),
]


@pytest.fixture(scope="module")
def engine():
    from prefcurate.inference.pools import EmbeddedPoolConfig, open_engine

    engine = open_engine("judges", EmbeddedPoolConfig(max_model_len=1024))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def frames(engine):
    prompts = pl.DataFrame(
        {
            "prompt_id": ["p-capital", "p-sum"],
            "prompt": ["What is the capital of Italy?", "What is 7 plus 5?"],
            "system_prompt": [None, None],
        }
    )
    spec = GeneratorSpec(name="gemma", n=2, sampling=SamplingConfig(max_tokens=24, temperature=0.9, seed=3))
    responses = run_generation(prompts, spec, engine)
    return prompts, responses


def test_generation_fills_every_sample(frames, engine):
    prompts, responses = frames
    assert responses.height == 4 and responses["response_id"].n_unique() == 4
    assert set(responses["finish_reason"]) <= {"stop", "length"}
    assert (responses["truncated"] == (responses["finish_reason"] == "length")).all()
    assert responses["text"].null_count() == 0 and (responses["tokens_out"] > 0).all()
    assert set(responses["model"]) == {engine.model}
    # seeded: a second run regenerates nothing
    again = run_generation(
        prompts,
        GeneratorSpec(name="gemma", n=2, sampling=SamplingConfig(max_tokens=24, temperature=0.9, seed=3)),
        engine,
        responses["response_id"],
    )
    assert again.height == 0


def test_pairwise_probabilities_are_valid_and_balanced(frames, engine):
    prompts, responses = frames
    # the tiny model may emit blank text; judge whatever has text, as the stage does
    responses = responses.with_columns(
        pl.when(pl.col("text").str.strip_chars() == "")
        .then(pl.lit("(no answer)"))
        .otherwise("text")
        .alias("text")
    )
    pairs = schedule_pairs(responses, "all")
    assert pairs.height == 2
    judge = JudgeSpec(name="gemma-judge")
    params = AnnotateParams(judges=[judge], criteria=["overall"], rubric_aspects=["helpfulness"])
    out = judge_pairs(pairs, responses, prompts, judge, engine, params)
    assert out.height == 2 and out["valid"].all() and out["error"].null_count() == 2
    for column in ("p_first_ab", "p_first_ba", "p_a"):
        values = out[column].to_numpy()
        assert np.all((values > 0) & (values < 1)), column
    expected = (out["p_first_ab"] + 1 - out["p_first_ba"]) / 2
    assert np.allclose(out["p_a"].to_numpy(), expected.to_numpy())
    assert (out["response_a"] < out["response_b"]).all()
    assert set(out["template_hash"]) == {load_template("pairwise_v3").hash}
    assert set(out["judge_model"]) == {engine.model}

    ratings = rate_responses(responses, prompts, judge, engine, params)
    assert ratings.height == 4 and ratings["valid"].all()
    sums = np.array([sum(p) for p in ratings["probs"].to_list()])
    assert np.allclose(sums, 1.0)
    assert ratings["expected_score"].is_between(1.0, 5.0).all()


def test_the_two_orders_of_a_pair_share_their_prefix_in_the_kv_cache(engine):
    """The second order reuses the first's KV cache up to the first answer, in whole
    32-token blocks (vLLM's CPU default of 128 would reuse a multiple of 128 only)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from prefcurate.inference.vllm_engine import CPU_BLOCK_SIZE

    template = load_template(JudgeSpec(name="j").template)
    fields = {"criterion_description": "Which answer is more polite.", "prompt": "Greet a new colleague."}
    orders = [
        template.text.format(**fields, response_first=first, response_second=second)
        for first, second in [("Welcome aboard, glad to have you!", "What do you want?"),
                              ("What do you want?", "Welcome aboard, glad to have you!")]
    ]
    ids = [engine.tokenizer.prompt_ids(text) for text in orders]
    shared = next(i for i, (x, y) in enumerate(zip(*ids)) if x != y)
    engine.llm.reset_prefix_cache()
    cached = [
        engine.llm.generate([TokensPrompt(prompt_token_ids=i)], SamplingParams(max_tokens=1), use_tqdm=False)[0]
        .num_cached_tokens
        for i in ids
    ]
    assert cached[0] == 0
    assert cached[1] == shared // CPU_BLOCK_SIZE * CPU_BLOCK_SIZE > shared // 128 * 128


def test_rationale_mode_and_calibration_on_the_real_engine(frames, engine):
    prompts, responses = frames
    pairs = schedule_pairs(responses, "all").head(1)
    judge = JudgeSpec(name="gemma-judge", mode="rationale", mode_options={"k": 2, "max_tokens": 24})
    params = AnnotateParams(judges=[judge], criteria=["overall"], rubric_aspects=[])
    out = judge_pairs(pairs, responses, prompts, judge, engine, params)
    assert out["mode"].to_list() == ["rationale"] and out["valid"].all()
    assert 0 < out["p_a"][0] < 1

    gold = load_gold_pairs().head(6)
    row = calibrate_judge(gold, JudgeSpec(name="gemma-judge"), engine).row(0, named=True)
    assert row["gold_pairs"] == 6
    assert 0 <= row["accuracy"] <= 1 and 0 <= row["position_flip_rate"] <= 1
    assert 0 < row["first_position_pref"] < 1
