"""A build's end closes every engine of a worker at once, without their shutdown grace."""

from __future__ import annotations

import time

from prefcurate.steps import engines


class SlowToClose:
    """An engine whose close takes a while (as vLLM's engine-core shutdown does)."""

    def __init__(self):
        self.grace: list = []

    def close(self, grace_s: float | None = None) -> None:
        self.grace.append(grace_s)
        time.sleep(0.3)


class PlainEngine:
    def __init__(self):
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def test_close_all_closes_every_engine_at_once_without_grace(monkeypatch):
    slow = [SlowToClose() for _ in range(4)]
    plain = PlainEngine()
    monkeypatch.setattr(engines, "_ENGINES", {f"slow-{i}": e for i, e in enumerate(slow)} | {"plain": plain})
    started = time.perf_counter()
    engines.close_all()
    assert time.perf_counter() - started < 0.9  # four 0.3 s closes, side by side, not 1.2 s
    assert [e.grace for e in slow] == [[engines.END_OF_BUILD_GRACE_S]] * 4
    assert plain.closed == 1  # an engine without a grace parameter is closed as it is
    assert engines._ENGINES == {}


def test_evicting_a_dead_engine_keeps_its_default_grace(monkeypatch):
    engine = SlowToClose()
    monkeypatch.setattr(engines, "_ENGINES", {"key": engine})
    engines.evict("key")
    assert engine.grace == [None] and engines._ENGINES == {}
