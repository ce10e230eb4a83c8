"""Planning with one grouped query per table plans exactly what the per-shard queries did.

A real store with four prompt shards, built unit by unit with a scripted test double for the
engine: some units finished, some left failed responses and verdicts, and one prompt shard
arrived after the stages ran (missing). The per-shard form (``_good_ids``/``_failed_ids``
per prompt shard, as ``plan()`` used to query) is the reference.
"""

from __future__ import annotations

import shutil

import polars as pl
import pytest

from prefcurate.config import load_config
from prefcurate.inference.base import ChoiceScore, Generation
from prefcurate.steps import get_step, model_stages
from prefcurate.steps.base import context_for
from prefcurate.steps.engines import TimedEngine
from prefcurate.store import Store
from tests.support.catalog_opens import count_catalog_opens
from tests.support.engines import ScriptedEngine
from tests.unit.stage_runs import run_pending_units as _run_pending

FLAKY = ("flaky one", "flaky two")


class FailsOnceEngine(ScriptedEngine):
    """Scripted test double: the first generate and verdict call about each FLAKY prompt fails."""

    def __init__(self):
        super().__init__(choice_fn=lambda prompt, options: [0.7] + [0.3 / (len(options) - 1)] * (len(options) - 1),
                         generate_fn=lambda request, i: f"answer {i} to {request.prompt[-20:]}")
        self.failed: set[tuple[str, str]] = set()

    def _fail_once(self, kind, requests, out, failure):
        for index, request in enumerate(requests):
            for word in FLAKY:
                if word in request.prompt and (kind, word) not in self.failed:
                    self.failed.add((kind, word))
                    out[index] = failure
        return out

    def generate(self, requests):
        return self._fail_once("generate", requests, super().generate(requests),
                               Generation([], 0, 0.0, "connection reset by peer"))

    def score_choices(self, requests):
        return self._fail_once("choice", requests, super().score_choices(requests),
                               ChoiceScore((), error="timeout after 60 s"))


def _prompts(shard: int, texts: list[str]) -> pl.DataFrame:
    return pl.DataFrame({
        "prompt_id": [f"p{shard}-{i}" for i in range(len(texts))], "prompt": texts,
        "source_file": ["f"] * len(texts), "source_record": list(range(len(texts))),
        "char_len": [len(t) for t in texts],
    })




def _ids_by_shard_per_shard_queries(store, prompt_shards, table, id_column, ok):
    """The earlier form: a good-id and a failed-id query per prompt shard."""
    good, failed = {}, {}
    for (path,), frame in prompt_shards.group_by("path"):
        ids = frame["prompt_id"].to_list()
        if found := model_stages._good_ids(store, table, id_column, ok, ids):
            good[path] = found
        if found := model_stages._failed_ids(store, table, id_column, ok, ids):
            failed[path] = found
    return good, failed


