"""The score step streams: it trains on the judged sample, then scores every response chunk
by chunk, writing each chunk's new embeddings as it goes, and its QUALITY rows are those of
QuRating over the whole set held at once (``tasks.qurating.score_items``).

Runs the generate and score steps unit by unit (no Prefect) on a real store, with scripted
test doubles for the engines and a hashed stand-in for the embedding model.
"""

from __future__ import annotations

import zlib

import numpy as np
import polars as pl
import pytest
from prefcurate.schemas.tables import EMBEDDING_DIM
from prefcurate.tasks.qurating import score_items
from prefcurate.tasks.score import item_texts

from prefcurate.config import load_config
from prefcurate.inference.base import Generation
from prefcurate.steps import get_step, model_stages, score_select
from prefcurate.steps.base import context_for
from prefcurate.steps.engines import TimedEngine
from prefcurate.store import Store
from tests.support.engines import ScriptedEngine
from tests.unit.stage_runs import run_pending_units

pytest.importorskip("torch")


def hashed_vectors(texts: list[str]) -> np.ndarray:
    """Stand-in embedder: one fixed vector per text (the cache and the scoring are under test)."""
    return np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(EMBEDDING_DIM)
                     for t in texts]).astype(np.float32)


def judge_by_length(prompt: str, options) -> list[float]:
    """Scripted judge: prefers the longer of the two texts it is shown (a learnable signal)."""
    a, _, rest = prompt.partition("[Option A]")[2].partition("[Option B]")
    b = rest.partition("Now you have to choose")[0]
    p_b = 0.8 if len(b) > len(a) else 0.2
    return [1 - p_b, p_b] + [0.0] * (len(options) - 2)


class FailsOnceEngine(ScriptedEngine):
    """Scripted test double: its first generate call for "Question number 7?" fails, as a
    dropped connection would (the next generate run asks again: a second row of those ids)."""

    def __init__(self):
        super().__init__(choice_fn=judge_by_length,
                         generate_fn=lambda request, i: "word " * (1 + (zlib.crc32(request.prompt.encode()) + i) % 9))
        self.failed = False

    def generate(self, requests):
        out = super().generate(requests)
        for index, request in enumerate(requests):
            if "Question number 7?" in request.prompt and not self.failed:
                self.failed = True
                out[index] = Generation([], 0, 0.0, "connection reset by peer")
        return out


def retried_ids(store) -> set[str]:
    return set(store.query("SELECT response_id FROM responses GROUP BY ALL HAVING count(*) > 1")["response_id"])


@pytest.fixture
def scored_dataset(tmp_path, monkeypatch):
    generator = FailsOnceEngine()
    judge = ScriptedEngine(choice_fn=judge_by_length)
    monkeypatch.setattr(model_stages, "engine_for", lambda pools, name: TimedEngine(generator))
    monkeypatch.setattr(score_select, "engine_for", lambda pools, name: TimedEngine(judge))
    monkeypatch.setattr("prefcurate.tasks.embed.embed_texts", hashed_vectors)
    store = Store.init(tmp_path / "ds")
    n = 30
    prompts = pl.DataFrame({
        "prompt_id": [f"p{k:02d}" for k in range(n)], "prompt": [f"Question number {k}?" for k in range(n)],
        "source_file": ["f"] * n, "source_record": list(range(1, n + 1)),
        "char_len": [len(f"Question number {k}?") for k in range(n)],
    })
    store.register([store.write("prompts", prompts, key="shard-0", run_id="r0", stage="ingest")])
    config = load_config("examples/quickstart.yaml", {
        "contracts": False,
        "score.qurating.sample_size": 20, "score.qurating.pairs_per_item": 4,
        "score.qurating.criteria": [{"name": "length", "description": "the longer text"}],
        "score.qurating.scorer": {"epochs": 40, "holdout_fraction": 0.2},
    })
    ctx = context_for(store.root, config, "r1")
    assert run_pending_units("generate", ctx, store) >= 1
    assert run_pending_units("generate", ctx, store) == 1  # the retry, in a shard of its own
    retried = store.query("SELECT response_id FROM responses GROUP BY ALL HAVING count(*) > 1")
    assert retried.height >= 1
    return store, ctx, config


