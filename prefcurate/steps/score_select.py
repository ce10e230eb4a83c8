"""Score, select and export steps: whole-dataset units keyed by their inputs.

Embeddings are cached per item id in the ``embeddings`` table: a step embeds only the items
that have no vector yet for the configured model, and writes those as part of its unit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from prefcurate.schemas.ids import content_id
from prefcurate.schemas.views import current_rows_sql
from prefcurate.steps.base import StageContext, Step, Unit
from prefcurate.steps.engines import engine_for, model_time, pool_config, request_metrics

_PROVENANCE = ["run_id", "stage", "code_version", "created_at"]


def _latest(store, table: str, key: str) -> pl.DataFrame:
    frame = store.read(table)
    return frame.sort("created_at").unique(key, keep="last").drop(_PROVENANCE) if frame.height else frame.drop(_PROVENANCE)


#: texts given to the embedder per call: bounds its working memory, each chunk's vectors go
#: straight into the result matrix
EMBED_CHUNK = 16384
#: cached vectors read per batch from the embeddings table
_CACHE_BATCH = 65536
#: rows per shard of new embeddings: a shard is one Parquet row group, which a reader
#: decompresses whole, so small shards keep the next run's streaming read small
EMBEDDING_SHARD_ROWS = 32768


def _in_parts(frame: pl.DataFrame, rows: int = EMBEDDING_SHARD_ROWS) -> list[pl.DataFrame]:
    """``frame`` as zero-copy slices of at most ``rows`` rows (one shard each; one when empty)."""
    return [frame.slice(offset, rows) for offset in range(0, frame.height, rows)] or [frame]


def embed_with_cache(store, items: pl.DataFrame, kind: str, model_name: str, embed_fn) -> tuple[np.ndarray, pl.DataFrame, float]:
    """Vectors for ``items`` (item_id, text) in order, and the new EMBEDDINGS rows to store.

    One float32 matrix is the only whole copy of the vectors held: cached vectors stream
    into it from the embeddings table batch by batch, the missing items are embedded into it
    chunk by chunk, and the new rows' vector column shares its memory when every item is new."""
    from prefcurate.schemas.tables import EMBEDDING_DIM

    index = items.select("item_id").with_row_index("_row")
    matrix = np.zeros((items.height, EMBEDDING_DIM), dtype=np.float32)
    cached = np.zeros(items.height, dtype=bool)
    with store.connect(read_only=True) as con:
        # an item embedded twice has the same vector either time: whichever row comes last stays
        reader = con.sql("SELECT item_id, vector FROM embeddings WHERE item_kind = ? AND model = ?",
                         params=[kind, model_name]).to_arrow_reader(_CACHE_BATCH)
        for batch in reader:
            hits = pl.from_arrow(batch).join(index, on="item_id", how="inner")
            if hits.height:
                rows = hits["_row"].to_numpy()
                matrix[rows] = hits["vector"].to_numpy()
                cached[rows] = True
    missing = np.flatnonzero(~cached)
    seconds = 0.0
    if missing.size == 0:
        new_rows = pl.DataFrame(schema={"item_id": pl.String, "item_kind": pl.String, "model": pl.String,
                                        "vector": pl.Array(pl.Float32, EMBEDDING_DIM)})
        return matrix, new_rows, seconds
    texts = items["text"] if missing.size == items.height else items["text"].gather(missing)
    for offset in range(0, missing.size, EMBED_CHUNK):
        started = time.perf_counter()
        chunk = np.asarray(embed_fn(texts.slice(offset, EMBED_CHUNK).to_list()), dtype=np.float32)
        seconds += time.perf_counter() - started
        matrix[missing[offset:offset + EMBED_CHUNK]] = chunk
    new_vectors = matrix if missing.size == items.height else matrix[missing]
    vector = pa.FixedSizeListArray.from_arrays(pa.array(new_vectors.reshape(-1)), EMBEDDING_DIM)
    new_rows = pl.DataFrame({
        "item_id": items["item_id"].gather(missing), "item_kind": kind, "model": model_name,
    }).with_columns(pl.Series("vector", vector))
    return matrix, new_rows, seconds


