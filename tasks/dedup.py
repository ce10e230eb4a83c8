"""Exact and semantic de-duplication, keeping the best-quality item of each duplicate group.

Exact duplicates (:func:`exact_duplicates`)
    Texts are normalised (Unicode NFKC, lower case, runs of whitespace collapsed, ends
    stripped) and grouped by the normalised string itself, so there are no hash
    collisions to reason about. Punctuation is kept: "2+2" and "2-2" are different items.

Semantic duplicates (:func:`near_duplicate_pairs`, :func:`semantic_duplicates`)
    Two items are near-duplicates when the cosine similarity of their (L2-normalised)
    embeddings is ``>= threshold``; a duplicate *group* is a connected component of that
    graph (SciPy ``connected_components``), and its representative is the item of highest
    quality (ties: lowest index). Every other member is dropped with ``duplicate_of`` set to
    the representative. Components chain (A~B and B~C groups A, B, C even when A and C are
    below the threshold); at thresholds >= 0.9 chains are short and this is the grouping
    SemDeDup-style pipelines use, and it makes the result independent of processing order.

Finding the pairs at scale: an inverted-file search with dense blocks
    Up to ``DedupParams.exact_below`` items the pairs come from an exact blocked
    brute force (upper triangle of ``X @ X.T``, row chunk by chunk). Above it:

    1. spherical k-means (faiss) with ``n_clusters = 2 sqrt(n)`` cells by default, trained
       on ``train_points_per_cluster`` points per cell, in a 64-dimensional PCA projection
       (near-duplicates stay close under a projection, which is all the cells are for, and
       assignment costs 6x less). ``~sqrt(n)`` cells balance the two costs, assignment
       ``n·C`` and in-cell comparisons ``n·(n/C)·d``;
    2. every item goes to its nearest centroid (its *cell*) and also *probes* its next
       ``n_probe - 1`` nearest cells when their centroid similarity is within
       ``probe_margin`` of its own cell's (items deep inside a cell probe nothing);
    3. per cell, one dense matrix product of the cell with itself (upper triangle) and one
       of the cell's probing items with the cell, on the full vectors, thresholded. So the
       reported similarities are exact (precision 1), and a pair is missed only when
       neither item's probes reach the other's cell.

    This is the IVF idea (Jégou et al.) evaluated with matrix products instead of
    per-query scans: near-duplicates sit very close to each other, so they share a cell
    almost always, and cell-vs-cell products run at BLAS speed. Measured on 50,000
    clustered synthetic vectors (one thread each, wall seconds on a shared machine),
    recall of pairs at cosine >= 0.95 vs exact brute force: this scheme recall 0.994-0.996
    in 2-4 s; faiss ``IndexIVFFlat.range_search`` recall 0.97 (nprobe 1) to 0.99 (nprobe 4) in 7-16 s;
    HNSW kNN (k=8) recall 0.99-0.998 in 76 s (faiss) and 104 s (usearch), mostly graph
    construction. At 1,000,000 x 384 (``bench/selection.py``): 38 CPU seconds, 99.5 % of the
    planted pairs grouped; on its 100,000 sample pair recall 0.9925 against scikit-learn's
    exact radius search, 52x less CPU time.

    The cell products use single-threaded BLAS in a thread pool of ``threads`` workers:
    cells are small matrices, where multi-threaded BLAS mostly synchronises (measured 2x
    slower on a loaded 2-core machine), while independent cells in parallel scale.

    A cell holding a huge clique (thousands of mutual near-duplicates) would produce a
    quadratic number of pairs; past ``8 x cell size`` pairs a cell's pairs are reduced to a
    spanning forest, which keeps the groups (connectivity) and bounds memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

#: max rows x columns of one similarity chunk (float32: 64 MB)
_CHUNK_ELEMENTS = 16_000_000


class DedupParams(BaseModel):
    """How near-duplicate pairs are searched (the threshold is passed separately)."""

    model_config = ConfigDict(extra="forbid")

    exact_below: int = Field(
        8192, ge=0, description="up to this many items, compare all pairs exactly (brute force)"
    )
    n_clusters: int | None = Field(
        None, ge=1, description="k-means cells of the index; None: round(2 sqrt(n)), at most 8192"
    )
    n_probe: int = Field(3, ge=1, le=8, description="cells each item is compared against (its own + next)")
    probe_margin: float = Field(
        0.05,
        ge=0.0,
        description="an item probes a further cell only if that centroid's similarity is within "
        "this margin of its own cell's; inf: always probe n_probe cells",
    )
    train_points_per_cluster: int = Field(48, ge=4, description="k-means training sample per cluster")
    project_dim: int | None = Field(
        64,
        ge=2,
        description="cells are trained and assigned on the embeddings projected onto their top "
        "principal directions (and re-normalised); None: on the full vectors",
    )
    kmeans_iterations: int = Field(10, ge=1)
    threads: int | None = Field(None, ge=1, description="worker threads; None: the CPUs this process may use")
    seed: int = 0


@dataclass(frozen=True)
class Partition:
    """k-means cells of a set of vectors: centroids, each item's cell and probed cells."""

    centroids: np.ndarray  # [C, p] float32, unit norm, in the (projected) space of the cells
    labels: np.ndarray  # [n] int64, the nearest centroid
    probes: np.ndarray  # [n, m] int64, the m nearest centroids, nearest first (column 0 == labels)
    probe_scores: np.ndarray  # [n, m] float32, their cosine similarities
    projection: np.ndarray | None = None  # [d, p] float32: cells live in normalise(x @ projection)

    @property
    def n_cells(self) -> int:
        return int(self.centroids.shape[0])

    def cells(self) -> tuple[np.ndarray, np.ndarray]:
        """(order, offsets): items of cell c are ``order[offsets[c]:offsets[c + 1]]``, ascending."""
        return cells_of(self.labels, self.n_cells)

    def subset(self, rows: np.ndarray) -> Partition:
        """The same cells restricted to ``rows`` (indices into this partition's items)."""
        return Partition(
            self.centroids, self.labels[rows], self.probes[rows], self.probe_scores[rows], self.projection
        )


