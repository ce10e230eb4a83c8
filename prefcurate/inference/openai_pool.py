"""A pool on any OpenAI-compatible HTTP API: hosted providers, a LiteLLM proxy, or
``vllm serve --api-key``.

    pools:
      judges:
        kind: openai
        base_url: https://api.example.com/v1
        model: provider-model-name
        api_key_env: EXAMPLE_API_KEY        # the key itself is read from this variable
        route: chat                         # chat | completions
        price: {input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.60}
        requests_per_minute: 500
        tokens_per_minute: 200000

Unlike :mod:`server_pool` (token-id prompts to our own ``vllm serve`` replicas, vLLM's
``logprob_token_ids``), this pool speaks only what the OpenAI API offers: text prompts,
``/chat/completions`` (the provider applies the chat template) or ``/completions`` where
offered, and ``logprobs``/``top_logprobs`` (at most 20 alternatives per position).

**The key** is read from the environment variable named by ``api_key_env`` when the engine
opens, and lives only in the HTTP client's ``Authorization`` header: the config, the runs
table, request metrics, errors and logs carry the variable's name, never its value.

**Verdicts** (:meth:`OpenAIPool.score_choices`): one decode step with ``max_tokens: 1`` and
``top_logprobs``; each option's log-probability is the log-sum-exp of the returned tokens
that spell it (``"A"``, ``" A"``); the probabilities are a softmax over the options. Every
option must be found. When one is outside the returned top-k, in this order:

1. ``logit_bias`` (when the options' token ids are known: ``option_token_ids`` or a local
   ``tokenizer``): the same +100 bias on every option lifts them all into the top-k
   without changing their ratios (a common bias cancels in the softmax over the options).
   APIs that report logprobs *before* the bias (vLLM's default ``raw_logprobs``) still
   return the sampled token, which the bias makes an option: its raw logprob joins the
   unbiased ones, and the remaining options are biased in turn (a raw logprob is the same
   in every response to one prompt; a reported mass under 0.5 after a +100 bias tells the
   two reporting modes apart).
2. ``reask``: the request again, with "Answer with exactly one of: ..." added.
3. otherwise the verdict fails with ``option_missing: ...`` naming the options; it is
   never read as probability zero.

The path that produced each verdict is :attr:`ChoiceScore.method` and the
``verdict_path`` column of ``request_metrics``.

**Rate limits**: 429 and 503 answers are retried after their ``Retry-After`` (or
``retry-after-ms``) when given, pool-wide (every request of the pool waits), else after
an exponential backoff with full jitter; a ``Retry-After`` longer than
``max_retry_after_s`` fails the request at once (a daily quota will not come back in a
build). Concurrency adapts (AIMD): halved on a 429/503 (once per second at most), +1 per
``limit`` successes, between ``min_concurrency`` and ``max_concurrency``. Token buckets
cap requests and tokens per minute (a request reserves its prompt estimate plus
``max_tokens``; the difference to the billed ``usage`` is settled after the answer). The
caps hold per engine process: the pool's concurrency limit (``parallel_units``, default 1)
keeps one unit at a time on it.

**Cost**: ``price`` (USD per million input and output tokens) turns each request's
``usage`` into ``cost_usd`` in ``request_metrics``; :mod:`prefcurate.tasks.estimate`
uses the same table before a build, and ``budget.max_usd`` stops one.

Faults: timeouts, connection errors, truncated or non-JSON bodies and 5xx are retried up to
``retries`` times; other 4xx fail the one request (``http_400: ...``); 401/403 (a wrong or
missing key) and 404 (wrong ``base_url``, ``route`` or ``model``) raise :class:`PoolRefused`
naming the pool (an :class:`InferenceError` and an ``InputError``: the stage stops at once,
without Prefect's retries, since every request would fail the same way).
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from prefcurate.errors import InputError
from prefcurate.inference.base import (
    ChoiceRequest,
    ChoiceScore,
    Completion,
    GenerateRequest,
    Generation,
    InferenceError,
)
from prefcurate.inference.http_common import (
    LoopThread,
    MalformedAnswer,
    MetricRows,
    error_message,
    json_object,
)
from prefcurate.inference.pools import PoolConfigBase
from prefcurate.inference.prompting import chat_messages, plain_prompt

T = TypeVar("T")

#: the most alternatives the OpenAI API returns per position
MAX_TOP_LOGPROBS = 20
#: logit_bias values are clamped to [-100, 100] by the OpenAI API
FORCE_BIAS = 100.0
#: a rough characters-per-token ratio for estimates before the answer's ``usage`` is known
CHARS_PER_TOKEN = 4.0

VERDICT_PATHS = ("top_logprobs", "logit_bias", "reask")


class Prices(BaseModel):
    """USD per million tokens, as providers publish them."""

    model_config = ConfigDict(extra="forbid")

    input_usd_per_mtok: float = Field(..., ge=0)
    output_usd_per_mtok: float = Field(..., ge=0)

    def cost(self, tokens_in: int | None, tokens_out: int | None) -> float:
        return ((tokens_in or 0) * self.input_usd_per_mtok + (tokens_out or 0) * self.output_usd_per_mtok) / 1e6


class OpenAIPoolConfig(PoolConfigBase):
    """A pool of ``kind: openai``: one OpenAI-compatible endpoint."""

    kind: Literal["openai"] = "openai"
    #: the API root including its version, e.g. https://api.openai.com/v1 or http://host:8000/v1
    base_url: str = Field(..., min_length=1)
    #: the model name the API knows (sent as ``model`` in every request)
    model: str = Field(..., min_length=1)
    #: the environment variable holding the API key; None: send no key (a local server)
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    #: chat: /chat/completions (the provider applies the chat template); completions: /completions
    route: Literal["chat", "completions"] = "chat"
    price: Prices | None = None
    #: alternatives asked per verdict position (OpenAI allows at most 20 on chat, 5 on its
    #: legacy completions; vLLM 20 unless started with a larger --max-logprobs)
    top_logprobs: int = Field(MAX_TOP_LOGPROBS, ge=1, le=MAX_TOP_LOGPROBS)
    #: the options' token ids in the provider's vocabulary, for ``logit_bias`` ("A": 32)
    option_token_ids: dict[str, int] = Field(default_factory=dict)
    #: a local tokenizer folder whose ids are the provider's (e.g. the model vLLM serves),
    #: for ``logit_bias`` when ``option_token_ids`` does not list an option
    tokenizer: str | None = None
    #: whether the API accepts ``logit_bias`` (chat and completions routes)
    logit_bias: bool = True
    #: ask again with an explicit "answer with one of" when an option is still missing
    reask: bool = True
    max_concurrency: int = Field(8, ge=1)
    min_concurrency: int = Field(1, ge=1)
    #: starting concurrency (default: max_concurrency)
    initial_concurrency: int | None = Field(None, ge=1)
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    timeout_s: float = Field(120.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0)
    retries: int = Field(5, ge=0)
    backoff_base_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    #: a Retry-After longer than this fails the request instead of waiting
    max_retry_after_s: float = Field(120.0, ge=0)
    #: merged into every request body (provider-specific parameters); ``extra_sampling``
    #: goes into generate requests only
    extra_body: dict[str, Any] = Field(default_factory=dict)
    #: units of work that may use the pool at once (its Prefect concurrency limit); the
    #: rate caps hold per engine process, so more than 1 multiplies them
    parallel_units: int = Field(1, ge=1)

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_is_a_local_folder(cls, value: str | None) -> str | None:
        if value is not None and value != "default" and not Path(value).expanduser().is_dir():
            raise ValueError(f"tokenizer folder {value} does not exist (a local folder with the provider's vocabulary)")
        return value

    def provenance_name(self) -> str:
        return self.served_model_name or self.model

    def identity_settings(self) -> Any:
        # the route decides whether a server-side chat template frames the prompt; not the
        # URL or the key (the same model behind another proxy answers the same)
        return {"kind": "openai", "route": self.route, "extra_body": self.extra_body}

    def concurrency_slots(self) -> int:
        return self.parallel_units

    def open(self, name: str) -> OpenAIPool:
        return OpenAIPool(name, self)

    def cost(self, tokens_in: int | None, tokens_out: int | None) -> float | None:
        return self.price.cost(tokens_in, tokens_out) if self.price is not None else None


class PoolRefused(InferenceError, InputError):
    """The endpoint refuses the pool's setup (no key, a wrong key, a wrong URL or model):
    every request would fail the same way, so the stage stops at once and Prefect does not
    retry it; the message names the pool."""


class RequestFailed(Exception):
    def __init__(self, reason: str, attempts: int, usage: tuple[int, int] = (0, 0)):
        super().__init__(reason)
        self.reason, self.attempts, self.usage = reason, attempts, usage


class _Retry(Exception):
    """Worth another attempt; ``wait_s`` is the server's Retry-After when it gave one."""

    def __init__(self, reason: str, throttled: bool = False, wait_s: float | None = None):
        super().__init__(reason)
        self.reason, self.throttled, self.wait_s = reason, throttled, wait_s


