"""QuRating-style quality scoring: pairwise criterion judgments -> Bradley-Terry ratings.

Method (Wettig et al., QuRating; public code princeton-nlp/QuRating), as we implement it:

1. A sample of items (``sample_size``) is drawn; each is cut to an excerpt of at most
   ``excerpt_chars`` characters, a random window when the text is longer (QuRating takes a
   random 256-512 token window). We count characters, not tokens, so the task needs no
   tokenizer; 1,200 characters is about 300 tokens, which keeps two excerpts plus the
   template inside the embedded model's 1,024-token context.
2. Comparisons: each item meets about ``pairs_per_item`` others (see
   :func:`sample_comparisons`). QuRating compares all pairs inside small groups; we use
   random cycles instead because they keep the comparison graph connected, which
   Bradley-Terry needs for one common scale.
3. Each pair is judged per criterion with QuRating's own prompt wording (the versioned
   template ``prefcurate/templates/qurating_v1.txt``, or the user's ``template``), in both
   orders, in one ``score_choices`` batch (the both-orders primitive of
   ``tasks/judge_modes.py``). The judge's next-token probability of "B" replaces their 20
   sampled one-token votes (votes_B / valid): the same quantity in one decode step.
   ``p_j_beats_i = (p_ab + 1 - p_ba) / 2`` and is valid only when both orders are.
4. Ratings: per criterion, Bradley-Terry with soft outcomes fitted only on confident
   judgments ``|p - 0.5| >= confidence`` (QuRating trains with confidence threshold 0.5 in
   their ``|p - 0.5| >= threshold / 2`` convention, i.e. 0.25 here).
5. Scale past the sample: a small scorer over item embeddings is trained with the same
   pairwise loss on the judged pairs (``tasks/scorer.py``), reports held-out pairwise
   accuracy against the judge, and scores every item.

Scores go to the QUALITY table: ``method="qurating_bt"`` for the judged sample's BT
strengths, ``method="scorer"`` for every item; ``z_score`` is over the rows of one
(criterion, method).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import polars as pl
from prefcurate.schemas.ids import content_id
from prefcurate.tasks.bradley_terry import confident_mask, fit_bradley_terry
from prefcurate.tasks.judge_modes import ask_both_orders
from prefcurate.tasks.sampling import zscore
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from prefcurate.inference.base import Engine
from prefcurate.templates import Template, load_template

ItemKind = Literal["prompt", "response", "pair"]

JUDGE_OPTIONS = ("A", "B")


def _stripped(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be blank")
    return value


#: a criterion's name or description: stripped, and not blank (QuRating's and CritiQ's)
NonBlank = Annotated[str, AfterValidator(_stripped)]
#: the packaged template holding QuRating's pairwise prompt (prefcurate/templates/)
DEFAULT_TEMPLATE = "qurating_v1"


class QuRatingCriterion(BaseModel):
    """One quality criterion. ``description`` completes the sentence
    "Compare two text excerpts and choose the text which ..." (QuRating's template), e.g.
    "has more educational value, e.g., ...". Write user-defined criteria the same way."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: NonBlank = Field(min_length=1, description="short identifier, stored as QUALITY.criterion")
    description: NonBlank = Field(min_length=1, description='completes "choose the text which ..."')


#: QuRating's four criteria in the wording of their released pairwise templates
QURATING_CRITERIA: tuple[QuRatingCriterion, ...] = (
    QuRatingCriterion(
        name="writing_style",
        description="has a more polished and beautiful writing style.",
    ),
    QuRatingCriterion(
        name="required_expertise",
        description=(
            "requires greater expertise and prerequisite knowledge to understand it."
        ),
    ),
    QuRatingCriterion(
        name="facts_and_trivia",
        description=(
            "contains more facts and trivia. Prefer specific facts and obscure trivia over "
            "more common knowledge."
        ),
    ),
    QuRatingCriterion(
        name="educational_value",
        description=(
            "has more educational value, e.g., it includes clear explanations, step-by-step "
            "reasoning, or questions and answers."
        ),
    ),
)


class QuRatingParams(BaseModel):
    """Parameters of QuRating-style scoring (the ``score`` stage)."""

    model_config = ConfigDict(extra="forbid")

    criteria: list[QuRatingCriterion] = Field(
        default_factory=lambda: list(QURATING_CRITERIA),
        description="criteria to judge; defaults to QuRating's four",
    )
    extra_criteria: list[QuRatingCriterion] = Field(
        default_factory=list,
        description="user-defined criteria added to ``criteria`` (name + description)",
    )
    item_kind: ItemKind = Field("response", description="what the scores attach to")
    sample_size: int = Field(512, ge=2, description="items judged pairwise (the rest are scored by the scorer)")
    pairs_per_item: int = Field(4, ge=1, description="comparisons each judged item takes part in (about)")
    confidence: float = Field(
        0.25, ge=0.0, lt=0.5, description="BT and scorer use judgments with |p - 0.5| >= this"
    )
    excerpt_chars: int = Field(1200, ge=50, description="longest excerpt shown to the judge, in characters")
    bt_l2: float | None = Field(
        None, gt=0.0, description="L2 of the Bradley-Terry fit; None: fit_bradley_terry's default"
    )
    train_scorer: bool = Field(True, description="train the embedding scorer that scores every item")
    scorer: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides of tasks/scorer.py ScorerParams (kept a dict so that loading a "
        "config does not import torch); its confidence is this section's ``confidence``",
    )
    template: str = Field(
        DEFAULT_TEMPLATE, description="judge prompt: a packaged template name or a .txt file of kind "
        "qurating ({description}, {text_a}, {text_b}); its text enters the score stage's key"
    )
    seed: int = 0

    @model_validator(mode="after")
    def _unique_names(self) -> QuRatingParams:
        names = [c.name for c in self.all_criteria]
        if not names:
            raise ValueError("at least one criterion is needed")
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"criterion names must be unique: {duplicated}")
        judge_template(self.template)  # a bad template fails when the config loads
        return self

    @property
    def all_criteria(self) -> list[QuRatingCriterion]:
        return list(self.criteria) + list(self.extra_criteria)


