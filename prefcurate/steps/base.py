"""Stage steps: the narrow interface between stage logic and orchestration.

Modelled on datatrove's PipelineStep: a step is a small object with ``plan`` (which units of
work exist, each with a deterministic key) and ``run_unit`` (do one unit, write its shard
files, return their :class:`ShardInfo`). Steps know the store and the stage logic in
``prefcurate.tasks``; they know nothing of Prefect or Dask. Flows map ``run_unit`` over the
planned units and register the returned shards: that is all orchestration has to do.

Resume and idempotency come from the keys: a unit whose output shards are registered is
skipped; a unit whose complete shard file exists but was never registered (a crash between
rename and registration) is adopted without recomputation.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import polars as pl
import pyarrow as pa

from prefcurate.config import PipelineConfig, load_config
from prefcurate.schemas.ids import content_id
from prefcurate.store import ShardInfo, Store, conform


@dataclass(frozen=True)
class StageContext:
    """What a worker needs to run a unit: small and picklable (paths and plain data)."""

    dataset: str
    config: dict  # PipelineConfig.model_dump()
    run_id: str
    config_path: str | None = None
    #: made by a stage's coordinator, which opened (checked, upgraded) the catalog and holds
    #: the dataset's writer lock while the units run: a unit's worker need not check it again.
    #: (Every registration changes the catalog file, so each unit's check was a connection of
    #: its own, 15-25 ms, and the most of the catalog opens of a build's workers.)
    catalog_checked: bool = False

    def store(self) -> Store:
        return Store.open(self.dataset, check_catalog=not self.catalog_checked)

    def pipeline_config(self) -> PipelineConfig:
        return _cached_config(json.dumps(self.config, sort_keys=True))


@functools.lru_cache(maxsize=8)
def _cached_config(config_json: str) -> PipelineConfig:
    """Parsed once per process: workers run many units with the same config."""
    return PipelineConfig.model_validate(json.loads(config_json))


@dataclass(frozen=True)
class Unit:
    """One unit of work. ``key`` decides the names of its output shards."""

    stage: str
    key: str
    outputs: tuple[str, ...]  # tables this unit writes (one shard each, possibly empty)
    payload: dict = field(default_factory=dict)  # e.g. the input shard path

    def shard_key(self, table: str, index: int = 0) -> str:
        return content_id(self.key, table, index)


@dataclass
class UnitResult:
    unit_key: str
    shards: list[ShardInfo]
    counts: dict = field(default_factory=dict)
    seconds: float = 0.0
    model_seconds: float = 0.0  # time spent inside model calls (for bench/pipeline.py)
    skipped: bool = False
    #: a batch unit's members (ingest's small files), each done under its own key
    parts: list[UnitResult] = field(default_factory=list)

    def registrations(self) -> list[tuple[str, list[ShardInfo], dict]]:
        """(unit key, shards, counts) of each unit this result completes, for
        :meth:`Store.register_units`: a batch's members under their own keys, so a re-run
        finds each one done and the accounting stays per member."""
        return [(part.unit_key, part.shards, part.counts) for part in self.parts or [self]]


@dataclass
class StageStats:
    """What one stage run did, merged from its units and its ``finalize``, nothing dropped.

    - ``counts``: the numbers (rows, drops, tokens), summed over units;
    - ``timings``: seconds (``model_seconds``: inside model calls, summed over units);
    - ``reports``: every other value (a filter or selection report, a note), by name, then by
      the unit (or ``finalize``) that made it: two units' reports of one name are both kept.

    Counts and timings go to ``runs.counts`` / ``runs.timings``; reports to the
    ``stage_reports`` table (:meth:`prefcurate.store.Store.record_reports`).
    """

    counts: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, values: dict, source: str) -> None:
        """Merge one unit's (or ``finalize``'s) values; ``source`` names where they came from."""
        for name, value in values.items():
            if isinstance(value, bool):
                value = int(value)
            if isinstance(value, (int, float)):
                self.counts[name] = self.counts.get(name, 0) + value
            else:
                self.reports.setdefault(name, {})[source] = value

    def add_unit(self, result: UnitResult) -> None:
        self.add(result.counts, result.unit_key)
        self.timings["model_seconds"] = self.timings.get("model_seconds", 0.0) + result.model_seconds

    def summary(self) -> dict:
        """The flat view a flow returns: counts and timings by name, plus ``reports`` (a
        report made once is shown as itself, one made by several units per unit)."""
        reports = {name: next(iter(by_source.values())) if len(by_source) == 1 else by_source
                   for name, by_source in self.reports.items()}
        return {**self.counts, **self.timings, "reports": reports}


class Step:
    """Base class. Subclasses set ``name`` and implement ``plan`` and ``compute``."""

    name: ClassVar[str]
    #: steps that recompute their whole output per run (filter, select) instead of per unit
    whole_dataset: ClassVar[bool] = False
    #: steps whose units must each see the ones before it registered (ingest: a file's ids
    #: are checked against the dataset, so two files at once could both take one id)
    units_in_order: ClassVar[bool] = False

    def plan(self, ctx: StageContext) -> list[Unit]:
        raise NotImplementedError

    def compute(self, unit: Unit, ctx: StageContext) -> tuple[dict[str, Any], dict]:
        """Do the unit's work: ({table: frame or list of frames}, counts).

        Frames may be empty; an empty frame still writes a (schema-only) shard so the unit
        is recorded as done. A step whose output would not fit in memory at once returns,
        instead of the dict, an iterator of (table, frame) that makes one part at a time:
        each part is written as it comes, and ``counts`` is read once the iterator is spent
        (so the iterator may still fill it in).
        """
        raise NotImplementedError

    def finalize(self, ctx: StageContext, results: list[UnitResult]) -> dict:
        """Called by the coordinator after all units are registered; returns extra counts
        (numbers) or reports (anything else), merged into the run's :class:`StageStats`."""
        return {}

    def pools(self, ctx: StageContext) -> list[str]:
        """The inference pools a unit of this step uses (each guarded by a concurrency limit)."""
        return []

    # -- shared machinery -----------------------------------------------------------
    @staticmethod
    def input_fingerprint(ctx: StageContext, tables: list[str]) -> list:
        """The registered shards of the input tables: new input shards mean a new unit key."""
        registered = ctx.store().registered_keys_of(tables)
        return [sorted(registered[t]) for t in tables]

    def pending(self, ctx: StageContext, units: list[Unit]) -> tuple[list[Unit], list[Unit]]:
        """(units still to run, units already complete) according to the registry."""
        registered = ctx.store().registered_keys_of(sorted({t for u in units for t in u.outputs}))
        todo, done = [], []
        for unit in units:
            if all(unit.shard_key(t) in registered[t] for t in unit.outputs):
                done.append(unit)
            else:
                todo.append(unit)
        return todo, done

    def batched(self, units: list[Unit]) -> list[Unit]:
        """The pending ``units`` as the task runner gets them: each alone here. A step with
        many small units may join runs of them into one batch unit, whose ``run_unit`` does
        each member as its own unit and returns their results as ``parts`` (ingest's files)."""
        return units

    def run_unit(self, unit: Unit, ctx: StageContext) -> UnitResult:
        """Run one unit in any process; returns shard infos for the coordinator.

        The unit's manifest is written after all its shard files: a complete manifest means
        every listed file is complete, so a crash before registration is adopted as is.
        """
        store = ctx.store()
        manifest = _manifest_path(store, unit)
        if manifest.exists():
            recorded = json.loads(manifest.read_text())
            shards = [ShardInfo(**item) for item in recorded["shards"]]
            if all(store.shard_exists(s.path) for s in shards):
                # the unit's own counts travel with it, so its accounting survives the crash
                return UnitResult(unit.key, shards, {**recorded.get("counts", {}), "adopted": 1}, skipped=True)
        if self.pools(ctx):  # a unit that asks a priced pool stops, pending, once budget.max_usd is spent
            from prefcurate.tasks.estimate import check_budget

            check_budget(ctx.config, store, self.name, unit.key)
        try:
            return self._compute_and_write(unit, ctx, store, manifest)
        finally:
            if self.whole_dataset:
                release_freed_memory()

    def _compute_and_write(self, unit: Unit, ctx: StageContext, store: Store, manifest: Path) -> UnitResult:
        started = time.perf_counter()
        frames, counts = self.compute(unit, ctx)
        gate = ctx.config.get("contracts", True)

        def gate_and_write(job: tuple[str, int, Any]) -> tuple[ShardInfo, pl.DataFrame | None]:
            table, index, part = job
            # the gate sees exactly what will be written: schema columns, provenance
            conformed = conform(table, _as_polars(table, part), run_id=ctx.run_id, stage=self.name)
            bad = None
            if gate and table != "quarantine" and conformed.num_rows:
                kept, bad = contract_gate(table, pl.from_arrow(conformed), self.name, unit.key)
                conformed = kept if bad is not None else conformed
            # (an unchanged conformed table is written as it is, not conformed again)
            return store.write(table, conformed, key=unit.shard_key(table, index), run_id=ctx.run_id,
                               stage=self.name), bad

        # a unit's shards are written side by side (Parquet encoding and compression release
        # the GIL) while the step makes its next part; a few writes in flight bound the parts held
        pool = _shard_writers()
        in_flight: deque[tuple[str, Future]] = deque()
        written: list[tuple[str, tuple[ShardInfo, pl.DataFrame | None]]] = []
        try:
            for job in _output_parts(unit, frames):
                in_flight.append((job[0], pool.submit(gate_and_write, job)))
                if len(in_flight) > _SHARD_WRITE_WIDTH:
                    table, future = in_flight.popleft()
                    written.append((table, future.result()))
        finally:  # (a step that fails mid-stream leaves no write running behind it)
            while in_flight:
                table, future = in_flight.popleft()
                written.append((table, future.result()))
        shards = [shard for _, (shard, _) in written]
        rejected: list[pl.DataFrame] = []
        for table, (_, bad) in written:
            if bad is not None:
                rejected.append(bad)
                counts[f"contract_quarantined.{table}"] = counts.get(f"contract_quarantined.{table}", 0) + bad.height
        if rejected:
            shards.append(store.write("quarantine", pl.concat(rejected, how="vertical_relaxed"),
                                      key=unit.shard_key("quarantine", 999), run_id=ctx.run_id, stage=self.name))
        model_seconds = float(counts.pop("model_seconds", 0.0))
        _write_atomic(manifest, json.dumps({"unit": unit.key, "shards": [s.to_dict() for s in shards],
                                            "counts": counts}, default=str))
        return UnitResult(unit.key, shards, counts, time.perf_counter() - started, model_seconds)


