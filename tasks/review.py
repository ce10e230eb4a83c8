"""Human review round-trip (FairEval's human-in-the-loop calibration).

``prefcurate review export --top 0.2`` writes the most uncertain judged pairs for people to
label; ``prefcurate review import FILE`` stores their labels in ``human_labels``. On the
next filter run a labelled pair takes the person's verdict instead of the jury's (A/B: that
side is chosen with p = 1; tie: the pair is dropped as ``tie``), and every labelled A/B pair
joins the calibration set: each judge's verdicts on them count towards its labelled
accuracy, the gate and the calibrated jury's weights (tasks/calibration.py).

Uncertainty (the export's order): FairEval's Balanced Position Diversity Entropy, the mean
of the judgments' ``bpde`` over the pair's judges and criteria (entropy of the win/tie/lose
outcomes over both orders), highest first; a pair that no judge asked in both orders
(position-free judges, single-order imports) has none, and the mean binary entropy of its
judges' ``p_a`` stands in (the same 0..ln 2 scale). Ties, common since two verdict samples
give few distinct values, are broken by the entropy of the jury's ``p_a`` (the newest jury
table), then by the pair key. Pairs a person already labelled are not exported again. FairEval
sends the top 20% to a human and reports ChatGPT's agreement rising from 58.8% to 71.3%.

Files are JSONL (default) or CSV by suffix; the columns are the gold file's (``prompt``,
``response_a``, ``response_b`` texts and ``winner``) plus the ids the import needs
(``prompt_id``, ``response_a_id``, ``response_b_id``) and an optional ``annotator``, so an
exported-and-labelled file also works as ``annotate.gold_path``.
"""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
from prefcurate.schemas.ids import Column, content_id, content_ids, file_sha256
from prefcurate.tasks.calibration import WINNERS, _quarantine_rows, read_labelled_file
from prefcurate.tasks.jury import PAIR_KEY, binary_entropy

EXPORT_COLUMNS = ["prompt_id", "response_a_id", "response_b_id", "prompt", "response_a", "response_b",
                  "uncertainty", "jury_p_a", "winner", "annotator"]
ID_FIELDS = ["prompt_id", "response_a_id", "response_b_id"]


def current_labels(labels: pl.DataFrame) -> pl.DataFrame:
    """One label per pair: the newest (``created_at``; else the last row)."""
    if labels.height == 0:
        return labels
    if "created_at" in labels.columns:
        labels = labels.sort("created_at")
    return labels.unique(PAIR_KEY, keep="last").sort(PAIR_KEY)