# --------------------------------------------------------------------------- prompts


def judge_template(name: str = DEFAULT_TEMPLATE) -> Template:
    """The judge prompt (kind ``qurating``: ``{description}``, ``{text_a}``, ``{text_b}``),
    read from its file now."""
    return load_template(name, "qurating")


def prompt_hash(template: str = DEFAULT_TEMPLATE) -> str:
    """Hash of the judge prompt's text, which enters the score stage's unit key: an edited
    prompt scores again (the file is read when called, not at import)."""
    return content_id("qurating-prompt", judge_template(template).text)


def build_judge_prompt(
    criterion: QuRatingCriterion, text_a: str, text_b: str, template: str = DEFAULT_TEMPLATE
) -> str:
    """QuRating's pairwise template for ``criterion``, completion-style.

    Their template ends "Respond only with a single word." and is sent as a chat turn; we
    append "Answer:" so that a base model's next token is the verdict, which
    ``score_choices`` reads as P("A"), P("B") (bare tokens; on the embedded model this
    ending was the least position-biased of those measured, see ``tasks/critiq.py``).
    """
    return judge_template(template).render(
        description=criterion.description, text_a=text_a.strip(), text_b=text_b.strip()
    )


# --------------------------------------------------------------------------- sampling


def sample_items(n_items: int, sample_size: int, seed: int) -> np.ndarray:
    """Indices (sorted) of the items judged pairwise: all when there are few enough."""
    if n_items <= sample_size:
        return np.arange(n_items, dtype=np.int64)
    rng = np.random.default_rng([seed, 1])
    return np.sort(rng.choice(n_items, size=sample_size, replace=False)).astype(np.int64)


def make_excerpts(texts: Sequence[str], max_chars: int, seed: int) -> list[str]:
    """A window of at most ``max_chars`` characters from each text.

    Longer texts get a random window (QuRating samples a random token window), snapped to
    word boundaries. The window start depends on the seed and the text itself, not on the
    text's position, so re-runs and re-orderings give the same excerpt.
    """
    out: list[str] = []
    for text in texts:
        text = text or ""
        if len(text) <= max_chars:
            out.append(text)
            continue
        rng = np.random.default_rng([seed, zlib.crc32(text.encode("utf-8"))])
        start = int(rng.integers(0, len(text) - max_chars + 1))
        window = text[start : start + max_chars]
        if start > 0 and " " in window[:40]:
            window = window[window.index(" ") + 1 :]
        if start + max_chars < len(text) and " " in window[-40:]:
            window = window[: window.rindex(" ")]
        out.append(window)
    return out


