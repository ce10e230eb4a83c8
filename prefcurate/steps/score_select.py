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
from prefcurate.schemas.views import choice_columns, current_rows_sql
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


def embed_with_cache(store, items: pl.DataFrame, kind: str, model_name: str, embed_fn) -> tuple[np.ndarray, pl.DataFrame, float]:
    """Vectors for ``items`` (item_id, text) in order, and the new EMBEDDINGS rows to store.

    One float32 matrix is the only whole copy of the vectors held: cached vectors stream
    into it from the embeddings table batch by batch, the missing items are embedded into it
    chunk by chunk, and the new rows' vector column shares its memory when every item is new."""
    from prefcurate.schemas.tables import EMBEDDING_DIM

    index = items.select("item_id").with_row_index("_row")
    matrix = np.zeros((items.height, EMBEDDING_DIM), dtype=np.float32)
    cached = np.zeros(items.height, dtype=bool)
    # a few items (the score stage's sample) of a large table: only theirs are decoded
    # (0.7 -> 0.5 s for 1,000 of 300,000); for most of it, the semi-join costs more than it saves
    narrow = 4 * items.height < sum(shard["rows"] for shard in store.shards("embeddings"))
    with store.connect(read_only=True) as con:
        wanted = ""
        if narrow:
            con.register("wanted_items", index.select("item_id").to_arrow())
            wanted = " AND item_id IN (SELECT item_id FROM wanted_items)"
        # an item embedded twice has the same vector either time: whichever row comes last stays
        reader = con.sql("SELECT item_id, vector FROM embeddings WHERE item_kind = ? AND model = ?" + wanted,
                         params=[kind, model_name]).to_arrow_reader(_CACHE_BATCH)
        for batch in reader:
            hits = pl.from_arrow(batch).join(index, on="item_id", how="inner")
            if hits.height:
                rows = hits["_row"].to_numpy()
                matrix[rows] = hits["vector"].to_numpy()
                cached[rows] = True
    missing = np.flatnonzero(~cached)
    if missing.size == 0:
        return matrix, _no_embeddings(), 0.0
    subset = items if missing.size == items.height else items[missing]
    vectors, new_rows, seconds = embed_new(subset, kind, model_name, embed_fn)
    if missing.size == items.height:
        return vectors, new_rows, seconds  # (the new rows' vector column shares this matrix)
    matrix[missing] = vectors
    return matrix, new_rows, seconds


def embed_new(items: pl.DataFrame, kind: str, model_name: str, embed_fn) -> tuple[np.ndarray, pl.DataFrame, float]:
    """Vectors of ``items`` (item_id, text), embedded :data:`EMBED_CHUNK` texts at a time into
    one matrix, and their EMBEDDINGS rows (whose vector column shares that matrix's memory)."""
    from prefcurate.schemas.tables import EMBEDDING_DIM

    matrix = np.empty((items.height, EMBEDDING_DIM), dtype=np.float32)
    seconds = 0.0
    for offset in range(0, items.height, EMBED_CHUNK):
        started = time.perf_counter()
        chunk = np.asarray(embed_fn(items["text"].slice(offset, EMBED_CHUNK).to_list()), dtype=np.float32)
        seconds += time.perf_counter() - started
        matrix[offset:offset + len(chunk)] = chunk
    vector = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), EMBEDDING_DIM)
    new_rows = pl.DataFrame({"item_id": items["item_id"], "item_kind": kind, "model": model_name}
                            ).with_columns(pl.Series("vector", vector))
    return matrix, new_rows, seconds


