"""The process-wide thread pools (ingest's validation threads, the shard writers) work in a
child forked after they started: a forked child inherits a pool's object but not its
threads, so without a fresh pool the child's first ingest or shard write waits forever."""

from __future__ import annotations

import os
import sys

import pytest

from prefcurate.steps.base import _shard_writers
from tasks.ingest import _ingest_threads


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs os.fork")
def test_a_forked_child_gets_working_pools():
    # both pools have threads running in this process before the fork
    assert list(_ingest_threads().map(lambda x: x + 1, range(4))) == [1, 2, 3, 4]
    assert _shard_writers().submit(lambda: 7).result() == 7
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what each pool returns, or that it timed out
        code = 1
        try:
            got = (_ingest_threads().submit(lambda: 42).result(timeout=10),
                   _shard_writers().submit(lambda: 43).result(timeout=10))
            os.write(write, repr(got).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    reported = os.read(read, 100).decode()
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0 and reported == "(42, 43)"
