"""The dataset store: a DuckDB catalog plus Parquet shard files per table.

Layout of a dataset directory::

    prefcurate.json            marker: format version (a directory without it is not ours)
    catalog.duckdb             shard registry, runs, unit counts, the prompt key index (PROMPT_KEYS),
                               views over the registered shards
    <table>/shard-<key>.parquet
    _units/<stage>/<key>.json  a finished unit's manifest: its shards and counts
    _tmp/                      a running stage's working copy (:meth:`Store.scratch_folder`)
    .writer.lock               one writer per dataset (flock; holds pid, command, since)

Rules that make crashes harmless:
- A shard file is written under a temporary name and renamed when complete.
- A shard exists only once it is registered in the catalog, in one transaction that also
  rebuilds the table's view. Readers see registered shards only, so a crash leaves no
  half-data behind.
- Shard names are deterministic (``key`` derives from the inputs that define the shard),
  so a re-run after a crash between rename and registration adopts the complete file
  instead of recomputing it, and a shard already registered is skipped.

- The shards are the data and the catalog only their index: :meth:`Store.repair` re-creates
  a lost or broken catalog from the unit manifests.

Workers anywhere may call :func:`write_shard`; only the coordinating process calls
:meth:`Store.register` (DuckDB allows one writer process), holding :meth:`Store.writer_lock`.
Connections are short-lived so ``prefcurate sql`` can read between writes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from prefcurate import __version__
from prefcurate.schemas.tables import STAGE_REPORTS_DDL, TABLES
from prefcurate.scratch_db import scratch_cursor

FORMAT_VERSION = 1
MARKER = "prefcurate.json"
CATALOG = "catalog.duckdb"


class StoreError(RuntimeError):
    pass


class NotADatasetError(StoreError):
    pass


class CatalogError(NotADatasetError):
    """The catalog is missing, corrupt or belongs to another dataset: says what to do."""


class DatasetBusyError(StoreError):
    """Another process holds the dataset's writer lock."""


#: the catalog's index of registered prompts: a 64-bit key of each prompt id and source id
#: (xxh3, a fixed spec, so every version computes the same), kept in the registration's
#: transaction. Finding which of a unit's ids a dataset already holds joins the unit's keys
#: against it (~7 ms at 1M prompts, where the id columns of the shards took ~80 ms); only
#: keys that match are checked against the ids themselves, so the answer stays exact.
PROMPT_KEYS = "_prompt_keys"
WRITER_LOCK = ".writer.lock"
SCRATCH_DIR = "_tmp"  # stages' temporary working copies (Store.scratch_folder)


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
    return dt.datetime.now(dt.UTC)


def shard_relpath(table: str, key: str) -> str:
    return f"{table}/shard-{key}.parquet"


def conform(table: str, frame: pl.DataFrame | pa.Table, *, run_id: str, stage: str) -> pa.Table:
    """Add provenance columns and cast to the table's schema (missing nullable -> null)."""
    schema = TABLES[table]
    if isinstance(frame, pa.Table) and frame.schema.equals(schema):  # conformed already (the gate saw it)
        return frame
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
    # what `prefcurate repair` needs to re-register the file without its catalog
    data = data.replace_schema_metadata({**(data.schema.metadata or {}), **shard_metadata(table, key, run_id, stage)})
    _write_parquet_atomically(data, final)
    return ShardInfo(table, key, relpath, data.num_rows, run_id, stage)


def _write_parquet_atomically(data: pa.Table, final: Path) -> None:
    """A complete file at ``final`` or none: temporary name, fsync, rename."""
    temporary = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(data, temporary, compression="zstd", use_dictionary=dictionary_columns(data))
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, final)