def _no_embeddings() -> pl.DataFrame:
    from prefcurate.schemas.tables import EMBEDDING_DIM

    return pl.DataFrame(schema={"item_id": pl.String, "item_kind": pl.String, "model": pl.String,
                                "vector": pl.Array(pl.Float32, EMBEDDING_DIM)})


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
        """Train on the judged sample, then score every response by its vector, reading the
        dataset one shard at a time: the cached vectors from the embeddings shards, then the
        texts of the responses without one from the responses shards, embedded in chunks of
        :data:`SCORE_CHUNK` and written as they are made. Held for the whole stage: the ids,
        one float per response and method (the z-scores need them all) and the prompts."""
        from prefcurate.inference.models import EMBEDDING_MODEL_NAME
        from prefcurate.tasks.embed import embed_texts
        from prefcurate.tasks.qurating import sample_items
        from prefcurate.tasks.score import fit_quality_models, unlabelled_pair_positions

        store = ctx.store()
        config = ctx.pipeline_config()
        params = config.score
        items = _scored_responses(store)
        item_ids = items["item_id"]
        if len(item_ids) < 2:
            return {"quality": None, "embeddings": None}, {"items": len(item_ids), "skipped": "fewer than 2 items"}
        prompts = store.query("SELECT prompt_id, prompt FROM prompts QUALIFY row_number() OVER "
                              "(PARTITION BY prompt_id ORDER BY created_at DESC) = 1")
        sample_at = sample_items(len(item_ids), params.qurating.sample_size, params.qurating.seed)
        sample = _texts_at(store, item_ids, sample_at, prompts, params.max_text_chars)
        sample_vectors, sample_embeddings, embed_seconds = embed_with_cache(
            store, sample, "response", EMBEDDING_MODEL_NAME, embed_texts)
        critiq_pairs = None
        if params.critiq.enabled:
            first, second = unlabelled_pair_positions(len(item_ids), params.critiq.scorer_pairs, params.qurating.seed)
            texts = _texts_at(store, item_ids, np.concatenate([first, second]), prompts, params.max_text_chars)["text"]
            critiq_pairs = pl.DataFrame({"text_a": texts.head(len(first)), "text_b": texts.tail(len(second))})
        judge = engine_for(config.pools, params.pool)
        critiq = engine_for(config.pools, params.critiq.pool) if params.critiq.enabled else None
        models = fit_quality_models(sample["item_id"].to_list(), sample["text"], sample_vectors, critiq_pairs,
                                    params, judge, critiq, embed_fn=embed_texts)
        if models.critiq_markdown:
            reports = Path(store.root) / "reports"
            reports.mkdir(exist_ok=True)
            (reports / f"critiq-{ctx.run_id}.md").write_text(models.critiq_markdown)
        counts: dict = {"items": len(item_ids)}

        def parts():
            nonlocal embed_seconds
            scores = np.empty((len(item_ids), len(models.methods)), dtype=np.float64)
            done = np.zeros(len(item_ids), dtype=bool)
            scores[sample_at] = models.score(sample_vectors)
            done[sample_at] = True
            embedded = sample_embeddings.height
            yield from (("embeddings", part) for part in _in_parts(sample_embeddings) if part.height)
            # (no scorer trained: the sample's ratings are all there is, and no vector is needed)
            if models.methods:
                for positions, vectors in _cached_vectors(store, items, done, "response", EMBEDDING_MODEL_NAME):
                    scores[positions] = models.score(vectors)
                for positions, chunk in _texts_of_the_rest(store, items, done, prompts, params.max_text_chars):
                    vectors, new_embeddings, seconds = embed_new(chunk, "response", EMBEDDING_MODEL_NAME, embed_texts)
                    scores[positions] = models.score(vectors)
                    embed_seconds += seconds
                    embedded += new_embeddings.height
                    yield from (("embeddings", part) for part in _in_parts(new_embeddings) if part.height)
                if not done.all():
                    missing = item_ids[int(np.flatnonzero(~done)[0])]
                    raise RuntimeError(f"response {missing} was not found in the responses shards while the score "
                                       "stage ran (another run changed the dataset): run the stage again")
            quality = models.quality_frames(item_ids, scores)
            yield from (("quality", frame) for frame in quality)
            yield "request_metrics", request_metrics(judge, critiq)
            model = model_time(judge, critiq)
            model["model_seconds"] += embed_seconds + models.embed_seconds
            counts.update({"quality_rows": sum(frame.height for frame in quality), "embedded": embedded,
                           **model, "report": models.report})

        return parts(), counts