def cells_of(labels: np.ndarray, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(labels, kind="stable")
    offsets = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(np.bincount(labels, minlength=n_cells), out=offsets[1:])
    return order, offsets


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def compute_threads(threads: int | None):
    """Single-threaded BLAS inside, ``threads`` OpenMP threads for faiss; yields a map function.

    The map runs a function over an iterable in a thread pool (NumPy's BLAS calls release
    the GIL), or inline for one thread.
    """
    import faiss
    from threadpoolctl import threadpool_limits

    threads = threads or default_threads()
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            if threads == 1:
                yield lambda fn, items: map(fn, items)
            else:
                with ThreadPoolExecutor(threads) as pool:
                    yield lambda fn, items: pool.map(fn, items)
    finally:
        faiss.omp_set_num_threads(previous)


def as_unit_float32(embeddings: np.ndarray) -> np.ndarray:
    """The embeddings as C-contiguous float32 (no copy when they already are); rejects bad shapes."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError("embeddings must be a 2-D array [n, d]")
    return x


# --- k-means cells ----------------------------------------------------------------------


def kmeans_partition(
    embeddings: np.ndarray,
    n_clusters: int,
    *,
    n_probe: int = 1,
    seed: int = 0,
    train_points_per_cluster: int = 48,
    iterations: int = 10,
    project_dim: int | None = None,
    threads: int | None = None,
    weights: np.ndarray | None = None,
    rows: np.ndarray | None = None,
) -> Partition:
    """Spherical k-means (faiss) trained on a sample, then every item's ``n_probe`` nearest cells.

    With ``project_dim``, training and assignment run on ``normalise(x @ W)``, ``W`` the top
    ``project_dim`` eigenvectors of the sample's (uncentred) second-moment matrix: at 64 of
    384 dimensions assignment costs 6x less, and near-duplicates stay near-duplicates under
    a projection (it only shrinks distances), which is all the cells are used for.
    ``weights`` (per item) are passed to faiss training, e.g. counts when clustering centroids.
    ``rows`` restricts the items to ``embeddings[rows]`` without copying them all.
    """
    import faiss

    x = as_unit_float32(embeddings)
    n, d = (x.shape[0] if rows is None else len(rows)), x.shape[1]
    if n == 0:
        raise ValueError("no items to cluster")
    n_clusters = int(max(1, min(n_clusters, n)))
    rng = np.random.default_rng(seed)
    n_train = min(n, max(n_clusters * train_points_per_cluster, 1))
    sample = np.sort(rng.choice(n, size=n_train, replace=False)) if n_train < n else np.arange(n)
    train = x[sample] if rows is None else x[np.asarray(rows)[sample]]
    projection = None
    if project_dim is not None and project_dim < d:
        moment = (train.T.astype(np.float64) @ train.astype(np.float64)) / max(1, len(train))
        _, vectors = np.linalg.eigh(moment)
        projection = np.ascontiguousarray(vectors[:, ::-1][:, :project_dim], dtype=np.float32)
        train = _project(train, projection)
    with compute_threads(threads) as pmap:
        if n_clusters == 1:
            centroid = train.mean(axis=0, dtype=np.float64)
            centroid /= max(np.linalg.norm(centroid), 1e-12)
            centroids = centroid[None, :].astype(np.float32)
        else:
            kmeans = faiss.Kmeans(
                train.shape[1],
                n_clusters,
                niter=iterations,
                seed=seed,
                spherical=True,
                max_points_per_centroid=train_points_per_cluster,
                min_points_per_centroid=1,
                verbose=False,
            )
            train_weights = None
            if weights is not None:
                train_weights = np.ascontiguousarray(np.asarray(weights, dtype=np.float32)[sample])
            kmeans.train(train, weights=train_weights)
            centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
        probes, scores = nearest_centroids(x, centroids, n_probe, pmap, projection=projection, rows=rows)
    return Partition(centroids, probes[:, 0].copy(), probes, scores, projection)


def _project(x: np.ndarray, projection: np.ndarray) -> np.ndarray:
    y = x @ projection
    y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    return y


def nearest_centroids(
    x: np.ndarray,
    centroids: np.ndarray,
    n_probe: int,
    pmap: Callable | None = None,
    *,
    projection: np.ndarray | None = None,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices and similarities of each row's ``n_probe`` most similar centroids, best first.

    With ``projection``, rows are compared as ``normalise(x @ projection)``; with ``rows``,
    only ``x[rows]`` are assigned (results in ``rows`` order).
    """
    n = x.shape[0] if rows is None else len(rows)
    n_probe = int(min(n_probe, centroids.shape[0]))
    probes = np.empty((n, n_probe), dtype=np.int64)
    scores = np.empty((n, n_probe), dtype=np.float32)
    chunk_rows = max(1024, _CHUNK_ELEMENTS // max(1, centroids.shape[0]))

    def assign(start: int) -> None:
        chunk = x[start : start + chunk_rows] if rows is None else x[rows[start : start + chunk_rows]]
        if projection is not None:
            chunk = _project(chunk, projection)
        sim = chunk @ centroids.T
        index = np.arange(sim.shape[0])
        # n_probe passes of argmax beat a partial sort for the 1-4 probes we use
        for p in range(n_probe):
            best = sim.argmax(axis=1)
            probes[start : start + chunk_rows, p] = best
            scores[start : start + chunk_rows, p] = sim[index, best]
            sim[index, best] = -np.inf

    starts = range(0, n, chunk_rows)
    if pmap is None:
        for s in starts:
            assign(s)
    else:
        list(pmap(assign, starts))
    return probes, scores


# --- near-duplicate pairs --------------------------------------------------------------


def near_duplicate_pairs(
    embeddings: np.ndarray,
    threshold: float,
    params: DedupParams | None = None,
    *,
    partition: Partition | None = None,
) -> tuple[np.ndarray, np.ndarray, Partition | None]:
    """Pairs ``(i, j)``, ``i < j``, with cosine similarity ``>= threshold``; their similarities.

    Exact below ``params.exact_below`` items, else the cell search of the module docstring
    (a given ``partition`` with probes is reused instead of training one). Returns
    ``(pairs [E, 2] int64, similarity [E] float32, partition or None)``, pairs sorted.
    """
    params = params or DedupParams()
    x = as_unit_float32(embeddings)
    n = x.shape[0]
    if n < 2:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32), partition
    threshold = float(threshold)
    if partition is None and n <= params.exact_below:
        with compute_threads(params.threads) as pmap:
            found = list(pmap(lambda s: _upper_block_pairs(x, s, threshold), _row_starts(n, n)))
        return (*_unique_pairs(found, n), None)
    if partition is None:
        n_clusters = params.n_clusters or int(min(8192, max(1, round(2 * np.sqrt(n)))))
        partition = kmeans_partition(
            x,
            n_clusters,
            n_probe=params.n_probe,
            seed=params.seed,
            train_points_per_cluster=params.train_points_per_cluster,
            iterations=params.kmeans_iterations,
            project_dim=params.project_dim,
            threads=params.threads,
        )
    order, offsets = partition.cells()
    probe_items, probe_offsets = _secondary_probes(partition, params.probe_margin)
    # big cells first, so the pool's last tasks are short ones
    cell_order = np.argsort(-np.diff(offsets), kind="stable")

    def search_cell(cell: int):
        members = order[offsets[cell] : offsets[cell + 1]]
        probing = probe_items[probe_offsets[cell] : probe_offsets[cell + 1]]
        return _cell_pairs(x, members, probing, threshold)

    with compute_threads(params.threads) as pmap:
        found = list(pmap(search_cell, cell_order))
    return (*_unique_pairs(found, n), partition)


def _row_starts(n_rows: int, n_cols: int) -> range:
    return range(0, n_rows, max(64, _CHUNK_ELEMENTS // max(1, n_cols)))


def _upper_block_pairs(x: np.ndarray, start: int, threshold: float):
    rows = max(64, _CHUNK_ELEMENTS // max(1, x.shape[0]))
    block = x[start : start + rows]
    sim = block @ x[start:].T
    i, j = np.nonzero(sim >= threshold)
    upper = j > i
    i, j = i[upper], j[upper]
    return i + start, j + start, sim[i, j]


def _secondary_probes(partition: Partition, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Items probing each cell beyond their own: (items sorted by probed cell, offsets per cell)."""
    n_cells = partition.n_cells
    if partition.probes.shape[1] < 2:
        return np.zeros(0, np.int64), np.zeros(n_cells + 1, np.int64)
    extra = partition.probe_scores[:, 1:] >= (partition.probe_scores[:, :1] - margin)
    item, column = np.nonzero(extra)
    cell = partition.probes[:, 1:][item, column]
    order = np.argsort(cell, kind="stable")
    offsets = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(np.bincount(cell, minlength=n_cells), out=offsets[1:])
    return item[order], offsets


def _cell_pairs(x: np.ndarray, members: np.ndarray, probing: np.ndarray, threshold: float):
    size = members.size
    if size == 0:
        return _EMPTY
    block = x[members]
    rows = max(64, _CHUNK_ELEMENTS // size)
    firsts, seconds, sims = [], [], []
    n_found = 0
    for start in range(0, size, rows):
        sim = block[start : start + rows] @ block[start:].T
        i, j = np.nonzero(sim >= threshold)
        upper = j > i
        i, j = i[upper], j[upper]
        firsts.append(members[i + start])
        seconds.append(members[j + start])
        sims.append(sim[i, j])
        n_found += i.size
        if n_found > 8 * size:
            firsts, seconds, sims = _spanning_forest(firsts, seconds, sims)
            n_found = firsts[0].size
    for start in range(0, probing.size, rows):
        queries = probing[start : start + rows]
        sim = x[queries] @ block.T
        i, j = np.nonzero(sim >= threshold)
        firsts.append(queries[i])
        seconds.append(members[j])
        sims.append(sim[i, j])
        n_found += i.size
        if n_found > 8 * size:
            firsts, seconds, sims = _spanning_forest(firsts, seconds, sims)
            n_found = firsts[0].size
    if not firsts:
        return _EMPTY
    return np.concatenate(firsts), np.concatenate(seconds), np.concatenate(sims)


_EMPTY = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))


def _spanning_forest(firsts: list, seconds: list, sims: list):
    """Edges linking every node to its component's first node: same components, <= V - 1 edges."""
    a, b, s = np.concatenate(firsts), np.concatenate(seconds), np.concatenate(sims)
    nodes, local = np.unique(np.concatenate([a, b]), return_inverse=True)
    graph = coo_matrix(
        (np.ones(a.size, np.int8), (local[: a.size], local[a.size :])), shape=(nodes.size,) * 2
    )
    _, component = connected_components(graph, directed=False)
    first_of = np.full(component.max() + 1, nodes.size, dtype=np.int64)
    np.minimum.at(first_of, component, np.arange(nodes.size))
    root = first_of[component]
    child = np.flatnonzero(root != np.arange(nodes.size))
    # similarity of a forest edge is not a measured pair similarity: mark it as the threshold floor
    floor = np.full(child.size, s.min(), dtype=np.float32)
    return [nodes[root[child]]], [nodes[child]], [floor]


def _unique_pairs(found: Iterable, n: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [f for f in found if f[0].size]
    if not parts:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    a = np.concatenate([p[0] for p in parts]).astype(np.int64)
    b = np.concatenate([p[1] for p in parts]).astype(np.int64)
    s = np.concatenate([p[2] for p in parts]).astype(np.float32)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    keep = lo != hi
    key = lo[keep] * n + hi[keep]
    key, first = np.unique(key, return_index=True)
    pairs = np.stack([key // n, key % n], axis=1)
    return pairs, s[keep][first]


# --- groups and representatives ---------------------------------------------------------


def _quality_array(quality: np.ndarray | Sequence[float] | None, n: int) -> np.ndarray:
    if quality is None:
        return np.zeros(n, dtype=np.float64)
    q = np.asarray(quality, dtype=np.float64).copy()
    if q.shape != (n,):
        raise ValueError(f"quality must have one value per item ({n}), got shape {q.shape}")
    q[np.isnan(q)] = -np.inf  # unscored items never represent a group
    return q


def representatives(
    group: np.ndarray, quality: np.ndarray | Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the best item of each group: ``(keep [n] bool, duplicate_of [n] int64, -1 when kept)``.

    Best = highest quality, ties to the lowest index; NaN quality counts as lowest.
    """
    group = np.asarray(group, dtype=np.int64)
    n = group.size
    q = _quality_array(quality, n)
    index = np.arange(n)
    order = np.lexsort((index, -q, group))
    starts = np.ones(n, dtype=bool)
    starts[1:] = group[order][1:] != group[order][:-1]
    best_of_group = np.empty(group.max() + 1 if n else 0, dtype=np.int64)
    best_of_group[group[order][starts]] = order[starts]
    duplicate_of = best_of_group[group] if n else np.zeros(0, np.int64)
    keep = duplicate_of == index
    duplicate_of = np.where(keep, -1, duplicate_of)
    return keep, duplicate_of


def groups_from_pairs(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component id of each of ``n`` items under the ``pairs`` edges."""
    if n == 0:
        return np.zeros(0, np.int64)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64)


def semantic_duplicates(
    embeddings: np.ndarray,
    quality: np.ndarray | Sequence[float] | None,
    threshold: float = 0.95,
    params: DedupParams | None = None,
    *,
    partition: Partition | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Near-duplicate groups by cosine ``>= threshold``; ``(keep_mask, duplicate_of_index)``.

    ``duplicate_of`` is the group's representative (highest quality) for dropped items and
    -1 for kept ones. See :func:`semantic_duplicates_detail` for the pairs and partition.
    """
    keep, duplicate_of, _, _ = semantic_duplicates_detail(
        embeddings, quality, threshold, params, partition=partition
    )
    return keep, duplicate_of


def semantic_duplicates_detail(
    embeddings: np.ndarray,
    quality: np.ndarray | Sequence[float] | None,
    threshold: float = 0.95,
    params: DedupParams | None = None,
    *,
    partition: Partition | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Partition | None]:
    """As :func:`semantic_duplicates`, also returning the pairs found and the k-means partition."""
    x = as_unit_float32(embeddings)
    pairs, _, partition = near_duplicate_pairs(x, threshold, params, partition=partition)
    keep, duplicate_of = representatives(groups_from_pairs(x.shape[0], pairs), quality)
    return keep, duplicate_of, pairs, partition


# --- exact duplicates -------------------------------------------------------------------


def normalize_texts(texts: Sequence[str | None] | pl.Series) -> pl.Series:
    """NFKC, lower case, whitespace runs collapsed to one space, ends stripped (null -> "")."""
    series = pl.Series("text", texts, dtype=pl.String).fill_null("")
    return series.str.normalize("NFKC").str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars()


def exact_duplicates(
    texts: Sequence[str | None] | pl.Series, quality: np.ndarray | Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Items whose normalised texts are equal; ``(keep_mask, duplicate_of_index)`` as above."""
    normalized = normalize_texts(texts)
    if normalized.len() == 0:
        return np.zeros(0, bool), np.zeros(0, np.int64)
    group = normalized.rank(method="dense").to_numpy().astype(np.int64) - 1
    return representatives(group, quality)


def pair_dedup_text(
    frame: pl.DataFrame, columns: Sequence[str] = ("prompt", "chosen", "rejected")
) -> pl.Series:
    """The text whose normalised form defines an exact-duplicate pair: each column normalised
    on its own, then the columns as one JSON object. JSON keeps the columns apart whatever
    they hold (a separator character inside a text could make two different pairs one key),
    and normalising it again leaves it as it is."""
    normalised = [normalize_texts(frame[c].cast(pl.String)).alias(c) for c in columns]
    return pl.DataFrame(normalised).select(pl.struct(columns).struct.json_encode().alias("text")).to_series()
