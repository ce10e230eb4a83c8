"""The stage registry: the one list of stages, in build order.

The config's default ``stages`` and its section models, ``STAGE_ORDER``, the CLI's help,
the step table (:func:`prefcurate.steps.get_step`), the Prefect flows and the tests all read
this tuple. Adding a stage = one entry here, its ``Step`` (``prefcurate/steps/``), its params
model (``tasks/``), its section field on ``PipelineConfig`` (checked against this entry at
import), its flow file ``flows/<name>.py`` (one line: ``<name>_flow = stage_flow("<name>")``)
and a ``<name>-adhoc`` deployment in ``prefect.yaml``.

Entries name their classes by ``module:attribute`` so importing the registry stays cheap (the
CLI reads it for its help text before any stage module loads).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StageSpec:
    name: str
    #: ``module:Class`` of the stage's :class:`~prefcurate.steps.base.Step`
    step: str
    #: ``module:Class`` of the pydantic model of its config section (``PipelineConfig.<name>``)
    params: str
    #: one line for the CLI, the flow's description and the docs
    summary: str
    #: the tables it reads that must hold rows for it to do anything (``prefcurate run``
    #: refuses to run it over empty ones, naming them, instead of writing empty outputs)
    reads: tuple[str, ...] = ()

    @property
    def flow(self) -> str:
        """``module:function`` of its Prefect flow (``flows/<name>.py``), run alone or in a build."""
        return f"prefcurate.flows.{self.name}:{self.name}_flow"


STAGES: tuple[StageSpec, ...] = (
    StageSpec("ingest", "prefcurate.steps.ingest:IngestStep",
              "prefcurate.tasks.ingest:IngestParams", "read prompts: validate, normalise, de-duplicate, shard"),
    StageSpec("generate", "prefcurate.steps.model_stages:GenerateStep",
              "prefcurate.tasks.generate:GenerateParams", "sample candidate responses per prompt", ("prompts",)),
    StageSpec("annotate", "prefcurate.steps.model_stages:AnnotateStep",
              "prefcurate.tasks.annotate:AnnotateParams", "judge response pairs (both orders) into verdicts",
              ("responses",)),
    StageSpec("filter", "prefcurate.steps.filter:FilterStep",
              "prefcurate.tasks.filter:FilterParams", "drop pairs by the enabled checks, each with a reason",
              ("judgments",)),
    StageSpec("score", "prefcurate.steps.score_select:ScoreStep",
              "prefcurate.tasks.score:ScoreParams", "score quality (QuRating, CritiQ)", ("responses",)),
    StageSpec("select", "prefcurate.steps.score_select:SelectStep",
              "prefcurate.tasks.selection:SelectParams", "choose a diverse, high-quality subset within a budget",
              ("pairs",)),  # (without quality scores every pair counts as 0)
    StageSpec("export", "prefcurate.steps.score_select:ExportStep",
              "prefcurate.tasks.export_config:ExportParams", "write DPO JSONL, Parquet and a dataset card",
              ("selections",)),
)

STAGE_NAMES: tuple[str, ...] = tuple(spec.name for spec in STAGES)
_BY_NAME = {spec.name: spec for spec in STAGES}


def stage_spec(name: str) -> StageSpec:
    if name not in _BY_NAME:
        raise KeyError(f"unknown stage {name!r}; known: {list(STAGE_NAMES)}")
    return _BY_NAME[name]


def load(reference: str) -> Any:
    """The object a ``module:attribute`` reference names."""
    module, attribute = reference.split(":")
    return getattr(importlib.import_module(module), attribute)


def stages_help() -> str:
    """``ingest | generate | ...``: the CLI's help for a stage argument."""
    return " | ".join(STAGE_NAMES)