def review_candidates(
    judgments: pl.DataFrame,
    jury: pl.DataFrame,
    prompts: pl.DataFrame,
    responses: pl.DataFrame,
    top: float = 0.2,
    labelled: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """The ``top`` share (0 < top <= 1, rounded up) of the unlabelled judged pairs, most
    uncertain first, with their texts. Columns: :data:`EXPORT_COLUMNS`."""
    if not 0.0 < top <= 1.0:
        raise ValueError(f"review export: --top must be in (0, 1], got {top}")
    valid = judgments.filter(pl.col("valid"))
    # a pair no judge asked in both orders (position-free judges, single-order imports) has no
    # BPDE: its judges' verdict entropy stands in, on the same scale (0 sure .. ln 2)
    per_pair = valid.group_by(PAIR_KEY).agg(
        pl.coalesce(pl.col("bpde").cast(pl.Float64).mean(), binary_entropy(pl.col("p_a").cast(pl.Float64)).mean())
        .alias("uncertainty"))
    if jury.height:
        newest = jury.sort("created_at") if "created_at" in jury.columns else jury
        jury_p = (
            newest.unique([*PAIR_KEY, "criterion"], keep="last")
            .group_by(PAIR_KEY)
            .agg(pl.col("p_a").mean().alias("jury_p_a"))
        )
        per_pair = per_pair.join(jury_p, on=PAIR_KEY, how="left")
    else:
        per_pair = per_pair.with_columns(jury_p_a=pl.lit(None, dtype=pl.Float64))
    if labelled is not None and labelled.height:
        per_pair = per_pair.join(labelled.select(PAIR_KEY).unique(), on=PAIR_KEY, how="anti")
    count = math.ceil(top * per_pair.height)
    ranked = (
        per_pair.with_columns(_entropy=binary_entropy(pl.col("jury_p_a")).fill_null(math.log(2)))
        .sort(["uncertainty", "_entropy", *PAIR_KEY], descending=[True, True, False, False, False], nulls_last=True)
        .head(count)
    )
    texts = responses.select("response_id", "text").unique("response_id")
    return (
        ranked.join(prompts.select("prompt_id", "prompt").unique("prompt_id"), on="prompt_id", how="left")
        .join(texts.rename({"response_id": "response_a", "text": "_text_a"}), on="response_a", how="left")
        .join(texts.rename({"response_id": "response_b", "text": "_text_b"}), on="response_b", how="left")
        .select(
            "prompt_id",
            pl.col("response_a").alias("response_a_id"),
            pl.col("response_b").alias("response_b_id"),
            "prompt",
            pl.col("_text_a").alias("response_a"),
            pl.col("_text_b").alias("response_b"),
            "uncertainty",
            "jury_p_a",
            pl.lit("").alias("winner"),
            pl.lit("").alias("annotator"),
        )
    )


def write_review_file(frame: pl.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        frame.write_csv(path)
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        frame.write_ndjson(path)
    else:
        raise ValueError(f"review export: {path} must end in .jsonl or .csv")
    return path


def read_review_labels(path: str | Path, known_pairs: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """(HUMAN_LABELS rows, QUARANTINE rows, rows left unlabelled) from a labelled file.

    ``known_pairs``: the dataset's judged pairs (pair key). A blank ``winner`` is a pair
    nobody labelled yet (skipped, counted); quarantined with record and field: a missing id
    (``missing_field``), an unknown winner (``unknown_winner``), a pair the dataset does not
    have (``unknown_pair``), the same pair twice (``duplicate_pair``), a record the reader
    cannot read (its reason: ``malformed_json``, ``ragged_row``...). Ids given in the
    other order are put in canonical order and the winner swapped with them."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"review import: {path} does not exist")
    source = str(path)
    raw, unreadable = read_labelled_file(path, "review import:")
    for column in [*ID_FIELDS, "winner", "annotator"]:
        if column not in raw.columns:
            raw = raw.with_columns(pl.lit(None, dtype=pl.String).alias(column))
    frame = raw.with_columns(
        _raw=pl.struct(pl.exclude("_record")).struct.json_encode(),
        _blank=pl.col("winner").is_null() | (pl.col("winner").str.strip_chars() == ""),
        _winner=pl.col("winner").str.strip_chars().str.to_lowercase().replace_strict(WINNERS, default=None),
    )
    unlabelled = int(frame["_blank"].sum())
    frame = frame.filter(~pl.col("_blank"))

    def quarantine(part: pl.DataFrame, reason: str, field: str, message: pl.Expr) -> pl.DataFrame:
        return _quarantine_rows(part, source, reason, field, message)

    bad = [unreadable]
    blank = [pl.col(c).is_null() | (pl.col(c).str.strip_chars() == "") for c in ID_FIELDS]
    missing = frame.with_columns(
        _field=pl.coalesce([pl.when(b).then(pl.lit(c)) for b, c in zip(blank, ID_FIELDS)])
    ).filter(pl.col("_field").is_not_null())
    for (field,), part in missing.partition_by("_field", as_dict=True).items():
        bad.append(quarantine(part, "missing_field", field,
                              pl.format("record {}: field {} is missing or empty", pl.col("_record"), pl.lit(field))))
    rest = frame.join(missing.select("_record"), on="_record", how="anti")
    unknown = rest.filter(pl.col("_winner").is_null())
    bad.append(quarantine(unknown, "unknown_winner", "winner",
                          pl.format('record {}: winner {} is not "A", "B" or "tie"', pl.col("_record"), pl.col("winner"))))
    rest = rest.filter(pl.col("_winner").is_not_null())
    swapped = pl.col("response_a_id") > pl.col("response_b_id")
    rest = rest.with_columns(
        response_a=pl.min_horizontal("response_a_id", "response_b_id"),
        response_b=pl.max_horizontal("response_a_id", "response_b_id"),
        _winner=pl.when(swapped).then(pl.col("_winner").replace({"A": "B", "B": "A"})).otherwise(pl.col("_winner")),
    )
    absent = rest.join(known_pairs.select(PAIR_KEY).unique(), on=PAIR_KEY, how="anti")
    bad.append(quarantine(absent, "unknown_pair", "prompt_id,response_a_id,response_b_id",
                          pl.format("record {}: the dataset has no judged pair {} / {} of prompt {}", pl.col("_record"),
                                    pl.col("response_a"), pl.col("response_b"), pl.col("prompt_id"))))
    rest = rest.join(absent.select("_record"), on="_record", how="anti").with_columns(
        _first=pl.col("_record").min().over(PAIR_KEY)
    )
    duplicate = rest.filter(pl.col("_record") != pl.col("_first"))
    bad.append(quarantine(duplicate, "duplicate_pair", "prompt_id,response_a_id,response_b_id",
                          pl.format("record {}: the same pair as record {}", pl.col("_record"), pl.col("_first"))))
    good = rest.filter(pl.col("_record") == pl.col("_first"))
    label_ids = content_ids(good.with_columns(pl.col("annotator").fill_null("")), "human_label",
                            Column("prompt_id"), Column("response_a"), Column("response_b"), Column("_winner"),
                            Column("annotator"), source)
    labels = good.select(
        label_ids.alias("label_id"),
        *PAIR_KEY,
        pl.col("_winner").alias("winner"),
        pl.when(pl.col("annotator").str.strip_chars() == "").then(None).otherwise(pl.col("annotator")).alias("annotator"),
        pl.lit(source).alias("source_file"),
        pl.col("_record").cast(pl.Int64).alias("source_record"),
    )
    return labels, pl.concat(bad, how="vertical").sort("source_record"), unlabelled


# --- store round-trip (the CLI's commands) ---------------------------------------------------
def _plain(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.drop([c for c in ("run_id", "stage", "code_version") if c in frame.columns])


def export_for_review(store, top: float, output: str | Path | None = None) -> tuple[Path, int]:
    """Write the review file of a dataset; returns (path, pairs written)."""
    judgments = _plain(store.read("current_judgments"))
    jury = _plain(store.read("jury"))
    prompts = _plain(store.read("prompts", ["prompt_id", "prompt"]))
    responses = _plain(store.read("current_responses", ["response_id", "text"]))
    labelled = current_labels(_plain(store.read("human_labels")))
    frame = review_candidates(judgments, jury, prompts, responses, top, labelled)
    path = Path(output) if output else Path(store.root) / "review" / "to_label.jsonl"
    return write_review_file(frame, path), frame.height


def import_review_labels(store, path: str | Path) -> dict:
    """Store a labelled review file in ``human_labels`` (bad rows in ``quarantine``)."""
    known = store.query("SELECT DISTINCT prompt_id, response_a, response_b FROM judgments")
    labels, quarantined, unlabelled = read_review_labels(path, known)
    digest = content_id("review_import", file_sha256(path), str(Path(path).resolve()))
    run_id = store.start_run("review", {"import": str(path)})
    try:
        if labels.height:
            store.commit("human_labels", labels, key=digest, run_id=run_id, stage="review")
        if quarantined.height:
            store.commit("quarantine", quarantined, key=f"review-{digest}", run_id=run_id, stage="review")
        counts = {"labels": labels.height, "quarantined": quarantined.height, "unlabelled": unlabelled}
        store.finish_run(run_id, "completed", counts=counts)
    except BaseException as error:
        store.finish_run(run_id, "failed", message=str(error))
        raise
    return {"run_id": run_id, **counts}
