"""The dataset store: a DuckDB catalog plus Parquet shard files per table.

Layout of a dataset directory::

    prefcurate.json            marker: format version (a directory without it is not ours)
    catalog.duckdb             shard registry, runs, views over the registered shards
    <table>/shard-<key>.parquet

Rules that make crashes harmless:
- A shard file is written under a temporary name and renamed when complete.
- A shard exists only once it is registered in the catalog, in one transaction that also
  rebuilds the table's view. Readers see registered shards only, so a crash leaves no
  half-data behind.
- Shard names are deterministic (``key`` derives from the inputs that define the shard),
  so a re-run after a crash between rename and registration adopts the complete file
  instead of recomputing it, and a shard already registered is skipped.

Workers anywhere may call :func:`write_shard`; only the coordinating process calls
:meth:`Store.register` (DuckDB allows one writer process). Connections are short-lived so
``prefcurate sql`` can read between writes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from prefcurate import __version__
from prefcurate.schemas.tables import TABLES

FORMAT_VERSION = 1
MARKER = "prefcurate.json"
CATALOG = "catalog.duckdb"


class StoreError(RuntimeError):
    pass


class NotADatasetError(StoreError):
    pass


@dataclass(frozen=True)
class ShardInfo:
    """A complete shard file, ready to be registered."""

    table: str
    key: str
    path: str  # relative to the dataset root
    rows: int
    run_id: str
    stage: str

    def to_dict(self) -> dict:
        return asdict(self)


def code_version() -> str:
    return __version__


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def shard_relpath(table: str, key: str) -> str:
    return f"{table}/shard-{key}.parquet"


def conform(table: str, frame: pl.DataFrame | pa.Table, *, run_id: str, stage: str) -> pa.Table:
    """Add provenance columns and cast to the table's schema (missing nullable -> null)."""
    schema = TABLES[table]
    data = frame.to_arrow() if isinstance(frame, pl.DataFrame) else frame
    n = data.num_rows
    repeat = np.zeros(n, dtype=np.int64)  # constant columns by take(), not Python lists
    provenance = {
        "run_id": pa.array([run_id], pa.string()).take(repeat),
        "stage": pa.array([stage], pa.string()).take(repeat),
        "code_version": pa.array([code_version()], pa.string()).take(repeat),
        "created_at": pa.array([now_utc()], pa.timestamp("us", tz="UTC")).take(repeat),
    }
    unknown = set(data.column_names) - set(schema.names)
    if unknown:
        raise StoreError(f"table {table!r} has no columns {sorted(unknown)}")
    columns = []
    for field in schema:
        if field.name in provenance and field.name not in data.column_names:
            column = provenance[field.name]
        elif field.name in data.column_names:
            column = data.column(field.name)
            if isinstance(column, pa.ChunkedArray):
                column = column.combine_chunks()
            if column.type != field.type:
                column = column.cast(field.type)
        elif field.nullable:
            column = pa.nulls(n, field.type)
        else:
            raise StoreError(f"table {table!r}: required column {field.name!r} is missing")
        if not field.nullable and column.null_count:
            raise StoreError(f"table {table!r}: column {field.name!r} has {column.null_count} nulls")
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def write_shard(
    root: str | Path, table: str, frame: pl.DataFrame | pa.Table, *, key: str, run_id: str, stage: str
) -> ShardInfo:
    """Write one complete shard file atomically (temporary name, fsync, rename).

    Safe to call from any worker process; it never touches the catalog.
    """
    root = Path(root)
    data = conform(table, frame, run_id=run_id, stage=stage)
    relpath = shard_relpath(table, key)
    final = root / relpath
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(data, temporary, compression="zstd")
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    return ShardInfo(table, key, relpath, data.num_rows, run_id, stage)


