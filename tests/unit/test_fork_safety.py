"""Process-wide state works in a child forked after it started: the thread pools (ingest's
validation threads, the shard writers) and the scratch DuckDB. A forked child inherits a
pool's object but not its threads, so without a fresh pool the child's first ingest or shard
write waits forever. DuckDB does not promise that a database survives a fork either (a lock
held by another thread at the fork would stay held in the child); this run's child would
also have answered on the parent's database, so that test guards the hand-over."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from prefcurate.scratch_db import scratch_cursor
from prefcurate.steps.base import _shard_writers
from tasks.ingest import _ingest_threads

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs os.fork")


def _in_a_forked_child(work) -> tuple[int, str]:
    """(exit code, repr of what ``work()`` returned) of a child forked now; killed after 20 s."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(20)  # a child that hangs is killed, and its exit code says so
            os.write(write, repr(work()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    reported = os.read(read, 100).decode()
    os.close(read)
    return os.waitstatus_to_exitcode(status), reported


def test_a_forked_child_gets_working_pools():
    # both pools have threads running in this process before the fork
    assert list(_ingest_threads().map(lambda x: x + 1, range(4))) == [1, 2, 3, 4]
    assert _shard_writers().submit(lambda: 7).result() == 7
    assert _in_a_forked_child(lambda: (_ingest_threads().submit(lambda: 42).result(timeout=10),
                                       _shard_writers().submit(lambda: 43).result(timeout=10))) == (0, "(42, 43)")


def test_a_forked_child_gets_a_scratch_database_that_answers():
    def total():
        with scratch_cursor() as con:
            return con.sql("SELECT sum(range) FROM range(1000000)").fetchall()

    assert total() == [(499999500000,)]  # the parent's database exists, with its threads, before the fork
    assert _in_a_forked_child(total) == (0, "[(499999500000,)]")
