"""Ingest step: one unit per input file (a folder or glob pattern names several); re-ingesting
the same file is a no-op.

Small files still to ingest go in batches: one unit runs several files one after the other,
each as its own unit would (its own key, shards, manifest and counts, and it sees the files
before it), and they are registered together. A unit costs a Prefect task run, a Dask round
trip and a registration (~0.25 s on 2 cores), which a folder of small files paid per file.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from pathlib import Path

import polars as pl

from prefcurate.schemas.ids import content_id, file_sha256
from prefcurate.steps.base import StageContext, Step, Unit, UnitResult
from prefcurate.tasks.ingest import (
    BUNDLED,
    IngestError,
    IngestParams,
    ingest_file,
    input_files,
    resolve_source,
    shard_frames,
)

OUTPUTS = ("prompts", "quarantine")
#: a batch unit's bounds: files, and bytes read (a file larger than this is a unit alone)
BATCH_FILES = 100
BATCH_BYTES = 64 << 20
#: (in-process) a batch member's payload: its lookup of the prompts sharing an id with its
#: rows, in the dataset (over the batch's one catalog connection) and in the files before it
LOOKUP = "_lookup"


def _also_among(lookup, earlier: pl.DataFrame):
    """``lookup`` (the dataset's prompts sharing an id with the candidates) plus the rows of
    ``earlier`` that share one."""
    def sharing(candidates: pl.DataFrame) -> pl.DataFrame:
        found = earlier.filter(pl.col("prompt_id").is_in(candidates["prompt_id"].implode())
                               | pl.col("source_id").is_in(candidates["source_id"].drop_nulls().implode()))
        return pl.concat([lookup(candidates), found], how="vertical_relaxed")

    return sharing


class IngestStep(Step):
    name = "ingest"
    units_in_order = True

    def __init__(self, params: IngestParams | None = None):
        self.params = params

    def _params(self, ctx: StageContext) -> IngestParams:
        return self.params or ctx.pipeline_config().ingest

    def plan(self, ctx: StageContext) -> list[Unit]:
        """One unit per file: a folder or glob pattern gets one for each of its files, so a
        file added later is ingested alone and the others are not read again."""
        params = self._params(ctx)
        # (`ingest data/ -d data/ds` must not read the dataset's own shards as prompts)
        local = None if "://" in ctx.dataset else Path(ctx.dataset).resolve()
        files = input_files(params, leave_out=local)
        if len(files) > 1 and params.limit is not None:
            raise IngestError(f"ingest.limit counts the prompts of one file, and ingest.path names "
                              f"{len(files)} files: leave the limit out, or ingest one file with it")
        units = []
        for file in files:
            # a file named as itself keeps its params (and unit key) as they were
            named = params.path == BUNDLED or (isinstance(params.path, str)
                                               and Path(params.path).expanduser() == file)
            own = params if named else params.model_copy(update={"path": str(file)})
            path, _ = resolve_source(own)  # raises IngestError for unusable input
            # csv_separator left to detection keys as before it existed: datasets ingested then
            # are not ingested again (their files read the same; a ";" file could not be read)
            settings = own.model_dump(mode="json", exclude={"csv_separator"} if own.csv_separator is None else None)
            key = content_id("ingest", file_sha256(path), settings)
            units.append(Unit(self.name, key, OUTPUTS, {"params": own.model_dump(mode="json"),
                                                        "bytes": path.stat().st_size}))
        return units

    def batched(self, units: list[Unit]) -> list[Unit]:
        """``units`` in order, runs of small files joined into one batch unit each (at most
        BATCH_FILES files and BATCH_BYTES bytes; a larger file stays a unit of its own)."""
        runs: list[list[Unit]] = []
        for unit in units:
            last = runs[-1] if runs else []
            if last and len(last) < BATCH_FILES and sum(u.payload["bytes"] for u in last) + unit.payload["bytes"] <= BATCH_BYTES:
                last.append(unit)
            else:
                runs.append([unit])
        return [run[0] if len(run) == 1 else
                Unit(self.name, content_id("ingest-batch", [u.key for u in run]), OUTPUTS,
                     {"members": [{"key": u.key, "payload": u.payload} for u in run]})
                for run in runs]

    def members(self, unit: Unit) -> list[Unit]:
        """The file units a unit runs: a batch's members, or the unit itself."""
        if "members" not in unit.payload:
            return [unit]
        return [Unit(self.name, member["key"], unit.outputs, member["payload"]) for member in unit.payload["members"]]

    def run_unit(self, unit: Unit, ctx: StageContext) -> UnitResult:
        """A batch: each file as its own unit, in order, each checked against the files
        before it too (they are not registered yet)."""
        members = self.members(unit)
        if members == [unit]:
            return super().run_unit(unit, ctx)
        store, parts = ctx.store(), []
        earlier = pl.DataFrame(schema={"prompt_id": pl.String, "source_id": pl.String})
        # one catalog connection for the batch's lookups (nothing is registered meanwhile:
        # the coordinator registers the batch once it is done, under the writer lock)
        with store.connect(read_only=True) as con:
            for member in members:
                lookup = _also_among(functools.partial(store.prompts_sharing_an_id, connection=con), earlier)
                part = super().run_unit(dataclasses.replace(member, payload={**member.payload, LOOKUP: lookup}), ctx)
                parts.append(part)
                written = store.prompt_ids_in([shard.path for shard in part.shards if shard.table == "prompts"])
                earlier = pl.concat([earlier, written.select("prompt_id", "source_id")])
        counts = Counter()
        for part in parts:
            counts.update(part.counts)
        return UnitResult(unit.key, [shard for part in parts for shard in part.shards], dict(counts),
                          sum(part.seconds for part in parts), skipped=all(part.skipped for part in parts),
                          parts=parts)

    def compute(self, unit: Unit, ctx: StageContext):
        params = IngestParams.model_validate(unit.payload["params"])
        result = ingest_file(params, unit.payload.get(LOOKUP) or ctx.store().prompts_sharing_an_id)
        quarantine = result.quarantine
        frames = {
            "prompts": shard_frames(result.accepted, params.shard_rows),
            "quarantine": quarantine,
        }
        return frames, dict(result.counts)


def ingest_accounting(store) -> pl.DataFrame:
    """rows read = accepted + quarantined + duplicates, summed over ingested files.

    Each unit's counts are recorded when its shards are registered (one row per unit, so a
    crash before the run finished keeps them and a file ingested twice at once counts
    once); runs of versions that kept counts only in ``runs`` are added as they were.
    """
    return store.query(
        """
        WITH counted AS (
            SELECT counts FROM unit_counts WHERE stage = 'ingest'
            UNION ALL
            SELECT counts FROM runs WHERE kind = 'ingest' AND status = 'completed'
              AND pid IS NULL  -- started by a version without unit_counts
        )
        SELECT coalesce(sum(CAST(counts->>'rows_read' AS BIGINT)), 0) AS rows_read,
               coalesce(sum(CAST(counts->>'accepted' AS BIGINT)), 0) AS accepted,
               coalesce(sum(CAST(counts->>'quarantined' AS BIGINT)), 0) AS quarantined,
               coalesce(sum(CAST(counts->>'duplicates' AS BIGINT)), 0) AS duplicates
        FROM counted
        """
    )
