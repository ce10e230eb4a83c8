"""What the HTTP pools (``servers``, ``openai``) share: the event loop their synchronous
Engine API runs on, and how an error answer is read.

A pool keeps one loop for its life so that its HTTP client, connection pool and
background tasks (health probes) survive between the synchronous calls that stages make;
the loop starts on the first call, from whichever thread makes it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx

from prefcurate.inference.base import InferenceError

T = TypeVar("T")


class LoopThread:
    def __init__(self, pool_name: str, thread_name: str):
        self.pool_name = pool_name
        self.thread_name = thread_name
        self.closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()  # two threads' first calls must not start two loops

    def submit(self, coro: Awaitable[T]) -> concurrent.futures.Future:
        if self.closed:
            raise InferenceError(f"inference pool {self.pool_name!r} is closed")
        with self._start_lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name=self.thread_name, daemon=True)
                self._thread.start()
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Awaitable[T]) -> T:
        return self.submit(coro).result()

    def close(self, shutdown: Callable[[], Awaitable[None]] | None = None) -> None:
        """Run ``shutdown()`` on the loop (if it ever started), then stop it; idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._loop is None:
            return
        if shutdown is not None:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


class MetricRows:
    """Per-request metric rows (REQUEST_METRICS columns), added by the loop's tasks and
    drained by the stage's thread."""

    def __init__(self):
        self._rows: list[dict] = []
        self.lock = threading.Lock()

    def add(self, pool: str, replica: str, kind: str, ok: bool, attempts: int, tokens_in: int,
            tokens_out: int, latency_s: float, error: str | None, **extra) -> None:
        """One request's row; ``extra``: a pool kind's own columns (cost_usd, verdict_path)."""
        row = {"pool": pool, "replica": replica, "kind": kind, "ok": ok, "attempts": int(attempts),
               "tokens_in": tokens_in, "tokens_out": tokens_out, "latency_s": float(latency_s),
               "error": error, **extra}
        with self.lock:
            self._rows.append(row)

    def drain(self) -> list[dict]:
        with self.lock:
            rows, self._rows = self._rows, []
        return rows


def error_message(response: httpx.Response, limit: int = 500) -> str:
    """The server's own words for a failed request (OpenAI-style ``{"error": {"message"}}``,
    a bare ``{"error": ...}`` or plain text), cut to ``limit`` characters."""
    try:
        body = response.json()
        if isinstance(body, dict):
            error = body.get("error", body)
            if isinstance(error, dict):
                return str(error.get("message", error))[:limit]
            return str(error)[:limit]
    except ValueError:
        pass
    return response.text[:limit]


class MalformedAnswer(ValueError):
    """A 200 answer that is not a JSON object (a body cut short, a proxy's HTML page)."""


def json_object(response: httpx.Response) -> dict:
    """The JSON object of a 200 answer, or :class:`MalformedAnswer` saying what came instead."""
    try:
        answer = response.json()
    except ValueError:
        raise MalformedAnswer(f"malformed_response: not JSON (truncated?): {response.text[:200]!r}") from None
    if not isinstance(answer, dict):
        raise MalformedAnswer(f"malformed_response: expected an object, got {type(answer).__name__}")
    return answer
