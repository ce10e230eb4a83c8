"""Filter step: consistency checks over all judgments -> pairs, drops with reasons, jury."""

from __future__ import annotations

import json

from prefcurate.schemas.ids import content_id
from prefcurate.steps.base import StageContext, Step, Unit
from prefcurate.tasks.filter import aggregate_jury, apply_filters


class FilterStep(Step):
    name = "filter"
    whole_dataset = True

    def plan(self, ctx: StageContext) -> list[Unit]:
        params = ctx.pipeline_config().filter
        key = content_id("filter", self.input_fingerprint(ctx, ["judgments", "ratings", "responses"]),
                         params.model_dump(mode="json"))
        return [Unit(self.name, key, ("pairs", "filter_drops", "jury"))]

    def compute(self, unit: Unit, ctx: StageContext):
        store = ctx.store()
        params = ctx.pipeline_config().filter
        # the current_* views hold one row per id (a retried failure's good row wins)
        judgments = store.read("current_judgments").drop("run_id", "stage", "code_version", "created_at")
        ratings = store.read("current_ratings").drop("run_id", "stage", "code_version", "created_at")
        responses = store.read("current_responses").drop("run_id", "stage", "code_version", "created_at")
        pairs, drops, report = apply_filters(judgments, ratings, responses, params)
        jury = aggregate_jury(judgments.filter(judgments["valid"]), method=params.jury_method,
                              judge_weights=params.judge_weights)
        counts = {
            "candidates": report["candidates"],
            "passed_checks": report["passed_checks"],
            "pairs": report["pairs"],
            "kept_share": report["kept_share"],
            "fleiss_kappa": report["fleiss_kappa"] if report["fleiss_kappa"] is not None else float("nan"),
            "report": json.loads(json.dumps(report, default=str)),
        }
        return {"pairs": pairs, "filter_drops": drops, "jury": jury}, counts
