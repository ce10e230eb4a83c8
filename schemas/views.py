"""Report views over the table views: what users query with ``prefcurate sql``.

Each is plain SQL over the per-table views, so they always reflect the registered shards.
Stages that are re-run (filter, select) write a full new result per run; the views read the
latest run of those stages.
"""

from prefcurate.tasks.checks import KEPT, UNREGISTERED_RANK, reason_rank_sql

#: table -> (its id, which row of an id wins) for the current_* views. A failed model call is
#: stored (with its error) and asked again by the next run (prefcurate/steps/model_stages.py);
#: the retry's row has the same content id, and a good row wins over a failed one, then the newest.
CURRENT_ROWS = {
    "responses": ("response_id", "finish_reason = 'error', created_at DESC"),
    "judgments": ("judgment_id", "NOT valid, created_at DESC"),
    "ratings": ("rating_id", "NOT valid, created_at DESC"),
}
#: the columns each choice orders by (with its id, what a narrowed read of it must carry)
_PREFERENCE_COLUMNS = {"responses": ["finish_reason", "created_at"], "judgments": ["valid", "created_at"],
                       "ratings": ["valid", "created_at"]}


def choice_columns(table: str) -> list[str]:
    """The columns the one-row-per-id choice of ``table`` reads: its id and its preference's."""
    return [CURRENT_ROWS[table][0], *_PREFERENCE_COLUMNS[table]]


def current_rows_sql(table: str, where: str | None = None, columns: str = "*") -> str:
    """``current_<table>``'s rows, restricted by ``where`` before the one-row-per-id choice.

    The rows of one id are retries of one call, so a condition on what the call was asked
    (its prompt, its response) holds for all of them or none: filtering first gives the
    view's rows that meet it, and reads only those instead of ordering the whole table.
    ``columns`` (which must include :func:`choice_columns`) narrows what the choice carries,
    e.g. whether a text is there instead of the text.
    """
    key, preference = CURRENT_ROWS[table]
    condition = f" WHERE {where}" if where else ""
    # a window, not DISTINCT ON: DuckDB's DISTINCT ON took twice the time and memory (600,000
    # judgments: 0.9 s and 1 GB against 0.5 s and 0.5 GB)
    return (f"SELECT {columns} FROM {table}{condition} "
            f"QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY {preference}) = 1 ORDER BY {key}")


