"""Read-only SQL for users: one SELECT-like statement, nothing that writes.

Two independent guards: statements are classified by DuckDB's own parser (only SELECT,
EXPLAIN, and read-only PRAGMA/DESCRIBE/SHOW pass), and the connection itself is opened
read-only with file access limited to the dataset directory and the configuration locked,
so even a statement the classifier let through cannot write the catalog or reach files
outside the dataset.
"""

from __future__ import annotations

import duckdb
import polars as pl

from prefcurate.store import Store

_ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
_READ_ONLY_PRAGMAS = ("show_tables", "table_info", "show", "database_size", "version")


class ReadOnlyViolation(ValueError):
    pass


def check_read_only(query: str) -> None:
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as error:
        raise ReadOnlyViolation(f"cannot parse the query: {error}") from None
    if len(statements) != 1:
        raise ReadOnlyViolation(f"give exactly one statement (got {len(statements)})")
    statement = statements[0]
    if statement.type in _ALLOWED:
        return
    if statement.type == duckdb.StatementType.PRAGMA and any(p in query.lower() for p in _READ_ONLY_PRAGMAS):
        return
    kind = statement.type.name
    raise ReadOnlyViolation(
        f"`prefcurate sql` is read-only: {kind} statements are refused; "
        "use --format/--output to save results"
    )


def run_read_only(store: Store, query: str) -> pl.DataFrame:
    check_read_only(query)
    store.ensure_views_current()
    with store.connect(read_only=True) as con:
        root = str(store.root).replace("'", "''")
        con.execute(f"SET allowed_directories = ['{root}']")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        relation = con.sql(query)
        if relation is None:
            return pl.DataFrame()
        return relation.pl()
