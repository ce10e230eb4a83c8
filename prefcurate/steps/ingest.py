"""Ingest step: one unit per input file (a folder or glob pattern names several); re-ingesting
the same file is a no-op."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from prefcurate.schemas.ids import content_id, file_sha256
from prefcurate.steps.base import StageContext, Step, Unit
from prefcurate.tasks.ingest import (
    BUNDLED,
    IngestError,
    IngestParams,
    ingest_file,
    input_files,
    resolve_source,
    shard_frames,
)


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
            units.append(Unit(self.name, key, ("prompts", "quarantine"), {"params": own.model_dump(mode="json")}))
        return units

    def compute(self, unit: Unit, ctx: StageContext):
        params = IngestParams.model_validate(unit.payload["params"])
        result = ingest_file(params, ctx.store().prompts_sharing_an_id)
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
