"""Read-only SQL for users: one query that reads, nothing that writes.

Two independent layers, either of which alone stops every write:

1. :func:`check_read_only` classifies the statement with DuckDB's own parser. It accepts a
   single SELECT (DESCRIBE, SHOW, SUMMARIZE, PIVOT ... IN and ``FROM t`` parse as SELECT),
   or EXPLAIN [ANALYZE] of such a SELECT. Statement types alone are not enough: DuckDB 2
   parses ``WITH x AS (INSERT ... RETURNING *) SELECT ...`` (also UPDATE, DELETE, COPY TO)
   as a SELECT, and ``EXPLAIN ANALYZE`` runs the statement it wraps. So the SELECT's whole
   parse tree (``json_serialize_sql``) must hold nothing but SELECT query nodes.
2. :func:`sandbox` runs the query in an in-memory DuckDB connection that cannot reach the
   file system at all: ``enable_external_access = false`` with no allowed path, no temp
   directory (nothing spills), extensions neither installed nor auto-loaded, configuration
   locked. Our own code reads the catalog (read-only) and hands DuckDB the registered shard
   files as Arrow datasets, so the tables and report views are there while ``COPY ... TO``,
   ``read_text('/etc/passwd')``, ATTACH or EXPORT find no path they may open. The dataset's
   files, the catalog included, are never opened for writing, and the catalog's stored
   views are not used (they would need rewriting after the dataset is copied or moved).

Results leave only through :func:`write_result`, which refuses targets inside the dataset.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads

from prefcurate.schemas.tables import TABLES
from prefcurate.schemas.views import REPORT_VIEWS
from prefcurate.store import Store

DEFAULT_TIMEOUT_S = 60.0
# query nodes of a pure read; INSERT/UPDATE/DELETE/COPY_QUERY_NODE (writes in CTEs) and any
# node type a later DuckDB adds are refused
_READ_QUERY_NODES = {"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"}


_PARSER_CONFIG = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "python_enable_replacements": False,
}


class ReadOnlyViolation(ValueError):
    """The statement is not a pure read; nothing was run."""


class SqlError(RuntimeError):
    """A read that failed for a reason the user can act on (timeout, memory, output path)."""


def default_memory_limit() -> str:
    """A quarter of physical memory: a runaway query cannot take the machine."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return "2GB"
    return f"{max(total // 4 // 2**20, 256)}MiB"


# ---- layer 1: classification ---------------------------------------------------------------
def check_read_only(query: str) -> None:
    """Raise :class:`ReadOnlyViolation` unless ``query`` is one statement that only reads."""
    statement = _single_statement(query)
    if statement.type == duckdb.StatementType.SELECT:
        _check_select_tree(query)
        return
    if statement.type == duckdb.StatementType.EXPLAIN:
        _check_explained(query)
        return
    raise ReadOnlyViolation(
        f"`prefcurate sql` is read-only: {_kind(statement)} statements are refused; "
        "give one SELECT (or EXPLAIN of one) and save results with --format/--output"
    )


def _single_statement(query: str) -> duckdb.Statement:
    try:
        statements = duckdb.extract_statements(query)
    except Exception as error:  # parser errors, and statement types the binding cannot name
        raise ReadOnlyViolation(f"cannot parse the query: {error}") from None
    if len(statements) != 1:
        raise ReadOnlyViolation(f"give exactly one statement (got {len(statements)})")
    try:
        _ = statements[0].type
    except ValueError:  # a statement type newer than this duckdb binding can name
        raise ReadOnlyViolation("`prefcurate sql` is read-only: this kind of statement is refused") from None
    return statements[0]


def _kind(statement: duckdb.Statement) -> str:
    name = statement.type.name
    readable = {"MULTI": "multi-statement (e.g. PIVOT without IN)", "VARIABLE_SET": "SET VARIABLE"}
    return readable.get(name, name)


