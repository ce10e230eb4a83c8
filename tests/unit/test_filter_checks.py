"""The check registry (prefcurate.tasks.checks), primary-reason reports, abstention,
single-order verdicts, the ``judged`` pair strategy, and the filter_report view's agreement
with :func:`filter_report_frame`. Pure polars (and an in-memory DuckDB for the views)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import yaml
from prefcurate.schemas import tables
from prefcurate.schemas.expectations import TABLE_RULES
from prefcurate.schemas.views import REPORT_VIEWS
from prefcurate.tasks import checks as C
from prefcurate.tasks import filter as F

from tests.support.rows import judgment, judgments, ratings, responses
from tests.unit.test_filter import NO_RATINGS, run

ROOT = Path(__file__).resolve().parents[2]


# --- the registry -----------------------------------------------------------------------
def test_registry_is_the_one_source_of_checks_and_reasons():
    assert F.CHECK_REASONS == tuple(c.reason for c in C.CHECKS)
    assert len(set(F.REASONS)) == len(F.REASONS)
    fields = F.FilterParams.model_fields
    for check in C.configurable_checks():
        # every configurable check has its config field, holding that check's parameters
        assert fields[check.config_key].annotation is check
        assert isinstance(getattr(F.FilterParams(), check.config_key), check)
    # the always-on checks have no config field, and run unless nothing else does
    always = [c for c in C.CHECKS if c.config_key is None]
    assert {c.reason for c in always} == {F.NO_VALID_JUDGMENT, F.MISSING_RESPONSE, F.TIE}
    enabled = [c.reason for c in F.FilterParams().checks()]
    assert enabled == [c.reason for c in C.CHECKS if c.reason != F.SELF_PREFERENCE]  # off by default
    off = F.FilterParams(confidence={"enabled": False}).checks()
    assert F.LOW_CONFIDENCE not in {c.reason for c in off}


def test_existing_configs_still_load():
    configs = sorted((ROOT / "examples").glob("*.yaml"))
    assert {"quickstart.yaml", "gpu_cluster.yaml"} <= {c.name for c in configs}
    for path in configs:
        section = yaml.safe_load(path.read_text()).get("filter") or {}
        params = F.FilterParams(**section)
        assert params.model_dump(mode="json")["strategy"] == section.get("strategy", "best_vs_worst")
    with pytest.raises(ValueError):
        F.FilterParams(position_flip={"no_such_param": 1})


def test_unregistered_reasons_are_refused():
    drops = F._drop_rows(pl.DataFrame({"prompt_id": ["p"], "response_a": ["A"], "response_b": ["B"]}),
                         "made_up", pl.lit(1.0), None)
    assert C.unregistered_reasons(drops) == ["made_up"]
    with pytest.raises(ValueError, match="made_up"):
        C.require_registered_reasons(drops)
    # the filter_drops contract names the same registry
    (rule,) = [r for r in TABLE_RULES["filter_drops"] if r.kind == "one_of"]
    assert rule.columns == ("reason",) and set(rule.values) == set(F.REASONS)


def test_a_new_check_is_one_class():
    class FirstPromptCheck(C.Check):
        reason = "made_up"

        def drops(self, candidates, verdicts):
            return C._drop_rows(candidates.filter(pl.col("prompt_id") == "p1"), self.reason, pl.lit(1), None)

    jud = judgments(judgment("A", "B", 0.9))
    frame, verdicts = F._candidate_frame(jud, _no_ratings(), responses(), F.FilterParams())
    out = FirstPromptCheck().drops(frame, verdicts)
    assert out.columns == [f.name for f in tables.FILTER_DROPS if f.name not in F._PROVENANCE]
    assert out["reason"].to_list() == ["made_up"]


def _no_ratings() -> pl.DataFrame:
    return NO_RATINGS


# --- primary reasons --------------------------------------------------------------------
def test_hard_verdict_flip_counts_once_under_its_primary_reason():
    # a hard judge says "first" in both orders: p_a = 0.5 exactly, so the flip also leaves a
    # tie, an abstention and low confidence behind; the pair is counted once
    jud = judgments(judgment("A", "B", 1.0, p_ba=1.0), judgment("A", "C", 1.0, p_ba=0.0))
    pairs, drops, report = run(jud)
    assert {"A", "C"} == set(pairs.select("chosen_id", "rejected_id").row(0))
    reasons = C.pair_reasons(drops).row(0, named=True)
    assert reasons["primary_reason"] == F.POSITION_FLIP
    assert reasons["all_reasons"] == [F.POSITION_FLIP, F.TIE, F.JUDGE_ABSTAINED, F.LOW_CONFIDENCE]
    assert report["drops_per_reason"][F.POSITION_FLIP] == 1
    assert report["drops_per_reason"][F.TIE] == report["drops_per_reason"][F.LOW_CONFIDENCE] == 0
    assert report["failed_per_reason"][F.TIE] == report["failed_per_reason"][F.LOW_CONFIDENCE] == 1
    assert sum(report["drops_per_reason"].values()) == 1


def test_unregistered_reason_sorts_last_in_pair_reasons():
    base = pl.DataFrame({"prompt_id": ["p"], "response_a": ["A"], "response_b": ["B"]})
    drops = pl.concat([F._drop_rows(base, r, pl.lit(1.0), None) for r in ("zz_unknown", F.TRUNCATED, F.TIE)])
    row = C.pair_reasons(drops).row(0, named=True)
    assert row["primary_reason"] == F.TIE
    assert row["all_reasons"] == [F.TIE, F.TRUNCATED, "zz_unknown"]


# --- abstention -------------------------------------------------------------------------
def test_a_flipped_judge_abstains_instead_of_disagreeing():
    jud = judgments(
        judgment("A", "B", 0.9, judge="j1"),  # consistent: A
        judgment("A", "B", 1.0, p_ba=1.0, judge="j2"),  # hard flip: the first slot both times
    )
    pairs, drops, report = run(jud)
    assert drops.height == 0 and pairs.height == 1  # 1 of 2 abstained: no disagreement
    assert report["abstentions"] == {"verdicts": 1, "flipped": 1, "tied": 0, "pairs": 1}
    assert report["judges"]["j2"]["abstained"] == 1
    # a real split between two judges that took sides still fails
    split = judgments(judgment("A", "B", 0.9, judge="j1"), judgment("A", "B", 0.1, judge="j2"),
                      judgment("A", "B", 0.5, judge="j3"))
    _, drops, _ = run(split, confidence={"enabled": False})
    row = drops.filter(pl.col("reason") == F.JURY_DISAGREEMENT).row(0, named=True)
    assert row["detail"] == "1 for a, 1 for b, of 2 judges; 1 abstained"


def test_too_many_abstentions_fail_judge_abstained():
    jud = judgments(
        judgment("A", "B", 0.9, judge="j1"),
        judgment("A", "B", 0.8, p_ba=0.7, judge="j2"),  # soft flip (p_a 0.55): abstains
        judgment("A", "B", 0.5, judge="j3"),  # tie: abstains
    )
    _, drops, report = run(jud, confidence={"enabled": False})
    rows = drops.filter(pl.col("reason") == F.JUDGE_ABSTAINED).sort("judge")
    assert rows["judge"].to_list() == ["j2", "j3"]
    assert rows["value"].to_list() == pytest.approx([2 / 3, 2 / 3])
    assert rows["detail"][0].startswith("flipped") and rows["detail"][1].startswith("balanced p_a is 0.5")
    assert F.POSITION_FLIP not in set(drops["reason"].to_list())  # 1 of 3 flipped: allowed
    assert F.JURY_DISAGREEMENT not in set(drops["reason"].to_list())  # one side taken: no split
    _, drops, _ = run(jud, confidence={"enabled": False}, abstention={"max_abstain_share": 0.7})
    assert F.JUDGE_ABSTAINED not in set(drops["reason"].to_list())


# --- single-order verdicts --------------------------------------------------------------
def single_order(a, b, p, order="ab", judge="j1"):
    """A judgment with one presentation order only (as imported), stored without p_a."""
    row = judgment(a, b, 0.5, judge=judge)
    row.update(p_first_ab=p if order == "ab" else None, p_first_ba=p if order == "ba" else None, p_a=None)
    return row


def test_single_order_judgments_are_first_class():
    jud = judgments(
        single_order("A", "B", 0.9),  # a-first: A
        single_order("A", "C", 0.8, order="ba"),  # b-first, P("A") = P(C) 0.8: C
        judgment("A", "D", 0.9, p_ba=0.9),  # both orders, flips: the position check still runs
    )
    pairs, drops, report = run(jud, strategy="judged")
    kept = set(pairs.select("chosen_id", "rejected_id").iter_rows())
    assert kept == {("A", "B"), ("C", "A")}
    assert pairs.filter(pl.col("chosen_id") == "C")["p_chosen"].item() == pytest.approx(0.8)
    assert F.POSITION_FLIP in {r for r in drops.filter(pl.col("response_b") == "D")["reason"]}
    assert report["position_checks_not_applicable"] == {"verdicts": 2, "pairs": 2}
    judge = report["judges"]["j1"]
    assert judge["verdicts"] == 3 and judge["single_order_verdicts"] == 2
    assert judge["position_flip_rate"] == pytest.approx(1.0)  # over its one both-order verdict


def test_single_order_only_judge_has_no_position_stats():
    pairs, _, report = run(judgments(single_order("A", "B", 0.9)))
    assert pairs.height == 1
    assert report["judges"]["j1"]["position_flip_rate"] is None
    assert report["position_checks_not_applicable"] == {"verdicts": 1, "pairs": 1}


# --- the judged strategy ----------------------------------------------------------------
def test_judged_strategy_keeps_each_judged_pair():
    order = ["A", "B", "C", "D"]
    jud = judgments(
        *[judgment(x, order[j], 0.6 + 0.1 * (j - i)) for i, x in enumerate(order) for j in range(i + 1, 4)],
        judgment("E", "F", 0.5, prompt="p2"),  # a tie: still dropped, the checks apply
    )
    resp = pl.concat([responses(), responses(ids=("E", "F"), prompt="p2")])
    params = F.FilterParams(strategy="judged", margin=5.0)
    pairs, drops, report = F.apply_filters(jud, _no_ratings(), resp, params)
    assert pairs.height == 6 and set(pairs["strategy"]) == {"judged"}  # no cap, no margin cut
    assert (pairs["p_chosen"] > 0.5).all()
    assert F.NOT_SELECTED not in set(drops["reason"]) and F.BELOW_MARGIN not in set(drops["reason"])
    assert report["drops_per_reason"][F.TIE] == 1


# --- one filter report: the view and the function agree -----------------------------------
def _table(frame: pl.DataFrame, schema: pa.Schema, run_id: str) -> pa.Table:
    provenance = {"run_id": run_id, "stage": "filter", "code_version": "t",
                  "created_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC)}
    columns = {}
    for field in schema:
        if field.name in frame.columns:
            columns[field.name] = pa.array(frame[field.name].to_list(), type=field.type)
        elif field.name in provenance:
            columns[field.name] = pa.array([provenance[field.name]] * frame.height, type=field.type)
        elif field.name == "finish_reason":
            columns[field.name] = pa.array(["stop"] * frame.height, type=field.type)
        else:
            columns[field.name] = pa.nulls(frame.height, type=field.type)
    return pa.table(columns)


def _random_case(seed: int):
    rng = np.random.default_rng(seed)
    rows, resp = [], []
    for prompt in range(12):
        ids = [f"p{prompt}-{k}" for k in range(4)]
        resp.append(responses(
            ids=tuple(ids), prompt=f"p{prompt}", truncated=tuple(i for i in ids if rng.random() < 0.15),
            generator={i: ["g1", "g2", "g3"][int(rng.integers(3))] for i in ids},
        ))
        for i in range(4):
            for j in range(i + 1, 4):
                for judge in ("j1", "j2", "j3"):
                    hard = rng.random() < 0.5  # hard verdicts flip to exact ties
                    p_ab, p_ba = (float(rng.integers(2)), float(rng.integers(2))) if hard else (
                        float(rng.uniform(0.05, 0.95)), float(rng.uniform(0.05, 0.95)))
                    rows.append(judgment(ids[i], ids[j], p_ab, p_ba=p_ba, judge=judge, prompt=f"p{prompt}"))
    return judgments(*rows), pl.concat(resp)


def _query(con, sql: str) -> pl.DataFrame:
    return con.sql(sql).pl()


def test_filter_report_view_agrees_with_the_function():
    jud, resp = _random_case(3)
    # a response missing from the responses table: its generator is unknown ("?") in both
    resp = resp.filter(pl.col("response_id") != "p0-3")
    params = F.FilterParams(strategy="all_above_margin", pairs_per_prompt=2)
    pairs, drops, report = F.apply_filters(jud, _no_ratings(), resp, params)
    assert report["failed_per_reason"][F.POSITION_FLIP] > 0 and report["failed_per_reason"][F.TIE] > 0

    con = duckdb.connect()
    data = {"filter_drops": drops, "pairs": pairs, "responses": resp}
    for name, schema in tables.TABLES.items():
        frame = data.get(name)
        # an older run's drops: the views read the latest run only
        table = _table(frame, schema, "r2") if frame is not None else schema.empty_table()
        if name == "filter_drops":
            old = _table(drops.head(3).with_columns(reason=pl.lit(F.TRUNCATED)), schema, "r1")
            old = old.set_column(old.schema.get_field_index("created_at"), "created_at",
                                 pa.array([dt.datetime(2025, 1, 1, tzinfo=dt.UTC)] * 3,
                                          type=schema.field("created_at").type))
            table = pa.concat_tables([table, old])
        con.register(name, table)
    for name, sql in REPORT_VIEWS.items():
        con.execute(f"CREATE VIEW {name} AS {sql}")

    view = _query(con, "SELECT * FROM filter_report")
    expected = F.filter_report_frame(drops, pairs, resp)
    key = ["reason", "judge", "generator"]
    assert view.columns == expected.columns
    assert view.sort(key, nulls_last=True).rows() == expected.sort(key, nulls_last=True).rows()

    per_pair = _query(con, "SELECT * FROM filter_pair_reasons")
    assert per_pair.rows() == C.pair_reasons(drops).rows()
    # the report's primary counts are the view's too
    primary = con.execute("SELECT primary_reason, count(*) FROM filter_pair_reasons GROUP BY ALL").fetchall()
    assert dict(primary) == {r: n for r, n in report["drops_per_reason"].items() if n}


def test_with_the_position_check_off_a_flip_is_no_abstention():
    # the demo config turns position_flip off for a judge that nearly always flips: its
    # flipped verdicts then count at their balanced value, as before abstention existed
    jud = judgments(
        judgment("A", "B", 0.9, p_ba=0.8, judge="j1"), judgment("A", "B", 0.95, p_ba=0.7, judge="j2")
    )
    pairs, drops, report = run(jud, position_flip={"enabled": False}, confidence={"min_margin": 0.0})
    assert pairs.height == 1 and drops.height == 0
    assert report["abstentions"]["verdicts"] == 0
    _, drops, _ = run(jud, confidence={"min_margin": 0.0})
    assert {F.POSITION_FLIP, F.JUDGE_ABSTAINED} <= set(drops["reason"])


# --- honest baselines -------------------------------------------------------------------
def test_baselines_treat_a_tie_as_a_tie():
    resp = pl.concat([responses(ids=("A", "B")), responses(ids=("C", "D"), prompt="p2")])
    rat = pl.concat([ratings({"A": 3.0, "B": 3.0}), ratings({"C": 4.0, "D": 2.0}, prompt="p2")])
    pairs = F.argmax_baseline_pairs(rat, resp)
    assert pairs.select("chosen_id", "rejected_id").rows() == [("C", "D")]  # p1's scores tie
    jud = judgments(judgment("A", "B", 0.5), judgment("C", "D", 0.3, prompt="p2"))
    single = F.single_order_pairs(jud, per_prompt="all")
    assert single.select("chosen_id", "rejected_id").rows() == [("D", "C")]  # 0.5 orients nothing


def test_the_filter_drops_contract_flags_an_unregistered_reason():
    from prefcurate.schemas.expectations import validate_batch

    _, drops, _ = run(judgments(judgment("A", "B", 0.5), judgment("A", "C", 0.9), judgment("A", "D", 0.8)))
    assert validate_batch("filter_drops", drops).bad_row_mask.sum() == 0  # what the filter writes passes
    first = pl.int_range(pl.len()) == 0
    bad = drops.with_columns(reason=pl.when(first).then(pl.lit("made_up")).otherwise("reason"))
    result = validate_batch("filter_drops", bad)
    assert result.bad_row_mask.tolist() == [True] + [False] * (bad.height - 1)
    assert not result.batch_level_failure


def test_status_shows_abstentions_and_single_order_verdicts(tmp_path):
    from prefcurate.report import status_text
    from prefcurate.store import Store

    _, _, report = run(judgments(single_order("A", "B", 0.9), judgment("A", "C", 0.9, p_ba=0.9)))
    store = Store.init(tmp_path / "ds")
    run_id = store.start_run("filter")
    store.record_reports(run_id, "filter", {"report": {"unit": report}})
    store.finish_run(run_id, "completed", {"pairs": report["pairs"]}, {"seconds": 1.0})
    text = status_text(store)
    assert "judges abstained (flipped or tied) on 1 verdicts of 1 pairs" in text
    assert "position checks not applicable to 1 single-order verdicts (1 pairs" in text
