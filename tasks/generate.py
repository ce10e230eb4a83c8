"""Generate: every generator samples ``n`` responses for every prompt.

Plain functions over polars frames and an :class:`~prefcurate.inference.base.Engine`; the
Prefect flow opens the engine for a generator's pool and writes the returned frame (the
store adds the provenance columns).

Method choices
- ``response_id = content_id("response", prompt_id, generator identity, sample_index)``.
  The generator identity is its name, model (its pool's model identity, set by the
  generate step: served name and folder fingerprint), sampling parameters, system prompt and
  chat-template flag, but *not* ``n``: raising ``n`` from 2 to 4 keeps samples 0-1 and
  generates only 2-3, and a re-run with the same config generates nothing.
- System prompt: a prompt's own ``system_prompt`` (ingested with it, part of its id) wins;
  the generator's ``system_prompt`` applies to prompts that have none.
- Seeds: without a seed, one request per prompt asks for all its missing samples at once
  (``n`` = the number missing), which lets the engine share the prompt's prefill. With a
  seed, each sample is its own request with a seed derived from (seed, prompt_id,
  sample_index), so a sample is reproducible whatever else happens to be missing.
- Responses cut at ``max_tokens`` (finish reason ``length``) are kept with
  ``truncated = True``; the filter stage decides about them. A failed request yields one
  row per missing sample with ``finish_reason = "error"`` and the error text, so nothing
  disappears silently; pass only the ids of successful rows as ``existing_ids`` to retry
  the failures on the next run.
- ``latency_s`` is the latency of the request that produced the sample (shared by the
  samples of one request), ``tokens_in`` its prompt length.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import polars as pl
from prefcurate.schemas.ids import Column, content_ids
from prefcurate.schemas.tables import PROVENANCE, RESPONSES
from pydantic import BaseModel, ConfigDict, Field, field_validator

from prefcurate.inference.base import Engine, GenerateRequest, SamplingParams

Progress = Callable[[int, int], None]
"""``progress(done, total)``, called after each engine batch (counts of samples)."""

_PROVENANCE_NAMES = {f.name for f in PROVENANCE}


def frame_schema(arrow_schema) -> pl.Schema:
    """The polars schema of a table's columns without the provenance the store adds."""
    empty = pl.from_arrow(arrow_schema.empty_table())
    return pl.Schema({k: v for k, v in empty.schema.items() if k not in _PROVENANCE_NAMES})


RESPONSE_COLUMNS = frame_schema(RESPONSES)


def pool_model_field(step: str) -> Any:
    """A generator's or judge's ``model``: the pool decides it (:func:`bind_to_pools`), and
    older configs that still name one are checked against the pool."""
    return Field(
        None, description="optional, for older configs: the pool decides the model; if given it must "
        f"name the pool's model. The {step} step sets it to the pool's model identity"
    )


def require_unique_names(names: Sequence[str], what: str) -> None:
    """Raise naming the repeated ones: names are stored with each row and key the engines."""
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{what} names must be unique; repeated: {', '.join(repeated)}")


class SamplingConfig(BaseModel):
    """Per-generator sampling parameters (passed to the engine for every sample)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.8, ge=0.0, description="0 = greedy")
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1, description="longer responses are cut and flagged")
    stop: list[str] = Field(default_factory=list, description="stop strings")
    seed: int | None = Field(None, description="set for reproducible samples")


class GeneratorSpec(BaseModel):
    """One generator of the ``generators`` pool: a model with its own sampling setup."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, description="unique name; stored with each response")
    pool: str = Field("generators", description="inference pool that serves this model")
    model: str | None = pool_model_field("generate")
    n: int = Field(2, ge=1, description="samples per prompt")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    system_prompt: str | None = Field(
        None, description="used for prompts that carry no system prompt of their own"
    )
    chat_template: bool = Field(
        True, description="apply the model's chat template when it has one (base models have none)"
    )

    def identity(self) -> dict:
        """What defines this generator's samples (everything but ``n`` and ``pool``)."""
        return {
            "name": self.name,
            "model": self.model,
            "sampling": self.sampling.model_dump(),
            "system_prompt": self.system_prompt,
            "chat_template": self.chat_template,
        }

    def sampling_json(self) -> str:
        return json.dumps(self.sampling.model_dump(), sort_keys=True, separators=(",", ":"))


