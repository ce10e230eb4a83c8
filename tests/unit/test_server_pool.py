"""Routing, retry and failover logic of the server pool, against loopback fake replicas.

``FakeReplica`` is a test double: a tiny stdlib HTTP server on 127.0.0.1 speaking the
subset of vLLM's OpenAI API the pool uses, scripted to fail (500, malformed JSON, sleeps,
dropped connections). The real vLLM server is exercised in tests/integration.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
from prefcurate.schemas.tables import REQUEST_METRICS

from prefcurate.inference.base import (
    ChoiceRequest,
    GenerateRequest,
    InferenceError,
    SamplingParams,
)
from prefcurate.inference.pools import ServersPoolConfig, load_pools, open_engine
from prefcurate.inference.prompting import ChoicePlan, choice_plan, normalise_logprobs, plain_prompt
from prefcurate.inference.server_pool import ServerPool
from tests.support.loopback import QuietHandler, serve

REPO = Path(__file__).resolve().parents[2]


def fake_logprob(token_id: int) -> float:
    """The fake model's log-probability of a token (any context): distinct per id."""
    return -0.25 * (token_id % 11) - 0.1


class CharTokenizer:
    """Test double tokenizer: one token per character (its code point)."""

    def generate_ids(self, request):
        return self.prompt_ids(plain_prompt(request.prompt, request.system_prompt))

    def prompt_ids(self, text):
        return [ord(c) for c in text]

    def option_ids(self, option):
        return tuple(ord(c) for c in option)


class FakeReplica:
    """Loopback HTTP server (test double for one ``vllm serve`` replica).

    ``mode``: ok | error500 | malformed | slow | flaky (``fail_first`` 503s, then ok).
    ``delay_s`` sleeps before answering; ``kill()`` drops in-flight requests without a
    response and stops listening, as a crashed server does; ``die_at_in_flight=k`` kills
    the replica once k requests are in flight on it.
    """

    def __init__(
        self, mode="ok", delay_s=0.0, fail_first=0, max_model_len=64, chat_template=False, die_at_in_flight=0
    ):
        self.mode, self.delay_s, self.fail_first = mode, delay_s, fail_first
        self.die_at_in_flight = die_at_in_flight
        self.health_status = 200
        self.max_model_len, self.chat_template = max_model_len, chat_template
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.dead = threading.Event()
        replica = self

        class Handler(QuietHandler):
            def do_GET(self):
                if self.path == "/health" and not replica.dead.is_set():
                    self.send_bytes(replica.health_status, b"")
                else:
                    self.send_bytes(404, b"{}")

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                payload = json.loads(self.rfile.read(length))
                with replica.lock:
                    replica.requests.append(payload)
                    replica.in_flight += 1
                    replica.max_in_flight = max(replica.max_in_flight, replica.in_flight)
                    index = len(replica.requests)
                    if replica.die_at_in_flight and replica.in_flight >= replica.die_at_in_flight:
                        threading.Thread(target=replica.kill).start()
                try:
                    status, body = replica.answer(self.path, payload, index)
                    if replica.dead.is_set():
                        self.close_connection = True
                        self.connection.shutdown(2)  # no response: the server "crashed"
                        return
                    self.send_bytes(status, body)
                finally:
                    with replica.lock:
                        replica.in_flight -= 1

        self.server, self.thread, self.url = serve(Handler)

    def answer(self, path, payload, index):
        deadline = time.monotonic() + self.delay_s
        while time.monotonic() < deadline and not self.dead.is_set():
            time.sleep(0.01)
        if self.mode == "error500":
            return 500, b'{"error": {"message": "engine exploded"}}'
        if self.mode == "malformed":
            return 200, b'{"choices": [ this is not json'
        if self.mode == "flaky" and index <= self.fail_first:
            return 503, b'{"error": {"message": "warming up"}}'
        if path == "/tokenize":
            if "messages" in payload:
                if not self.chat_template:
                    return 400, b'{"error": {"message": "this model has no chat template"}}'
                text = "<chat>" + "|".join(m["content"] for m in payload["messages"])
            else:
                text = payload["prompt"]
            return 200, json.dumps({"tokens": [ord(c) for c in text]}).encode()
        prompt = payload["prompt"]
        if len(prompt) >= self.max_model_len:
            message = (
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, your prompt contains {len(prompt)} input tokens"
            )
            return 400, json.dumps({"error": {"message": message}}).encode()
        if "logprob_token_ids" in payload:
            top = {f"token_id:{t}": fake_logprob(t) for t in payload["logprob_token_ids"]}
            choice = {"index": 0, "text": "x", "logprobs": {"top_logprobs": [top]}, "finish_reason": "length"}
            return 200, json.dumps({"choices": [choice], "usage": {"prompt_tokens": len(prompt)}}).encode()
        if payload.get("prompt_logprobs") is not None:
            rows = [None] + [{str(t): {"logprob": fake_logprob(t), "rank": 1}} for t in prompt[1:]]
            choice = {"index": 0, "text": "x", "prompt_logprobs": rows, "finish_reason": "length"}
            return 200, json.dumps({"choices": [choice], "usage": {"prompt_tokens": len(prompt)}}).encode()
        n, max_tokens = payload.get("n", 1), payload["max_tokens"]
        text = "".join(chr(t) for t in prompt)
        choices = [
            {"index": i, "text": f"{text}#{i}", "finish_reason": "length", "token_ids": list(range(max_tokens))}
            for i in reversed(range(n))  # out of order on purpose: the pool sorts by index
        ]
        usage = {"prompt_tokens": len(prompt), "completion_tokens": n * max_tokens}
        return 200, json.dumps({"choices": choices, "usage": usage}).encode()

    def kill(self):
        self.dead.set()
        self.server.shutdown()
        self.server.server_close()

    def close(self):
        if not self.dead.is_set():
            self.kill()


