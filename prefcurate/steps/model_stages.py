"""Generate and annotate steps: one unit per prompt shard, content-keyed.

A unit's key hashes its prompt shard, the stage parameters and (for annotate) the response
ids it will judge, so a re-run skips finished shards and a new generator or judge makes new
units that only compute what is missing (content-addressed row ids do the rest).
"""

from __future__ import annotations

import hashlib

import polars as pl

from prefcurate.config import section
from prefcurate.schemas.ids import content_id
from prefcurate.steps.base import StageContext, Step, Unit
from prefcurate.steps.engines import engine_for, model_time, request_metrics
from prefcurate.tasks.annotate import (
    AnnotateParams,
    annotate,
    calibrate_judge,
    check_judge_pools,
    load_gold_pairs,
    load_template,
)
from prefcurate.tasks.generate import GenerateParams, check_pools, run_generators

_PROVENANCE = ["run_id", "stage", "code_version", "created_at"]


def _prompt_shards(store) -> list[dict]:
    return store.shards("prompts")


def _shard_prompts(store, path: str) -> pl.DataFrame:
    return store.read_shard(path).drop(_PROVENANCE)


def _ids_digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def _gold_pairs(params: AnnotateParams) -> pl.DataFrame:
    gold = load_gold_pairs()
    return gold if params.calibration_pairs is None else gold.head(params.calibration_pairs)


class GenerateStep(Step):
    name = "generate"

    def pools(self, ctx: StageContext) -> list[str]:
        params: GenerateParams = section(ctx.pipeline_config(), "generate")
        return sorted({g.pool for g in params.generators})

    def plan(self, ctx: StageContext) -> list[Unit]:
        config = ctx.pipeline_config()
        params: GenerateParams = section(config, "generate")
        check_pools(params.generators, config.pools)
        identity = [g.identity() | {"n": g.n} for g in params.generators]
        return [
            Unit(self.name, content_id("generate", shard["shard_key"], identity), ("responses", "request_metrics"),
                 {"prompts_path": shard["path"]})
            for shard in _prompt_shards(ctx.store())
        ]

    def compute(self, unit: Unit, ctx: StageContext):
        store = ctx.store()
        config = ctx.pipeline_config()
        params: GenerateParams = section(config, "generate")
        prompts = _shard_prompts(store, unit.payload["prompts_path"])
        existing = store.query(
            "SELECT response_id FROM responses WHERE prompt_id IN (SELECT unnest(?))",
            [prompts["prompt_id"].to_list()],
        )["response_id"].to_list()
        engines = {g.name: engine_for(config.pools, g.pool) for g in params.generators}
        responses = run_generators(prompts, params, engines, existing)
        counts = {
            "responses": responses.height,
            "truncated": int(responses["truncated"].sum()) if responses.height else 0,
            "errors": int((responses["finish_reason"] == "error").sum()) if responses.height else 0,
            "tokens_out": int(responses["tokens_out"].fill_null(0).sum()) if responses.height else 0,
            **model_time(*engines.values()),
        }
        return {"responses": responses, "request_metrics": request_metrics(*engines.values())}, counts


class AnnotateStep(Step):
    name = "annotate"

    def pools(self, ctx: StageContext) -> list[str]:
        params: AnnotateParams = section(ctx.pipeline_config(), "annotate")
        return sorted({j.pool for j in params.judges})

    def plan(self, ctx: StageContext) -> list[Unit]:
        store = ctx.store()
        config = ctx.pipeline_config()
        params: AnnotateParams = section(config, "annotate")
        check_judge_pools(params.judges, config.pools)
        judges = [j.model_dump(mode="json") | {"hash": load_template(j.template, "pairwise").hash}
                  for j in params.judges]
        settings = params.model_dump(mode="json", exclude={"judges", "batch_size"})
        units = []
        for shard in _prompt_shards(store):
            prompt_ids = store.read_shard(shard["path"])["prompt_id"].to_list()
            response_ids = store.query(
                "SELECT DISTINCT response_id FROM responses WHERE prompt_id IN (SELECT unnest(?))", [prompt_ids]
            )["response_id"].to_list()
            key = content_id("annotate", shard["shard_key"], _ids_digest(response_ids), judges, settings)
            units.append(Unit(self.name, key, ("judgments", "ratings", "quarantine", "request_metrics"),
                              {"prompts_path": shard["path"]}))
        gold = _gold_pairs(params)
        gold_key = content_id("calibration", judges, settings, _ids_digest(gold["id"].to_list()))
        units.append(Unit(self.name, gold_key, ("judge_calibration", "request_metrics"), {"calibration": True}))
        return units

    def compute(self, unit: Unit, ctx: StageContext):
        store = ctx.store()
        config = ctx.pipeline_config()
        params: AnnotateParams = section(config, "annotate")
        engines = {j.name: engine_for(config.pools, j.pool) for j in params.judges}
        if unit.payload.get("calibration"):
            gold = _gold_pairs(params)
            rows = [calibrate_judge(gold, judge, engines[judge.name], params) for judge in params.judges]
            return ({"judge_calibration": pl.concat(rows), "request_metrics": request_metrics(*engines.values())},
                    model_time(*engines.values()))
        prompts = _shard_prompts(store, unit.payload["prompts_path"])
        ids = prompts["prompt_id"].to_list()
        responses = store.query(
            "SELECT DISTINCT ON (response_id) * EXCLUDE (run_id, stage, code_version, created_at) "
            "FROM responses WHERE prompt_id IN (SELECT unnest(?))", [ids]
        )
        existing_judgments = store.query(
            "SELECT judgment_id FROM judgments WHERE prompt_id IN (SELECT unnest(?))", [ids]
        )["judgment_id"].to_list()
        existing_ratings = store.query(
            "SELECT rating_id FROM ratings WHERE prompt_id IN (SELECT unnest(?))", [ids]
        )["rating_id"].to_list()
        result = annotate(responses, prompts, params, engines,
                          existing_judgment_ids=existing_judgments, existing_rating_ids=existing_ratings)
        quarantine = result.unjudgeable.select(
            pl.lit("prompts").alias("source_file"),
            pl.lit(None, pl.Int64).alias("source_record"),
            pl.lit("responses").alias("field"),
            pl.col("reason"),
            pl.col("message"),
            pl.struct("prompt_id").struct.json_encode().alias("raw"),
        ) if result.unjudgeable.height else None
        counts = {
            "judgments": result.judgments.height,
            "invalid_judgments": int((~result.judgments["valid"]).sum()) if result.judgments.height else 0,
            "ratings": result.ratings.height,
            "unjudgeable_prompts": result.unjudgeable.height,
            **model_time(*engines.values()),
        }
        return {"judgments": result.judgments, "ratings": result.ratings, "quarantine": quarantine,
                "request_metrics": request_metrics(*engines.values())}, counts
