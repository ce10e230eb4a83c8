"""After a whole-dataset unit, a worker frees what the unit left in reference cycles; what
was alive before is frozen (not walked again by every unit's collection), not kept alive."""

from __future__ import annotations

import gc
import weakref

import numpy as np

from prefcurate.steps.base import release_freed_memory


class _Node:
    def __init__(self, payload):
        self.payload, self.other = payload, None


def _cycle_holding(megabytes: int) -> weakref.ref:
    first, second = _Node(np.ones(megabytes * 2**17)), _Node(None)
    first.other, second.other = second, first  # only the cycle collector can free these
    return weakref.ref(first)


def test_cycles_left_by_each_unit_are_freed_after_earlier_units_were_frozen():
    release_freed_memory()  # an earlier unit's: what lives now is frozen
    assert gc.get_freeze_count() > 0
    gc.disable()  # (no automatic collection may free the cycles first)
    try:
        for _ in range(2):  # one unit, then the next
            left = _cycle_holding(8)
            assert left() is not None
            release_freed_memory()
            assert left() is None
    finally:
        gc.enable()
