"""Filter step: consistency checks over all judgments -> pairs, drops with reasons, jury.

One unit over the whole dataset, streamed by prompt shard (tasks.filter.apply_filters_sharded):
the jury's columns of every judgment are read at once (ids and numbers: the calibration gate,
a latent jury and the Bradley-Terry fit are dataset-wide), the responses' texts and the
ratings shard by shard, so memory stays at one shard's texts and shingles however many
prompts the dataset holds. The shards read them from a local copy of the two tables,
partitioned by prompt range in one pass each, so the reading stays linear in the dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from prefcurate.schemas.ids import content_id
from prefcurate.schemas.views import choice_columns, current_rows_sql
from prefcurate.scratch_db import scratch_cursor
from prefcurate.steps.base import StageContext, Step, Unit
from prefcurate.tasks.calibration import gate_summary, prepare_jury
from prefcurate.tasks.filter import aggregate_jury, apply_filters_sharded
from prefcurate.tasks.review import current_labels

#: prompts whose responses, ratings and shingles are held at once (~40 KB a prompt at its peak)
SHARD_PROMPTS = 5000
_JUDGMENT_COLUMNS = ["prompt_id", "response_a", "response_b", "judge", "judge_model", "criterion", "valid",
                     "p_a", "p_first_ab", "p_first_ba"]
_RATING_COLUMNS = ["response_id", "aspect", "expected_score", "valid"]
_RESPONSE_COLUMNS = ["response_id", "prompt_id", "generator", "model", "text", "truncated"]


def _read_by_response(store, table: str, columns: list[str], order: str, response_ids) -> pl.DataFrame:
    """``columns`` of ``current_<table>``'s rows of ``response_ids``, in ``order`` (a fixed row
    order keeps the per-response means bit for bit reproducible). The ids are picked before the
    one-row-per-id choice, so a shard reads its own rows, not the whole table's."""
    return store.query(_by_response_sql(table, columns, order), [response_ids.to_list()])


def _by_response_sql(table: str, columns: list[str], order: str) -> str:
    current = current_rows_sql(table, where="response_id IN (SELECT unnest($1::VARCHAR[]))")
    return f"SELECT {', '.join(columns)} FROM ({current}) ORDER BY {order}"


#: what each shard reads: table -> (its columns, their row order); the partitioned copy also
#: keeps the columns the one-row-per-id choice reads (schemas/views.py:choice_columns)
_SHARD_TABLES = {"ratings": (_RATING_COLUMNS, "rating_id"), "responses": (_RESPONSE_COLUMNS, "response_id")}


