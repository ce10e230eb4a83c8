"""`prefcurate estimate` and `budget.max_usd`, with hosted (kind: openai) pools.

The stages run unit by unit (no Prefect) on a real store; the pools are real OpenAIPool
engines talking HTTP to the loopback OpenAI-API double of tests/support/openai_api.py.
"""

from __future__ import annotations

import json

import pytest
from prefcurate.tasks.estimate import BudgetExhausted, estimate_build, format_estimate, spent_usd

from prefcurate.config import load_config
from prefcurate.steps import get_step
from prefcurate.steps.base import context_for
from prefcurate.steps.engines import close_all
from prefcurate.store import Store
from tests.support.openai_api import KEY, KEY_ENV, StubAPI
from tests.support.rows import prompts
from tests.unit.stage_runs import run_pending_units

PRICE = {"input_usd_per_mtok": 2.0, "output_usd_per_mtok": 10.0}


@pytest.fixture
def stub(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    api = StubAPI()
    yield api
    close_all()  # the engines cached by engine_for talk to this server
    api.close()


def hosted_config(stub: StubAPI, **overrides):
    pool = {"kind": "openai", "base_url": stub.url, "model": "stub-model", "api_key_env": KEY_ENV,
            "price": PRICE, "backoff_base_s": 0.01}
    return load_config("examples/quickstart.yaml", {
        "pools": {"generators": pool, "judges": pool},
        "annotate.judges": [{"name": "judge", "pool": "judges", "template": "pairwise_v1"}],
        "annotate.rubric_aspects": [], "annotate.calibration_pairs": 1, "contracts": False,
        **overrides,
    })


def test_estimate_counts_the_requests_and_prices_them(stub):
    config = hosted_config(stub, **{"ingest.limit": 10, "stages": ["ingest", "generate", "annotate"]})
    rows = estimate_build(config)
    generate = [r for r in rows if r.stage == "generate"]
    # quickstart's generators: gemma-warm (n=2) and gemma-cool (n=1), seeded (one request per
    # sample), max_tokens 64, 10 prompts
    assert [(r.requests, r.tokens_out) for r in generate] == [(20, 10 * 2 * 64), (10, 10 * 1 * 64)]
    verdicts = [r for r in rows if r.stage == "annotate"]
    assert verdicts[0].requests == 10 * 3 * 1 * 2  # 3 responses -> 3 pairs, 1 criterion, 2 orders
    for row in rows:
        assert row.cost_usd == pytest.approx((row.tokens_in * 2.0 + row.tokens_out * 10.0) / 1e6)
    text = format_estimate(rows, config)
    assert "total" in text and "generator gemma-warm" in text


def test_a_position_free_judge_is_estimated_by_the_responses_it_scores(stub):
    # vLLM servers whose models live on the servers' hosts (so nothing is checked or started here)
    servers = {"kind": "servers", "urls": ["http://127.0.0.1:9"]}
    judges = [{"name": "rm", "pool": "rewards", "mode": "reward_model", "mode_options": {"temperature": 1.0}},
              {"name": "cdr", "pool": "logprobs", "mode": "density_ratio"}]
    hosted = hosted_config(stub).pools["generators"]
    config = load_config("examples/quickstart.yaml", {
        "pools": {"generators": hosted, "judges": hosted, "rewards": {**servers, "model": "/srv/models/rm"},
                  "logprobs": {**servers, "model": "/srv/models/lm"}},
        "ingest.limit": 10, "stages": ["ingest", "generate", "annotate"], "annotate.judges": judges,
        "annotate.criteria": ["overall", "helpfulness"], "annotate.rubric_aspects": ["helpfulness"],
        "annotate.calibration_pairs": 1, "contracts": False,
    })
    rows = {r.what: r for r in estimate_build(config) if r.stage == "annotate"}
    # 10 prompts x 3 responses, each scored once however many of its 3 pairs share it; no
    # verdict tokens, no both orders, no ratings (a position-free judge rates nothing)
    assert rows["judge rm: reward_model scores (1/response)"].requests == 10 * 3
    assert rows["judge cdr: density_ratio scores (2 criteria + 1 plain/response)"].requests == 10 * 3 * 3
    assert rows["judge rm: calibration (1 gold pairs)"].requests == 2
    assert rows["judge cdr: calibration (1 gold pairs)"].requests == 4
    fit = [r for what, r in rows.items() if what.startswith("judge cdr: temperature fit")]
    assert len(fit) == 1 and fit[0].requests > 0 and not any("temperature fit" in w for w in rows if "rm" in w)
    assert all(r.tokens_out == 0 for r in rows.values()) and not any("ratings" in w or "verdicts" in w for w in rows)


def test_the_estimate_command_prints_without_starting_anything(tmp_path, stub):
    from typer.testing import CliRunner

    from prefcurate.cli import app

    config = tmp_path / "hosted.yaml"
    pool = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": KEY_ENV, "price": PRICE}
    config.write_text(json.dumps({"dataset": str(tmp_path / "ds"), "pools": {"generators": pool, "judges": pool},
                                  "ingest": {"limit": 5}, "stages": ["ingest", "generate"],
                                  "budget": {"max_usd": 0.5}}))
    result = CliRunner().invoke(app, ["estimate", "-c", str(config)])
    assert result.exit_code == 0, result.output
    assert "generate" in result.output and "budget.max_usd = 0.5: the estimate is within it" in result.output
    assert not (tmp_path / "ds").exists() and stub.requests == []


def test_a_build_stops_at_the_budget_and_resumes_when_it_is_raised(tmp_path, stub):
    store = Store.init(tmp_path / "ds")
    two = prompts(["p1", "p2"], ["What is steady?", "What is calm?"])
    store.register([store.write("prompts", two, key="shard-0", run_id="r0", stage="ingest")])
    unlimited = hosted_config(stub)
    store.start_run("generate", {"config": unlimited.model_dump(mode="json")})  # as a flow records it
    assert run_pending_units("generate", context_for(store.root, unlimited, "r1"), store) >= 1
    metrics = store.query("SELECT * FROM request_metrics")
    assert metrics.height == len(stub.requests) and metrics["ok"].all()
    # the estimate for as many prompts counts exactly the generate requests made
    estimate = estimate_build(hosted_config(stub, **{"ingest.limit": two.height}))
    assert sum(r.requests for r in estimate if r.stage == "generate") == metrics.height
    spent = spent_usd(store)
    assert spent == pytest.approx(float(metrics["cost_usd"].sum())) and spent > 0
    # each answer bills 100 prompt tokens and 7 per sample
    assert spent == pytest.approx(((metrics["tokens_in"] * 2.0 + metrics["tokens_out"] * 10.0) / 1e6).sum())

    capped = hosted_config(stub, **{"budget.max_usd": spent / 2})
    ctx = context_for(store.root, capped, "r2")
    step = get_step("annotate")
    todo, _ = step.pending(ctx, step.plan(ctx))
    asked = len(stub.requests)
    with pytest.raises(BudgetExhausted, match=r"budget.max_usd reached: .* stage 'annotate' stopped before unit"):
        step.run_unit(todo[0], ctx)
    assert len(stub.requests) == asked  # nothing was sent
    assert len(step.pending(ctx, step.plan(ctx))[0]) == len(todo)  # every unit still pending

    raised = hosted_config(stub, **{"budget.max_usd": 100.0})
    assert run_pending_units("annotate", context_for(store.root, raised, "r3"), store) == len(todo)
    judgments = store.query("SELECT * FROM judgments")
    assert judgments.height > 0 and judgments["valid"].all()
    verdicts = store.count("request_metrics") - metrics.height
    assert sum(r.requests for r in estimate if r.stage == "annotate") == verdicts  # pairs x 2 + calibration x 2
    paths = store.query("SELECT verdict_path FROM request_metrics WHERE kind = 'score_choices'")["verdict_path"]
    assert paths.len() > 0 and (paths == "top_logprobs").all()

    from prefcurate.report import status_text

    assert "requests and spend of priced pools (USD)" in status_text(store)

    # the key went into Authorization headers only: no file of the dataset holds it
    for path in store.root.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in store.runs().write_json()