class ScoreStep(Step):
    name = "score"
    whole_dataset = True

    def pools(self, ctx: StageContext) -> list[str]:
        params = ctx.pipeline_config().score
        return sorted({params.pool} | ({params.critiq.pool} if params.critiq.enabled else set()))

    def plan(self, ctx: StageContext) -> list[Unit]:
        from prefcurate.inference.pools import parse_pool
        from prefcurate.tasks import critiq, qurating

        config = ctx.pipeline_config()
        params = config.score
        # which models judge (the pools decide) and the prompts and files they are shown
        models = {name: parse_pool(pool_config(config.pools, name)).model_identity()
                  for name in self.pools(ctx)}
        prompts = {"qurating": qurating.prompt_hash(params.qurating.template),
                   "critiq": critiq.inputs_hash(params.critiq.human_pairs, params.critiq.seed_criteria,
                                                params.critiq.params)
                   if params.critiq.enabled else None}
        key = content_id("score", self.input_fingerprint(ctx, ["responses", "prompts"]), params.model_dump(mode="json"),
                         models, prompts)
        return [Unit(self.name, key, ("quality", "embeddings", "request_metrics"))]

    def compute(self, unit: Unit, ctx: StageContext):
        from prefcurate.inference.models import EMBEDDING_MODEL_NAME
        from prefcurate.tasks.embed import embed_texts
        from prefcurate.tasks.score import item_texts, score_responses

        store = ctx.store()
        config = ctx.pipeline_config()
        params = config.score
        # the columns item_texts reads (not the sampling, errors and timings of every response)
        responses = store.read("current_responses", ["response_id", "prompt_id", "text"])
        prompts = _latest(store, "prompts", "prompt_id")
        items = item_texts(responses, prompts, params.max_text_chars)
        del responses, prompts  # items holds what is needed of them, for the rest of the stage
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
        model = model_time(judge, critiq)
        model["model_seconds"] += embed_seconds + outcome.embed_seconds
        counts = {"items": items.height, "quality_rows": outcome.quality.height,
                  "embedded": new_embeddings.height, **model, "report": outcome.report}
        return {"quality": outcome.quality, "embeddings": _in_parts(new_embeddings),
                "request_metrics": request_metrics(judge, critiq)}, counts


def _candidate_pairs(store) -> pl.DataFrame:
    """The latest filter run's pairs with the texts selection and export need.

    Only the pairs' responses, and only their ids and texts, go through the one-row-per-id
    choice (current_responses would order every response with all its columns, twice)."""
    responses = current_rows_sql(
        "responses", where="response_id IN (SELECT chosen_id FROM p UNION ALL SELECT rejected_id FROM p)")
    return store.query(
        f"""
        WITH p AS (SELECT pair_id, prompt_id, chosen_id, rejected_id FROM current_pairs),
        response AS (SELECT response_id, text FROM ({responses}))
        SELECT p.pair_id, p.prompt_id, pr.prompt, c.text AS chosen, r.text AS rejected, p.chosen_id
        FROM p
        JOIN (SELECT DISTINCT ON (prompt_id) prompt_id, prompt FROM prompts) pr USING (prompt_id)
        JOIN response c ON c.response_id = p.chosen_id
        JOIN response r ON r.response_id = p.rejected_id
        ORDER BY p.pair_id
        """
    )


class SelectStep(Step):
    name = "select"
    whole_dataset = True

    def plan(self, ctx: StageContext) -> list[Unit]:
        params = ctx.pipeline_config().select
        key = content_id("select", self.input_fingerprint(ctx, ["pairs", "quality"]), params.model_dump(mode="json"))
        return [Unit(self.name, key, ("selections", "embeddings"))]

    def compute(self, unit: Unit, ctx: StageContext):
        from prefcurate.inference.models import EMBEDDING_MODEL_NAME
        from prefcurate.tasks.dedup import pair_dedup_text
        from prefcurate.tasks.embed import embed_texts, pair_embedding_text
        from prefcurate.tasks.score import pair_quality
        from prefcurate.tasks.selection import select_items, selection_report

        store = ctx.store()
        params = ctx.pipeline_config().select
        pairs = _candidate_pairs(store)
        if pairs.height == 0:
            return {"selections": None, "embeddings": None}, {"pairs": 0, "selected": 0}
        # (the scores of these pairs' chosen responses only, and the columns the choice of score reads)
        quality = pair_quality(pairs, store.query(
            "SELECT item_id, criterion, method, z_score FROM quality WHERE item_id IN (SELECT unnest($1::VARCHAR[]))",
            [pairs["chosen_id"].unique().to_list()]))
        pairs = pairs.join(quality, on="pair_id", how="left").with_columns(pl.col("quality").fill_null(0.0))
        items = pl.DataFrame({"item_id": pairs["pair_id"], "text": pair_embedding_text(pairs["prompt"], pairs["chosen"])})
        vectors, new_embeddings, embed_seconds = embed_with_cache(store, items, "pair", EMBEDDING_MODEL_NAME, embed_texts)
        quality_values = pairs["quality"].to_numpy()
        # exact duplicates: same prompt, chosen and rejected (the semantic check uses the embedding)
        result = select_items(vectors, quality_values, params, texts=pair_dedup_text(pairs))
        report = selection_report(vectors, quality_values, result, seed=params.seed)
        selections = result.to_frame(pairs["pair_id"])
        counts = {"pairs": pairs.height, "selected": int(result.selected.sum()),
                  "near_duplicates": result.info.get("n_near_duplicates", 0),
                  "exact_duplicates": result.info.get("n_exact_duplicates", 0),
                  "model_seconds": embed_seconds, "report": json.loads(json.dumps(report, default=float))}
        return {"selections": selections, "embeddings": _in_parts(new_embeddings)}, counts


