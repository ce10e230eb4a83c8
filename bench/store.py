"""Ingest 1,000,000 prompts into a dataset and GROUP BY over them, beside plain polars.

Ours: the ingest step exactly as a build runs it (read, validate, NFC + whitespace
normalisation, sha256 content ids, exact de-duplication, sharding, the contract gate,
atomic shard writes, registration in the catalog), then a GROUP BY through the catalog view.

Baseline: the least work that still reads the same file and writes it as Parquet, so the
ratio is against the strongest honest competitor: ``polars.read_ndjson`` + ``write_parquet``
with the compression our shards use (zstd at level 1, pyarrow's default, which the store's
writer gets), then the same GROUP BY with polars over the written file. It validates,
normalises, hashes and de-duplicates nothing. ``scan_ndjson().sink_parquet()`` and polars'
default zstd level measured within 5% of it here (2 cores), so neither is a stronger one.

rows/s = input rows / (ingest + group-by seconds); ratio = baseline seconds / ours.

Floor (printed, and ``floor_ratio`` in RESULT): the baseline plus only what any ingest with
content ids and exact de-duplication must add, done as ours does them (the fastest we found):
each prompt's id (``hex_ids``: polars-hash sha256, row ranges side by side on every core), an
``is_first_distinct`` filter on it, and the id column in the written file. It validates,
normalises, quarantines and counts nothing, so ``floor_ratio`` bounds the ratio such an ingest
can reach on this machine. ``floor_ratio_fast_hash`` is the same floor with a non-cryptographic
128-bit hash (xxh3) in place of sha256: what the bound would become if content ids changed
hash, which would re-id every existing dataset. CPU seconds (user + system, all threads)
are printed beside the wall seconds: on 2 cores they show how much work each side does.

``small_file_growth``: the seconds of one more 1,000-prompt file into the 1M-prompt dataset
over the same into an empty one (best of three each): a file's cost should not grow with the
dataset it joins.

``folder_ms_per_file``: a folder of 200 files of 100 prompts each, ingested as a stage flow
does it minus Prefect and Dask (the small files in batch units), milliseconds a file;
``folder_speedup``: the same files one unit a file over that.

Usage: python bench/store.py [rows]   (default 1,000,000)
"""

from __future__ import annotations

import itertools
import json
import random
import resource
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# the repository root first on sys.path, so this checkout's prefcurate is the one measured
sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import polars as pl
import polars_hash as plh
from prefcurate.schemas.ids import hex_ids
from prefcurate.tasks.ingest import IngestParams

from prefcurate.steps.base import StageContext
from prefcurate.steps.ingest import IngestStep
from prefcurate.store import Store

FOLDER_FILES = 200
ZSTD_LEVEL = 1  # what the store's pyarrow shard writer uses (compression="zstd", default level)
CATEGORIES = ["coding", "math", "advice", "creative", "factual", "safety"]
WORDS = ["the", "a", "of", "to", "explain", "why", "how", "write", "code", "list", "steps", "compare", "summarise", "plan", "story"]


def make_file(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for i in range(rows):
            # about 1% exact duplicates of an earlier prompt, as real prompt dumps have
            n = i if rng.random() > 0.01 or i == 0 else rng.randrange(i)
            words = " ".join(WORDS[(n * 7 + k * 3) % len(WORDS)] for k in range(8 + n % 20))
            handle.write(json.dumps({"id": f"r{i}", "prompt": f"{words}  #{n}", "category": CATEGORIES[n % 6]}))
            handle.write("\n")


def ours(path: Path, root: Path) -> tuple[float, int]:
    store = Store.init(root)
    params = IngestParams(path=str(path), shard_rows=100_000)
    ctx = StageContext(str(store.root), {}, "bench")
    step = IngestStep(params)
    marks = [time.perf_counter()]
    (unit,) = step.plan(ctx)  # the file's sha256: the unit key
    marks.append(time.perf_counter())
    result = step.run_unit(unit, ctx)
    marks.append(time.perf_counter())
    store.register(result.shards)
    marks.append(time.perf_counter())
    groups = store.query("SELECT category, count(*) AS n, avg(char_len) AS mean_len FROM prompts GROUP BY ALL")
    marks.append(time.perf_counter())
    seconds = marks[-1] - marks[0]
    parts = dict(zip(["plan (file sha256)", "unit (read, validate, ids, de-duplicate, gate, writes)", "register",
                      "group-by"], np.diff(marks)))
    print("ours, by part: " + ", ".join(f"{name} {value:.2f} s" for name, value in parts.items()))
    assert groups["n"].sum() == store.count("prompts") == result.counts["accepted"]
    assert result.counts["rows_read"] == result.counts["accepted"] + result.counts["quarantined"] + result.counts["duplicates"]
    return seconds, result.counts["accepted"]


def small_file_seconds(root: Path, folder: Path, files: int = 3) -> float:
    """Best wall seconds of one 1,000-prompt file (plan, run, register) into the dataset at
    ``root``: per-file cost must not grow with what the dataset already holds."""
    store, best = Store.open(root), float("inf")
    for i in range(files):
        path = folder / f"small-{root.name}-{i}.jsonl"
        path.write_text("".join(json.dumps({"id": f"{root.name}-{i}-{k}", "prompt": f"small file {i}, prompt {k}"})
                                + "\n" for k in range(1000)))
        step, ctx = IngestStep(IngestParams(path=str(path))), StageContext(str(store.root), {}, "bench")
        started = time.perf_counter()
        (unit,) = step.plan(ctx)
        store.register(step.run_unit(unit, ctx).shards)
        best = min(best, time.perf_counter() - started)
    return best


def folder_seconds(root: Path, folder: Path, batched: bool) -> float:
    """Wall seconds of ingesting every file of ``folder`` into a new dataset at ``root``, as
    a stage flow does (plan, pending, run each unit, register), the small files in batch units
    (``batched``) or each file a unit of its own, as before batches. (Without Prefect and Dask,
    whose round trip per unit, ~0.15 s here, batches save too: ``prefcurate ingest`` over these
    files took 56 s one unit a file and 8-9 s in batches.)"""
    store = Store.init(root)
    ctx = StageContext(str(store.root), {}, "bench", catalog_checked=True)
    step = IngestStep(IngestParams(path=str(folder)))
    started = time.perf_counter()
    todo, _ = step.pending(ctx, step.plan(ctx))
    for unit in step.batched(todo) if batched else todo:
        store.register_units("ingest", step.run_unit(unit, ctx).registrations())
    return time.perf_counter() - started


def baseline(path: Path, out: Path) -> float:
    started = time.perf_counter()
    pl.read_ndjson(path).write_parquet(out, compression="zstd", compression_level=ZSTD_LEVEL)
    pl.read_parquet(out).group_by("category").agg(pl.len().alias("n"), pl.col("prompt").str.len_chars().mean())
    return time.perf_counter() - started


def floor(path: Path, out: Path, fast_hash: bool = False) -> float:
    started = time.perf_counter()
    frame = pl.read_ndjson(path)
    ids = plh.col("prompt").nchash.xxh3_128().cast(pl.String) if fast_hash else hex_ids(pl.col("prompt"))
    # polars hashes one column in one thread: as ours, a row range per core
    bounds = np.linspace(0, frame.height, pl.thread_pool_size() + 1).astype(int)
    with ThreadPoolExecutor(pl.thread_pool_size()) as threads:
        parts = threads.map(lambda rows: frame.slice(rows[0], rows[1] - rows[0]).select(ids.alias("prompt_id")),
                            itertools.pairwise(bounds))
        frame = frame.with_columns(pl.concat(list(parts)).to_series())
    frame = frame.filter(pl.col("prompt_id").is_first_distinct())
    frame.write_parquet(out, compression="zstd", compression_level=ZSTD_LEVEL)
    pl.read_parquet(out).group_by("category").agg(pl.len().alias("n"), pl.col("prompt").str.len_chars().mean())
    return time.perf_counter() - started


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(run, *args):
    """(wall seconds the call reports, CPU seconds it took, its other results)."""
    before = cpu_seconds()
    result = run(*args)
    wall, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    return wall, cpu_seconds() - before, rest


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / "prompts.jsonl"
        print(f"writing {rows:,} synthetic prompts...", flush=True)
        make_file(source, rows)
        base_s, base_cpu, _ = timed(baseline, source, tmp / "baseline.parquet")
        floor_s, floor_cpu, _ = timed(floor, source, tmp / "floor.parquet")
        fast_s, fast_cpu, _ = timed(floor, source, tmp / "floor_fast.parquet", True)
        ours_s, ours_cpu, (accepted,) = timed(ours, source, tmp / "dataset")
        print(f"ours:     {ours_s:7.2f} s, {ours_cpu:5.2f} CPU s  ({rows / ours_s:,.0f} rows/s; "
              f"{accepted:,} accepted after dedup)")
        print(f"baseline: {base_s:7.2f} s, {base_cpu:5.2f} CPU s  ({rows / base_s:,.0f} rows/s; "
              "polars read_ndjson + write_parquet + group_by)")
        print(f"floor:    {floor_s:7.2f} s, {floor_cpu:5.2f} CPU s  (the baseline + sha256 ids, exact "
              f"de-duplication and the id column, nothing else: at best ratio {base_s / floor_s:.3f})")
        print(f"          {fast_s:7.2f} s, {fast_cpu:5.2f} CPU s  (the same with xxh3-128 in place of sha256: "
              f"at best ratio {base_s / fast_s:.3f})")
        Store.init(tmp / "empty")
        small_full, small_empty = small_file_seconds(tmp / "dataset", tmp), small_file_seconds(tmp / "empty", tmp)
        print(f"a 1,000-prompt file: {small_full:.3f} s into this dataset of {accepted:,} prompts, "
              f"{small_empty:.3f} s into an empty one (x{small_full / small_empty:.2f})")
        folder = tmp / "folder"
        folder.mkdir()
        for i in range(FOLDER_FILES):
            (folder / f"part-{i:04d}.jsonl").write_text("".join(
                json.dumps({"id": f"{i}-{k}", "prompt": f"file {i}, prompt {k}"}) + "\n" for k in range(100)))
        one_by_one, batched = folder_seconds(tmp / "one-by-one", folder, False), folder_seconds(tmp / "batched", folder, True)
        print(f"a folder of {FOLDER_FILES} files of 100 prompts: {batched:.2f} s in batch units, {one_by_one:.2f} s "
              f"one unit a file ({1000 * batched / FOLDER_FILES:.0f} against {1000 * one_by_one / FOLDER_FILES:.0f} ms a file)")
        print(
            f"RESULT rows_per_s={rows / ours_s:.0f} baseline_rows_per_s={rows / base_s:.0f} "
            f"ratio={base_s / ours_s:.3f} floor_ratio={base_s / floor_s:.3f} "
            f"floor_ratio_fast_hash={base_s / fast_s:.3f} small_file_growth={small_full / small_empty:.2f} "
            f"folder_ms_per_file={1000 * batched / FOLDER_FILES:.0f} folder_speedup={one_by_one / batched:.2f}"
        )


if __name__ == "__main__":
    main()