class Store:
    """A dataset directory. Create with :meth:`init`, open with :meth:`open`."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.catalog = self.root / CATALOG

    # ---- lifecycle -------------------------------------------------------------------
    @classmethod
    def init(cls, root: str | Path) -> "Store":
        root = Path(root)
        if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
            raise NotADatasetError(
                f"{root} exists, is not empty and is not a prefcurate dataset; "
                "choose a new or empty directory"
            )
        root.mkdir(parents=True, exist_ok=True)
        store = cls(root)
        if not (root / MARKER).exists():
            with store.connect() as con:
                store._create_catalog(con)
            (root / MARKER).write_text(
                json.dumps({"format_version": FORMAT_VERSION, "created_by": code_version(),
                            "instance_id": uuid.uuid4().hex})
            )
        return store

    @classmethod
    def open(cls, root: str | Path) -> "Store":
        root = Path(root)
        if not root.is_dir():
            raise NotADatasetError(f"{root} does not exist; create it with `prefcurate init {root}`")
        marker = root / MARKER
        if not marker.exists():
            raise NotADatasetError(
                f"{root} is not a prefcurate dataset (no {MARKER}); "
                f"create one with `prefcurate init DIR`"
            )
        try:
            version = json.loads(marker.read_text())["format_version"]
        except (ValueError, KeyError) as error:
            raise NotADatasetError(f"{marker} is corrupt: {error}") from error
        if version != FORMAT_VERSION:
            raise NotADatasetError(f"{root} has format {version}; this prefcurate reads {FORMAT_VERSION}")
        return cls(root)

    @classmethod
    def open_or_init(cls, root: str | Path) -> "Store":
        return cls.open(root) if (Path(root) / MARKER).exists() else cls.init(root)

    def instance_id(self) -> str:
        """Unique per created dataset: a re-created directory gets a new one."""
        return json.loads((self.root / MARKER).read_text()).get("instance_id", "")

    @contextlib.contextmanager
    def connect(self, read_only: bool = False, attempts: int = 60) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection; waits while another process holds the write lock."""
        for attempt in range(attempts):
            try:
                con = duckdb.connect(str(self.catalog), read_only=read_only)
                break
            except duckdb.IOException as error:
                if "lock" not in str(error).lower() or attempt == attempts - 1:
                    raise
                time.sleep(0.25)
        try:
            yield con
        finally:
            con.close()

    def _create_catalog(self, con: duckdb.DuckDBPyConnection) -> None:
        con.execute(
            """
            CREATE TABLE IF NOT EXISTS _shards (
                table_name VARCHAR NOT NULL, shard_key VARCHAR NOT NULL, path VARCHAR NOT NULL,
                rows BIGINT NOT NULL, run_id VARCHAR NOT NULL, stage VARCHAR NOT NULL,
                registered_at TIMESTAMPTZ NOT NULL, PRIMARY KEY (table_name, shard_key));
            CREATE TABLE IF NOT EXISTS runs (
                run_id VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL, status VARCHAR NOT NULL,
                parameters JSON, counts JSON, timings JSON, message VARCHAR,
                code_version VARCHAR NOT NULL, started_at TIMESTAMPTZ NOT NULL,
                finished_at TIMESTAMPTZ);
            CREATE TABLE IF NOT EXISTS _meta (key VARCHAR PRIMARY KEY, value VARCHAR);
            """
        )
        for table, schema in TABLES.items():
            empty = pa.Table.from_pylist([], schema=schema)
            con.register("_arrow_empty", empty)
            con.execute(f"CREATE OR REPLACE TABLE _empty_{table} AS SELECT * FROM _arrow_empty")
            con.unregister("_arrow_empty")
        self._rebuild_views(con, list(TABLES))
        self._create_report_views(con)

    def _create_report_views(self, con: duckdb.DuckDBPyConnection) -> None:
        from prefcurate.schemas.views import REPORT_VIEWS

        for name, sql in REPORT_VIEWS.items():
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")

    def _rebuild_views(self, con: duckdb.DuckDBPyConnection, tables: Sequence[str]) -> None:
        for table in tables:
            paths = [
                str(self.root / row[0])
                for row in con.execute(
                    "SELECT path FROM _shards WHERE table_name = ? ORDER BY registered_at, path",
                    [table],
                ).fetchall()
            ]
            select = f"SELECT * FROM _empty_{table}"
            if paths:
                listed = ", ".join("'" + p.replace("'", "''") + "'" for p in paths)
                # by name: shards written before a column was added read it as NULL
                select += f" UNION ALL BY NAME SELECT * FROM read_parquet([{listed}], union_by_name = true)"
            con.execute(f"CREATE OR REPLACE VIEW {table} AS {select}")
        con.execute(
            "INSERT OR REPLACE INTO _meta VALUES ('root', ?)", [str(self.root)]
        )

    def refresh_views(self) -> None:
        """Rebuild all views, e.g. after the dataset directory was moved."""
        with self.connect() as con:
            con.execute("BEGIN")
            self._rebuild_views(con, list(TABLES))
            self._create_report_views(con)
            con.execute("COMMIT")

    def ensure_views_current(self) -> None:
        with self.connect(read_only=True) as con:
            row = con.execute("SELECT value FROM _meta WHERE key = 'root'").fetchone()
        if not row or row[0] != str(self.root):
            self.refresh_views()

    # ---- shards ----------------------------------------------------------------------
    def write(self, table: str, frame, *, key: str, run_id: str, stage: str) -> ShardInfo:
        return write_shard(self.root, table, frame, key=key, run_id=run_id, stage=stage)

    def register(self, shards: Sequence[ShardInfo]) -> int:
        """Register complete shard files in one transaction; returns how many were new."""
        shards = [s for s in shards if s is not None]
        if not shards:
            return 0
        for shard in shards:
            if not (self.root / shard.path).exists():
                raise StoreError(f"cannot register {shard.path}: the file does not exist")
        with self.connect() as con:
            con.execute("BEGIN")
            try:
                new = 0
                for shard in shards:
                    exists = con.execute(
                        "SELECT 1 FROM _shards WHERE table_name = ? AND shard_key = ?",
                        [shard.table, shard.key],
                    ).fetchone()
                    if exists:
                        continue
                    con.execute(
                        "INSERT INTO _shards VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [shard.table, shard.key, shard.path, shard.rows, shard.run_id, shard.stage, now_utc()],
                    )
                    new += 1
                self._rebuild_views(con, sorted({s.table for s in shards}))
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
        return new

    def commit(self, table: str, frame, *, key: str, run_id: str, stage: str) -> ShardInfo:
        """Write and register one shard (coordinator-side convenience)."""
        shard = self.write(table, frame, key=key, run_id=run_id, stage=stage)
        self.register([shard])
        return shard

    def registered_keys(self, table: str) -> set[str]:
        with self.connect(read_only=True) as con:
            rows = con.execute("SELECT shard_key FROM _shards WHERE table_name = ?", [table]).fetchall()
        return {row[0] for row in rows}

    def adopt_complete_shard(self, table: str, key: str, run_id: str, stage: str) -> ShardInfo | None:
        """A complete but unregistered shard file left by a crash, as a ShardInfo."""
        path = self.root / shard_relpath(table, key)
        if not path.exists():
            return None
        rows = pq.ParquetFile(path).metadata.num_rows
        return ShardInfo(table, key, shard_relpath(table, key), rows, run_id, stage)

    def shards(self, table: str) -> list[dict]:
        with self.connect(read_only=True) as con:
            frame = con.sql(
                "SELECT * FROM _shards WHERE table_name = ? ORDER BY registered_at, path",
                params=[table],
            ).pl()
        return frame.to_dicts()

    def read_shard(self, path: str) -> pl.DataFrame:
        return pl.read_parquet(self.root / path)

    def sweep_temporary_files(self, older_than_s: float = 3600.0) -> int:
        """Delete temporary files of writes that crashed before their rename.

        Only files older than ``older_than_s``: a run writing into the same dataset right
        now (a stage flow started by hand beside a build) keeps its in-flight files.
        """
        cutoff = time.time() - older_than_s
        removed = 0
        for table in TABLES:
            for temporary in (self.root / table).glob(".shard-*.tmp"):
                try:
                    if temporary.stat().st_mtime < cutoff:
                        temporary.unlink()
                        removed += 1
                except FileNotFoundError:  # renamed or swept by someone else meanwhile
                    pass
        return removed

    # ---- reading ---------------------------------------------------------------------
    def query(self, sql: str, params: Sequence | None = None) -> pl.DataFrame:
        """Run trusted, internal SQL read-only and return a polars frame."""
        with self.connect(read_only=True) as con:
            return con.sql(sql, params=list(params) if params else None).pl()

    def read(self, table: str, columns: Sequence[str] | None = None, where: str | None = None) -> pl.DataFrame:
        cols = ", ".join(columns) if columns else "*"
        sql = f"SELECT {cols} FROM {table}" + (f" WHERE {where}" if where else "")
        return self.query(sql)

    def count(self, table: str) -> int:
        return int(self.query(f"SELECT count(*) AS n FROM {table}")["n"][0])

    def ids(self, table: str, column: str) -> pl.Series:
        return self.query(f"SELECT DISTINCT {column} FROM {table}")[column]

    # ---- runs ------------------------------------------------------------------------
    def start_run(self, kind: str, parameters: dict | None = None, run_id: str | None = None) -> str:
        run_id = run_id or f"{now_utc():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        with self.connect() as con:
            con.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, 'running', ?, NULL, NULL, NULL, ?, ?, NULL)",
                [run_id, kind, json.dumps(parameters or {}, default=str), code_version(), now_utc()],
            )
        return run_id

    def finish_run(
        self, run_id: str, status: str, counts: dict | None = None, timings: dict | None = None,
        message: str | None = None,
    ) -> None:
        with self.connect() as con:
            con.execute(
                "UPDATE runs SET status = ?, counts = ?, timings = ?, message = ?, finished_at = ? "
                "WHERE run_id = ?",
                [status, json.dumps(counts or {}, default=str), json.dumps(timings or {}), message, now_utc(), run_id],
            )

    def runs(self) -> pl.DataFrame:
        return self.query("SELECT * FROM runs ORDER BY started_at")

