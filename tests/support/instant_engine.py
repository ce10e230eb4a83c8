"""Instant engine double: answers every request at once, for benches that measure everything
but the model (bench/scale.py). Never used outside tests and benches.

A real build's model time is the user's to buy; this double takes it to ~zero so what is
left is ours: planning, reading inputs, id lookups, the contract gate, shard writes,
registration, Prefect and Dask. Answers are deterministic functions of the request (a hash),
varied enough that the filters keep and drop pairs as with a real judge:

- :meth:`InstantEngine.generate`: ``n`` completions of 8-60 words each, a few ``length``;
- :meth:`InstantEngine.score_choices`: a probability per option from the prompt's hash.

:func:`instant_embed_texts` stands in for the sentence embedding model (also a model, ~30
texts/s on 2 CPU cores here, measured on its own by bench/embed.py): unit vectors of the
same shape (n, 384), equal for equal texts, from a hash of each text.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

from prefcurate.inference.base import ChoiceScore, Completion, Generation

#: each response starts with its hidden quality, which the judges read back: verdicts and
#: ratings then agree with each other, as a real jury mostly does, so pairs survive the filter
_QUALITY = re.compile(r"\[q(\d)\]")


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class InstantEngine:
    """Engine protocol (``prefcurate.inference.base.Engine``) with no model behind it."""

    def __init__(self, model: str = "instant"):
        self.model = model

    def generate(self, requests):
        out = []
        for request in requests:
            seed = f"{request.prompt}|{request.params.seed}|{request.params.temperature}"
            completions = []
            for i in range(request.params.n):
                h = _digest(f"{seed}|{i}")
                words = 8 + h % 53
                # words from a large vocabulary, so distinct responses are not near-duplicates
                body = " ".join(f"w{(h * (k + 1) * 0x9E3779B1 >> 11) % 20011}" for k in range(words))
                reason = "length" if h % 17 == 0 else "stop"
                completions.append(Completion(f"[q{1 + h % 5}] {body}", reason, words))
            out.append(Generation(completions, tokens_in=len(request.prompt) // 4))
        return out

    def score_choices(self, requests):
        out = []
        for request in requests:
            qualities = [int(q) for q in _QUALITY.findall(request.prompt)]
            options = len(request.options)
            if options == 2 and len(qualities) >= 2:  # a pairwise verdict: the better one, mostly
                first, second = qualities[-2], qualities[-1]
                p = 1.0 / (1.0 + np.exp(-(first - second) - 0.3 * (_digest(request.prompt) % 3 - 1)))
                probs = np.array([p, 1.0 - p])
            elif qualities and options >= qualities[-1]:  # a rating: peaked on the quality
                probs = np.exp(-np.abs(np.arange(1, options + 1) - qualities[-1]) * 1.5)
            else:  # a prompt without responses of ours (a gold pair, a QuRating excerpt)
                h = _digest(request.prompt)
                probs = np.array([1.0 + ((h >> (8 * i)) & 0xFF) for i in range(options)]) ** 3
            out.append(ChoiceScore(tuple(float(p) for p in probs / probs.sum())))
        return out

    def drain_metrics(self) -> list[dict]:
        return []

    def close(self) -> None:
        pass


def instant_embed_texts(texts: Sequence[str], **_ignored) -> np.ndarray:
    """(n, 384) float32 unit vectors from a hash of each text (equal texts, equal vectors)."""
    texts = ["" if t is None else str(t) for t in texts]
    if not texts:
        return np.zeros((0, 384), np.float32)
    seeds = np.array([_digest(t) for t in texts], dtype=np.uint64)
    # each seed expanded to 384 numbers by splitmix64 (no per-text RNG objects): distinct texts
    # get independent vectors, cosine ~ N(0, 1/384), as a real model's unrelated texts are far
    # apart (a weaker mix once gave unrelated texts cosines near 0.97: everything a duplicate)
    with np.errstate(over="ignore"):
        mixed = seeds[:, None] + np.arange(1, 385, dtype=np.uint64)[None, :] * np.uint64(0x9E3779B97F4A7C15)
        mixed = (mixed ^ (mixed >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        mixed = (mixed ^ (mixed >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        mixed ^= mixed >> np.uint64(31)
    vectors = (mixed >> np.uint64(40)).astype(np.float32) / float(1 << 23) - 1.0
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors
