"""Calibration on the user's labelled pairs, and the gate that keeps chance-level judges out.

- **Gold file** (``annotate.gold_path``): the user's labelled pairs, JSONL, CSV or Parquet,
  with ``prompt``, ``response_a``, ``response_b`` and ``winner`` ("A", "B" or "tie",
  case-insensitive; "1"/"2"/"0" as PandaLM writes them), optional ``id`` and ``why``. Bad
  rows go to quarantine with their record number and field: a missing field, an unknown
  winner, a pair already given (the same prompt and responses, in either order). Tied
  pairs are kept in the file's table but do not calibrate a judge's accuracy (a verdict
  cannot be right or wrong against a tie).
- **Accuracy with an interval.** Each judge's labelled accuracy (gold pairs, plus pairs a
  person labelled in review) with a Wilson score interval at ``confidence`` (95% by
  default): the Wilson interval keeps its coverage at the 20-50 pairs a user labels, where
  the normal approximation does not.
- **The gate** (``filter.calibration``). A judge fails when the lower end of its interval
  is <= ``chance`` (0.5: not credibly better than a coin) or its flip rate on the gold
  pairs exceeds ``max_flip_rate``. ``gate``: ``exclude`` (default) drops its verdicts
  before the jury and fails the build when no judge is left; ``warn`` keeps it and flags
  it (report, status, card); ``fail`` stops the build. A judge with no labelled pairs is
  ``uncalibrated``: the gate cannot judge it and keeps it (flagged); so is one with fewer
  than ``min_labelled`` (10) labelled pairs, where even a perfect record has a Wilson
  interval reaching down to chance (6/6 correct: lower end 0.61, 5/6: 0.44).
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import NormalDist
from typing import Literal

import numpy as np
import polars as pl
from prefcurate.schemas.ids import content_id
from prefcurate.tasks.ingest import RECORD_SUFFIXES, as_text_columns, read_records, record_format
from pydantic import BaseModel, ConfigDict, Field

from prefcurate.errors import InputError

GOLD_FIELDS = ["prompt", "response_a", "response_b", "winner"]
WINNERS = {"a": "A", "b": "B", "tie": "tie", "1": "A", "2": "B", "0": "tie"}
PASS, WARNED, EXCLUDED, UNCALIBRATED = "pass", "warned", "excluded", "uncalibrated"


class GateError(InputError):
    """The calibration gate stopped the build (gate ``fail``, or no judge left): deterministic
    for these judges and labels, so it is not retried and the CLI says it as one error."""


class CalibrationParams(BaseModel):
    """The calibration gate over the judges (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    gate: Literal["exclude", "warn", "fail"] = "exclude"
    chance: float = Field(0.5, ge=0.0, lt=1.0, description="accuracy a judge must credibly beat")
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="two-sided level of the Wilson interval")
    max_flip_rate: float = Field(0.5, ge=0.0, le=1.0, description="largest gold flip rate a judge may have")
    min_labelled: int = Field(
        10, ge=1, description="fewer labelled pairs than this: the gate cannot judge the judge (uncalibrated)"
    )


def wilson_interval(correct: np.ndarray, n: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a binomial proportion (vectorised; NaN where n = 0)."""
    correct = np.asarray(correct, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    # the standard library's normal quantile, not scipy.stats' (equal to within 1e-15;
    # importing scipy.stats cost the filter stage's worker ~0.8 s)
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = correct / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = np.where(n > 0, centre - half, np.nan)
    high = np.where(n > 0, centre + half, np.nan)
    return low, high


# --- the gold file -------------------------------------------------------------------------
def read_labelled_file(path: Path, what: str = "gold file") -> tuple[pl.DataFrame, pl.DataFrame]:
    """(records as text columns with their 1-based record number ``_record``, unreadable
    records as QUARANTINE rows) of a file of labelled pairs, read as ingest reads files:
    JSONL, a JSON array, CSV (its separator found from the header: ``;`` from spreadsheets of
    many locales), TSV or Parquet, gzipped or not. A malformed line or ragged row is
    quarantined with its record number; the other records are kept."""
    fmt = record_format(path)
    if fmt is None:
        raise InputError(f"{what} {path}: unknown format {path.suffix!r}; expected {RECORD_SUFFIXES}")
    records, unreadable = read_records(path, fmt)
    return as_text_columns(records).rename({"source_record": "_record"}), unreadable


def _quarantine_rows(frame: pl.DataFrame, source: str, reason: str, field: str, message: pl.Expr) -> pl.DataFrame:
    return frame.select(
        pl.lit(source).alias("source_file"),
        pl.col("_record").cast(pl.Int64).alias("source_record"),
        pl.lit(field).alias("field"),
        pl.lit(reason).alias("reason"),
        message.alias("message"),
        pl.col("_raw").alias("raw"),
    )


def load_gold_file(path: str | Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(gold pairs, quarantine rows) of a user's labelled-pairs file.

    Gold columns: id, prompt, response_a, response_b, winner (A | B | tie), why,
    source_record. Quarantine columns: the QUARANTINE table's (source_file, source_record,
    field, reason, message, raw); reasons ``missing_field``, ``unknown_winner``,
    ``duplicate_pair``, and the reader's for a record it cannot read (``malformed_json``,
    ``ragged_row``...)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"annotate.gold_path: {path} does not exist")
    source = str(path)
    raw, unreadable = read_labelled_file(path)
    for column in GOLD_FIELDS + ["id", "why"]:
        if column not in raw.columns:
            raw = raw.with_columns(pl.lit(None, dtype=pl.String).alias(column))
    frame = raw.with_columns(
        _raw=pl.struct(pl.exclude("_record")).struct.json_encode(),
        _winner=pl.col("winner").str.strip_chars().str.to_lowercase().replace_strict(WINNERS, default=None),
    )
    bad = [unreadable]
    # a missing field (null or blank) names the first such field
    blank = [pl.col(c).is_null() | (pl.col(c).str.strip_chars() == "") for c in GOLD_FIELDS]
    first_missing = pl.coalesce([pl.when(b).then(pl.lit(c)) for b, c in zip(blank, GOLD_FIELDS)])
    missing = frame.with_columns(_field=first_missing).filter(pl.col("_field").is_not_null())
    for field, part in missing.partition_by("_field", as_dict=True).items():
        name = field[0]
        bad.append(_quarantine_rows(part, source, "missing_field", name,
                                    pl.format("record {}: field {} is missing or empty", pl.col("_record"), pl.lit(name))))
    rest = frame.join(missing.select("_record"), on="_record", how="anti")
    unknown = rest.filter(pl.col("_winner").is_null())
    bad.append(_quarantine_rows(unknown, source, "unknown_winner", "winner",
                                pl.format('record {}: winner {} is not "A", "B" or "tie"', pl.col("_record"), pl.col("winner"))))
    rest = rest.filter(pl.col("_winner").is_not_null())
    # the same pair in either order: the key sorts the two responses
    keyed = rest.with_columns(
        _key=pl.concat_list(pl.col("prompt"), pl.min_horizontal("response_a", "response_b"),
                            pl.max_horizontal("response_a", "response_b")).list.join("\u0000")
    ).with_columns(_first=pl.col("_record").min().over("_key"))
    duplicate = keyed.filter(pl.col("_record") != pl.col("_first"))
    bad.append(_quarantine_rows(duplicate, source, "duplicate_pair", "response_a,response_b",
                                pl.format("record {}: the same prompt and responses as record {}",
                                          pl.col("_record"), pl.col("_first"))))
    good = keyed.filter(pl.col("_record") == pl.col("_first"))
    ids = [content_id("gold", p, a, b) for p, a, b in zip(good["prompt"], good["response_a"], good["response_b"])]
    gold = good.with_columns(
        id=pl.coalesce(pl.col("id"), pl.Series(ids, dtype=pl.String)),
        winner=pl.col("_winner"),
        source_record=pl.col("_record").cast(pl.Int64),
    ).select("id", "prompt", "response_a", "response_b", "winner", "why", "source_record")
    quarantine = pl.concat(bad, how="vertical").sort("source_record")
    return gold, quarantine


def decisive(gold: pl.DataFrame) -> pl.DataFrame:
    """The gold pairs a judge can be right or wrong on (winner A or B)."""
    return gold.filter(pl.col("winner").is_in(["A", "B"]))


# --- accuracy and the gate -----------------------------------------------------------------
def latest_calibration(calibration: pl.DataFrame) -> pl.DataFrame:
    """One JUDGE_CALIBRATION row per judge: the newest (``created_at``) when present."""
    if calibration.height == 0:
        return calibration
    if "created_at" in calibration.columns:
        calibration = calibration.sort("created_at", descending=True)
    return calibration.unique("judge", keep="first").sort("judge")


def human_agreement(verdicts: pl.DataFrame, labels: pl.DataFrame) -> pl.DataFrame:
    """Per judge: (human_correct, human_n) on human-labelled A/B pairs, a tied or flipped
    verdict counting as wrong (as on the gold pairs)."""
    from prefcurate.tasks.jury import PAIR_KEY, vote_expr

    decided = labels.filter(pl.col("winner").is_in(["A", "B"])).select(*PAIR_KEY, "winner").unique(PAIR_KEY, keep="last")
    joined = verdicts.with_columns(_vote=vote_expr()).join(decided, on=PAIR_KEY)
    right = ((pl.col("_vote") > 0) & (pl.col("winner") == "A")) | ((pl.col("_vote") < 0) & (pl.col("winner") == "B"))
    return joined.group_by("judge").agg(right.sum().cast(pl.Int64).alias("human_correct"),
                                        pl.len().cast(pl.Int64).alias("human_n"))


def judge_accuracy_table(
    judges: list[str],
    calibration: pl.DataFrame,
    human: pl.DataFrame | None,
    params: CalibrationParams,
) -> pl.DataFrame:
    """Per judge: labelled pairs, accuracy, Wilson interval, gold flip rate, log-odds
    weight and the gate's verdict (``gate``: pass | warned | excluded | uncalibrated, with
    ``gate_reason``). ``calibration``: JUDGE_CALIBRATION rows (latest per judge)."""
    base = pl.DataFrame({"judge": sorted(set(judges))}, schema={"judge": pl.String})
    cal = latest_calibration(calibration)
    if cal.height:
        cal = cal.select(
            "judge",
            (pl.col("accuracy").fill_null(0.0) * pl.col("gold_pairs")).round(0).cast(pl.Int64).alias("gold_correct"),
            pl.col("gold_pairs").cast(pl.Int64),
            pl.col("position_flip_rate").cast(pl.Float64).alias("flip_rate"),
        )
        base = base.join(cal, on="judge", how="left")
    else:
        base = base.with_columns(gold_correct=pl.lit(None, pl.Int64), gold_pairs=pl.lit(None, pl.Int64),
                                 flip_rate=pl.lit(None, pl.Float64))
    if human is not None and human.height:
        base = base.join(human, on="judge", how="left")
    else:
        base = base.with_columns(human_correct=pl.lit(None, pl.Int64), human_n=pl.lit(None, pl.Int64))
    base = base.with_columns(
        correct=(pl.col("gold_correct").fill_null(0) + pl.col("human_correct").fill_null(0)),
        labelled=(pl.col("gold_pairs").fill_null(0) + pl.col("human_n").fill_null(0)),
    )
    from prefcurate.tasks.jury import accuracy_weight

    correct, n = base["correct"].to_numpy(), base["labelled"].to_numpy()
    low, high = wilson_interval(correct, n, params.confidence)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(n > 0, correct / np.maximum(n, 1), np.nan)
    table = base.with_columns(
        accuracy=pl.Series(accuracy).fill_nan(None),
        accuracy_low=pl.Series(low).fill_nan(None),
        accuracy_high=pl.Series(high).fill_nan(None),
        weight=pl.Series(accuracy_weight(correct, n)),
    )
    not_credible = pl.col("accuracy_low") <= params.chance
    flips = pl.col("flip_rate").fill_null(0.0) > params.max_flip_rate
    reason = pl.concat_str(
        [
            pl.when(not_credible).then(pl.format(
                "labelled accuracy {} ({}/{}), {}% interval [{}, {}] does not exclude chance {}",
                pl.col("accuracy").round(3), pl.col("correct"), pl.col("labelled"), pl.lit(round(100 * params.confidence)),
                pl.col("accuracy_low").round(3), pl.col("accuracy_high").round(3), pl.lit(params.chance))),
            pl.when(flips).then(pl.format("flip rate {} above {}", pl.col("flip_rate").round(3), pl.lit(params.max_flip_rate))),
        ],
        separator="; ",
        ignore_nulls=True,
    )
    failed = not_credible | flips
    too_few = pl.col("labelled") < params.min_labelled
    gate = (
        pl.when(too_few).then(pl.lit(UNCALIBRATED))
        .when(failed).then(pl.lit(WARNED if params.gate == "warn" else EXCLUDED))
        .otherwise(pl.lit(PASS))
    )
    return table.with_columns(
        gate=gate,
        gate_reason=pl.when(pl.col("labelled") == 0).then(pl.lit("no labelled pairs"))
        .when(too_few).then(pl.format("only {} labelled pairs (min_labelled {})", pl.col("labelled"),
                                      pl.lit(params.min_labelled)))
        .when(failed).then(reason).otherwise(None),
    ).select("judge", "labelled", "correct", "gold_pairs", "human_n", "accuracy", "accuracy_low",
             "accuracy_high", "flip_rate", "weight", "gate", "gate_reason")


def apply_gate(table: pl.DataFrame, params: CalibrationParams) -> list[str]:
    """The judges to leave out of the jury; raises :class:`GateError` when the gate says
    ``fail`` about a failing judge, or when excluding leaves no judge."""
    failing = table.filter(pl.col("gate").is_in([EXCLUDED, WARNED]))
    lines = [f"  {j}: {r}" for j, r in failing.select("judge", "gate_reason").iter_rows()]
    if params.gate == "fail" and failing.height:
        raise GateError("calibration gate (fail): judge(s) not credibly better than chance or flipping:\n"
                        + "\n".join(lines) + "\nset filter.calibration.gate to warn or exclude, or fix the judges")
    excluded = failing.filter(pl.col("gate") == EXCLUDED)["judge"].to_list()
    if excluded and len(excluded) == table.height:
        raise GateError("calibration gate (exclude) left no judge in the jury:\n" + "\n".join(lines)
                        + "\nadd a stronger judge, label more pairs (annotate.gold_path, prefcurate review), "
                        "or set filter.calibration.gate: warn to keep them (the card then says so)")
    return excluded


def gate_summary(table: pl.DataFrame) -> list[dict]:
    """JSON-able rows of the accuracy table (for the run report)."""
    return json.loads(table.write_json()) if table.height else []


ACCURACY_COLUMNS = ["judge", "jury_method", "labelled", "correct", "accuracy", "accuracy_low", "accuracy_high",
                    "flip_rate", "em_accuracy", "votes", "weight", "gate", "gate_reason"]


def prepare_jury(
    judgments: pl.DataFrame,
    calibration: pl.DataFrame | None,
    human_labels: pl.DataFrame | None,
    params,
) -> tuple[pl.DataFrame, object, pl.DataFrame]:
    """Gate the judges and set the jury's weights, before :func:`tasks.filter.apply_filters`.

    ``params``: FilterParams. Returns (the judgments of the judges the gate keeps, params
    with ``judge_weights`` set for ``calibrated``, the JUDGE_ACCURACY rows). Every judge's
    one-coin EM accuracy (no labels used) is estimated whatever the jury method, so that
    ``status`` and the card can show it. Raises :class:`GateError` (see :func:`apply_gate`),
    and ValueError when ``calibrated`` is asked for without a labelled pair."""
    from prefcurate.tasks.jury import PAIR_KEY, judge_verdicts, latent_jury

    rows = judgments.filter(pl.col("valid"))
    if params.criteria is not None:
        rows = rows.filter(pl.col("criterion").is_in(params.criteria))
    verdicts = judge_verdicts(rows, by_criterion=False)
    judges = sorted(judgments["judge"].unique().to_list())
    labels = human_labels if human_labels is not None else pl.DataFrame()
    human = human_agreement(verdicts, labels) if labels.height else None
    gate = params.calibration
    table = judge_accuracy_table(judges, calibration if calibration is not None else pl.DataFrame(), human, gate)
    if verdicts.height:
        _, em = latent_jury(verdicts, PAIR_KEY, "unsupervised")
        em = em.select("judge", pl.col("accuracy").alias("em_accuracy"), "votes", pl.col("weight").alias("em_weight"))
    else:
        em = pl.DataFrame(schema={"judge": pl.String, "em_accuracy": pl.Float64, "votes": pl.Int64,
                                  "em_weight": pl.Float64})
    table = table.join(em, on="judge", how="left")
    excluded = apply_gate(table, gate)
    kept = judgments.filter(~pl.col("judge").is_in(excluded))
    method = params.jury_method
    if method == "calibrated":
        usable = table.filter(~pl.col("judge").is_in(excluded) & (pl.col("labelled") > 0))
        if usable.height == 0:
            raise ValueError(
                "filter.jury_method calibrated needs labelled pairs for at least one judge (gold pairs from "
                "annotate.gold_path or the packaged set, or labels from `prefcurate review import`); none found"
            )
        params = params.model_copy(update={"judge_weights": dict(usable.select("judge", "weight").iter_rows())})
    weight = (
        pl.when(pl.col("judge").is_in(excluded)).then(None)
        .when(pl.lit(method == "calibrated")).then(pl.when(pl.col("labelled") > 0).then(pl.col("weight")).otherwise(0.0))
        .when(pl.lit(method == "unsupervised")).then(pl.col("em_weight"))
        .otherwise(None)
    )
    table = table.with_columns(
        jury_method=pl.lit(method),
        weight=weight,
        labelled=pl.col("labelled").cast(pl.Int32),
        correct=pl.col("correct").cast(pl.Int32),
    ).select(ACCURACY_COLUMNS)
    return kept, params, table


def accuracy_lines(table: pl.DataFrame) -> list[str]:
    """Human-readable lines of a JUDGE_ACCURACY frame (status, report, card)."""
    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"

    lines = []
    for row in table.sort("judge").iter_rows(named=True):
        interval = (
            f"[{pct(row['accuracy_low'])}, {pct(row['accuracy_high'])}]" if row["accuracy_low"] is not None else ""
        )
        flip = "n/a" if row["flip_rate"] is None else f"{row['flip_rate']:.2f}"
        line = (f"{row['judge']}: labelled accuracy {pct(row['accuracy'])} {interval} on {row['labelled']} pairs, "
                f"flip rate {flip}, EM estimate {pct(row['em_accuracy'])}, gate {row['gate']}")
        if row["gate_reason"] and row["gate"] != "pass":
            line += f" ({row['gate_reason']})"
        lines.append(line)
    return lines


def card_judges(accuracy: pl.DataFrame) -> dict:
    """The dataset card's judge section from the latest JUDGE_ACCURACY rows: ``judges``
    (one record per judge: used or excluded, labelled accuracy with its interval, flip rate,
    EM estimate, gate) and ``judge_warning`` (set when pairs come from judges that failed
    the gate or that no labelled pair checked)."""
    if accuracy.height == 0:
        return {}

    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"

    records, failed, unchecked = [], [], []
    for row in accuracy.sort("judge").iter_rows(named=True):
        used = row["gate"] != EXCLUDED
        interval = ("n/a" if row["accuracy_low"] is None
                    else f"{pct(row['accuracy_low'])} - {pct(row['accuracy_high'])}")
        records.append({
            "judge": row["judge"],
            "used": "yes" if used else "no (excluded)",
            "labelled pairs": row["labelled"],
            "accuracy": pct(row["accuracy"]),
            "Wilson interval": interval,
            "flip rate": "n/a" if row["flip_rate"] is None else f"{row['flip_rate']:.2f}",
            "EM estimate": pct(row["em_accuracy"]),
            "gate": row["gate"] + (f": {row['gate_reason']}" if row["gate_reason"] and row["gate"] != PASS else ""),
        })
        if row["gate"] == WARNED:
            failed.append(f"{row['judge']} ({row['gate_reason']})")
        elif row["gate"] == UNCALIBRATED:
            unchecked.append(f"{row['judge']} ({row['gate_reason']})")
    warnings = []
    if failed:
        warnings.append("these pairs come from judge(s) that FAILED the calibration gate and were kept only because "
                        "filter.calibration.gate is warn: " + "; ".join(failed)
                        + ". Their verdicts are not credibly better than chance on the labelled pairs: "
                        "treat the pairs as unvalidated.")
    if unchecked:
        warnings.append("judge(s) whose accuracy the labelled pairs could not check: " + "; ".join(unchecked) + ".")
    return {"judges": records, "judge_warning": " ".join(warnings) or None,
            "jury_method": accuracy["jury_method"][0]}
