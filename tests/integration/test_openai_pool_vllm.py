"""The openai pool kind against a real CPU ``vllm serve --api-key`` replica (Gemma 3 270M).

Marked slow: the replica is its own (it needs ``--api-key`` and a chat template, which the
session's ``vllm_replicas`` do not have), and starting a vLLM server takes 1.5-4 minutes on
2 cores. One module-scoped replica serves every test here. Run with ``pytest -m slow
tests/integration/test_openai_pool_vllm.py``.
"""

from __future__ import annotations

import math

import httpx
import pytest

from prefcurate.inference.base import ChoiceRequest, GenerateRequest, InferenceError, SamplingParams
from prefcurate.inference.pools import parse_pool

pytestmark = pytest.mark.slow

KEY = "sk-vllm-test-3f9a1c"
KEY_ENV = "PREFCURATE_TEST_VLLM_KEY"
SERVED = "gemma3-270m"
# the prepared Gemma folder ships no chat template: the server gets Gemma's turn format
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}<start_of_turn>model\n"
)
VERDICT_PROMPT = (
    "Question: Which answer is correct? 2 + 2 = ?\nA: 4\nB: 5\n"
    "Reply with the letter of the correct answer.\nAnswer:"
)


@pytest.fixture(scope="module")
def api_replica(prepared_model, launcher, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vllm-api-key")
    template = workdir / "chat_template.jinja"
    template.write_text(CHAT_TEMPLATE)
    spec = launcher.LaunchSpec(
        model=prepared_model, served_model_name=SERVED, device="cpu", replicas=1, base_port=0,
        max_model_len=1024, kv_cache_space_gb=1, max_num_seqs=8,
        extra_args=["--api-key", KEY, "--chat-template", str(template)],
    )  # fmt: skip
    pid_file = workdir / "replicas.json"
    [replica] = launcher.start(spec, pid_file, log_dir=workdir / "logs", wait_timeout_s=900)
    try:
        yield replica
    finally:
        launcher.stop(pid_file)


def pool(replica, monkeypatch, prepared_model=None, **fields):
    monkeypatch.setenv(KEY_ENV, KEY)
    config = parse_pool({
        "kind": "openai", "base_url": f"{replica.url}/v1", "model": SERVED, "api_key_env": KEY_ENV,
        "price": {"input_usd_per_mtok": 1.0, "output_usd_per_mtok": 4.0}, "timeout_s": 300,
        **({"tokenizer": prepared_model} if prepared_model else {}), **fields,
    })  # fmt: skip
    return config.open("vllm-hosted")


def exact_probs(replica, prompt: str, token_ids: list[int]) -> list[float]:
    """vLLM's own log-probabilities of exactly these ids (its logprob_token_ids extension),
    normalised over them: what a verdict must equal, whatever path read it."""
    body = {"model": SERVED, "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "logprobs": len(token_ids),
            "logprob_token_ids": token_ids, "return_tokens_as_token_ids": True}
    answer = httpx.post(f"{replica.url}/v1/completions", json=body, timeout=300,
                        headers={"Authorization": f"Bearer {KEY}"}).json()
    top = answer["choices"][0]["logprobs"]["top_logprobs"][0]
    logprobs = [float(top[f"token_id:{t}"]) for t in token_ids]
    peak = max(logprobs)
    weights = [math.exp(v - peak) for v in logprobs]
    return [w / sum(weights) for w in weights]


def top20(replica, prompt: str) -> dict[str, float]:
    body = {"model": SERVED, "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "logprobs": 20}
    answer = httpx.post(f"{replica.url}/v1/completions", json=body, timeout=300,
                        headers={"Authorization": f"Bearer {KEY}"}).json()
    return answer["choices"][0]["logprobs"]["top_logprobs"][0]


def test_completions_route_generates_and_judges(api_replica, monkeypatch, prepared_model):
    # two options the model surely ranks in its top-20: its own two likeliest words
    top = top20(api_replica, VERDICT_PROMPT)
    words = []
    for token, _ in sorted(top.items(), key=lambda item: -item[1]):
        if token.strip() and token.strip() not in words:
            words.append(token.strip())
    options = tuple(words[:2])
    logsumexp = {o: math.log(sum(math.exp(v) for t, v in top.items() if t.strip() == o)) for o in options}
    expected_top = [math.exp(logsumexp[o]) / sum(math.exp(logsumexp[p]) for p in options) for o in options]
    with pool(api_replica, monkeypatch, prepared_model, route="completions") as engine:
        [generation] = engine.generate([GenerateRequest("The capital of France is", None,
                                                        SamplingParams(n=2, max_tokens=8, seed=0), chat=False)])
        likely, unlikely, letters = engine.score_choices([
            ChoiceRequest(VERDICT_PROMPT, options),
            ChoiceRequest(VERDICT_PROMPT, ("Q", "Z")),  # far outside the top-20
            ChoiceRequest(VERDICT_PROMPT, ("A", "B")),
        ])
        rows = engine.drain_metrics()
        ids = engine._bias_ids(("Q", "Z"))
    assert generation.error is None and len(generation.completions) == 2 and generation.tokens_in > 0
    assert likely.error is None and likely.method == "top_logprobs"
    assert list(likely.probs) == pytest.approx(expected_top, abs=1e-3)
    # vLLM reports logprobs before the bias: each forced call reveals one option's raw value
    assert unlikely.error is None and unlikely.method == "logit_bias"
    assert list(unlikely.probs) == pytest.approx(exact_probs(api_replica, VERDICT_PROMPT, [ids["Q"], ids["Z"]]), abs=1e-3)
    assert letters.error is None and sum(letters.probs) == pytest.approx(1.0)
    assert all(r["ok"] for r in rows) and all(r["cost_usd"] > 0 for r in rows)
    paths = [r["verdict_path"] for r in rows if r["kind"] == "score_choices"]
    assert len(paths) == 3 and "top_logprobs" in paths and "logit_bias" in paths  # rows in finishing order


def test_an_option_outside_the_top_k_without_token_ids_is_an_error_not_zero(api_replica, monkeypatch):
    with pool(api_replica, monkeypatch, route="completions", reask=False) as engine:
        [score] = engine.score_choices([ChoiceRequest(VERDICT_PROMPT, ("Q", "Z"))])
    assert score.probs == () and score.error.startswith("option_missing")


def test_chat_route_applies_the_servers_template(api_replica, monkeypatch, prepared_model):
    with pool(api_replica, monkeypatch, prepared_model, route="chat") as engine:
        [generation] = engine.generate([GenerateRequest("Say hello.", "Be brief.", SamplingParams(n=1, max_tokens=8))])
        [verdict] = engine.score_choices([ChoiceRequest(VERDICT_PROMPT, ("A", "B"))])
    assert generation.error is None and len(generation.completions) == 1
    # the template's turn markers count: more prompt tokens than the bare text
    assert generation.tokens_in > 10
    assert verdict.error is None and verdict.method in ("top_logprobs", "logit_bias", "reask")
    assert sum(verdict.probs) == pytest.approx(1.0)


def test_a_wrong_key_is_a_clear_error_naming_the_pool(api_replica, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-not-the-key")
    config = parse_pool({"kind": "openai", "base_url": f"{api_replica.url}/v1", "model": SERVED,
                         "api_key_env": KEY_ENV, "route": "chat"})
    with config.open("vllm-hosted") as engine, pytest.raises(InferenceError) as raised:
        engine.generate([GenerateRequest("hi")])
    message = str(raised.value)
    assert "inference pool 'vllm-hosted'" in message and "http_401" in message and KEY_ENV in message
    assert "sk-not-the-key" not in message