def sample_comparisons(
    n_items: int, pairs_per_item: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j), i != j, each unordered pair at most once, each item in about
    ``pairs_per_item`` of them.

    Built from ``ceil(pairs_per_item / 2)`` random Hamiltonian cycles over the items (each
    cycle gives every item two comparisons and, on its own, a connected graph, so
    Bradley-Terry strengths share one scale). Duplicate pairs across cycles are dropped;
    which item is ``i`` is random.
    """
    if n_items < 2:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    rng = np.random.default_rng([seed, 2])
    rounds = max(1, -(-pairs_per_item // 2))
    firsts, seconds = [], []
    for _ in range(rounds):
        order = rng.permutation(n_items)
        firsts.append(order)
        seconds.append(np.roll(order, -1))
    a = np.concatenate(firsts)
    b = np.concatenate(seconds)
    low, high = np.minimum(a, b), np.maximum(a, b)
    keys = np.unique(low * n_items + high)
    low, high = keys // n_items, keys % n_items
    swap = rng.random(len(keys)) < 0.5
    item_i = np.where(swap, high, low).astype(np.int64)
    item_j = np.where(swap, low, high).astype(np.int64)
    shuffle = rng.permutation(len(keys))
    return item_i[shuffle], item_j[shuffle]


# --------------------------------------------------------------------------- judging


def _judge_many(
    engine: Engine,
    texts: Sequence[str],
    item_i: np.ndarray,
    item_j: np.ndarray,
    criteria: Sequence[QuRatingCriterion],
    template: str = DEFAULT_TEMPLATE,
) -> pl.DataFrame:
    """All criteria x pairs x both orders in one ``score_choices`` batch (the both-orders
    primitive, ``tasks/judge_modes.py``: a batch in which every request failed raises)."""
    item_i = np.asarray(item_i, dtype=np.int64)
    item_j = np.asarray(item_j, dtype=np.int64)
    n_pairs = len(item_i)
    shown = pl.Series([(t or "").strip() for t in texts], dtype=pl.String)
    pairs = pl.DataFrame({"i": item_i, "j": item_j}, schema={"i": pl.Int64, "j": pl.Int64}).with_columns(
        text_a=shown.gather(item_i) if n_pairs else pl.Series([], dtype=pl.String),
        text_b=shown.gather(item_j) if n_pairs else pl.Series([], dtype=pl.String),
    )
    by_criterion = pl.DataFrame(
        {"criterion": [c.name for c in criteria], "description": [c.description for c in criteria]},
        schema={"criterion": pl.String, "description": pl.String},
    ).join(pairs, how="cross")
    # forward: i shown as A, j as B; backward: j as A, i as B. P("B") = j preferred (forward)
    asked = ask_both_orders(
        engine, judge_template(template), by_criterion, "text_a", "text_b", JUDGE_OPTIONS,
        batch_size=None, all_failed="raise",
    )
    p_ab, p_ba = asked.ab[:, 1], asked.ba[:, 1]
    p_j = (p_ab + 1.0 - p_ba) / 2.0
    valid = np.isfinite(p_j)
    return pl.DataFrame(
        {
            "criterion": by_criterion["criterion"],
            "i": by_criterion["i"],
            "j": by_criterion["j"],
            "p_ab": p_ab,
            "p_ba": p_ba,
            "p_j_beats_i": np.where(valid, p_j, np.nan),
            "valid": valid,
        },
        schema={
            "criterion": pl.String,
            "i": pl.Int64,
            "j": pl.Int64,
            "p_ab": pl.Float64,
            "p_ba": pl.Float64,
            "p_j_beats_i": pl.Float64,
            "valid": pl.Boolean,
        },
    ).with_columns(pl.col("p_ab", "p_ba", "p_j_beats_i").fill_nan(None))


def judge_criterion_pairs(
    engine: Engine,
    texts: Sequence[str],
    item_i: Sequence[int] | np.ndarray,
    item_j: Sequence[int] | np.ndarray,
    criterion: QuRatingCriterion,
    template: str = DEFAULT_TEMPLATE,
) -> pl.DataFrame:
    """Judge each pair (texts[i], texts[j]) on ``criterion`` in both orders.

    Columns: ``criterion``, ``i``, ``j``; ``p_ab`` = P("B") with i shown as A and j as B
    (j preferred); ``p_ba`` = P("B") with j shown as A and i as B (i preferred);
    ``p_j_beats_i = (p_ab + 1 - p_ba) / 2``; ``valid`` false (and p null) when either order
    failed. ``texts`` are shown as given: cut them with :func:`make_excerpts` first.
    """
    return _judge_many(engine, texts, np.asarray(item_i), np.asarray(item_j), [criterion], template)


def judge_all_criteria(
    engine: Engine,
    texts: Sequence[str],
    item_i: Sequence[int] | np.ndarray,
    item_j: Sequence[int] | np.ndarray,
    criteria: Sequence[QuRatingCriterion],
    template: str = DEFAULT_TEMPLATE,
) -> pl.DataFrame:
    """:func:`judge_criterion_pairs` for several criteria at once, in one batch (a larger
    batch keeps a server pool busy and lets prefix caching share the template)."""
    return _judge_many(engine, texts, np.asarray(item_i), np.asarray(item_j), list(criteria), template)


# --------------------------------------------------------------------------- ratings


def fit_ratings(
    judgments: pl.DataFrame,
    item_ids: Sequence[str],
    item_kind: ItemKind,
    confidence: float = 0.25,
    l2: float | None = None,
) -> pl.DataFrame:
    """Per-criterion Bradley-Terry strengths of the judged items, as QUALITY rows.

    ``judgments`` has the columns of :func:`judge_criterion_pairs` (``i``/``j`` index
    ``item_ids``). Only valid, confident judgments enter the fit, as soft outcomes. Items
    with no confident comparison get no row: a strength fitted from the prior alone would
    read as "average", which was never observed. ``method = "qurating_bt"``; ``z_score``
    over the items of one criterion.
    """
    item_ids = list(item_ids)
    frames = []
    for (criterion,), rows in judgments.filter(pl.col("valid")).group_by(
        "criterion", maintain_order=True
    ):
        i = rows["i"].to_numpy().astype(np.int64)
        j = rows["j"].to_numpy().astype(np.int64)
        p = rows["p_j_beats_i"].to_numpy().astype(np.float64)
        keep = np.asarray(confident_mask(p, confidence), dtype=bool)
        if not keep.any():
            continue
        i, j, p = i[keep], j[keep], p[keep]
        kwargs = {} if l2 is None else {"l2": l2}
        strengths = np.asarray(fit_bradley_terry(i, j, p, len(item_ids), **kwargs), dtype=np.float64)
        seen = np.unique(np.concatenate([i, j]))
        scores = strengths[seen]
        frames.append(
            _quality_frame([item_ids[k] for k in seen], item_kind, criterion, "qurating_bt", scores)
        )
    return pl.concat(frames) if frames else empty_quality_frame()


def _quality_frame(
    item_ids: Sequence[str], item_kind: str, criterion: str, method: str, scores: np.ndarray
) -> pl.DataFrame:
    scores = np.asarray(scores, dtype=np.float64)
    z = np.asarray(zscore(scores), dtype=np.float64) if len(scores) else scores
    # a polars Series of ids stays one (no Python string per item: a scorer's frame covers every response)
    ids = item_ids.cast(pl.String) if isinstance(item_ids, pl.Series) else pl.Series(list(item_ids), dtype=pl.String)
    return (
        pl.DataFrame({"item_id": ids, "score": scores, "z_score": z})
        .with_columns(
            item_kind=pl.lit(item_kind, pl.String),
            criterion=pl.lit(criterion, pl.String),
            method=pl.lit(method, pl.String),
            z_score=pl.col("z_score").fill_nan(None),
        )
        .select(list(QUALITY_COLUMNS))
    )


#: the QUALITY table's data columns (the store adds provenance)
QUALITY_COLUMNS = {
    "item_id": pl.String,
    "item_kind": pl.String,
    "criterion": pl.String,
    "method": pl.String,
    "score": pl.Float64,
    "z_score": pl.Float64,
}


def _gathered(values: Sequence[str] | pl.Series, positions) -> list[str]:
    """``values`` at ``positions`` as a list (a Series is gathered, not turned into a list whole)."""
    if isinstance(values, pl.Series):
        return values.gather(np.asarray(positions, dtype=np.int64)).to_list()
    return [values[k] for k in positions]


def empty_quality_frame() -> pl.DataFrame:
    return pl.DataFrame(schema=QUALITY_COLUMNS)


# --------------------------------------------------------------------------- items


def item_texts(
    item_kind: ItemKind,
    prompts: pl.DataFrame,
    responses: pl.DataFrame | None = None,
    pairs: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """The text judged for each item, as ``(item_id, text)``, from the stage tables.

    - ``prompt``: the prompt (``prompt_id``).
    - ``response``: the prompt, a blank line, the response (``response_id``): criteria such
      as educational value read differently without the question. Responses without text
      (generation errors) are left out.
    - ``pair``: the prompt and the chosen response (``pair_id``): a preference pair is worth
      as much as its prompt and the answer it teaches.
    """
    prompt_text = prompts.select("prompt_id", pl.col("prompt").alias("_prompt"))
    if item_kind == "prompt":
        return prompts.select(pl.col("prompt_id").alias("item_id"), pl.col("prompt").alias("text"))
    if responses is None:
        raise ValueError(f"item_kind={item_kind!r} needs the responses table")
    answered = responses.filter(pl.col("text").is_not_null() & (pl.col("text").str.strip_chars() != ""))
    if item_kind == "response":
        joined = answered.join(prompt_text, on="prompt_id", how="inner")
        return joined.select(
            pl.col("response_id").alias("item_id"),
            pl.concat_str([pl.col("_prompt"), pl.col("text")], separator="\n\n").alias("text"),
        )
    if pairs is None:
        raise ValueError("item_kind='pair' needs the pairs table")
    chosen = answered.select(pl.col("response_id").alias("chosen_id"), pl.col("text").alias("_chosen"))
    joined = pairs.join(prompt_text, on="prompt_id", how="inner").join(chosen, on="chosen_id", how="inner")
    return joined.select(
        pl.col("pair_id").alias("item_id"),
        pl.concat_str([pl.col("_prompt"), pl.col("_chosen")], separator="\n\n").alias("text"),
    )


# --------------------------------------------------------------------------- end to end


@dataclass
class QuRatingModels:
    """What the judged sample taught: its Bradley-Terry ratings and a scorer per criterion.

    ``judgments``: every judged pair (indices into the sample); ``ratings``: QUALITY rows
    (``qurating_bt``) of the sample's items; ``scorers``: by criterion, each scores any item
    by its embedding (``scorer.score(vectors)``), so the items can be scored in chunks;
    ``scorer_reports``: the scorer's report per criterion (held-out pairwise accuracy
    against the judge, ...) or why none was trained.
    """

    judgments: pl.DataFrame
    ratings: pl.DataFrame
    scorers: dict[str, Any] = field(default_factory=dict)
    scorer_reports: dict[str, dict] = field(default_factory=dict)


@dataclass
class QuRatingResult:
    """What :func:`score_items` produced.

    ``judgments``: every judged pair (indices into ``sample``); ``quality``: QUALITY rows
    (``qurating_bt`` for the sample, ``scorer`` for every item); ``scorer_reports``: the
    scorer's report per criterion (held-out pairwise accuracy against the judge, ...).
    """

    sample: np.ndarray
    judgments: pl.DataFrame
    quality: pl.DataFrame
    scorer_reports: dict[str, dict] = field(default_factory=dict)

    def summary(self) -> dict:
        return qurating_summary(len(self.sample), self.judgments, self.scorer_reports)


def qurating_summary(sampled_items: int, judgments: pl.DataFrame, scorer_reports: dict) -> dict:
    """The stage report's QuRating part: how much was judged, how much of it was valid, the scorers."""
    return {
        "sampled_items": int(sampled_items),
        "judgments": int(judgments.height),
        "valid_share": float(judgments["valid"].mean()) if judgments.height else 0.0,
        "scorer": scorer_reports,
    }


