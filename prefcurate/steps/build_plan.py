"""Is there anything to build? Every stage planned in order against the registry, before
Prefect or Dask start.

A stage with no pending units leaves its outputs as they are, so the next stage can be
planned on the store as it is now; the first stage with pending units ends the walk (what
comes after it depends on what it will write). Plans read the catalog and small per-stage
lookups only, never run a unit, and write nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prefcurate.config import PipelineConfig
from prefcurate.steps import get_step
from prefcurate.steps.base import context_for
from prefcurate.store import Store

#: the run id a plan-only context carries (no unit runs under it; plans do not use it)
PLAN_ONLY_RUN = "plan-only"


@dataclass
class BuildPlan:
    """Per stage planned: (stage, units, pending units); ``complete``: nothing pending anywhere."""

    stages: list[tuple[str, int, int]] = field(default_factory=list)
    seconds: float = 0.0
    complete: bool = False
    #: why planning stopped early without a verdict (a stage's plan raised): the build says it
    error: str | None = None
    #: what that plan raised (an InputError fails the same way in the build: said at once)
    exception: Exception | None = field(default=None, repr=False)

    def counts(self) -> dict:
        return {stage: {"units": units, "units_skipped": units - todo} for stage, units, todo in self.stages}


def plan_build(config: PipelineConfig, store: Store, stages: list[str], config_path: str | None = None) -> BuildPlan:
    """Plan ``stages`` in order; stop at the first with pending units (or whose plan fails)."""
    started = time.perf_counter()
    ctx = context_for(store.root, config, PLAN_ONLY_RUN, config_path)
    plan = BuildPlan()
    for stage in stages:
        step = get_step(stage)
        try:
            units = step.plan(ctx)
            todo, _ = step.pending(ctx, units)
        except Exception as error:  # the build itself reports it, with its usual context
            plan.error, plan.exception = f"{stage}: {type(error).__name__}: {error}", error
            break
        plan.stages.append((stage, len(units), len(todo)))
        if todo:
            break
    else:
        plan.complete = True
    plan.seconds = time.perf_counter() - started
    return plan
