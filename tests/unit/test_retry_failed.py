"""Failed model calls are stored, asked again by the next run, and then superseded.

Runs the generate and annotate steps unit by unit (no Prefect) on a real store, with a
scripted test double for the engine whose first call for one prompt fails.
"""

from __future__ import annotations

import polars as pl
import pytest

from prefcurate.config import load_config
from prefcurate.inference.base import ChoiceScore, Generation
from tests.support.engines import ScriptedEngine
from prefcurate.steps import model_stages
from prefcurate.steps.base import context_for
from prefcurate.steps.engines import TimedEngine
from prefcurate.store import Store
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
