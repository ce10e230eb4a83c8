"""The `prefcurate` command line."""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path

import typer

from prefcurate.stages import STAGE_NAMES, stages_help

# Prefect's temporary API server can take long to start on a loaded 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# engine and cluster internals are noise at the CLI; stage progress comes from Prefect's logs
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    help=(
        "Build and curate synthetic preference datasets (prompt, chosen, rejected).\n\n"
        "A dataset is a directory: a DuckDB catalog plus Parquet shards. Stages: "
        f"{' -> '.join(STAGE_NAMES)}. "
        "Start with `prefcurate build --config examples/quickstart.yaml`, then "
        "`prefcurate status` and `prefcurate sql \"SELECT * FROM curated_pairs LIMIT 5\"`."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="Local models: prepare the embedded default once (offline).", no_args_is_help=True)
app.add_typer(models_app, name="models")

CONFIG_OPTION = typer.Option(
    None, "--config", "-c", help="pipeline config YAML (default: built-in defaults)", exists=False
)
DATASET_OPTION = typer.Option(
    None, "--dataset", "-d", envvar="PREFCURATE_DATASET",
    help="dataset directory (default: the config's `dataset`, or $PREFCURATE_DATASET)",
)
NO_WAIT_OPTION = typer.Option(
    False, "--no-wait",
    help="fail at once if another command is writing this dataset (default: wait for it, "
         "up to $PREFCURATE_WRITER_TIMEOUT_S, 1 hour)",
)
SET_OPTION = typer.Option(
    None, "--set", "-s", metavar="KEY=VALUE", help="override a config value: --set ingest.limit=20 (YAML value syntax)"
)


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _overrides(pairs: list[str] | None) -> dict:
    import yaml

    result = {}
    for pair in pairs or []:
        if "=" not in pair:
            fail(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        result[key.strip()] = yaml.safe_load(value)
    return result


def _dataset_for(config_path: Path | None, dataset: Path | None, overrides: dict | None = None) -> Path:
    if dataset is not None:
        return dataset
    from prefcurate.config import ConfigError, load_config

    try:
        return Path(load_config(config_path, overrides).dataset)
    except ConfigError as error:
        fail(str(error))
    raise AssertionError


def _open_store(dataset: Path, create: bool = False, upgrade: bool = True):
    """The dataset, or `error:` naming what is wrong with it (missing, corrupt, foreign catalog)."""
    from prefcurate.store import Store, StoreError

    try:
        return Store.open_or_init(dataset) if create else Store.open(dataset, upgrade=upgrade)
    except StoreError as error:
        fail(str(error))


def _run_flow(stage: str | None, config: Path | None, dataset: Path | None, overrides: dict,
              no_wait: bool = False, command: str | None = None) -> dict:
    """``command``: what the user typed, for the writer lock and the messages (default
    ``prefcurate build`` or ``prefcurate run STAGE``)."""
    from prefcurate.config import ConfigError, load_config

    try:
        pipeline = load_config(config, overrides)  # fail fast, with line numbers, before Prefect starts
    except ConfigError as error:
        fail(str(error))
    from prefcurate.store import StoreError

    # a broken catalog or a busy dataset is said before Prefect starts
    root = Path(dataset or pipeline.dataset)
    command = command or f"prefcurate {'build' if stage is None else 'run ' + stage}"
    existed = root.exists()  # (a dataset this command creates is not refused for being empty)
    if stage is not None and not existed:
        _require_dataset(stage, root, command)
    store = _open_store(root, create=True)
    lock = store.writer_lock(command, wait=not no_wait, notify=lambda text: typer.echo(text, err=True))
    try:
        lock.__enter__()
    except StoreError as error:
        fail(str(error))
    try:
        from prefcurate.procwatch import start_watchdog

        # ends an earlier killed build's leftovers; this build's children end with it
        start_watchdog(store.root)
        if stage is not None and existed:
            _require_inputs(stage, store, command)
        finished = _finished_build(pipeline, store, config, stage)
        if finished is not None:  # nothing pending: neither Prefect nor Dask is started
            return finished
        from prefcurate.flows.common import RunParameters, start_prefect_api

        api = start_prefect_api()
        parameters = RunParameters(
            config_path=str(config) if config else None, dataset=str(dataset) if dataset else None,
            overrides=overrides,
        )
        # imported while a temporary server starts
        if stage is None:
            from prefcurate.flows.build_dataset import build_dataset as run
        else:
            from prefcurate.stages import load, stage_spec

            run = load(stage_spec(stage).flow)  # the stage's own flow, as its deployment runs it
        api.ready(pipeline)
        return run(parameters)
    except (StoreError, ConfigError) as error:
        fail(str(error))
    except Exception as error:  # surface the stage's own clear error without a traceback wall
        from prefcurate.errors import InputError

        if isinstance(error, (InputError, FileNotFoundError)):
            fail(str(error))
        raise
    finally:
        lock.__exit__(None, None, None)
    raise AssertionError


@app.command()
def init(
    dataset: Path = typer.Argument(..., help="new (or empty) directory for the dataset"),
    shards_uri: str | None = typer.Option(
        None, help="keep the shards on an S3-compatible store (s3://BUCKET/PREFIX); the catalog stays in "
        "DATASET; credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"),
    endpoint_url: str | None = typer.Option(None, help="the S3-compatible endpoint (MinIO, Ceph, ...) "
                                               "for --shards-uri; default AWS"),
) -> None:
    """Create a new, empty dataset directory (catalog, views, shard folders)."""
    from prefcurate.object_store import ObjectStoreError
    from prefcurate.store import NotADatasetError, Store

    try:
        store = Store.init(dataset, shards_uri=shards_uri, endpoint_url=endpoint_url)
    except (NotADatasetError, ObjectStoreError) as error:
        fail(str(error))
    typer.echo(f"dataset ready at {store.root}" + (f" (shards at {store.objects.uri})" if store.objects else ""))


@app.command()
def ingest(
    paths: list[str] | None = typer.Argument(
        None, metavar="PATH", show_default=False,
        help="JSONL, JSON (one array of objects), Parquet or CSV files (.gz too), folders of them (any "
             "depth) or glob patterns ('dumps/*.parquet'); default: 'bundled', the demo prompts"),
    dataset: Path | None = DATASET_OPTION,
    config: Path | None = CONFIG_OPTION,
    prompt_field: str | None = typer.Option(None, help="field holding the prompt (default 'prompt')"),
    system_field: str | None = typer.Option(None, help="field holding an optional system prompt"),
    id_field: str | None = typer.Option(None, help="field holding the record's own id"),
    max_chars: int | None = typer.Option(None, help="longer prompts are quarantined"),
    limit: int | None = typer.Option(None, help="accept at most this many prompts (of one file)"),
    set_: list[str] | None = SET_OPTION,
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Read prompts: validate, normalise (NFC, whitespace), de-duplicate, shard.

    Bad rows go to the `quarantine` table with a reason; the accounting (read = accepted +
    quarantined + duplicates) is printed and kept per file. Each file is ingested once: run
    again over a folder, only the files added or changed since are read.
    """
    overrides = _overrides(set_)
    given = [path if path == "bundled" else str(Path(path).resolve()) for path in paths or ["bundled"]]
    overrides["ingest.path"] = given[0] if len(given) == 1 else given
    for key, value in (("prompt", prompt_field), ("system_prompt", system_field), ("id", id_field)):
        if value is not None:
            overrides[f"ingest.fields.{key}"] = value
    if max_chars is not None:
        overrides["ingest.max_chars"] = max_chars
    if limit is not None:
        overrides["ingest.limit"] = limit
    dataset = _dataset_for(config, dataset, overrides)
    summary = _run_flow("ingest", config, dataset, overrides, no_wait)
    files, skipped = summary.get("units", 1), summary.get("units_skipped", 0)
    if skipped == files:
        typer.echo(f"{'this file was' if files == 1 else f'these {files} files were'} already ingested "
                   "with these settings: nothing added")
        return
    typer.echo(
        "read {rows_read:.0f} = accepted {accepted:.0f} + quarantined {quarantined:.0f} + duplicates {duplicates:.0f}".format(
            **{k: summary.get(k, 0) for k in ("rows_read", "accepted", "quarantined", "duplicates")}
        ) + (f" ({_files(files - skipped)}; {skipped} already ingested)" if skipped else
             f" ({_files(files)})" if files > 1 else "")
    )
    if summary.get("quarantined", 0):
        typer.echo(f"see them: prefcurate sql -d {dataset} \"SELECT source_record, field, reason, message "
                   "FROM quarantine WHERE stage = 'ingest' ORDER BY source_record\"")


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def _finished_build(pipeline, store, config: Path | None, stage: str | None = None) -> dict | None:
    """The result of a build (or of ``stage`` alone) with nothing pending, recorded as a
    completed run that ran no unit; None when there is work (or a plan fails: the run then
    says why). A plan refused for bad input (a missing input file, ...) is said now, before
    Prefect starts: the build would fail on it the same way."""
    from prefcurate.errors import InputError
    from prefcurate.stages import STAGE_NAMES
    from prefcurate.steps.build_plan import plan_build

    stages = [stage] if stage else [s for s in pipeline.stages if s in STAGE_NAMES]
    plan = plan_build(pipeline, store, stages, str(config) if config else None)
    if isinstance(plan.exception, (InputError, FileNotFoundError)):
        fail(str(plan.exception))
    if not plan.complete:
        return None
    message = f"nothing to do: {'every stage is' if stage is None else stage + ' is'} up to date"
    counts = plan.counts()
    run_id = store.start_run(stage or "build", {"stages": stages, "config_path": str(config) if config else None,
                                                "nothing_to_do": True})
    store.finish_run(run_id, "completed", counts[stage] if stage else counts,
                     {"seconds": plan.seconds, "plan_seconds": plan.seconds}, message=message)
    if stage:
        return {"stage": stage, "run_id": run_id, "nothing_to_do": True, **counts[stage], "seconds": plan.seconds}
    return {"run_id": run_id, "dataset": str(store.root), "seconds": plan.seconds, "stages": [],
            "nothing_to_do": True}


@app.command()
def build(
    config: Path | None = CONFIG_OPTION,
    dataset: Path | None = DATASET_OPTION,
    set_: list[str] | None = SET_OPTION,
    stages: str | None = typer.Option(None, help="comma-separated subset of stages to run"),
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Run the whole pipeline (resumes where a previous build stopped)."""
    overrides = _overrides(set_)
    if stages:
        overrides["stages"] = [s.strip() for s in stages.split(",")]
    result = _run_flow(None, config, dataset, overrides, no_wait)
    if result.get("nothing_to_do"):
        typer.echo(f"nothing to do: every stage is up to date (planned in {result['seconds']:.1f} s): "
                   f"{result['dataset']}")
        return
    typer.echo(f"build {result['run_id']} completed in {result['seconds']:.0f} s: {result['dataset']}")
    for summary in result["stages"]:
        typer.echo(f"  {summary['stage']:<9} {summary['seconds']:7.1f} s")
    typer.echo(f"next: prefcurate status -d {result['dataset']}")


@app.command()
def estimate(
    config: Path | None = CONFIG_OPTION,
    set_: list[str] | None = SET_OPTION,
) -> None:
    """Print the requests, tokens and cost (priced pools) a build would make, before it starts.

    Reads the prompts as ingest would (nothing is written, no model is asked).
    """
    from prefcurate.config import ConfigError, load_config
    from prefcurate.errors import InputError
    from prefcurate.tasks.estimate import estimate_build, format_estimate

    try:
        pipeline = load_config(config, _overrides(set_))
        typer.echo(format_estimate(estimate_build(pipeline), pipeline))
    except (ConfigError, InputError, FileNotFoundError) as error:
        fail(str(error))


@app.command()
def run(
    stage: str = typer.Argument(..., help=stages_help()),
    config: Path | None = CONFIG_OPTION,
    dataset: Path | None = DATASET_OPTION,
    set_: list[str] | None = SET_OPTION,
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Run one stage alone over the dataset (its inputs must exist)."""
    from prefcurate.steps import available_stages

    if stage not in available_stages():
        fail(f"unknown stage {stage!r}; available: {', '.join(available_stages())}")
    overrides = _overrides(set_)
    summary = _run_flow(stage, config, dataset, overrides, no_wait)
    typer.echo(json.dumps(summary, indent=2, default=str))


def _require_dataset(stage: str, root: Path, command: str) -> None:
    """`error:` when a stage that reads tables is run on a dataset that does not exist (a
    mistyped -d or config ``dataset``): it would create an empty one and report nothing done."""
    from prefcurate.stages import stage_spec

    reads = stage_spec(stage).reads
    if reads:
        fail(f"`{command}` reads {' and '.join(reads)}, and there is no dataset at {root.resolve()}: "
             "check -d or the config's `dataset` (`prefcurate build` creates one and runs every stage)")


def _require_inputs(stage: str, store, command: str) -> None:
    """`error:` when a table the stage reads is empty (before Prefect starts): run alone, it
    would only write empty outputs."""
    from prefcurate.stages import STAGE_NAMES, stage_spec

    empty = [table for table in stage_spec(stage).reads if store.count(table) == 0]
    if empty:
        before = " -> ".join(STAGE_NAMES[: STAGE_NAMES.index(stage)])
        fail(f"`{command}` reads {' and '.join(empty)}, and the dataset {store.root} has no rows there: "
             f"run the stages before it first ({before}; `prefcurate build` runs them all), or see "
             "`prefcurate status` for why they wrote none")


@app.command()
def status(dataset: Path | None = DATASET_OPTION, config: Path | None = CONFIG_OPTION) -> None:
    """Runs, row counts per table, quarantine reasons, ingest accounting, judges, filters."""
    from prefcurate.report import status_text
    from prefcurate.store import StoreError

    store = _open_store(_dataset_for(config, dataset))
    try:
        typer.echo(status_text(store))
    except StoreError as error:
        fail(str(error))


@app.command()
def sql(
    query: str = typer.Argument(
        ..., help="one read-only query, e.g. \"SELECT * FROM curated_pairs LIMIT 5\""
    ),
    dataset: Path | None = DATASET_OPTION,
    config: Path | None = CONFIG_OPTION,
    format: str = typer.Option("table", "--format", "-f", help="table | csv | json | parquet"),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="write to this file, outside the dataset (needed for parquet)"
    ),
    max_rows: int = typer.Option(50, help="rows shown in table format"),
    memory_limit: str | None = typer.Option(
        None, "--memory-limit", help="DuckDB memory limit for the query, e.g. 2GB (default: a quarter of RAM)"
    ),
    timeout: float = typer.Option(
        60.0, "--timeout", help="stop the query after this many seconds (0: no limit)"
    ),
) -> None:
    """Query the dataset with DuckDB SQL, read-only.

    Tables/views: prompts, responses, judgments, ratings, jury, judge_calibration, pairs,
    filter_drops, quality, embeddings, selections, request_metrics, quarantine, runs, and
    the report views curated_pairs, current_pairs, current_judgments, judge_position_bias,
    filter_report, quarantine_summary. Only one SELECT (DESCRIBE, SHOW, SUMMARIZE, FROM ...)
    or EXPLAIN [ANALYZE] of one is accepted; anything that writes, including writes inside
    WITH clauses, is refused, and the query runs in memory with no access to any file.
    """
    import duckdb

    from prefcurate.sql import (
        ReadOnlyViolation,
        SqlError,
        check_output_path,
        render,
        run_read_only,
        terminal_safe,
        write_result,
    )

    def refuse(message: str) -> None:
        fail(terminal_safe(message))

    if format not in ("table", "csv", "json", "parquet"):
        fail("--format must be table, csv, json or parquet")
    if format == "parquet" and output is None:
        fail("--format parquet needs --output FILE")
    if format == "table" and output is not None:
        fail("--output needs --format csv, json or parquet")
    if timeout < 0:
        fail("--timeout must be 0 (no limit) or more seconds")
    store = _open_store(_dataset_for(config, dataset), upgrade=False)  # reading never writes
    try:
        target = check_output_path(store, output) if output is not None else None
        frame = run_read_only(store, query, memory_limit=memory_limit, timeout_s=timeout or None)
        if target is not None:
            write_result(frame, format, target)
            typer.echo(f"wrote {frame.height} rows to {terminal_safe(str(target))}")
            return
        if format == "table":
            import polars as pl

            with pl.Config(tbl_rows=max_rows, tbl_cols=20, fmt_str_lengths=60, tbl_width_chars=200):
                typer.echo(terminal_safe(str(frame)))
            return
        text = render(frame, format)
    except (ReadOnlyViolation, SqlError) as error:
        refuse(str(error))
    except duckdb.CatalogException as error:  # a misspelt table: say which ones there are
        from prefcurate.schemas.tables import TABLES
        from prefcurate.schemas.views import REPORT_VIEWS

        names = ", ".join([*TABLES, "runs", *REPORT_VIEWS])
        # (DuckDB's guess among its own system catalogs, "pg_enum" and the like, misleads here)
        said = "\n".join(line for line in str(error).strip().splitlines()
                         if not line.startswith('Did you mean "pg_'))
        refuse(f"query failed: {said}\nthe dataset's tables and views: {names}")
    except duckdb.Error as error:
        refuse(f"query failed: {str(error).strip()}")
    # piped output stays byte-exact; on a terminal, data cannot send control sequences
    sys.stdout.write(terminal_safe(text) if sys.stdout.isatty() else text)


@app.command()
def export(
    dataset: Path | None = DATASET_OPTION,
    config: Path | None = CONFIG_OPTION,
    set_: list[str] | None = SET_OPTION,
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Write the curated pairs as DPO JSONL + Parquet with a dataset card."""
    overrides = _overrides(set_)
    summary = _run_flow("export", config, dataset, overrides, no_wait, command="prefcurate export")
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command()
def repair(dataset: Path | None = DATASET_OPTION, config: Path | None = CONFIG_OPTION) -> None:
    """Re-create a lost, corrupt or foreign catalog from the dataset's shard files.

    Every shard of a complete unit (its manifest under _units/) is registered once, with the
    unit's counts; temporary files and shards of units killed mid-way are left out (the next
    run redoes those). The old catalog is moved to catalog.duckdb.broken-<time>; nothing is
    deleted. Run parameters and timings lived only in the catalog and are not recovered.
    """
    from prefcurate.store import Store, StoreError

    try:
        done = Store.repair(_dataset_for(config, dataset))
    except StoreError as error:
        fail(str(error))
    for name in done["moved_aside"]:
        typer.echo(f"moved the old catalog aside: {name}")
    typer.echo(f"registered {done['shards_registered']} shards of {done['units']} units; "
               f"{done['runs_recovered']} runs re-created as 'recovered' (their parameters and timings are lost)")
    if done["units_without_counts"]:
        typer.echo(f"{done['units_without_counts']} units were written by an older version without counts "
                   "in their manifests: their ingest accounting cannot be recovered")
    if done["unlisted_shards"]:
        typer.echo(f"{len(done['unlisted_shards'])} shard files belong to no complete unit (a unit killed "
                   "mid-way) and were left unregistered; the next run redoes those units")


import_app = typer.Typer(help="Bring data made elsewhere into a dataset.", no_args_is_help=True)
app.add_typer(import_app, name="import")


def _pairs_option(values: list[str] | None, flag: str, separator: str = "=") -> dict:
    result = {}
    for item in values or []:
        if separator not in item:
            fail(f"{flag} expects NAME{separator}VALUE, got {item!r}")
        key, value = item.split(separator, 1)
        result[key.strip()] = value
    return result


def _scale_option(value: str | None, flag: str):
    if value is None:
        return None
    try:
        low, high = (float(part) for part in value.split(","))
    except ValueError:
        fail(f"{flag} expects LO,HI (e.g. 1,10), got {value!r}")
    return [low, high]


@import_app.command("judgments")
def import_judgments(
    path: Path = typer.Argument(..., help="JSONL, JSON (array), Parquet or CSV file of judgments"),
    dataset: Path | None = DATASET_OPTION,
    config: Path | None = CONFIG_OPTION,
    mapping: Path | None = typer.Option(None, "--mapping", "-m", help="YAML field mapping (see examples/import_pandalm.yaml)"),
    map_: list[str] | None = typer.Option(None, "--map", metavar="FIELD=SOURCE", help="native=source field or template: --map prompt=instruction"),
    const: list[str] | None = typer.Option(None, "--const", metavar="FIELD=VALUE", help="native=fixed value: --const judge=gpt-4o"),
    value: list[str] | None = typer.Option(None, "--value", metavar="FIELD:FROM=TO", help="recode a value: --value verdict_12:1=A"),
    join: list[str] | None = typer.Option(None, "--join", metavar="FILE:KEY", help="a file joined on KEY (relative to PATH's folder)"),
    score_scale: str | None = typer.Option(None, help="scale of score_* fields: LO,HI"),
    rating_scale: str | None = typer.Option(None, help="scale of rating_* fields: LO,HI"),
    format: str | None = typer.Option(None, "--format", help="auto | jsonl | json | parquet | csv"),
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Import judgments made elsewhere: prompts, response pairs, verdicts (and ratings).

    Each record is one judge's verdict on one pair, per presentation order (side A/B/tie,
    a probability or a pair of scores); the schema is in the README and in
    prefcurate/tasks/import_judgments.py. Bad rows go to `quarantine`; importing the same
    file again adds nothing. Then: prefcurate run filter | select | export.
    """
    from prefcurate.store import StoreError
    from prefcurate.tasks.import_judgments import JudgmentImportError, load_mapping

    values: dict = {}
    for item in value or []:
        key, _, recode = item.partition(":")
        values.setdefault(key, {}).update(_pairs_option([recode], "--value"))
    joins = []
    for item in join or []:
        file, _, key = item.rpartition(":")
        if not file or not key:
            fail(f"--join expects FILE:KEY, got {item!r}")
        joins.append({"file": file, "key": key})
    fields = {k: v.replace("\\n", "\n") for k, v in _pairs_option(map_, "--map").items()}  # templates: "\n"
    overrides = {"fields": fields, "constants": _pairs_option(const, "--const"),
                 "values": values, "join": joins or None, "format": format,
                 "score_scale": _scale_option(score_scale, "--score-scale"),
                 "rating_scale": _scale_option(rating_scale, "--rating-scale")}
    target = _dataset_for(config, dataset)
    try:
        parsed = load_mapping(mapping, overrides)
        from prefcurate.steps.import_judgments import run_import

        done = run_import(target, path, parsed, notify=lambda text: typer.echo(text, err=True))
    except (JudgmentImportError, StoreError) as error:
        fail(str(error))
    if done.get("already_imported"):
        typer.echo(f"{path} was already imported with this mapping: nothing added")
        return
    typer.echo("read {records} records: {judgment_rows} judgment rows = {judgments} imported + {quarantined} "
               "quarantined + {duplicates} duplicates ({single_order} single-order)".format(**done))
    typer.echo("new: {prompts} prompts, {responses} responses, {ratings} ratings".format(**done))
    if done["quarantined"]:
        typer.echo(f"see them: prefcurate sql -d {done['dataset']} \"SELECT source_record, field, reason, message "
                   "FROM quarantine WHERE stage = 'import'\"")
    typer.echo(f"next: prefcurate run filter -d {done['dataset']}, then select and export")


review_app = typer.Typer(
    help="Human review: export the most uncertain pairs for people to label, import their labels.",
    no_args_is_help=True,
)
app.add_typer(review_app, name="review")


@review_app.command("export")
def review_export(
    top: float = typer.Option(0.2, help="share of the unlabelled judged pairs to export, most uncertain first"),
    output: Path | None = typer.Option(
        None, "--output", "-o", help=".jsonl or .csv (default DATASET/review/to_label.jsonl)"
    ),
    dataset: Path | None = DATASET_OPTION,
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Write the most uncertain pairs (BPDE, then the jury's entropy) for people to label."""
    from prefcurate.tasks.review import export_for_review

    store = _open_store(_dataset_for(config, dataset))
    try:
        path, n = export_for_review(store, top, output)
    except ValueError as error:
        fail(str(error))
    typer.echo(f"wrote {n} pairs to {path}; fill in winner (A, B or tie) and optionally annotator, then: "
               f"prefcurate review import {path} -d {store.root}")


@review_app.command("import")
def review_import(
    path: Path = typer.Argument(..., help="a labelled review file: .jsonl, .json, .csv (its separator found), .tsv or .parquet, .gz too"),
    dataset: Path | None = DATASET_OPTION,
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Store people's labels (human_labels); they override the jury on the next filter run."""
    from prefcurate.store import StoreError
    from prefcurate.tasks.review import import_review_labels

    store = _open_store(_dataset_for(config, dataset))
    try:
        with store.writer_lock("review import", notify=lambda text: typer.echo(text, err=True)):
            done = import_review_labels(store, path)
    except (ValueError, FileNotFoundError, StoreError) as error:
        fail(str(error))
    typer.echo(f"stored {done['labels']} labels ({done['unlabelled']} rows left blank, "
               f"{done['quarantined']} quarantined)")
    if done["quarantined"]:
        typer.echo(f"see them: prefcurate sql -d {store.root} \"SELECT source_record, field, reason, message "
                   "FROM quarantine WHERE stage = 'review'\"")
    typer.echo(f"next: prefcurate run filter -d {store.root} (the labels override the jury and calibrate it)")


@models_app.command("prepare")
def models_prepare(force: bool = typer.Option(False, help="convert again even if prepared")) -> None:
    """Convert the packaged Gemma 3 270M GGUF into a float32 HF folder, once (offline)."""
    from prefcurate.inference.models import embedding_model_path, prepare_default_model

    prepared = prepare_default_model(force=force, log=typer.echo)
    typer.echo(f"default model: {prepared.path} ({prepared.parameters / 1e6:.0f}M parameters)")
    typer.echo(f"embedding model: {embedding_model_path()}")


@models_app.command("path")
def models_path() -> None:
    """Print where the embedded default model lives (or would be prepared)."""
    from prefcurate.inference.models import default_model_dir, is_prepared

    folder = default_model_dir()
    typer.echo(f"{folder} ({'prepared' if is_prepared(folder) else 'not prepared: run `prefcurate models prepare`'})")


def _reflowed(doc: str) -> str:
    """A docstring with each paragraph on one line. Typer keeps a docstring's line breaks, so
    text wrapped for the source came out ragged in a terminal of another width."""
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in inspect.cleandoc(doc).split("\n\n"))


for _typer_app in (app, models_app, import_app, review_app):
    for _command in _typer_app.registered_commands:
        if _command.help is None and _command.callback is not None and _command.callback.__doc__:
            _command.help = _reflowed(_command.callback.__doc__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
