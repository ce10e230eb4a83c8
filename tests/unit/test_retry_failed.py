"""Failed model calls are stored, asked again by the next run, and then superseded.

Runs the generate and annotate steps unit by unit (no Prefect) on a real store, with a
scripted test double for the engine whose first call for one prompt fails.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pytest

from prefcurate.config import load_config
from prefcurate.inference.base import ChoiceScore, Generation
from prefcurate.steps import model_stages
from prefcurate.steps.base import context_for
from prefcurate.steps.engines import TimedEngine
from prefcurate.store import Store
from tests.support.engines import ScriptedEngine
from tests.unit.stage_runs import run_pending_units as _run_stage

FLAKY_PROMPT = "What is flaky?"


class FlakyScriptedEngine(ScriptedEngine):
    """Scripted test double: the first generate and the first verdict calls about
    FLAKY_PROMPT fail as a dropped connection would; later calls answer."""

    def __init__(self):
        super().__init__(choice_fn=lambda prompt, options: [0.7] + [0.3 / (len(options) - 1)] * (len(options) - 1),
                         generate_fn=lambda request, i: f"answer {i} to {request.prompt[-20:]}")
        self.failed_generate = self.failed_choice = False

    def generate(self, requests):
        out = super().generate(requests)
        for index, request in enumerate(requests):
            if FLAKY_PROMPT in request.prompt and not self.failed_generate:
                self.failed_generate = True
                out[index] = Generation([], 0, 0.0, "connection reset by peer")
        return out

    def score_choices(self, requests):
        out = super().score_choices(requests)
        for index, request in enumerate(requests):
            if FLAKY_PROMPT in request.prompt and not self.failed_choice:
                self.failed_choice = True
                out[index] = ChoiceScore((), error="timeout after 60 s")
        return out




@pytest.fixture
def dataset(tmp_path, monkeypatch):
    engine = FlakyScriptedEngine()
    monkeypatch.setattr(model_stages, "engine_for", lambda pools, name: TimedEngine(engine))
    store = Store.init(tmp_path / "ds")
    prompts = pl.DataFrame({
        "prompt_id": ["p1", "p2"], "prompt": ["What is steady?", FLAKY_PROMPT], "source_file": ["f", "f"],
        "source_record": [1, 2], "char_len": [15, len(FLAKY_PROMPT)],
    })
    store.register([store.write("prompts", prompts, key="shard-0", run_id="r0", stage="ingest")])
    config = load_config("examples/quickstart.yaml", {
        "annotate.judges": [{"name": "judge", "pool": "judges", "template": "pairwise_v1"}],
        "annotate.rubric_aspects": [], "annotate.calibration_pairs": 1, "contracts": False,
    })
    return store, context_for(store.root, config, "r1")


def test_a_failed_response_is_generated_again_by_the_next_run(dataset):
    store, ctx = dataset
    assert _run_stage("generate", ctx, store) == 1
    failed = store.query("SELECT response_id, error FROM responses WHERE finish_reason = 'error'")
    assert failed["error"].to_list() == ["connection reset by peer"]
    responses = store.count("responses")

    assert _run_stage("generate", ctx, store) == 1  # the retry unit, for that one response
    assert store.count("responses") == responses + 1  # the failed row stays: nothing is lost
    current = store.query("SELECT * FROM current_responses")
    assert current.height == responses and (current["finish_reason"] != "error").all()
    assert failed["response_id"][0] in current["response_id"].to_list()

    assert _run_stage("generate", ctx, store) == 0  # nothing failed is left: nothing to do


def test_a_failed_verdict_is_asked_again_and_the_valid_one_counts(dataset):
    store, ctx = dataset
    _run_stage("generate", ctx, store)
    _run_stage("generate", ctx, store)
    assert _run_stage("annotate", ctx, store) == 2  # one prompt shard + calibration
    invalid = store.query("SELECT judgment_id, error FROM judgments WHERE NOT valid")
    assert invalid.height == 1 and "timeout" in invalid["error"][0]

    assert _run_stage("annotate", ctx, store) == 1  # the retry unit
    current = store.query("SELECT judgment_id, valid FROM current_judgments")
    assert current["valid"].all()
    assert invalid["judgment_id"][0] in current["judgment_id"].to_list()
    assert store.count("judgments") == current.height + 1
    assert _run_stage("annotate", ctx, store) == 0


def test_the_filter_reads_a_shards_current_rows_only(dataset):
    from prefcurate.steps.filter import _RESPONSE_COLUMNS, _read_by_response

    store, ctx = dataset
    _run_stage("generate", ctx, store)
    _run_stage("generate", ctx, store)  # the failed response's retry: two rows, one id
    flaky = store.query("SELECT DISTINCT response_id FROM responses WHERE finish_reason = 'error'")["response_id"]
    some = pl.concat([flaky, store.query("SELECT response_id FROM current_responses LIMIT 1")["response_id"]])
    read = _read_by_response(store, "responses", _RESPONSE_COLUMNS, "response_id", some)
    view = store.query(f"SELECT {', '.join(_RESPONSE_COLUMNS)} FROM current_responses "
                       "WHERE response_id IN (SELECT unnest($1::VARCHAR[])) ORDER BY response_id", [some.to_list()])
    assert read.equals(view) and read.height == some.n_unique()
    assert read.filter(pl.col("response_id") == flaky[0])["text"].item() != ""  # the retry's text, not the error


def test_curated_pairs_and_select_candidates_read_the_current_rows_of_their_pairs(dataset):
    """They narrow each table to their pairs' ids before the one-row-per-id choice (so they do
    not order every response): the result must be the plain definition's, retried
    responses included, across several filter and select runs."""
    from prefcurate.steps.score_select import _candidate_pairs

    store, ctx = dataset
    _run_stage("generate", ctx, store)
    _run_stage("generate", ctx, store)  # the flaky response: a failed row and its retry
    responses = store.query("SELECT response_id, prompt_id FROM current_responses ORDER BY prompt_id, response_id")
    by_prompt = responses.group_by("prompt_id", maintain_order=True).agg("response_id").rows()
    flaky = store.query("SELECT DISTINCT response_id FROM responses WHERE finish_reason = 'error'")["response_id"][0]

    def pairs(run: str, picks: list[tuple[str, int, int]]) -> pl.DataFrame:
        rows = [(f"{prompt}-{a}-{b}", prompt, ids[a], ids[b]) for prompt, ids in by_prompt
                for p, a, b in picks if p == prompt]
        frame = pl.DataFrame(rows, schema=["pair_id", "prompt_id", "chosen_id", "rejected_id"], orient="row")
        return frame.with_columns(strategy=pl.lit("best_worst"), p_chosen=pl.lit(0.8), margin=pl.lit(0.3))

    flaky_prompt = responses.filter(pl.col("response_id") == flaky)["prompt_id"][0]
    flaky_index = dict(by_prompt)[flaky_prompt].index(flaky)
    other = 1 - flaky_index
    # an older filter run, then the latest one (whose pairs the candidates are)
    for run, picks in (("f1", [("p1", 0, 1)]), ("f2", [("p1", 1, 0), (flaky_prompt, flaky_index, other)])):
        store.register([store.write("pairs", pairs(run, picks), key=f"pairs-{run}", run_id=run, stage="filter")])
    latest_pairs = store.query("SELECT pair_id FROM current_pairs ORDER BY pair_id")["pair_id"].to_list()
    for run, selected in (("s1", latest_pairs[:1]), ("s2", latest_pairs)):
        selections = pl.DataFrame({"pair_id": latest_pairs, "selected": [p in selected for p in latest_pairs],
                                   "method": "qd", "rank": list(range(len(latest_pairs)))})
        store.register([store.write("selections", selections, key=f"sel-{run}", run_id=run, stage="select")])

    # the plain definition, in polars over the whole tables: the latest select run's selected
    # pairs, each pair's newest row, its prompt and its two current responses
    latest_select = store.query("SELECT * FROM selections").filter(
        pl.col("run_id") == pl.col("run_id").sort_by("created_at").last(), pl.col("selected"))
    newest_pairs = store.query("SELECT * FROM pairs").sort("created_at").unique("pair_id", keep="last")
    texts = store.query("SELECT response_id, text, generator FROM current_responses")
    expected = (latest_select.select("pair_id", "rank", pl.col("run_id").alias("select_run_id"))
                .join(newest_pairs.select("pair_id", "prompt_id", "chosen_id", "rejected_id",
                                          pl.col("run_id").alias("filter_run_id")), on="pair_id")
                .join(store.query("SELECT prompt_id, prompt FROM prompts"), on="prompt_id")
                .join(texts.rename({"response_id": "chosen_id", "text": "chosen", "generator": "chosen_generator"}),
                      on="chosen_id")
                .join(texts.drop("generator").rename({"response_id": "rejected_id", "text": "rejected"}),
                      on="rejected_id")
                .sort("rank"))
    curated = store.query("SELECT * FROM curated_pairs")
    assert curated.select(expected.columns).equals(expected)
    assert curated.height == 2 and set(curated["select_run_id"]) == {"s2"}
    assert curated.filter(pl.col("chosen_id") == flaky)["chosen"].item() != ""  # the retry's text
    candidates = _candidate_pairs(store)
    assert candidates.equals(
        expected.filter(pl.col("pair_id").is_in(latest_pairs)).sort("pair_id")
        .select("pair_id", "prompt_id", "prompt", "chosen", "rejected", "chosen_id", "rejected_id"))


def test_the_filter_shards_read_from_the_partitioned_copy_what_the_tables_hold(tmp_path, monkeypatch):
    """The filter step copies responses and ratings once, partitioned by prompt range, and each
    shard reads its rows there: the same rows, row for row, as its query over the whole tables
    (retried responses and judgments included), however the shards cut the prompts."""
    from prefcurate.steps.filter import _SHARD_TABLES, _PartitionedShards, _read_by_response

    engine = FlakyScriptedEngine()
    monkeypatch.setattr(model_stages, "engine_for", lambda pools, name: TimedEngine(engine))
    store = Store.init(tmp_path / "ds")
    texts = ["What is steady?", FLAKY_PROMPT, "Why is the sky blue?", "Name a prime.", "Say hello."]
    prompts = pl.DataFrame({"prompt_id": [f"p{k}" for k in range(5)], "prompt": texts, "source_file": "f",
                            "source_record": list(range(1, 6)), "char_len": [len(t) for t in texts]})
    store.register([store.write("prompts", prompts, key="shard-0", run_id="r0", stage="ingest")])
    config = load_config("examples/quickstart.yaml", {
        "annotate.judges": [{"name": "judge", "pool": "judges", "template": "pairwise_v1"}],
        "annotate.calibration_pairs": 1, "contracts": False,
    })
    ctx = context_for(store.root, config, "r1")
    for stage in ("generate", "generate", "annotate", "annotate"):  # each failed call asked again
        _run_stage(stage, ctx, store)
    assert store.count("ratings") > 0
    judgments = store.query("SELECT prompt_id, response_a, response_b FROM current_judgments")
    retried = store.query("SELECT DISTINCT response_id FROM responses WHERE finish_reason = 'error'")["response_id"]
    assert retried.len() == 1
    for size in (1, 2, 5):
        shards = _PartitionedShards(store, judgments, size, tmp_path / f"copy-{size}")
        for prompt_ids in ([f"p{k}" for k in range(5)], ["p1"], ["p0", "p3"]):
            ids = (judgments.filter(pl.col("prompt_id").is_in(prompt_ids))
                   .select(pl.concat_list("response_a", "response_b").explode())["response_a"].unique())
            ratings, responses = shards.read(ids)
            for table, got in (("ratings", ratings), ("responses", responses)):
                columns, order = _SHARD_TABLES[table]
                assert got.equals(_read_by_response(store, table, columns, order, ids)), (size, prompt_ids, table)
            assert responses.height == ids.len() and ratings.height > 0
            if "p1" in prompt_ids:
                assert retried[0] in responses["response_id"].to_list()



def test_each_current_rows_choice_reads_only_its_choice_columns():
    """A read narrowed to ``choice_columns`` (the score stage's ids, the filter's partitioned
    copy) can still make the choice: a preference that orders by another column fails here."""
    import duckdb
    from prefcurate.schemas.tables import TABLES
    from prefcurate.schemas.views import CURRENT_ROWS, choice_columns, current_rows_sql

    con = duckdb.connect()
    for table in CURRENT_ROWS:
        narrowed = pa.schema([TABLES[table].field(name) for name in choice_columns(table)]).empty_table()
        con.register(table, narrowed)
        assert con.sql(current_rows_sql(table)).fetchall() == []