def dictionary_columns(data: pa.Table, sample: int = 1024) -> list[str]:
    """Columns worth Parquet's dictionary encoding: those repeating within their first rows.

    The writer's default dictionary-encodes every column and falls back to plain once a
    dictionary outgrows its page; for ids and texts (all distinct) that is hashing every
    value for nothing: ingest's shard writes took 40% longer and the files were 25% larger.
    Nested columns (embedding vectors) never repeat their values.
    """
    head = data.slice(0, sample)
    return [field.name for field in head.schema
            if head.num_rows and not pa.types.is_nested(field.type)
            and pc.count_distinct(head.column(field.name), mode="all").as_py() <= head.num_rows // 2]


def shard_metadata(table: str, key: str, run_id: str, stage: str) -> dict[bytes, bytes]:
    return {b"prefcurate.shard": json.dumps({"table": table, "key": key, "run_id": run_id, "stage": stage,
                                             "code_version": code_version()}).encode()}


def _process_started(pid: int) -> float | None:
    """Start time of a process (seconds since the epoch): tells a reused pid from its holder."""
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


#: columns of ``runs`` added after format 1 was released (an older catalog gets them on open)
RUN_COLUMNS = {"pid", "host", "process_started"}


def _catalog_fingerprint() -> str:
    """Changes whenever a table schema or report view changes: then open() rebuilds them."""
    import hashlib

    from prefcurate.schemas.views import REPORT_VIEWS

    text = json.dumps([[t, str(s)] for t, s in TABLES.items()] + sorted(REPORT_VIEWS.items()) + ["unit_counts-1", STAGE_REPORTS_DDL, "table_schema-1", "prompt_keys-1"])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sql_list(paths: Sequence[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


#: what the key index reads of a prompt shard
_PROMPT_ID_COLUMNS = {"prompt_id": pl.String, "source_id": pl.String}


def _insert_keys(con: duckdb.DuckDBPyConnection, keyed: pl.DataFrame) -> None:
    con.register("_new_prompt_keys", keyed.select("prompt_key", "source_key").to_arrow())
    try:
        con.execute(f"INSERT INTO {PROMPT_KEYS} SELECT prompt_key, source_key FROM _new_prompt_keys")
    finally:
        con.unregister("_new_prompt_keys")


_SHARD_COLUMNS = ("table_name", "shard_key", "path", "rows", "run_id", "stage", "registered_at")
_UNIT_COUNT_COLUMNS = ("stage", "unit_key", "run_id", "counts", "registered_at")


def _insert_rows(con: duckdb.DuckDBPyConnection, insert: str, columns: Sequence[str], rows: list[list]) -> None:
    """``insert`` (``INSERT INTO table``...) of many rows in one statement (``executemany``
    runs one per row, ~1 ms each: a batch of 200 units' registrations spent 0.4 s there)."""
    con.register("_new_rows", pa.Table.from_pylist([dict(zip(columns, row, strict=True)) for row in rows]))
    try:
        con.execute(f"{insert} ({', '.join(columns)}) SELECT {', '.join(columns)} FROM _new_rows")
    finally:
        con.unregister("_new_rows")


def prompt_keys(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` (``prompt_id``, ``source_id``) with their :data:`PROMPT_KEYS` keys
    ``prompt_key`` and ``source_key`` (null where the source id is)."""
    import polars_hash as plh

    return frame.with_columns(plh.col("prompt_id").nchash.xxh3_64().alias("prompt_key"),
                              plh.col("source_id").nchash.xxh3_64().alias("source_key"))


def run_is_alive(pid, host, process_started) -> bool | None:
    """Whether the process that started a run still runs (None: it ran on another host)."""
    import socket

    if pid is None or host != socket.gethostname():
        return None
    started = _process_started(int(pid))
    if started is None:
        return False
    return process_started is None or abs(started - float(process_started)) < 1.0


def with_interrupted_runs(runs: pl.DataFrame) -> pl.DataFrame:
    """``status`` of runs whose process died while ``running`` becomes ``interrupted``."""
    if "pid" not in runs.columns or runs.height == 0:
        return runs
    dead = [
        status == "running" and run_is_alive(pid, host, started) is False
        for status, pid, host, started in zip(runs["status"], runs["pid"], runs["host"], runs["process_started"])
    ]
    return runs.with_columns(
        pl.when(pl.Series(dead, dtype=pl.Boolean)).then(pl.lit("interrupted")).otherwise(pl.col("status")).alias("status")
    )


_checked_catalogs: set[tuple] = set()  # (root, inode, device, size, mtime): unchanged since checked
_held_locks: dict[str, list] = {}


class Store:
    """A dataset directory. Create with :meth:`init`, open with :meth:`open`."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.catalog = self.root / CATALOG
        from prefcurate.object_store import ObjectShards

        #: where the shards live when not under ``root`` (an S3-compatible store), else None
        self.objects = ObjectShards.from_marker(self.root / MARKER)

    # ---- lifecycle -------------------------------------------------------------------
    @classmethod
    def init(cls, root: str | Path, shards_uri: str | None = None,
             endpoint_url: str | None = None) -> Store:
        """``shards_uri`` (``s3://bucket/prefix``): keep the shards on an S3-compatible store
        (see :mod:`prefcurate.object_store`); the catalog stays in ``root``."""
        root = Path(root)
        objects = None
        if shards_uri:
            from prefcurate.object_store import ObjectShards

            objects = ObjectShards.parse(shards_uri, endpoint_url)
            if (root / MARKER).exists() and cls(root).objects != objects:
                raise NotADatasetError(f"{root} is already a dataset whose shards are not at {objects.uri}")
            objects.check_reachable()
        if root.exists() and not (root / MARKER).exists() and not (root / WRITER_LOCK).exists() \
                and any(root.iterdir()):
            raise NotADatasetError(
                f"{root} exists, is not empty and is not a prefcurate dataset; "
                "choose a new or empty directory"
            )
        root.mkdir(parents=True, exist_ok=True)
        store = cls(root)
        if not (root / MARKER).exists():
            with store.writer_lock("init"):  # a concurrent init of the same directory finishes first
                if not (root / MARKER).exists():
                    if any(p.name != WRITER_LOCK for p in root.iterdir()):
                        raise NotADatasetError(
                            f"{root} exists, is not empty and is not a prefcurate dataset; "
                            "choose a new or empty directory"
                        )
                    instance = uuid.uuid4().hex
                    with store.connect(create=True) as con:
                        store._create_catalog(con)
                        con.execute("INSERT OR REPLACE INTO _meta VALUES ('instance_id', ?)", [instance])
                    (root / MARKER).write_text(
                        json.dumps({"format_version": FORMAT_VERSION, "created_by": code_version(),
                                    "instance_id": instance, **(objects.marker_fields() if objects else {})})
                    )
                    store.objects = objects
                    _checked_catalogs.add(store._catalog_token())  # made just now, by this code
        return store

    @classmethod
    def open(cls, root: str | Path, upgrade: bool = True, check_catalog: bool = True) -> Store:
        """``upgrade=False`` (readers such as `prefcurate sql`): an earlier version's catalog is
        checked but left as it is, so that reading never writes the dataset.

        ``check_catalog=False``: the catalog is not checked here, because the process that
        holds the dataset's writer lock has checked (and upgraded) it for the work at hand, as
        a stage's coordinator does for its units' workers."""
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
        except (ValueError, KeyError, TypeError) as error:
            raise NotADatasetError(f"{marker} is corrupt: {error}") from error
        if version != FORMAT_VERSION:
            raise NotADatasetError(
                f"{root} has dataset format {version}; this prefcurate ({code_version()}) reads format "
                f"{FORMAT_VERSION} (see {MARKER}); use the prefcurate version that wrote it"
            )
        store = cls(root)
        if check_catalog:
            store.check_catalog(upgrade)
        return store

    @classmethod
    def open_or_init(cls, root: str | Path) -> Store:
        return cls.open(root) if (Path(root) / MARKER).exists() else cls.init(root)

    def instance_id(self) -> str:
        """Unique per created dataset: a re-created directory gets a new one."""
        try:
            return json.loads((self.root / MARKER).read_text()).get("instance_id", "")
        except (OSError, ValueError, AttributeError):
            return ""

    def _repair_hint(self) -> str:
        return (f"restore it from a backup, or re-create it from the shard files with "
                f"`prefcurate repair -d {self.root}` (it moves a broken catalog aside, deleting nothing)")

    def check_catalog(self, upgrade: bool = True) -> None:
        """Refuse a missing, corrupt or foreign catalog; upgrade one written by an earlier
        version (missing tables created, views rebuilt). Checked again only when the file
        changed since this process last checked it."""
        if not self.catalog.is_file():
            raise CatalogError(f"the catalog {self.catalog} is missing; {self._repair_hint()}")
        token = self._catalog_token()
        if token in _checked_catalogs:
            return
        with self.connect(read_only=True) as con:
            try:
                names = {row[0] for row in con.execute(
                    "SELECT table_name FROM information_schema.tables").fetchall()}
                meta = dict(con.execute("SELECT key, value FROM _meta").fetchall()) if "_meta" in names else {}
                run_columns = {row[0] for row in con.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = 'runs'").fetchall()}
            except duckdb.Error as error:
                raise CatalogError(f"the catalog {self.catalog} cannot be read ({error}); "
                                   f"{self._repair_hint()}") from None
        if not {"_shards", "runs"} <= names:
            raise CatalogError(
                f"{self.catalog} is a DuckDB file but not this dataset's catalog (no shard registry); "
                f"{self._repair_hint()}"
            )
        owner = meta.get("instance_id")
        if owner and self.instance_id() and owner != self.instance_id():
            raise CatalogError(
                f"{self.catalog} is the catalog of another dataset (instance {owner}, this one is "
                f"{self.instance_id()}); {self._repair_hint()}"
            )
        if meta.get("schema") != _catalog_fingerprint() or not RUN_COLUMNS <= run_columns:
            if not upgrade:
                return
            with self.connect() as con:
                con.execute("BEGIN")
                self._create_catalog(con)
                con.execute("COMMIT")
            token = self._catalog_token()
        _checked_catalogs.add(token)

    def _catalog_token(self) -> tuple | None:
        try:
            stat = self.catalog.stat()
        except FileNotFoundError:
            return None
        return (str(self.root), stat.st_ino, stat.st_dev, stat.st_size, stat.st_mtime_ns)

    @contextlib.contextmanager
    def connect(self, read_only: bool = False, attempts: int = 60,
                create: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection; waits while another process holds DuckDB's file lock."""
        if not create and not self.catalog.is_file():
            raise CatalogError(f"the catalog {self.catalog} is missing; {self._repair_hint()}")
        for attempt in range(attempts):
            try:
                con = duckdb.connect(str(self.catalog), read_only=read_only)
                if self.objects is not None:  # the views read s3:// shards through fsspec
                    self.objects.register_on(con)
                break
            except duckdb.Error as error:
                locked = "lock" in str(error).lower()
                if locked and attempt < attempts - 1:
                    time.sleep(0.25)
                    continue
                if locked:
                    raise DatasetBusyError(
                        f"the catalog {self.catalog} stayed locked by another process: {error}") from None
                raise CatalogError(
                    f"the catalog {self.catalog} is not a usable DuckDB database ({error}); "
                    f"{self._repair_hint()}"
                ) from None
        # a catalog this process checked and then wrote itself needs no check when next
        # opened (the check took 35-50 ms, after every registration, of a 1,000-prompt file's ~150)
        checked = not read_only and self._catalog_token() in _checked_catalogs
        try:
            yield con
        finally:
            con.close()
            if checked:
                _checked_catalogs.add(self._catalog_token())

    # ---- one writer per dataset ----------------------------------------------------------
    def lock_holder(self) -> str:
        try:
            holder = json.loads((self.root / WRITER_LOCK).read_text() or "{}")
        except (OSError, ValueError):
            holder = {}
        if not holder:
            return "another process"
        return f"pid {holder.get('pid')} ({holder.get('command')}, since {holder.get('since')})"

    @contextlib.contextmanager
    def writer_lock(self, command: str, wait: bool = True, timeout_s: float | None = None,
                    notify=None) -> Iterator[None]:
        """Hold the dataset's writer lock (``flock`` on ``.writer.lock``) for a whole command.

        Re-entrant within a process (a build holds it across its stage flows). Readers
        (`sql`, `status`) never take it. A second writer waits (telling ``notify`` once who
        holds it) up to ``timeout_s`` (default $PREFCURATE_WRITER_TIMEOUT_S, else 1 hour), or
        with ``wait=False`` fails at once with :class:`DatasetBusyError`. The kernel drops
        the lock when its holder dies, so a killed writer never blocks the next one.
        """
        import fcntl
        import logging
        import socket

        key = str(self.root)
        if key in _held_locks:
            _held_locks[key][1] += 1
            try:
                yield
            finally:
                _held_locks[key][1] -= 1
            return
        if timeout_s is None:
            timeout_s = float(os.environ.get("PREFCURATE_WRITER_TIMEOUT_S", "3600"))
        handle = open(self.root / WRITER_LOCK, "a+")  # noqa: SIM115  (held open: the flock lives on it)
        deadline = time.monotonic() + timeout_s
        told = False
        try:
            while True:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    busy = f"dataset busy: {self.root} is held by {self.lock_holder()}"
                    if not wait:
                        raise DatasetBusyError(f"{busy}; run again when it has finished, or without "
                                               "--no-wait to wait for it") from None
                    if time.monotonic() > deadline:
                        raise DatasetBusyError(f"{busy}; gave up waiting after {timeout_s:.0f} s "
                                               "(PREFCURATE_WRITER_TIMEOUT_S)") from None
                    if not told:
                        (notify or logging.getLogger(__name__).warning)(f"{busy}; waiting for it to finish")
                        told = True
                    time.sleep(0.2)
        except BaseException:
            handle.close()
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                                 "since": f"{now_utc():%Y-%m-%d %H:%M:%S} UTC"}))
        handle.flush()
        _held_locks[key] = [handle, 1]
        try:
            yield
        finally:
            _held_locks.pop(key, None)
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()

    def _create_catalog(self, con: duckdb.DuckDBPyConnection) -> None:
        """Create what is missing (also upgrades a catalog of an earlier version in place)."""
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
            ALTER TABLE runs ADD COLUMN IF NOT EXISTS pid BIGINT;
            ALTER TABLE runs ADD COLUMN IF NOT EXISTS host VARCHAR;
            ALTER TABLE runs ADD COLUMN IF NOT EXISTS process_started DOUBLE;
            CREATE TABLE IF NOT EXISTS _meta (key VARCHAR PRIMARY KEY, value VARCHAR);
            CREATE TABLE IF NOT EXISTS unit_counts (
                stage VARCHAR NOT NULL, unit_key VARCHAR NOT NULL, run_id VARCHAR NOT NULL,
                counts JSON NOT NULL, registered_at TIMESTAMPTZ NOT NULL, PRIMARY KEY (stage, unit_key));
            """
        )
        con.execute(STAGE_REPORTS_DDL)
        self._create_prompt_keys(con)
        for table, schema in TABLES.items():
            empty = pa.Table.from_pylist([], schema=schema)
            con.register("_arrow_empty", empty)
            con.execute(f"CREATE OR REPLACE TABLE _empty_{table} AS SELECT * FROM _arrow_empty")
            con.unregister("_arrow_empty")
        self._note_schema_changes(con)
        self._rebuild_views(con, list(TABLES))
        self._create_report_views(con)
        con.execute("INSERT OR REPLACE INTO _meta VALUES ('schema', ?)", [_catalog_fingerprint()])
        if self.instance_id():
            con.execute("INSERT OR IGNORE INTO _meta VALUES ('instance_id', ?)", [self.instance_id()])

    def _create_prompt_keys(self, con: duckdb.DuckDBPyConnection) -> None:
        """The :data:`PROMPT_KEYS` index; a catalog of a version without it gets it filled
        from the registered prompt shards, once (``_meta`` key ``prompt_keys`` says it is)."""
        con.execute(f"CREATE TABLE IF NOT EXISTS {PROMPT_KEYS} (prompt_key UBIGINT NOT NULL, source_key UBIGINT)")
        if con.execute("SELECT count(*) FROM _meta WHERE key = 'prompt_keys'").fetchall()[0][0]:
            return
        paths = [path for (path,) in con.execute(
            "SELECT path FROM _shards WHERE table_name = 'prompts' AND rows > 0").fetchall()]
        if paths:
            con.execute(f"DELETE FROM {PROMPT_KEYS}")
            _insert_keys(con, prompt_keys(self.prompt_ids_in(paths)))
        con.execute("INSERT OR REPLACE INTO _meta VALUES ('prompt_keys', 'complete')")

    def _create_report_views(self, con: duckdb.DuckDBPyConnection) -> None:
        from prefcurate.schemas.views import REPORT_VIEWS

        for name, sql in REPORT_VIEWS.items():
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")

    def _rebuild_views(self, con: duckdb.DuckDBPyConnection, tables: Sequence[str]) -> None:
        mixed = {key.removeprefix("mixed_schemas.") for (key,) in con.execute(
            "SELECT key FROM _meta WHERE key LIKE 'mixed_schemas.%'").fetchall()}
        listed_paths = dict(con.execute(
            "SELECT table_name, list(path ORDER BY registered_at, path) FROM _shards "
            "WHERE table_name IN (SELECT unnest(?)) GROUP BY table_name", [list(tables)]).fetchall())
        for table in tables:
            paths = [self.shard_url(path) for path in listed_paths.get(table) or []]
            select = f"SELECT * FROM _empty_{table}"
            if paths:
                listed = ", ".join("'" + p.replace("'", "''") + "'" for p in paths)
                # Shards written with the current schema share it: DuckDB binds the first
                # file's footer and matches columns by name. Only a table holding shards from
                # before a schema change reads by name across files (a column added since reads
                # as NULL), which opens every footer at bind time, on every query of the view.
                by_name = ", union_by_name = true" if table in mixed else ""
                select += f" UNION ALL BY NAME SELECT * FROM read_parquet([{listed}]{by_name})"
            con.execute(f"CREATE OR REPLACE VIEW {table} AS {select}")
        con.execute(
            "INSERT OR REPLACE INTO _meta VALUES ('root', ?)", [str(self.root)]
        )

    def _note_schema_changes(self, con: duckdb.DuckDBPyConnection, all_shards_suspect: bool = False) -> None:
        """Mark the tables whose registered shards may predate their current schema
        (``mixed_schemas.<table>`` in ``_meta``; their views read by name, see
        :meth:`_rebuild_views`). Conservative: a catalog that never recorded a table's schema,
        or ``all_shards_suspect`` (repair registers files of any age), marks every table with
        shards."""
        stored = dict(con.execute("SELECT key, value FROM _meta WHERE key LIKE 'table_schema.%'").fetchall())
        with_shards = {table for (table,) in con.execute("SELECT DISTINCT table_name FROM _shards").fetchall()}
        for table, schema in TABLES.items():
            fingerprint = hashlib.sha256(str(schema).encode()).hexdigest()[:16]
            if table in with_shards and (all_shards_suspect or stored.get(f"table_schema.{table}") != fingerprint):
                con.execute("INSERT OR REPLACE INTO _meta VALUES (?, 'true')", [f"mixed_schemas.{table}"])
            con.execute("INSERT OR REPLACE INTO _meta VALUES (?, ?)", [f"table_schema.{table}", fingerprint])

    def refresh_views(self) -> None:
        """Rebuild all views, e.g. after the dataset directory was moved."""
        with self.connect() as con:
            con.execute("BEGIN")
            self._rebuild_views(con, list(TABLES))
            self._create_report_views(con)
            con.execute("COMMIT")

    # ---- shards ----------------------------------------------------------------------
    def write(self, table: str, frame, *, key: str, run_id: str, stage: str) -> ShardInfo:
        if self.objects is not None:
            from prefcurate.object_store import write_object_shard

            return write_object_shard(self.objects, table, frame, key=key, run_id=run_id, stage=stage)
        return write_shard(self.root, table, frame, key=key, run_id=run_id, stage=stage)

    def shard_url(self, relpath: str) -> str:
        """What DuckDB reads for a shard: its local path, or its ``s3://`` URL."""
        if self.objects is not None:
            return self.objects.url(relpath)
        # (a view lists every shard: pathlib's join took 9 us a path, 53 ms a registration at 6,000 shards)
        return f"{str(self.root).rstrip('/')}/{relpath}"

    def storage_options(self) -> dict | None:
        """``storage_options`` for ``pl.scan_parquet`` over :meth:`shard_url` paths."""
        return self.objects.polars_options() if self.objects is not None else None

    @contextlib.contextmanager
    def scratch_folder(self, prefix: str) -> Iterator[Path]:
        """A temporary folder for a stage's working copy, removed after it.

        A local dataset's is under ``_tmp/`` in the dataset, on the disk that holds the
        shards it copies (as DuckDB keeps its spill files beside its database), not in
        ``$TMPDIR``, often a small disk or RAM (tmpfs); an ``s3://`` dataset's is in
        ``$TMPDIR``. A folder a killed run left is removed when the next one with the same
        ``prefix`` is made: a dataset's stages run one at a time (the writer lock).
        """
        import shutil
        import tempfile

        parent = None if self.objects is not None else self.root / SCRATCH_DIR
        if parent is not None:
            parent.mkdir(exist_ok=True)
            for left in parent.glob(f"{prefix}*"):
                shutil.rmtree(left, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=prefix if parent else f"prefcurate-{prefix}", dir=parent) as folder:
            yield Path(folder)

    def shard_exists(self, relpath: str) -> bool:
        return self.objects.exists(relpath) if self.objects is not None else (self.root / relpath).exists()

    def register(self, shards: Sequence[ShardInfo], unit: tuple[str, str] | None = None,
                 counts: dict | None = None) -> int:
        """Register complete shard files in one transaction; returns how many were new.

        ``unit`` (stage, unit key) with ``counts`` records the unit's counts in the same
        transaction, once per unit: a crash right after registration keeps its accounting,
        and a unit registered by a concurrent run is not counted twice. Ids of
        prompts already present are left out of a new shard (its file is
        rewritten without them) and counted as duplicates.
        """
        return self._register_batch([(shards, unit, counts)])

    def register_units(self, stage: str, finished: Sequence[tuple[str, Sequence[ShardInfo], dict | None]]) -> int:
        """:meth:`register` for several finished units of ``stage`` ((unit key, shards,
        counts) each) in one transaction: one catalog connection and one rebuild of the
        views for all of them (a registration costs ~50 ms, most of it the connection and the
        views, whatever its size). A prompt id in two of the units is kept once, as when they
        are registered one after the other. All or none are registered."""
        return self._register_batch([(shards, (stage, key), counts) for key, shards, counts in finished])

    def _register_batch(self, batch: Sequence[tuple[Sequence[ShardInfo], tuple[str, str] | None, dict | None]]) -> int:
        batch = [([s for s in shards if s is not None], unit, counts) for shards, unit, counts in batch]
        batch = [entry for entry in batch if entry[0] or entry[1] is not None]
        if not batch:
            return 0
        for shards, _, _ in batch:
            for shard in shards:
                if not self.shard_exists(shard.path):
                    raise StoreError(f"cannot register {shard.path}: the file does not exist")
        with self.connect() as con:
            con.execute("BEGIN")
            try:
                new = self._register_in(con, [entry for entry in batch if entry[0]])
                for shards, unit, counts in batch:
                    if not shards:  # a unit that writes files, not tables (export): done all the same
                        self._record_unit_in(con, unit, counts)
                tables = sorted({shard.table for shards, _, _ in batch for shard in shards})
                if tables:
                    self._rebuild_views(con, tables)
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
        return new

    def _register_in(self, con, batch: Sequence[tuple[Sequence[ShardInfo], tuple[str, str] | None, dict | None]],
                     pending: dict[str, list[str]] | None = None) -> int:
        """Register each (shards, unit, counts) of ``batch`` in ``con``'s transaction, in
        order, as if one after the other; returns how many shards were new. ``pending``: the
        shard URLs this transaction registered before, per table (added to)."""
        pending = {} if pending is None else pending
        registered = {(table, key) for table, key in con.execute(
            "SELECT table_name, shard_key FROM _shards WHERE shard_key IN (SELECT unnest(?))",
            [sorted({s.key for shards, _, _ in batch for s in shards})]).fetchall()}
        fresh_of_entry = []
        for shards, _, _ in batch:
            fresh = []
            for shard in shards:  # (a shard listed twice is registered once)
                if (shard.table, shard.key) not in registered:
                    registered.add((shard.table, shard.key))
                    fresh.append(shard)
            fresh_of_entry.append(fresh)
        # prompts have one id each: registration never adds one already present, so two
        # writers that bypass the writer lock still cannot duplicate a prompt (all the
        # batch's prompt shards at once, in order: an id in two of them stays in the first)
        prompts = [s for fresh in fresh_of_entry for s in fresh if s.table == "prompts" and s.rows]
        removed = self._drop_present_prompts(con, prompts, pending.get("prompts", [])) if prompts else {}
        shard_rows, unit_rows = [], []
        for (shards, unit, counts), fresh in zip(batch, fresh_of_entry, strict=True):
            counts = dict(counts or {})
            for shard in fresh:
                rows = shard.rows - removed.get(shard.path, 0)
                if removed.get(shard.path) and "accepted" in counts:
                    counts["accepted"] -= removed[shard.path]
                    counts["duplicates"] = counts.get("duplicates", 0) + removed[shard.path]
                shard_rows.append([shard.table, shard.key, shard.path, rows, shard.run_id, shard.stage, now_utc()])
                pending.setdefault(shard.table, []).append(self.shard_url(shard.path))
            if unit is not None and fresh:
                unit_rows.append([unit[0], unit[1], shards[0].run_id, json.dumps(counts, default=str), now_utc()])
        if shard_rows:
            _insert_rows(con, "INSERT INTO _shards", _SHARD_COLUMNS, shard_rows)
        if unit_rows:  # (a unit listed twice is counted once, as INSERT OR IGNORE does across statements)
            firsts: dict[tuple[str, str], list] = {}
            for row in unit_rows:
                firsts.setdefault((row[0], row[1]), row)
            _insert_rows(con, "INSERT OR IGNORE INTO unit_counts", _UNIT_COUNT_COLUMNS, list(firsts.values()))
        return sum(map(len, fresh_of_entry))

    @staticmethod
    def _record_unit_in(con, unit: tuple[str, str], counts: dict | None) -> None:
        """Record a unit (stage, unit key) as done, once, without shards (its output is files)."""
        con.execute("INSERT OR IGNORE INTO unit_counts VALUES (?, ?, ?, ?, ?)",
                    [unit[0], unit[1], "", json.dumps(counts or {}, default=str), now_utc()])

    def recorded_units(self, stage: str) -> dict[str, dict]:
        """{unit key: its counts} of the units of ``stage`` recorded as done (:meth:`register`,
        :meth:`register_units`)."""
        with self.connect(read_only=True) as con:
            rows = con.execute("SELECT unit_key, counts FROM unit_counts WHERE stage = ?", [stage]).fetchall()
        return {key: json.loads(counts) for key, counts in rows}

    def prompt_ids_in(self, paths: Sequence[str]) -> pl.DataFrame:
        """``prompt_id``, ``source_id`` and ``position`` (the shard's place in ``paths``) of
        the rows of prompt shards. (polars reads the two columns in a third of the time
        DuckDB's read_parquet took; a shard written before ``source_id`` existed reads null.)"""
        return pl.concat([
            pl.scan_parquet(self.shard_url(path), storage_options=self.storage_options(),
                            schema=_PROMPT_ID_COLUMNS, missing_columns="insert", extra_columns="ignore")
            .with_columns(pl.lit(position, pl.Int64).alias("position"))
            for position, path in enumerate(paths)
        ]).collect()

    def _drop_present_prompts(self, con, shards: list[ShardInfo], pending: list[str]) -> dict[str, int]:
        """Rewrite those of the prompt ``shards`` that hold ids the table, this transaction or
        an earlier shard of the list already holds, and add the kept rows to :data:`PROMPT_KEYS`;
        returns {shard path: rows left out}.

        Reads the new shards and the key index, never the table's shards: ids are compared
        with the table's only where their key matches one it has (none, for new prompts).
        """
        new = prompt_keys(self.prompt_ids_in([shard.path for shard in shards]))
        # an id in two of the new shards: the later shard leaves it out (distinct keys prove
        # there is none: 0.02 s on 1M ids, where finding the repeated ones took 0.08 s)
        repeated = new.clear()
        distinct_keys = new["prompt_key"].n_unique() == new.height
        if not distinct_keys:
            shared = new.filter(pl.col("prompt_key").is_duplicated())
            repeated = shared.filter(pl.col("position") > pl.col("position").min().over("prompt_id"))
        unit_keys = new.select("prompt_key")
        con.register("_unit_keys", (unit_keys if distinct_keys else unit_keys.unique()).to_arrow())
        try:
            matched = con.sql(f"SELECT DISTINCT prompt_key FROM {PROMPT_KEYS} "
                              "WHERE prompt_key IN (SELECT prompt_key FROM _unit_keys)").pl()
        finally:
            con.unregister("_unit_keys")
        present = new.clear()
        if matched.height:
            candidates = new.join(matched, on="prompt_key", how="semi")["prompt_id"].unique().to_list()
            held = "SELECT prompt_id AS id FROM prompts"
            if pending:
                held += f" UNION ALL SELECT prompt_id FROM read_parquet({_sql_list(pending)})"
            found = con.sql(f"SELECT DISTINCT id FROM ({held}) WHERE id IN (SELECT unnest(?))",
                            params=[candidates]).pl()
            present = new.filter(pl.col("prompt_id").is_in(found["id"].implode()))
        dropped = pl.concat([present, repeated]).select("position", "prompt_id").unique()
        _insert_keys(con, new.join(dropped, on=["position", "prompt_id"], how="anti") if dropped.height else new)
        by_shard = dict(dropped.group_by("position").agg("prompt_id").iter_rows())
        return {shards[i].path: self._rewrite_without(shards[i], "prompt_id", ids) for i, ids in by_shard.items()}

    def _rewrite_without(self, shard: ShardInfo, id_column: str, ids: list[str]) -> int:
        path = self.shard_url(shard.path)
        data = self.objects.read_arrow(shard.path) if self.objects is not None else pq.read_table(path)
        kept = data.filter(pc.invert(pc.is_in(data[id_column], pa.array(ids, pa.string()))))
        if self.objects is not None:
            self.objects.write(shard.path, kept)
            return data.num_rows - kept.num_rows
        _write_parquet_atomically(kept, Path(path))
        return data.num_rows - kept.num_rows

    def commit(self, table: str, frame, *, key: str, run_id: str, stage: str) -> ShardInfo:
        """Write and register one shard (coordinator-side convenience)."""
        shard = self.write(table, frame, key=key, run_id=run_id, stage=stage)
        self.register([shard])
        return shard

    def registered_keys(self, table: str) -> set[str]:
        return self.registered_keys_of([table])[table]

    def registered_keys_of(self, tables: Sequence[str]) -> dict[str, set[str]]:
        """{table: its registered shard keys} of ``tables``, from one catalog query."""
        keys: dict[str, set[str]] = {table: set() for table in tables}
        if not keys:
            return keys
        with self.connect(read_only=True) as con:
            rows = con.execute("SELECT table_name, shard_key FROM _shards WHERE table_name IN (SELECT unnest(?))",
                               [list(keys)]).fetchall()
        for table, key in rows:
            keys[table].add(key)
        return keys

    def adopt_complete_shard(self, table: str, key: str, run_id: str, stage: str) -> ShardInfo | None:
        """A complete but unregistered shard file left by a crash, as a ShardInfo."""
        if self.objects is not None:
            if not self.objects.exists(shard_relpath(table, key)):
                return None
            rows = self.objects.num_rows(shard_relpath(table, key))
            return ShardInfo(table, key, shard_relpath(table, key), rows, run_id, stage)
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
        if self.objects is not None:
            return self.objects.read(path)
        return pl.read_parquet(self.root / path)

    def sweep_temporary_files(self, older_than_s: float = 3600.0) -> int:
        """Delete temporary files of writes that crashed before their rename.

        Only files older than ``older_than_s``: a run writing into the same dataset right
        now (a stage flow started by hand beside a build) keeps its in-flight files.
        """
        cutoff = time.time() - older_than_s
        removed = self.objects.sweep(TABLES, older_than_s) if self.objects is not None else 0
        for table in TABLES:
            for temporary in (self.root / table).glob(".shard-*.tmp"):
                try:
                    if temporary.stat().st_mtime < cutoff:
                        temporary.unlink()
                        removed += 1
                except FileNotFoundError:  # renamed or swept by someone else meanwhile
                    pass
        return removed

    # ---- recovery ------------------------------------------------------------------
    @classmethod
    def repair(cls, root: str | Path) -> dict:
        """Re-create the catalog from the shard files and the units' manifests.

        Shards are the data and the catalog only their index: every shard listed by a
        complete unit manifest (``_units/<stage>/<key>.json``, written after all its files)
        is registered once, with the unit's counts where the manifest has them. Temporary
        files (``.*.tmp``) are ignored; shard files no complete manifest lists (a unit killed
        mid-way, redone by the next run) stay unregistered. The old catalog is moved aside to
        ``catalog.duckdb.broken-<time>``; nothing is deleted. Returns what was done.
        """
        root = Path(root)
        if not (root / MARKER).is_file():
            raise NotADatasetError(f"{root} is not a prefcurate dataset (no {MARKER}); nothing to repair")
        store = cls(root)
        with store.writer_lock("prefcurate repair", wait=False):
            moved = []
            stamp = f"{now_utc():%Y%m%dT%H%M%S}"
            for path in (store.catalog, store.catalog.with_name(CATALOG + ".wal")):
                if path.exists():
                    target = path.with_name(f"{path.name}.broken-{stamp}")
                    os.replace(path, target)
                    moved.append(target.name)
            units = []
            for manifest in (store.root / "_units").glob("*/*.json"):
                if manifest.name.startswith("."):
                    continue
                try:
                    recorded = json.loads(manifest.read_text())
                    shards = [ShardInfo(**item) for item in recorded["shards"]]
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                if all(store.shard_exists(shard.path) for shard in shards):
                    units.append((manifest.stat().st_mtime, manifest.parent.name, recorded["unit"], shards,
                                  recorded.get("counts")))
            units.sort(key=lambda unit: unit[0])  # about the order they were registered in
            listed = {shard.path for unit in units for shard in unit[3]}
            unlisted = sorted(
                relpath for table in TABLES
                for relpath in (store.objects.list_shards(table) if store.objects is not None else
                                (str(path.relative_to(store.root))
                                 for path in (store.root / table).glob("shard-*.parquet")))
                if relpath not in listed
            )
            run_ids: dict[str, str] = {}
            without_counts = 0
            pending: dict[str, list[str]] = {}
            with store.connect(create=True) as con:
                con.execute("BEGIN")
                store._create_catalog(con)
                registered = 0
                for _, stage, unit_key, shards, counts in units:
                    registered += store._register_in(
                        con, [(shards, (stage, unit_key) if counts is not None else None, counts)], pending)
                    without_counts += counts is None
                    for shard in shards:
                        run_ids.setdefault(shard.run_id, shard.stage)
                for run_id, stage in run_ids.items():
                    con.execute(
                        "INSERT OR IGNORE INTO runs (run_id, kind, status, message, code_version, started_at) "
                        "VALUES (?, ?, 'recovered', ?, ?, ?)",
                        [run_id, stage, "re-created by prefcurate repair: parameters, timings and run-level "
                         "counts were in the lost catalog", code_version(), now_utc()],
                    )
                store._note_schema_changes(con, all_shards_suspect=True)  # files of any age
                store._rebuild_views(con, list(TABLES))
                con.execute("COMMIT")
        _checked_catalogs.clear()
        return {"moved_aside": moved, "units": len(units), "shards_registered": registered,
                "runs_recovered": len(run_ids), "units_without_counts": without_counts,
                "unlisted_shards": unlisted}

    # ---- reading ---------------------------------------------------------------------
    def query(self, sql: str, params: Sequence | None = None) -> pl.DataFrame:
        """Run trusted, internal SQL read-only and return a polars frame."""
        with self.connect(read_only=True) as con:
            return con.sql(sql, params=list(params) if params else None).pl()

    def query_shard_files(self, sql: str, params: Sequence | None = None, tables: Sequence[str] = ()) -> pl.DataFrame:
        """Run trusted SQL that reads only shard files it names (``read_parquet``) and the
        ``_empty_<table>`` frames of ``tables``, without opening the catalog: on the process's
        scratch database, those frames made from the tables' schemas as the catalog makes them.

        A unit's lookups of its own files need nothing else from the catalog, and opening it
        cost each of them 15-25 ms (and the file lock, which a registration waits for). Shards
        on an object store are read through the catalog's connection, which knows the store."""
        if self.objects is not None:
            return self.query(sql, params)
        with scratch_cursor() as con:
            for table in tables:
                con.register(f"_empty_{table}", pa.Table.from_pylist([], schema=TABLES[table]))
            return con.sql(sql, params=list(params) if params else None).pl()

    def read(self, table: str, columns: Sequence[str] | None = None, where: str | None = None) -> pl.DataFrame:
        cols = ", ".join(columns) if columns else "*"
        sql = f"SELECT {cols} FROM {table}" + (f" WHERE {where}" if where else "")
        return self.query(sql)

    def count(self, table: str) -> int:
        return int(self.query(f"SELECT count(*) AS n FROM {table}")["n"][0])

    def prompts_sharing_an_id(self, candidates: pl.DataFrame,
                              connection: duckdb.DuckDBPyConnection | None = None) -> pl.DataFrame:
        """(``prompt_id``, ``source_id``) of the dataset's prompts that share a prompt id or a
        source id with one of ``candidates`` (the same two columns), exactly.

        The candidates' keys are joined against :data:`PROMPT_KEYS` first; only candidates
        whose key matches are looked up among the shards' ids (none, when a file brings new
        prompts), so the cost follows the file, not the dataset. ``connection``: a catalog
        connection to use (several lookups in a row), else one is opened.
        """
        candidates = candidates.select("prompt_id", "source_id")
        with contextlib.nullcontext(connection) if connection is not None else self.connect(read_only=True) as con:
            indexed = con.execute("SELECT count(*) FROM _meta WHERE key = 'prompt_keys'").fetchall()[0][0]
            # (an empty dataset: nothing to join, and joining 1M keys against nothing took 0.1 s)
            if not con.execute(f"SELECT EXISTS (SELECT 1 FROM {PROMPT_KEYS if indexed else 'prompts'})"
                               ).fetchall()[0][0]:
                return candidates.clear()
            if indexed:
                keyed = prompt_keys(candidates)
                con.register("_candidate_keys", keyed.select("prompt_key", "source_key").to_arrow())
                # (two semi joins: half the time of one scan with two IN lists)
                hits = con.sql(
                    f"""SELECT DISTINCT prompt_key AS key, true AS by_prompt FROM {PROMPT_KEYS}
                        SEMI JOIN _candidate_keys USING (prompt_key)
                    UNION ALL
                    SELECT DISTINCT source_key, false FROM {PROMPT_KEYS} SEMI JOIN _candidate_keys USING (source_key)"""
                ).pl()
                if not hits.height:
                    return candidates.clear()
                by_prompt = hits.filter("by_prompt")["key"].implode()
                by_source = hits.filter(~pl.col("by_prompt"))["key"].implode()
                candidates = keyed.filter(pl.col("prompt_key").is_in(by_prompt) | pl.col("source_key").is_in(by_source)
                                          ).select("prompt_id", "source_id")
            con.register("candidates", candidates.to_arrow())
            try:
                return con.sql(
                    """
                    SELECT prompt_id, source_id FROM prompts
                    WHERE prompt_id IN (SELECT prompt_id FROM candidates)
                       OR source_id IN (SELECT source_id FROM candidates WHERE source_id IS NOT NULL)
                    """
                ).pl()
            finally:
                con.unregister("candidates")

    def ids(self, table: str, column: str) -> pl.Series:
        return self.query(f"SELECT DISTINCT {column} FROM {table}")[column]

    def stored_ids(self, table: str, column: str, ids: pl.Series) -> pl.Series:
        """Those of ``ids`` that ``table``'s ``column`` already holds, each once.

        Prompts are found through the key index (:meth:`prompts_sharing_an_id`: the cost
        follows ``ids``, not the dataset); other tables have no index, so DuckDB scans
        their id column, but only the matches come back, not every id the table holds."""
        ids = ids.drop_nulls().unique()
        if not ids.len():
            return ids.cast(pl.String)
        if table == "prompts":
            candidates = pl.DataFrame({"prompt_id": ids, "source_id": pl.Series([None] * ids.len(), dtype=pl.String)})
            return self.prompts_sharing_an_id(candidates)["prompt_id"].unique()
        with self.connect(read_only=True) as con:
            con.register("_candidate_ids", pl.DataFrame({"id": ids}).to_arrow())
            found = con.sql(f"SELECT DISTINCT {column} AS id FROM {table} "
                            f"WHERE {column} IN (SELECT id FROM _candidate_ids)").pl()
        return found["id"].alias(column)

    # ---- runs ------------------------------------------------------------------------
    def start_run(self, kind: str, parameters: dict | None = None, run_id: str | None = None) -> str:
        run_id = run_id or f"{now_utc():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        import socket

        with self.connect() as con:
            con.execute(
                "INSERT OR REPLACE INTO runs (run_id, kind, status, parameters, code_version, started_at, "
                "pid, host, process_started) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?)",
                [run_id, kind, json.dumps(parameters or {}, default=str), code_version(), now_utc(),
                 os.getpid(), socket.gethostname(), _process_started(os.getpid())],
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

    def record_reports(self, run_id: str, stage: str, reports: dict[str, dict]) -> None:
        """A stage run's reports (``{name: {source: report}}``, as ``StageStats.reports``)."""
        rows = [[run_id, stage, name, source, json.dumps(report, default=str), now_utc()]
                for name, by_source in reports.items() for source, report in by_source.items()]
        if rows:
            with self.connect() as con:
                con.executemany("INSERT OR REPLACE INTO stage_reports VALUES (?, ?, ?, ?, ?, ?)", rows)

    def latest_reports(self, stage: str, name: str) -> list:
        """The ``name`` reports of the latest completed run of ``stage`` (one per source)."""
        frame = self.query(
            "SELECT r.report FROM stage_reports r JOIN runs USING (run_id) WHERE runs.kind = ? AND "
            "runs.status = 'completed' AND r.name = ? AND runs.started_at = (SELECT max(started_at) FROM runs "
            "WHERE kind = ? AND status = 'completed') ORDER BY r.source", [stage, name, stage])
        return [json.loads(text) for text in frame["report"]]

    def runs(self) -> pl.DataFrame:
        """All runs; a run left ``running`` by a process that is gone reads ``interrupted``."""
        return with_interrupted_runs(self.query("SELECT * FROM runs ORDER BY started_at"))