def test_chunked_scores_equal_the_whole_set_and_each_vector_is_written_once(scored_dataset, monkeypatch):
    store, ctx, config = scored_dataset
    monkeypatch.setattr(score_select, "SCORE_CHUNK", 16)  # several chunks, the sample spread over them
    step = get_step("score")
    (unit,) = step.plan(ctx)
    result = step.run_unit(unit, ctx)
    store.register(result.shards)

    responses = store.read("current_responses", ["response_id", "prompt_id", "text"])
    items = item_texts(responses, store.read("prompts", ["prompt_id", "prompt"]), config.score.max_text_chars)
    assert items.height > 2 * 16 and result.counts["items"] == items.height
    whole = score_items(TimedEngine(ScriptedEngine(choice_fn=judge_by_length)), items["item_id"], items["text"],
                        config.score.qurating, embeddings=hashed_vectors(items["text"].to_list()))
    assert set(whole.quality["method"]) == {"qurating_bt", "scorer"}
    key = ["item_id", "criterion", "method"]
    stored = store.query("SELECT item_id, item_kind, criterion, method, score, z_score FROM quality").sort(key)
    expected = whole.quality.sort(key)
    assert stored.select(key, "item_kind").equals(expected.select(key, "item_kind"))
    # (the scorer is a float32 net: another chunk size rounds its matrix products differently)
    np.testing.assert_allclose(stored["score"].to_numpy(), expected["score"].to_numpy(), rtol=1e-5, atol=1e-6)
    # z-scores over every item, not per chunk
    np.testing.assert_allclose(stored["z_score"].to_numpy(), expected["z_score"].to_numpy(), rtol=1e-5, atol=1e-6)

    embeddings = store.query("SELECT item_id, vector FROM embeddings WHERE item_kind = 'response'")
    assert sorted(embeddings["item_id"].to_list()) == sorted(items["item_id"].to_list())  # each once: sample too
    # a retried response is scored by its good row's text, not its failed one's
    assert retried_ids(store) <= set(stored["item_id"])
    np.testing.assert_array_equal(
        embeddings.sort("item_id")["vector"].to_numpy(), hashed_vectors(items.sort("item_id")["text"].to_list()))
    # written as they were made: the sample's part, then a part per chunk of the rest
    parts = [shard.rows for shard in result.shards if shard.table == "embeddings"]
    assert parts[0] == 20 and len(parts) >= 1 + -(-(items.height - 20) // 16) and max(parts[1:]) <= 16
    assert sum(parts) == items.height
    assert result.counts["embedded"] == items.height


def test_a_second_score_run_embeds_nothing_and_scores_the_same(scored_dataset, monkeypatch):
    store, ctx, config = scored_dataset
    step = get_step("score")
    (unit,) = step.plan(ctx)
    first = step.run_unit(unit, ctx)
    store.register(first.shards)
    before = store.query("SELECT item_id, criterion, method, score FROM quality ORDER BY ALL")

    embedded: list[int] = []
    monkeypatch.setattr("prefcurate.tasks.embed.embed_texts", lambda texts: embedded.append(len(texts)) or hashed_vectors(texts))
    monkeypatch.setattr(score_select, "SCORE_CHUNK", 7)
    again = step.compute(unit, context_for(store.root, config, "r2"))
    frames, counts = again
    written = list(frames)
    assert embedded == [] and counts["embedded"] == 0
    quality = pl.concat([frame for table, frame in written if table == "quality"])
    after = quality.select("item_id", "criterion", "method", "score").sort(pl.all())
    assert after["item_id"].equals(before["item_id"])
    # (the scorer is a float32 net: another chunk size rounds its matrix products differently)
    np.testing.assert_allclose(after["score"].to_numpy(), before["score"].to_numpy(), rtol=1e-5, atol=1e-6)


def test_a_stream_naming_a_table_the_unit_does_not_write_fails_clearly():
    from prefcurate.steps.base import Unit, _output_parts

    unit = Unit("score", "k" * 64, ("quality", "embeddings"))
    parts = list(_output_parts(unit, iter([("embeddings", "a"), ("embeddings", "b")])))
    assert parts == [("embeddings", 0, "a"), ("embeddings", 1, "b"), ("quality", 0, None)]
    with pytest.raises(ValueError, match="'pairs', not one of its outputs"):
        list(_output_parts(unit, iter([("pairs", "x")])))
