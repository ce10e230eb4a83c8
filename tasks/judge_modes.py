"""Judge modes: how a judge turns a pair of responses into P(response_a is better).

A judge (``annotate.judges[]``, :class:`~prefcurate.tasks.annotate.JudgeSpec`) picks its
mode by name, per judge::

    judges:
      - {name: quick, pool: judges}                                   # mode: probability
      - {name: careful, pool: judges, mode: rationale, mode_options: {k: 3}}

Built-in modes (this file): ``probability`` (the default: P("A") read after the verdict
cue, both orders) and ``rationale`` (FairEval MEC: k sampled evidence texts per order, the
verdict probability read after each). Any module named ``prefcurate.tasks.judge_modes_*``
(a file ``tasks/judge_modes_<x>.py``) is imported on the first lookup of an unknown name,
so **adding a mode is one file + its template + one test**: no other file names it.
A judge without ``mode`` is a probability judge (or a rationale judge under the older
stage-wide ``annotate.rationale_k > 0``); :func:`prefcurate.tasks.annotate.judge_mode`
returns a judge's mode object and is the one place that reads that older switch.

The interface (:class:`JudgeMode`)
----------------------------------
A mode class declares, as class attributes:

- ``name``: what ``mode:`` says; register the class with :func:`register_mode`.
- ``Options``: a pydantic model of its settings, filled from the judge's ``mode_options``
  (``extra="forbid"``: an unknown option is an error naming the judge). Options enter the
  judgment ids through :meth:`JudgeMode.identity`, so a changed setting is a new judgment.
- ``needs_both_orders``: True when the verdict depends on the order the two responses are
  shown in, so both orders are asked and averaged (FairEval BPC). False for position-free
  modes (a reward model scores each response on its own; a density ratio reads each
  response's log-likelihood under two configurations): they cost one engine request per
  response (or per response and configuration) instead of two per pair, their
  ``p_first_ab``/``p_first_ba``/``bpde`` are null, and calibration reports no flip rate.
- ``engine_calls``: the :class:`~prefcurate.inference.base.Engine` methods it calls;
  :meth:`JudgeMode.check_engine` checks the judge's engine offers them before any work
  starts. :meth:`JudgeMode.check_pool` runs at plan time, before any engine is opened
  (``check_judge_pools`` in ``tasks/annotate.py``): override it to refuse a pool that cannot
  serve the mode (a reward mode given a generative model), naming judge and pool.
- ``rates_responses``: whether the judge also gives the rubric ratings (1-5 per aspect, a
  ``score_choices`` call on the same engine). False for a mode whose engine cannot read
  option probabilities (a pooling reward model): the judge then rates nothing, and the
  rubric template leaves its unit keys.

and implements:

- :meth:`JudgeMode.template_names`: ``role -> (template name or .txt path, kind)`` for every
  template it renders. All of them are loaded (validated) and hashed through the one loader
  (:func:`prefcurate.templates.load_template`); their hashes enter the annotate unit keys
  (:func:`prefcurate.tasks.annotate.judge_template_hashes`) and the judgment ids, so an
  edited template judges again. A new template kind is declared with
  :func:`prefcurate.templates.register_kind` in the mode's module.
- :meth:`JudgeMode.judge(jobs, engine, batch_size=, progress=) <JudgeMode.judge>` ->
  :class:`PairVerdicts`, one entry per row of ``jobs``. ``jobs`` has one row per
  (pair, criterion) with the columns ``job`` (0..n-1), ``prompt``, ``text_a``, ``text_b``
  and ``criterion_description``, texts already cut to the stage's limits; in the annotate
  stage also ``prompt_id``, ``response_a``, ``response_b`` and ``criterion`` (calibration's
  gold jobs carry no ids: a position-free mode that scores each distinct response once
  should de-duplicate on ``(prompt, text)``). Build the result with
  :meth:`PairVerdicts.from_orders` (both-orders modes) or :meth:`PairVerdicts.position_free`.
  A failed request is data, not an exception: its entry has ``p_a`` NaN and an ``error``
  (the stage stores it invalid and the next run asks again).

Both-orders modes subclass :class:`BothOrdersMode` and implement only
:meth:`BothOrdersMode.order_probabilities` (P(first shown is better) per order row).

The both-orders primitive
-------------------------
:func:`ask_both_orders` is the one way every pairwise prompt in the project (annotate's
judges, QuRating's quality judge, CritiQ's workers) asks an engine about a pair in both
orders: it renders a template for each order (``text_a`` first, then ``text_b`` first),
sends the two orders of a pair next to each other in the same ``score_choices`` batch
(the prefix cache shares them), and returns each order's option probabilities
(:class:`BothOrders`). Its failure rules (:func:`score_options`): a request whose answer
carries an error, or probabilities that are not finite and non-negative over exactly the
options, is NaN with the error kept; valid probabilities are renormalised over the
options; an engine that answers a different number of requests than asked raises; a call
in which every request failed raises :class:`~prefcurate.inference.base.InferenceError`
unless the caller keeps failures as data (``all_failed="keep"``: annotate stores failed
judgments and asks them again next run; QuRating and CritiQ compute ratings and
accuracies from the batch at once, where an all-failed batch would read as real zeros).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import polars as pl
from prefcurate.schemas.ids import content_id
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prefcurate.inference.base import (
    ChoiceRequest,
    ChoiceScore,
    Engine,
    GenerateRequest,
    InferenceError,
    SamplingParams,
)
from prefcurate.templates import Template, load_template

if TYPE_CHECKING:
    from prefcurate.tasks.annotate import JudgeSpec

Progress = Callable[[int, int], None]
"""``progress(done, total)``, called after each engine batch."""

PAIRWISE_OPTIONS: tuple[str, str] = ("A", "B")
#: rationale sampling stops at the next section header, a blank line or a verdict
RATIONALE_STOP = ("\n#", "\n\n", "[[")
#: a verdict sample within this distance of 0.5 is a tie for BPDE
BPDE_TIE_BAND = 0.1

AllFailed = Literal["raise", "keep"]


# ------------------------------------------------------------------ engine calls


def _valid_probs(scores: Sequence[ChoiceScore], n_options: int) -> tuple[np.ndarray, np.ndarray]:
    """(a mask of the scores whose probabilities are usable, those rows renormalised).

    Usable: no error, and ``n_options`` finite, non-negative values with a positive sum.
    One array operation for the batch (a check per score was a quarter of annotate's time).
    """
    usable = np.zeros(len(scores), dtype=bool)
    shaped = np.asarray([i for i, score in enumerate(scores)
                         if not score.error and len(score.probs or ()) == n_options], dtype=np.int64)
    if not len(shaped):
        return usable, np.zeros((0, n_options))
    values = np.asarray([scores[i].probs for i in shaped], dtype=np.float64).reshape(len(shaped), n_options)
    total = values.sum(axis=1)
    good = np.isfinite(values).all(axis=1) & (values >= 0).all(axis=1) & (total > 0)
    usable[shaped[good]] = True
    return usable, values[good] / total[good, None]


def score_options(
    engine: Engine,
    prompts: Sequence[str],
    options: Sequence[str],
    *,
    batch_size: int | None = 64,
    progress: Progress | None = None,
    all_failed: AllFailed = "keep",
) -> tuple[np.ndarray, list[str | None]]:
    """Option probabilities for each prompt: ``(len(prompts), len(options))``, NaN rows on error.

    ``batch_size`` requests per ``score_choices`` call, rounded down to even so that two
    consecutive prompts (the two orders of a pair, sent adjacent) share a call; None sends
    everything in one call (a larger batch keeps a server pool busy). See the module
    docstring for the failure rules; ``all_failed="raise"`` raises when every request of
    the whole call failed.
    """
    options = tuple(options)
    step = len(prompts) if batch_size is None else max(2, batch_size - batch_size % 2)
    step = max(step, 1)
    probs = np.full((len(prompts), len(options)), np.nan)
    errors: list[str | None] = [None] * len(prompts)
    for start in range(0, len(prompts), step):
        chunk = prompts[start : start + step]
        scores = engine.score_choices([ChoiceRequest(p, options) for p in chunk])
        if len(scores) != len(chunk):
            raise RuntimeError(
                f"engine {engine.model!r} answered {len(scores)} of {len(chunk)} requests"
            )
        usable, valid = _valid_probs(scores, len(options))
        probs[start + np.flatnonzero(usable)] = valid
        for offset in np.flatnonzero(~usable).tolist():
            score = scores[offset]
            errors[start + offset] = score.error or f"no valid probability over {options}: {score.probs}"
        if progress is not None:
            progress(min(start + step, len(prompts)), len(prompts))
    if all_failed == "raise" and prompts and all(e is not None for e in errors):
        # the engine is gone: an all-invalid result would look like data that merely failed
        raise InferenceError(
            f"every request of a batch of {len(prompts)} to {engine.model!r} failed: {errors[0]}"
        )
    return probs, errors


def order_frames(
    pairs: pl.DataFrame,
    first: str,
    second: str,
    *,
    text_a: str = "text_a",
    text_b: str = "text_b",
    both_orders: bool = True,
) -> pl.DataFrame:
    """Each row of ``pairs`` as the template fields of each order it is shown in.

    Adds ``pair`` (the row's position) and ``order`` (0: ``text_a`` shown first as field
    ``first``, ``text_b`` as ``second``; 1: swapped), interleaved ab, ba, ab, ba, ... so
    row ``2 * pair + order`` (one order only: row ``pair``).
    """
    indexed = pairs.with_row_index("pair").with_columns(pl.col("pair").cast(pl.Int64))
    ab = indexed.with_columns(
        pl.lit(0, pl.Int8).alias("order"), pl.col(text_a).alias(first), pl.col(text_b).alias(second)
    )
    if not both_orders:
        return ab
    ba = indexed.with_columns(
        pl.lit(1, pl.Int8).alias("order"), pl.col(text_b).alias(first), pl.col(text_a).alias(second)
    )
    return pl.concat([ab, ba]).sort("pair", "order", maintain_order=True)


@dataclass(frozen=True)
class BothOrders:
    """Option probabilities of each pair in each order: ``ab`` with ``text_a`` shown first,
    ``ba`` with ``text_b`` first (``[pairs, options]``, NaN rows where a request failed;
    ``ba`` is None when one order only was asked), and each request's error."""

    options: tuple[str, ...]
    ab: np.ndarray
    ba: np.ndarray | None
    errors_ab: list[str | None]
    errors_ba: list[str | None]

    def errors(self) -> list[str | None]:
        """Per pair: ``"ab: ...; ba: ..."`` naming the failed orders, None when none failed."""
        return [_join_errors(a, b) for a, b in zip(self.errors_ab, self.errors_ba)]


def ask_both_orders(
    engine: Engine,
    template: Template,
    pairs: pl.DataFrame,
    first: str,
    second: str,
    options: Sequence[str],
    *,
    text_a: str = "text_a",
    text_b: str = "text_b",
    both_orders: bool = True,
    batch_size: int | None = 64,
    progress: Progress | None = None,
    all_failed: AllFailed = "raise",
) -> BothOrders:
    """Ask ``engine`` about every pair of ``pairs`` in both orders, with ``template``.

    ``pairs`` holds one row per pair: a column per placeholder of ``template`` other than
    ``first``/``second`` (the placeholders of the text shown first and second), and the
    pair's texts in ``text_a``/``text_b``. The orders of a pair are sent adjacent, in one
    batch (:func:`score_options`, whose failure rules apply). ``both_orders=False`` asks the
    ab order only (``ba`` is None).
    """
    orders = order_frames(pairs, first, second, text_a=text_a, text_b=text_b, both_orders=both_orders)
    probs, errors = score_options(
        engine, template.render_column(orders) if orders.height else [], options,
        batch_size=batch_size, progress=progress, all_failed=all_failed,
    )
    n_options = len(tuple(options))
    if not both_orders:
        return BothOrders(tuple(options), probs, None, errors, [None] * pairs.height)
    per_pair = probs.reshape(pairs.height, 2, n_options)
    return BothOrders(tuple(options), per_pair[:, 0], per_pair[:, 1], errors[0::2], errors[1::2])


def _join_errors(first: str | None, second: str | None) -> str | None:
    parts = [f"{label}: {e}" for label, e in (("ab", first), ("ba", second)) if e]
    return "; ".join(parts) or None


# -------------------------------------------------------------------- verdicts


def balanced_position_entropy(samples: pl.DataFrame, n_jobs: int, tie_band: float = BPDE_TIE_BAND) -> np.ndarray:
    """BPDE per job from its verdict samples: -sum p log p over win/tie/lose (natural log).

    ``samples`` holds (row, p): row ``2 * job`` is the A/B order, ``2 * job + 1`` the B/A
    order, ``p`` the sample's P(first shown is better). Each sample is turned toward
    response_a (B/A samples: 1 - p), then counted as a win (> 0.5 + band), a loss
    (< 0.5 - band) or a tie. NaN for a job without a valid sample.
    """
    outcomes = (
        samples.filter(pl.col("p").is_not_nan() & pl.col("p").is_not_null())
        .with_columns(
            (pl.col("row") // 2).alias("job"),
            pl.when(pl.col("row") % 2 == 0).then(pl.col("p")).otherwise(1.0 - pl.col("p")).alias("p_a"),
        )
        .with_columns(
            pl.when(pl.col("p_a") > 0.5 + tie_band).then(pl.lit("win"))
            .when(pl.col("p_a") < 0.5 - tie_band).then(pl.lit("lose"))
            .otherwise(pl.lit("tie")).alias("outcome")
        )
        .group_by("job", "outcome").len()
        .with_columns((pl.col("len") / pl.col("len").sum().over("job")).alias("share"))
        .group_by("job")
        .agg((-(pl.col("share") * pl.col("share").log())).sum().alias("bpde"))
    )
    entropy = np.full(n_jobs, np.nan)
    entropy[outcomes["job"].to_numpy()] = outcomes["bpde"].to_numpy()
    return entropy


@dataclass(frozen=True)
class PairVerdicts:
    """A mode's verdicts, one entry per job: ``p_a`` = P(response_a is better), NaN when
    invalid; ``p_first_ab``/``p_first_ba`` = P(first shown is better) per order (NaN for
    position-free modes); ``bpde`` (NaN when unknown); ``error`` per job (None when valid)."""

    p_a: np.ndarray
    p_first_ab: np.ndarray
    p_first_ba: np.ndarray
    bpde: np.ndarray
    errors: list[str | None]

    @property
    def valid(self) -> np.ndarray:
        return np.isfinite(self.p_a)

    @classmethod
    def from_orders(
        cls, p_first: np.ndarray, errors: Sequence[str | None], samples: pl.DataFrame | None = None
    ) -> PairVerdicts:
        """From per-order probabilities (rows ab, ba, ab, ...) and errors: ``p_a`` is the
        mean of the two orders turned toward response_a (FairEval BPC, QuRating's average),
        valid only when both are. ``samples`` (row, p) give BPDE (default: one per order)."""
        p_first = np.asarray(p_first, dtype=np.float64)
        n_jobs = len(p_first) // 2
        p_ab, p_ba = p_first[0::2], p_first[1::2]
        valid = np.isfinite(p_ab) & np.isfinite(p_ba)
        if samples is None:
            samples = pl.DataFrame({"row": np.arange(len(p_first)), "p": p_first})
        bpde = balanced_position_entropy(samples, n_jobs)
        return cls(
            p_a=np.where(valid, (p_ab + 1.0 - p_ba) / 2.0, np.nan),
            p_first_ab=p_ab,
            p_first_ba=p_ba,
            bpde=np.where(valid, bpde, np.nan),
            errors=[_join_errors(a, b) for a, b in zip(errors[0::2], errors[1::2])],
        )

    @classmethod
    def position_free(cls, p_a: np.ndarray, errors: Sequence[str | None]) -> PairVerdicts:
        """From a position-free mode's ``p_a`` per job (no orders, no BPDE)."""
        p_a = np.asarray(p_a, dtype=np.float64)
        missing = np.full(len(p_a), np.nan)
        return cls(p_a, missing, missing.copy(), missing.copy(), list(errors))


# ------------------------------------------------------------------------ modes


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JudgeMode:
    """How one judge turns jobs into verdicts; see the module docstring for the contract."""

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    needs_both_orders: ClassVar[bool] = True
    engine_calls: ClassVar[tuple[str, ...]] = ("score_choices",)
    #: the judge also rates each response on the rubric aspects (a ``score_choices`` call)
    rates_responses: ClassVar[bool] = True

    def __init__(self, judge: JudgeSpec, options: BaseModel | None = None):
        self.judge_spec = judge
        self.options = options if options is not None else self.Options()

    @classmethod
    def parse_options(cls, options: dict[str, Any], judge_name: str) -> BaseModel:
        try:
            return cls.Options(**options)
        except ValidationError as error:
            raise ValueError(f"judge {judge_name!r}, mode {cls.name!r}: bad mode_options: {error}") from None

    # -- templates
    def template_names(self) -> dict[str, tuple[str, str]]:
        """``role -> (template name or path, kind)`` of every template the mode renders."""
        raise NotImplementedError

    def templates(self) -> dict[str, Template]:
        """The templates, loaded (validated) and hashed now."""
        return {role: load_template(name, kind) for role, (name, kind) in self.template_names().items()}

    def template_hashes(self) -> dict[str, str]:
        """``role -> hash``: entered into the annotate unit keys."""
        return {role: template.hash for role, template in self.templates().items()}

    @staticmethod
    def stored_template(templates: dict[str, Template]) -> tuple[str, str]:
        """``(name, hash)`` stored with each judgment: the template's own, or for several
        templates their names joined by ``+`` and a hash over their hashes."""
        if len(templates) == 1:
            (only,) = templates.values()
            return only.name, only.hash
        ordered = sorted(templates.items())
        return "+".join(t.name for _, t in ordered), content_id("templates", {r: t.hash for r, t in ordered})

    # -- identity and engine
    def identity(self) -> dict:
        """Enters every judgment id: the mode's name and its settings."""
        return {"mode": self.name, **self.options.model_dump(mode="json")}

    def check_engine(self, engine: Engine, judge_name: str) -> None:
        """Raise naming the judge when its engine lacks a call this mode makes."""
        missing = [call for call in self.engine_calls if not callable(getattr(engine, call, None))]
        if missing:  # (the pool's to change: not retried)
            from prefcurate.inference.scoring import PoolCapabilityError

            raise PoolCapabilityError(
                f"judge {judge_name!r} (mode {self.name!r}) needs engine call(s) {', '.join(missing)}, "
                f"which its engine {getattr(engine, 'model', '?')!r} does not offer"
            )

    def check_pool(self, pool_name: str, pool_config: Any, judge_name: str) -> None:
        """Plan-time check that the judge's pool can serve this mode (before any engine is
        opened): raise a ``ValueError`` naming judge and pool. The built-in modes need only
        ``score_choices``/``generate``, which every pool kind offers: no check."""

    # -- verdicts
    def judge(
        self, jobs: pl.DataFrame, engine: Engine, *, batch_size: int = 64, progress: Progress | None = None
    ) -> PairVerdicts:
        raise NotImplementedError


class BothOrdersMode(JudgeMode):
    """A mode whose verdict depends on the order shown: both orders, averaged."""

    needs_both_orders = True

    def order_probabilities(
        self, jobs: pl.DataFrame, engine: Engine, batch_size: int, progress: Progress | None
    ) -> tuple[np.ndarray, list[str | None], pl.DataFrame | None]:
        """P(first shown is better) per order row (ab, ba, ab, ...; NaN when failed), the
        errors per order row, and the verdict samples (row, p) for BPDE (None: one each)."""
        raise NotImplementedError

    def judge(self, jobs, engine, *, batch_size=64, progress=None) -> PairVerdicts:
        p_first, errors, samples = self.order_probabilities(jobs, engine, batch_size, progress)
        return PairVerdicts.from_orders(p_first, errors, samples)


JUDGE_MODES: dict[str, type[JudgeMode]] = {}


def register_mode(cls: type[JudgeMode]) -> type[JudgeMode]:
    """Class decorator: make ``cls`` selectable as ``mode: <cls.name>``."""
    known = JUDGE_MODES.get(cls.name)
    if known is not None and known is not cls and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"judge mode {cls.name!r} is registered twice ({known.__module__}, {cls.__module__})")
    JUDGE_MODES[cls.name] = cls
    return cls


def _import_mode_modules() -> None:
    """Import every ``prefcurate.tasks.judge_modes_*`` module (each registers its modes)."""
    import prefcurate.tasks as tasks_package

    for module in pkgutil.iter_modules(tasks_package.__path__):
        if module.name.startswith("judge_modes_"):
            importlib.import_module(f"prefcurate.tasks.{module.name}")


def mode_class(name: str) -> type[JudgeMode]:
    """The mode class registered as ``name``; raises listing the known modes."""
    if name not in JUDGE_MODES:
        _import_mode_modules()
    if name not in JUDGE_MODES:
        raise ValueError(f"unknown judge mode {name!r}; known: {', '.join(sorted(JUDGE_MODES))}")
    return JUDGE_MODES[name]


def available_modes() -> list[str]:
    _import_mode_modules()
    return sorted(JUDGE_MODES)


def mode_for(name: str, options: dict[str, Any], judge: JudgeSpec) -> JudgeMode:
    """The mode ``name`` for ``judge``, its ``options`` validated (errors name the judge).
    The annotate stage goes through :func:`prefcurate.tasks.annotate.judge_mode`, which
    picks the name and options from the judge's config."""
    cls = mode_class(name)
    return cls(judge, cls.parse_options(dict(options), judge.name))


# ------------------------------------------------------------- built-in modes


@register_mode
class ProbabilityMode(BothOrdersMode):
    """P("A") after the verdict cue of the judge's pairwise ``template``, both orders."""

    name = "probability"

    def template_names(self):
        return {"pairwise": (self.judge_spec.template, "pairwise")}

    def order_probabilities(self, jobs, engine, batch_size, progress):
        template = self.templates()["pairwise"]
        asked = ask_both_orders(
            engine, template, jobs, "response_first", "response_second", PAIRWISE_OPTIONS,
            batch_size=batch_size, progress=progress, all_failed="keep",
        )
        p_first = np.column_stack([asked.ab[:, 0], asked.ba[:, 0]]).ravel()
        errors = [e for pair in zip(asked.errors_ab, asked.errors_ba) for e in pair]
        return p_first, errors, None


class RationaleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: int = Field(3, ge=1, description="evidence texts sampled per order")
    temperature: float = Field(1.0, ge=0.0, description="sampling temperature (FairEval: 1)")
    max_tokens: int = Field(64, ge=1, description="longest evidence text, in tokens")


@register_mode
class RationaleMode(BothOrdersMode):
    """FairEval MEC: per order, ``k`` short evidence texts are sampled, then the verdict
    probability is read after each; the order's probability is the mean over the valid
    samples (a blank sample carries no evidence and is not one of them)."""

    name = "rationale"
    Options = RationaleOptions
    engine_calls = ("generate", "score_choices")

    def template_names(self):
        return {"rationale": (self.judge_spec.rationale_template, "rationale")}

    def order_probabilities(self, jobs, engine, batch_size, progress):
        template = self.templates()["rationale"]
        options: RationaleOptions = self.options  # type: ignore[assignment]
        orders = order_frames(jobs, "response_first", "response_second")
        sampling = SamplingParams(
            n=options.k, temperature=options.temperature, top_p=1.0,
            max_tokens=options.max_tokens, stop=RATIONALE_STOP,
        )
        gen_prompts = template.render_column(orders, stop_before="rationale")
        rationales: list[list[str]] = []
        gen_errors: list[str | None] = []
        total_steps = len(gen_prompts) * 2
        step = max(2, batch_size - batch_size % 2)
        for start in range(0, len(gen_prompts), step):
            chunk = gen_prompts[start : start + step]
            results = engine.generate([GenerateRequest(p, None, sampling, chat=False) for p in chunk])
            for result in results:
                texts = [] if result.error else [c.text.strip() for c in result.completions if c.text.strip()]
                rationales.append(texts)
                gen_errors.append(result.error or (None if texts else "no rationale generated"))
            if progress is not None:
                progress(min(start + step, len(gen_prompts)), total_steps)
        expanded = (
            orders.with_row_index("row")
            .with_columns(pl.Series("rationale", rationales, dtype=pl.List(pl.String)))
            .explode("rationale")
            .filter(pl.col("rationale").is_not_null())
        )

        def verdict_progress(done: int, total: int) -> None:
            # the second half of the work: verdicts, reported on the same 0..2N scale
            if progress is not None:
                progress(len(gen_prompts) + done * len(gen_prompts) // max(total, 1), total_steps)

        verdict_probs, verdict_errors = score_options(
            engine, template.render_column(expanded), PAIRWISE_OPTIONS,
            batch_size=batch_size, progress=verdict_progress, all_failed="keep",
        )
        per_row = (
            expanded.select("row")
            .with_columns(pl.Series("p", verdict_probs[:, 0]).fill_nan(None))
            .group_by("row")
            .agg(pl.col("p").mean().alias("p"), pl.col("p").is_not_null().sum().alias("valid"))
        )
        p_first = np.full(orders.height, np.nan)
        rows = per_row["row"].to_numpy()
        means = per_row["p"].to_numpy().astype(np.float64)
        p_first[rows] = np.where(per_row["valid"].to_numpy() > 0, means, np.nan)
        first_error: dict[int, str] = {}
        for row, error in zip(expanded["row"].to_list(), verdict_errors):
            if error and row not in first_error:
                first_error[row] = error
        errors = [
            gen_errors[r] or (first_error.get(r) if np.isnan(p_first[r]) else None)
            for r in range(orders.height)
        ]
        samples = pl.DataFrame({"row": expanded["row"].to_numpy(), "p": verdict_probs[:, 0]})
        return p_first, errors, samples