def _check_select_tree(query: str) -> None:
    try:
        # a pure function call (the parser's tree as JSON), still in a connection without files
        with duckdb.connect(":memory:", config=_PARSER_CONFIG) as con:
            tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [query]).fetchone()[0])
    except (duckdb.Error, ValueError, RecursionError) as error:  # fail closed
        raise ReadOnlyViolation(f"cannot check the query: {str(error)[:200]}") from None
    if tree.get("error") or len(tree.get("statements", [])) != 1:
        raise ReadOnlyViolation(
            f"`prefcurate sql` is read-only: the statement is not a plain SELECT "
            f"({tree.get('error_message', 'not serialisable')})"
        )
    writes = sorted(_query_node_types(tree) - _READ_QUERY_NODES)
    if writes:
        found = ", ".join(node.removesuffix("_QUERY_NODE").removesuffix("_NODE") for node in writes)
        raise ReadOnlyViolation(
            f"`prefcurate sql` is read-only: the SELECT contains {found} "
            "(a data-modifying WITH clause or subquery); it is refused"
        )


def _query_node_types(tree: object) -> set[str]:
    found: set[str] = set()
    stack = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            kind = item.get("type")
            if isinstance(kind, str) and kind.endswith("_NODE"):
                found.add(kind)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _check_explained(query: str) -> None:
    """EXPLAIN [ANALYZE] [(options)] <statement>: the wrapped statement must be a plain SELECT.

    The wrapped text is found with DuckDB's tokenizer (comments skipped). Where an opening
    parenthesis could be options or a parenthesised SELECT, every reading must be a SELECT;
    a reading that does not parse as one statement is refused, so unknown forms fail closed.
    """
    raw = duckdb.tokenize(query)
    ends = [offset for offset, _ in raw[1:]] + [len(query)]
    tokens = [
        (offset, query[offset:end].strip(), kind)
        for (offset, kind), end in zip(raw, ends)
        if kind != duckdb.token_type.comment
    ]
    if not tokens or tokens[0][1].upper() != "EXPLAIN":
        raise ReadOnlyViolation("cannot find the statement EXPLAIN wraps; give EXPLAIN SELECT ...")
    position = 1
    if position < len(tokens) and tokens[position][1].upper() in ("ANALYZE", "ANALYSE"):
        position += 1
    starts = [position]
    if position < len(tokens) and tokens[position][1] == "(":
        depth, index = 0, position
        while index < len(tokens):
            if tokens[index][2] == duckdb.token_type.operator:
                depth += tokens[index][1].count("(") - tokens[index][1].count(")")
            index += 1
            if depth == 0:
                break
        starts.append(index)
    readings = []
    for start in starts:
        inner = query[tokens[start][0]:] if start < len(tokens) else ""
        try:
            statements = duckdb.extract_statements(inner)
        except Exception:
            continue
        if len(statements) == 1:
            try:
                kind = statements[0].type
            except ValueError:  # a type the binding cannot name is no SELECT
                kind = None
            readings.append((inner, kind))
    if not readings:
        raise ReadOnlyViolation("cannot find the statement EXPLAIN wraps; give EXPLAIN SELECT ...")
    for inner, kind in readings:
        if kind != duckdb.StatementType.SELECT:
            name = kind.name if kind is not None else "this kind of statement"
            raise ReadOnlyViolation(
                f"`prefcurate sql` is read-only: EXPLAIN of {name} is refused "
                "(EXPLAIN ANALYZE runs the statement it wraps); EXPLAIN only a SELECT"
            )
        _check_select_tree(inner)


# ---- layer 2: a connection without a file system ---------------------------------------------
@dataclass(frozen=True)
class _CatalogSnapshot:
    shard_paths: dict[str, list[Path]]
    tables: dict[str, pa.Table]  # the catalog's own user-facing tables (runs, ...)


