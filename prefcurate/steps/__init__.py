"""Stage steps by name; imported lazily so a stage's heavy imports load only when used."""

from __future__ import annotations

import importlib

from prefcurate.steps.base import Step

_STEPS = {
    "ingest": "prefcurate.steps.ingest:IngestStep",
    "generate": "prefcurate.steps.model_stages:GenerateStep",
    "annotate": "prefcurate.steps.model_stages:AnnotateStep",
    "filter": "prefcurate.steps.filter:FilterStep",
    "score": "prefcurate.steps.score_select:ScoreStep",
    "select": "prefcurate.steps.score_select:SelectStep",
    "export": "prefcurate.steps.score_select:ExportStep",
}


def available_stages() -> list[str]:
    return list(_STEPS)


def get_step(name: str) -> Step:
    if name not in _STEPS:
        raise KeyError(f"unknown stage {name!r}; known: {list(_STEPS)}")
    module, cls = _STEPS[name].split(":")
    return getattr(importlib.import_module(module), cls)()