def _output_parts(unit: Unit, frames: dict[str, Any] | Iterable[tuple[str, Any]]) -> Iterator[tuple[str, int, Any]]:
    """(table, index, part) of each shard a unit writes, in order.

    ``frames`` is what :meth:`Step.compute` returned: {table: frame or list of frames}, or an
    iterator of (table, frame) that makes each part when asked (a stream). A table of the
    unit's outputs that got no part gets one empty shard, so the unit is recorded as done.
    """
    if isinstance(frames, dict):
        produced = {table: frames.get(table) for table in unit.outputs}
        stream = ((table, piece) for table, value in produced.items()
                  for piece in (value if isinstance(value, list) else [value]))
    else:
        stream = frames
    made: dict[str, int] = {}
    for table, part in stream:
        if table not in unit.outputs:
            raise ValueError(f"unit {unit.key[:12]} of {unit.stage} made a part of {table!r}, not one of its outputs {unit.outputs}")
        made[table] = made.get(table, 0) + 1
        yield table, made[table] - 1, part
    for table in unit.outputs:
        if table not in made:
            yield table, 0, None


#: shard writes at once in one process: as many as its cores, at most 4
_SHARD_WRITE_WIDTH = min(4, os.cpu_count() or 1)


@functools.cache
def _shard_writers() -> ThreadPoolExecutor:
    """One pool per process for shard writes."""
    return ThreadPoolExecutor(_SHARD_WRITE_WIDTH, thread_name_prefix="prefcurate-shard-write")


