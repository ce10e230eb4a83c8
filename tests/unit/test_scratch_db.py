"""The process's in-memory DuckDB (prefcurate/scratch_db.py): cursors side by side keep what
they register to themselves (a forked child's database: tests/unit/test_fork_safety.py)."""

from __future__ import annotations

import threading

import pyarrow as pa

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
