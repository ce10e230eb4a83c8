"""Content-addressed ids: the same defining inputs always give the same id."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import polars_hash  # noqa: F401 (registers the expressions' .chash namespace)

ID_HEX_CHARS = 24  # 96 bits: collision-free far past the scales we target


def content_id(*parts: Any) -> str:
    """Hash of the canonical JSON of ``parts`` (dicts key-sorted), as hex."""
    return hashlib.sha256(_canonical(parts).encode("utf-8")).hexdigest()[:ID_HEX_CHARS]


def hex_ids(texts: pl.Expr) -> pl.Expr:
    """The first ID_HEX_CHARS hex digits of each text's sha256 (what ``hashlib`` gives),
    vectorised: stable across versions, unlike polars' own hash; polars-hash's is ~2.5x
    DuckDB's ``sha256`` on 2 cores here (it uses the CPU's SHA instructions)."""
    return texts.chash.sha2_256().str.slice(0, ID_HEX_CHARS)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class Column:
    """A part of :func:`content_ids` that each row fills from its column ``name``.

    ``parts``: the parts one value stands for, when more than itself (a rubric aspect and
    its definition); called once per distinct value."""

    name: str
    parts: Callable[[Any], tuple] | None = None


#: what JSON escapes in a string (with ``ensure_ascii=False``): a text without them is its own JSON body
_JSON_ESCAPED = r'["\\\x00-\x1f]'


def content_ids(rows: pl.DataFrame, *parts: Any) -> pl.Series:
    """``content_id(*parts)`` of every row, where each :class:`Column` part takes the row's
    value: the same ids, without a Python call per row.

    The canonical JSON is assembled by polars: constants encoded once, integer columns as
    their digits, text columns as themselves in quotes when nothing in them needs escaping,
    anything else encoded once per distinct value by ``json`` itself; polars-hash's sha256
    then hashes every row's text in one pass.
    """
    pieces = [_json_of_column(rows, part) if isinstance(part, Column) else _canonical(part) for part in parts]
    merged: list[pl.Expr] = []
    literal = "["  # what comes before the next column's JSON: runs of constants become one literal
    for index, piece in enumerate(pieces):
        literal += "," if index else ""
        if isinstance(piece, str):
            literal += piece
        else:
            merged += [pl.lit(literal), piece]
            literal = ""
    merged.append(pl.lit(literal + "]"))
    return rows.select(hex_ids(pl.concat_str(merged)).alias("id")).to_series()


def _json_of_column(rows: pl.DataFrame, part: Column) -> pl.Expr:
    column, dtype = rows[part.name], rows.schema[part.name]
    nulls = column.null_count()
    if part.parts is None and not nulls:
        if dtype.is_integer():
            return pl.col(part.name).cast(pl.String)
        if dtype == pl.String and not column.str.contains(_JSON_ESCAPED).any():
            return pl.concat_str([pl.lit('"'), pl.col(part.name), pl.lit('"')])
    expand = part.parts or (lambda value: (value,))

    def encoded(value: Any) -> str:
        return ",".join(_canonical(p) for p in expand(value))

    distinct = column.drop_nulls().unique()
    as_json = pl.Series([encoded(value) for value in distinct.to_list()], dtype=pl.String)
    json_of = pl.col(part.name).replace_strict(distinct, as_json, return_dtype=pl.String)
    return json_of.fill_null(encoded(None)) if nulls else json_of


def ordered_pair(first: str, second: str) -> tuple[str, str]:
    """The canonical (response_a, response_b) order of a pair: by id."""
    return (first, second) if first < second else (second, first)


def cache_dir() -> Path:
    """This machine's cache (converted models, file digests): ``$PREFCURATE_CACHE`` or
    ``~/.cache/prefcurate``."""
    return Path(os.environ.get("PREFCURATE_CACHE", Path.home() / ".cache" / "prefcurate"))


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in blocks (inputs and model files can be large).

    Remembered on this machine by the file's stat signature (:class:`_DigestCache`), so a
    re-run that plans a folder of inputs lists the files instead of reading every byte again.
    """
    path = Path(path)
    before = os.stat(path)
    key = str(path.resolve())
    known = _digest_cache().get(key, before)
    if known is not None:
        return known
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    after = os.stat(path)
    if _signature(before) == _signature(after) and time.time_ns() - _changed_ns(after) > _SETTLED_NS:
        _digest_cache().put(key, after, digest.hexdigest())
    return digest.hexdigest()