def _read_catalog(store: Store) -> _CatalogSnapshot:
    try:
        with store.connect(read_only=True) as con:
            rows = con.execute("SELECT table_name, path FROM _shards ORDER BY registered_at, path").fetchall()
            names = [
                row[0]
                for row in con.execute(
                    "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
                    "AND schema_name = 'main' AND NOT starts_with(table_name, '_') ORDER BY table_name"
                ).fetchall()
                if row[0] not in TABLES and row[0] not in REPORT_VIEWS
            ]
            tables = {name: con.sql(f'SELECT * FROM "{name}"').to_arrow_table() for name in names}
    except duckdb.IOException as error:
        if "lock" in str(error).lower():
            raise SqlError(
                f"the dataset {store.root} is busy: another process holds its catalog for writing; "
                "try again when it finishes"
            ) from None
        raise SqlError(f"cannot read the catalog {store.catalog}: {error}") from None
    except duckdb.Error as error:
        raise SqlError(f"cannot read the catalog {store.catalog}: {error}") from None
    shard_paths: dict[str, list[Path]] = {}
    for table, relpath in rows:
        if store.objects is not None:  # shards on an object store: read there, by key, never elsewhere
            if Path(relpath).is_absolute() or ".." in Path(relpath).parts:
                raise SqlError(
                    f"the catalog lists shard {relpath!r} outside the dataset's shards; refusing to read it")
            shard_paths.setdefault(table, []).append(store.objects.key(relpath))
            continue
        path = (store.root / relpath).resolve()
        if store.root not in path.parents:  # a tampered catalog must not point reads elsewhere
            raise SqlError(
                f"the catalog lists shard {relpath!r} outside the dataset {store.root}; refusing to read it"
            )
        if not path.is_file():
            raise SqlError(f"the catalog lists shard {relpath} but {path} is missing")
        shard_paths.setdefault(table, []).append(path)
    return _CatalogSnapshot(shard_paths, tables)


def _sandbox_config(memory_limit: str | None) -> dict:
    return {
        "memory_limit": memory_limit or default_memory_limit(),
        "enable_external_access": False,
        "temp_directory": "",  # no spill files, anywhere: over the memory limit is an error
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "allow_community_extensions": False,
        "allow_persistent_secrets": False,
        # no replacement scans: a name in the query must not reach a Python object (an Arrow
        # table or frame) in our own code's scope; the dataset's tables are registered by name.
        # enable_external_access = false already stops them; this holds if that ever changes
        "python_enable_replacements": False,
    }


