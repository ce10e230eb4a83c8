"""The inference layer against real vLLM (CPU): the in-process engine, then a server pool.

The in-process engine runs first and is shut down before the two server replicas start
(one model copy in memory at a time). The pool tests then run in order: generate, score,
bad input, a replica killed mid-batch, and finally every replica down.
"""

from __future__ import annotations

import math
import threading
import time

import httpx
import pytest

from prefcurate.inference.base import (
    ChoiceRequest,
    Engine,
    GenerateRequest,
    InferenceError,
    SamplingParams,
)
from prefcurate.inference.pools import EmbeddedPoolConfig, ServersPoolConfig, open_engine
from prefcurate.inference.server_pool import ServerPool

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LONG_PROMPT = "word " * 1100  # > max_model_len 1024 tokens
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
JUDGE_PROMPT = "Question: Which number is larger, 3 or 7?\nAnswer:"


def exact_option_logprob(url: str, prompt_ids: list[int], option_ids: tuple[int, ...]) -> float:
    """Reference: the option's sequence log-probability read from raw prompt_logprobs."""
    ids = prompt_ids + list(option_ids)
    body = httpx.post(
        f"{url}/v1/completions",
        json={"model": "gemma3-270m", "prompt": ids, "max_tokens": 1, "prompt_logprobs": 0},
        timeout=300,
    ).json()
    rows = body["choices"][0]["prompt_logprobs"]
    return sum(rows[i][str(ids[i])]["logprob"] for i in range(len(prompt_ids), len(ids)))


def softmax(values):
    top = max(values)
    weights = [math.exp(v - top) for v in values]
    return [w / sum(weights) for w in weights]


# ----------------------------------------------------------------------------- embedded
@pytest.fixture(scope="class")
def embedded(prepared_model):
    engine = open_engine("embedded", EmbeddedPoolConfig(kv_cache_space_gb=1, max_num_seqs=16))
    yield engine
    engine.close()


