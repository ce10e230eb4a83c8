"""Generate and annotate steps: one unit per prompt shard, content-keyed.

A unit's key hashes its prompt shard, the stage parameters, the model identity of every pool
it uses (served name and model folder fingerprint, ``PoolConfigBase.model_identity``; the pool
is the one source of which model runs) and, for annotate, the hash of every template a judge
uses and the response ids it will judge. So a re-run skips finished shards, and a new
generator, judge, model behind a pool or edited template makes new units that only compute
what is missing (content-addressed row ids, which hash the same identity, do the rest).

Failed model calls are stored with their error (a response with finish_reason ``error``, a
judgment or rating that is not ``valid``), and the next run asks them again: a shard whose
finished units left failures gets a retry unit keyed by the failed ids, which computes
exactly those (only good rows count as existing). Its new rows carry the same ids; the
``current_*`` views prefer a good row. A failure that fails again the same way keeps the
same retry key, so it is asked once per distinct set of failures, not on every run.
"""

from __future__ import annotations

import hashlib
import json

import polars as pl

from prefcurate.config import PipelineConfig
from prefcurate.errors import InputError
from prefcurate.inference.pools import bind_to_pools
from prefcurate.schemas.ids import content_id
from prefcurate.steps.base import StageContext, Step, Unit, _write_atomic
from prefcurate.steps.engines import TimedEngine, engine_for, model_time, request_metrics
from prefcurate.tasks.annotate import (
    AnnotateParams,
    annotate,
    calibrate_judge,
    calibration_gold_pairs,
    check_judge_pools,
    judge_template_hashes,
)
from prefcurate.tasks.generate import GenerateParams, check_pools, run_generators

_PROVENANCE = ["run_id", "stage", "code_version", "created_at"]


def _prompt_shards(store) -> list[dict]:
    return store.shards("prompts")


def _shard_prompts(store, path: str) -> pl.DataFrame:
    return store.read_shard(path).drop(_PROVENANCE)


def _ids_digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def _gold_content_digest(gold: pl.DataFrame) -> str:
    """What a calibration depends on in its gold pairs, in order: ids, texts and labels, so a
    label corrected or a response edited in place calibrates again (the ids alone stay)."""
    columns = [pl.col(c).cast(pl.String).fill_null("")
               for c in ("id", "prompt", "response_a", "response_b", "winner")]
    rows = gold.select(pl.concat_str(columns, separator="\x1f"))
    return hashlib.sha256("\n".join(rows.to_series().to_list()).encode()).hexdigest()


def _unit_rows(store, table: str, files: list[str] | None) -> str:
    """The FROM of a unit's lookup: its own shard files of ``table`` (``files``, from the plan),
    or the whole table's view when no file list was planned (a unit planned by an earlier
    version). Reading only the unit's files keeps a unit's cost independent of the dataset's."""
    if files is None:
        return table
    listed = ", ".join("'" + store.shard_url(f).replace("'", "''") + "'" for f in files)
    # by name, over the table's empty frame: shards written before a column was added read it as NULL
    return (f"(SELECT * FROM _empty_{table}" +
            (f" UNION ALL BY NAME SELECT * FROM read_parquet([{listed}], union_by_name = true)" if files else "") + ")")


def _read_unit_rows(store, sql: str, params: list, files: dict[str, list[str] | None]) -> pl.DataFrame:
    """``sql`` over ``_unit_rows`` of the tables in ``files``: without the catalog when every
    table's files were planned (see :meth:`Store.query_shard_files`)."""
    if any(listed is None for listed in files.values()):
        return store.query(sql, params)
    return store.query_shard_files(sql, params, tables=list(files))


def _failed_ids(store, table: str, id_column: str, ok: str, prompt_ids: list[str],
                files: list[str] | None = None) -> list[str]:
    """Ids in ``table`` for these prompts whose every stored row failed (``ok`` is false)."""
    if files == []:
        return []
    return _read_unit_rows(
        store, f"SELECT {id_column} AS id FROM {_unit_rows(store, table, files)} WHERE prompt_id IN (SELECT unnest(?)) "
        f"GROUP BY {id_column} HAVING NOT bool_or({ok})", [prompt_ids], {table: files}
    )["id"].to_list()


