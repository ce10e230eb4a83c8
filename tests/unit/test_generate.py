"""Generate stage logic with a scripted engine: planning, re-runs, truncation, errors."""

from __future__ import annotations

import json

import polars as pl
import pytest
from prefcurate.schemas.ids import content_id
from prefcurate.schemas.tables import PROVENANCE, RESPONSES
from prefcurate.tasks.generate import (
    GenerateParams,
    GeneratorSpec,
    SamplingConfig,
    check_pools,
    plan_generation,
    response_id,
    run_generation,
    run_generators,
)

from prefcurate.inference.base import Completion, Generation
from tests.support.engines import ScriptedEngine


def _prompts() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "prompt_id": ["p1", "p2", "p3"],
            "prompt": ["Name a fruit.", "Add 2 and 3.", "Say hi."],
            "system_prompt": [None, "Answer in French.", None],
        }
    )


class RecordingEngine(ScriptedEngine):
    """Scripted engine that keeps the requests it was sent, batch by batch."""

    def __init__(self, generate_fn=None, model="scripted-gen"):
        super().__init__(generate_fn=generate_fn or (lambda r, i: f"{r.prompt}#{i}"), model=model)
        self.batches = []

    def generate(self, requests):
        self.batches.append(list(requests))
        return super().generate(requests)


def test_plan_covers_every_prompt_and_sample_and_skips_existing():
    spec = GeneratorSpec(name="g", n=2)
    plan = plan_generation(_prompts(), [spec])
    assert plan.height == 6
    assert plan["response_id"].n_unique() == 6
    assert sorted(plan.filter(pl.col("prompt_id") == "p1")["sample_index"].to_list()) == [0, 1]
    existing = plan.filter(pl.col("prompt_id") != "p2")["response_id"].to_list()
    missing = plan_generation(_prompts(), [spec], existing)
    assert missing["prompt_id"].to_list() == ["p2", "p2"]
    # the prompt's own system prompt wins; prompts without one get the generator's
    with_system = GeneratorSpec(name="g", n=1, system_prompt="Be brief.")
    planned = plan_generation(_prompts(), [with_system])
    systems = dict(planned.select("prompt_id", "system_prompt").iter_rows())
    assert systems == {"p1": "Be brief.", "p2": "Answer in French.", "p3": "Be brief."}


def test_ids_are_stable_across_n_and_change_with_sampling():
    two = GeneratorSpec(name="g", n=2)
    four = GeneratorSpec(name="g", n=4)
    assert response_id("p1", two, 1) == response_id("p1", four, 1)
    hotter = GeneratorSpec(name="g", n=2, sampling=SamplingConfig(temperature=1.2))
    assert response_id("p1", two, 0) != response_id("p1", hotter, 0)
    assert response_id("p1", two, 0) != response_id("p1", GeneratorSpec(name="h", n=2), 0)


def test_run_generation_returns_response_rows_with_the_table_columns():
    engine = RecordingEngine()
    spec = GeneratorSpec(name="g", n=2, sampling=SamplingConfig(max_tokens=32), chat_template=False)
    progress = []
    out = run_generation(
        _prompts(), spec, engine, batch_size=2, progress=lambda d, t: progress.append((d, t))
    )
    expected_columns = [f.name for f in RESPONSES if f.name not in {p.name for p in PROVENANCE}]
    assert out.columns == expected_columns
    assert out.height == 6
    assert out["response_id"].to_list() == plan_generation(_prompts(), [spec])["response_id"].to_list()
    assert set(out["model"]) == {"scripted-gen"} and set(out["generator"]) == {"g"}
    assert json.loads(out["sampling"][0])["max_tokens"] == 32
    assert out.filter(pl.col("prompt_id") == "p2").sort("sample_index")["text"].to_list() == [
        "Add 2 and 3.#0",
        "Add 2 and 3.#1",
    ]
    assert set(out["finish_reason"]) == {"stop"} and not out["truncated"].any()
    # one request per prompt asks for both samples; batches of 2 requests
    assert [len(b) for b in engine.batches] == [2, 1]
    assert all(r.params.n == 2 and r.chat is False for b in engine.batches for r in b)
    systems = {r.prompt: r.system_prompt for b in engine.batches for r in b}
    assert systems["Add 2 and 3."] == "Answer in French."
    assert progress == [(4, 6), (6, 6)]


def test_rerun_generates_only_missing_samples():
    spec = GeneratorSpec(name="g", n=2)
    first = run_generation(_prompts(), spec, RecordingEngine())
    engine = RecordingEngine()
    again = run_generation(_prompts(), spec, engine, first["response_id"].to_list())
    assert again.height == 0 and engine.batches == []
    more = GeneratorSpec(name="g", n=3)
    engine = RecordingEngine()
    extra = run_generation(_prompts(), more, engine, first["response_id"].to_list())
    assert extra["sample_index"].to_list() == [2, 2, 2]
    assert not set(extra["response_id"]) & set(first["response_id"])
    assert all(r.params.n == 1 for b in engine.batches for r in b)