def train_quality_models(
    engine: Engine,
    sample_ids: Sequence[str],
    sample_texts: Sequence[str],
    params: QuRatingParams,
    sample_embeddings: np.ndarray | None = None,
) -> QuRatingModels:
    """Judge the sample (the items :func:`sample_items` picked) pairwise on every criterion,
    fit its Bradley-Terry ratings and, given the sample's embeddings, a scorer per criterion.

    A scorer sees every valid judgment of its criterion: it trains on the confident ones
    (``params.confidence``) and reports held-out pairwise accuracy against the judge on a
    held-out share of pairs.
    """
    if len(sample_ids) != len(sample_texts):
        raise ValueError("sample_ids and sample_texts differ in length")
    scorer_params = None
    if params.train_scorer and sample_embeddings is not None:
        from prefcurate.tasks.scorer import ScorerParams

        # validated before any judging, so a bad override fails fast
        scorer_params = ScorerParams(**{**params.scorer, "confidence": params.confidence})
        sample_embeddings = np.asarray(sample_embeddings, dtype=np.float32)
        if sample_embeddings.ndim != 2 or sample_embeddings.shape[0] != len(sample_ids):
            raise ValueError("embeddings must be [n_items, dim], one row per item")
    criteria = params.all_criteria
    excerpts = make_excerpts(list(sample_texts), params.excerpt_chars, params.seed)
    item_i, item_j = sample_comparisons(len(sample_ids), params.pairs_per_item, params.seed)
    judgments = judge_all_criteria(engine, excerpts, item_i, item_j, criteria, params.template)
    ratings = fit_ratings(judgments, list(sample_ids), params.item_kind, params.confidence, params.bt_l2)
    models = QuRatingModels(judgments, ratings)
    if scorer_params is None:
        return models
    from prefcurate.tasks.scorer import train_pairwise_scorer

    for criterion in criteria:
        rows = judgments.filter(pl.col("valid") & (pl.col("criterion") == criterion.name))
        p = rows["p_j_beats_i"].to_numpy().astype(np.float64)
        if not np.asarray(confident_mask(p, params.confidence)).any():
            models.scorer_reports[criterion.name] = {"skipped": "no confident judgment to train on"}
            continue
        try:
            scorer, report = train_pairwise_scorer(
                sample_embeddings, rows["i"].to_numpy(), rows["j"].to_numpy(), p, scorer_params, seed=params.seed
            )
        except ValueError as error:  # e.g. every confident pair fell in the held-out share
            models.scorer_reports[criterion.name] = {"skipped": str(error)}
            continue
        models.scorer_reports[criterion.name] = report.model_dump()
        models.scorers[criterion.name] = scorer
    return models


