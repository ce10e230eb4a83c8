"""Prefect objects for placement tests on a real Dask cluster.

They live in an importable module because Dask workers unpickle the task, and the flow run
context that travels with it, by module name (a test module is not importable there).
"""

from __future__ import annotations

from prefect import flow, task


@task
def worker_name() -> str:
    from distributed import get_worker

    return get_worker().name


class _Context:
    """The one thing a Step's ``pools`` reads from a StageContext: the pipeline config."""

    def __init__(self, config):
        self._config = config

    def pipeline_config(self):
        return self._config


@flow
def placement_probe(config_path: str, stage: str, model_resources: dict, n: int = 6) -> tuple[list, list]:
    """Where units of ``stage`` run with ``executor.model_resources`` set, and where plain
    tasks run: worker names, ``n`` of each."""
    from prefcurate.flows.common import _placement

    from prefcurate.config import load_config
    from prefcurate.steps import get_step

    config = load_config(config_path, overrides={"executor.model_resources": model_resources})
    with _placement(get_step(stage), _Context(config), config):
        placed = [worker_name.submit() for _ in range(n)]
    anywhere = [worker_name.submit() for _ in range(n)]
    return [f.result() for f in placed], [f.result() for f in anywhere]