# --------------------------------------------------------------------- rate control
class AdaptiveConcurrency:
    """AIMD concurrency window: halve on a throttle answer, +1 per ``limit`` successes."""

    def __init__(self, initial: int, minimum: int, maximum: int, clock: Callable[[], float] = time.monotonic):
        self.minimum, self.maximum = minimum, max(minimum, maximum)
        self.limit = float(min(max(initial, self.minimum), self.maximum))
        self.in_flight = 0
        self.max_in_flight_seen = 0
        self.decreases = 0
        self._clock = clock
        self._last_decrease = -math.inf
        self._cond = asyncio.Condition()

    async def acquire(self) -> None:
        async with self._cond:
            while self.in_flight >= int(self.limit):
                await self._cond.wait()
            self.in_flight += 1
            self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)

    async def release(self, outcome: Literal["ok", "throttled", "other"]) -> None:
        async with self._cond:
            self.in_flight -= 1
            if outcome == "ok":
                self.limit = min(self.maximum, self.limit + 1.0 / self.limit)
            elif outcome == "throttled":
                now = self._clock()
                # the answers to one burst arrive together: one congestion event, one halving
                if now - self._last_decrease >= 1.0:
                    self.limit = max(float(self.minimum), self.limit / 2)
                    self._last_decrease = now
                    self.decreases += 1
            self._cond.notify_all()


class TokenBucket:
    """``per_minute`` units refilled continuously, holding at most one second's worth
    (so a fresh pool does not fire a minute's requests at once). ``take`` may run the
    bucket into debt by at most one request (a request larger than the bucket still goes,
    alone); ``settle`` corrects a reservation by what was billed."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self._clock = clock
        self._stamp = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self.level = min(self.capacity, self.level + (now - self._stamp) * self.rate)
        self._stamp = now

    async def take(self, amount: float) -> None:
        async with self._lock:  # first come, first served
            while True:
                self._refill()
                need = min(amount, self.capacity)
                if self.level >= need:
                    self.level -= amount
                    return
                await asyncio.sleep((need - self.level) / self.rate)

    def settle(self, reserved: float, used: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + reserved - used)


def retry_after_seconds(headers: httpx.Headers, now: float | None = None) -> float | None:
    """The server's wait: ``retry-after-ms`` (OpenAI), else ``Retry-After`` in seconds or
    as an HTTP date; None when absent or unreadable."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# --------------------------------------------------------------------- the pool
@dataclass
class _Answer:
    body: dict
    attempts: int
    tokens_in: int
    tokens_out: int


class OpenAIPool:
    """See the module docstring. ``name`` is the pool's name in the config."""

    def __init__(self, name: str, config: OpenAIPoolConfig, seed: int | None = None):
        self.name = name
        self.config = config
        self.model = config.model
        self.base_url = config.base_url.rstrip("/")
        self._headers = {"Content-Type": "application/json"}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env, "")
            if not key.strip():
                raise PoolRefused(
                    f"inference pool {name!r}: the environment variable {config.api_key_env} "
                    f"(api_key_env) is not set; export the API key for {self.base_url} there"
                )
            self._headers["Authorization"] = f"Bearer {key.strip()}"
        self._option_ids = dict(config.option_token_ids)
        self._tokenizer = None
        if config.tokenizer:
            from prefcurate.inference.models import resolve_model_path
            from prefcurate.inference.prompting import LocalPromptTokenizer

            self._tokenizer = LocalPromptTokenizer.from_folder(resolve_model_path(config.tokenizer), False)
        self._rng = random.Random(seed)
        self._metrics = MetricRows()
        self._loop = LoopThread(name, f"prefcurate-openai-{name}")
        self._client: httpx.AsyncClient | None = None
        self.spent_usd = 0.0
        self.throttled = 0  # 429/503 answers seen

    def __repr__(self) -> str:  # never the headers: they hold the key
        return f"OpenAIPool(name={self.name!r}, base_url={self.base_url!r}, model={self.model!r})"

    # ------------------------------------------------------------------ sync Engine API
    def generate(self, requests: Sequence[GenerateRequest]) -> list[Generation]:
        return self._run(self._batch(list(requests), self._generate_one))

    def score_choices(self, requests: Sequence[ChoiceRequest]) -> list[ChoiceScore]:
        return self._run(self._batch(list(requests), self._score_one))

    def drain_metrics(self) -> list[dict]:
        """Per-request rows (REQUEST_METRICS columns) since the last drain."""
        return self._metrics.drain()

    def close(self) -> None:
        self._loop.close(self._shutdown)

    async def _shutdown(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ loop plumbing
    def _run(self, coro: Awaitable[T]) -> T:
        return self._loop.run(coro)

    def _start(self) -> None:
        if self._client is not None:
            return
        c = self.config
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(c.timeout_s, connect=c.connect_timeout_s),
            limits=httpx.Limits(max_connections=c.max_concurrency, max_keepalive_connections=c.max_concurrency),
            headers=self._headers,
        )
        self.concurrency = AdaptiveConcurrency(c.initial_concurrency or c.max_concurrency, c.min_concurrency,
                                               c.max_concurrency)
        self._requests_bucket = TokenBucket(c.requests_per_minute) if c.requests_per_minute else None
        self._tokens_bucket = TokenBucket(c.tokens_per_minute) if c.tokens_per_minute else None
        self._pause_until = 0.0

    async def _batch(self, items: list, one: Callable[[Any], Awaitable[T]]) -> list[T]:
        self._start()
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(item)) for item in items]
        except* InferenceError as errors:
            raise errors.exceptions[0] from None
        return [task.result() for task in tasks]

    # ------------------------------------------------------------------ one HTTP request
    async def _post(self, payload: dict, reserve_tokens: int, parse: Callable[[dict], T]) -> tuple[T, _Answer]:
        """POST to the route with pacing, retries and backoff; raises RequestFailed (this
        request) or InferenceError (the pool: a refused key, a wrong URL or model)."""
        c = self.config
        path = "/chat/completions" if c.route == "chat" else "/completions"
        body = {"model": c.model, **payload, **c.extra_body}
        attempts, reason = 0, "not attempted"
        while attempts <= c.retries:
            wait = self._pause_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self.concurrency.acquire()
            outcome: Literal["ok", "throttled", "other"] = "other"
            used = reserved = 0
            try:
                # reserved once a slot is held, so the answers in flight settle the buckets
                if self._requests_bucket is not None:
                    await self._requests_bucket.take(1)
                if self._tokens_bucket is not None:
                    await self._tokens_bucket.take(reserve_tokens)
                    reserved = reserve_tokens
                attempts += 1
                answer = await self._post_once(path, body)
                tokens_in, tokens_out = _usage(answer)
                used = tokens_in + tokens_out
                self._add_cost(tokens_in, tokens_out)
                try:
                    parsed = parse(answer)
                except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
                    raise RequestFailed(
                        f"malformed_response: {type(error).__name__}: {error}", attempts, (tokens_in, tokens_out)
                    ) from None
                outcome = "ok"
                return parsed, _Answer(answer, attempts, tokens_in, tokens_out)
            except _Retry as retry:
                reason = retry.reason
                if retry.throttled:
                    outcome = "throttled"
                    self.throttled += 1
                if retry.wait_s is not None:
                    if retry.wait_s > c.max_retry_after_s:
                        raise RequestFailed(
                            f"{reason} (Retry-After {retry.wait_s:.0f} s is longer than max_retry_after_s "
                            f"{c.max_retry_after_s:g} s)", attempts) from None
                    # the limit is the pool's: every request of the pool waits
                    self._pause_until = max(self._pause_until, time.monotonic() + retry.wait_s)
                    delay = 0.0
                else:
                    delay = self._backoff(attempts)
            except RequestFailed as failure:
                failure.attempts = attempts
                raise
            finally:
                await self.concurrency.release(outcome)
                if reserved:
                    self._tokens_bucket.settle(reserved, used)
            if attempts <= c.retries and delay:
                await asyncio.sleep(delay)
        raise RequestFailed(reason, attempts)

    def _backoff(self, attempt: int) -> float:
        c = self.config
        return self._rng.uniform(0.0, min(c.backoff_max_s, c.backoff_base_s * 2 ** (attempt - 1)))

    async def _post_once(self, path: str, body: dict) -> dict:
        url = f"{self.base_url}{path}"
        try:
            response = await self._client.post(url, json=body)
        except httpx.TimeoutException as error:
            raise _Retry(f"timeout: {type(error).__name__} after {self.config.timeout_s:g} s") from None
        except httpx.HTTPError as error:  # refused, reset, a body cut short (RemoteProtocolError)
            raise _Retry(f"transport: {type(error).__name__}: {error}") from None
        status = response.status_code
        if status == 200:
            try:
                return json_object(response)
            except MalformedAnswer as error:
                raise _Retry(str(error)) from None
        message = error_message(response, 300)
        reason = f"http_{status}: {message}"
        if status in (429, 503):
            raise _Retry(reason, throttled=True, wait_s=retry_after_seconds(response.headers))
        if status in (401, 403):
            whose = f"the key from ${self.config.api_key_env}" if self.config.api_key_env else "a request without a key (set api_key_env)"
            raise PoolRefused(f"inference pool {self.name!r}: {url} refused {whose}: {reason}")
        if status == 404:
            raise PoolRefused(
                f"inference pool {self.name!r}: {url} answered {reason}; check the pool's base_url, "
                f"route ({self.config.route}) and model ({self.config.model!r})"
            )
        if status in (408, 409, 425) or status >= 500:
            raise _Retry(reason)
        raise RequestFailed(reason, 0)

    def _add_cost(self, tokens_in: int, tokens_out: int) -> None:
        cost = self.config.cost(tokens_in, tokens_out)
        if cost:
            with self._metrics.lock:
                self.spent_usd += cost

    # ------------------------------------------------------------------ generate
    def _prompt_payload(self, prompt: str, system_prompt: str | None, chat: bool) -> dict:
        if self.config.route == "chat":
            return {"messages": chat_messages(prompt, system_prompt)}
        return {"prompt": plain_prompt(prompt, system_prompt) if chat else prompt}

    async def _generate_one(self, request: GenerateRequest) -> Generation:
        started = time.perf_counter()
        params = request.params
        payload = {
            **self._prompt_payload(request.prompt, request.system_prompt, request.chat),
            "n": params.n, "temperature": params.temperature, "top_p": params.top_p,
            "max_tokens": params.max_tokens, **self.config.extra_sampling,
        }  # fmt: skip
        if params.stop:
            payload["stop"] = list(params.stop)
        if params.seed is not None:
            payload["seed"] = params.seed
        reserve = _estimate_tokens(request.prompt, request.system_prompt) + params.max_tokens * params.n
        try:
            completions, answer = await self._post(payload, reserve, lambda b: self._parse_generation(b, params.n))
        except RequestFailed as failure:
            latency = time.perf_counter() - started
            self._record("generate", False, failure.attempts, *failure.usage, latency, failure.reason, None)
            return Generation([], 0, latency, failure.reason, self.base_url)
        latency = time.perf_counter() - started
        self._record("generate", True, answer.attempts, answer.tokens_in, answer.tokens_out, latency, None, None)
        return Generation(completions, answer.tokens_in, latency, None, self.base_url)

    def _parse_generation(self, body: dict, n: int) -> list[Completion]:
        choices = sorted(body["choices"], key=lambda choice: choice.get("index", 0))
        if len(choices) != n:
            raise ValueError(f"{len(choices)} choices for n={n}")
        if self.config.route == "chat":
            texts = [choice["message"].get("content") or "" for choice in choices]
        else:
            texts = [choice["text"] for choice in choices]
        total_out = int((body.get("usage") or {}).get("completion_tokens") or 0)
        # the API bills the samples together: spread the total, the remainder to the first
        shares = [total_out // n + (1 if i < total_out % n else 0) for i in range(n)]
        return [
            Completion(text, choice.get("finish_reason") or "stop", share)
            for text, choice, share in zip(texts, choices, shares)
        ]

    # ------------------------------------------------------------------ verdicts
    def _bias_ids(self, options: Sequence[str]) -> dict[str, int] | None:
        """Each option's single token id in the provider's vocabulary, or None when one is
        unknown (or spans several tokens): then logit_bias cannot force the options."""
        if not self.config.logit_bias:
            return None
        ids = {}
        for option in options:
            if option in self._option_ids:
                ids[option] = self._option_ids[option]
                continue
            if self._tokenizer is None:
                return None
            tokens = self._tokenizer.option_ids(option)
            if len(tokens) != 1:
                return None
            ids[option] = int(tokens[0])
        return ids

    async def _verdict_call(self, prompt: str, bias: dict[int, float] | None, calls: list[_Answer]) -> list[tuple[str, float]]:
        k = self.config.top_logprobs
        payload = {**self._prompt_payload(prompt, None, False), "max_tokens": 1, "temperature": 0.0}
        if self.config.route == "chat":
            payload.update(logprobs=True, top_logprobs=k)
        else:
            payload["logprobs"] = k
        if bias:
            payload["logit_bias"] = {str(token): value for token, value in bias.items()}
        alternatives, answer = await self._post(payload, _estimate_tokens(prompt, None) + 1, self._first_position)
        calls.append(answer)
        return alternatives

    def _first_position(self, body: dict) -> list[tuple[str, float]]:
        """(token text, logprob) of the first generated position: the top alternatives and
        the sampled token itself."""
        logprobs = body["choices"][0]["logprobs"]
        if logprobs is None:
            raise ValueError("the answer has no logprobs (does this API offer them on this route?)")
        if self.config.route == "chat":
            first = logprobs["content"][0]
            pairs = [(alt["token"], float(alt["logprob"])) for alt in first.get("top_logprobs") or []]
            pairs.append((first["token"], float(first["logprob"])))
        else:
            top = (logprobs.get("top_logprobs") or [{}])[0] or {}
            pairs = [(token, float(value)) for token, value in top.items()]
            if logprobs.get("tokens"):
                pairs.append((logprobs["tokens"][0], float(logprobs["token_logprobs"][0])))
        return pairs

    async def _score_one(self, request: ChoiceRequest) -> ChoiceScore:
        started = time.perf_counter()
        calls: list[_Answer] = []
        options = tuple(request.options)
        path, found, error = None, {}, None
        try:
            if not options:
                raise RequestFailed("no_options: a choice request needs at least one option", 0)
            if len(set(options)) != len(options):
                raise RequestFailed(f"bad_options: options repeat: {options}", 0)
            found = _match_options(await self._verdict_call(request.prompt, None, calls), options)
            if len(found) == len(options):
                path = "top_logprobs"
            bias_ids = self._bias_ids(options) if path is None else None
            if path is None and bias_ids is not None:
                found = await self._force_with_bias(request.prompt, options, bias_ids, found, calls)
                if len(found) == len(options):
                    path = "logit_bias"
            if path is None and self.config.reask:
                reask_prompt = _reask_prompt(request.prompt, options, self.config.route)
                bias = {token: FORCE_BIAS for token in bias_ids.values()} if bias_ids else None
                found = _match_options(await self._verdict_call(reask_prompt, bias, calls), options)
                if len(found) == len(options):
                    path = "reask"
            if path is None:
                tried = ["top_logprobs"] + (["logit_bias"] if bias_ids else []) + (["reask"] if self.config.reask else [])
                missing = [o for o in options if o not in found]
                error = (
                    f"option_missing: options {missing} are not among the top-{self.config.top_logprobs} "
                    f"logprobs of {self.model!r} (tried: {', '.join(tried)}); "
                    + ("" if bias_ids else "set the pool's option_token_ids or tokenizer to allow logit_bias")
                )
        except RequestFailed as failure:
            error = failure.reason
            calls.append(_Answer({}, failure.attempts, *failure.usage))
        latency = time.perf_counter() - started
        attempts = sum(call.attempts for call in calls)
        tokens_in = sum(call.tokens_in for call in calls)
        tokens_out = sum(call.tokens_out for call in calls)
        self._record("score_choices", error is None, attempts, tokens_in, tokens_out, latency, error, path)
        if error is not None:
            return ChoiceScore((), latency, error, self.base_url, method=path)
        logprobs = [found[o] for o in options]
        top = max(logprobs)
        weights = [math.exp(value - top) for value in logprobs]
        total = sum(weights)
        return ChoiceScore(tuple(w / total for w in weights), latency, None, self.base_url, method=path)

    async def _force_with_bias(self, prompt: str, options: tuple[str, ...], bias_ids: dict[str, int],
                               unbiased: dict[str, float], calls: list[_Answer]) -> dict[str, float]:
        """The options' logprobs with logit_bias; see the module docstring (step 1)."""
        found = _match_options(
            await self._verdict_call(prompt, {bias_ids[o]: FORCE_BIAS for o in options}, calls), options
        )
        if len(found) == len(options):
            return found  # one response: the common bias cancels in the ratios
        if sum(math.exp(v) for v in found.values()) >= 0.5:
            return found  # post-bias values: not comparable with other responses
        # raw (pre-bias) logprobs: every response to this prompt reports the same values
        merged = {**unbiased, **found}
        for _ in range(len(options)):
            missing = [o for o in options if o not in merged]
            if not missing:
                break
            more = _match_options(
                await self._verdict_call(prompt, {bias_ids[o]: FORCE_BIAS for o in missing}, calls), options
            )
            if not any(o in more for o in missing):
                break
            merged.update({o: v for o, v in more.items() if o not in merged})
        return merged

    # ------------------------------------------------------------------ metrics
    def _record(self, kind, ok, attempts, tokens_in, tokens_out, latency, error, verdict_path) -> None:
        self._metrics.add(self.name, self.base_url, kind, ok, attempts, tokens_in, tokens_out, latency, error,
                          cost_usd=self.config.cost(tokens_in, tokens_out), verdict_path=verdict_path)


# --------------------------------------------------------------------- helpers
def _estimate_tokens(prompt: str, system_prompt: str | None) -> int:
    return math.ceil((len(prompt) + len(system_prompt or "")) / CHARS_PER_TOKEN) + 8


def _usage(body: dict) -> tuple[int, int]:
    usage = body.get("usage") or {}
    try:
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    except (TypeError, ValueError):
        return 0, 0


def _match_options(alternatives: list[tuple[str, float]], options: Sequence[str]) -> dict[str, float]:
    """Each option's logprob: log-sum-exp over the distinct tokens that spell it once
    stripped of surrounding whitespace ("A", " A")."""
    wanted = set(options)
    by_token: dict[str, float] = {}
    for token, logprob in alternatives:
        if token.strip() in wanted and math.isfinite(logprob):
            by_token[token] = logprob  # the sampled token repeats a top-k entry: count it once
    found: dict[str, float] = {}
    for token, logprob in by_token.items():
        option = token.strip()
        found[option] = logprob if option not in found else float(np.logaddexp(found[option], logprob))
    return found


def _reask_prompt(prompt: str, options: Sequence[str], route: str) -> str:
    instruction = f"Answer with exactly one of: {', '.join(options)}."
    # the prompt ends where the verdict is due: a completion prompt keeps its end
    return f"{prompt}\n\n{instruction}" if route == "chat" else f"{instruction}\n\n{prompt}"
