"""Judge modes with no position to be biased by: ``reward_model`` and ``density_ratio``.

Both score each response on its own, so a pair costs no both-orders second request and a
response shared by several pairs is scored once (per unit). A pair's verdict is

    p_a = sigmoid((s_a - s_b) / t)

where ``s`` is the response's score and ``t`` a temperature fitted on labelled pairs
(:func:`fit_temperature`), or given (``mode_options: {temperature: ...}``). Their
judgments carry ``p_first_ab``/``p_first_ba``/``bpde`` null (no orders were asked), and
they join the same jury and filters as the both-orders modes.

- ``reward_model`` (:class:`RewardModelMode`): ``s`` is the raw score of a
  sequence-classification / reward model (``num_labels=1``) served on vLLM's pooling runner
  (:meth:`~prefcurate.inference.scoring.RewardEngine.score_rewards`: in-process
  ``LLM.classify``, or ``/classify`` of ``vllm serve --runner pooling``). The model scores
  the response to the prompt; the criterion does not enter (a reward model has one
  opinion), so every criterion of a pair gets the same verdict.
- ``density_ratio`` (:class:`DensityRatioMode`, CDR: "Customizable Density Ratios of
  Strong-over-weak LLMs for Preference Annotation", Xu et al. 2024): ``s = log p_strong(y |
  x) - log p_weak(y | x)``, the response's log-likelihood under a stronger configuration
  over a weaker one. Here both are the judge's one generative pool: the strong
  configuration is the ``expert_template`` (a preamble that states the criterion, and
  exemplar answers, the paper's customisation by prompt), the weak one the
  ``plain_template`` (the bare question/answer frame the generators use). Each response is
  scored in one prefill per configuration, read from ``prompt_logprobs``
  (:meth:`~prefcurate.inference.scoring.LogprobEngine.continuation_logprobs`);
  ``length_normalise: true`` divides the log-ratio by the response's token count. (The
  paper's other variant, two different models, would need two engines per judge; it is not
  built.)

Temperature (``temperature: null``, the default): fitted once per engine model on the gold
pairs (``gold_path``, default the packaged ``prefcurate/data/gold_pairs.jsonl``; ties and
unknown winners are left out): a one-parameter logistic regression of the gold winner on
``d = s_a - s_b`` without intercept (a position-free verdict is symmetric:
``p_a(d) = 1 - p_a(-d)``), with a unit ridge penalty on the standardised slope so that
separable gold pairs keep a finite ``t``. A slope at or below zero (the scores do not
follow the labels) gives ``t = inf``: every verdict is 0.5, a tie, so a judge whose scores
carry no signal abstains rather than being trusted or silently inverted. The gold file's
hash enters the judgment ids (a changed gold set is a new verdict). Calibration judges the
same gold pairs: with a finite ``t`` its accuracy depends only on the sign of ``d``; with
``t = inf`` every verdict is a tie, which calibration counts as wrong (accuracy 0), so the
calibration gate leaves such a judge out.

Bad input, before any work: :meth:`check_pool` (plan time, from the pool's config: a
generative model folder for a reward judge, a pooling model for a density-ratio judge, a
pool kind with no such call) and :meth:`check_engine` (the opened engine: its vLLM runner,
or, for a server pool, whether ``/classify`` or ``/v1/completions`` answers) raise
:class:`~prefcurate.inference.scoring.PoolCapabilityError` naming the judge and the pool.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import ClassVar

import numpy as np
import polars as pl
from prefcurate.schemas.ids import content_id, file_sha256
from prefcurate.tasks.judge_modes import JudgeMode, PairVerdicts, Progress, register_mode
from pydantic import BaseModel, ConfigDict, Field

from prefcurate.inference.scoring import (
    ContinuationRequest,
    PoolCapabilityError,
    RewardRequest,
    folder_runner,
)
from prefcurate.templates import Template, register_kind

register_kind("density_ratio_expert", {"prompt", "criterion_description"})
register_kind("density_ratio_plain", {"prompt"})

#: the ridge penalty on the standardised slope of the temperature fit
RIDGE = 1.0
#: what the reward model reads, named for the judgments' ``template`` column (no template
#: file: :func:`prefcurate.inference.scoring.reward_text` renders it)
REWARD_INPUT = "reward_model_input_v1"


# ------------------------------------------------------------------ temperature


def fit_temperature(score_diff: np.ndarray, a_wins: np.ndarray, ridge: float = RIDGE) -> float:
    """``t`` maximising the ridge-penalised likelihood of ``a_wins`` under
    ``sigmoid(score_diff / t)`` (module docstring); ``inf`` when the slope is not positive
    or there is nothing to fit (no finite differences, or all zero)."""
    d = np.asarray(score_diff, dtype=np.float64)
    y = np.where(np.asarray(a_wins, dtype=bool), 1.0, -1.0)
    keep = np.isfinite(d)
    d, y = d[keep], y[keep]
    scale = float(np.sqrt(np.mean(d**2))) if d.size else 0.0
    if scale == 0.0:
        return math.inf
    x = y * d / scale  # margin per unit slope, signed by the label
    w = 0.0
    for _ in range(100):  # Newton on a strictly convex 1-D loss: converges in a few steps
        s = 1.0 / (1.0 + np.exp(w * x))  # sigmoid(-w x): the loss's weight per pair
        gradient = -np.sum(x * s) + ridge * w
        hessian = np.sum(x**2 * s * (1.0 - s)) + ridge
        step = gradient / hessian
        w -= step
        if abs(step) < 1e-10:
            break
    return scale / w if w > 0 else math.inf


def verdicts_from_scores(score_a: np.ndarray, score_b: np.ndarray, temperature: float) -> np.ndarray:
    """``sigmoid((score_a - score_b) / t)``; NaN where a score is missing; 0.5 for ``t = inf``."""
    d = np.asarray(score_a, dtype=np.float64) - np.asarray(score_b, dtype=np.float64)
    if math.isinf(temperature):
        return np.where(np.isfinite(d), 0.5, np.nan)
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-d / temperature))


@lru_cache(maxsize=16)
def _gold(path: str | None, digest: str) -> pl.DataFrame:
    """The labelled pairs with a winner A or B (``digest`` keys the cache on the content)."""
    from prefcurate.tasks.annotate import load_gold_pairs

    gold = load_gold_pairs(path)
    return gold.filter(pl.col("winner").is_in(["A", "B"])).select(_GOLD_COLUMNS)


_GOLD_COLUMNS = ["prompt", "response_a", "response_b", "winner"]


def _gold_digest(path: str | None) -> str:
    if path is None:
        text = resources.files("prefcurate.data").joinpath("gold_pairs.jsonl").read_bytes()
        return content_id("gold", text.decode("utf-8"))[:16]
    return file_sha256(Path(path))[:16]


# ------------------------------------------------------------------------ modes


class PositionFreeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(
        None, gt=0, description="t in sigmoid((s_a - s_b) / t); null = fitted on the gold pairs"
    )
    gold_path: str | None = Field(
        None, description="labelled pairs for the fit (JSONL: prompt, response_a, response_b, winner); "
        "null = the packaged gold pairs"
    )


class PositionFreeMode(JudgeMode):
    """Scores each distinct response once; ``p_a`` from the score difference (module docstring)."""

    needs_both_orders = False
    #: no rubric ratings: a reward model has no "1".."5" answer to read, and the density
    #: ratio judge's job is the pair verdict (its pool can still rate under another judge)
    rates_responses = False
    Options: ClassVar[type[BaseModel]] = PositionFreeOptions
    #: the vLLM runner the pool's model must be on, and the server route that shows it
    runner: ClassVar[str]
    route_task: ClassVar[str]
    what: ClassVar[str]
    #: whether the score depends on the criterion (else a response is scored once per prompt)
    uses_criterion: ClassVar[bool] = False

    # -- what a subclass provides
    def score_frame(
        self, texts: pl.DataFrame, engine, batch_size: int, progress: Progress | None
    ) -> tuple[np.ndarray, list[str | None]]:
        """A score per row of ``texts`` (``prompt``, ``text``, ``criterion_description``)."""
        raise NotImplementedError

    # -- identity
    def identity(self) -> dict:
        identity = super().identity()
        if self.options.temperature is None:
            identity["gold"] = _gold_digest(self.options.gold_path)
        return identity

    def template_hashes(self) -> dict[str, str]:
        """The templates' hashes and, when ``t`` is fitted, the gold pairs' (read like a
        template: a gold file edited in place judges again)."""
        hashes = super().template_hashes()
        if self.options.temperature is None:
            hashes["temperature_fit"] = _gold_digest(self.options.gold_path)
        return hashes

    def temperature_fit_pairs(self) -> pl.DataFrame:
        """The labelled pairs (winner A or B) ``t`` is fitted on; none when it is given."""
        if self.options.temperature is not None:
            return pl.DataFrame(schema=dict.fromkeys(_GOLD_COLUMNS, pl.String))
        return _gold(self.options.gold_path, _gold_digest(self.options.gold_path))

    # -- checks
    def check_pool(self, pool_name: str, pool_config, judge_name: str) -> None:
        """Plan time, from the pool's config alone (nothing is started or asked)."""
        kind = getattr(pool_config, "kind", None)
        label = f"judge {judge_name!r} (mode {self.name!r})"
        if kind not in ("embedded", "servers"):
            raise PoolCapabilityError(
                f"{label} needs {self.what} on a vLLM pool (kind embedded or servers); its pool "
                f"{pool_name!r} is of kind {kind!r}, which has no {self.route_task} call"
            )
        from prefcurate.inference.models import resolve_model_path

        try:
            folder = resolve_model_path(pool_config.model)
        except FileNotFoundError:
            if kind == "embedded":
                raise
            return  # the servers' model is not on this host: check_engine asks the servers
        runner = folder_runner(folder)
        if runner is not None and runner != self.runner:
            raise PoolCapabilityError(
                f"{label} needs {self.what}, but its pool {pool_name!r} serves {pool_config.model!r}, "
                f"which vLLM runs on its {runner!r} runner (config.json architecture); "
                + self._needs_hint()
            )

    def check_engine(self, engine, judge_name: str) -> None:
        super().check_engine(engine, judge_name)
        label = f"judge {judge_name!r} (mode {self.name!r})"
        runner = getattr(engine, "runner", None)
        if runner is not None and runner != self.runner:
            raise PoolCapabilityError(
                f"{label} needs {self.what}, but its pool {getattr(engine, 'name', '?')!r} runs "
                f"{engine.model!r} on vLLM's {runner!r} runner; " + self._needs_hint()
            )
        if callable(getattr(engine, "check_serves", None)):
            engine.check_serves(self.route_task, label)

    def _needs_hint(self) -> str:
        if self.runner == "pooling":
            return "give it a pool serving a sequence-classification / reward model (num_labels=1)"
        return "give it a pool serving a generative (causal LM) model"

    # -- verdicts
    def judge(self, jobs: pl.DataFrame, engine, *, batch_size: int = 64, progress: Progress | None = None) -> PairVerdicts:
        keys = ["prompt", "text", "criterion_description"] if self.uses_criterion else ["prompt", "text"]
        sides = pl.concat([
            jobs.select("job", "prompt", "criterion_description", pl.col("text_a").alias("text"), pl.lit("a").alias("side")),
            jobs.select("job", "prompt", "criterion_description", pl.col("text_b").alias("text"), pl.lit("b").alias("side")),
        ])  # fmt: skip
        distinct = sides.unique(subset=keys, maintain_order=True)
        scores, errors = self.score_frame(distinct, engine, batch_size, progress)
        scored = distinct.select(keys).with_columns(
            pl.Series("score", scores, dtype=pl.Float64).fill_nan(None), pl.Series("error", errors, dtype=pl.String)
        )
        per_side = sides.join(scored, on=keys, how="left")
        wide = (
            per_side.filter(pl.col("side") == "a").select("job", pl.col("score").alias("s_a"), pl.col("error").alias("e_a"))
            .join(per_side.filter(pl.col("side") == "b").select("job", pl.col("score").alias("s_b"), pl.col("error").alias("e_b")), on="job")
            .sort("job")
        )  # fmt: skip
        temperature = self.temperature(engine, batch_size)
        s_a = wide["s_a"].to_numpy().astype(np.float64)
        s_b = wide["s_b"].to_numpy().astype(np.float64)
        p_a = verdicts_from_scores(s_a, s_b, temperature)
        errors_out = [
            "; ".join(f"{side}: {e}" for side, e in (("a", ea), ("b", eb)) if e) or None
            for ea, eb in zip(wide["e_a"].to_list(), wide["e_b"].to_list())
        ]
        return PairVerdicts.position_free(p_a, errors_out)

    def temperature(self, engine, batch_size: int = 64) -> float:
        """The given ``temperature``, or the one fitted on the gold pairs for this engine's model
        (computed once per process and model)."""
        if self.options.temperature is not None:
            return float(self.options.temperature)
        # (the template hashes include the gold pairs')
        key = (self.name, repr(self.options), tuple(sorted(self.template_hashes().items())),
               getattr(engine, "model", "?"))
        if key not in _FITTED:
            _FITTED[key] = self.fit_on_gold(engine, batch_size)
        return _FITTED[key]

    def fit_on_gold(self, engine, batch_size: int = 64) -> float:
        from prefcurate.tasks.annotate import resolve_criteria

        gold = self.temperature_fit_pairs()
        description = resolve_criteria(["overall"])["overall"]
        texts = pl.concat([
            gold.select("prompt", pl.col("response_a").alias("text")),
            gold.select("prompt", pl.col("response_b").alias("text")),
        ]).with_columns(pl.lit(description).alias("criterion_description"))  # fmt: skip
        scores, _ = self.score_frame(texts, engine, batch_size, None)
        n = gold.height
        return fit_temperature(scores[:n] - scores[n:], (gold["winner"] == "A").to_numpy())


