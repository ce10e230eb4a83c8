"""Every table of a prefcurate dataset, as Arrow schemas.

One place defines the columns; the store derives its DDL and views from here, the Great
Expectations suites read the same definitions, and stages build their frames against them.

Conventions
- ``*_id`` columns are content-addressed: a hash of the inputs that define the row (see
  :func:`prefcurate.schemas.ids.content_id`), so re-runs are idempotent.
- Every data row carries provenance: ``run_id`` (the run that wrote it), ``stage`` and
  ``code_version``; model-backed rows also name the model and the sampling or template.
- Pairwise probabilities are always "probability that ``response_a`` is better", with
  ``response_a < response_b`` in id order (a canonical, order-free key for the pair).
"""

from __future__ import annotations

import pyarrow as pa

EMBEDDING_DIM = 384

PROVENANCE = [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("code_version", pa.string(), nullable=False),
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
]


def _schema(*fields: pa.Field, provenance: bool = True) -> pa.Schema:
    return pa.schema(list(fields) + (PROVENANCE if provenance else []))


PROMPTS = _schema(
    pa.field("prompt_id", pa.string(), nullable=False),  # hash(normalised system, prompt)
    pa.field("prompt", pa.string(), nullable=False),  # NFC + whitespace-normalised
    pa.field("system_prompt", pa.string()),
    pa.field("source_id", pa.string()),  # the user's id field, if mapped
    pa.field("source_file", pa.string(), nullable=False),
    pa.field("source_record", pa.int64(), nullable=False),  # 1-based line / row number
    pa.field("category", pa.string()),
    pa.field("metadata", pa.string()),  # JSON object as text
    pa.field("char_len", pa.int32(), nullable=False),
)

