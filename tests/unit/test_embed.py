"""The packaged embedding model, loaded offline: shape, normalisation, semantic closeness."""

from __future__ import annotations

import numpy as np
import polars as pl
from prefcurate.schemas.tables import EMBEDDING_DIM, EMBEDDINGS
from prefcurate.tasks.embed import (
    EmbedParams,
    embed_texts,
    embed_with_params,
    embedding_path,
    embeddings_frame,
    load_encoder,
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
    # another batching pads differently; in bfloat16 that moves the vectors by ~1e-3 at most
    again = embed_with_params(texts[:2], EmbedParams(device="cpu", batch_size=1))
    assert np.min(np.sum(again * vectors[:2], axis=1)) >= 0.9999


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
    runner = load_encoder(device="cpu") or model  # OpenVINO where installed, else torch
    real_encode = runner.encode

    def counting_encode(sentences, *args, **kwargs):
        seen.append(list(sentences))
        return real_encode(sentences, *args, **kwargs)

    monkeypatch.setattr(runner, "encode", counting_encode)
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


def test_chosen_path_is_deterministic_close_to_float32_and_matches_the_cpu(monkeypatch):
    import openvino
    from prefcurate.tasks import embed

    texts = ["Request: Summarise the causes of the First World War.\nResponse: Alliances, militarism, "
             "imperial rivalry and nationalism; the assassination in Sarajevo lit the fuse. " * 6,
             "Explain the rules of cricket to a beginner.", "ok", "Wie spät ist es?"]
    native_bf16 = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert embedding_path(device="cpu") == ("openvino-bf16" if native_bf16 else "openvino-f32")
    assert embedding_path(device="cpu", precision="float32") == "openvino-f32"
    assert embedding_path(device="cpu", backend="torch") == "torch-cpu"
    reference = embed_texts(texts, device="cpu", backend="torch")
    np.testing.assert_allclose(
        reference, load_model(device="cpu").encode(texts, normalize_embeddings=True), atol=1e-6
    )
    for precision in ("auto", "float32"):
        first = embed_texts(texts, device="cpu", precision=precision)
        np.testing.assert_array_equal(first, embed_texts(texts, device="cpu", precision=precision))
        cosine = np.sum(first * reference, axis=1)
        assert cosine.min() >= (0.999 if precision == "auto" else 0.99999), (precision, cosine)
    # without OpenVINO it is torch; a bfloat16 encoder that failed its self-check would be float32
    monkeypatch.setattr(embed, "_openvino_installed", lambda: False)
    assert embedding_path(device="cpu") == "torch-cpu"
    monkeypatch.undo()
    if native_bf16:
        monkeypatch.setattr(embed, "_ENCODERS", {})
        exact_encode = embed.OpenVINOEncoder.encode

        def swapped_when_bf16(self, texts, batch_size=embed.OPENVINO_BATCH):
            vectors = exact_encode(self, texts, batch_size)
            return vectors[::-1].copy() if self.precision == "bf16" else vectors

        monkeypatch.setattr(embed.OpenVINOEncoder, "encode", swapped_when_bf16)
        assert embedding_path(device="cpu") == "openvino-f32"
