"""Parameters of the export stage (the writer itself is tasks/export.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ExportParams(BaseModel):
    """Parameters of the export stage."""

    model_config = ConfigDict(extra="forbid")
    out_dir: str | None = Field(None, description="where to write; default DATASET/export")
    formats: list[Literal["jsonl", "parquet"]] = Field(default_factory=lambda: ["jsonl", "parquet"])
    plots: bool = Field(True, description="score and cluster-coverage PNGs in the dataset card")
