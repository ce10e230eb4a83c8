"""The one flow every stage runs through: its task runner comes from the config."""

from __future__ import annotations

from prefect import flow

from prefcurate.flows.common import RunParameters, dask_cluster, resolve, run_stage, task_runner_for


@flow(name="stage-units", log_prints=True)
def _stage_units(stage: str, parameters: RunParameters, parent_run: str | None = None) -> dict:
    config, store = resolve(parameters)
    return run_stage(stage, config, store, parameters.config_path, parent_run)


def run_stage_flow(stage: str, parameters: RunParameters, address: str | None = None,
                   parent_run: str | None = None) -> dict:
    """Run ``stage`` as a subflow whose units go to Dask (or the configured executor).

    Without ``address`` (a stage run on its own) the stage gets a cluster of its own.
    """
    config, _ = resolve(parameters)
    with dask_cluster(config, address) as scheduler:
        runner = task_runner_for(config, scheduler)
        return _stage_units.with_options(task_runner=runner, flow_run_name=f"{stage}-units")(
            stage, parameters, parent_run
        )
