"""A pool of OpenAI-compatible ``vllm serve`` replicas behind one :class:`Engine`.

Routing: each request goes to the healthy replica with the fewest outstanding requests
(ties broken at random), never above ``max_concurrency_per_replica`` in flight on one
replica. Every engine request is one HTTP request (``/v1/completions`` with token-id
prompts), so a failure touches one request only and the server still batches the
concurrent ones itself (continuous batching).

Faults, per request:

- connection refused/reset (a replica died): the replica is marked down at once and the
  request is retried on another replica without waiting; a background probe of
  ``GET /health`` brings it back when it answers again.
- HTTP 5xx/429, a timeout, or a body that is not the JSON we expect: retried up to
  ``retries`` times with exponential backoff and full jitter (``uniform(0, min(cap,
  base * 2**k))``, the AWS-architecture-blog variant), on another healthy replica when
  there is one (waiting for a free slot there rather than going back to the failing one).
- HTTP 4xx (e.g. a prompt longer than the context): not retried.
- a request that still fails is returned with ``error`` set (reason code first:
  ``http_400: ...``, ``timeout: ...``, ``malformed_response: ...``); the batch goes on.
- every replica down (after a fresh health probe): :class:`InferenceError` naming the pool,
  and the rest of the batch is cancelled.

Each result is written once, by the attempt that succeeded, so a request retried after a
replica died is neither lost nor duplicated. Every finished request leaves one metrics
row (the ``request_metrics`` table's columns); :meth:`ServerPool.drain_metrics` hands them
over. ``latency_s`` runs from the first attempt's start (after waiting for a free slot) to
the answer, retries and backoff included.

Position-free scoring (:mod:`prefcurate.inference.scoring`): ``score_rewards`` posts each
(prompt, response) to ``/classify`` (``use_activation: false``: the raw score) of a server
started on vLLM's pooling runner (``--runner pooling``, or a ``*ForSequenceClassification``
checkpoint, which vLLM serves on it by default); ``continuation_logprobs`` posts
``context + continuation`` ids to ``/v1/completions`` with ``prompt_logprobs: 0`` and
``max_tokens: 1``. :meth:`ServerPool.check_serves` asks one replica with a one-token
request whether a route is there: a generative server has no ``/classify`` and a pooling
server no ``/v1/completions`` (HTTP 404), and a judge mode calls it before any work.

The client is async (httpx) and runs on a private event-loop thread, so the synchronous
:class:`Engine` methods can be called from any thread, including one that already runs an
event loop; ``agenerate``/``ascore_choices`` serve async callers.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

import httpx

from prefcurate.inference import http_common
from prefcurate.inference.base import (
    ChoiceRequest,
    ChoiceScore,
    Completion,
    GenerateRequest,
    Generation,
    InferenceError,
)
from prefcurate.inference.prompting import (
    LocalPromptTokenizer,
    chat_messages,
    choice_plan,
    normalise_logprobs,
    plain_prompt,
)
from prefcurate.inference.scoring import (
    ContinuationLogprob,
    ContinuationRequest,
    PoolCapabilityError,
    RewardRequest,
    RewardScore,
    continuation_ids,
    reward_text,
)

T = TypeVar("T")

_RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
_SOFT_PROBE_FAILURES = 3


class _Retryable(Exception):
    """Worth another attempt (5xx, timeout, malformed body)."""


class _Unreachable(_Retryable):
    """The replica did not answer at the connection level: mark it down, fail over."""


class _Fatal(Exception):
    """The request itself is bad (4xx): another attempt would fail the same way."""


class RequestFailed(Exception):
    def __init__(self, reason: str, replica: str, attempts: int):
        super().__init__(reason)
        self.reason, self.replica, self.attempts = reason, replica, attempts


@dataclass
class Replica:
    url: str
    cap: int
    outstanding: int = 0
    healthy: bool | None = None  # None: not probed yet
    probe_failures: int = 0
    last_error: str | None = None
    served: int = 0
    max_outstanding_seen: int = 0


@dataclass
class _Outcome:
    body: dict
    replica: str
    attempts: int


@dataclass
class ServerPool:
    """See the module docstring. ``tokenizer`` None: tokenize on the servers (/tokenize)."""

    name: str
    urls: Sequence[str]
    model: str
    tokenizer: LocalPromptTokenizer | None = None
    max_concurrency_per_replica: int = 8
    timeout_s: float = 120.0
    connect_timeout_s: float = 5.0
    retries: int = 3
    backoff_base_s: float = 0.5
    backoff_max_s: float = 10.0
    health_interval_s: float = 5.0
    health_timeout_s: float = 5.0
    max_model_len: int | None = None
    #: merged into every generate request body (e.g. {"ignore_eos": True} for benchmarks)
    extra_sampling: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError(f"pool {self.name!r} has no replica urls")
        self.replicas = [Replica(u.rstrip("/"), self.max_concurrency_per_replica) for u in self.urls]
        self._metrics = http_common.MetricRows()
        self._rng = random.Random(self.seed)
        self._loop = http_common.LoopThread(self.name, f"prefcurate-pool-{self.name}")
        self._client: httpx.AsyncClient | None = None
        self._cond: asyncio.Condition | None = None
        self._health_task: asyncio.Task | None = None
        self._probe_lock: asyncio.Lock | None = None
        self._remote_option_ids: dict[str, tuple[int, ...]] = {}
        self._remote_chat_template: bool | None = None

    # ------------------------------------------------------------------ sync Engine API
    def generate(self, requests: Sequence[GenerateRequest]) -> list[Generation]:
        return self._run(self._generate_all(list(requests)))

    def score_choices(self, requests: Sequence[ChoiceRequest]) -> list[ChoiceScore]:
        return self._run(self._score_all(list(requests)))

    def score_rewards(self, requests: Sequence[RewardRequest]) -> list[RewardScore]:
        return self._run(self._run_batch(list(requests), lambda _, request: self._reward_one(request)))

    def continuation_logprobs(self, requests: Sequence[ContinuationRequest]) -> list[ContinuationLogprob]:
        return self._run(self._run_batch(list(requests), lambda _, request: self._continuation_one(request)))

    def check_serves(self, task: str, what: str = "this judge") -> None:
        """Raise :class:`PoolCapabilityError` naming the pool unless its servers answer the
        route ``task`` needs ("classify": ``/classify``; "generate": ``/v1/completions``)."""
        path = {"classify": "/classify", "generate": "/v1/completions"}[task]
        self._run(self._check_route(path, what))

    def check_health(self) -> dict[str, bool]:
        """Probe every replica now; url -> healthy."""
        return self._run(self._probe_all())

    def drain_metrics(self) -> list[dict]:
        """Per-request rows (REQUEST_METRICS columns) since the last drain."""
        return self._metrics.drain()

    def close(self) -> None:
        self._loop.close(self._shutdown)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- async API
    async def agenerate(self, requests: Sequence[GenerateRequest]) -> list[Generation]:
        return await asyncio.wrap_future(self._submit(self._generate_all(list(requests))))

    async def ascore_choices(self, requests: Sequence[ChoiceRequest]) -> list[ChoiceScore]:
        return await asyncio.wrap_future(self._submit(self._score_all(list(requests))))

    # ----------------------------------------------------------------- loop plumbing
    def _submit(self, coro: Awaitable[T]):
        return self._loop.submit(coro)

    def _run(self, coro: Awaitable[T]) -> T:
        return self._submit(coro).result()

    async def _start(self) -> None:
        if self._client is not None:
            return
        total = self.max_concurrency_per_replica * len(self.replicas)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
            limits=httpx.Limits(max_connections=total + len(self.replicas), max_keepalive_connections=total),
        )
        self._cond = asyncio.Condition()
        self._probe_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(total)
        await self._probe_all()
        self._health_task = asyncio.create_task(self._health_loop())

    async def _shutdown(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        if self._client is not None:
            await self._client.aclose()

    # ----------------------------------------------------------------- health
    async def _probe(self, replica: Replica) -> bool:
        """One /health probe. Refused connections mark the replica down at once; a slow
        or failing answer only after ``_SOFT_PROBE_FAILURES`` in a row, because a busy
        CPU server can answer /health late while it is still making progress."""
        try:
            response = await self._client.get(f"{replica.url}/health", timeout=self.health_timeout_s)
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            replica.healthy, replica.probe_failures = False, replica.probe_failures + 1
            replica.last_error = f"health {type(error).__name__}: {error}"
            return False
        except httpx.HTTPError as error:
            reason = f"health {type(error).__name__}: {error}"
        else:
            if response.status_code == 200:
                replica.healthy, replica.probe_failures = True, 0
                return True
            reason = f"health http_{response.status_code}"
        replica.probe_failures += 1
        replica.last_error = reason
        if replica.healthy is None or replica.probe_failures >= _SOFT_PROBE_FAILURES:
            replica.healthy = False
        return bool(replica.healthy)

    async def _probe_all(self) -> dict[str, bool]:
        if self._client is None:
            await self._start()
            return {r.url: bool(r.healthy) for r in self.replicas}
        async with self._probe_lock:
            results = await asyncio.gather(*(self._probe(r) for r in self.replicas))
        async with self._cond:
            self._cond.notify_all()
        return {r.url: ok for r, ok in zip(self.replicas, results)}

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self._probe_all()
            except Exception:  # a probe must never kill the loop
                pass

    def _mark_down(self, replica: Replica, reason: str) -> None:
        replica.healthy = False
        replica.last_error = reason

    def _all_down_error(self) -> InferenceError:
        detail = "; ".join(f"{r.url}: {r.last_error or 'unhealthy'}" for r in self.replicas)
        return InferenceError(
            f"inference pool {self.name!r}: all {len(self.replicas)} replicas are down ({detail})"
        )

    # ----------------------------------------------------------------- routing
    async def _acquire(self, avoid: Replica | None) -> Replica:
        async with self._cond:
            while True:
                healthy = [r for r in self.replicas if r.healthy]
                if not healthy:
                    break
                free = [r for r in healthy if r.outstanding < r.cap]
                if avoid is not None and any(r is not avoid for r in healthy):
                    # a retry waits for another healthy replica, busy or not: going straight
                    # back to the one that just failed spent the retries on it under load
                    free = [r for r in free if r is not avoid]
                if free:
                    fewest = min(r.outstanding for r in free)
                    replica = self._rng.choice([r for r in free if r.outstanding == fewest])
                    replica.outstanding += 1
                    replica.max_outstanding_seen = max(replica.max_outstanding_seen, replica.outstanding)
                    return replica
                try:
                    await asyncio.wait_for(self._cond.wait(), timeout=self.health_interval_s)
                except TimeoutError:
                    pass
        # every replica is marked down: probe once more before giving up on the pool
        if any((await self._probe_all()).values()):
            return await self._acquire(avoid)
        raise self._all_down_error()

    async def _release(self, replica: Replica) -> None:
        async with self._cond:
            replica.outstanding -= 1
            self._cond.notify_all()

    def _backoff(self, attempt: int) -> float:
        return self._rng.uniform(0.0, min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1)))

    async def _post(self, path: str, payload: dict, parse: Callable[[dict], Any] = lambda b: b) -> _Outcome:
        """POST with routing, retries, backoff and failover; raises RequestFailed.

        ``parse`` turns the JSON body into the result; a body it rejects (raising
        _Retryable) counts as a failed attempt like a 5xx.
        """
        attempts, avoid, reason, last_url = 0, None, "not attempted", ""
        while attempts <= self.retries:
            replica = await self._acquire(avoid)
            attempts += 1
            last_url = replica.url
            try:
                body = parse(await self._post_once(replica, path, payload))
                replica.served += 1
                return _Outcome(body, replica.url, attempts)
            except _Fatal as error:
                raise RequestFailed(str(error), replica.url, attempts) from None
            except _Unreachable as error:
                reason, avoid = str(error), replica
                self._mark_down(replica, reason)
                failover = any(r.healthy for r in self.replicas)
            except _Retryable as error:
                reason, avoid, failover = str(error), replica, False
            finally:
                await self._release(replica)
            if attempts <= self.retries and not failover:
                await asyncio.sleep(self._backoff(attempts))
        raise RequestFailed(reason, last_url, attempts)

    async def _post_once(self, replica: Replica, path: str, payload: dict) -> dict:
        try:
            response = await self._client.post(f"{replica.url}{path}", json=payload)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as error:
            raise _Unreachable(f"unreachable: {type(error).__name__}: {error}") from None
        except httpx.TimeoutException as error:
            raise _Retryable(f"timeout: {type(error).__name__} after {self.timeout_s:g} s") from None
        except httpx.HTTPError as error:
            raise _Retryable(f"transport: {type(error).__name__}: {error}") from None
        if response.status_code != 200:
            message = http_common.error_message(response)
            reason = f"http_{response.status_code}: {message}"
            if response.status_code in _RETRYABLE_STATUS or response.status_code >= 500:
                raise _Retryable(reason)
            raise _Fatal(reason)
        try:
            return http_common.json_object(response)
        except http_common.MalformedAnswer as error:
            raise _Retryable(str(error)) from None

    async def _run_batch(self, items: Sequence[T], one: Callable[[int, T], Awaitable[Any]]) -> list:
        await self._start()
        results: list = [None] * len(items)

        async def bounded(index: int, item: T) -> None:
            async with self._slots:
                results[index] = await one(index, item)

        try:
            async with asyncio.TaskGroup() as group:
                for index, item in enumerate(items):
                    group.create_task(bounded(index, item))
        except* InferenceError as errors:
            raise errors.exceptions[0] from None
        return results

    # ----------------------------------------------------------------- generate
    async def _generate_all(self, requests: list[GenerateRequest]) -> list[Generation]:
        return await self._run_batch(requests, lambda _, request: self._generate_one(request))

    async def _generate_one(self, request: GenerateRequest) -> Generation:
        started = time.perf_counter()
        try:
            prompt = await self._generate_prompt(request)
        except RequestFailed as failure:
            return self._failed_generation(failure, started)
        params = request.params
        payload = {
            "model": self.model,
            "prompt": prompt,
            "n": params.n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
            "return_token_ids": True,
            **self.extra_sampling,
        }
        if params.stop:
            payload["stop"] = list(params.stop)
        if params.seed is not None:
            payload["seed"] = params.seed
        if error := self._too_long(prompt):
            return self._failed_generation(RequestFailed(error, "", 0), started)
        try:
            outcome = await self._post(
                "/v1/completions", payload, lambda body: _parse_generation(body, params.n)
            )
        except RequestFailed as failure:
            return self._failed_generation(failure, started)
        generation = outcome.body
        latency = time.perf_counter() - started
        tokens_out = sum(c.tokens_out for c in generation.completions)
        self._record("generate", outcome.replica, True, outcome.attempts, generation.tokens_in, tokens_out, latency, None)
        return Generation(generation.completions, generation.tokens_in, latency, None, outcome.replica)

    def _failed_generation(self, failure: RequestFailed, started: float) -> Generation:
        latency = time.perf_counter() - started
        self._record("generate", failure.replica, False, failure.attempts, None, None, latency, failure.reason)
        return Generation([], 0, latency, failure.reason, failure.replica or None)

    def _too_long(self, prompt) -> str | None:
        if self.max_model_len and isinstance(prompt, list) and len(prompt) >= self.max_model_len:
            return (
                f"prompt_too_long: {len(prompt)} prompt tokens, the context holds "
                f"{self.max_model_len} (prompt + at least 1 output token)"
            )
        return None

    # ----------------------------------------------------------------- score_choices
    async def _score_all(self, requests: list[ChoiceRequest]) -> list[ChoiceScore]:
        return await self._run_batch(requests, lambda _, request: self._score_one(request))

    async def _score_one(self, request: ChoiceRequest) -> ChoiceScore:
        started = time.perf_counter()
        prompt_ids: list[int] = []
        try:
            if not request.options:
                raise RequestFailed("no_options: a choice request needs at least one option", "", 0)
            prompt_ids = await self._prompt_ids(request.prompt)
            option_ids = [await self._option_ids(option) for option in request.options]
            if error := self._too_long(prompt_ids + list(max(option_ids, key=len))[:-1]):
                raise RequestFailed(error, "", 0)
            plan = choice_plan(option_ids)
            if plan.kind == "first_token":
                wanted = list(plan.next_ids)
                payload = {
                    "model": self.model, "prompt": prompt_ids + list(plan.shared), "max_tokens": 1, "temperature": 0.0,
                    "logprobs": len(wanted), "logprob_token_ids": wanted,
                    "return_tokens_as_token_ids": True,
                }  # fmt: skip
                outcome = await self._post(
                    "/v1/completions", payload, lambda body: _first_token_logprobs(body, wanted)
                )
                outcomes, logprobs = [outcome], outcome.body
            else:
                outcomes = await asyncio.gather(*(self._score_continuation(prompt_ids, ids) for ids in option_ids))
                logprobs = [o.body for o in outcomes]
            attempts = sum(o.attempts for o in outcomes)
            replica = ",".join(sorted({o.replica for o in outcomes}))
            probs = normalise_logprobs(logprobs)
        except RequestFailed as failure:
            latency = time.perf_counter() - started
            tokens_in = len(prompt_ids) or None
            self._record("score_choices", failure.replica, False, failure.attempts, tokens_in, None, latency, failure.reason)
            return ChoiceScore((), latency, failure.reason, failure.replica or None)
        except ValueError as error:  # no option with a finite probability
            latency = time.perf_counter() - started
            reason = f"no_probability: {error}"
            self._record("score_choices", replica, False, attempts, len(prompt_ids), None, latency, reason)
            return ChoiceScore((), latency, reason, replica or None)
        latency = time.perf_counter() - started
        self._record("score_choices", replica, True, attempts, len(prompt_ids), 1, latency, None)
        return ChoiceScore(probs, latency, None, replica)

    async def _score_continuation(self, prompt_ids: list[int], option_ids: tuple[int, ...]) -> _Outcome:
        ids = prompt_ids + list(option_ids)
        payload = {"model": self.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
        return await self._post(
            "/v1/completions", payload, lambda body: _continuation_logprob(body, ids, len(prompt_ids))
        )

    # ----------------------------------------------------------------- position-free scoring
    async def _check_route(self, path: str, what: str) -> None:
        await self._start()
        payload = {"model": self.model}
        # one token (id 2: BOS for gemma, a harmless id elsewhere), the cheapest request
        payload |= {"input": [2], "use_activation": False} if path == "/classify" else {"prompt": [2], "max_tokens": 1}
        try:
            await self._post(path, payload)
        except RequestFailed as failure:
            runner = "pooling" if path == "/classify" else "generate"
            raise PoolCapabilityError(
                f"{what} cannot run on pool {self.name!r} ({self.model!r} at {failure.replica or ', '.join(self.urls)}): "
                f"{path} answered {failure.reason}; it needs servers on vLLM's {runner!r} runner"
                + (" with a sequence-classification (reward) model (`--runner pooling`)" if runner == "pooling" else "")
            ) from None

    async def _reward_one(self, request: RewardRequest) -> RewardScore:
        started = time.perf_counter()
        ids: list[int] = []
        try:
            ids = await self._reward_ids(request)
            if self.max_model_len and len(ids) > self.max_model_len:
                raise RequestFailed(f"prompt_too_long: {len(ids)} tokens, the context holds {self.max_model_len}", "", 0)
            payload = {"model": self.model, "input": ids, "use_activation": False}
            outcome = await self._post("/classify", payload, _first_class_score)
        except RequestFailed as failure:
            latency = time.perf_counter() - started
            self._record("score_rewards", failure.replica, False, failure.attempts, len(ids) or None, None, latency, failure.reason)
            return RewardScore(float("nan"), len(ids), latency, failure.reason, failure.replica or None)
        latency = time.perf_counter() - started
        self._record("score_rewards", outcome.replica, True, outcome.attempts, len(ids), None, latency, None)
        return RewardScore(outcome.body, len(ids), latency, None, outcome.replica)

    async def _reward_ids(self, request: RewardRequest) -> list[int]:
        if self.tokenizer is not None:
            return self.tokenizer.prompt_ids(reward_text(self.tokenizer.tokenizer, request.prompt, request.response))
        return await self._prompt_ids(reward_text(None, request.prompt, request.response))

    async def _continuation_one(self, request: ContinuationRequest) -> ContinuationLogprob:
        started = time.perf_counter()
        tail: list[int] = []
        try:
            context = await self._prompt_ids(request.context)
            if self.tokenizer is not None:
                tail = continuation_ids(self.tokenizer.tokenizer, request.continuation)
            else:
                payload = {"model": self.model, "prompt": request.continuation, "add_special_tokens": False}
                tail = (await self._post("/tokenize", payload, _tokens)).body
            if not tail:
                raise RequestFailed("empty_continuation: nothing to score", "", 0)
            ids = context + tail
            if error := self._too_long(ids):
                raise RequestFailed(error, "", 0)
            payload = {"model": self.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
            outcome = await self._post(
                "/v1/completions", payload, lambda body: _continuation_logprob(body, ids, len(context))
            )
        except RequestFailed as failure:
            latency = time.perf_counter() - started
            self._record("continuation_logprobs", failure.replica, False, failure.attempts, None, None, latency, failure.reason)
            return ContinuationLogprob(float("nan"), len(tail), latency, failure.reason, failure.replica or None)
        latency = time.perf_counter() - started
        self._record("continuation_logprobs", outcome.replica, True, outcome.attempts, len(ids), 1, latency, None)
        return ContinuationLogprob(outcome.body, len(tail), latency, None, outcome.replica)

    # ----------------------------------------------------------------- tokenization
    async def _generate_prompt(self, request: GenerateRequest) -> list[int]:
        if self.tokenizer is not None:
            return self.tokenizer.generate_ids(request)
        if request.chat and self._remote_chat_template is not False:
            try:
                payload = {
                    "model": self.model, "add_generation_prompt": True,
                    "messages": chat_messages(request.prompt, request.system_prompt),
                }  # fmt: skip
                ids = (await self._post("/tokenize", payload, _tokens)).body
                self._remote_chat_template = True
                return ids
            except RequestFailed as failure:
                if not failure.reason.startswith("http_4") or self._remote_chat_template:
                    raise
                self._remote_chat_template = False  # the served model has no chat template
        return await self._prompt_ids(plain_prompt(request.prompt, request.system_prompt))

    async def _prompt_ids(self, text: str) -> list[int]:
        if self.tokenizer is not None:
            return self.tokenizer.prompt_ids(text)
        payload = {"model": self.model, "prompt": text, "add_special_tokens": True}
        return (await self._post("/tokenize", payload, _tokens)).body

    async def _option_ids(self, option: str) -> tuple[int, ...]:
        if self.tokenizer is not None:
            return self.tokenizer.option_ids(option)
        if option not in self._remote_option_ids:
            payload = {"model": self.model, "prompt": option, "add_special_tokens": False}
            ids = tuple((await self._post("/tokenize", payload, _tokens)).body)
            if not ids:
                raise RequestFailed(f"bad_option: {option!r} tokenizes to nothing", "", 0)
            self._remote_option_ids[option] = ids
        return self._remote_option_ids[option]

    # ----------------------------------------------------------------- metrics
    def _record(self, kind, replica, ok, attempts, tokens_in, tokens_out, latency, error) -> None:
        self._metrics.add(self.name, replica or "", kind, ok, attempts, tokens_in, tokens_out, latency, error)


# --------------------------------------------------------------------- response parsing
def _tokens(body: dict) -> list[int]:
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        raise _Retryable("malformed_response: /tokenize answer has no tokens list")
    return [int(t) for t in tokens]


def _parse_generation(body: dict, n: int) -> Generation:
    try:
        choices = sorted(body["choices"], key=lambda c: c.get("index", 0))
        completions = [
            Completion(
                text=choice["text"],
                finish_reason=choice.get("finish_reason") or "stop",
                tokens_out=len(choice["token_ids"]) if choice.get("token_ids") is not None else -1,
            )
            for choice in choices
        ]
        usage = body.get("usage") or {}
        tokens_in = int(usage.get("prompt_tokens", 0))
    except (KeyError, TypeError, ValueError) as error:
        raise _Retryable(f"malformed_response: {type(error).__name__}: {error}") from None
    if len(completions) != n:
        raise _Retryable(f"malformed_response: {len(completions)} choices for n={n}")
    if any(c.tokens_out < 0 for c in completions):
        # a server without return_token_ids: spread the usage total over the samples
        total = int((body.get("usage") or {}).get("completion_tokens", 0))
        completions = [Completion(c.text, c.finish_reason, total // n) for c in completions]
    return Generation(completions, tokens_in)


def _first_class_score(body: dict) -> float:
    """The first class's raw score from a ``/classify`` answer (a reward model has one)."""
    try:
        return float(body["data"][0]["probs"][0])
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise _Retryable(f"malformed_response: no class score ({type(error).__name__}: {error})") from None


def _first_token_logprobs(body: dict, wanted: list[int]) -> list[float]:
    """The requested ids' log-probabilities from ``logprob_token_ids`` top-logprobs."""
    try:
        top = body["choices"][0]["logprobs"]["top_logprobs"][0]
        by_id = {int(key.split(":", 1)[1]): float(value) for key, value in top.items() if key.startswith("token_id:")}
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
        raise _Retryable(f"malformed_response: no first-token logprobs ({type(error).__name__}: {error})") from None
    missing = [t for t in wanted if t not in by_id]
    if missing:
        raise _Retryable(f"malformed_response: logprobs lack option token ids {missing}")
    return [by_id[t] for t in wanted]


def _continuation_logprob(body: dict, ids: list[int], start: int) -> float:
    """Sum of the prompt-logprobs of ``ids[start:]`` (the option's tokens)."""
    try:
        rows = body["choices"][0]["prompt_logprobs"]
        total = 0.0
        for position in range(start, len(ids)):
            entry = rows[position]
            total += float(entry[str(ids[position])]["logprob"])
        return total
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise _Retryable(f"malformed_response: no prompt logprobs for the option ({type(error).__name__}: {error})") from None
