"""The score stage as a Prefect flow: run alone (``prefcurate run score``, its deployment in
prefect.yaml) or as a subflow of ``build-dataset``; the same flow either way."""

from __future__ import annotations

from prefect import flow

from prefcurate.flows.common import RunParameters
from prefcurate.flows.stage import run_stage_flow
from prefcurate.tasks.score import ScoreParams


@flow(name="score", log_prints=True)
def score_flow(parameters: RunParameters = RunParameters(), stage_params: ScoreParams | None = None,
               cluster: str | None = None, parent_run: str | None = None) -> dict:
    """The score stage: QuRating and CritiQ quality scores.

    Args:
        parameters: the config file, dataset and dotted overrides.
        stage_params: the config's `score` section, field by field: the fields given here
            replace the file's (the rest keep the file's values).
        cluster: a Dask scheduler address to run the units on; default: the config's
            `executor` (a local cluster of its own).
        parent_run: the build run this stage belongs to (set by build-dataset).
    """
    return run_stage_flow("score", parameters, stage_params, cluster, parent_run)