@pytest.fixture
def replicas():
    started: list[FakeReplica] = []

    def make(*args, **kwargs):
        replica = FakeReplica(*args, **kwargs)
        started.append(replica)
        return replica

    yield make
    for replica in started:
        replica.close()


def make_pool(replicas, tokenizer=CharTokenizer(), **kwargs):
    defaults = dict(
        name="test-pool",
        urls=[r.url for r in replicas],
        model="fake",
        tokenizer=tokenizer,
        max_concurrency_per_replica=4,
        timeout_s=2.0,
        retries=2,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        health_interval_s=0.2,
        seed=0,
    )
    defaults.update(kwargs)
    return ServerPool(**defaults)


def gen(prompt, n=1, max_tokens=3):
    return GenerateRequest(prompt, params=SamplingParams(n=n, max_tokens=max_tokens))


def test_generate_returns_every_result_in_order_with_metrics(replicas):
    a, b = replicas(), replicas()
    with make_pool([a, b]) as pool:
        out = pool.generate([gen(f"p{i}", n=2) for i in range(10)] + [GenerateRequest("q", "sys")])
        rows = pool.drain_metrics()
    assert [g.completions[0].text for g in out[:10]] == [plain_prompt(f"p{i}", None) + "#0" for i in range(10)]
    assert [c.text for c in out[0].completions] == [plain_prompt("p0", None) + "#0", plain_prompt("p0", None) + "#1"]
    assert out[10].completions[0].text == plain_prompt("q", "sys") + "#0"  # plain format, system prepended
    assert all(g.error is None and g.tokens_in > 0 and g.latency_s > 0 for g in out)
    assert out[0].completions[0].tokens_out == 3 and out[0].completions[0].finish_reason == "length"
    assert len(a.requests) + len(b.requests) == 11 and a.requests and b.requests
    assert len(rows) == 11 and all(r["ok"] and r["attempts"] == 1 for r in rows)
    assert rows[0]["tokens_out"] == 6 and rows[0]["pool"] == "test-pool"
    metric_fields = [f for f in REQUEST_METRICS if f.name in rows[0]]
    assert len(metric_fields) == len(rows[0])
    pa.Table.from_pylist(rows, schema=pa.schema(metric_fields))  # types match the store's


