"""Stage steps by name, from the stage registry (:mod:`prefcurate.stages`); imported lazily
so a stage's heavy imports load only when used."""

from __future__ import annotations

from prefcurate.stages import STAGE_NAMES, load, stage_spec
from prefcurate.steps.base import Step


def available_stages() -> list[str]:
    return list(STAGE_NAMES)


def get_step(name: str) -> Step:
    return load(stage_spec(name).step)()