REPORT_VIEWS: dict[str, str] = {
    **{f"current_{table}": current_rows_sql(table) for table in CURRENT_ROWS},
    # the latest filter run's pairs (filter re-runs recompute pairs over the whole dataset)
    "current_pairs": """
        SELECT * FROM pairs
        WHERE run_id = (SELECT run_id FROM pairs ORDER BY created_at DESC LIMIT 1)
    """,
    "current_filter_drops": """
        SELECT * FROM filter_drops
        WHERE run_id = (SELECT run_id FROM filter_drops ORDER BY created_at DESC LIMIT 1)
    """,
    # the curated set: pairs selected by the latest select run, with their texts. Each table is
    # narrowed to the selected pairs' ids before its one-row-per-id choice: DuckDB cannot push
    # the joins below that choice, and ordering every response with its text took ~1 GB and 1 s
    # at 100,000 prompts for a few hundred curated pairs
    "curated_pairs": f"""
        WITH latest AS (
            SELECT * FROM selections
            WHERE run_id = (SELECT run_id FROM selections ORDER BY created_at DESC LIMIT 1)
              AND selected
        ),
        pair AS (
            SELECT DISTINCT ON (pair_id) * FROM pairs WHERE pair_id IN (SELECT pair_id FROM latest)
            ORDER BY pair_id, created_at DESC
        ),
        response AS ({current_rows_sql(
            "responses", where="response_id IN (SELECT chosen_id FROM pair UNION ALL SELECT rejected_id FROM pair)")})
        SELECT pair.pair_id, pair.prompt_id, p.prompt, p.system_prompt, p.category,
               c.text AS chosen, r.text AS rejected,
               pair.chosen_id, pair.rejected_id, pair.p_chosen, pair.margin, pair.agreement,
               pair.chosen_score, pair.rejected_score,
               c.generator AS chosen_generator, c.model AS chosen_model,
               r.generator AS rejected_generator, r.model AS rejected_model,
               latest.rank, latest.cluster, latest.quality, latest.method AS selection_method,
               pair.strategy, pair.run_id AS filter_run_id, latest.run_id AS select_run_id
        FROM latest
        JOIN pair USING (pair_id)
        JOIN (SELECT DISTINCT ON (prompt_id) * FROM prompts WHERE prompt_id IN (SELECT prompt_id FROM pair)) p
            ON p.prompt_id = pair.prompt_id
        JOIN response c ON c.response_id = pair.chosen_id
        JOIN response r ON r.response_id = pair.rejected_id
        ORDER BY latest.rank
    """,
    # per-judge position bias over pairwise judgments (both orders valid); a judge that asked
    # no orders (reward_model, density_ratio) or one order (an import) has no flip rate: NULL
    "judge_position_bias": """
        SELECT judge, judge_model, criterion, count(*) AS judgments,
               avg(CASE WHEN p_first_ab IS NULL OR p_first_ba IS NULL THEN NULL
                        WHEN (p_first_ab > 0.5) = (p_first_ba > 0.5) THEN 1.0 ELSE 0.0 END)
                   AS position_flip_rate,
               avg((p_first_ab + p_first_ba) / 2) AS first_position_pref,
               avg(abs(p_a - 0.5) * 2) AS mean_confidence
        FROM current_judgments WHERE valid
        GROUP BY ALL ORDER BY judge, criterion
    """,
    # one row per dropped pair of the latest filter run: its primary reason and every reason
    # it failed, in the check registry's order (prefcurate.tasks.checks.pair_reasons)
    "filter_pair_reasons": f"""
        WITH d AS (
            SELECT DISTINCT d.prompt_id, d.response_a, d.response_b, d.reason,
                   coalesce(reason_rank.rank, {UNREGISTERED_RANK}) AS rank
            FROM current_filter_drops d LEFT JOIN {reason_rank_sql()} USING (reason)
        )
        SELECT prompt_id, response_a, response_b,
               first(reason ORDER BY rank, reason) AS primary_reason,
               list(reason ORDER BY rank, reason) AS all_reasons
        FROM d GROUP BY ALL ORDER BY prompt_id, response_a, response_b
    """,
    # why pairs were dropped: the definition of tasks.filter.filter_report_frame (a test holds
    # them equal). One row per (reason, judge, generator): n_pairs = distinct pairs whose
    # primary reason (the first of their reasons in the check registry's order) this is,
    # n_pairs_any = distinct pairs that failed it at all. A pair counts under each of its
    # responses' generators (once when both share one); judge is NULL for jury-level reasons;
    # emitted pairs are reason 'kept'.
    "filter_report": f"""
        WITH rows AS (
            SELECT DISTINCT d.prompt_id, d.response_a, d.response_b, d.judge, d.reason,
                   d.reason = p.primary_reason AS is_primary
            FROM current_filter_drops d
            JOIN filter_pair_reasons p USING (prompt_id, response_a, response_b)
            UNION ALL
            SELECT DISTINCT prompt_id, least(chosen_id, rejected_id), greatest(chosen_id, rejected_id),
                   NULL, '{KEPT}', true
            FROM current_pairs
        ),
        by_generator AS (
            SELECT DISTINCT rows.*, unnest(list_distinct([coalesce(ga.generator, '?'),
                                                         coalesce(gb.generator, '?')])) AS generator
            FROM rows
            LEFT JOIN current_responses ga ON ga.response_id = rows.response_a
            LEFT JOIN current_responses gb ON gb.response_id = rows.response_b
        )
        SELECT reason, judge, generator,
               count(*) FILTER (WHERE is_primary) AS n_pairs, count(*) AS n_pairs_any
        FROM by_generator
        GROUP BY ALL ORDER BY n_pairs DESC, reason, judge NULLS FIRST, generator
    """,
    "quarantine_summary": """
        SELECT stage, reason, count(*) AS rows FROM quarantine GROUP BY ALL ORDER BY rows DESC
    """,
}