def test_least_outstanding_routing_and_concurrency_cap(replicas):
    slow, fast = replicas(delay_s=0.3), replicas(delay_s=0.01)
    with make_pool([slow, fast], max_concurrency_per_replica=3) as pool:
        out = pool.generate([gen(f"p{i}") for i in range(30)])
    assert all(g.error is None for g in out)
    assert slow.max_in_flight <= 3 and fast.max_in_flight <= 3
    # the fast replica frees its slots sooner, so it takes most of the batch
    assert len(fast.requests) > 2 * len(slow.requests)


def test_5xx_on_one_replica_is_retried_elsewhere(replicas):
    broken, good = replicas(mode="error500"), replicas()
    with make_pool([broken, good]) as pool:
        out = pool.generate([gen(f"p{i}") for i in range(12)])
        rows = pool.drain_metrics()
    assert all(g.error is None and g.replica == good.url for g in out)
    assert any(r["attempts"] > 1 for r in rows) and broken.requests



def test_a_retry_waits_for_the_busy_good_replica_rather_than_going_back_to_the_failing_one(replicas):
    broken, busy = replicas(mode="error500"), replicas(delay_s=0.15)
    with make_pool([broken, busy], max_concurrency_per_replica=1, retries=1) as pool:
        out = pool.generate([gen(f"p{i}") for i in range(4)])
    # one retry each: every failed first attempt on the broken replica is retried on the good one
    assert all(g.error is None and g.replica == busy.url for g in out)
    assert len(broken.requests) <= 4 and len(busy.requests) == 4


def test_5xx_everywhere_is_recorded_as_failed_after_retries(replicas):
    a, b = replicas(mode="error500"), replicas(mode="error500")
    with make_pool([a, b], retries=2) as pool:
        out = pool.generate([gen("p0"), gen("p1")])
        rows = pool.drain_metrics()
    assert all(g.error.startswith("http_500: engine exploded") and g.completions == [] for g in out)
    assert [r["attempts"] for r in rows] == [3, 3] and not any(r["ok"] for r in rows)
    assert len(a.requests) + len(b.requests) == 6


def test_malformed_json_is_retried_then_recorded(replicas):
    bad = replicas(mode="malformed")
    with make_pool([bad], retries=1) as pool:
        out = pool.generate([gen("p")])
        rows = pool.drain_metrics()
    assert out[0].error.startswith("malformed_response")
    assert rows[0]["attempts"] == 2 and len(bad.requests) == 2


def test_timeout_is_retried_then_recorded(replicas):
    hung = replicas(delay_s=1.0)
    with make_pool([hung], timeout_s=0.2, retries=1) as pool:
        out = pool.generate([gen("p")])
    assert out[0].error.startswith("timeout")


def test_transient_503_then_success(replicas):
    flaky = replicas(mode="flaky", fail_first=1)
    with make_pool([flaky]) as pool:
        out = pool.generate([gen("p")])
        rows = pool.drain_metrics()
    assert out[0].error is None and rows[0]["attempts"] == 2


def test_too_long_prompt_fails_alone_without_retry(replicas):
    a = replicas(max_model_len=50)
    with make_pool([a]) as pool:
        out = pool.generate([gen("x" * 60), gen("short")])
        rows = pool.drain_metrics()
    assert out[0].error.startswith("http_400") and "maximum context length" in out[0].error
    assert out[1].error is None
    failed = [r for r in rows if not r["ok"]]
    assert len(failed) == 1 and failed[0]["attempts"] == 1 and failed[0]["error"] == out[0].error


