"""The score stage's parameters and glue: QuRating ratings, an embedding scorer, CritiQ.

Scores attach to responses by default (``qurating.item_kind``); the text judged for a
response is its prompt and the response, so "educational value" and the like are judged
in context. Every item gets a score: the judged sample from the Bradley-Terry fit
(``qurating_bt``), all items from the scorer trained on the sample's judgments (``scorer``),
and, when CritiQ is on, from the scorer trained on CritiQ-judged pairs (``critiq``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
from prefcurate.tasks.critiq import CritiQParams
from prefcurate.tasks.qurating import (
    QuRatingModels,
    QuRatingParams,
    _quality_frame,
    qurating_summary,
    train_quality_models,
)
from pydantic import BaseModel, ConfigDict, Field


class CritiQStageParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(False, description="mine criteria from human pairs and score with them")
    pool: str = Field("judges", description="pool of the manager and worker agents")
    human_pairs: str | None = Field(None, description="(id, text_a, text_b, answer) records: JSONL, JSON, CSV, "
                                     "TSV or Parquet; default bundled")
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
class QualityModels:
    """What the score stage learnt from its judged sample; every item is then scored by
    embedding, chunk by chunk (:meth:`score`), and z-scored over all items at the end
    (:meth:`quality_frames`), so no step holds every response's text or vector at once.

    ``methods``: the (criterion, method) of each column :meth:`score` returns: a QuRating
    scorer per criterion (``scorer``), then CritiQ's (``critiq``) when it was trained.
    """

    qurating: QuRatingModels
    item_kind: str
    critiq_scorer: Any = None
    report: dict = field(default_factory=dict)
    critiq_markdown: str | None = None
    embed_seconds: float = 0.0

    def _scorers(self) -> list[tuple[tuple[str, str], Any]]:
        """((criterion, method), scorer), one per column of :meth:`score`."""
        scorers = [((criterion, "scorer"), scorer) for criterion, scorer in self.qurating.scorers.items()]
        return scorers + ([(("critiq", "critiq"), self.critiq_scorer)] if self.critiq_scorer is not None else [])

    @property
    def methods(self) -> list[tuple[str, str]]:
        return [method for method, _ in self._scorers()]

    def score(self, vectors: np.ndarray) -> np.ndarray:
        """Raw scores of the items with these embeddings: [n_items, len(methods)]."""
        scorers = [scorer for _, scorer in self._scorers()]
        out = np.empty((len(vectors), len(scorers)), dtype=np.float64)
        for column, scorer in enumerate(scorers):
            out[:, column] = np.asarray(scorer.score(vectors), dtype=np.float64).ravel()
        return out

    def quality_frames(self, item_ids: pl.Series, scores: np.ndarray) -> list[pl.DataFrame]:
        """QUALITY rows: the sample's Bradley-Terry ratings, then one frame per method over
        every item (``scores`` from :meth:`score`, aligned with ``item_ids``; z-scored here,
        over all of them), each built by the one builder (``qurating._quality_frame``)."""
        return [self.qurating.ratings] + [
            _quality_frame(item_ids, self.item_kind, criterion, method, scores[:, column])
            for column, (criterion, method) in enumerate(self.methods)
        ]


def item_texts(responses: pl.DataFrame, prompts: pl.DataFrame, max_chars: int) -> pl.DataFrame:
    """(item_id, text) for responses: the prompt and the response, cut to ``max_chars``."""
    return (
        responses.filter(pl.col("text").is_not_null() & (pl.col("text").str.len_chars() > 0))
        .join(prompts.select("prompt_id", "prompt"), on="prompt_id", how="inner")
        .select(pl.col("response_id").alias("item_id"), response_item_text(max_chars))
        .sort("item_id")
    )


def response_item_text(max_chars: int) -> pl.Expr:
    """The text a response is embedded as (kind ``response``), from columns ``prompt`` and
    ``text``: one rule, so the score and select stages share each other's cached vectors."""
    return (pl.lit("Request: ") + pl.col("prompt") + pl.lit("\nResponse: ") + pl.col("text").fill_null("")) \
        .str.slice(0, max_chars).alias("text")


def unlabelled_pair_positions(count: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (first, second) of ``n`` random pairs of distinct items among ``count``:
    the unlabelled pairs CritiQ's judge labels to train its scorer."""
    if count < 2:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    first = rng.integers(0, count, n)
    second = (first + rng.integers(1, count, n)) % count
    return first, second


def fit_quality_models(sample_ids: Sequence[str], sample_texts: Sequence[str], sample_vectors: np.ndarray,
                       critiq_pairs: pl.DataFrame | None, params: ScoreParams, judge_engine,
                       critiq_engine=None, embed_fn=None) -> QualityModels:
    """QuRating on the judged sample (``qurating.sample_items`` picks it) and, when CritiQ
    is on, its criteria mined from the human pairs and a scorer trained on ``critiq_pairs``
    (text_a, text_b: the pairs at :func:`unlabelled_pair_positions`)."""
    qurating = train_quality_models(judge_engine, sample_ids, sample_texts, params.qurating,
                                    sample_embeddings=sample_vectors)
    models = QualityModels(qurating, params.qurating.item_kind,
                           report={"qurating": qurating_summary(len(sample_ids), qurating.judgments,
                                                                qurating.scorer_reports)})
    if not (params.critiq.enabled and critiq_engine is not None):
        return models
    from prefcurate.tasks.critiq import (
        load_human_pairs,
        load_seed_criteria,
        mine_criteria,
        render_report,
        train_critiq_scorer,
    )

    mined = mine_criteria(critiq_engine, load_human_pairs(params.critiq.human_pairs),
                          load_seed_criteria(params.critiq.seed_criteria), params.critiq.params)
    models.critiq_markdown = render_report(mined, params.critiq.params)
    models.report["critiq"] = {"criteria": [c.name for c in mined.criteria],
                               "heldout_accuracy": mined.heldout_accuracy}
    if critiq_pairs is not None and critiq_pairs.height >= 2 and mined.criteria:
        try:
            started = time.perf_counter()
            scorer, _, scorer_report = train_critiq_scorer(
                critiq_engine, mined.criteria, critiq_pairs, params.critiq.params, embed_fn=embed_fn)
            models.embed_seconds += time.perf_counter() - started
            models.critiq_scorer = scorer
            models.report["critiq"]["scorer"] = getattr(scorer_report, "__dict__", str(scorer_report))
        except ValueError as error:  # too few decided pairs with a weak model: say so
            models.report["critiq"]["scorer"] = f"not trained: {error}"
    return models


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