class GenerateParams(BaseModel):
    """Parameters of the generate stage."""

    model_config = ConfigDict(extra="forbid")

    generators: list[GeneratorSpec] = Field(
        default_factory=lambda: [GeneratorSpec(name="gemma3-270m")],
        description="every generator samples n responses per prompt",
    )
    batch_size: int = Field(32, ge=1, description="engine requests per generate() call")

    @field_validator("generators")
    @classmethod
    def _unique_names(cls, generators: list[GeneratorSpec]) -> list[GeneratorSpec]:
        require_unique_names([g.name for g in generators], "generator")
        return generators


def check_pools(specs: Iterable[Any], known_pools: Iterable[str], what: str = "generator") -> None:
    """Raise naming the spec (a ``what``: generator or judge) and pool when its pool is not
    configured."""
    known = sorted(set(known_pools))
    for spec in specs:
        if spec.pool not in known:
            raise ValueError(
                f"{what} {spec.name!r} names pool {spec.pool!r}, which is not configured; "
                f"configured pools: {', '.join(known) or '(none)'}"
            )


def response_id(prompt_id: str, spec: GeneratorSpec, sample_index: int) -> str:
    return response_ids(pl.DataFrame({"prompt_id": [prompt_id], "sample_index": [int(sample_index)]}), spec).item()


def response_ids(rows: pl.DataFrame, spec: GeneratorSpec) -> pl.Series:
    """The response id of each (prompt_id, sample_index) row for this generator."""
    return content_ids(rows, "response", Column("prompt_id"), spec.identity(), Column("sample_index"))


def require_columns(frame: pl.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} frame lacks column(s) {', '.join(missing)}")


def plan_generation(
    prompts: pl.DataFrame,
    generators: Sequence[GeneratorSpec],
    existing_response_ids: Iterable[str] = (),
) -> pl.DataFrame:
    """The samples still to generate: one row per (prompt, generator, sample index) missing.

    Columns: ``response_id, prompt_id, generator, sample_index, prompt, system_prompt``
    (``system_prompt`` already resolved: the prompt's own, else the generator's).
    """
    require_columns(prompts, ["prompt_id", "prompt"], "prompts")
    base = prompts.select(
        "prompt_id",
        "prompt",
        (pl.col("system_prompt") if "system_prompt" in prompts.columns else pl.lit(None))
        .cast(pl.String)
        .alias("prompt_system"),
    ).unique("prompt_id", keep="first", maintain_order=True)
    existing = pl.DataFrame(
        {"response_id": list(existing_response_ids)}, schema={"response_id": pl.String}
    )
    planned = []
    for spec in generators:
        rows = base.join(
            pl.DataFrame({"sample_index": pl.int_range(spec.n, eager=True).cast(pl.Int32)}),
            how="cross",
        )
        planned.append(
            rows.with_columns(
                response_ids(rows, spec).alias("response_id"),
                pl.lit(spec.name).alias("generator"),
                pl.coalesce("prompt_system", pl.lit(spec.system_prompt, dtype=pl.String)).alias(
                    "system_prompt"
                ),
            )
        )
    columns = ["response_id", "prompt_id", "generator", "sample_index", "prompt", "system_prompt"]
    if not planned:
        return pl.DataFrame(
            schema={c: (pl.Int32 if c == "sample_index" else pl.String) for c in columns}
        )
    plan = pl.concat(planned).select(columns)
    return plan.join(existing, on="response_id", how="anti", maintain_order="left")


