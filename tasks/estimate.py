"""What a build will ask its pools for, before it starts, and the budget that stops it.

``prefcurate estimate -c CONFIG`` prints, per stage and pool, the requests, the input and
output tokens and (for pools with a ``price``) the cost in USD that a build of the config
would make. It reads the prompts exactly as ingest would (the same validation, limit and
de-duplication, in memory: nothing is written) and derives the model requests from the stage
sections, the way the stages plan them:

- generate: one request per prompt and generator (its ``n`` samples in one request), or per
  sample when the generator is seeded; output tokens are an upper bound, every sample
  running to ``max_tokens``.
- annotate: per judge, each scheduled pair in both orders per criterion (one verdict
  request each; ``rationale_k`` adds that many rationale generations per order), the gold
  pairs of calibration in both orders, and per response and rubric aspect one rating request; the responses are assumed as long as
  their ``max_tokens`` allows (cut at ``max_response_chars``). A position-free judge
  (``reward_model``, ``density_ratio``) scores each judged response instead, once (a
  density ratio once per criterion plus one plain prefill), and its gold pairs the same way.
- score: QuRating's pairwise judgments, ``sample_size`` items x ``pairs_per_item`` / 2
  comparisons per criterion, both orders; with CritiQ on, an upper bound of its workers'
  verdicts (mining on the human pairs, then the scorer's pairs) and its manager's
  generations (:func:`_add_critiq` says how it is bounded).

Tokens are counted as characters / 4 (the pools' tokenizers live on the provider's side),
so the figures are estimates; a verdict that needs ``logit_bias`` or a re-ask (see
:mod:`prefcurate.inference.openai_pool`) costs up to three requests instead of one.

``budget.max_usd`` caps what the dataset's requests may cost, all runs together (the sum of
``request_metrics.cost_usd``). Every unit that uses a pool checks it before it starts: once
the spend reaches the cap, the unit stops with :class:`BudgetExhausted`, its stage run is
recorded as failed with that message, and every unit not done stays pending, so a later
``prefcurate build`` (with a raised ``budget.max_usd``) resumes where this one stopped. A
unit that has started finishes, so the spend can pass the cap by the units in flight (one
per pool slot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from prefcurate.errors import InputError

CHARS_PER_TOKEN = 4.0
#: the judge template's own text around the prompt and responses, in characters (about)
TEMPLATE_CHARS = 600


class BudgetConfig(BaseModel):
    """``budget:`` in the pipeline config."""

    model_config = ConfigDict(extra="forbid")

    max_usd: float | None = Field(
        None, ge=0, description="stop before a unit starts once the dataset's requests cost this much (USD); "
        "the stage resumes from its pending units on the next build"
    )


class BudgetExhausted(InputError):
    """The spend reached ``budget.max_usd``; deterministic, so Prefect does not retry."""


@dataclass
class EstimateRow:
    stage: str
    pool: str
    what: str
    requests: int
    tokens_in: int
    tokens_out: int
    cost_usd: float | None  # None: the pool has no price table


def _tokens(chars: float) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


def estimate_build(config) -> list[EstimateRow]:
    """The rows :func:`format_estimate` prints, for a loaded PipelineConfig."""
    from prefcurate.tasks.ingest import ingest_file, input_files

    from prefcurate.config import section
    from prefcurate.inference.pools import parse_pool

    prompts = pl.concat([ingest_file(config.ingest.model_copy(update={"path": str(file)})).accepted
                         for file in input_files(config.ingest)]).unique("prompt_id", maintain_order=True)
    n_prompts = prompts.height
    prompt_chars = prompts["prompt"].str.len_chars().cast(float).fill_null(0)
    total_prompt_chars = float(prompt_chars.sum() or 0)
    mean_prompt_chars = total_prompt_chars / n_prompts if n_prompts else 0.0
    pools = {name: parse_pool(raw) for name, raw in config.pools.items()}
    rows: list[EstimateRow] = []

    def add(stage: str, pool: str, what: str, requests: float, chars_in: float, tokens_out: float) -> None:
        requests, tokens_in, tokens_out = round(requests), _tokens(chars_in), round(tokens_out)
        priced = getattr(pools.get(pool), "price", None)
        cost = priced.cost(tokens_in, tokens_out) if priced is not None else None
        rows.append(EstimateRow(stage, pool, what, requests, tokens_in, tokens_out, cost))

    stages = set(config.stages)
    generate = section(config, "generate")
    samples_per_prompt = sum(g.n for g in generate.generators)
    response_chars = {g.name: g.sampling.max_tokens * CHARS_PER_TOKEN for g in generate.generators}
    mean_response_chars = (
        sum(response_chars[g.name] * g.n for g in generate.generators) / samples_per_prompt if samples_per_prompt else 0.0
    )
    if "generate" in stages:
        for g in generate.generators:
            # seeded samples are one request each (a derived seed per sample), else one per prompt
            per_prompt = g.n if g.sampling.seed is not None else 1
            system = len(g.system_prompt or "")
            add("generate", g.pool, f"generator {g.name}: {g.n} samples/prompt", n_prompts * per_prompt,
                (total_prompt_chars + system * n_prompts) * per_prompt, n_prompts * g.n * g.sampling.max_tokens)

    if "annotate" in stages:
        from prefcurate.tasks.annotate import judge_mode

        annotate = section(config, "annotate")
        r = samples_per_prompt
        all_pairs = r * (r - 1) // 2
        pairs = all_pairs if annotate.pairing == "all" or (
            annotate.pairing == "auto" and all_pairs <= annotate.max_pairs_per_prompt
        ) else min(annotate.max_pairs_per_prompt, all_pairs)
        shown_prompt = min(mean_prompt_chars, annotate.max_prompt_chars or math.inf)
        shown_response = min(mean_response_chars, annotate.max_response_chars or math.inf)
        criteria = len(annotate.criteria)
        gold_pairs = _gold_pair_count(annotate)
        for judge in annotate.judges:
            verdicts = n_prompts * pairs * criteria * 2
            verdict_chars = TEMPLATE_CHARS + shown_prompt + 2 * shown_response
            mode = judge_mode(judge, annotate)  # per judge (the older rationale_k included)
            if not mode.needs_both_orders:  # reward_model, density_ratio: each response on its own
                _add_position_free(add, judge, mode, n_prompts * min(r, 2 * pairs), criteria,
                                   shown_prompt + shown_response, gold_pairs)
                continue
            if mode.name == "rationale":
                k, max_tokens = mode.options.k, mode.options.max_tokens
                add("annotate", judge.pool, f"judge {judge.name}: rationales ({k}/order)", verdicts * k,
                    verdicts * k * verdict_chars, verdicts * k * max_tokens)
                rationale_chars = max_tokens * CHARS_PER_TOKEN
                add("annotate", judge.pool, f"judge {judge.name}: verdicts after rationales", verdicts * k,
                    verdicts * k * (verdict_chars + rationale_chars), verdicts * k)
            else:
                add("annotate", judge.pool, f"judge {judge.name}: verdicts ({_count(pairs, 'pair')}/prompt x "
                    f"{_count(criteria, 'criterion', 'criteria')} x 2 orders)", verdicts, verdicts * verdict_chars,
                    verdicts)
            if gold_pairs:  # the calibration unit judges the gold pairs in both orders
                add("annotate", judge.pool, f"judge {judge.name}: calibration ({gold_pairs} gold pairs x 2 orders)",
                    gold_pairs * 2, gold_pairs * 2 * verdict_chars, gold_pairs * 2)
            aspects = len(annotate.rubric_aspects)
            if aspects:
                ratings = n_prompts * r * aspects
                add("annotate", judge.pool, f"judge {judge.name}: ratings ({aspects} aspects)", ratings,
                    ratings * (TEMPLATE_CHARS + shown_prompt + shown_response), ratings)

    if "score" in stages:
        score = section(config, "score")
        q = score.qurating
        items = min(q.sample_size, n_prompts * samples_per_prompt)
        comparisons = items * q.pairs_per_item / 2 * (len(q.criteria) + len(q.extra_criteria)) * 2
        excerpt = min(q.excerpt_chars, score.max_text_chars, mean_prompt_chars + mean_response_chars)
        add("score", score.pool, f"QuRating: {items} items x {q.pairs_per_item} comparisons", comparisons,
            comparisons * (TEMPLATE_CHARS + 2 * excerpt), comparisons)
        if score.critiq.enabled:
            _add_critiq(add, score.critiq, mean_prompt_chars + mean_response_chars)
    return rows


def _add_critiq(add, critiq, item_chars: float) -> None:
    """CritiQ's requests, an upper bound: every evaluation judges the whole working set
    (unchanged criteria are memoised, so fewer are asked), every criterion of every iteration
    is revised or replaced, and the final set is taken as ``n_criteria`` criteria (it holds
    every criterion seen that reached ``keep_threshold``: usually fewer)."""
    from prefcurate.tasks.critiq import load_human_pairs, load_seed_criteria, split_pairs

    c = critiq.params
    human = load_human_pairs(critiq.human_pairs)
    train, held = (len(side) for side in split_pairs(human.height, c.heldout_fraction, c.seed))
    seeds = len(load_seed_criteria(critiq.seed_criteria))
    orders = 2 if c.balance_positions else 1
    pair_chars = float((human["text_a"].str.len_chars() + human["text_b"].str.len_chars()).mean() or 0.0)
    criterion_chars = c.description_max_chars
    # workers: one next-token verdict each (A / B / None)
    mining = (seeds + c.n_criteria * (c.iterations + 1)) * train * orders + c.n_criteria * held * orders
    add("score", critiq.pool, f"CritiQ workers: criteria on {human.height} human pairs (upper bound)", mining,
        mining * (TEMPLATE_CHARS + criterion_chars + min(pair_chars, 2 * c.excerpt_chars)), mining)
    labels = critiq.scorer_pairs * c.n_criteria * orders
    add("score", critiq.pool, f"CritiQ workers: {critiq.scorer_pairs} scorer pairs x final criteria", labels,
        labels * (TEMPLATE_CHARS + criterion_chars + 2 * min(item_chars, c.excerpt_chars)), labels)
    # manager: fill the working set at the start, then per iteration each criterion revised
    # (critiques of wrong cases + rewrites) or banned and replaced (proposals)
    per_criterion = max(c.max_reflection_cases + c.rewrite_samples, c.proposal_samples)
    manager = c.n_criteria * c.proposal_samples + c.iterations * c.n_criteria * per_criterion
    shown = TEMPLATE_CHARS + (2 * c.manager_examples + 1) * c.manager_excerpt_chars + c.n_criteria * criterion_chars
    add("score", critiq.pool, "CritiQ manager: proposals, critiques, rewrites (upper bound)", manager,
        manager * shown, manager * c.manager_max_tokens)


def _add_position_free(add, judge, mode, responses: int, criteria: int, text_chars: float, gold_pairs: int) -> None:
    """A position-free judge's requests: one score per judged response (once per unit, however
    many pairs share it), a density-ratio judge one strong prefill per criterion and one weak;
    no verdict tokens come back. Calibration and, with no ``temperature``, its fit score both
    responses of each gold pair. Such a judge rates nothing."""
    per_response = criteria + 1 if mode.uses_criterion else 1
    chars = text_chars + (TEMPLATE_CHARS if mode.uses_criterion else 0)
    what = f"{_count(criteria, 'criterion', 'criteria')} + 1 plain" if mode.uses_criterion else "1"
    add("annotate", judge.pool, f"judge {judge.name}: {mode.name} scores ({what}/response)",
        responses * per_response, responses * per_response * chars, 0)
    per_gold = 2 * (2 if mode.uses_criterion else 1)  # both responses; density ratio: strong + weak
    if gold_pairs:
        add("annotate", judge.pool, f"judge {judge.name}: calibration ({gold_pairs} gold pairs)",
            gold_pairs * per_gold, gold_pairs * per_gold * chars, 0)
    if mode.options.temperature is None:
        fit = mode.temperature_fit_pairs().height
        add("annotate", judge.pool, f"judge {judge.name}: temperature fit ({fit} gold pairs, once per model)",
            fit * per_gold, fit * per_gold * chars, 0)


def _count(n, one: str, many: str | None = None) -> str:
    """``1 pair``, ``3 pairs``: the estimate's lines read as sentences."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def _gold_pair_count(annotate) -> int:
    from prefcurate.tasks.annotate import calibration_gold_pairs

    return calibration_gold_pairs(annotate).height


