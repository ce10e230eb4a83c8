"""CritiQ mining and QuRating judging on the real in-process vLLM engine (Gemma 3 270M base).

Small on purpose: 6 human pairs, 3 seed criteria, one iteration; a handful of QuRating
comparisons. Checks what only a real model can break: the worker and judge prompts fit the
context and every verdict resolves to probabilities, the manager's free text goes through
sanitising into a usable (or safely rejected) description, and the report is produced.
Accuracy itself is not asserted beyond [0, 1]: a 270M base model is close to chance.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from prefcurate.tasks.critiq import CritiQParams, load_human_pairs, load_seed_criteria, mine_criteria
from prefcurate.tasks.qurating import QURATING_CRITERIA, judge_all_criteria, make_excerpts

from prefcurate.inference.models import is_prepared

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not is_prepared(), reason="embedded model not prepared (prefcurate models prepare)"),
]

ACTIONS = {"retrieve", "drop", "propose", "keep", "revise", "ban", "evaluate"}


@pytest.fixture(scope="module")
def engine():
    from prefcurate.inference.pools import EmbeddedPoolConfig, open_engine

    # a small KV cache: the machine running the suite is shared and the batches here are small
    engine = open_engine("critiq", EmbeddedPoolConfig(max_model_len=1024, kv_cache_space_gb=1, max_num_seqs=16))
    yield engine
    engine.close()


def test_one_mining_iteration_on_the_embedded_model(engine):
    pairs = load_human_pairs().head(6)
    kb = load_seed_criteria()[:3]
    # keep_threshold 0.95 (not 0.75) so that the reflection path (critique + rewrite by the
    # base model) runs too: on 4 training pairs a criterion is then kept only when perfect
    params = CritiQParams(
        iterations=1, n_criteria=3, heldout_fraction=0.34, proposal_samples=2, keep_threshold=0.95, seed=0
    )
    result = mine_criteria(engine, pairs, kb, params)

    assert result.n_train == 4 and result.n_heldout == 2
    rows = result.iterations
    assert rows and {r["action"] for r in rows} <= ACTIONS
    evaluated = [r for r in rows if r["accuracy"] is not None]
    assert {r["criterion"] for r in evaluated if r["iteration"] == 0} == {c.name for c in kb}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in evaluated)
    assert all(0 <= r["answered"] <= result.n_train for r in evaluated)
    # every description that came out of the manager is one sanitised line
    for r in rows:
        after = r["description_after"]
        if after is not None:
            assert "\n" not in after and 0 < len(after) <= params.description_max_chars
    revised = [r for r in rows if r["action"] == "revise"]
    for r in revised:  # the rewrite is accepted, or rejected and the description kept
        assert r["description_after"] == r["description_before"] or "rewrite rejected" not in r["note"]
    assert result.criteria, "the final set (or its fallback) is never empty when criteria were judged"
    assert all(c.accuracy is not None and 0.0 <= c.accuracy <= 1.0 for c in result.criteria)
    assert result.heldout_accuracy is not None and 0.0 <= result.heldout_accuracy <= 1.0
    md = result.report_markdown
    assert "## Init (knowledge base)" in md and "## Iteration 1" in md and "Held-out accuracy" in md
    assert ("**Fallback:**" in md) == result.fallback_used
    print(md)


def test_qurating_judgments_are_valid_probabilities(engine):
    texts = make_excerpts(
        load_human_pairs().head(3)["text_a"].to_list() + load_human_pairs().head(3)["text_b"].to_list(),
        600,
        seed=0,
    )
    frame = judge_all_criteria(engine, texts, [0, 1, 2], [3, 4, 5], QURATING_CRITERIA[2:])
    assert frame.height == 6
    assert frame["valid"].all()
    p = frame["p_j_beats_i"].to_numpy()
    assert np.all((p >= 0.0) & (p <= 1.0))
    recomputed = (frame["p_ab"] + 1.0 - frame["p_ba"]) / 2.0
    assert np.allclose(recomputed.to_numpy(), p)
    assert frame.filter(pl.col("criterion") == "educational_value").height == 3