def _good_ids(store, table: str, id_column: str, ok: str, prompt_ids: list[str],
              files: list[str] | None = None) -> list[str]:
    """Ids in ``table`` for these prompts with at least one good row: not asked again."""
    if files == []:
        return []
    return _read_unit_rows(
        store, f"SELECT DISTINCT {id_column} AS id FROM {_unit_rows(store, table, files)} "
        f"WHERE prompt_id IN (SELECT unnest(?)) AND {ok}", [prompt_ids], {table: files}
    )["id"].to_list()


def _files_by_shard(store, prompt_shards: pl.DataFrame, table: str) -> dict[str, list[str]]:
    """{prompt shard path: the registered shard files of ``table`` holding rows of its prompts},
    from one pass over the table's ``prompt_id`` column. Planned into each unit, so a unit
    reads its own rows only (never the whole table)."""
    registered = [s["path"] for s in store.shards(table)]
    if not registered or prompt_shards.height == 0:
        return {}
    by_file = {store.shard_url(path): path for path in registered}
    holders = (pl.scan_parquet(list(by_file), include_file_paths="file", extra_columns="ignore",
                               storage_options=store.storage_options())
               .select("prompt_id", "file").unique().collect())
    per_shard = (holders.join(prompt_shards, on="prompt_id")
                 .group_by("path").agg(pl.col("file").unique().sort()))
    return {path: [by_file[f] for f in files] for path, files in per_shard.iter_rows()}


def _prompt_ids_by_shard(store, shards: list[dict]) -> pl.DataFrame:
    """(prompt_id, path) of every prompt shard, read in one pass over the prompt files."""
    if not shards:
        return pl.DataFrame(schema={"prompt_id": pl.String, "path": pl.String})
    by_file = {store.shard_url(s["path"]): s["path"] for s in shards}
    # shards of older versions may hold other columns beside prompt_id
    frame = (pl.scan_parquet(list(by_file), include_file_paths="file", extra_columns="ignore",
                             storage_options=store.storage_options())
             .select("prompt_id", "file").collect())
    return frame.select("prompt_id", pl.col("file").replace_strict(by_file).alias("path"))


