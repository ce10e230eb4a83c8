"""Human-readable summaries of a dataset: `prefcurate status` and the run report."""

from __future__ import annotations

import io

import polars as pl

from prefcurate.schemas.tables import TABLES
from prefcurate.store import Store, with_interrupted_runs


def _table(frame: pl.DataFrame, rows: int = 30) -> str:
    with pl.Config(tbl_rows=rows, tbl_cols=12, fmt_str_lengths=48, tbl_width_chars=160,
                   tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
        return str(frame)


def table_counts(store: Store) -> pl.DataFrame:
    union = " UNION ALL ".join(f"SELECT '{t}' AS table_name, count(*) AS rows FROM {t}" for t in TABLES)
    shards = store.query("SELECT table_name, count(*) AS shards FROM _shards GROUP BY ALL")
    counts = store.query(union)
    return counts.join(shards, on="table_name", how="left").with_columns(pl.col("shards").fill_null(0))


def status_text(store: Store) -> str:
    from prefcurate.steps.ingest import ingest_accounting

    out = io.StringIO()
    out.write(f"dataset {store.root}\n\n")
    runs = with_interrupted_runs(store.query(
        "SELECT run_id, kind, status, strftime(started_at, '%Y-%m-%d %H:%M:%S') AS started, "
        "round(CAST(timings->>'seconds' AS DOUBLE), 1) AS seconds, coalesce(message, '') AS message, "
        "pid, host, process_started FROM runs ORDER BY started_at DESC LIMIT 12"
    )).drop("pid", "host", "process_started")
    out.write("recent runs\n" + _table(runs) + "\n\n")
    out.write("rows per table\n" + _table(table_counts(store)) + "\n\n")
    accounting = ingest_accounting(store)
    row = accounting.row(0, named=True)
    holds = row["rows_read"] == row["accepted"] + row["quarantined"] + row["duplicates"]
    out.write(
        f"ingest accounting: read {row['rows_read']} = accepted {row['accepted']} + quarantined "
        f"{row['quarantined']} + duplicates {row['duplicates']}  [{'holds' if holds else 'MISMATCH'}]\n\n"
    )
    quarantine = store.query("SELECT * FROM quarantine_summary")
    if quarantine.height:
        out.write("quarantine by stage and reason\n" + _table(quarantine) + "\n\n")
    from prefcurate.tasks.estimate import spend_by_pool

    spend = spend_by_pool(store)
    if spend is not None:
        out.write("requests and spend of priced pools (USD)\n" + _table(spend) + "\n\n")
    for title, sql in (
        ("judge calibration (gold pairs)",
         "SELECT DISTINCT ON (judge) judge, judge_model, gold_pairs, round(accuracy, 3) AS accuracy, "
         "round(position_flip_rate, 3) AS flip_rate, round(first_position_pref, 3) AS first_pos_pref "
         "FROM judge_calibration ORDER BY judge, created_at DESC"),
        ("judge accuracy and calibration gate (latest filter run)",
         "SELECT judge, jury_method, labelled, round(accuracy, 3) AS accuracy, round(accuracy_low, 3) AS acc_low, "
         "round(accuracy_high, 3) AS acc_high, round(flip_rate, 3) AS flip_rate, round(em_accuracy, 3) AS em_accuracy, "
         "round(weight, 3) AS weight, gate, gate_reason FROM judge_accuracy "
         "WHERE run_id = (SELECT run_id FROM judge_accuracy ORDER BY created_at DESC LIMIT 1) ORDER BY judge"),
        ("judge position bias (dataset judgments)", "SELECT * FROM judge_position_bias"),
        ("filter report (latest filter run)", "SELECT * FROM filter_report LIMIT 20"),
    ):
        frame = store.query(sql)
        if frame.height:
            out.write(title + "\n" + _table(frame) + "\n\n")
    out.write(_filter_summary(store))
    return out.getvalue().rstrip() + "\n"


def _filter_summary(store: Store) -> str:
    """Abstentions and the verdicts the position checks do not apply to (latest filter run)."""
    report = (store.latest_reports("filter", "report") or [{}])[0]
    if not report:
        return ""
    abstained = report.get("abstentions") or {}
    single = report.get("position_checks_not_applicable") or {}
    return (
        f"filter (latest run): {report.get('candidates', 0)} candidates, {report.get('pairs', 0)} pairs; "
        f"judges abstained (flipped or tied) on {abstained.get('verdicts', 0)} verdicts of "
        f"{abstained.get('pairs', 0)} pairs; position checks not applicable to "
        f"{single.get('verdicts', 0)} single-order verdicts ({single.get('pairs', 0)} pairs without "
        "both orders from any judge)\n"
    )


def _markdown_table(frame: pl.DataFrame, digits: int = 3) -> str:
    if frame.height == 0:
        return "_none_"
    frame = frame.with_columns(pl.col(pl.Float64).round(digits))
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join([header, rule, *rows])


def text_histogram(values, bins: int = 10, width: int = 30) -> str:
    """A histogram as text bars, readable in a Prefect markdown artifact and a terminal."""
    import numpy as np

    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if values.size == 0:
        return "_no values_"
    counts, edges = np.histogram(values, bins=bins)
    top = counts.max() or 1
    lines = [
        f"{edges[i]:>7.2f} .. {edges[i + 1]:<7.2f} {'█' * round(width * c / top):<{width}} {c}"
        for i, c in enumerate(counts)
    ]
    return "```\n" + "\n".join(lines) + "\n```"


def build_report_markdown(store: Store, summaries: list[dict]) -> str:
    """The run report: what each stage did, why pairs were dropped, how the judges behaved."""
    parts = ["## Stages", "| stage | seconds | model seconds | counts |", "|---|---:|---:|---|"]
    for summary in summaries:
        counts = {k: v for k, v in summary.items()
                  if k not in ("stage", "run_id", "seconds", "model_seconds") and not isinstance(v, dict)}
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in counts.items())
        parts.append(f"| {summary['stage']} | {summary['seconds']:.1f} | {summary.get('model_seconds', 0):.1f} | {shown} |")
    parts += ["", "## Rows per table", _markdown_table(table_counts(store).filter(pl.col("rows") > 0))]
    sections = [
        ("Judge calibration on gold pairs",
         "SELECT DISTINCT ON (judge) judge, gold_pairs, accuracy, position_flip_rate, first_position_pref "
         "FROM judge_calibration ORDER BY judge, created_at DESC"),
        ("Judge accuracy: labelled (Wilson interval), EM estimate, weight and gate (latest filter run)",
         "SELECT judge, jury_method, labelled, round(accuracy, 3) AS accuracy, round(accuracy_low, 3) AS acc_low, "
         "round(accuracy_high, 3) AS acc_high, round(flip_rate, 3) AS flip_rate, round(em_accuracy, 3) AS em_accuracy, "
         "round(weight, 3) AS weight, gate, gate_reason FROM judge_accuracy "
         "WHERE run_id = (SELECT run_id FROM judge_accuracy ORDER BY created_at DESC LIMIT 1) ORDER BY judge"),
        ("Judge position bias on this dataset", "SELECT * FROM judge_position_bias"),
        ("Jury agreement", "SELECT criterion, count(*) AS pairs, avg(agreement) AS mean_agreement, "
                            "avg(abs(p_a - 0.5) * 2) AS mean_confidence FROM jury GROUP BY ALL"),
        ("Filter drops by primary reason (latest filter run; each dropped pair once)",
         "SELECT primary_reason AS reason, count(*) AS pairs FROM filter_pair_reasons GROUP BY ALL ORDER BY pairs DESC"),
        ("Quarantine", "SELECT * FROM quarantine_summary"),
    ]
    for title, sql in sections:
        parts += ["", f"## {title}", _markdown_table(store.query(sql))]
    quality = store.query("SELECT criterion, method, score FROM quality")
    for (criterion, method), group in quality.group_by(["criterion", "method"], maintain_order=True):
        parts += ["", f"## Score distribution: {criterion} ({method})", text_histogram(group["score"].to_list())]
    curated = store.query("SELECT p_chosen FROM curated_pairs")
    if curated.height:
        parts += ["", f"## Curated pairs: {curated.height}", "P(chosen better) by the jury:",
                  text_histogram(curated["p_chosen"].to_list())]
    return "\n".join(parts)