#: responses embedded and scored per chunk: with one shard of the dataset, what the score
#: stage holds of the responses at a time
SCORE_CHUNK = 32768


def _scored_responses(store) -> pl.DataFrame:
    """The responses the score stage scores, sorted by id: the current row of each id with a
    text and a known prompt (the rule of ``tasks.score.item_texts``). ``made_us`` (when that
    row was made) tells it from the id's other rows when the shards are read one by one."""
    # (whether a text is there, not the text, goes through the one-row-per-id choice)
    current = current_rows_sql(
        "responses", columns=", ".join([*choice_columns("responses"), "prompt_id", "text <> '' AS has_text"]))
    return store.query(
        f"SELECT response_id AS item_id, epoch_us(created_at) AS made_us FROM ({current}) "
        "WHERE has_text AND prompt_id IN (SELECT prompt_id FROM prompts) ORDER BY item_id")


def _texts_at(store, item_ids: pl.Series, positions: np.ndarray, prompts: pl.DataFrame,
              max_chars: int) -> pl.DataFrame:
    """(item_id, text) of the items at ``positions`` of ``item_ids``, in that order (a few:
    the judged sample, CritiQ's pairs), as ``tasks.score.item_texts`` makes them."""
    from prefcurate.tasks.score import item_texts

    wanted = item_ids.gather(np.asarray(positions, dtype=np.int64))
    responses = store.query(
        "SELECT response_id, prompt_id, text FROM ({})".format(
            current_rows_sql("responses", where="response_id IN (SELECT unnest($1::VARCHAR[]))")),
        [wanted.unique().to_list()])
    found = wanted.to_frame("item_id").join(item_texts(responses, prompts, max_chars), on="item_id",
                                            how="left", maintain_order="left")
    if found["text"].null_count():
        missing = found.filter(pl.col("text").is_null())["item_id"][0]
        raise RuntimeError(f"response {missing} lost its text or prompt while the score stage ran "
                           "(another run changed the dataset): run the stage again")
    return found


def _cached_vectors(store, items: pl.DataFrame, done: np.ndarray, kind: str, model: str):
    """(positions in ``items``, their vectors) of the items not ``done`` that have a stored
    vector of this kind and model, one embeddings shard at a time; marks them done."""
    index = items.select("item_id").with_row_index("position")
    for shard in store.shards("embeddings"):
        hits = (store.read_shard(shard["path"])
                .filter((pl.col("item_kind") == kind) & (pl.col("model") == model))
                .select("item_id", "vector").join(index, on="item_id", how="inner")
                .unique("position", keep="first", maintain_order=True))
        hits = hits.filter(~pl.Series(done[hits["position"].to_numpy()]))
        if hits.height:
            positions = hits["position"].to_numpy().astype(np.int64)
            done[positions] = True
            yield positions, hits["vector"].to_numpy(writable=True)  # (torch takes no read-only array)


