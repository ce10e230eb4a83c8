"""Report views over the table views: what users query with ``prefcurate sql``.

Each is plain SQL over the per-table views, so they always reflect the registered shards.
Stages that are re-run (filter, select) write a full new result per run; the views read the
latest run of those stages.
"""

REPORT_VIEWS: dict[str, str] = {
    # One row per id. A failed model call is stored (with its error) and asked again by the
    # next run (prefcurate/steps/model_stages.py); the retry's row has the same content id,
    # and these views prefer a good row over a failed one, then the newest.
    "current_responses": """
        SELECT DISTINCT ON (response_id) * FROM responses
        ORDER BY response_id, finish_reason = 'error', created_at DESC
    """,
    "current_judgments": """
        SELECT DISTINCT ON (judgment_id) * FROM judgments ORDER BY judgment_id, NOT valid, created_at DESC
    """,
    "current_ratings": """
        SELECT DISTINCT ON (rating_id) * FROM ratings ORDER BY rating_id, NOT valid, created_at DESC
    """,
    # the latest filter run's pairs (filter re-runs recompute pairs over the whole dataset)
    "current_pairs": """
        SELECT * FROM pairs
        WHERE run_id = (SELECT run_id FROM pairs ORDER BY created_at DESC LIMIT 1)
    """,
    "current_filter_drops": """
        SELECT * FROM filter_drops
        WHERE run_id = (SELECT run_id FROM filter_drops ORDER BY created_at DESC LIMIT 1)
    """,
    # the curated set: pairs selected by the latest select run, with their texts
    "curated_pairs": """
        WITH latest AS (
            SELECT * FROM selections
            WHERE run_id = (SELECT run_id FROM selections ORDER BY created_at DESC LIMIT 1)
              AND selected
        ),
        pair AS (SELECT DISTINCT ON (pair_id) * FROM pairs ORDER BY pair_id, created_at DESC)
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
        JOIN (SELECT DISTINCT ON (prompt_id) * FROM prompts) p ON p.prompt_id = pair.prompt_id
        JOIN current_responses c ON c.response_id = pair.chosen_id
        JOIN current_responses r ON r.response_id = pair.rejected_id
        ORDER BY latest.rank
    """,
    # per-judge position bias over pairwise judgments (both orders valid)
    "judge_position_bias": """
        SELECT judge, judge_model, criterion, count(*) AS judgments,
               avg(CASE WHEN (p_first_ab > 0.5) = (p_first_ba > 0.5) THEN 1.0 ELSE 0.0 END)
                   AS position_flip_rate,
               avg((p_first_ab + p_first_ba) / 2) AS first_position_pref,
               avg(abs(p_a - 0.5) * 2) AS mean_confidence
        FROM current_judgments WHERE valid
        GROUP BY ALL ORDER BY judge, criterion
    """,
    "filter_report": """
        SELECT d.reason, coalesce(d.judge, '(jury)') AS judge,
               coalesce(ra.generator, '?') AS generator, count(*) AS drops
        FROM current_filter_drops d
        LEFT JOIN current_responses ra
               ON ra.response_id = d.response_a
        GROUP BY ALL ORDER BY drops DESC
    """,
    "quarantine_summary": """
        SELECT stage, reason, count(*) AS rows FROM quarantine GROUP BY ALL ORDER BY rows DESC
    """,
}
