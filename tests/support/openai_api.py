"""A scripted OpenAI-compatible HTTP server on loopback, for fault injection in unit tests.

Test double only, never used outside tests: it answers ``/v1/chat/completions`` and
``/v1/completions`` from a table of next-token logprobs (so verdict math can be checked
against known values), checks a bearer key, and plays scripted faults (429/503 with
Retry-After, truncated bodies, slow answers). The real thing, ``vllm serve --api-key``,
is exercised in tests/integration/test_openai_pool_vllm.py.
"""

from __future__ import annotations

import json
import math
import threading

from tests.support.loopback import QuietHandler, serve

KEY = "sk-test-7c1d9a0e5b2f4e8d"
KEY_ENV = "PREFCURATE_TEST_OPENAI_KEY"


class StubAPI:
    """Scripted OpenAI-compatible server on 127.0.0.1 (test double; see the module docstring).

    ``next_token``: token text -> logprob of the first answer position (the full
    distribution; the server returns its top-k). ``bias_mode``: "post" reports logprobs
    after logit_bias (renormalised), "raw" before it (as vLLM's default raw_logprobs),
    always sampling the argmax after the bias. ``faults``: a list of callables
    ``(handler, body) -> bool`` consumed one per request; True means the fault answered.
    """

    def __init__(self):
        self.next_token = {"A": math.log(0.6), "B": math.log(0.3), "C": math.log(0.1)}
        self.reask_next_token = None
        self.token_ids = {"A": 10, "B": 11, "C": 12}
        self.bias_mode = "post"
        self.faults: list = []
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(QuietHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                with stub.lock:
                    stub.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                    fault = stub.faults.pop(0) if stub.faults else None
                if fault is not None and fault(self, body):
                    return
                if self.headers.get("Authorization") != f"Bearer {KEY}":
                    return self.send_json(401, {"error": {"message": "Incorrect API key provided"}})
                self.send_json(200, stub.answer(self.path, body))

        self.server, self.thread, root = serve(Handler)
        self.url = f"{root}/v1"

    def distribution(self, body: dict) -> tuple[list[tuple[str, float]], tuple[str, float]]:
        text = json.dumps(body.get("messages") or body.get("prompt"))
        table = self.reask_next_token if (self.reask_next_token and "Answer with exactly one of" in text) else self.next_token
        raw = dict(table)
        bias = {int(k): float(v) for k, v in (body.get("logit_bias") or {}).items()}
        by_id = {v: k for k, v in self.token_ids.items()}
        biased = {t: lp + bias.get(self.token_ids.get(t, -1), 0.0) for t, lp in raw.items()}
        for token_id, value in bias.items():  # a biased token the table lacks still exists
            biased.setdefault(by_id[token_id], -50.0 + value)
            raw.setdefault(by_id[token_id], -50.0)
        sampled = max(biased, key=biased.get)
        if self.bias_mode == "post" and bias:
            top = max(biased.values())
            norm = top + math.log(sum(math.exp(v - top) for v in biased.values()))
            reported = {t: v - norm for t, v in biased.items()}
        else:
            reported = raw
        k = body.get("top_logprobs") or body.get("logprobs")
        k = k if isinstance(k, int) and not isinstance(k, bool) else 0
        ranked = sorted(reported.items(), key=lambda item: -item[1])[:k]
        return ranked, (sampled, reported[sampled])

    def answer(self, path: str, body: dict) -> dict:
        n = body.get("n", 1)
        usage = {"prompt_tokens": 100, "completion_tokens": 7 * n, "total_tokens": 100 + 7 * n}
        wants_logprobs = body.get("logprobs")
        if path.endswith("/chat/completions"):
            if wants_logprobs:
                ranked, (token, logprob) = self.distribution(body)
                content = [{"token": token, "logprob": logprob,
                            "top_logprobs": [{"token": t, "logprob": v} for t, v in ranked]}]
                choice = {"index": 0, "message": {"role": "assistant", "content": token},
                          "logprobs": {"content": content}, "finish_reason": "length"}
                return {"choices": [choice], "usage": {**usage, "completion_tokens": 1}}
            choices = [{"index": i, "message": {"role": "assistant", "content": f"answer {i}"}, "finish_reason": "stop"}
                       for i in range(n)]
            return {"choices": choices, "usage": usage}
        if wants_logprobs:
            ranked, (token, logprob) = self.distribution(body)
            logprobs = {"tokens": [token], "token_logprobs": [logprob], "top_logprobs": [dict(ranked)]}
            return {"choices": [{"index": 0, "text": token, "logprobs": logprobs, "finish_reason": "length"}],
                    "usage": {**usage, "completion_tokens": 1}}
        return {"choices": [{"index": i, "text": f"completion {i}", "finish_reason": "length"} for i in range(n)],
                "usage": usage}

    def close(self):
        self.server.shutdown()
        self.server.server_close()
