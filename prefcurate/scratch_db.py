"""One in-memory DuckDB per process, for SQL over frames the code already holds (a file's
lines, a shard's partitioned copies), never over the catalog.

A new DuckDB database costs 11-15 ms here: it builds its catalog of built-in functions. That
was most of a 1,000-prompt file's reading and a fixed cost of every filter shard. A cursor on
one long-lived database costs nothing. Each cursor is its own connection: what it registers
and its TEMP views are its own, so threads may hold cursors side by side.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
from collections.abc import Iterator

import duckdb


@functools.cache
def _database() -> duckdb.DuckDBPyConnection:
    atexit.register(_close_at_exit)
    return duckdb.connect()


def _close_at_exit() -> None:
    # (one still referenced at exit can outlive the bindings' teardown, which then reports
    # its objects leaked)
    if _database.cache_info().currsize:
        _database().close()
        _database.cache_clear()


@contextlib.contextmanager
def scratch_cursor() -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection to the process's in-memory database, closed (with what it registered) on exit."""
    cursor = _database().cursor()
    try:
        yield cursor
    finally:
        cursor.close()


_INHERITED: list[duckdb.DuckDBPyConnection] = []


def _forget_in_child() -> None:
    # a forked child has the database's object but not its threads: it starts its own, and
    # keeps the parent's unreleased (closing it would wait on threads that are not there)
    if _database.cache_info().currsize:
        _INHERITED.append(_database())
    _database.cache_clear()


os.register_at_fork(after_in_child=_forget_in_child)