def test_client_side_context_check_when_max_model_len_known(replicas):
    a = replicas()
    with make_pool([a], max_model_len=32) as pool:
        out = pool.generate([gen("x" * 40), gen("ok")])
    assert out[0].error.startswith("prompt_too_long") and out[1].error is None
    assert len(a.requests) == 1  # the long one never left the client


def test_replica_dying_mid_batch_loses_and_duplicates_nothing(replicas):
    doomed, survivor = replicas(delay_s=0.5, die_at_in_flight=3), replicas(delay_s=0.05)
    with make_pool([doomed, survivor], max_concurrency_per_replica=4, retries=3) as pool:
        out = pool.generate([gen(f"p{i}") for i in range(24)])
        rows = pool.drain_metrics()
        health = pool.check_health()
    assert [g.completions[0].text for g in out] == [plain_prompt(f"p{i}", None) + "#0" for i in range(24)]
    assert all(g.error is None and g.replica == survivor.url for g in out)
    assert len(doomed.requests) >= 3  # it had work in flight when it died
    assert sum(r["attempts"] > 1 for r in rows) >= 1 and len(rows) == 24
    assert health == {doomed.url: False, survivor.url: True}


def test_slow_or_failing_health_marks_down_only_after_repeated_probes(replicas):
    busy, other = replicas(), replicas()
    with make_pool([busy, other], health_interval_s=60) as pool:
        pool.generate([gen("warm")])
        busy.health_status = 503
        assert [pool.check_health()[busy.url] for _ in range(3)] == [True, True, False]
        out = pool.generate([gen(f"p{i}") for i in range(6)])
        assert {g.replica for g in out} == {other.url}  # down: no traffic
        busy.health_status = 200
        assert pool.check_health()[busy.url] is True


def test_all_replicas_down_raises_naming_the_pool(replicas):
    a, b = replicas(), replicas()
    a.kill()
    b.kill()
    with make_pool([a, b], name="judges") as pool:
        with pytest.raises(InferenceError, match="'judges'.*all 2 replicas are down"):
            pool.generate([gen("p")])


def test_all_replicas_dying_mid_batch_raises(replicas):
    a = replicas(delay_s=0.3, die_at_in_flight=2)
    with make_pool([a], name="gen-pool") as pool, pytest.raises(InferenceError, match="gen-pool"):
        pool.generate([gen(f"p{i}") for i in range(8)])


def test_score_choices_first_token_plan(replicas):
    a = replicas()
    with make_pool([a]) as pool:
        out = pool.score_choices([ChoiceRequest("Which? ", ("A", "B")), ChoiceRequest("Rate: ", tuple("12345"))])
        rows = pool.drain_metrics()
    expected = normalise_logprobs([fake_logprob(ord("A")), fake_logprob(ord("B"))])
    assert out[0].probs == pytest.approx(expected)
    assert sum(out[1].probs) == pytest.approx(1.0) and len(out[1].probs) == 5
    # the two requests go out concurrently: they may arrive in either order
    by_options = {len(r["logprob_token_ids"]): r for r in a.requests}
    assert by_options[2]["logprob_token_ids"] == [ord("A"), ord("B")]
    assert by_options[5]["logprob_token_ids"] == [ord(c) for c in "12345"]
    assert all(r["max_tokens"] == 1 for r in a.requests)
    assert all(r["kind"] == "score_choices" and r["ok"] for r in rows)


def test_score_choices_shared_prefix_then_one_token_is_one_decode(replicas):
    a = replicas()
    with make_pool([a]) as pool:
        (score,) = pool.score_choices([ChoiceRequest("Q:", (" 1", " 2", " 3"))])
    # the shared " " cancels: the options differ by their last token only
    assert score.probs == pytest.approx(normalise_logprobs([fake_logprob(ord(d)) for d in "123"]))
    assert len(a.requests) == 1 and a.requests[0]["prompt"] == [ord(c) for c in "Q: "]


