"""Every stage's Prefect flow, made from the stage registry; and the body they share.

Each stage has its own flow (``flows/<stage>.py`` holds ``<stage>_flow = stage_flow(...)``,
the entrypoint its deployment names), a Prefect flow named like the stage.
``prefcurate run <stage>``, its deployment and the build (as a subflow) all run that flow,
so the Prefect UI shows one shape everywhere: ``build-dataset`` > ``<stage>`` > the stage's
unit task runs, named ``<stage>-<unit key prefix>``. The flow's form in the UI is typed with
the stage's params model (``stage_params``), so it shows every parameter of the stage.
"""


from prefcurate.flows.common import RunParameters, dask_cluster, resolve, run_stage, task_runner_for
from prefect import Flow, flow
from pydantic import BaseModel

from prefcurate.stages import load, stage_spec


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


_DOC = """The {stage} stage: {summary}.

Args:
    parameters: the config file, dataset and dotted overrides.
    stage_params: the config's `{stage}` section, field by field: the fields given here
        replace the file's (the rest keep the file's values).
    cluster: a Dask scheduler address to run the units on; default: the config's
        `executor` (a local cluster of its own).
    parent_run: the build run this stage belongs to (set by build-dataset).
"""


def stage_flow(stage: str) -> Flow:
    """The Prefect flow of ``stage``, named like it; its ``stage_params`` typed with the
    params model the registry names (annotations are evaluated here, not postponed, so the
    form's schema sees the real model)."""
    spec = stage_spec(stage)
    params_model = load(spec.params)

    def run(parameters: RunParameters = RunParameters(), stage_params: params_model | None = None,
            cluster: str | None = None, parent_run: str | None = None) -> dict:
        return run_stage_flow(stage, parameters, stage_params, cluster, parent_run)

    run.__name__ = run.__qualname__ = spec.flow.split(":")[1]
    run.__doc__ = _DOC.format(stage=stage, summary=spec.summary)
    return flow(name=stage, description=f"The {stage} stage: {spec.summary}.", log_prints=True)(run)
