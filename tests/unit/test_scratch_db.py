"""The process's in-memory DuckDB (prefcurate/scratch_db.py): cursors side by side keep what
they register to themselves, and a forked child gets a database of its own that answers.

(DuckDB does not promise that a database survives a fork, and a lock held by another thread
at the fork would stay held in the child; this run's child would also have answered on the
parent's database, so the fork test guards the hand-over, not a hang seen here.)"""

from __future__ import annotations

import os
import signal
import sys
import threading

import pyarrow as pa
import pytest

from prefcurate.scratch_db import scratch_cursor


def test_cursors_side_by_side_see_only_their_own_tables_and_temp_views():
    barrier, results = threading.Barrier(4), {}

    def count(worker: int) -> None:
        with scratch_cursor() as con:
            con.register("lines", pa.table({"n": list(range(worker + 1))}))
            con.execute("CREATE OR REPLACE TEMP VIEW doubled AS SELECT 2 * n AS n FROM lines")
            barrier.wait()  # every thread has registered its own `lines` before any reads
            results[worker] = con.sql("SELECT count(*), sum(n) FROM doubled").fetchall()[0]

    threads = [threading.Thread(target=count, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {w: (w + 1, w * (w + 1)) for w in range(4)}
    with scratch_cursor() as con:  # closed cursors took their tables and views with them
        assert con.sql("SELECT count(*) FROM duckdb_views() WHERE view_name IN ('lines', 'doubled')").fetchall() == [(0,)]


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs os.fork")
def test_a_forked_child_gets_a_database_that_answers():
    with scratch_cursor() as con:  # the parent's database exists, with its threads, before the fork
        assert con.sql("SELECT sum(range) FROM range(1000000)").fetchall() == [(499999500000,)]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(20)  # a child that hangs is killed, and the assertion below fails
            with scratch_cursor() as con:
                os.write(write, repr(con.sql("SELECT sum(range) FROM range(1000000)").fetchall()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    reported = os.read(read, 100).decode()
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0 and reported == "[(499999500000,)]"
