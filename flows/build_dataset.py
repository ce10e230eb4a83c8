"""The end-to-end build: every stage in order, over one dataset, on one Dask cluster.

Each stage runs its own flow (``flows/<stage>.py``, the one ``prefcurate run <stage>`` and the
stage's deployment run) as a subflow, so the UI shows build > stage > units, and a failed
build resumes from the stage (and the unit) where it stopped: finished units are registered
and skipped on the next run.
"""

from __future__ import annotations

import time

from prefcurate.flows.common import (
    RunParameters,
    dask_cluster,
    publish_report,
    resolve,
)
from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact

from prefcurate.report import build_report_markdown
from prefcurate.stages import STAGE_NAMES, load, stage_spec


@flow(name="build-dataset", log_prints=True)
def build_dataset(parameters: RunParameters = RunParameters(), stages: list[str] | None = None) -> dict:
    """Build (or resume) a curated preference dataset: ingest -> ... -> export."""
    logger = get_run_logger()
    config, store = resolve(parameters)
    wanted = stages or config.stages
    runnable = [s for s in wanted if s in STAGE_NAMES]
    missing = [s for s in wanted if s not in runnable]
    if missing:
        logger.warning("stages not available in this version, skipped: %s", missing)
    with store.writer_lock("prefcurate build", notify=logger.warning):  # one writer per dataset
        return _build_locked(parameters, config, store, runnable)


def _build_locked(parameters: RunParameters, config, store, runnable: list[str]) -> dict:
    logger = get_run_logger()
    swept = store.sweep_temporary_files()
    if swept:
        logger.info("removed %d temporary files left by a crashed write", swept)
    build_run = store.start_run("build", {"stages": runnable, "config_path": parameters.config_path,
                                          "overrides": parameters.overrides})
    started = time.perf_counter()
    summaries = []
    try:
        with dask_cluster(config) as address:
            for stage in runnable:
                stage_flow = load(stage_spec(stage).flow)
                summaries.append(stage_flow(parameters, cluster=address, parent_run=build_run))
        seconds = time.perf_counter() - started
        # per stage its counts and timings; its reports are in stage_reports, under its run_id
        counts = {s["stage"]: {k: v for k, v in s.items() if k not in ("stage", "run_id", "reports")}
                  for s in summaries}
        store.finish_run(build_run, "completed", counts, {"seconds": seconds})
        publish_report("prefcurate build", build_report_markdown(store, summaries), key="build-report")
        export_dir = store.root / "export"
        if export_dir.exists():
            create_link_artifact(link=export_dir.as_uri(), link_text="curated export (DPO JSONL, Parquet, card)",
                                 key="curated-export")
        return {"run_id": build_run, "dataset": str(store.root), "seconds": seconds, "stages": summaries}
    except BaseException as error:
        store.finish_run(build_run, "failed", {}, {"seconds": time.perf_counter() - started},
                         message=f"{type(error).__name__}: {error}")
        raise


if __name__ == "__main__":
    build_dataset()
