"""The data-contract gate between stages: a batch that breaks its table's contract is split,
the bad rows go to `quarantine` naming the failed expectation, the good rows go on, and
nothing is lost. Real Great Expectations suites and a real dataset store (~10-30 s, most
of it importing GX).
"""

from __future__ import annotations

import json

import polars as pl
import pytest
from prefcurate.schemas.ids import content_id
from prefcurate.schemas.tables import TABLES

from prefcurate.config import PipelineConfig
from prefcurate.steps.base import Step, Unit, context_for, contract_gate
from prefcurate.store import Store

pytestmark = pytest.mark.integration

DIFFER = "expect_column_pair_values_to_differ(chosen_id, rejected_id)"
PROBABILITY = "expect_column_values_to_be_between(p_chosen)"
SAME_SIDES, BAD_PROBABILITY = 2, 4  # rows of the produced batch that break the contract


def produced_pairs(n: int = 7) -> pl.DataFrame:
    """A pairs batch as the filter stage would return it, with two rows that break the contract."""
    prompts = [content_id("prompt", i) for i in range(n)]
    chosen = [content_id("response", i, "a") for i in range(n)]
    rejected = [content_id("response", i, "b") for i in range(n)]
    rejected[SAME_SIDES] = chosen[SAME_SIDES]  # a response preferred over itself
    p_chosen = [0.9] * n
    p_chosen[BAD_PROBABILITY] = 1.3  # not a probability
    return pl.DataFrame({
        "pair_id": [content_id(p, c, r) for p, c, r in zip(prompts, chosen, rejected)],
        "prompt_id": prompts,
        "chosen_id": chosen,
        "rejected_id": rejected,
        "strategy": ["best_vs_worst"] * n,
        "p_chosen": p_chosen,
        "margin": [1.5] * n,
        "agreement": [1.0] * n,
        "chosen_score": [4.0] * n,
        "rejected_score": [2.0] * n,
        "chosen_generator": ["gen-a"] * n,
        "rejected_generator": ["gen-b"] * n,
    })


class ProducePairs(Step):
    """A stage whose one unit returns ``produced_pairs()``: the gate sits in ``run_unit``."""

    name = "filter"

    def plan(self, ctx):
        return [Unit(self.name, content_id("contract-gate-test"), ("pairs",))]

    def compute(self, unit, ctx):
        return {"pairs": produced_pairs()}, {"pairs": produced_pairs().height}


def _quarantined_pairs(store: Store) -> pl.DataFrame:
    quarantine = store.read("quarantine")
    raw = [json.loads(text) for text in quarantine["raw"]]
    return quarantine.with_columns(
        pl.Series("pair_id", [row["pair_id"] for row in raw]),
        pl.Series("p_chosen", [row["p_chosen"] for row in raw]),
    )


def test_contract_gate_splits_a_batch_and_names_the_failures():
    produced = produced_pairs()
    good, bad = contract_gate("pairs", produced, "filter", "unit-key-0123456789")

    assert bad is not None
    assert good.height + bad.height == produced.height
    bad_rows = {SAME_SIDES, BAD_PROBABILITY}
    assert good["pair_id"].to_list() == [
        pid for i, pid in enumerate(produced["pair_id"]) if i not in bad_rows
    ]
    # quarantine rows fit the quarantine table, point back at the batch row (1-based) and
    # keep the whole row as JSON, so nothing is lost
    assert set(bad.columns) <= set(TABLES["quarantine"].names)
    assert sorted(bad["source_record"].to_list()) == [SAME_SIDES + 1, BAD_PROBABILITY + 1]
    assert bad["reason"].unique().to_list() == ["contract_failed"]
    assert all("stage filter" in s for s in bad["source_file"])
    # each row names what it broke (and the batch's summary, which names both failures)
    same_sides, bad_probability = bad.sort("source_record").to_dicts()
    assert same_sides["message"].startswith(f"failed {DIFFER} |")
    assert bad_probability["message"].startswith(f"failed {PROBABILITY} |")
    for message in bad["message"]:
        assert DIFFER in message and PROBABILITY in message
    assert same_sides["field"] == "chosen_id,rejected_id" and bad_probability["field"] == "p_chosen"
    restored = [json.loads(r) for r in bad["raw"]]
    assert [r["pair_id"] for r in restored] == [produced["pair_id"][SAME_SIDES], produced["pair_id"][BAD_PROBABILITY]]
    assert restored[1]["p_chosen"] == 1.3


def test_a_valid_batch_passes_untouched():
    produced = produced_pairs().filter(
        ~pl.int_range(pl.len()).is_in([SAME_SIDES, BAD_PROBABILITY])
    )
    good, bad = contract_gate("pairs", produced, "filter", "unit")
    assert bad is None and good.equals(produced)


def test_a_unit_quarantines_contract_violations_and_registers_the_rest(tmp_path):
    store = Store.init(tmp_path / "ds")
    step = ProducePairs()
    run_id = store.start_run("filter", {})
    ctx = context_for(store.root, PipelineConfig(), run_id)
    [unit] = step.plan(ctx)

    result = step.run_unit(unit, ctx)
    assert store.register(result.shards) == len(result.shards) == 2  # pairs + quarantine
    assert result.counts["contract_quarantined.pairs"] == 2

    produced = produced_pairs()
    pairs = store.read("pairs")
    quarantined = _quarantined_pairs(store)
    # the good rows went on, the bad ones are in quarantine: good + quarantined = produced
    assert pairs.height == produced.height - 2
    assert quarantined.height == 2
    assert sorted(pairs["pair_id"].to_list() + quarantined["pair_id"].to_list()) == sorted(produced["pair_id"])
    assert set(quarantined["pair_id"]) == {produced["pair_id"][SAME_SIDES], produced["pair_id"][BAD_PROBABILITY]}
    assert (pairs["chosen_id"] != pairs["rejected_id"]).all() and pairs["p_chosen"].is_between(0, 1).all()
    assert quarantined["reason"].unique().to_list() == ["contract_failed"]
    for message in quarantined["message"]:
        assert DIFFER in message and PROBABILITY in message
    # quarantine rows carry the run's provenance like any other row
    assert quarantined["run_id"].unique().to_list() == [run_id]
    assert quarantined["stage"].unique().to_list() == ["filter"]

    # the unit is done: running it again adopts its shards and adds nothing
    again = step.run_unit(unit, ctx)
    assert again.skipped
    assert store.register(again.shards) == 0
    assert store.count("pairs") == produced.height - 2 and store.count("quarantine") == 2


def test_contracts_off_lets_the_batch_through(tmp_path):
    store = Store.init(tmp_path / "ds")
    step = ProducePairs()
    ctx = context_for(store.root, PipelineConfig(contracts=False), store.start_run("filter", {}))
    [unit] = step.plan(ctx)
    store.register(step.run_unit(unit, ctx).shards)
    assert store.count("pairs") == produced_pairs().height
    assert store.count("quarantine") == 0