def test_score_choices_multi_token_options_use_sequence_logprobs(replicas):
    a = replicas()
    with make_pool([a]) as pool:
        (score,) = pool.score_choices([ChoiceRequest("Q: ", ("yes", "no"))])
    seq = lambda s: sum(fake_logprob(ord(c)) for c in s)
    assert score.probs == pytest.approx(normalise_logprobs([seq("yes"), seq("no")]))
    assert sorted(len(r["prompt"]) for r in a.requests) == [5, 6]  # prompt + each option


def test_score_choices_failure_is_per_request(replicas):
    a = replicas(max_model_len=40)
    with make_pool([a]) as pool:
        out = pool.score_choices([ChoiceRequest("x" * 50, ("A", "B")), ChoiceRequest("ok ", ("A", "B"))])
    assert out[0].error.startswith("http_400") and out[0].probs == ()
    assert out[1].error is None and sum(out[1].probs) == pytest.approx(1.0)


def test_server_side_tokenization_without_local_tokenizer(replicas):
    a = replicas()
    with make_pool([a], tokenizer=None) as pool:
        out = pool.generate([GenerateRequest("hi", "sys")])
        (score,) = pool.score_choices([ChoiceRequest("Q ", ("A", "B"))])
    assert out[0].completions[0].text == plain_prompt("hi", "sys") + "#0"  # no chat template: plain format
    assert score.probs == pytest.approx(normalise_logprobs([fake_logprob(65), fake_logprob(66)]))


def test_server_side_chat_template_when_the_server_has_one(replicas):
    a = replicas(chat_template=True)
    with make_pool([a], tokenizer=None) as pool:
        out = pool.generate([GenerateRequest("hi", "sys")])
    assert out[0].completions[0].text == "<chat>sys|hi#0"


def test_sync_api_works_inside_a_running_event_loop(replicas):
    import asyncio

    a = replicas()
    with make_pool([a]) as pool:

        async def caller():
            sync = pool.generate([gen("s")])  # a stage calling the sync API from async code
            asynchronous = await pool.agenerate([gen("a")])
            return sync[0].completions[0].text, asynchronous[0].completions[0].text

        assert asyncio.run(caller()) == (plain_prompt("s", None) + "#0", plain_prompt("a", None) + "#0")


def test_backoff_is_full_jitter_below_the_cap(replicas):
    pool = make_pool([replicas()], backoff_base_s=0.5, backoff_max_s=4.0)
    waits = [pool._backoff(attempt) for attempt in range(1, 8) for _ in range(50)]
    assert min(waits) >= 0 and max(waits) <= 4.0
    assert max(pool._backoff(1) for _ in range(200)) <= 0.5
    pool.close()


def test_choice_plan_and_normalisation():
    assert choice_plan([(1,), (2,)]) == ChoicePlan("first_token", (), (1, 2))
    assert choice_plan([(9, 1), (9, 2), (9, 3)]) == ChoicePlan("first_token", (9,), (1, 2, 3))
    assert choice_plan([(1,), (1,)]).kind == "sequence"  # identical options
    assert choice_plan([(1, 2), (3,)]).kind == "sequence"
    assert choice_plan([(1,), (1, 2)]).kind == "sequence"  # one is a prefix of the other
    probs = normalise_logprobs([math.log(0.2), math.log(0.6)])
    assert probs == pytest.approx((0.25, 0.75))
    assert normalise_logprobs([-1e4, 0.0]) == pytest.approx((0.0, 1.0))
    with pytest.raises(ValueError):
        normalise_logprobs([-math.inf, -math.inf])


def test_engine_config_and_factory(replicas):
    with pytest.raises(ValueError, match="needs at least one url"):
        ServersPoolConfig()
    with pytest.raises(ValueError):
        ServersPoolConfig(urls=["http://x"], bogus=1)
    a = replicas()
    engine = open_engine("cpu", {"kind": "servers", "urls": [a.url], "tokenizer": None, "model": "/nonexistent/m"})
    try:
        assert isinstance(engine, ServerPool) and engine.model == "m" and engine.name == "cpu"
        assert engine.generate([gen("z")])[0].completions[0].text == plain_prompt("z", None) + "#0"
    finally:
        engine.close()


