"""Human-readable summaries of a dataset: `prefcurate status` and the run report."""

from __future__ import annotations

import io

import polars as pl

from prefcurate.schemas.tables import TABLES
from prefcurate.store import Store


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
    runs = store.query(
        "SELECT run_id, kind, status, strftime(started_at, '%Y-%m-%d %H:%M:%S') AS started, "
        "round(CAST(timings->>'seconds' AS DOUBLE), 1) AS seconds, coalesce(message, '') AS message "
        "FROM runs ORDER BY started_at DESC LIMIT 12"
    )
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
    for title, sql in (
        ("judge calibration (gold pairs)",
         "SELECT DISTINCT ON (judge) judge, judge_model, gold_pairs, round(accuracy, 3) AS accuracy, "
         "round(position_flip_rate, 3) AS flip_rate, round(first_position_pref, 3) AS first_pos_pref "
         "FROM judge_calibration ORDER BY judge, created_at DESC"),
        ("judge position bias (dataset judgments)", "SELECT * FROM judge_position_bias"),
        ("filter report (latest filter run)", "SELECT * FROM filter_report LIMIT 20"),
    ):
        frame = store.query(sql)
        if frame.height:
            out.write(title + "\n" + _table(frame) + "\n\n")
    return out.getvalue().rstrip() + "\n"