def format_estimate(rows: list[EstimateRow], config=None) -> str:
    lines = [f"{'stage':<9} {'pool':<12} {'requests':>9} {'tokens in':>11} {'tokens out':>11} {'cost USD':>10}  what"]
    for row in rows:
        cost = f"{row.cost_usd:10.4f}" if row.cost_usd is not None else f"{'-':>10}"
        lines.append(f"{row.stage:<9} {row.pool:<12} {row.requests:>9,} {row.tokens_in:>11,} "
                     f"{row.tokens_out:>11,} {cost}  {row.what}")
    priced = [r.cost_usd for r in rows if r.cost_usd is not None]
    lines.append(f"{'total':<22} {sum(r.requests for r in rows):>9,} {sum(r.tokens_in for r in rows):>11,} "
                 f"{sum(r.tokens_out for r in rows):>11,} {sum(priced):10.4f}")
    lines.append("tokens are characters / 4; output tokens are upper bounds (every sample to max_tokens); "
                 "'-': a pool without a price table (local); a whole build from scratch: work an existing "
                 "dataset has done already is not subtracted")
    budget = getattr(getattr(config, "budget", None), "max_usd", None)
    if budget is not None:
        verdict = "within" if sum(priced) <= budget else "OVER"
        lines.append(f"budget.max_usd = {budget:g}: the estimate is {verdict} it")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- budget
