"""Bench: importing judgments (tasks/import_judgments.py), on real and synthetic data.

- PandaLM's test set (../shared/data/pandalm/, skipped when absent): 999 items x 5 judges
  through examples/import_pandalm.yaml, with how often each judge agrees with the human
  majority after the import (a check that the swaps land verdicts on the right response:
  an inverted import would put the model judges far below 50 %).
- Synthetic JSONL of N records (both orders as probabilities, ratings): rows per second of
  import_file (read, validate, hash, swap, de-duplicate), no store.

    .venv/bin/python bench/import_judgments.py [--records 200000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefcurate.tasks.import_judgments import ImportMapping, import_file, load_mapping

PANDALM = ROOT.parent / "shared" / "data" / "pandalm"


def pandalm() -> dict | None:
    if not (PANDALM / "testset-v1.json").exists():
        return None
    started = time.perf_counter()
    result = import_file(PANDALM / "testset-v1.json", load_mapping(ROOT / "examples" / "import_pandalm.yaml"))
    seconds = time.perf_counter() - started
    items = json.loads((PANDALM / "testset-v1.json").read_text())
    labels = np.array([[item[f"annotator{k}"] for k in (1, 2, 3)] for item in items])
    majority = {}
    for item, row in zip(items, labels):
        values, counts = np.unique(row, return_counts=True)
        if counts.max() >= 2:
            majority[item["idx"]] = int(values[counts.argmax()])
    texts = dict(zip(result.responses["response_id"], result.responses["text"]))
    judgments = result.judgments.with_columns(
        pl.col("response_a").replace_strict(texts).alias("text_a"))
    agreement = {}
    for judge, rows in judgments.group_by("judge"):
        hits = total = 0
        for record, p_a, text_a in zip(rows["source_record"], rows["p_a"], rows["text_a"]):
            item = items[record - 1]
            label = majority.get(item["idx"])
            if label is None:
                continue
            if p_a == 0.5:
                verdict = 0
            else:
                better_is_a = p_a > 0.5
                first_is_a = text_a == item["response1"]
                verdict = 1 if better_is_a == first_is_a else 2
            hits += verdict == label
            total += 1
        agreement[judge[0]] = round(hits / total, 3)
    return {"seconds": round(seconds, 2), **{k: result.counts[k] for k in ("judgment_rows", "judgments", "quarantined")},
            "agreement_with_human_majority": dict(sorted(agreement.items()))}


def synthetic(records: int) -> dict:
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, records // 4 + 1, records)
    frame = pl.DataFrame({
        "prompt": [f"Question {p}: explain item {p}." for p in prompts],
        "response_1": [f"answer one to {p}, variant {i % 7}" for i, p in enumerate(prompts)],
        "response_2": [f"answer two to {p}, variant {i % 5}" for i, p in enumerate(prompts)],
        "judge": rng.choice(["judge-a", "judge-b", "judge-c"], records),
        "p_12": rng.random(records).round(4), "p_21": rng.random(records).round(4),
        "rating_1": rng.integers(1, 11, records), "rating_2": rng.integers(1, 11, records),
    })
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "judgments.jsonl"
        frame.write_ndjson(path)
        started = time.perf_counter()
        result = import_file(path, ImportMapping(rating_scale=(1, 10)))
        seconds = time.perf_counter() - started
    return {"records": records, "seconds": round(seconds, 2), "records_per_s": round(records / seconds),
            **{k: result.counts[k] for k in ("judgments", "duplicates", "prompts", "responses", "ratings")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    args = parser.parse_args()
    print(json.dumps({"pandalm": pandalm(), "synthetic": synthetic(args.records)}, indent=2))


if __name__ == "__main__":
    main()