# a forked child has the pool's object but not its threads: work sent to it would wait forever
os.register_at_fork(after_in_child=_shard_writers.cache_clear)


def release_freed_memory() -> None:
    """Give the C heap's freed pages back to the OS after a whole-dataset unit.

    A worker runs filter, score and select one after another; glibc keeps what each freed
    (arenas are trimmed only from the top), so the next stage's peak stacked on the last
    one's. ``malloc_trim`` is glibc's; elsewhere this does nothing.

    What survives the collection is frozen (moved out of the collector's view): a full
    collection walks every object a worker holds (~600,000 after Prefect, Dask and torch are
    imported: 0.4 s), and each unit's would walk them all again. Frozen objects are still
    freed when their last reference goes; only a cycle among them that dies later stays.
    """
    import atexit
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    if not gc.get_freeze_count():  # handed back at exit, so that shutdown frees them (else nanobind reports them leaked)
        atexit.register(gc.unfreeze)
    gc.freeze()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        pass


def _as_polars(table: str, part) -> pl.DataFrame:
    if part is None:
        from prefcurate.schemas.tables import TABLES

        return pl.from_arrow(pa.Table.from_pylist([], schema=TABLES[table]))
    return part if isinstance(part, pl.DataFrame) else pl.from_arrow(part)