def test_truncated_responses_are_kept_and_flagged():
    class CutEngine(RecordingEngine):
        def generate(self, requests):
            return [
                Generation(
                    [Completion("long text ...", "length", 32), Completion("short.", "stop", 2)], 7, 0.5
                )
                for _ in requests
            ]

    out = run_generation(_prompts(), GeneratorSpec(name="g", n=2), CutEngine())
    by_index = out.group_by("sample_index").agg(pl.col("truncated").all(), pl.col("finish_reason").first())
    flags = dict(by_index.select("sample_index", "truncated").iter_rows())
    assert flags == {0: True, 1: False}
    assert out["tokens_in"].to_list() == [7] * 6 and out["latency_s"].to_list() == [0.5] * 6


def test_failed_requests_become_error_rows():
    class FailingEngine(RecordingEngine):
        def generate(self, requests):
            return [
                Generation([], 0, 0.1, error="prompt_too_long: 2000 tokens")
                if "fruit" in r.prompt
                else Generation([Completion("ok", "stop", 1)], 3, 0.1)  # one of two samples
                for r in requests
            ]

    out = run_generation(_prompts(), GeneratorSpec(name="g", n=2), FailingEngine())
    failed = out.filter(pl.col("prompt_id") == "p1")
    assert failed["finish_reason"].to_list() == ["error", "error"]
    assert failed["text"].null_count() == 2 and failed["error"][0].startswith("prompt_too_long")
    short = out.filter(pl.col("prompt_id") == "p2").sort("sample_index")
    assert short["finish_reason"].to_list() == ["stop", "error"]
    assert "1 of 2 samples" in short["error"][1]


def test_seeded_generator_sends_one_reproducible_request_per_sample():
    spec = GeneratorSpec(name="g", n=3, sampling=SamplingConfig(seed=7))
    first, second = RecordingEngine(), RecordingEngine()
    run_generation(_prompts(), spec, first)
    run_generation(_prompts(), spec, second)
    seeds = [r.params.seed for b in first.batches for r in b]
    assert len(seeds) == 9 and len(set(seeds)) == 9
    assert seeds == [r.params.seed for b in second.batches for r in b]


def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="pool 'gpu-judges'"):
        check_pools([GeneratorSpec(name="g", pool="gpu-judges")], ["generators", "judges"])
    check_pools([GeneratorSpec(name="g")], ["generators"])
    with pytest.raises(ValueError, match="repeated: g"):
        GenerateParams(generators=[GeneratorSpec(name="g"), GeneratorSpec(name="g")])
    with pytest.raises(ValueError, match="prompt"):
        plan_generation(pl.DataFrame({"prompt_id": ["p"]}), [GeneratorSpec(name="g")])
    with pytest.raises(ValueError):
        GeneratorSpec(name="g", n=0)


def test_run_generators_runs_each_generator_on_its_engine():
    params = GenerateParams(generators=[GeneratorSpec(name="a", n=1), GeneratorSpec(name="b", n=2)])
    engines = {"a": RecordingEngine(model="model-a"), "b": RecordingEngine(model="model-b")}
    out = run_generators(_prompts(), params, engines)
    counts = dict(out.group_by("generator").agg(pl.len()).iter_rows())
    assert counts == {"a": 3, "b": 6}
    assert dict(out.select("generator", "model").unique().iter_rows()) == {"a": "model-a", "b": "model-b"}
    with pytest.raises(ValueError, match="no engine given for generator"):
        run_generators(_prompts(), params, {"a": engines["a"]})


def test_response_ids_and_seeds_are_the_content_ids_of_what_defines_them():
    """The formulas every stored response id and derived seed has had: made for all rows at
    once now, they must give what the per-row code gave (a re-run must find its old rows)."""
    spec = GeneratorSpec(name="g", n=3, sampling=SamplingConfig(seed=7))
    plan = plan_generation(_prompts(), [spec])
    assert plan.height == 9
    for row in plan.iter_rows(named=True):
        assert row["response_id"] == content_id("response", row["prompt_id"], spec.identity(), row["sample_index"])
        assert row["response_id"] == response_id(row["prompt_id"], spec, row["sample_index"])
    engine = RecordingEngine()
    run_generation(_prompts(), spec, engine)
    sent = sorted(r.params.seed for b in engine.batches for r in b)
    assert sent == sorted(int(content_id("seed", 7, p, i)[:8], 16) for p, i in plan.select("prompt_id", "sample_index").iter_rows())