#: a file changed this recently is not remembered: on a filesystem with coarse timestamps
#: (1-2 s) a second write of the same size within the same tick would leave its stat unchanged
_SETTLED_NS = 3_000_000_000


def _changed_ns(stat: os.stat_result) -> int:
    return max(stat.st_mtime_ns, stat.st_ctime_ns)


def _signature(stat: os.stat_result) -> tuple[int, int, int, int, int]:
    """What changes when a file's bytes do: a rewrite changes the size or the times (the
    change time, ``ctime``, cannot be set back by programs), a replacement the inode."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


class _DigestCache:
    """sha256 of files by (resolved path, stat signature), in a SQLite file of :func:`cache_dir`.

    Best effort: a cache that cannot be opened or written (a read-only home, a locked file)
    costs the hashing it would have saved, never a wrong digest; ``PREFCURATE_DIGEST_CACHE=0``
    turns it off.
    """

    def __init__(self, file: Path | None):
        self._file, self._connection, self._lock = file, None, threading.Lock()

    def _open(self) -> sqlite3.Connection | None:
        if self._connection is None and self._file is not None:
            try:
                self._file.parent.mkdir(parents=True, exist_ok=True)
                connection = sqlite3.connect(self._file, timeout=5, check_same_thread=False, isolation_level=None)
                connection.execute("CREATE TABLE IF NOT EXISTS file_sha256 (path TEXT PRIMARY KEY, dev INTEGER, "
                                   "ino INTEGER, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, sha256 TEXT)")
                self._connection = connection
            except (OSError, sqlite3.Error):
                self._file = None  # not asked again in this process
        return self._connection

    def get(self, path: str, stat: os.stat_result) -> str | None:
        row = self._execute("SELECT dev, ino, size, mtime_ns, ctime_ns, sha256 FROM file_sha256 WHERE path = ?", [path])
        return row[5] if row is not None and tuple(row[:5]) == _signature(stat) else None

    def put(self, path: str, stat: os.stat_result, sha256: str) -> None:
        self._execute("INSERT OR REPLACE INTO file_sha256 VALUES (?, ?, ?, ?, ?, ?, ?)",
                      [path, *_signature(stat), sha256])

    def _execute(self, sql: str, parameters: list) -> tuple | None:
        """The statement's first row; None when there is none or the cache is closed or busy
        (the digest is then simply computed)."""
        with self._lock:
            connection = self._open()
            if connection is None:
                return None
            try:
                return connection.execute(sql, parameters).fetchone()
            except sqlite3.Error:
                return None


_digest_caches: dict[Path | None, _DigestCache] = {}


def _digest_cache() -> _DigestCache:
    """The cache of the current ``cache_dir()`` (tests and users may point it elsewhere)."""
    file = None if os.environ.get("PREFCURATE_DIGEST_CACHE", "1") == "0" else cache_dir() / "file_digests.sqlite"
    if file not in _digest_caches:
        _digest_caches[file] = _DigestCache(file)
    return _digest_caches[file]


_inherited: list[_DigestCache] = []


def _after_fork_in_child() -> None:
    """A forked child opens its own connection: SQLite connections must not cross a fork, and
    the parent's are kept unclosed here (closing one could disturb the parent's file)."""
    _inherited.extend(_digest_caches.values())
    _digest_caches.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
