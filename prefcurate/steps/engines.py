"""Engines for steps: opened once per worker process and shared by every unit it runs.

Loading a model costs a minute on CPU, so an engine is cached by its pool configuration
(not its pool name): two pools that describe the same model share one engine. Each engine is
wrapped to count the seconds spent inside model calls, which the run records (and
bench/pipeline.py reports as model time against everything else).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import threading
import time
from collections.abc import Sequence

import polars as pl
import pyarrow as pa

from prefcurate.inference.base import ChoiceRequest, Engine, GenerateRequest

_ENGINES: dict[str, Engine] = {}
_log = logging.getLogger(__name__)
_LOCK = threading.Lock()


class EngineDied(RuntimeError):
    """The engine process died; the unit fails so its retry reopens a fresh engine."""


_DEAD_MARKERS = ("EngineDeadError", "EngineCore encountered", "engine process died")


class TimedEngine:
    """Delegates to an engine, adds up the wall seconds of its calls, and notices death.

    Per-request failures come back as results with ``error`` set (the batch goes on), but
    a dead engine fails every later request too; then the cached engine is evicted and the
    unit raises, so Prefect's retry runs it again on a fresh engine instead of storing a
    shard of failures.
    """

    def __init__(self, engine: Engine, cache_key: str | None = None, load_seconds: float = 0.0,
                 model: str | None = None):
        self.engine = engine
        #: what rows record and row ids hash: the pool's model identity (served name and
        #: folder fingerprint) when opened by :func:`engine_for`; requests use engine.model
        self.model = model or engine.model
        self.seconds = 0.0
        #: seconds this view spent starting the engine (0 when the process had it already)
        self.load_seconds = load_seconds
        self._cache_key = cache_key

    def _checked(self, results):
        dead = [r.error for r in results if r.error and any(m in r.error for m in _DEAD_MARKERS)]
        if dead:
            evict(self._cache_key)
            raise EngineDied(f"engine for {self.model!r} died: {dead[0][:300]}")
        return results

    def _timed(self, call, requests):
        started = time.perf_counter()
        try:
            return self._checked(call(requests))
        finally:
            self.seconds += time.perf_counter() - started

    def generate(self, requests: Sequence[GenerateRequest]):
        return self._timed(self.engine.generate, requests)

    def score_choices(self, requests: Sequence[ChoiceRequest]):
        return self._timed(self.engine.score_choices, requests)

    #: optional engine calls (position-free judge modes), timed like the two above when the
    #: engine offers them; absent otherwise, so a mode's check_engine sees what it lacks
    _OPTIONAL_CALLS = frozenset({"score_rewards", "continuation_logprobs"})

    def __getattr__(self, name: str):
        # only reached for what this view does not define: the engine's own attributes
        # (runner, name, check_serves, ...), with its optional scoring calls timed
        if name.startswith("__") or name in ("engine", "seconds", "_cache_key"):
            raise AttributeError(name)
        attribute = getattr(self.engine, name)
        if name not in self._OPTIONAL_CALLS:
            return attribute

        return functools.partial(self._timed, attribute)

    def drain_metrics(self) -> list[dict]:
        """The engine's per-request rows since the last drain (shared by every view of it)."""
        drain = getattr(self.engine, "drain_metrics", None)
        return drain() if drain is not None else []

    def close(self) -> None:  # shared engines are closed with the Dask worker, not per unit
        pass


def pool_config(pools: dict, name: str):
    if name not in pools:
        raise KeyError(f"pool {name!r} is not configured; configured pools: {sorted(pools)}")
    return pools[name]


def engine_for(pools: dict, name: str) -> TimedEngine:
    """A timing view of the process-wide engine serving pool ``name``."""
    from prefcurate.inference import pools as pool_kinds

    config = pool_kinds.parse_pool(pool_config(pools, name))
    key = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    load_seconds = 0.0
    with _LOCK:
        if key not in _ENGINES:
            started = time.perf_counter()
            log = _logger()
            log.info("starting the engine for pool %r (%s, model %s)", name, config.kind, config.model)
            _ENGINES[key] = pool_kinds.open_engine(name, config)
            load_seconds = time.perf_counter() - started
            log.info("engine for pool %r ready in %.1f s", name, load_seconds)
    return TimedEngine(_ENGINES[key], key, load_seconds, model=config.model_identity())


def request_metrics(*engines: TimedEngine | None) -> pl.DataFrame:
    """The ``request_metrics`` rows of a unit's model calls (each engine drained once).

    Views of one engine share its buffer; with one unit at a time per worker (the default)
    the rows are exactly the unit's requests.
    """
    from prefcurate.schemas.tables import PROVENANCE, REQUEST_METRICS

    columns = pa.schema([f for f in REQUEST_METRICS if f not in PROVENANCE])  # the store adds those
    seen, rows = set(), []
    for view in engines:
        if view is not None and id(view.engine) not in seen:
            seen.add(id(view.engine))
            rows.extend(view.drain_metrics())
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=columns))


def _logger():
    """The Prefect task's logger inside a unit (shown in the UI and the console), else ours."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:
        return _log


def model_time(*engines: TimedEngine | None) -> dict[str, float]:
    """A unit's ``model_seconds`` (inside model calls) and ``model_load_seconds`` (engine starts)."""
    present = [e for e in engines if e is not None]
    return {
        "model_seconds": sum(e.seconds for e in present),
        "model_load_seconds": sum(e.load_seconds for e in present),
    }


def evict(key: str | None) -> None:
    if key is None:
        return
    with _LOCK:
        engine = _ENGINES.pop(key, None)
    if engine is not None:
        _close_quietly(engine)


#: seconds an engine's own processes get to exit when a build ends before they are killed:
#: vLLM's CPU engine core ignores its 5 s default grace (measured: killed after 5 s at every
#: build's end) and holds nothing a later run needs
END_OF_BUILD_GRACE_S = 0.0


def close_all() -> None:
    """Close every engine of this process at the end of a build, all at once and without
    waiting out their shutdown grace (:data:`END_OF_BUILD_GRACE_S`); one after another, a
    worker's engines would add their waits up."""
    with _LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
    closing = [threading.Thread(target=_close_quietly, args=(engine, END_OF_BUILD_GRACE_S), daemon=True)
               for engine in engines]
    for thread in closing:
        thread.start()
    for thread in closing:
        thread.join()


def _close_quietly(engine: Engine, grace_s: float | None = None) -> None:
    try:
        if grace_s is not None and "grace_s" in inspect.signature(engine.close).parameters:
            engine.close(grace_s=grace_s)  # an engine with processes of its own (VLLMEngine)
        else:
            engine.close()
    except Exception:  # an engine that died while closing is closed
        pass