def _texts_of_the_rest(store, items: pl.DataFrame, done: np.ndarray, prompts: pl.DataFrame, max_chars: int):
    """(positions in ``items``, (item_id, text)) of the items not ``done``, in chunks of about
    :data:`SCORE_CHUNK`, reading one responses shard at a time; marks them done."""
    from prefcurate.tasks.score import item_texts

    index = items.with_row_index("position")
    held: list[pl.DataFrame] = []

    def chunks_of(frames: list[pl.DataFrame]):
        rows = pl.concat(frames)
        for offset in range(0, rows.height, SCORE_CHUNK):  # (a shard larger than a chunk is cut)
            part = rows.slice(offset, SCORE_CHUNK)
            texts = item_texts(part.drop("position"), prompts, max_chars).join(
                part.select(pl.col("response_id").alias("item_id"), "position"), on="item_id")
            positions = texts["position"].to_numpy().astype(np.int64)
            # a row that lost its text or prompt since the ids were read is not done
            done[np.setdiff1d(part["position"].to_numpy(), positions)] = False
            yield positions, texts.select("item_id", "text")

    for shard in store.shards("responses"):
        if done.all():  # (every vector was cached: no text is read)
            break
        rows = (store.read_shard(shard["path"])
                .select("response_id", "prompt_id", "text", pl.col("created_at").dt.epoch("us").alias("made_us"))
                .join(index, left_on=["response_id", "made_us"], right_on=["item_id", "made_us"], how="inner")
                .unique("position", keep="first", maintain_order=True)
                .select("response_id", "prompt_id", "text", "position"))
        rows = rows.filter(~pl.Series(done[rows["position"].to_numpy()]))
        if rows.height == 0:
            continue
        done[rows["position"].to_numpy()] = True
        held.append(rows)
        if sum(frame.height for frame in held) >= SCORE_CHUNK:
            yield from chunks_of(held)
            held = []
    if held:
        yield from chunks_of(held)


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
        SELECT p.pair_id, p.prompt_id, pr.prompt, c.text AS chosen, r.text AS rejected, p.chosen_id, p.rejected_id
        FROM p
        JOIN (SELECT DISTINCT ON (prompt_id) prompt_id, prompt FROM prompts) pr USING (prompt_id)
        JOIN response c ON c.response_id = p.chosen_id
        JOIN response r ON r.response_id = p.rejected_id
        ORDER BY p.pair_id
        """
    )


#: what a pair's vectors are (in the select unit's key, so a dataset selected under an earlier
#: rule is selected again): its responses' vectors, as the score stage embeds them
_PAIR_VECTORS = "pair = chosen response's vector (kind response); near-duplicate: rejected near too"


class SelectStep(Step):
    name = "select"
    whole_dataset = True

    def plan(self, ctx: StageContext) -> list[Unit]:
        config = ctx.pipeline_config()
        key = content_id("select", self.input_fingerprint(ctx, ["pairs", "quality"]),
                         config.select.model_dump(mode="json"), _PAIR_VECTORS, config.score.max_text_chars)
        return [Unit(self.name, key, ("selections", "embeddings"))]

    def compute(self, unit: Unit, ctx: StageContext):
        from prefcurate.inference.models import EMBEDDING_MODEL_NAME
        from prefcurate.tasks.dedup import pair_dedup_text
        from prefcurate.tasks.embed import embed_texts
        from prefcurate.tasks.score import pair_quality, response_item_text
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
        # each response's vector as the score stage makes and stores it (kind "response"), so
        # a build's select embeds nothing the score stage did not; a pair is its chosen
        # response's vector, and its rejected one's must be near too for a near-duplicate
        sides = pl.concat([pairs.select(pl.col(f"{side}_id").alias("item_id"), "prompt", pl.col(side).alias("text"))
                           for side in ("chosen", "rejected")]).unique("item_id", maintain_order=True)
        items = sides.select("item_id", response_item_text(ctx.pipeline_config().score.max_text_chars))
        matrix, new_embeddings, embed_seconds = embed_with_cache(store, items, "response", EMBEDDING_MODEL_NAME,
                                                                 embed_texts)
        row = items.select("item_id").with_row_index("row")
        chosen, rejected = (matrix[pairs.select(pl.col(f"{side}_id").alias("item_id"))
                                   .join(row, on="item_id", how="left", maintain_order="left")["row"].to_numpy()]
                            for side in ("chosen", "rejected"))
        del matrix
        quality_values = pairs["quality"].to_numpy()
        # exact duplicates: same prompt, chosen and rejected texts
        result = select_items(chosen, quality_values, params, texts=pair_dedup_text(pairs), second_embeddings=rejected)
        report = selection_report(chosen, quality_values, result, seed=params.seed)
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
        from prefcurate.tasks.calibration import card_judges
        from prefcurate.tasks.export import export_curated

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
