"""The parameter model of each config section, gathered from the stage modules."""

from __future__ import annotations

from pydantic import BaseModel

from prefcurate.tasks.annotate import AnnotateParams
from prefcurate.tasks.export_config import ExportParams
from prefcurate.tasks.filter import FilterParams
from prefcurate.tasks.generate import GenerateParams
from prefcurate.tasks.score import ScoreParams
from prefcurate.tasks.selection import SelectParams

SECTION_MODELS: dict[str, type[BaseModel]] = {
    "generate": GenerateParams,
    "annotate": AnnotateParams,
    "filter": FilterParams,
    "score": ScoreParams,
    "select": SelectParams,
    "export": ExportParams,
}
