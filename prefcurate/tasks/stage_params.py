"""The parameter model of each config section, gathered from the stage modules."""

from __future__ import annotations

from pydantic import BaseModel

SECTION_MODELS: dict[str, type[BaseModel]] = {}
