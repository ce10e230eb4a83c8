"""The score and select steps' embedding cache (prefcurate.steps.score_select.embed_with_cache):
cached vectors stream from the embeddings table into one matrix, only the missing items are
embedded, in chunks, and they come back as the new rows to store."""

from __future__ import annotations

import numpy as np
import polars as pl
from prefcurate.schemas.tables import EMBEDDING_DIM

from prefcurate.steps import score_select
from prefcurate.store import Store


def vectors_of(texts: list[str]) -> np.ndarray:
    """A stand-in embedder for this test of the cache's bookkeeping: one distinct vector per text."""
    seeds = [sum(map(ord, t)) * 31 + len(t) for t in texts]
    return np.stack([np.random.default_rng(s).standard_normal(EMBEDDING_DIM) for s in seeds]).astype(np.float32)


def embedding_rows(ids: list[str], texts: list[str], kind: str = "response", model: str = "m") -> pl.DataFrame:
    return pl.DataFrame({"item_id": ids, "item_kind": kind, "model": model,
                         "vector": pl.Series(vectors_of(texts), dtype=pl.Array(pl.Float32, EMBEDDING_DIM))})


def test_cached_vectors_are_read_and_only_missing_items_embedded_in_chunks(tmp_path, monkeypatch):
    store = Store.init(tmp_path / "ds")
    texts = [f"text number {i}" for i in range(25)]
    ids = [f"r{i:02d}" for i in range(25)]
    cached = list(range(0, 25, 3))
    # cached rows of this kind and model, split over two shards, one item stored twice
    store.commit("embeddings", embedding_rows([ids[i] for i in cached[:4]], [texts[i] for i in cached[:4]]),
                 key="a", run_id="r", stage="score")
    store.commit("embeddings", embedding_rows([ids[i] for i in cached[3:]], [texts[i] for i in cached[3:]]),
                 key="b", run_id="r", stage="score")
    # rows of another kind and another model are not this cache's
    store.commit("embeddings", embedding_rows(ids, ["wrong"] * 25, kind="pair"), key="c", run_id="r", stage="s")
    store.commit("embeddings", embedding_rows(ids, ["wrong"] * 25, model="other"), key="d", run_id="r", stage="s")

    calls: list[list[str]] = []

    def embed(batch):
        calls.append(list(batch))
        return vectors_of(list(batch))

    monkeypatch.setattr(score_select, "EMBED_CHUNK", 5)
    items = pl.DataFrame({"item_id": ids, "text": texts}).reverse()  # the result follows the items' order
    matrix, new_rows, _ = score_select.embed_with_cache(store, items, "response", "m", embed)

    assert matrix.dtype == np.float32 and matrix.shape == (25, EMBEDDING_DIM)
    np.testing.assert_array_equal(matrix, vectors_of(items["text"].to_list()))
    missing = [ids[i] for i in range(25) if i not in cached]
    assert sorted(t for call in calls for t in call) == sorted(texts[i] for i in range(25) if i not in cached)
    assert max(len(call) for call in calls) <= 5
    assert sorted(new_rows["item_id"].to_list()) == missing
    assert new_rows.schema["vector"] == pl.Array(pl.Float32, EMBEDDING_DIM)
    by_id = dict(zip(items["item_id"].to_list(), matrix))
    for item_id, vector in zip(new_rows["item_id"].to_list(), new_rows["vector"].to_numpy()):
        np.testing.assert_array_equal(vector, by_id[item_id])

    # every item cached now: nothing is embedded
    store.commit("embeddings", new_rows, key="e", run_id="r", stage="score")
    calls.clear()
    again, none_new, _ = score_select.embed_with_cache(store, items, "response", "m", embed)
    assert calls == [] and none_new.height == 0
    np.testing.assert_array_equal(again, matrix)

    # a few items of a larger table (the score stage's sample) are read through a semi-join on
    # their ids (4 items of 76 rows): the same vectors, and only the new one embedded
    few = items.head(3).vstack(pl.DataFrame({"item_id": ["new"], "text": ["a new text"]}))
    some, one_new, _ = score_select.embed_with_cache(store, few, "response", "m", embed)
    np.testing.assert_array_equal(some, vectors_of(few["text"].to_list()))
    assert one_new["item_id"].to_list() == ["new"] and calls == [["a new text"]]


def test_with_nothing_cached_the_new_rows_share_the_matrix(tmp_path):
    store = Store.init(tmp_path / "ds")
    items = pl.DataFrame({"item_id": ["x", "y", "z"], "text": ["one", "two", "three"]})
    matrix, new_rows, _ = score_select.embed_with_cache(store, items, "pair", "m", vectors_of)
    np.testing.assert_array_equal(matrix, vectors_of(["one", "two", "three"]))
    assert new_rows["item_id"].to_list() == ["x", "y", "z"]
    # one copy of the vectors, not two
    assert np.shares_memory(new_rows["vector"].to_numpy(), matrix)
