"""Shards on an S3-compatible object store; the DuckDB catalog stays local, one writer.

Opt-in per dataset, chosen when it is created (``prefcurate init DIR --shards-uri
s3://bucket/prefix [--endpoint-url URL]``) and recorded in its ``prefcurate.json`` (never the
credentials: they come from the usual AWS variables, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``, as botocore reads
them). A dataset without it keeps its shards on the local disk, as before.

The visibility rule is the local one: a shard is uploaded under a temporary key
(``<table>/.shard-<key>.parquet.<uuid>.tmp``), copied to its final key when complete
(copy-then-register: the coordinator registers only final keys), and exists only once the
catalog registers it. A crash between upload and copy leaves a temporary object that no view
lists and :meth:`ObjectShards.sweep` deletes later; a crash between copy and registration
leaves a complete final object that the re-run adopts or overwrites with the same content
(shard keys are deterministic), so nothing is duplicated.

DuckDB reads the shards through this fsspec file system registered on each connection
(``con.register_filesystem``), not through the httpfs extension: this DuckDB has no httpfs
build installed, and fsspec needs none.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

#: the field of ``prefcurate.json`` that says where a dataset's shards live
MARKER_FIELD = "shards"


class ObjectStoreError(RuntimeError):
    pass


@functools.lru_cache(maxsize=8)
def _filesystem(endpoint_url: str | None, pid: int):
    """One per process (``pid``): a forked worker must not reuse its parent's HTTP session."""
    import s3fs

    # no listing cache: another process (a worker) may have written the key just now
    return s3fs.S3FileSystem(endpoint_url=endpoint_url, use_listings_cache=False, skip_instance_cache=True)


@dataclass(frozen=True)
class ObjectShards:
    """Where a dataset's shards live on an object store: ``s3://bucket[/prefix]``."""

    uri: str
    endpoint_url: str | None = None

    @classmethod
    def parse(cls, uri: str, endpoint_url: str | None = None) -> ObjectShards:
        parsed = urlparse(uri)
        if parsed.scheme not in ("s3", "s3a") or not parsed.netloc:
            raise ObjectStoreError(
                f"shards URI {uri!r}: expected s3://BUCKET[/PREFIX] (an S3-compatible store)")
        prefix = parsed.path.strip("/")
        return cls(f"s3://{parsed.netloc}" + (f"/{prefix}" if prefix else ""), endpoint_url or None)

    @classmethod
    def from_marker(cls, marker: Path) -> ObjectShards | None:
        """The dataset's object store, or None when its shards are on the local disk."""
        try:
            recorded = json.loads(marker.read_text()).get(MARKER_FIELD)
        except (OSError, ValueError, AttributeError):
            return None
        return cls(recorded["uri"], recorded.get("endpoint_url")) if recorded else None

    def marker_fields(self) -> dict:
        return {MARKER_FIELD: asdict(self)}

    # ---- names ---------------------------------------------------------------------
    @property
    def filesystem(self):
        return _filesystem(self.endpoint_url, os.getpid())

    def key(self, relpath: str) -> str:
        """``bucket/prefix/relpath``: the name s3fs uses."""
        return f"{self.uri.removeprefix('s3://')}/{relpath}"

    def url(self, relpath: str) -> str:
        """The URL DuckDB reads (through the registered file system)."""
        return f"s3://{self.key(relpath)}"

    def check_reachable(self) -> None:
        """Fail early, naming the URI, when the bucket cannot be listed (wrong endpoint, no
        credentials, no such bucket) instead of at the first shard a worker writes."""
        bucket = self.uri.removeprefix("s3://").split("/")[0]
        try:
            self.filesystem.ls(bucket)
        except Exception as error:  # botocore and s3fs raise many kinds; all mean "not usable"
            raise ObjectStoreError(
                f"shards URI {self.uri} (endpoint {self.endpoint_url or 'AWS default'}) is not reachable: "
                f"{type(error).__name__}: {error}; check the bucket exists and AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY are set"
            ) from None

    # ---- shards --------------------------------------------------------------------
    def upload_temporary(self, relpath: str, data: pa.Table) -> str:
        """Upload a complete shard under a temporary key next to its final one; returns it."""
        final = self.key(relpath)
        folder, name = final.rsplit("/", 1)
        temporary = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
        from prefcurate.store import dictionary_columns

        with self.filesystem.open(temporary, "wb") as handle:
            pq.write_table(data, handle, compression="zstd", use_dictionary=dictionary_columns(data))
        return temporary

    def publish(self, temporary: str, relpath: str) -> None:
        """Copy a complete upload to its final key, then drop the temporary one."""
        self.filesystem.copy(temporary, self.key(relpath))
        self.filesystem.rm(temporary)

    def write(self, relpath: str, data: pa.Table) -> None:
        self.publish(self.upload_temporary(relpath, data), relpath)

    def exists(self, relpath: str) -> bool:
        return self.filesystem.exists(self.key(relpath))

    def num_rows(self, relpath: str) -> int:
        with self.filesystem.open(self.key(relpath), "rb") as handle:
            return pq.ParquetFile(handle).metadata.num_rows

    def read_arrow(self, relpath: str) -> pa.Table:
        with self.filesystem.open(self.key(relpath), "rb") as handle:
            return pq.read_table(handle)

    def read(self, relpath: str) -> pl.DataFrame:
        return pl.from_arrow(self.read_arrow(relpath))

    def list_shards(self, table: str) -> list[str]:
        """Relative paths of the final shard objects of ``table`` (registered or not)."""
        return sorted(
            f"{table}/{name}" for name in self._names(table)
            if name.startswith("shard-") and name.endswith(".parquet")
        )

    def _names(self, table: str, detail: bool = False):
        try:
            entries = self.filesystem.ls(self.key(table), detail=True)
        except FileNotFoundError:
            return []
        files = [(entry["name"].rsplit("/", 1)[1], entry) for entry in entries if entry.get("type") == "file"]
        return files if detail else [name for name, _ in files]

    def sweep(self, tables, older_than_s: float = 3600.0) -> int:
        """Delete temporary uploads older than ``older_than_s`` (writes that crashed before their
        copy); younger ones may belong to a unit running right now."""
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=older_than_s)
        removed = 0
        for table in tables:
            for name, entry in self._names(table, detail=True):
                modified = entry.get("LastModified")
                if name.startswith(".shard-") and name.endswith(".tmp") and modified is not None \
                        and modified.astimezone(dt.UTC) < cutoff:
                    try:
                        self.filesystem.rm(entry["name"])
                        removed += 1
                    except FileNotFoundError:  # swept by someone else meanwhile
                        pass
        return removed

    def polars_options(self) -> dict:
        """``storage_options`` for polars' own S3 reader (credentials and region from the env)."""
        if not self.endpoint_url:
            return {}
        return {"aws_endpoint_url": self.endpoint_url,
                "aws_allow_http": str(self.endpoint_url.startswith("http://")).lower()}

    def register_on(self, con) -> None:
        """Let a DuckDB connection read ``s3://`` URLs through this file system."""
        con.register_filesystem(self.filesystem)


def write_object_shard(objects: ObjectShards, table: str, frame, *, key: str, run_id: str, stage: str):
    """:func:`prefcurate.store.write_shard` for an object store: same shard, same metadata,
    uploaded under a temporary key and copied to its final one. Any worker may call it."""
    from prefcurate.store import ShardInfo, conform, shard_metadata, shard_relpath

    data = conform(table, frame, run_id=run_id, stage=stage)
    metadata = {**(data.schema.metadata or {}), **shard_metadata(table, key, run_id, stage)}
    data = data.replace_schema_metadata(metadata)
    relpath = shard_relpath(table, key)
    objects.write(relpath, data)
    return ShardInfo(table, key, relpath, data.num_rows, run_id, stage)
