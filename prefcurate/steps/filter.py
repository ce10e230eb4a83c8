"""Filter step: consistency checks over all judgments -> pairs, drops with reasons, jury."""

from __future__ import annotations

import json

from prefcurate.schemas.ids import content_id
from prefcurate.steps.base import StageContext, Step, Unit
from prefcurate.tasks.calibration import gate_summary, prepare_jury
from prefcurate.tasks.filter import aggregate_jury, apply_filters
from prefcurate.tasks.review import current_labels


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
        judgments = store.read("current_judgments").drop("run_id", "stage", "code_version", "created_at")
        ratings = store.read("current_ratings").drop("run_id", "stage", "code_version", "created_at")
        responses = store.read("current_responses").drop("run_id", "stage", "code_version", "created_at")
        labels = current_labels(store.read("human_labels").drop("run_id", "stage", "code_version"))
        # the calibration gate and the jury's weights (tasks/calibration.py); raises GateError
        judgments, params, accuracy = prepare_jury(judgments, store.read("judge_calibration"), labels, params)
        pairs, drops, report = apply_filters(judgments, ratings, responses, params, human_labels=labels)
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