_FITTED: dict[tuple, float] = {}


def _in_batches(call, requests: Sequence, batch_size: int, progress: Progress | None):
    """``(index, result)`` of ``call`` over ``requests``, ``batch_size`` requests a call,
    reporting ``progress`` after each call."""
    for start in range(0, len(requests), batch_size):
        for offset, result in enumerate(call(requests[start : start + batch_size])):
            yield start + offset, result
        if progress is not None:
            progress(min(start + batch_size, len(requests)), len(requests))


class RewardModelOptions(PositionFreeOptions):
    pass


@register_mode
class RewardModelMode(PositionFreeMode):
    """``s`` = the reward model's raw score of (prompt, response); see the module docstring."""

    name = "reward_model"
    Options = RewardModelOptions
    engine_calls = ("score_rewards",)
    runner = "pooling"
    route_task = "classify"
    what = "a reward model (score_rewards on vLLM's pooling runner)"

    def template_names(self):
        return {}

    @staticmethod
    def stored_template(templates: dict[str, Template]) -> tuple[str, str]:
        return REWARD_INPUT, content_id("reward-input", REWARD_INPUT)

    def score_frame(self, texts, engine, batch_size, progress):
        requests = [RewardRequest(p, t) for p, t in texts.select("prompt", "text").iter_rows()]
        scores = np.full(len(requests), np.nan)
        errors: list[str | None] = [None] * len(requests)
        for index, result in _in_batches(engine.score_rewards, requests, batch_size, progress):
            scores[index] = result.reward if result.error is None else np.nan
            errors[index] = result.error
        return scores, errors


