"""Score, select and export steps: whole-dataset units keyed by their inputs.

Embeddings are cached per item id in the ``embeddings`` table: a step embeds only the items
that have no vector yet for the configured model, and writes those as part of its unit.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import polars as pl

from prefcurate.config import section
from prefcurate.schemas.ids import content_id
from prefcurate.steps.base import StageContext, Step, Unit
from prefcurate.steps.engines import engine_for

_PROVENANCE = ["run_id", "stage", "code_version", "created_at"]


def _fingerprint(store, tables: list[str]) -> list:
    return [sorted(store.registered_keys(t)) for t in tables]


def _latest(store, table: str, key: str) -> pl.DataFrame:
    frame = store.read(table)
    return frame.sort("created_at").unique(key, keep="last").drop(_PROVENANCE) if frame.height else frame.drop(_PROVENANCE)


def embed_with_cache(store, items: pl.DataFrame, kind: str, model_name: str, embed_fn) -> tuple[np.ndarray, pl.DataFrame, float]:
    """Vectors for ``items`` (item_id, text) in order, and the new EMBEDDINGS rows to store."""
    cached = store.query(
        "SELECT DISTINCT ON (item_id) item_id, vector FROM embeddings WHERE item_kind = ? AND model = ?",
        [kind, model_name],
    )
    missing = items.join(cached.select("item_id"), on="item_id", how="anti")
    seconds = 0.0
    if missing.height:
        started = time.perf_counter()
        vectors = np.asarray(embed_fn(missing["text"].to_list()), dtype=np.float32)
        seconds = time.perf_counter() - started
        new_rows = pl.DataFrame({
            "item_id": missing["item_id"], "item_kind": kind, "model": model_name,
            "vector": pl.Series("vector", vectors, dtype=pl.Array(pl.Float32, vectors.shape[1])),
        })
    else:
        new_rows = pl.DataFrame(schema={"item_id": pl.String, "item_kind": pl.String, "model": pl.String,
                                        "vector": pl.Array(pl.Float32, 384)})
    everything = pl.concat([cached, new_rows.select("item_id", "vector")], how="vertical_relaxed")
    ordered = items.select("item_id").join(everything, on="item_id", how="left", maintain_order="left")
    matrix = ordered["vector"].to_numpy() if ordered.height else np.zeros((0, 384), np.float32)
    return np.asarray(matrix, dtype=np.float32), new_rows, seconds


class ScoreStep(Step):
    name = "score"
    whole_dataset = True

    def plan(self, ctx: StageContext) -> list[Unit]:
        store = ctx.store()
        params = section(ctx.pipeline_config(), "score")
        key = content_id("score", _fingerprint(store, ["responses", "prompts"]), params.model_dump(mode="json"))
        return [Unit(self.name, key, ("quality", "embeddings"))]

    def compute(self, unit: Unit, ctx: StageContext):
        from prefcurate.inference.models import EMBEDDING_MODEL_NAME
        from prefcurate.tasks.embed import embed_texts
        from prefcurate.tasks.score import item_texts, score_responses

        store = ctx.store()
        config = ctx.pipeline_config()
        params = section(config, "score")
        responses = _latest(store, "responses", "response_id")
        prompts = _latest(store, "prompts", "prompt_id")
        items = item_texts(responses, prompts, params.max_text_chars)
        if items.height < 2:
            return {"quality": None, "embeddings": None}, {"items": items.height, "skipped": "fewer than 2 items"}
        vectors, new_embeddings, embed_seconds = embed_with_cache(
            store, items, "response", EMBEDDING_MODEL_NAME, embed_texts
        )
        judge = engine_for(config.pools, params.pool)
        critiq = engine_for(config.pools, params.critiq.pool) if params.critiq.enabled else None
        outcome = score_responses(items, vectors, params, judge, critiq, embed_fn=embed_texts)
        if outcome.critiq_markdown:
            reports = Path(store.root) / "reports"
            reports.mkdir(exist_ok=True)
            (reports / f"critiq-{ctx.run_id}.md").write_text(outcome.critiq_markdown)
        model_seconds = judge.seconds + (critiq.seconds if critiq else 0.0) + embed_seconds + outcome.embed_seconds
        counts = {"items": items.height, "quality_rows": outcome.quality.height,
                  "embedded": new_embeddings.height, "model_seconds": model_seconds,
                  "report": outcome.report}
        return {"quality": outcome.quality, "embeddings": new_embeddings}, counts
