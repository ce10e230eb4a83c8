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


def embed_with_cache(store, items: pl.DataFrame, kind: str, model_name: str, embed_fn,
                     known: pl.DataFrame | None = None) -> tuple[np.ndarray, pl.DataFrame, float]:
    """Vectors for ``items`` (item_id, text) in order, and the new EMBEDDINGS rows to store.

    One float32 matrix is the only whole copy of the vectors held: cached vectors stream
    into it from the embeddings table batch by batch (only these items' rows are read), the
    missing items are embedded into it chunk by chunk, and the new rows' vector column
    shares its memory when every item is new. ``known``: EMBEDDINGS rows this unit made
    earlier and has not registered yet (taken as cached: not embedded or returned again)."""
    from prefcurate.schemas.tables import EMBEDDING_DIM

    index = items.select("item_id").with_row_index("_row")
    matrix = np.zeros((items.height, EMBEDDING_DIM), dtype=np.float32)
    cached = np.zeros(items.height, dtype=bool)

    def take(rows_with_vectors: pl.DataFrame) -> None:
        hits = rows_with_vectors.join(index, on="item_id", how="inner")
        if hits.height:
            rows = hits["_row"].to_numpy()
            matrix[rows] = hits["vector"].to_numpy()
            cached[rows] = True

    with store.connect(read_only=True) as con:
        # an item embedded twice has the same vector either time: whichever row comes last stays
        reader = con.sql("SELECT item_id, vector FROM embeddings WHERE item_kind = ? AND model = ? "
                         "AND item_id IN (SELECT unnest(?::VARCHAR[]))",
                         params=[kind, model_name, items["item_id"].to_list()]).to_arrow_reader(_CACHE_BATCH)
        for batch in reader:
            take(pl.from_arrow(batch))
    if known is not None and known.height:
        take(known.select("item_id", "vector"))
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
        """The judged sample's texts and vectors first (to train on), then every response in
        chunks of :data:`SCORE_CHUNK`: its texts, its vectors (cached or embedded), its raw
        scores; each chunk's new embeddings are written as they are made. Only the ids and
        one float per response and method are held for the whole stage (the z-scores need
        every score)."""
        from prefcurate.inference.models import EMBEDDING_MODEL_NAME
        from prefcurate.tasks.embed import embed_texts
        from prefcurate.tasks.qurating import sample_items
        from prefcurate.tasks.score import fit_quality_models, unlabelled_pair_positions

        store = ctx.store()
        config = ctx.pipeline_config()
        params = config.score
        item_ids = _score_item_ids(store)
        if len(item_ids) < 2:
            return {"quality": None, "embeddings": None}, {"items": len(item_ids), "skipped": "fewer than 2 items"}
        sample = _texts_at(store, item_ids, sample_items(len(item_ids), params.qurating.sample_size,
                                                         params.qurating.seed), params.max_text_chars)
        sample_vectors, sample_embeddings, embed_seconds = embed_with_cache(
            store, sample, "response", EMBEDDING_MODEL_NAME, embed_texts)
        critiq_pairs = None
        if params.critiq.enabled:
            first, second = unlabelled_pair_positions(len(item_ids), params.critiq.scorer_pairs, params.qurating.seed)
            texts = _texts_at(store, item_ids, np.concatenate([first, second]), params.max_text_chars)["text"]
            critiq_pairs = pl.DataFrame({"text_a": texts.head(len(first)), "text_b": texts.tail(len(second))})
        judge = engine_for(config.pools, params.pool)
        critiq = engine_for(config.pools, params.critiq.pool) if params.critiq.enabled else None
        models = fit_quality_models(sample["item_id"].to_list(), sample["text"], sample_vectors, critiq_pairs,
                                    params, judge, critiq, embed_fn=embed_texts)
        del sample, sample_vectors
        if models.critiq_markdown:
            reports = Path(store.root) / "reports"
            reports.mkdir(exist_ok=True)
            (reports / f"critiq-{ctx.run_id}.md").write_text(models.critiq_markdown)
        counts: dict = {"items": len(item_ids)}

        def parts():
            nonlocal embed_seconds
            yield from (("embeddings", part) for part in _in_parts(sample_embeddings) if part.height)
            embedded = sample_embeddings.height
            scores = np.empty((len(item_ids), len(models.methods)), dtype=np.float64)
            # (no scorer trained: the sample's ratings are all there is, and no vector is needed)
            for offset in range(0, len(item_ids) if models.methods else 0, SCORE_CHUNK):
                positions = np.arange(offset, min(offset + SCORE_CHUNK, len(item_ids)))
                chunk = _texts_at(store, item_ids, positions, params.max_text_chars)
                vectors, new_embeddings, seconds = embed_with_cache(
                    store, chunk, "response", EMBEDDING_MODEL_NAME, embed_texts, known=sample_embeddings)
                embed_seconds += seconds
                embedded += new_embeddings.height
                scores[positions] = models.score(vectors)
                yield from (("embeddings", part) for part in _in_parts(new_embeddings) if part.height)
            quality = models.quality_frames(item_ids, scores)
            yield from (("quality", frame) for frame in quality)
            yield "request_metrics", request_metrics(judge, critiq)
            model = model_time(judge, critiq)
            model["model_seconds"] += embed_seconds + models.embed_seconds
            counts.update({"quality_rows": sum(frame.height for frame in quality), "embedded": embedded,
                           **model, "report": models.report})

        return parts(), counts


#: responses scored per chunk: their texts and vectors are what the score stage holds of them
SCORE_CHUNK = 32768


def _score_item_ids(store) -> pl.Series:
    """The responses the score stage scores, by id (sorted): those with a text and a known
    prompt (the rule of ``tasks.score.item_texts``)."""
    return store.query(
        "SELECT response_id AS item_id FROM current_responses "
        "WHERE text <> '' AND prompt_id IN (SELECT prompt_id FROM prompts) ORDER BY item_id"
    )["item_id"]


def _texts_at(store, item_ids: pl.Series, positions: np.ndarray, max_chars: int) -> pl.DataFrame:
    """(item_id, text) of the items at ``positions`` of ``item_ids``, in that order: each
    response with its prompt, as ``tasks.score.item_texts`` makes them."""
    from prefcurate.tasks.score import item_texts

    wanted = item_ids.gather(np.asarray(positions, dtype=np.int64))
    unique = wanted.unique().to_list()
    responses = store.query(
        "SELECT response_id, prompt_id, text FROM ({}) ".format(
            current_rows_sql("responses", where="response_id IN (SELECT unnest($1::VARCHAR[]))")), [unique])
    prompts = store.query(
        "SELECT prompt_id, prompt FROM prompts WHERE prompt_id IN (SELECT unnest($1::VARCHAR[])) "
        "QUALIFY row_number() OVER (PARTITION BY prompt_id ORDER BY created_at DESC) = 1",
        [responses["prompt_id"].unique().to_list()])
    items = item_texts(responses, prompts, max_chars)
    found = wanted.to_frame("item_id").join(items, on="item_id", how="left", maintain_order="left")
    if found["text"].null_count():
        missing = found.filter(pl.col("text").is_null())["item_id"][0]
        raise RuntimeError(f"response {missing} lost its text or prompt while the score stage ran "
                           "(another run changed the dataset): run the stage again")
    return found


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
