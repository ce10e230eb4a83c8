"""Export: DPO JSONL and Parquet that `datasets` loads back unchanged, plus the dataset card."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import polars as pl
import pytest
from prefcurate.tasks.export import export_pairs


@pytest.fixture
def pairs() -> pl.DataFrame:
    n = 40
    rng = np.random.default_rng(0)
    return pl.DataFrame(
        {
            "pair_id": [f"pair-{i:03d}" for i in range(n)],
            "prompt_id": [f"prompt-{i // 2}" for i in range(n)],
            "prompt": [f'Question {i}: what is ünïcode "quoted"\nnew line?' for i in range(n)],
            "chosen": [f"A careful answer {i}." for i in range(n)],
            "rejected": [f"A sloppy answer {i}" for i in range(n)],
            "p_chosen": rng.uniform(0.6, 1.0, n),
            "margin": rng.gamma(2.0, 0.5, n),
            "chosen_score": rng.uniform(3, 5, n),
            "rejected_score": [None if i % 7 == 0 else float(x) for i, x in enumerate(rng.uniform(1, 3, n))],
            "cluster": (np.arange(n) % 5).astype(np.int32),
            "chosen_generator": ["gen-a", "gen-b"] * (n // 2),
            "strategy": ["best_vs_worst"] * n,
            "created_at": [dt.datetime(2025, 5, 1, 12, 0, i % 60, tzinfo=dt.UTC) for i in range(n)],
        }
    )


def load(kind: str, path, cache):
    from datasets import load_dataset

    return load_dataset(kind, data_files=str(path), split="train", cache_dir=str(cache))


def test_round_trip_through_datasets(pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "export"
    written = export_pairs(pairs, out, card_stats={"filters": {"position_flip": 3}})
    assert {"jsonl", "parquet", "card", "score_plot", "cluster_plot"} <= set(written)
    expected = pairs.select(
        ["prompt", "chosen", "rejected"]
        + [c for c in pairs.columns if c not in ("prompt", "chosen", "rejected")]
    )
    from_parquet = load("parquet", written["parquet"], tmp_path / "cache").to_polars()
    assert from_parquet.columns[:3] == ["prompt", "chosen", "rejected"]
    assert from_parquet.equals(expected)

    from_json = load("json", written["jsonl"], tmp_path / "cache").to_polars()
    assert from_json.columns == expected.columns
    for column in (
        "prompt",
        "chosen",
        "rejected",
        "pair_id",
        "chosen_generator",
        "rejected_score",
        "cluster",
    ):
        assert from_json[column].to_list() == expected[column].to_list(), column
    np.testing.assert_allclose(from_json["p_chosen"].to_numpy(), expected["p_chosen"].to_numpy())
    # timestamps travel as ISO-8601 text in JSON
    parsed = [dt.datetime.fromisoformat(s) for s in from_json["created_at"].to_list()]
    assert parsed == expected["created_at"].to_list()

    # the folder loads through the card's `configs` entry
    from datasets import load_dataset

    whole = load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert whole.num_rows == pairs.height


def test_jsonl_lines_are_dpo_records(pairs, tmp_path):
    written = export_pairs(pairs, tmp_path, formats=("jsonl",), plots=False)
    assert set(written) == {"jsonl", "card"}
    lines = written["jsonl"].read_text(encoding="utf-8").splitlines()
    assert len(lines) == pairs.height
    first = json.loads(lines[0])
    assert list(first)[:3] == ["prompt", "chosen", "rejected"]
    assert first["prompt"] == pairs["prompt"][0] and first["pair_id"] == "pair-000"


def test_card_and_files_are_complete(pairs, tmp_path):
    stats = {
        "title": "Test pairs",
        "sources": [
            {"source_file": "prompts.jsonl", "prompts": 20},
            {"source_file": "more.jsonl", "prompts": 3},
        ],
        "filters": {"drops": {"position_flip": 3, "low_confidence": 5}, "margin": 0.5},
        "selection": {"method": "facility_location", "selected": {"mean_quality": 1.25}},
        "cluster_pool_counts": {c: 30 for c in range(7)},
        "run_id": "run-1",
    }
    written = export_pairs(pairs, tmp_path, card_stats=stats)
    card = written["card"].read_text(encoding="utf-8")
    assert card.startswith("---\nconfigs:")
    assert "path: data/train.parquet" in card
    assert "# Test pairs" in card
    assert "| source_file | prompts |" in card and "| more.jsonl | 3 |" in card
    assert "| pairs | 40 |" in card and "| distinct prompts | 20 |" in card
    assert "| drops.position_flip | 3 |" in card and "| margin | 0.5 |" in card
    assert "| selected.mean_quality | 1.25 |" in card
    assert "5 embedding clusters of 7" in card
    assert "](plots/score_distribution.png)" in card and "](plots/cluster_coverage.png)" in card
    assert 'load_dataset("parquet", data_files="data/train.parquet", split="train")' in card
    assert "| run_id | run-1 |" in card
    for key in ("score_plot", "cluster_plot"):
        assert written[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # atomic writes leave no temporary files behind
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_rejects_bad_input(pairs, tmp_path):
    with pytest.raises(ValueError, match="required columns"):
        export_pairs(pairs.drop("rejected"), tmp_path)
    with pytest.raises(ValueError, match="formats"):
        export_pairs(pairs, tmp_path, formats=("csv",))


def test_failed_write_keeps_previous_file(pairs, tmp_path, monkeypatch):
    written = export_pairs(pairs, tmp_path, formats=("parquet",), plots=False)
    before = written["parquet"].read_bytes()

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", broken)
    with pytest.raises(OSError):
        export_pairs(pairs.head(3), tmp_path, formats=("parquet",), plots=False)
    assert written["parquet"].read_bytes() == before
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
