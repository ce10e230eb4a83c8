"""Running a stage's pending units in this process, without Prefect or Dask: the unit tests'
way to drive plan -> pending -> run_unit -> register as a build would."""

from __future__ import annotations

from prefcurate.stages import STAGE_NAMES
from prefcurate.steps import get_step
from prefcurate.steps.base import context_for


def run_pending_units(stage, ctx, store) -> int:
    """Run the stage's pending units; returns how many ran."""
    step = get_step(stage)
    todo, _ = step.pending(ctx, step.plan(ctx))
    for unit in todo:
        store.register(step.run_unit(unit, ctx).shards)
    return len(todo)


def run_every_stage(store, config, config_path: str | None = None) -> dict[str, int]:
    """Every stage in order, its pending units run and registered with their counts as the
    coordinator does (a unit that writes only files is recorded too), then the step's
    ``finalize``; {stage: units run}."""
    ran = {}
    for stage in STAGE_NAMES:
        ctx = context_for(store.root, config, f"run-{stage}", config_path)
        step = get_step(stage)
        todo, _ = step.pending(ctx, step.plan(ctx))
        results = []
        for unit in todo:
            results.append(step.run_unit(unit, ctx))
            store.register(results[-1].shards, unit=(stage, unit.key), counts=results[-1].counts)
        step.finalize(ctx, results)
        ran[stage] = len(todo)
    return ran