@contextlib.contextmanager
def sandbox(store: Store, memory_limit: str | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory connection with the dataset's tables and views and no file access.

    It runs whatever it is given without writing a file: the guard under
    :func:`check_read_only`, not a substitute for it.
    """
    snapshot = _read_catalog(store)
    try:
        con = duckdb.connect(":memory:", config=_sandbox_config(memory_limit))
    except duckdb.Error as error:
        raise SqlError(f"cannot set up the query: {error} (check --memory-limit)") from None
    try:
        for table, schema in TABLES.items():
            paths = snapshot.shard_paths.get(table)
            # our own reader opens the shards; by the table's schema so that shards written
            # before a column was added read it as NULL
            source = (
                pads.dataset([str(p) for p in paths], schema=schema, format="parquet",
                             filesystem=store.objects.filesystem if store.objects is not None else None)
                if paths
                else schema.empty_table()
            )
            con.register(table, source)
        for name, table in snapshot.tables.items():
            con.register(name, table)
        for name, sql in REPORT_VIEWS.items():
            con.execute(f"CREATE VIEW {name} AS {sql}")
        con.execute("SET enable_progress_bar = false")  # a session option: not in the connect config
        con.execute("SET lock_configuration = true")
        yield con
    finally:
        con.close()


def run_read_only(
    store: Store, query: str, *, memory_limit: str | None = None, timeout_s: float | None = DEFAULT_TIMEOUT_S
) -> pl.DataFrame:
    """Check, then run ``query`` in the sandbox, stopped after ``timeout_s`` seconds."""
    check_read_only(query)
    with sandbox(store, memory_limit) as con:
        timed_out = threading.Event()

        def stop() -> None:
            timed_out.set()
            con.interrupt()

        timer = threading.Timer(timeout_s, stop) if timeout_s else None
        if timer:
            timer.daemon = True
            timer.start()
        try:
            relation = con.sql(query)
            result = _collect(relation, _memory_limit_bytes(con)) if relation is not None else pa.table({})
        except duckdb.InterruptException:
            if timed_out.is_set():
                raise SqlError(
                    f"the query was stopped after {timeout_s:g} s (raise --timeout to allow longer)"
                ) from None
            raise
        except duckdb.OutOfMemoryException as error:
            limit = memory_limit or default_memory_limit()
            raise SqlError(
                f"the query needs more than the memory limit {limit} (--memory-limit): "
                f"{str(error).splitlines()[0]}"
            ) from None
        finally:
            if timer:
                timer.cancel()
    try:
        return pl.from_arrow(result) if result.num_columns else pl.DataFrame()
    except Exception as error:
        raise SqlError(
            f"cannot hold the result ({error}); cast such columns in the query, e.g. col::VARCHAR"
        ) from None


def _memory_limit_bytes(con: duckdb.DuckDBPyConnection) -> int | None:
    """The connection's memory limit in bytes, from DuckDB's own rendering (e.g. '61.0 MiB')."""
    shown = con.execute("SELECT value FROM duckdb_settings() WHERE name = 'memory_limit'").fetchall()[0][0]
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGTP]?)(i?)B\s*", shown or "", flags=re.IGNORECASE)
    if not match:
        return None
    number, prefix, binary = match.groups()
    return int(float(number) * (1024 if binary else 1000) ** "_KMGTP".index(prefix.upper() or "_"))


def _collect(relation: duckdb.DuckDBPyRelation, limit_bytes: int | None) -> pa.Table:
    """The result in batches, refused once it outgrows the memory limit: DuckDB's limit covers
    its own buffers, not the result handed to us."""
    reader = relation.to_arrow_reader(batch_size=100_000)
    batches, size = [], 0
    for batch in reader:
        size += batch.nbytes
        if limit_bytes is not None and size > limit_bytes:
            raise SqlError(
                "the result is larger than the memory limit (--memory-limit); "
                "add a LIMIT, aggregate, or select fewer columns"
            )
        batches.append(batch)
    return pa.Table.from_batches(batches, schema=reader.schema)


# ---- results ---------------------------------------------------------------------------------
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if c != 0x0A}
# bidirectional overrides reorder what a terminal shows
_CONTROL.update({c: f"\\u{c:04x}" for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]})


def terminal_safe(text: str) -> str:
    """Control characters shown as escapes (``\\x1b``), so data cannot drive the terminal."""
    return text.translate(_CONTROL)


def _nested_columns(frame: pl.DataFrame) -> list[str]:
    return [f"{name} ({dtype})" for name, dtype in frame.schema.items() if dtype.is_nested()]


def _binary_columns(frame: pl.DataFrame) -> list[str]:
    return [f"{name} ({dtype})" for name, dtype in frame.schema.items() if "Binary" in repr(dtype)]


def check_output_path(store: Store, output: Path) -> Path:
    """The resolved target of ``--output``; refused inside the dataset or in a missing folder."""
    target = Path(output).expanduser().resolve()
    inside = target == store.root or store.root in target.parents
    if not inside:
        for folder in (target.parent, *target.parent.parents):
            with contextlib.suppress(OSError):
                if folder.exists() and os.path.samefile(folder, store.root):
                    inside = True
                    break
    if inside:
        raise SqlError(
            f"--output {output} is inside the dataset {store.root}; results are written outside it "
            "(the dataset's files belong to prefcurate)"
        )
    if not target.parent.is_dir():
        raise SqlError(f"--output {output}: the folder {target.parent} does not exist")
    if target.is_dir():
        raise SqlError(f"--output {output} is a directory; give a file name")
    return target


def render(frame: pl.DataFrame, fmt: str) -> str:
    """csv or json text of ``frame``; clear errors for what the format cannot hold."""
    if fmt == "csv":
        bad = _nested_columns(frame) + _binary_columns(frame)
        if bad:
            raise SqlError(
                f"csv cannot hold nested or binary columns: {', '.join(bad)}; use --format json or "
                "parquet, or convert them in the query (to_json(col), hex(col))"
            )
        return frame.write_csv()
    if fmt == "json":
        bad = _binary_columns(frame)
        if bad:
            raise SqlError(
                f"json cannot hold binary columns: {', '.join(bad)}; use --format parquet, or convert "
                "them in the query (base64(col), hex(col))"
            )
        return frame.write_ndjson()
    raise SqlError(f"cannot render {fmt}")


def write_result(frame: pl.DataFrame, fmt: str, target: Path) -> None:
    """Write atomically (temporary name, rename): a failed write leaves no partial file, and a
    hard link at the target is replaced rather than written through."""
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        if fmt == "parquet":
            frame.write_parquet(temporary)
        else:
            temporary.write_text(render(frame, fmt))
        os.replace(temporary, target)
    except OSError as error:
        raise SqlError(f"cannot write {target}: {error}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