class DensityRatioOptions(PositionFreeOptions):
    expert_template: str = Field(
        "density_ratio_expert_v1", description="the strong configuration's context (name or .txt path)"
    )
    plain_template: str = Field(
        "density_ratio_plain_v1", description="the weak configuration's context (name or .txt path)"
    )
    length_normalise: bool = Field(False, description="divide the log-ratio by the response's token count")


@register_mode
class DensityRatioMode(PositionFreeMode):
    """``s = log p(y | expert context) - log p(y | plain context)``; see the module docstring."""

    name = "density_ratio"
    Options = DensityRatioOptions
    engine_calls = ("continuation_logprobs",)
    runner = "generate"
    route_task = "generate"
    what = "response log-likelihoods (continuation_logprobs on a generative model)"
    uses_criterion = True

    def template_names(self):
        options: DensityRatioOptions = self.options  # type: ignore[assignment]
        return {
            "strong": (options.expert_template, "density_ratio_expert"),
            "weak": (options.plain_template, "density_ratio_plain"),
        }

    def score_frame(self, texts, engine, batch_size, progress):
        templates = self.templates()
        # the plain context has no criterion: one weak prefill per (prompt, response)
        plain = texts.select("prompt", "text").unique(maintain_order=True)
        # the response follows the cue ("Answer:") after a space, as a generator writes it
        requests = [
            ContinuationRequest(c, " " + y) for c, y in zip(templates["strong"].render_column(texts), texts["text"])
        ] + [ContinuationRequest(c, " " + y) for c, y in zip(templates["weak"].render_column(plain), plain["text"])]
        logprob = np.full(len(requests), np.nan)
        tokens = np.zeros(len(requests))
        errors: list[str | None] = [None] * len(requests)
        for index, result in _in_batches(engine.continuation_logprobs, requests, batch_size, progress):
            logprob[index] = result.logprob if result.error is None else np.nan
            tokens[index] = result.tokens
            errors[index] = result.error
        n = texts.height
        weak = plain.with_columns(
            pl.Series("weak", logprob[n:], dtype=pl.Float64), pl.Series("weak_error", errors[n:], dtype=pl.String)
        )
        joined = texts.select("prompt", "text").join(weak, on=["prompt", "text"], how="left", maintain_order="left")
        ratio = logprob[:n] - joined["weak"].fill_null(np.nan).to_numpy()
        if self.options.length_normalise:
            ratio = np.where(tokens[:n] > 0, ratio / np.maximum(tokens[:n], 1), np.nan)
        error_pairs = zip(errors[:n], joined["weak_error"].to_list())
        messages = ["; ".join(f"{k}: {e}" for k, e in (("strong", es), ("weak", ew)) if e) or None for es, ew in error_pairs]
        return ratio, messages