def _requests_for(plan: pl.DataFrame, spec: GeneratorSpec) -> list[tuple[GenerateRequest, list]]:
    """Engine requests for one generator's plan, each with the plan rows it fills."""
    sampling = spec.sampling
    if sampling.seed is not None:  # each sample's own seed, derived from the generator's
        seeds = content_ids(plan, "seed", sampling.seed, Column("prompt_id"), Column("sample_index"))
        plan = plan.with_columns(seeds.str.slice(0, 8).str.to_integer(base=16).alias("_seed"))
    grouped = plan.group_by("prompt_id", maintain_order=True).agg(
        pl.col("prompt").first(),
        pl.col("system_prompt").first(),
        pl.col("response_id"),
        pl.col("sample_index"),
        pl.col("_seed") if sampling.seed is not None else pl.lit(None).alias("_seed"),
    )
    out = []
    for _, prompt, system, ids, indices, seeds in grouped.iter_rows():
        slots = list(zip(ids, indices))
        if sampling.seed is None:
            params = SamplingParams(
                n=len(slots),
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                stop=tuple(sampling.stop),
            )
            out.append((GenerateRequest(prompt, system, params, spec.chat_template), slots))
            continue
        for slot, seed in zip(slots, seeds):
            params = SamplingParams(
                n=1,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                stop=tuple(sampling.stop),
                seed=seed,
            )
            out.append((GenerateRequest(prompt, system, params, spec.chat_template), [slot]))
    return out


def run_generation(
    prompts: pl.DataFrame,
    spec: GeneratorSpec,
    engine: Engine,
    existing_ids: Iterable[str] = (),
    *,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> pl.DataFrame:
    """Generate the missing samples of one generator; returns RESPONSES rows (no provenance).

    ``prompts`` needs ``prompt_id`` and ``prompt`` (``system_prompt`` optional);
    ``existing_ids`` are the response ids already stored, which are not generated again.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    plan = plan_generation(prompts, [spec], existing_ids)
    requests = _requests_for(plan, spec)
    total = plan.height
    prompt_of = dict(zip(plan["response_id"].to_list(), plan["prompt_id"].to_list()))
    constant = {"generator": spec.name, "model": engine.model, "sampling": spec.sampling_json()}
    columns: dict[str, list] = {name: [] for name in RESPONSE_COLUMNS if name not in constant}
    done = 0
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        results = engine.generate([request for request, _ in batch])
        if len(results) != len(batch):
            raise RuntimeError(
                f"engine {engine.model!r} answered {len(results)} of {len(batch)} requests"
            )
        for (_, slots), result in zip(batch, results):
            completions = [] if result.error else list(result.completions)
            for position, (rid, sample_index) in enumerate(slots):
                completion = completions[position] if position < len(completions) else None
                if completion is None:
                    error = result.error or (
                        f"engine returned {len(completions)} of {len(slots)} samples"
                    )
                columns["response_id"].append(rid)
                columns["prompt_id"].append(prompt_of[rid])
                columns["sample_index"].append(sample_index)
                columns["text"].append(None if completion is None else completion.text)
                columns["finish_reason"].append(
                    "error" if completion is None else completion.finish_reason
                )
                columns["truncated"].append(
                    completion is not None and completion.finish_reason == "length"
                )
                columns["error"].append(error if completion is None else None)
                columns["tokens_in"].append(result.tokens_in if completion is not None else None)
                columns["tokens_out"].append(
                    None if completion is None else completion.tokens_out
                )
                columns["latency_s"].append(result.latency_s)
            done += len(slots)
        if progress is not None:
            progress(done, total)
    responses = pl.DataFrame(columns, schema={k: v for k, v in RESPONSE_COLUMNS.items() if k not in constant})
    return responses.with_columns(pl.lit(v, dtype=RESPONSE_COLUMNS[k]).alias(k) for k, v in constant.items()
                                  ).select(list(RESPONSE_COLUMNS))


def run_generators(
    prompts: pl.DataFrame,
    params: GenerateParams,
    engines: Mapping[str, Engine],
    existing_ids: Iterable[str] = (),
    *,
    progress: Progress | None = None,
) -> pl.DataFrame:
    """Every generator of ``params`` over ``prompts``; ``engines`` maps generator name -> engine."""
    missing = [g.name for g in params.generators if g.name not in engines]
    if missing:
        raise ValueError(f"no engine given for generator(s) {', '.join(missing)}")
    existing = set(existing_ids)
    frames = [
        run_generation(
            prompts,
            spec,
            engines[spec.name],
            existing,
            batch_size=params.batch_size,
            progress=progress,
        )
        for spec in params.generators
    ]
    return pl.concat(frames) if frames else pl.DataFrame(schema=RESPONSE_COLUMNS)