#: what the export reads: curated_pairs (selections, pairs, prompts, responses), the card's
#: judgments and judge accuracy; the filter and select reports come with their runs' shards
_EXPORT_INPUTS = ["selections", "pairs", "prompts", "responses", "judgments", "judge_accuracy"]


class ExportStep(Step):
    """Writes files, not tables: keyed by its inputs' registered shards and its options, and
    done when that key is recorded (``unit_counts``) and the files it wrote are all there."""

    name = "export"
    whole_dataset = True

    def plan(self, ctx: StageContext) -> list[Unit]:
        config = ctx.pipeline_config()
        options = {"export": config.export.model_dump(mode="json"), "name": config.name,
                   "export_dir": config.export_dir, "dataset": ctx.dataset}
        return [Unit(self.name, content_id("export", self.input_fingerprint(ctx, _EXPORT_INPUTS), options), ())]

    def pending(self, ctx, units):
        recorded = ctx.store().recorded_units(self.name)
        todo, done = [], []
        for unit in units:
            files = recorded.get(unit.key, {}).get("files", {}) if unit.key in recorded else None
            # deleted or moved export files are written again
            complete = files is not None and all(Path(path).exists() for path in files.values())
            (done if complete else todo).append(unit)
        return todo, done

    def compute(self, unit: Unit, ctx: StageContext):
        from prefcurate.tasks.export import export_curated
        from prefcurate.tasks.calibration import card_judges

        store = ctx.store()
        config = ctx.pipeline_config()
        params = config.export
        curated = store.query("SELECT * FROM curated_pairs")
        out_dir = Path(params.out_dir or config.export_dir or (store.root / "export"))
        if curated.height == 0:
            return {}, {"exported": 0, "note": 0}
        filter_report = (store.latest_reports("filter", "report") or [{}])[0]
        select_report = (store.latest_reports("select", "report") or [{}])[0]
        stats = {
            "title": f"{config.name}: curated preference pairs",
            "sources": store.query("SELECT source_file, count(*) AS prompts FROM prompts GROUP BY ALL").to_dicts(),
            "filters": filter_report.get("drops_per_reason", {}),
            "selection": select_report,
            "cluster_pool_counts": dict(store.query(
                "SELECT cluster, count(*) AS n FROM selections WHERE run_id = "
                "(SELECT run_id FROM selections ORDER BY created_at DESC LIMIT 1) GROUP BY ALL"
            ).iter_rows()),
            "provenance": {"dataset": str(store.root), "select_run": curated["select_run_id"][0],
                           "filter_run": curated["filter_run_id"][0]},
        }
        # judges used, labelled accuracy and the calibration gate of the latest filter run
        stats.update(card_judges(store.query(
            "SELECT * FROM judge_accuracy WHERE run_id = "
            "(SELECT run_id FROM judge_accuracy ORDER BY created_at DESC LIMIT 1)")))
        # the card's per-judge agreement and single-order share read the pairs' judgments
        # (the prompts picked before the one-row-per-id choice: the curated ones, not all judgments)
        current = current_rows_sql("judgments", where="prompt_id IN (SELECT unnest($1::VARCHAR[]))")
        judgments = store.query(
            f"SELECT prompt_id, response_a, response_b, judge, p_a, p_first_ab, p_first_ba FROM ({current}) "
            "WHERE valid", [curated["prompt_id"].unique().to_list()])
        written, counts = export_curated(
            curated, out_dir, formats=params.formats, card_stats=stats, plots=params.plots,
            trainer_formats=params.trainer_formats, integrity=params.integrity, judgments=judgments,
            length_ratio=params.length_ratio)
        return {}, {**counts, "files": {k: str(v) for k, v in written.items()}}
