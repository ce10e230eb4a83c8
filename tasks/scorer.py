"""A pairwise-trained quality scorer over item embeddings (QuRating's rater, CritiQ's reward model).

Judges see a sample; the scorer carries their verdicts to every item. A small model maps an
item embedding (float32 ``[n, 384]``) to a scalar ``s``; it is trained with the
Bradley-Terry loss on judged pairs::

    BCE(sigmoid(s_j - s_i), p)        p = P(j beats i), soft targets allowed

which is QuRating's rating-model loss. With ``p = 1`` it is the plain reward-model loss
``-log sigmoid(r_chosen - r_rejected)`` that CritiQ trains on its criteria's verdicts
(``train_reward_model``: ``item_i = rejected``, ``item_j = chosen``).

Choices the papers leave open (QuRating fine-tunes a 1.3B LM; here the encoder is frozen
and only a head is trained, which is what makes it CPU-cheap):

- model: linear (``hidden_dim = 0``, the default) or one hidden layer with GELU; inputs
  standardised per dimension with the training items' mean/std (kept in the state so
  scoring needs nothing else). Sentence embeddings are near-isotropic with tiny
  per-dimension scales; standardising lets one learning rate fit both model sizes.
- labels: by default only confident labels (|p - 0.5| >= 0.25, QuRating's rule) train the
  model; every label with a winner is evaluated.
- held-out split: a random ``holdout_fraction`` of *pairs* (not items) is kept out of
  training; the report gives sign agreement with those verdicts, overall and at QuRating's
  80% confidence (|p - 0.5| >= 0.3), plus the same on the training pairs.
- optimiser: AdamW, full passes over shuffled mini-batches, fixed epoch count (no early
  stopping, so the held-out numbers stay unbiased).
- determinism: ``seed`` fixes the split, initialisation and shuffling; the global torch
  RNG is left as it was.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from numpy.typing import ArrayLike
from prefcurate.tasks.bradley_terry import (
    QURATING_CONFIDENCE,
    QURATING_HIGH_CONFIDENCE,
    confident_mask,
    pairwise_accuracy,
)
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F

_FORMAT_VERSION = 1


class ScorerParams(BaseModel):
    """Training parameters of the pairwise scorer."""

    model_config = ConfigDict(extra="forbid")

    hidden_dim: int = Field(0, ge=0, description="0: linear scorer; > 0: one hidden layer of this width")
    epochs: int = Field(30, ge=1, description="passes over the training pairs")
    batch_size: int = Field(512, ge=1, description="pairs per optimisation step")
    learning_rate: float = Field(3e-3, gt=0.0, description="AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW decoupled weight decay")
    holdout_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="share of pairs kept out of training for the report"
    )
    confident_only: bool = Field(True, description="train only on labels with |p - 0.5| >= confidence")
    confidence: float = Field(QURATING_CONFIDENCE, ge=0.0, le=0.5, description="QuRating's threshold")
    standardise_inputs: bool = Field(True, description="z-score embedding dimensions (training items' stats)")
    torch_threads: int = Field(
        1,
        ge=1,
        description="torch intra-op threads while training (restored after); the head's matmuls are "
        "too small to gain from more, and on a busy host extra threads made training ~4x slower",
    )


class ScorerReport(BaseModel):
    """What training measured; accuracies are sign agreement with the judge's verdicts."""

    model_config = ConfigDict(extra="forbid")

    n_items: int
    n_pairs: int
    n_train_pairs: int
    n_heldout_pairs: int
    train_accuracy: float
    heldout_accuracy: float | None  # None when nothing was held out (or no held-out winner)
    heldout_accuracy_80: float | None  # held-out pairs with |p - 0.5| >= 0.3
    heldout_loss: float | None  # mean BCE on held-out pairs
    final_train_loss: float
    seconds: float


class _ScoreNet(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(input_dim))
        self.register_buffer("inv_std", torch.ones(input_dim))
        if hidden_dim > 0:
            self.body = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 1))
        else:
            self.body = nn.Sequential(nn.Linear(input_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) * self.inv_std).squeeze(-1)