def score_items(
    engine: Engine,
    item_ids: Sequence[str] | pl.Series,
    texts: Sequence[str] | pl.Series,
    params: QuRatingParams,
    embeddings: np.ndarray | None = None,
) -> QuRatingResult:
    """The whole QuRating step over one set of items of kind ``params.item_kind``, held at once.

    ``embeddings`` ([n_items, d], aligned with ``item_ids``) enable the scorer; without
    them only the judged sample gets (BT) scores. The score stage does the same in chunks
    (:func:`train_quality_models` on the sample, then each scorer over each chunk).
    """
    if len(item_ids) != len(texts):
        raise ValueError("item_ids and texts differ in length")
    if embeddings is not None:
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(item_ids):
            raise ValueError("embeddings must be [n_items, dim], one row per item")
    sample = sample_items(len(texts), params.sample_size, params.seed)
    models = train_quality_models(engine, _gathered(item_ids, sample), _gathered(texts, sample), params,
                                  None if embeddings is None else embeddings[sample])
    frames = [models.ratings] + [
        _quality_frame(item_ids, params.item_kind, criterion, "scorer", scorer.score(embeddings))
        for criterion, scorer in models.scorers.items()
    ]
    return QuRatingResult(sample=sample, judgments=models.judgments, quality=pl.concat(frames),
                          scorer_reports=models.scorer_reports)
