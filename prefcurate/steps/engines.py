"""Engines for steps: opened once per worker process and shared by every unit it runs.

Loading a model costs a minute on CPU, so an engine is cached by its pool configuration
(not its pool name): two pools that describe the same model share one engine. Each engine is
wrapped to count the seconds spent inside model calls, which the run records (and
bench/pipeline.py reports as model time against everything else).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Sequence

from prefcurate.inference.base import ChoiceRequest, Engine, GenerateRequest

_ENGINES: dict[str, Engine] = {}
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

    def __init__(self, engine: Engine, cache_key: str | None = None):
        self.engine = engine
        self.model = engine.model
        self.seconds = 0.0
        self._cache_key = cache_key

    def _checked(self, results):
        dead = [r.error for r in results if r.error and any(m in r.error for m in _DEAD_MARKERS)]
        if dead:
            evict(self._cache_key)
            raise EngineDied(f"engine for {self.model!r} died: {dead[0][:300]}")
        return results

    def generate(self, requests: Sequence[GenerateRequest]):
        started = time.perf_counter()
        try:
            return self._checked(self.engine.generate(requests))
        finally:
            self.seconds += time.perf_counter() - started

    def score_choices(self, requests: Sequence[ChoiceRequest]):
        started = time.perf_counter()
        try:
            return self._checked(self.engine.score_choices(requests))
        finally:
            self.seconds += time.perf_counter() - started

    def close(self) -> None:  # shared engines are closed at process exit, not per unit
        pass


def pool_config(pools: dict, name: str) -> dict:
    if name not in pools:
        raise KeyError(f"pool {name!r} is not configured; configured pools: {sorted(pools)}")
    return pools[name]


def engine_for(pools: dict, name: str) -> TimedEngine:
    """A timing view of the process-wide engine serving pool ``name``."""
    from prefcurate.inference.pools import EngineConfig, open_engine

    config = EngineConfig.model_validate(pool_config(pools, name))
    key = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    with _LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = open_engine(name, config)
    return TimedEngine(_ENGINES[key], key)


def evict(key: str | None) -> None:
    if key is None:
        return
    with _LOCK:
        engine = _ENGINES.pop(key, None)
    if engine is not None:
        try:
            engine.close()
        except Exception:
            pass


def close_all() -> None:
    with _LOCK:
        for engine in _ENGINES.values():
            try:
                engine.close()
            except Exception:
                pass
        _ENGINES.clear()