def pairwise_bt_loss(
    s_i: torch.Tensor, s_j: torch.Tensor, p_j_beats_i: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean BCE(sigmoid(s_j - s_i), p); with p = 1 it is -log sigmoid(r_chosen - r_rejected)."""
    return F.binary_cross_entropy_with_logits(s_j - s_i, p_j_beats_i, weight=weight)


class PairwiseScorer:
    """A trained scorer: ``score(embeddings)`` gives one float per row (higher = better)."""

    def __init__(self, net: _ScoreNet, params: ScorerParams, input_dim: int):
        self._net = net.eval()
        self.params = params
        self.input_dim = input_dim

    def score(self, embeddings: ArrayLike, batch_size: int = 65536) -> np.ndarray:
        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"expected embeddings of shape [n, {self.input_dim}], got {x.shape}")
        out = np.empty(x.shape[0], dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, x.shape[0], batch_size):
                chunk = torch.from_numpy(x[start : start + batch_size])
                out[start : start + batch_size] = self._net(chunk).double().numpy()
        return out

    __call__ = score

    def save(self, path: str | Path) -> None:
        """One file: torch state dict + params JSON (loadable with ``weights_only=True``)."""
        payload = {
            "format_version": _FORMAT_VERSION,
            "input_dim": self.input_dim,
            "params_json": self.params.model_dump_json(),
            "state_dict": self._net.state_dict(),
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        Path(path).write_bytes(buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> PairwiseScorer:
        payload = torch.load(io.BytesIO(Path(path).read_bytes()), map_location="cpu", weights_only=True)
        if payload.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported scorer file format: {payload.get('format_version')!r}")
        params = ScorerParams.model_validate(json.loads(payload["params_json"]))
        net = _ScoreNet(int(payload["input_dim"]), params.hidden_dim)
        net.load_state_dict(payload["state_dict"])
        return cls(net, params, int(payload["input_dim"]))


def _split_pairs(n_pairs: int, holdout_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n_heldout = round(n_pairs * holdout_fraction)
    if holdout_fraction > 0.0 and n_pairs >= 2:
        n_heldout = min(max(n_heldout, 1), n_pairs - 1)
    else:
        n_heldout = 0
    order = rng.permutation(n_pairs)
    return np.sort(order[n_heldout:]), np.sort(order[:n_heldout])


def _fit(
    x_all: np.ndarray, i: np.ndarray, j: np.ndarray, p: np.ndarray, params: ScorerParams, seed: int
) -> tuple[_ScoreNet, float]:
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _ScoreNet(x_all.shape[1], params.hidden_dim)
    if params.standardise_inputs:
        train_items = np.unique(np.concatenate([i, j]))
        mean = x_all[train_items].mean(axis=0)
        std = x_all[train_items].std(axis=0)
        net.mean.copy_(torch.from_numpy(mean))
        net.inv_std.copy_(torch.from_numpy(1.0 / np.maximum(std, 1e-6)))

    x = torch.from_numpy(x_all)
    ti = torch.from_numpy(i)
    tj = torch.from_numpy(j)
    tp = torch.from_numpy(p).float()
    optimiser = torch.optim.AdamW(net.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay)
    net.train()
    epoch_loss = float("nan")
    for _ in range(params.epochs):
        order = torch.randperm(ti.numel(), generator=generator)
        total, count = 0.0, 0
        for start in range(0, order.numel(), params.batch_size):
            batch = order[start : start + params.batch_size]
            bi, bj = ti[batch], tj[batch]
            # Score each distinct item of the batch once.
            items, inverse = torch.unique(torch.cat([bi, bj]), return_inverse=True)
            scores = net(x[items])
            loss = pairwise_bt_loss(scores[inverse[: bi.numel()]], scores[inverse[bi.numel() :]], tp[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * batch.numel()
            count += batch.numel()
        epoch_loss = total / count
    return net.eval(), epoch_loss


def train_pairwise_scorer(
    embeddings: ArrayLike,
    item_i: ArrayLike,
    item_j: ArrayLike,
    p_j_beats_i: ArrayLike,
    params: ScorerParams | None = None,
    *,
    seed: int = 0,
) -> tuple[PairwiseScorer, ScorerReport]:
    """Train a scorer on judged pairs of embedded items; returns ``(scorer, report)``.

    Args:
        embeddings: ``[n_items, dim]`` float array; rows are the items ``item_i``/``item_j`` index.
        item_i, item_j, p_j_beats_i: one judged pair per entry, ``p = P(item_j beats item_i)``.
        params: training parameters (defaults when None).
        seed: fixes the held-out split, initialisation and batch order.
    """
    started = time.perf_counter()
    params = params or ScorerParams()
    x_all = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    i = np.asarray(item_i, dtype=np.int64)
    j = np.asarray(item_j, dtype=np.int64)
    p = np.asarray(p_j_beats_i, dtype=np.float64)
    if x_all.ndim != 2:
        raise ValueError("embeddings must be a 2-D array")
    if not (i.shape == j.shape == p.shape and i.ndim == 1):
        raise ValueError("item_i, item_j and p_j_beats_i must be 1-D arrays of one length")
    if i.size and (min(i.min(), j.min()) < 0 or max(i.max(), j.max()) >= x_all.shape[0]):
        raise ValueError("item indices must index rows of embeddings")
    if not (np.all(p >= 0.0) and np.all(p <= 1.0)):
        raise ValueError("p_j_beats_i must lie in [0, 1]")

    rng = np.random.default_rng(seed)
    train_idx, heldout_idx = _split_pairs(i.size, params.holdout_fraction, rng)
    if params.confident_only:
        train_idx = train_idx[confident_mask(p[train_idx], params.confidence)]
    if train_idx.size == 0:
        raise ValueError("no training pairs left (all held out or below the confidence threshold)")

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(params.torch_threads)
    try:
        net, epoch_loss = _fit(x_all, i[train_idx], j[train_idx], p[train_idx], params, seed)
        scorer = PairwiseScorer(net, params, x_all.shape[1])
        scores = scorer.score(x_all)
    finally:
        torch.set_num_threads(previous_threads)

    heldout_accuracy = heldout_accuracy_80 = heldout_loss = None
    if heldout_idx.size:
        hi, hj, hp = i[heldout_idx], j[heldout_idx], p[heldout_idx]
        acc = pairwise_accuracy(scores, hi, hj, hp)
        acc80 = pairwise_accuracy(scores, hi, hj, hp, min_confidence=QURATING_HIGH_CONFIDENCE)
        heldout_accuracy = None if np.isnan(acc) else acc
        heldout_accuracy_80 = None if np.isnan(acc80) else acc80
        with torch.no_grad():
            heldout_loss = float(
                pairwise_bt_loss(
                    torch.from_numpy(scores[hi]), torch.from_numpy(scores[hj]), torch.from_numpy(hp)
                )
            )
    train_accuracy = pairwise_accuracy(scores, i[train_idx], j[train_idx], p[train_idx])
    report = ScorerReport(
        n_items=int(x_all.shape[0]),
        n_pairs=int(i.size),
        n_train_pairs=int(train_idx.size),
        n_heldout_pairs=int(heldout_idx.size),
        train_accuracy=float(train_accuracy),
        heldout_accuracy=heldout_accuracy,
        heldout_accuracy_80=heldout_accuracy_80,
        heldout_loss=heldout_loss,
        final_train_loss=float(epoch_loss),
        seconds=time.perf_counter() - started,
    )
    return scorer, report


def train_reward_model(
    embeddings: ArrayLike,
    chosen: ArrayLike,
    rejected: ArrayLike,
    params: ScorerParams | None = None,
    *,
    seed: int = 0,
) -> tuple[PairwiseScorer, ScorerReport]:
    """CritiQ's scorer: hard preferences, loss ``-log sigmoid(r_chosen - r_rejected)`` (p = 1)."""
    chosen = np.asarray(chosen, dtype=np.int64)
    return train_pairwise_scorer(
        embeddings, np.asarray(rejected, dtype=np.int64), chosen, np.ones(chosen.shape), params, seed=seed
    )