def _config():
    return load_config("examples/quickstart.yaml", {
        "annotate.judges": [{"name": "judge", "pool": "judges", "template": "pairwise_v1"}],
        "annotate.rubric_aspects": [], "annotate.calibration_pairs": 1, "contracts": False,
    })


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Built once for the module (planning writes only its lookups' memo); a test that writes copies it."""
    with pytest.MonkeyPatch.context() as patch:
        engine = FailsOnceEngine()
        patch.setattr(model_stages, "engine_for", lambda pools, name: TimedEngine(engine))
        yield _build(tmp_path_factory.mktemp("plan") / "ds")


@pytest.fixture
def dataset(built):
    return built


def _build(root):
    store = Store.init(root)
    shards = [["steady a", "steady b"], ["flaky one", "steady c"], ["flaky two", "steady d"]]
    store.register([store.write("prompts", _prompts(i, texts), key=f"shard-{i}", run_id="r0", stage="ingest")
                    for i, texts in enumerate(shards)])
    ctx = context_for(store.root, _config(), "r1")
    _run_pending("generate", ctx, store)  # leaves failed responses in shards 1 and 2
    _run_pending("annotate", ctx, store)
    # a prompt shard that arrives after the stages ran: nothing of it exists yet
    store.register([store.write("prompts", _prompts(3, ["late one"]), key="shard-3", run_id="r2", stage="ingest")])
    return store, ctx


@pytest.mark.parametrize("stage", ["generate", "annotate"])
def test_grouped_planning_plans_the_same_units_and_pending_split(dataset, monkeypatch, stage):
    store, ctx = dataset
    step = get_step(stage)
    shutil.rmtree(store.root / "_plans", ignore_errors=True)  # no lookups remembered: both forms query
    grouped = step.plan(ctx)
    shutil.rmtree(store.root / "_plans")
    with monkeypatch.context() as patch:
        patch.setattr(model_stages, "_ids_by_shard", _ids_by_shard_per_shard_queries)
        per_shard = step.plan(ctx)
    assert [u.key for u in grouped] == [u.key for u in per_shard]
    assert [u.payload for u in grouped] == [u.payload for u in per_shard]
    todo, done = step.pending(ctx, grouped)
    old_todo, old_done = step.pending(ctx, per_shard)
    assert [u.key for u in todo] == [u.key for u in old_todo]
    assert [u.key for u in done] == [u.key for u in old_done]
    # the dataset holds all three cases, so the comparison above covers each of them
    assert any("retry_of" in u.payload for u in todo)  # failed rows to ask again
    assert done  # finished units
    late_shard = store.shards("prompts")[-1]["path"]
    assert late_shard in [u.payload.get("prompts_path") for u in todo]  # a missing unit


def test_grouped_ids_equal_the_per_shard_queries_for_every_table(dataset):
    store, _ = dataset
    prompt_shards = model_stages._prompt_ids_by_shard(store, store.shards("prompts"))
    assert prompt_shards.height == 7
    for table, id_column, ok in [("responses", "response_id", model_stages._RESPONSE_OK),
                                 ("judgments", "judgment_id", "valid"), ("ratings", "rating_id", "valid")]:
        grouped = model_stages._ids_by_shard(store, prompt_shards, table, id_column, ok)
        reference = _ids_by_shard_per_shard_queries(store, prompt_shards, table, id_column, ok)
        for new, old in zip(grouped, reference):
            assert {p: sorted(ids) for p, ids in new.items()} == {p: sorted(ids) for p, ids in old.items()}
    _, failed = model_stages._ids_by_shard(store, prompt_shards, "responses", "response_id",
                                           model_stages._RESPONSE_OK)
    assert len(failed) == 2  # shards 1 and 2 each left a failed response


def test_a_unit_reads_the_rows_current_responses_holds_for_its_prompts(built, tmp_path, monkeypatch):
    store = Store.open(shutil.copytree(built[0].root, tmp_path / "ds"))
    ctx = context_for(store.root, _config(), "r3")
    engine = FailsOnceEngine()
    engine.failed = {(kind, word) for kind in ("generate", "choice") for word in FLAKY}  # they failed once
    monkeypatch.setattr(model_stages, "engine_for", lambda pools, name: TimedEngine(engine))
    _run_pending("generate", ctx, store)  # retries: the flaky responses now have a failed and a good row
    assert store.query("SELECT count(*) AS n FROM responses WHERE finish_reason = 'error'")["n"][0] == 2
    captured = []
    annotate = model_stages.annotate

    def capture(responses, prompts, *args, **kwargs):
        captured.append(responses)
        return annotate(responses, prompts, *args, **kwargs)

    monkeypatch.setattr(model_stages, "annotate", capture)
    step = get_step("annotate")
    for unit in step.plan(ctx):
        if "prompts_path" in unit.payload:
            step.compute(unit, ctx)
    read = pl.concat(captured).unique().sort("response_id")
    expected = store.query(
        "SELECT * EXCLUDE (run_id, stage, code_version, created_at) FROM current_responses"
    ).sort("response_id")
    assert read.equals(expected.select(read.columns))
    assert (read["finish_reason"] != "error").all()  # the good row of a retried response is the one read


@pytest.mark.parametrize("stage", ["generate", "annotate"])
def test_a_planned_units_lookups_read_its_files_without_opening_the_catalog(built, tmp_path, monkeypatch, stage):
    """A unit's reads of its own shard files need no catalog connection (15-25 ms each, and
    the file lock a registration waits on); the plan that named the files did need it."""
    store = Store.open(shutil.copytree(built[0].root, tmp_path / "ds"))
    ctx = context_for(store.root, _config(), "r3", catalog_checked=True)
    engine = FailsOnceEngine()
    monkeypatch.setattr(model_stages, "engine_for", lambda pools, name: TimedEngine(engine))
    step = get_step(stage)
    units = [u for u in step.plan(ctx) if "prompts_path" in u.payload]
    opened = count_catalog_opens(monkeypatch)
    outputs = [step.compute(unit, ctx)[0] for unit in units]
    assert len(units) >= 4 and opened == []  # (every prompt shard, and retries of failed rows)
    table = "responses" if stage == "generate" else "judgments"
    assert sum(out[table].height for out in outputs) > 0  # the units did read rows and asked the engine