def contract_gate(table: str, frame: pl.DataFrame, stage: str, unit_key: str) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """The data-contract gate between stages: rows that break the table's contract go to
    quarantine with the failed expectation named; the rest go on. Nothing is dropped.

    The contract is the table's Great Expectations suite; per unit it is evaluated as polars
    expressions (``check_batch``: same verdict row for row, milliseconds, no GX import in
    every worker). ``PREFCURATE_CONTRACT_ENGINE=gx`` runs GX itself instead."""
    from prefcurate.schemas.expectations import check_batch, describe_failures, validate_batch

    engine = validate_batch if os.environ.get("PREFCURATE_CONTRACT_ENGINE") == "gx" else check_batch
    result = engine(table, frame)
    if result.success:
        return frame, None
    mask = pl.Series(result.quarantine_mask)
    # each row names the expectations it broke; the batch's summary follows, for context
    expectations, columns = result.row_failures()
    summary = describe_failures(result)
    bad = frame.with_columns(
        pl.Series("_failed", expectations, dtype=pl.String), pl.Series("_columns", columns, dtype=pl.String)
    ).with_row_index("_row").filter(mask)
    quarantine = bad.select(
        pl.lit(f"{table} (stage {stage}, unit {unit_key[:12]})").alias("source_file"),
        (pl.col("_row").cast(pl.Int64) + 1).alias("source_record"),
        pl.col("_columns").alias("field"),
        pl.lit("contract_failed").alias("reason"),
        pl.concat_str([pl.lit("failed "), pl.col("_failed").fill_null("(batch)"), pl.lit(" | "), pl.lit(summary)])
        .alias("message"),
        pl.struct([c for c in frame.columns if frame.schema[c] != pl.Array(pl.Float32, 384)])
        .struct.json_encode().alias("raw"),
    )
    return frame.filter(~mask), quarantine


def _manifest_path(store: Store, unit: Unit) -> Path:
    return store.root / "_units" / unit.stage / f"{unit.key}.json"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def context_for(dataset: str | Path, config: PipelineConfig, run_id: str, config_path: str | None = None,
                catalog_checked: bool = False) -> StageContext:
    return StageContext(str(Path(dataset).resolve()), config.model_dump(mode="json"), run_id, config_path,
                        catalog_checked)


def load_context(dataset: str | Path, config_path: str | None, run_id: str) -> StageContext:
    return context_for(dataset, load_config(config_path), run_id, config_path)
