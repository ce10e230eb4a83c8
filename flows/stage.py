"""The body every stage flow shares: its units go to the executor the config names.

Each stage has its own flow (``flows/<stage>.py``, one Prefect flow named like the stage);
``prefcurate run <stage>``, its deployment and the build (as a subflow) all run that flow,
so the Prefect UI shows one shape everywhere: ``build-dataset`` > ``<stage>`` > the
stage's unit task runs, named ``<stage>-<unit key prefix>``.
"""

from __future__ import annotations

from pydantic import BaseModel

from prefcurate.flows.common import RunParameters, dask_cluster, resolve, run_stage, task_runner_for


def with_stage_params(parameters: RunParameters, stage: str, stage_params: BaseModel | None) -> RunParameters:
    """``parameters`` with the fields given in ``stage_params`` (the flow's form in the UI)
    applied over the config file's ``<stage>`` section, as dotted overrides."""
    if stage_params is None:
        return parameters
    given = stage_params.model_dump(mode="json", include=stage_params.model_fields_set)
    overrides = {**parameters.overrides, **{f"{stage}.{name}": value for name, value in given.items()}}
    return parameters.model_copy(update={"overrides": overrides})


def run_stage_flow(stage: str, parameters: RunParameters, stage_params: BaseModel | None = None,
                   cluster: str | None = None, parent_run: str | None = None) -> dict:
    """Run ``stage``'s units on Dask (or the configured executor) inside the calling flow.

    Without ``cluster`` (a stage run on its own) the stage gets a cluster of its own.
    """
    parameters = with_stage_params(parameters, stage, stage_params)
    config, store = resolve(parameters)
    with dask_cluster(config, cluster) as scheduler, task_runner_for(config, scheduler) as runner:
        return run_stage(stage, config, store, parameters.config_path, parent_run, runner=runner)