def _ids_by_shard(store, prompt_shards: pl.DataFrame, table: str, id_column: str,
                  ok: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """({path: good ids}, {path: failed ids}) of ``table`` per prompt shard, from one grouped
    query (planning must not query per shard). An id is good when any stored row is good,
    failed when every one failed, as ``_good_ids`` and ``_failed_ids`` decide for one shard."""
    rows = store.query(f"SELECT prompt_id, {id_column} AS id, bool_or({ok}) AS good FROM {table} "
                       f"GROUP BY prompt_id, {id_column}")
    per_shard = rows.join(prompt_shards, on="prompt_id").group_by("path", "good").agg("id")
    good, failed = {}, {}
    for path, is_good, ids in per_shard.iter_rows():
        (good if is_good else failed)[path] = ids
    return good, failed


#: bump when what a lookup returns changes, so no memo of the earlier form is read
_LOOKUP_VERSION = 1


def _registry_memo(store, name: str, tables: list[str], compute) -> dict:
    """``compute()`` (a JSON-able dict of per-prompt-shard lookups over ``tables``) once per
    registry state of ``tables``: kept in ``_plans/`` under their registered shard keys, which
    fix the rows read (a registered shard is never rewritten). So planning a dataset whose
    tables did not change reads the catalog once, not the shards."""
    registered = store.registered_keys_of(tables)
    key = content_id("plan-lookups", name, _LOOKUP_VERSION, [sorted(registered[t]) for t in tables])
    path = store.root / "_plans" / f"{name}-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    _write_atomic(path, json.dumps(value))
    for earlier in path.parent.glob(f"{name}-*.json"):  # only the latest state is asked again
        if earlier != path:
            earlier.unlink(missing_ok=True)
    return value


def _with_retry(unit: Unit, failed: list[str]) -> list[Unit]:
    """``unit``, and a retry of the failed ids its earlier runs left (when there are any)."""
    if not failed:
        return [unit]
    retry_key = content_id(unit.key, "retry", _ids_digest(failed))
    return [unit, Unit(unit.stage, retry_key, unit.outputs, unit.payload | {"retry_of": unit.key})]


_RESPONSE_OK = "finish_reason <> 'error'"


def _bound_generate_params(config: PipelineConfig) -> GenerateParams:
    """The generate section with each generator's ``model`` set to its pool's model identity,
    which its unit keys and response ids hash (the pool decides which model runs)."""
    params: GenerateParams = config.generate
    check_pools(params.generators, config.pools)
    return params.model_copy(update={"generators": bind_to_pools(params.generators, config.pools, "generator")})


class _PromptShardStep(Step):
    """A step with a unit per prompt shard, whose plan looks up ids in the tables it writes,
    and an engine per model spec (a generator or judge: ``name`` and ``pool``)."""

    def model_specs(self, config: PipelineConfig) -> list:
        raise NotImplementedError

    def pools(self, ctx: StageContext) -> list[str]:
        return sorted({spec.pool for spec in self.model_specs(ctx.pipeline_config())})

    def engines(self, config: PipelineConfig) -> dict[str, TimedEngine]:
        return {spec.name: engine_for(config.pools, spec.pool) for spec in self.model_specs(config)}

    def finalize(self, ctx: StageContext, results: list) -> dict:
        if results:  # its tables changed: their lookups, made now, are what the next plan reads
            self.plan(ctx)
        return {}


class GenerateStep(_PromptShardStep):
    name = "generate"

    def model_specs(self, config: PipelineConfig) -> list:
        return config.generate.generators

    def plan(self, ctx: StageContext) -> list[Unit]:
        config = ctx.pipeline_config()
        params = _bound_generate_params(config)
        identity = [g.identity() | {"n": g.n} for g in params.generators]
        store = ctx.store()
        shards = _prompt_shards(store)

        def lookups() -> dict:
            prompt_shards = _prompt_ids_by_shard(store, shards)
            _, failed = _ids_by_shard(store, prompt_shards, "responses", "response_id", _RESPONSE_OK)
            return {"failed": failed, "files": _files_by_shard(store, prompt_shards, "responses")}

        found = _registry_memo(store, "generate", ["prompts", "responses"], lookups)
        failed, response_files = found["failed"], found["files"]
        units = []
        for shard in shards:
            path = shard["path"]
            unit = Unit(self.name, content_id("generate", shard["shard_key"], identity),
                        ("responses", "request_metrics"),
                        {"prompts_path": path, "inputs": {"responses": response_files.get(path, [])}})
            units += _with_retry(unit, failed.get(path, []))
        return units

    def compute(self, unit: Unit, ctx: StageContext):
        store = ctx.store()
        config = ctx.pipeline_config()
        params = _bound_generate_params(config)
        prompts = _shard_prompts(store, unit.payload["prompts_path"])
        inputs = unit.payload.get("inputs", {})
        existing = _good_ids(store, "responses", "response_id", _RESPONSE_OK, prompts["prompt_id"].to_list(),
                             inputs.get("responses"))
        engines = self.engines(config)
        responses = run_generators(prompts, params, engines, existing)
        counts = {
            "responses": responses.height,
            "truncated": int(responses["truncated"].sum()) if responses.height else 0,
            "errors": int((responses["finish_reason"] == "error").sum()) if responses.height else 0,
            "tokens_out": int(responses["tokens_out"].fill_null(0).sum()) if responses.height else 0,
            **model_time(*engines.values()),
        }
        return {"responses": responses, "request_metrics": request_metrics(*engines.values())}, counts


class AnnotateStep(_PromptShardStep):
    name = "annotate"

    def model_specs(self, config: PipelineConfig) -> list:
        return config.annotate.judges

    def plan(self, ctx: StageContext) -> list[Unit]:
        store = ctx.store()
        config = ctx.pipeline_config()
        params: AnnotateParams = config.annotate
        check_judge_pools(params.judges, config.pools, params)
        bound = bind_to_pools(params.judges, config.pools, "judge")
        judges = [j.model_dump(mode="json") | {"templates": judge_template_hashes(j, params)} for j in bound]
        verdicts = [j.model_dump(mode="json") | {"templates": judge_template_hashes(j, params, verdicts_only=True)}
                    for j in bound]
        settings = params.model_dump(mode="json", exclude={"judges", "batch_size"})
        shards = _prompt_shards(store)
        tables = ["responses", "judgments", "ratings"]

        def lookups() -> dict:
            prompt_shards = _prompt_ids_by_shard(store, shards)
            good_responses, _ = _ids_by_shard(store, prompt_shards, "responses", "response_id", _RESPONSE_OK)
            _, failed_judgments = _ids_by_shard(store, prompt_shards, "judgments", "judgment_id", "valid")
            _, failed_ratings = _ids_by_shard(store, prompt_shards, "ratings", "rating_id", "valid")
            paths = [shard["path"] for shard in shards]
            # the judgeable responses (a failed response retried into a good one changes the key)
            return {"responses_digest": {path: _ids_digest(good_responses.get(path, [])) for path in paths},
                    "failed": {path: failed_judgments.get(path, []) + failed_ratings.get(path, []) for path in paths},
                    "files": {table: _files_by_shard(store, prompt_shards, table) for table in tables}}

        found = _registry_memo(store, "annotate", ["prompts"] + tables, lookups)
        files = found["files"]
        units = []
        for shard in shards:
            path = shard["path"]
            key = content_id("annotate", shard["shard_key"], found["responses_digest"][path], judges, settings)
            unit = Unit(self.name, key, ("judgments", "ratings", "quarantine", "request_metrics"),
                        {"prompts_path": path, "inputs": {t: by_shard.get(path, []) for t, by_shard in files.items()}})
            units += _with_retry(unit, found["failed"][path])
        gold_digest = _gold_content_digest(calibration_gold_pairs(params))
        gold_key = content_id("calibration", verdicts, settings, gold_digest)
        outputs = ("judge_calibration", "request_metrics") + (("quarantine",) if params.gold_path else ())
        units.append(Unit(self.name, gold_key, outputs, {"calibration": True, "gold": gold_digest}))
        return units

    def compute(self, unit: Unit, ctx: StageContext):
        store = ctx.store()
        config = ctx.pipeline_config()
        params: AnnotateParams = config.annotate
        engines = self.engines(config)
        if unit.payload.get("calibration"):
            gold, bad_gold = calibration_gold_pairs(params, with_quarantine=True)
            planned = unit.payload.get("gold")
            if planned is not None and planned != _gold_content_digest(gold):
                raise InputError(
                    f"the gold pairs ({params.gold_path or 'the packaged set'}) changed after this build "
                    "planned their calibration; run the build again to calibrate on the new labels"
                )
            rows = [calibrate_judge(gold, judge, engines[judge.name], params) for judge in params.judges]
            outputs = {"judge_calibration": pl.concat(rows), "request_metrics": request_metrics(*engines.values())}
            if params.gold_path:  # the user's gold file's bad rows, with record and field
                outputs["quarantine"] = bad_gold
            return outputs, model_time(*engines.values())
        prompts = _shard_prompts(store, unit.payload["prompts_path"])
        ids = prompts["prompt_id"].to_list()
        # current_responses' rule (prefer a good row, then the newest), with the unit's prompt
        # filter applied before the de-duplication instead of after it over the whole table
        inputs = unit.payload.get("inputs", {})
        responses = _read_unit_rows(
            store, f"SELECT * EXCLUDE (run_id, stage, code_version, created_at) FROM "
            f"{_unit_rows(store, 'responses', inputs.get('responses'))} "
            "WHERE prompt_id IN (SELECT unnest(?)) QUALIFY row_number() OVER "
            "(PARTITION BY response_id ORDER BY finish_reason = 'error', created_at DESC) = 1", [ids],
            {"responses": inputs.get("responses")}
        )
        existing_judgments = _good_ids(store, "judgments", "judgment_id", "valid", ids, inputs.get("judgments"))
        existing_ratings = _good_ids(store, "ratings", "rating_id", "valid", ids, inputs.get("ratings"))
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
