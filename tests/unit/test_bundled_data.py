"""The data files shipped in ``prefcurate.data`` parse and meet the properties stages rely on.

Files are read through :mod:`importlib.resources`, as the pipeline does, so these tests also
catch a file that would be missing from an installed package.
"""

from __future__ import annotations

import json
from collections import Counter
from importlib.resources import files

import pytest
import yaml

PROMPT_CATEGORIES = ("coding", "math", "advice", "creative", "factual", "safety")
RUBRIC_ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
MAX_PROMPT_CHARS = 600


def _read_text(name: str) -> str:
    return files("prefcurate.data").joinpath(name).read_text(encoding="utf-8")


def _read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in _read_text(name).splitlines() if line.strip()]


def _assert_balanced(labels: list[str], low: float = 0.4, high: float = 0.6) -> None:
    counts = Counter(labels)
    assert set(counts) == {"A", "B"}, counts
    share_a = counts["A"] / len(labels)
    assert low <= share_a <= high, counts


def _assert_unique(values: list[str], what: str) -> None:
    repeated = [v for v, n in Counter(values).items() if n > 1]
    assert not repeated, f"duplicate {what}: {repeated[:3]}"


@pytest.fixture(scope="module")
def prompts() -> list[dict]:
    return _read_jsonl("prompts.jsonl")


@pytest.fixture(scope="module")
def gold_pairs() -> list[dict]:
    return _read_jsonl("gold_pairs.jsonl")


@pytest.fixture(scope="module")
def critiq_pairs() -> list[dict]:
    return _read_jsonl("critiq_pairs.jsonl")


def test_prompts_size_and_uniqueness(prompts):
    assert len(prompts) >= 190
    _assert_unique([p["id"] for p in prompts], "prompt ids")
    # Whitespace/case-insensitive, so near-copies do not pass as distinct prompts.
    _assert_unique([" ".join(p["prompt"].lower().split()) for p in prompts], "prompt texts")


def test_prompts_fields(prompts):
    for p in prompts:
        assert set(p) <= {"id", "prompt", "category", "system_prompt"}, p["id"]
        assert p["prompt"].strip(), p["id"]
        assert p["category"].strip(), p["id"]
        assert len(p["prompt"]) < MAX_PROMPT_CHARS, p["id"]
        if "system_prompt" in p:
            assert p["system_prompt"].strip(), p["id"]
            assert len(p["system_prompt"]) < MAX_PROMPT_CHARS, p["id"]
    with_system = sum("system_prompt" in p for p in prompts)
    assert 5 <= with_system <= 20


def test_prompts_categories_spread(prompts):
    counts = Counter(p["category"] for p in prompts)
    for category in PROMPT_CATEGORIES:
        assert counts[category] >= 20, counts


def test_prompts_vary_in_length(prompts):
    lengths = sorted(len(p["prompt"]) for p in prompts)
    assert lengths[0] < 40
    assert lengths[-1] > 250


def test_gold_pairs(gold_pairs):
    assert len(gold_pairs) >= 40
    _assert_unique([g["id"] for g in gold_pairs], "gold ids")
    for g in gold_pairs:
        for field in ("id", "prompt", "response_a", "response_b", "why"):
            assert isinstance(g[field], str) and g[field].strip(), (g.get("id"), field)
        assert g["winner"] in ("A", "B"), g["id"]
        assert g["response_a"] != g["response_b"], g["id"]
    _assert_balanced([g["winner"] for g in gold_pairs])


def test_critiq_pairs(critiq_pairs):
    assert len(critiq_pairs) >= 30
    _assert_unique([c["id"] for c in critiq_pairs], "critiq ids")
    for c in critiq_pairs:
        for field in ("id", "text_a", "text_b"):
            assert isinstance(c[field], str) and c[field].strip(), (c.get("id"), field)
        assert c["text_a"] != c["text_b"], c["id"]
        assert c["answer"] in ("A", "B"), c["id"]
    _assert_balanced([c["answer"] for c in critiq_pairs])


def test_critiq_criteria():
    criteria = yaml.safe_load(_read_text("critiq_criteria.yaml"))
    assert isinstance(criteria, list)
    names = [c["name"] for c in criteria]
    assert len(set(names)) == len(names) >= 10
    for c in criteria:
        assert set(c) == {"name", "description"}, c
        assert c["name"].isidentifier() and c["name"] == c["name"].lower(), c["name"]
        assert c["description"].strip(), c["name"]


def test_rubrics():
    rubrics = yaml.safe_load(_read_text("rubrics.yaml"))
    assert set(rubrics) == set(RUBRIC_ASPECTS)
    for aspect, rubric in rubrics.items():
        assert rubric["description"].strip(), aspect
        descriptions = [rubric[f"score_{s}"] for s in range(1, 6)]
        assert all(isinstance(d, str) and d.strip() for d in descriptions), aspect
        assert len(set(descriptions)) == 5, aspect