def test_example_pool_definitions_validate():
    for path in sorted((REPO / "infra" / "vllm").glob("pools*.yaml")):
        pools = load_pools(path)
        assert pools, path
    gpu = load_pools(REPO / "infra" / "vllm" / "pools.gpu.yaml")
    assert any(c.kind == "servers" and c.launch and c.launch.device == "cuda" for c in gpu.values())


def _launcher():
    spec = importlib.util.spec_from_file_location("vllm_launch", REPO / "infra" / "vllm" / "launch.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_launcher_command_lines(tmp_path):
    launch = _launcher()
    cpu = launch.replica_commands(launch.LaunchSpec(model=str(tmp_path), device="cpu", replicas=2, base_port=9100))
    (port0, _, argv0, env0), (port1, _, argv1, env1) = cpu
    assert (port0, port1) == (9100, 9101)
    assert argv0[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "--enforce-eager" in argv0 and argv0[argv0.index("--dtype") + 1] == "float32"
    assert env0["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env0["VLLM_CPU_OMP_THREADS_BIND"] != env1["VLLM_CPU_OMP_THREADS_BIND"] or len(launch._cpus()) < 2
    gpu = launch.replica_commands(launch.LaunchSpec(model=str(tmp_path), device="cuda", replicas=2, gpus=[2, 5]))
    assert [env["CUDA_VISIBLE_DEVICES"] for _, _, _, env in gpu] == ["2", "5"]
    assert "--enforce-eager" not in gpu[0][2]


def test_cpu_replicas_use_the_engines_block_size_unless_told(tmp_path):
    from prefcurate.inference.vllm_engine import CPU_BLOCK_SIZE

    launch = _launcher()

    def block_sizes(**spec):
        argv = launch.replica_commands(launch.LaunchSpec(model=str(tmp_path), base_port=9100, **spec))[0][2]
        return [argv[i + 1] for i, arg in enumerate(argv) if arg == "--block-size"]

    assert block_sizes(device="cpu") == [str(CPU_BLOCK_SIZE)] == [str(launch.CPU_BLOCK_SIZE)]
    assert block_sizes(device="cpu", block_size=64) == ["64"]
    assert block_sizes(device="cpu", extra_args=["--block-size", "128"]) == ["128"]
    assert block_sizes(device="cuda", gpus=[0]) == []
    assert block_sizes(device="cuda", gpus=[0], block_size=16) == ["16"]


def test_a_single_cpu_replica_on_a_small_machine_gets_every_core(tmp_path, monkeypatch):
    from prefcurate.inference.vllm_engine import cpu_engine_env

    launch = _launcher()
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    spec = launch.LaunchSpec(model=str(tmp_path), device="cpu", replicas=1, base_port=9100)
    monkeypatch.setattr(launch, "_cpus", lambda: [0, 1])
    [(_, _, _, small)] = launch.replica_commands(spec)
    assert small["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0" == cpu_engine_env(2)["VLLM_CPU_NUM_OF_RESERVED_CPU"]
    monkeypatch.setattr(launch, "_cpus", lambda: list(range(16)))
    [(_, _, _, large)] = launch.replica_commands(spec)
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in large and cpu_engine_env(16) == {}
    # the user's setting wins
    monkeypatch.setattr(launch, "_cpus", lambda: [0, 1])
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    [(_, _, _, chosen)] = launch.replica_commands(spec)
    assert chosen["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"


def test_launcher_spec_from_pool_definition():
    launch = _launcher()
    spec = launch.spec_from_pools(REPO / "infra" / "vllm" / "pools.cpu.yaml", "cpu")
    assert spec.device == "cpu" and spec.replicas >= 1 and spec.max_model_len
