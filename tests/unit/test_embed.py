"""The packaged embedding model, loaded offline: shape, normalisation, semantic closeness."""

from __future__ import annotations

import numpy as np
import polars as pl

from prefcurate.schemas.tables import EMBEDDING_DIM, EMBEDDINGS
from prefcurate.tasks.embed import (
    EmbedParams,
    embed_texts,
    embed_with_params,
    embeddings_frame,
    load_model,
    model_name,
    texts_needing_embeddings,
    vectors_from_frame,
)


def test_similar_texts_are_closer_than_unrelated_ones():
    texts = [
        "How do I bake sourdough bread at home?",
        "What is a good recipe for homemade sourdough bread?",
        "The central bank raised interest rates by half a point.",
        "Explain the rules of cricket to a beginner.",
    ]
    vectors = embed_texts(texts, device="cpu")
    assert vectors.shape == (4, EMBEDDING_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims = vectors @ vectors.T
    assert sims[0, 1] > 0.7
    assert sims[0, 1] > sims[0, 2] + 0.4 and sims[0, 1] > sims[0, 3] + 0.4
    # the model is cached per process, and a repeat gives the same vectors
    assert load_model(device="cpu") is load_model(device="cpu")
    np.testing.assert_allclose(
        embed_with_params(texts[:2], EmbedParams(device="cpu", batch_size=1)), vectors[:2], atol=1e-5
    )


def test_empty_and_missing_texts():
    assert embed_texts([]).shape == (0, EMBEDDING_DIM)
    vectors = embed_texts(pl.Series(["text", None]), device="cpu")
    assert vectors.shape == (2, EMBEDDING_DIM) and np.isfinite(vectors).all()


def test_frame_round_trip_and_cache_lookup():
    vectors = np.random.default_rng(0).standard_normal((3, EMBEDDING_DIM)).astype(np.float32)
    frame = embeddings_frame(["a", "b", "c"], vectors, item_kind="pair", model=model_name())
    assert frame.columns == [f.name for f in EMBEDDINGS if f.name in frame.columns]
    assert frame.to_arrow().schema.field("vector").type == EMBEDDINGS.field("vector").type
    np.testing.assert_array_equal(vectors_from_frame(frame), vectors)
    assert texts_needing_embeddings(["a", "x", "b", "x", "y"], ["a", "b"]).tolist() == [1, 4]


def test_fast_path_matches_plain_encode_and_embeds_each_distinct_text_once(monkeypatch):
    import torch

    model = load_model(device="cpu")
    texts = ["Request: What is the capital of France?\nResponse: Paris is the capital of France. " * 12,
             "How do I bake sourdough bread?", None, "How do I bake sourdough bread?", "", "short"]
    reference = model.encode([t or "" for t in texts], normalize_embeddings=True, convert_to_numpy=True)
    seen: list[list[str]] = []
    real_encode = model.encode

    def counting_encode(sentences, **kwargs):
        seen.append(list(sentences))
        return real_encode(sentences, **kwargs)

    monkeypatch.setattr(model, "encode", counting_encode)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a Dask worker or an imported vLLM can leave it
    try:
        vectors = embed_texts(texts, device="cpu")
        assert torch.get_num_threads() == 1  # put back after the forward passes
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 1 and sorted(seen[0]) == sorted({t or "" for t in texts})
    assert vectors.shape == (len(texts), EMBEDDING_DIM)
    assert np.min(np.sum(vectors * reference, axis=1)) >= 0.999
    np.testing.assert_array_equal(vectors[1], vectors[3])
    np.testing.assert_array_equal(vectors[2], vectors[4])
