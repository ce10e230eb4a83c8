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


class TimedEngine:
    """Delegates to an engine and adds up the wall seconds of its calls."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.model = engine.model
        self.seconds = 0.0

    def generate(self, requests: Sequence[GenerateRequest]):
        started = time.perf_counter()
        try:
            return self.engine.generate(requests)
        finally:
            self.seconds += time.perf_counter() - started

    def score_choices(self, requests: Sequence[ChoiceRequest]):
        started = time.perf_counter()
        try:
            return self.engine.score_choices(requests)
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
    return TimedEngine(_ENGINES[key])


def close_all() -> None:
    with _LOCK:
        for engine in _ENGINES.values():
            try:
                engine.close()
            except Exception:
                pass
        _ENGINES.clear()
