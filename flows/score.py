"""The score stage as a Prefect flow (deployable alone; see prefect.yaml)."""

from __future__ import annotations

from prefect import flow

from prefcurate.flows.common import RunParameters
from prefcurate.flows.stage import run_stage_flow


@flow(name="score", log_prints=True)
def score_flow(parameters: RunParameters = RunParameters()) -> dict:
    """Run the score stage over the dataset named by the config (or `parameters.dataset`)."""
    return run_stage_flow("score", parameters)