class _PartitionedShards:
    """Each prompt shard's ratings and responses, read from a copy of the two tables made in
    one pass each and partitioned by prompt range, not by a scan of the whole tables per shard
    (which grows with the square of the dataset: 200 scans of 3M responses at 1M prompts).

    The ranges are the judged prompts, sorted, ``shard_prompts`` at a time: the filter's
    shards are the candidates' prompts cut the same way, so a shard reads one or two ranges.
    The rows of one id share a prompt, so a range holds every row the current-row choice
    compares, and a shard's read is ``_read_by_response``'s query over its ranges' files."""

    def __init__(self, store, judgments: pl.DataFrame, shard_prompts: int, folder: Path):
        prompts = judgments["prompt_id"].unique().sort()
        ranges = pl.DataFrame({"prompt_id": prompts}).with_row_index("part").with_columns(pl.col("part") // shard_prompts)
        self.part_of = (
            pl.concat([judgments.select("prompt_id", pl.col(side).alias("response_id"))
                       for side in ("response_a", "response_b")])
            .unique("response_id").join(ranges, on="prompt_id").select("response_id", "part")
        )
        self.store, self.folder, self.empty = store, folder, {}
        folder.mkdir(parents=True, exist_ok=True)
        with store.connect(read_only=True) as con:
            con.register("part_of", self.part_of.to_arrow())
            for table, (columns, order) in _SHARD_TABLES.items():
                kept = ", ".join(f"t.{c}" for c in dict.fromkeys([*columns, *choice_columns(table)]))
                target = str(folder / table).replace("'", "''")
                con.execute(f"COPY (SELECT {kept}, p.part FROM {table} t JOIN part_of p USING (response_id)) "
                            f"TO '{target}' (FORMAT parquet, PARTITION_BY (part))")
                self.empty[table] = con.sql(f"SELECT {', '.join(columns)} FROM {table} LIMIT 0").pl()

    def read(self, response_ids: pl.Series) -> tuple[pl.DataFrame, pl.DataFrame]:
        known = self.part_of.filter(pl.col("response_id").is_in(response_ids.implode()))
        if known.height < response_ids.n_unique():  # (a response no judgment names: read from the tables)
            return tuple(_read_by_response(self.store, table, columns, order, response_ids)
                         for table, (columns, order) in _SHARD_TABLES.items())
        parts = known["part"].unique().sort()
        frames = []
        with scratch_cursor() as con:
            for table, (columns, order) in _SHARD_TABLES.items():
                files = [str(f) for part in parts for f in sorted((self.folder / table / f"part={part}").glob("*.parquet"))]
                if not files:
                    frames.append(self.empty[table])
                    continue
                listed = ", ".join("'" + name.replace("'", "''") + "'" for name in files)
                # (a TEMP view is this cursor's own: the process's other cursors may hold one too)
                con.execute(f"CREATE OR REPLACE TEMP VIEW {table} AS SELECT * FROM read_parquet([{listed}])")
                frames.append(con.sql(_by_response_sql(table, columns, order), params=[response_ids.to_list()]).pl())
        return frames[0], frames[1]


class FilterStep(Step):
    name = "filter"
    whole_dataset = True

    def plan(self, ctx: StageContext) -> list[Unit]:
        params = ctx.pipeline_config().filter
        # gold calibration and human review labels change the jury (gate, weights, overrides)
        inputs = ["judgments", "ratings", "responses", "judge_calibration", "human_labels"]
        key = content_id("filter", self.input_fingerprint(ctx, inputs), params.model_dump(mode="json"))
        return [Unit(self.name, key, ("pairs", "filter_drops", "jury", "judge_accuracy"))]

    def compute(self, unit: Unit, ctx: StageContext):
        store = ctx.store()
        params = ctx.pipeline_config().filter
        # the current_* views hold one row per id (a retried failure's good row wins)
        judgments = store.query(
            f"SELECT {', '.join(_JUDGMENT_COLUMNS)} FROM current_judgments ORDER BY judgment_id")
        labels = current_labels(store.read("human_labels").drop("run_id", "stage", "code_version"))
        # the calibration gate and the jury's weights (tasks/calibration.py); raises GateError
        judgments, params, accuracy = prepare_jury(judgments, store.read("judge_calibration"), labels, params)

        with store.scratch_folder("filter-") as folder:
            shards = _PartitionedShards(store, judgments, SHARD_PROMPTS, folder)
            pairs, drops, report = apply_filters_sharded(judgments, shards.read, params, human_labels=labels,
                                                         shard_prompts=SHARD_PROMPTS)
        report["judge_accuracy"] = gate_summary(accuracy)
        report["human_labels"] = labels.height
        jury = aggregate_jury(judgments.filter(judgments["valid"]), method=params.jury_method,
                              judge_weights=params.judge_weights, human_labels=labels)
        counts = {
            "candidates": report["candidates"],
            "passed_checks": report["passed_checks"],
            "pairs": report["pairs"],
            "kept_share": report["kept_share"],
            "fleiss_kappa": report["fleiss_kappa"] if report["fleiss_kappa"] is not None else float("nan"),
            "report": json.loads(json.dumps(report, default=str)),
        }
        return {"pairs": pairs, "filter_drops": drops, "jury": jury, "judge_accuracy": accuracy}, counts
