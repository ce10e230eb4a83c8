"""The openai pool kind against a small loopback HTTP server (tests/support/openai_api.py,
a scripted double): routes, auth, verdict paths (top_logprobs, logit_bias, reask, missing),
fault injection (429/503 with Retry-After, truncated bodies, timeouts), rate caps, and the
key never leaving the Authorization header. The real thing (``vllm serve --api-key``) is
exercised in tests/integration/test_openai_pool_vllm.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time

import pytest

from prefcurate.errors import InputError
from prefcurate.inference.base import ChoiceRequest, Engine, GenerateRequest, InferenceError, SamplingParams
from prefcurate.inference.openai_pool import (
    AdaptiveConcurrency,
    OpenAIPool,
    OpenAIPoolConfig,
    retry_after_seconds,
)
from prefcurate.inference.pools import parse_pool
from tests.support.openai_api import KEY, KEY_ENV, StubAPI


@pytest.fixture
def stub(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    api = StubAPI()
    yield api
    api.close()


def make_pool(stub: StubAPI, **overrides) -> OpenAIPool:
    fields = {
        "kind": "openai", "base_url": stub.url, "model": "stub-model", "api_key_env": KEY_ENV,
        "price": {"input_usd_per_mtok": 2.0, "output_usd_per_mtok": 10.0},
        "backoff_base_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5.0,
        **overrides,
    }  # fmt: skip
    config = parse_pool(fields)
    assert isinstance(config, OpenAIPoolConfig)
    return config.open("hosted")


def choice(prompt="Which is better? Verdict:", options=("A", "B")) -> ChoiceRequest:
    return ChoiceRequest(prompt, options)


# --------------------------------------------------------------------------- routes, auth, cost
def test_chat_route_generates_with_the_key_in_the_header_and_costs_from_usage(stub, caplog):
    caplog.set_level(logging.DEBUG)
    with make_pool(stub) as pool:
        [generation] = pool.generate([GenerateRequest("hi", "be brief", SamplingParams(n=2, max_tokens=9, seed=3))])
        rows = pool.drain_metrics()
        text_of_everything = repr(pool) + json.dumps(rows) + repr(generation) + pool.config.model_dump_json()
    assert isinstance(pool, Engine) and generation.error is None
    assert [c.text for c in generation.completions] == ["answer 0", "answer 1"]
    assert [c.tokens_out for c in generation.completions] == [7, 7]
    request = stub.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == f"Bearer {KEY}"
    assert request["body"]["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert request["body"]["n"] == 2 and request["body"]["seed"] == 3 and request["body"]["model"] == "stub-model"
    [row] = rows
    assert row["ok"] and row["tokens_in"] == 100 and row["tokens_out"] == 14
    assert row["cost_usd"] == pytest.approx((100 * 2.0 + 14 * 10.0) / 1e6)
    assert pool.spent_usd == pytest.approx(row["cost_usd"])
    # the key is only in the header: not in the config, metrics, results or logs
    assert KEY not in text_of_everything and KEY not in caplog.text
    assert KEY_ENV in pool.config.model_dump_json()


def test_completions_route_sends_text_prompts(stub):
    with make_pool(stub, route="completions") as pool:
        [generation] = pool.generate([GenerateRequest("hi", None, SamplingParams(n=1), chat=False)])
        [score] = pool.score_choices([choice()])
    assert generation.completions[0].text == "completion 0"
    assert stub.requests[0]["path"] == "/v1/completions" and stub.requests[0]["body"]["prompt"] == "hi"
    assert stub.requests[1]["body"]["logprobs"] == 20 and stub.requests[1]["body"]["max_tokens"] == 1
    assert score.method == "top_logprobs"
    assert score.probs == pytest.approx((0.6 / 0.9, 0.3 / 0.9))


def test_a_wrong_key_is_an_error_naming_the_pool_and_the_variable_not_the_key(stub, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-123")
    with make_pool(stub) as pool, pytest.raises(InferenceError) as raised:
        pool.score_choices([choice(), choice()])
    message = str(raised.value)
    assert "'hosted'" in message and KEY_ENV in message and "http_401" in message
    assert "sk-wrong-key-123" not in message and KEY not in message
    assert isinstance(raised.value, InputError)  # deterministic: Prefect does not retry it


def test_a_missing_key_variable_fails_at_open(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    config = parse_pool({"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": KEY_ENV})
    with pytest.raises(InferenceError, match=f"pool 'hosted'.*{KEY_ENV}"):
        config.open("hosted")


def test_the_config_rejects_unknown_keys_and_too_many_top_logprobs():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="tokenizer folder /no/such/folder does not exist"):
        parse_pool({"kind": "openai", "base_url": "http://x/v1", "model": "m", "tokenizer": "/no/such/folder"})
    with pytest.raises(ValidationError):
        parse_pool({"kind": "openai", "base_url": "http://x/v1", "model": "m", "api_key": "sk-inline"})
    with pytest.raises(ValidationError):
        parse_pool({"kind": "openai", "base_url": "http://x/v1", "model": "m", "top_logprobs": 21})


# --------------------------------------------------------------------------- verdict paths
def test_verdict_from_top_logprobs_sums_the_spellings_of_an_option(stub):
    stub.next_token = {"A": math.log(0.3), " A": math.log(0.2), "B": math.log(0.25), "x": math.log(0.25)}
    with make_pool(stub) as pool:
        [score] = pool.score_choices([choice()])
        [row] = pool.drain_metrics()
    assert score.method == "top_logprobs" and row["verdict_path"] == "top_logprobs"
    assert score.probs == pytest.approx((0.5 / 0.75, 0.25 / 0.75))
    assert stub.requests[0]["body"]["top_logprobs"] == 20 and stub.requests[0]["body"]["logprobs"] is True


def filler(count: int, mass: float) -> dict[str, float]:
    return {f"w{i}": math.log(mass / count) for i in range(count)}


def test_an_option_outside_the_top_k_is_forced_with_logit_bias_post_bias_api(stub):
    # B has probability 0.004, below 20 fillers of 0.0498 each: outside the top-20
    stub.next_token = {"A": math.log(0.2), "B": math.log(0.004), **filler(20, 0.796)}
    with make_pool(stub, option_token_ids={"A": 10, "B": 11}) as pool:
        [score] = pool.score_choices([choice()])
        [row] = pool.drain_metrics()
    assert score.error is None and score.method == "logit_bias" and row["verdict_path"] == "logit_bias"
    assert score.probs == pytest.approx((0.2 / 0.204, 0.004 / 0.204), rel=1e-6)
    assert stub.requests[1]["body"]["logit_bias"] == {"10": 100.0, "11": 100.0}
    assert row["attempts"] == 2 and row["tokens_in"] == 200  # both calls are billed


def test_logit_bias_with_an_api_that_reports_raw_logprobs(stub):
    # vLLM's default: logprobs before the bias; each forced call reveals the sampled option
    stub.bias_mode = "raw"
    stub.next_token = {"A": math.log(0.003), "B": math.log(0.001), **filler(20, 0.996)}
    with make_pool(stub, option_token_ids={"A": 10, "B": 11}) as pool:
        [score] = pool.score_choices([choice()])
    assert score.error is None and score.method == "logit_bias"
    assert score.probs == pytest.approx((0.75, 0.25), rel=1e-6)
    assert stub.requests[2]["body"]["logit_bias"] == {"11": 100.0}  # the one still missing


def test_reask_when_no_token_ids_are_known(stub):
    stub.next_token = {"A": math.log(0.01), **filler(20, 0.99)}
    stub.reask_next_token = {"A": math.log(0.7), "B": math.log(0.2), "x": math.log(0.1)}
    with make_pool(stub) as pool:
        [score] = pool.score_choices([choice()])
    assert score.method == "reask" and score.probs == pytest.approx((0.7 / 0.9, 0.2 / 0.9))
    assert "Answer with exactly one of: A, B." in stub.requests[1]["body"]["messages"][-1]["content"]


def test_an_option_never_found_is_an_error_not_a_zero(stub):
    stub.next_token = {"A": math.log(0.1), **filler(20, 0.9)}
    with make_pool(stub) as pool:
        [score] = pool.score_choices([choice()])
        [row] = pool.drain_metrics()
    assert score.probs == () and score.error.startswith("option_missing: options ['B']")
    assert "tried: top_logprobs, reask" in score.error
    assert not row["ok"] and row["verdict_path"] is None


# --------------------------------------------------------------------------- faults
def throttle(status: int, retry_after: str | None):
    def fault(handler, body):
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        handler.send_json(status, {"error": {"message": "Rate limit reached"}}, headers)
        return True

    return fault


def test_429_with_retry_after_is_honoured_pool_wide(stub):
    stub.faults = [throttle(429, "1")]
    with make_pool(stub, max_concurrency=1) as pool:
        started = time.perf_counter()
        scores = pool.score_choices([choice(), choice()])
        elapsed = time.perf_counter() - started
        rows = pool.drain_metrics()
        limit = pool.concurrency
    assert all(s.error is None for s in scores)
    assert elapsed >= 0.95  # waited the server's second
    assert sorted(r["attempts"] for r in rows) == [1, 2]
    assert pool.throttled == 1 and limit.decreases == 1


def test_503_retry_after_longer_than_the_cap_fails_the_request_clearly(stub):
    stub.faults = [throttle(503, "3600")]
    with make_pool(stub, max_retry_after_s=30) as pool:
        [score] = pool.score_choices([choice()])
    assert score.error.startswith("http_503") and "Retry-After 3600 s is longer than max_retry_after_s 30 s" in score.error


def test_truncated_bodies_are_retried(stub):
    def cut_short(handler, body):  # promises 500 bytes, sends 20 and closes
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", "500")
        handler.end_headers()
        handler.wfile.write(b'{"choices": [{"inde')
        handler.wfile.flush()
        handler.close_connection = True
        return True

    def unterminated_json(handler, body):
        data = b'{"choices": [{"index": 0, "message": {"content": "ha'
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
        return True

    stub.faults = [cut_short, unterminated_json]
    with make_pool(stub, max_concurrency=1) as pool:
        [generation] = pool.generate([GenerateRequest("hi")])
        [row] = pool.drain_metrics()
    assert generation.error is None and generation.completions[0].text == "answer 0"
    assert row["attempts"] == 3


def test_timeouts_are_retried_then_reported(stub):
    def slow(handler, body):
        time.sleep(0.6)
        return False

    stub.faults = [slow]
    with make_pool(stub, timeout_s=0.3, max_concurrency=1) as pool:
        [score] = pool.score_choices([choice()])
        [row] = pool.drain_metrics()
    assert score.error is None and row["attempts"] == 2

    stub.faults = [slow, slow]
    with make_pool(stub, timeout_s=0.3, retries=1) as pool:
        [score] = pool.score_choices([choice()])
    assert score.error.startswith("timeout: ReadTimeout after 0.3 s")


def test_a_bad_request_fails_alone(stub):
    stub.faults = [lambda handler, body: handler.send_json(400, {"error": {"message": "context too long"}}) or True]
    with make_pool(stub, max_concurrency=1) as pool:
        first, second = pool.score_choices([choice(), choice()])
    assert first.error == "http_400: context too long" and second.error is None


# --------------------------------------------------------------------------- rate control
def test_requests_per_minute_cap_paces_a_batch(stub):
    with make_pool(stub, requests_per_minute=600) as pool:  # 10 per second, bursts of 10
        started = time.perf_counter()
        scores = pool.score_choices([choice() for _ in range(25)])
        elapsed = time.perf_counter() - started
    assert all(s.error is None for s in scores)
    assert elapsed >= 1.4  # 10 at once, then 15 at 10/s


def test_tokens_per_minute_cap_paces_a_batch(stub):
    # each verdict reserves ~15 tokens and is billed 101: at 6060 tokens/minute (101 per
    # second) the second waits for the first's debt to refill (~0.15 s), the next two ~1 s each
    with make_pool(stub, tokens_per_minute=6060, max_concurrency=1) as pool:
        started = time.perf_counter()
        pool.score_choices([choice() for _ in range(4)])
        elapsed = time.perf_counter() - started
    assert elapsed >= 1.9


def test_adaptive_concurrency_halves_once_per_burst_and_creeps_back():
    now = [0.0]

    async def scenario():
        window = AdaptiveConcurrency(8, 1, 16, clock=lambda: now[0])
        for _ in range(4):
            await window.acquire()
        for _ in range(4):  # four 429s from one burst: one halving
            await window.release("throttled")
        assert window.limit == 4.0
        now[0] = 2.0
        await window.acquire()
        await window.release("throttled")
        assert window.limit == 2.0
        for _ in range(10):
            await window.acquire()
            await window.release("ok")
        assert 4.0 < window.limit < 6.0  # +1 per `limit` successes
        window.limit = 1.0
        await window.acquire()
        waiter = asyncio.create_task(window.acquire())
        await asyncio.sleep(0.01)
        assert not waiter.done()  # the window holds at the limit
        await window.release("ok")
        await asyncio.wait_for(waiter, 1)

    asyncio.run(scenario())


def test_retry_after_header_forms():
    import httpx

    assert retry_after_seconds(httpx.Headers({"Retry-After": "7"})) == 7.0
    assert retry_after_seconds(httpx.Headers({"retry-after-ms": "250", "Retry-After": "1"})) == 0.25
    date = "Wed, 21 Oct 2015 07:28:30 GMT"
    assert retry_after_seconds(httpx.Headers({"Retry-After": date}), now=1445412500.0) == pytest.approx(10.0)
    assert retry_after_seconds(httpx.Headers({})) is None
    assert retry_after_seconds(httpx.Headers({"Retry-After": "soon"})) is None


def test_identity_ignores_url_and_key_but_not_route():
    base = {"kind": "openai", "base_url": "http://a/v1", "model": "m", "api_key_env": "A_KEY"}
    same = parse_pool({**base, "base_url": "http://b/v1", "api_key_env": "B_KEY"})
    other_route = parse_pool({**base, "route": "completions"})
    assert parse_pool(base).model_identity() == same.model_identity()
    assert parse_pool(base).model_identity() != other_route.model_identity()
    assert parse_pool(base).concurrency_slots() == 1