RESPONSES = _schema(
    pa.field("response_id", pa.string(), nullable=False),  # hash(prompt, generator cfg, i)
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("generator", pa.string(), nullable=False),  # name in the config
    pa.field("model", pa.string(), nullable=False),
    pa.field("sampling", pa.string(), nullable=False),  # JSON of the sampling parameters
    pa.field("sample_index", pa.int32(), nullable=False),
    pa.field("text", pa.string()),
    pa.field("finish_reason", pa.string(), nullable=False),  # stop | length | error
    pa.field("truncated", pa.bool_(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("tokens_in", pa.int32()),
    pa.field("tokens_out", pa.int32()),
    pa.field("latency_s", pa.float64()),
)

JUDGMENTS = _schema(
    pa.field("judgment_id", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("response_a", pa.string(), nullable=False),  # response_a < response_b
    pa.field("response_b", pa.string(), nullable=False),
    pa.field("judge", pa.string(), nullable=False),  # judge name in the config
    pa.field("judge_model", pa.string(), nullable=False),
    pa.field("criterion", pa.string(), nullable=False),
    pa.field("template", pa.string(), nullable=False),
    pa.field("template_hash", pa.string(), nullable=False),
    pa.field("mode", pa.string(), nullable=False),  # probability | rationale
    # raw P("A") as the judge answered in each order: (a shown first), (b shown first)
    pa.field("p_first_ab", pa.float64()),
    pa.field("p_first_ba", pa.float64()),
    # P(response_a better), position-balanced: (p_first_ab + 1 - p_first_ba) / 2
    pa.field("p_a", pa.float64()),
    # Balanced Position Diversity Entropy (FairEval): entropy of the win/tie/lose outcomes
    # over every verdict sample of both orders (2 in probability mode, 2k with rationales);
    # 0 = all samples agree, ln 3 = maximally split. High values are for a human to review.
    pa.field("bpde", pa.float64()),
    pa.field("valid", pa.bool_(), nullable=False),
    pa.field("error", pa.string()),
    # imported judgments (tasks/import_judgments.py): the file and 1-based record they came from
    pa.field("source_file", pa.string()),
    pa.field("source_record", pa.int64()),
)

RATINGS = _schema(
    pa.field("rating_id", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("response_id", pa.string(), nullable=False),
    pa.field("judge", pa.string(), nullable=False),
    pa.field("judge_model", pa.string(), nullable=False),
    pa.field("aspect", pa.string(), nullable=False),
    pa.field("template_hash", pa.string(), nullable=False),
    pa.field("probs", pa.list_(pa.float64())),  # P("1") .. P("5"), normalised
    pa.field("expected_score", pa.float64()),  # sum s * p(s), in [1, 5]
    pa.field("valid", pa.bool_(), nullable=False),
    pa.field("error", pa.string()),
)

JURY = _schema(
    # the jury's aggregate per (prompt, response pair, criterion)
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("response_a", pa.string(), nullable=False),
    pa.field("response_b", pa.string(), nullable=False),
    pa.field("criterion", pa.string(), nullable=False),
    pa.field("method", pa.string(), nullable=False),  # mean | majority | weighted
    pa.field("p_a", pa.float64()),
    pa.field("n_judges", pa.int32(), nullable=False),
    pa.field("agreement", pa.float64()),  # share of judges on the majority side
)

JUDGE_CALIBRATION = _schema(
    pa.field("judge", pa.string(), nullable=False),
    pa.field("judge_model", pa.string(), nullable=False),
    pa.field("template_hash", pa.string(), nullable=False),
    pa.field("gold_pairs", pa.int32(), nullable=False),
    pa.field("accuracy", pa.float64()),
    pa.field("position_flip_rate", pa.float64()),
    pa.field("first_position_pref", pa.float64()),  # mean P("A") over both orders
)

JUDGE_ACCURACY = _schema(
    # each judge's accuracy as the filter saw it (tasks/calibration.py, tasks/jury.py)
    pa.field("judge", pa.string(), nullable=False),
    pa.field("jury_method", pa.string(), nullable=False),  # the aggregation the run used
    pa.field("labelled", pa.int32(), nullable=False),  # gold + human-labelled A/B pairs
    pa.field("correct", pa.int32(), nullable=False),
    pa.field("accuracy", pa.float64()),  # correct / labelled
    pa.field("accuracy_low", pa.float64()),  # Wilson interval (filter.calibration.confidence)
    pa.field("accuracy_high", pa.float64()),
    pa.field("flip_rate", pa.float64()),  # position flip rate on the gold pairs
    pa.field("em_accuracy", pa.float64()),  # one-coin Dawid-Skene estimate, no labels used
    pa.field("votes", pa.int64()),  # verdicts that took a side (EM's data)
    pa.field("weight", pa.float64()),  # log-odds weight in the jury (calibrated/unsupervised)
    pa.field("gate", pa.string(), nullable=False),  # pass | warned | excluded | uncalibrated
    pa.field("gate_reason", pa.string()),
)

HUMAN_LABELS = _schema(
    # a person's verdict on a dataset pair (prefcurate review import); the newest wins
    pa.field("label_id", pa.string(), nullable=False),  # hash(pair, annotator, winner, file)
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("response_a", pa.string(), nullable=False),  # response_a < response_b
    pa.field("response_b", pa.string(), nullable=False),
    pa.field("winner", pa.string(), nullable=False),  # A (= response_a) | B | tie
    pa.field("annotator", pa.string()),
    pa.field("source_file", pa.string(), nullable=False),
    pa.field("source_record", pa.int64(), nullable=False),
)

PAIRS = _schema(
    pa.field("pair_id", pa.string(), nullable=False),  # hash(prompt, chosen, rejected)
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("chosen_id", pa.string(), nullable=False),
    pa.field("rejected_id", pa.string(), nullable=False),
    pa.field("strategy", pa.string(), nullable=False),  # best_vs_worst | ...
    pa.field("p_chosen", pa.float64(), nullable=False),  # jury P(chosen better)
    pa.field("margin", pa.float64(), nullable=False),  # BT strength difference
    pa.field("agreement", pa.float64()),
    pa.field("chosen_score", pa.float64()),  # rubric expected score
    pa.field("rejected_score", pa.float64()),
    pa.field("chosen_generator", pa.string()),
    pa.field("rejected_generator", pa.string()),
)

FILTER_DROPS = _schema(
    # one row per (candidate pair, failed check); a pair can fail several
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("response_a", pa.string(), nullable=False),
    pa.field("response_b", pa.string()),
    pa.field("judge", pa.string()),  # null when the check is jury-level
    pa.field("reason", pa.string(), nullable=False),  # reason code, see tasks/filter.py
    pa.field("value", pa.float64()),
    pa.field("threshold", pa.float64()),
    pa.field("detail", pa.string()),
)

QUALITY = _schema(
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("item_kind", pa.string(), nullable=False),  # prompt | response | pair
    pa.field("criterion", pa.string(), nullable=False),
    pa.field("method", pa.string(), nullable=False),  # qurating_bt | scorer | critiq
    pa.field("score", pa.float64(), nullable=False),
    pa.field("z_score", pa.float64()),
)

EMBEDDINGS = _schema(
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("item_kind", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("vector", pa.list_(pa.float32(), EMBEDDING_DIM), nullable=False),
)

SELECTIONS = _schema(
    pa.field("pair_id", pa.string(), nullable=False),
    pa.field("selected", pa.bool_(), nullable=False),
    pa.field("method", pa.string(), nullable=False),
    pa.field("rank", pa.int32()),  # order of selection, null when not selected
    pa.field("cluster", pa.int32()),
    pa.field("quality", pa.float64()),
    pa.field("duplicate_of", pa.string()),  # representative pair when dropped as dup
    pa.field("reason", pa.string()),  # selected | near_duplicate | exact_duplicate | budget
)

REQUEST_METRICS = _schema(
    pa.field("pool", pa.string(), nullable=False),
    pa.field("replica", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),  # generate | score_choices
    pa.field("ok", pa.bool_(), nullable=False),
    pa.field("attempts", pa.int32(), nullable=False),
    pa.field("tokens_in", pa.int32()),
    pa.field("tokens_out", pa.int32()),
    pa.field("latency_s", pa.float64()),
    pa.field("error", pa.string()),
    # USD from the pool's price table and the request's billed usage; null without prices
    pa.field("cost_usd", pa.float64()),
    # how a verdict's probabilities were read (openai pools): top_logprobs | logit_bias | reask
    pa.field("verdict_path", pa.string()),
)

QUARANTINE = _schema(
    pa.field("source_file", pa.string()),
    pa.field("source_record", pa.int64()),  # line (JSONL) or row number
    pa.field("field", pa.string()),  # which field was bad, when known
    pa.field("reason", pa.string(), nullable=False),  # reason code
    pa.field("message", pa.string(), nullable=False),
    pa.field("raw", pa.string()),  # the row as text, so nothing is lost
)

#: sharded tables: the store writes Parquet shards for these and a view per table
TABLES: dict[str, pa.Schema] = {
    "prompts": PROMPTS,
    "responses": RESPONSES,
    "judgments": JUDGMENTS,
    "ratings": RATINGS,
    "jury": JURY,
    "judge_calibration": JUDGE_CALIBRATION,
    "judge_accuracy": JUDGE_ACCURACY,
    "human_labels": HUMAN_LABELS,
    "pairs": PAIRS,
    "filter_drops": FILTER_DROPS,
    "quality": QUALITY,
    "embeddings": EMBEDDINGS,
    "selections": SELECTIONS,
    "request_metrics": REQUEST_METRICS,
    "quarantine": QUARANTINE,
}

#: the id column that must be unique per table (None: no single key)
PRIMARY_KEYS: dict[str, str | None] = {
    "prompts": "prompt_id",
    "responses": "response_id",
    "judgments": "judgment_id",
    "ratings": "rating_id",
    "jury": None,
    "judge_calibration": None,
    "judge_accuracy": None,
    "human_labels": "label_id",
    "pairs": "pair_id",
    "filter_drops": None,
    "quality": None,
    "embeddings": None,
    "selections": None,
    "request_metrics": None,
    "quarantine": None,
}

#: catalog table (not a shard table): each stage run's reports (a filter report, a selection
#: report, ...), one row per report name and the unit (or ``finalize``) that made it; runs
#: keep only numbers in ``runs.counts``. Created on open, so an earlier dataset gains it.
STAGE_REPORTS_DDL = """
CREATE TABLE IF NOT EXISTS stage_reports (
    run_id VARCHAR NOT NULL, stage VARCHAR NOT NULL, name VARCHAR NOT NULL, source VARCHAR NOT NULL,
    report JSON, recorded_at TIMESTAMPTZ NOT NULL, PRIMARY KEY (run_id, name, source));
"""