def spent_usd(store) -> float:
    """What the dataset's recorded requests cost (``request_metrics.cost_usd``), in USD."""
    try:
        frame = store.query("SELECT * FROM request_metrics LIMIT 0")
    except Exception:  # a dataset without request metrics yet
        return 0.0
    if "cost_usd" not in frame.columns:  # written before prices existed
        return 0.0
    total = store.query("SELECT coalesce(sum(cost_usd), 0) AS usd FROM request_metrics")["usd"][0]
    return float(total or 0.0)


def spend_by_pool(store):
    """Requests, tokens and USD per pool of the priced pools' requests (None: nothing priced)."""
    if spent_usd(store) <= 0:
        return None
    return store.query(
        "SELECT pool, count(*) AS requests, sum(tokens_in) AS tokens_in, sum(tokens_out) AS tokens_out, "
        "round(sum(cost_usd), 4) AS usd FROM request_metrics WHERE cost_usd IS NOT NULL GROUP BY pool ORDER BY pool"
    )


def check_budget(config: dict[str, Any] | Any, store, stage: str, unit_key: str) -> None:
    """Raise :class:`BudgetExhausted` when the dataset's spend reached ``budget.max_usd``."""
    budget = config.get("budget") if isinstance(config, dict) else getattr(config, "budget", None)
    if isinstance(budget, BaseModel):
        budget = budget.model_dump()
    max_usd = (budget or {}).get("max_usd")
    if max_usd is None:
        return
    spent = spent_usd(store)
    if spent >= max_usd:
        raise BudgetExhausted(
            f"budget.max_usd reached: this dataset's requests cost ${spent:.4f} of ${max_usd:g}; stage "
            f"{stage!r} stopped before unit {unit_key[:12]} (units not done stay pending). Raise "
            f"budget.max_usd (e.g. --set budget.max_usd={2 * max(max_usd, spent):.2g}) and run the "
            "build again to resume"
        )
