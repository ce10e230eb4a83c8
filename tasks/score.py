"""The score stage's parameters and glue: QuRating ratings, an embedding scorer, CritiQ.

Scores attach to responses by default (``qurating.item_kind``); the text judged for a
response is its prompt and the response, so "educational value" and the like are judged
in context. Every item gets a score: the judged sample from the Bradley-Terry fit
(``qurating_bt``), all items from the scorer trained on the sample's judgments (``scorer``),
and, when CritiQ is on, from the scorer trained on CritiQ-judged pairs (``critiq``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from prefcurate.tasks.critiq import CritiQParams
from prefcurate.tasks.qurating import QuRatingParams, _quality_frame, score_items


class CritiQStageParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(False, description="mine criteria from human pairs and score with them")
    pool: str = Field("judges", description="pool of the manager and worker agents")
    human_pairs: str | None = Field(None, description="JSONL of (id, text_a, text_b, answer); default bundled")
    seed_criteria: str | None = Field(None, description="YAML knowledge base of criteria; default bundled")
    scorer_pairs: int = Field(64, ge=2, description="unlabelled response pairs judged with the final criteria")
    params: CritiQParams = Field(default_factory=CritiQParams)


class ScoreParams(BaseModel):
    """Parameters of the score stage."""

    model_config = ConfigDict(extra="forbid")
    pool: str = Field("judges", description="pool that judges criteria pairwise")
    qurating: QuRatingParams = Field(default_factory=QuRatingParams)
    critiq: CritiQStageParams = Field(default_factory=CritiQStageParams)
    max_text_chars: int = Field(1500, ge=50, description="prompt + response text shown per item")


@dataclass
class ScoreOutcome:
    quality: pl.DataFrame
    report: dict = field(default_factory=dict)
    critiq_markdown: str | None = None
    embed_seconds: float = 0.0


def item_texts(responses: pl.DataFrame, prompts: pl.DataFrame, max_chars: int) -> pl.DataFrame:
    """(item_id, text) for responses: the prompt and the response, cut to ``max_chars``."""
    return (
        responses.filter(pl.col("text").is_not_null() & (pl.col("text").str.len_chars() > 0))
        .join(prompts.select("prompt_id", "prompt"), on="prompt_id", how="inner")
        .select(
            pl.col("response_id").alias("item_id"),
            (pl.lit("Request: ") + pl.col("prompt") + pl.lit("\nResponse: ") + pl.col("text"))
            .str.slice(0, max_chars)
            .alias("text"),
        )
        .sort("item_id")
    )


def score_responses(items: pl.DataFrame, embeddings: np.ndarray, params: ScoreParams, judge_engine,
                    critiq_engine=None, embed_fn=None) -> ScoreOutcome:
    """QuRating (+ optional CritiQ) over the items; returns QUALITY rows and a report."""
    # Series, not lists: 300,000 Python strings would be held through the whole stage
    result = score_items(judge_engine, items["item_id"], items["text"], params.qurating, embeddings=embeddings)
    frames = [result.quality]
    report = {"qurating": result.summary()}
    markdown = None
    embed_seconds = 0.0
    if params.critiq.enabled and critiq_engine is not None:
        from prefcurate.tasks.critiq import (
            load_human_pairs,
            load_seed_criteria,
            mine_criteria,
            render_report,
            train_critiq_scorer,
        )

        mined = mine_criteria(critiq_engine, load_human_pairs(params.critiq.human_pairs),
                              load_seed_criteria(params.critiq.seed_criteria), params.critiq.params)
        markdown = render_report(mined, params.critiq.params)
        report["critiq"] = {
            "criteria": [c.name for c in mined.criteria],
            "heldout_accuracy": mined.heldout_accuracy,
        }
        pairs = _unlabelled_pairs(items, params.critiq.scorer_pairs, params.qurating.seed)
        if pairs.height >= 2 and mined.criteria:
            try:
                started = time.perf_counter()
                scorer, _, scorer_report = train_critiq_scorer(
                    critiq_engine, mined.criteria, pairs, params.critiq.params, embed_fn=embed_fn,
                    seed=params.qurating.seed,
                )
                embed_seconds += time.perf_counter() - started
                scores = np.asarray(scorer.score(embeddings), dtype=np.float64).ravel()
                # QUALITY rows through the one builder (qurating._quality_frame), as critiq_quality
                frames.append(_quality_frame(items["item_id"], params.qurating.item_kind, "critiq", "critiq",
                                             scores))
                report["critiq"]["scorer"] = getattr(scorer_report, "__dict__", str(scorer_report))
            except ValueError as error:  # too few decided pairs with a weak model: say so
                report["critiq"]["scorer"] = f"not trained: {error}"
    quality = pl.concat(frames, how="vertical_relaxed")
    return ScoreOutcome(quality, report, markdown, embed_seconds)


def _unlabelled_pairs(items: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    count = items.height
    if count < 2:
        return pl.DataFrame({"text_a": [], "text_b": []}, schema={"text_a": pl.String, "text_b": pl.String})
    first = rng.integers(0, count, n)
    second = (first + rng.integers(1, count, n)) % count
    texts = items["text"]
    return pl.DataFrame({"text_a": texts.gather(first), "text_b": texts.gather(second)})


def pair_quality(pairs: pl.DataFrame, quality: pl.DataFrame) -> pl.DataFrame:
    """One quality number per pair: the mean z-score of its chosen response over criteria.

    The scorer's scores cover every response, so they are preferred; Bradley-Terry scores
    (judged sample only) fill in when no scorer ran. Pairs with no score get 0 (average).
    """
    if quality.height == 0:
        return pairs.select("pair_id").with_columns(pl.lit(0.0).alias("quality"))
    preferred = (
        quality.with_columns(
            pl.col("method").replace_strict({"scorer": 0, "critiq": 1, "qurating_bt": 2}, default=3).alias("_rank")
        )
        .sort("_rank")
        .group_by("item_id", "criterion", maintain_order=True)
        .first()
        .group_by("item_id")
        .agg(pl.col("z_score").mean().alias("quality"))
    )
    return (
        pairs.select("pair_id", "chosen_id")
        .join(preferred, left_on="chosen_id", right_on="item_id", how="left")
        .select("pair_id", pl.col("quality").fill_null(0.0))
    )
