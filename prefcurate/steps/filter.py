"""Filter step: consistency checks over all judgments -> pairs, drops with reasons, jury.

One unit over the whole dataset, streamed by prompt shard (tasks.filter.apply_filters_sharded):
the jury's columns of every judgment are read at once (ids and numbers: the calibration gate,
a latent jury and the Bradley-Terry fit are dataset-wide), the responses' texts and the
ratings shard by shard, so memory stays at one shard's texts and shingles however many
prompts the dataset holds.
"""

from __future__ import annotations

import json

import polars as pl

from prefcurate.schemas.ids import content_id
from prefcurate.schemas.views import current_rows_sql
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
    current = current_rows_sql(table, where="response_id IN (SELECT unnest($1::VARCHAR[]))")
    return store.query(f"SELECT {', '.join(columns)} FROM ({current}) ORDER BY {order}", [response_ids.to_list()])


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

        def read_shard(response_ids):
            ratings = _read_by_response(store, "ratings", _RATING_COLUMNS, "rating_id", response_ids)
            responses = _read_by_response(store, "responses", _RESPONSE_COLUMNS, "response_id",
                                          response_ids)
            return ratings, responses

        pairs, drops, report = apply_filters_sharded(judgments, read_shard, params, human_labels=labels,
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
