"""Running a stage's pending units in this process, without Prefect or Dask: the unit tests'
way to drive plan -> pending -> run_unit -> register as a build would."""

from __future__ import annotations

from prefcurate.steps import get_step


def run_pending_units(stage, ctx, store) -> int:
    """Run the stage's pending units; returns how many ran."""
    step = get_step(stage)
    todo, _ = step.pending(ctx, step.plan(ctx))
    for unit in todo:
        store.register(step.run_unit(unit, ctx).shards)
    return len(todo)
