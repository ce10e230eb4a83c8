"""Parameters of the export stage (the writer itself is tasks/export.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: written beside data/train.{jsonl,parquet}, which are always TRL's standard format (strings)
TrainerFormat = Literal["trl_conversational", "llamafactory_ranking"]


class IntegrityParams(BaseModel):
    """Pair integrity against the target trainer's tokenizer and length budget.

    The trainer's truncation is modelled as TRL's DPOTrainer does it: the prompt keeps its
    last ``max_prompt_length`` tokens, then chosen and rejected keep their first
    ``max_length - prompt tokens``. A pair fails when its prompt alone fills ``max_length``
    (``prompt_fills_budget``), when chosen or rejected is empty after truncation
    (``empty_after_truncation``), or when both are the same tokens after truncation
    (``identical_after_truncation``): the trainer would learn nothing, or noise, from it.
    """

    model_config = ConfigDict(extra="forbid")
    action: Literal["drop", "flag", "off"] = Field(
        "drop", description="drop failing pairs (listed in data/dropped.jsonl and the card), "
        "flag them (an `integrity_issue` column, kept), or skip the check")
    tokenizer: str = Field("default", description="local tokenizer folder; 'default': the embedded model's")
    max_length: int = Field(1024, ge=2, description="prompt + completion tokens (TRL DPOConfig.max_length)")
    max_prompt_length: int | None = Field(512, ge=1, description="prompt tokens kept (TRL max_prompt_length)")

    @model_validator(mode="after")
    def _prompt_fits(self) -> IntegrityParams:
        if self.max_prompt_length is not None and self.max_prompt_length > self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) exceeds max_length ({self.max_length})")
        return self


class ExportParams(BaseModel):
    """Parameters of the export stage."""

    model_config = ConfigDict(extra="forbid")
    out_dir: str | None = Field(None, description="where to write; default DATASET/export")
    formats: list[Literal["jsonl", "parquet"]] = Field(default_factory=lambda: ["jsonl", "parquet"])
    trainer_formats: list[TrainerFormat] = Field(
        default_factory=lambda: ["trl_conversational", "llamafactory_ranking"],
        description="besides data/train.{jsonl,parquet} (TRL standard: strings): trl_conversational: "
        "data/train_conversational.jsonl (message lists, with the system prompt); "
        "llamafactory_ranking: llamafactory/ (ranking data + dataset_info.json)")
    integrity: IntegrityParams = Field(default_factory=IntegrityParams)
    length_ratio: float = Field(1.5, ge=1.0, description="the card's length-bias share counts pairs whose "
                                "chosen is at least this many times longer (characters) than rejected")
    plots: bool = Field(True, description="score and cluster-coverage PNGs in the dataset card")