class TestEmbeddedEngine:
    def test_generate_batch_with_a_bad_request(self, embedded):
        assert isinstance(embedded, Engine) and embedded.model == "gemma3-270m"
        requests = [
            GenerateRequest("The capital of France is", params=GREEDY),
            GenerateRequest(LONG_PROMPT, params=GREEDY),
            GenerateRequest("Write a short poem.", "You are a poet.", SamplingParams(n=3, max_tokens=6, seed=7)),
        ]
        out = embedded.generate(requests)
        assert out[1].error.startswith("prompt_too_long") and out[1].completions == []
        assert out[0].error is None and out[2].error is None
        assert len(out[0].completions) == 1 and len(out[2].completions) == 3
        assert 1 <= out[0].completions[0].tokens_out <= 8 and out[0].completions[0].text
        assert all(c.finish_reason in ("stop", "length") for c in out[2].completions)
        # tokens_in counts the rendered prompt (no chat template: the plain frame) and the
        # BOS this layer prepends (the converted tokenizer omits it)
        rendered = embedded.tokenizer.generate_ids(requests[0])
        assert rendered[0] == embedded.tokenizer.tokenizer.bos_token_id
        assert out[0].tokens_in == len(rendered)
        again = embedded.generate([requests[0], requests[2]])
        assert again[0].completions[0].text == out[0].completions[0].text  # greedy
        assert [c.text for c in again[1].completions] == [c.text for c in out[2].completions]  # seeded
        rows = embedded.drain_metrics()
        assert len(rows) == 5 and sum(not r["ok"] for r in rows) == 1

    def test_stop_strings(self, embedded):
        (out,) = embedded.generate([GenerateRequest("1, 2, 3, 4,", params=SamplingParams(temperature=0.0, max_tokens=30, stop=(",",)))])
        assert out.completions[0].finish_reason == "stop" and "," not in out.completions[0].text

    def test_score_choices_single_shared_prefix_and_multi_token(self, embedded):
        requests = [
            ChoiceRequest(JUDGE_PROMPT, (" A", " B")),
            ChoiceRequest(JUDGE_PROMPT, (" 3", " 7")),  # Gemma: "▁" + digit, shared prefix
            ChoiceRequest(JUDGE_PROMPT, (" three", " seven", " seventy-seven")),  # multi-token
            ChoiceRequest(LONG_PROMPT, ("A", "B")),
        ]
        out = embedded.score_choices(requests)
        assert out[3].error.startswith("prompt_too_long")
        for score in out[:3]:
            assert score.error is None and sum(score.probs) == pytest.approx(1.0)
            assert all(p > 0 for p in score.probs)
        # both methods read the same distribution: the one-decode shared-prefix plan equals
        # full sequence scoring of " 3" / " 7" via prompt_logprobs on the same engine
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        tok = embedded.tokenizer
        prompt_ids = tok.prompt_ids(JUDGE_PROMPT)
        sequence = []
        for option in (" 3", " 7"):
            ids = prompt_ids + list(tok.option_ids(option))
            (res,) = embedded.llm.generate([TokensPrompt(prompt_token_ids=ids)], VSP(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
            sequence.append(sum(res.prompt_logprobs[i][ids[i]].logprob for i in range(len(prompt_ids), len(ids))))
        assert out[1].probs == pytest.approx(softmax(sequence), abs=1e-4)

    def test_option_far_outside_top_k_is_not_zero(self, embedded):
        # "zebra" is nowhere near the top-20 next tokens here, yet gets its true probability
        (score,) = embedded.score_choices([ChoiceRequest("The capital of France is", (" Paris", " zebra"))])
        assert score.error is None and 0 < score.prob(1) < 1e-3 < score.prob(0)


# ----------------------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def pool(vllm_replicas):
    urls = [r.url for r in vllm_replicas]
    engine = open_engine(
        "cpu-test",
        ServersPoolConfig(urls=urls, served_model_name="gemma3-270m", max_concurrency_per_replica=8,
                          timeout_s=300, retries=3, backoff_base_s=0.2, health_interval_s=1.0),
    )  # fmt: skip
    yield engine
    engine.close()


def test_pool_generate_spreads_over_replicas(pool, vllm_replicas):
    requests = [GenerateRequest(f"Fact {i}: the sky is", params=GREEDY) for i in range(8)]
    out = pool.generate(requests)
    assert all(g.error is None and g.completions[0].tokens_out >= 1 for g in out)
    assert {g.replica for g in out} == {r.url for r in vllm_replicas}
    rows = pool.drain_metrics()
    assert len(rows) == 8 and all(r["ok"] and r["attempts"] == 1 and r["tokens_out"] >= 1 for r in rows)
    # the same request gives the same greedy text on either replica
    a = pool.generate([requests[0]] * 4)
    assert len({g.completions[0].text for g in a}) == 1


def test_pool_score_choices_match_reference_logprobs(pool, vllm_replicas):
    requests = [ChoiceRequest(JUDGE_PROMPT, (" 3", " 7")), ChoiceRequest(JUDGE_PROMPT, (" three", " seven"))]
    out = pool.score_choices(requests)
    tok = pool.tokenizer
    prompt_ids = tok.prompt_ids(JUDGE_PROMPT)
    url = vllm_replicas[0].url
    for request, score in zip(requests, out):
        assert score.error is None
        reference = [exact_option_logprob(url, prompt_ids, tok.option_ids(o)) for o in request.options]
        assert score.probs == pytest.approx(softmax(reference), abs=1e-4)


def test_pool_long_prompt_fails_alone_with_the_server_reason(vllm_replicas, pool):
    # no client-side length check: the server's own 400 is recorded
    raw = ServerPool("raw", [r.url for r in vllm_replicas], "gemma3-270m", pool.tokenizer, max_model_len=None)
    try:
        out = raw.generate([GenerateRequest(LONG_PROMPT, params=GREEDY), GenerateRequest("Hello", params=GREEDY)])
        rows = {r["ok"]: r for r in raw.drain_metrics()}
    finally:
        raw.close()
    assert out[0].error.startswith("http_400") and "maximum context length" in out[0].error
    assert out[1].error is None
    assert rows[False]["attempts"] == 1 and rows[False]["error"] == out[0].error
    # with the pool's configured context, the client rejects it before sending
    (checked,) = pool.generate([GenerateRequest(LONG_PROMPT, params=GREEDY)])
    assert checked.error.startswith("prompt_too_long")


def test_pool_failover_when_a_replica_is_killed_mid_batch(pool, vllm_replicas, launcher):
    victim = vllm_replicas[1]
    params = SamplingParams(temperature=0.0, max_tokens=48)
    requests = [GenerateRequest(f"Story {i}: Once upon a time", params=params) for i in range(16)]
    pool.drain_metrics()  # earlier tests' rows
    result: dict = {}
    worker = threading.Thread(target=lambda: result.setdefault("out", pool.generate(requests)))
    worker.start()
    victim_state = next(r for r in pool.replicas if r.url == victim.url)
    deadline = time.monotonic() + 60
    while victim_state.outstanding < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # let it decode a little: these requests die half-way
    assert victim_state.outstanding >= 1
    assert launcher.kill_replica(victim.pid)
    worker.join(timeout=600)
    out = result["out"]
    rows = pool.drain_metrics()
    assert len(out) == 16 and all(g.error is None for g in out)
    assert all(len(g.completions) == 1 and g.completions[0].tokens_out >= 1 for g in out)
    retried = [r for r in rows if r["attempts"] > 1]
    assert retried and all(r["replica"] == vllm_replicas[0].url for r in retried)
    assert len(rows) == 16  # one row per request: nothing lost, nothing doubled
    # the greedy story for a prompt does not depend on which replica finished it
    again = pool.generate(requests[:2])
    assert [g.completions[0].text for g in again] == [g.completions[0].text for g in out[:2]]
    assert pool.check_health() == {vllm_replicas[0].url: True, victim.url: False}


def test_pool_all_replicas_down_raises_inference_error(pool, vllm_replicas, launcher):
    for replica in vllm_replicas:
        launcher.kill_replica(replica.pid)
    time.sleep(1.0)
    with pytest.raises(InferenceError, match="'cpu-test'.*all 2 replicas are down"):
        pool.generate([GenerateRequest("Hello", params=GREEDY)])
