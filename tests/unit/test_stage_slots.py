"""A stage's pool slots: how many units run at once, and the bounded submission that keeps to it."""

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from prefect.futures import PrefectConcurrentFuture

from flows.common import stage_width, submit_bounded
from prefcurate.config import load_config


def test_width_is_the_fewest_slots_among_the_pools_used_and_at_most_the_units():
    config = load_config("examples/quickstart.yaml", {
        "pools.wide": {"kind": "servers", "urls": ["http://a:8000/v1", "http://b:8000/v1", "http://c:8000/v1"]},
    })
    assert stage_width(["wide"], config, 10) == 3
    assert stage_width(["wide"], config, 2) == 2
    assert stage_width(["wide", "judges"], config, 10) == 1  # an embedded engine: one unit at a time
    assert stage_width([], config, 10) is None  # model-free stages: only the workers bound them


def test_bounded_submission_never_has_more_than_width_units_unfinished_and_yields_all():
    running, most, lock = [0], [0], threading.Lock()
    executor = ThreadPoolExecutor(8)

    def work(seconds: float) -> float:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(seconds)
        with lock:
            running[0] -= 1
        return seconds

    def submit(seconds: float):
        return PrefectConcurrentFuture(uuid.uuid4(), executor.submit(work, seconds))

    units = [0.05, 0.01, 0.03, 0.02, 0.04, 0.01, 0.02]
    finished = [future.wrapped_future.result() for batch in submit_bounded(submit, units, width=2) for future in batch]
    assert sorted(finished) == sorted(units) and most[0] == 2
    most[0] = 0
    assert sum(map(len, submit_bounded(submit, units, width=None))) == len(units) and most[0] > 2
    assert list(submit_bounded(submit, [], width=1)) == []
    executor.shutdown()


def test_in_order_submission_waits_for_the_caller_before_the_next_unit():
    """Ingest's units: each is submitted only after the caller registered the one before."""
    events = []
    executor = ThreadPoolExecutor(4)

    def submit(unit: str):
        events.append(f"submit {unit}")
        return PrefectConcurrentFuture(uuid.uuid4(), executor.submit(lambda: unit))

    for batch in submit_bounded(submit, ["a", "b", "c"], width=None, in_order=True):
        assert len(batch) == 1
        events.append(f"register {batch[0].wrapped_future.result()}")
    assert events == ["submit a", "register a", "submit b", "register b", "submit c", "register c"]
    executor.shutdown()


def test_units_that_finish_while_the_caller_registers_come_together_and_keep_the_width_full():
    """A registration is one catalog transaction, whatever its size: units that finished
    meanwhile are registered in the next one, and as many new units are submitted."""
    executor = ThreadPoolExecutor(8)
    submitted = []

    def submit(seconds: float):
        submitted.append(seconds)
        return PrefectConcurrentFuture(uuid.uuid4(), executor.submit(time.sleep, seconds))

    units = [0.0] + [0.01] * 3 + [0.0] * 4
    batches = []
    for batch in submit_bounded(submit, units, width=4):
        batches.append(len(batch))
        time.sleep(0.1)  # the caller registering: every unit running finishes meanwhile
        assert len(submitted) == min(len(units), sum(batches) + 4)  # the width stays full
    # the three 0.01 s units and the one submitted in the first one's place, then the last three
    assert batches == [1, 4, 3]
    executor.shutdown()
