"""Row builders shared by tests and benches: JUDGMENTS, RESPONSES and RATINGS frames shaped
like the tables (prefcurate/schemas/tables.py), so a test's hand-made case and a bench's
simulation feed the stage functions the same columns. Outside the package on purpose.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
from prefcurate.schemas.ids import content_id

#: the four demo responses of prompt p1: two right, one unsure, one wrong
TEXTS = {
    "A": "Paris is the capital of France; it lies on the Seine.",
    "B": "The capital of France is Paris, a city of two million people.",
    "C": "I think it might be Lyon, but I am not sure about that at all.",
    "D": "France has no capital city; it is governed from several towns.",
}


#: the JUDGMENTS columns a hand-made or simulated verdict holds the same value in
_FIXED = {"template": "pairwise", "template_hash": "t0", "mode": "probability"}
#: the JUDGMENTS data columns, in the table's order
JUDGMENT_COLUMNS = ("judgment_id", "prompt_id", "response_a", "response_b", "judge", "judge_model", "criterion",
                    *_FIXED, "p_first_ab", "p_first_ba", "p_a", "valid", "error")


def judgment(
    a, b, p_ab, p_ba=None, judge="j1", model="acme/judge-7b", prompt="p1", criterion="overall", valid=True
) -> dict:
    """One JUDGMENTS row; ``p_ba`` defaults to the consistent mirror 1 - p_ab."""
    if a > b:  # store canonically: the orders swap roles
        a, b = b, a
        p_ab, p_ba = (p_ba if p_ba is not None else 1.0 - p_ab), p_ab
    p_ba = 1.0 - p_ab if p_ba is None else p_ba
    row = dict(judgment_id=content_id(prompt, a, b, judge, criterion, p_ab, p_ba), prompt_id=prompt,
               response_a=a, response_b=b, judge=judge, judge_model=model, criterion=criterion, p_first_ab=p_ab,
               p_first_ba=p_ba, p_a=(p_ab + 1.0 - p_ba) / 2.0, valid=valid, error=None, **_FIXED)
    return {name: row[name] for name in JUDGMENT_COLUMNS}


def judgments(*rows: dict) -> pl.DataFrame:
    return pl.DataFrame(list(rows), schema_overrides={"error": pl.String})


def judgments_from_arrays(
    prompt_ids: Sequence[str] | np.ndarray, response_a: Sequence[str] | np.ndarray,
    response_b: Sequence[str] | np.ndarray, p_ab: np.ndarray, p_ba: np.ndarray, judge: str,
    judge_model: str | None = None, valid: bool | np.ndarray = True, criterion: str = "overall",
) -> pl.DataFrame:
    """A judge's JUDGMENTS frame from columns (a bench's simulated verdicts), built at once."""
    columns = dict(judgment_id=[f"{judge}-{k}" for k in range(len(p_ab))], prompt_id=prompt_ids,
                   response_a=response_a, response_b=response_b, judge=judge, judge_model=judge_model or judge,
                   criterion=criterion, p_first_ab=p_ab, p_first_ba=p_ba, p_a=(p_ab + 1.0 - p_ba) / 2.0,
                   valid=valid, error=None, **_FIXED)
    return pl.DataFrame({name: columns[name] for name in JUDGMENT_COLUMNS}, schema_overrides={"error": pl.String})


def responses(
    ids=("A", "B", "C", "D"), prompt="p1", texts=None, truncated=(), generator="gen", model="acme/writer-1b"
) -> pl.DataFrame:
    texts = texts or {}
    models = model if isinstance(model, dict) else {}
    generators = generator if isinstance(generator, dict) else {}
    return pl.DataFrame(
        {
            "response_id": list(ids),
            "prompt_id": [prompt] * len(ids),
            "generator": [generators.get(i, "gen" if generators else generator) for i in ids],
            "model": [models.get(i, "acme/writer-1b" if models else model) for i in ids],
            "text": [
                texts.get(i, TEXTS.get(i, f"response {i} says something different {i * 7}")) for i in ids
            ],
            "truncated": [i in truncated for i in ids],
        }
    )


RATINGS_SCHEMA = {
    "rating_id": pl.String,
    "prompt_id": pl.String,
    "response_id": pl.String,
    "judge": pl.String,
    "judge_model": pl.String,
    "aspect": pl.String,
    "template_hash": pl.String,
    "probs": pl.List(pl.Float64),
    "expected_score": pl.Float64,
    "valid": pl.Boolean,
    "error": pl.String,
}


def ratings(scores: dict[str, float], prompt="p1", judge="j1") -> pl.DataFrame:
    rows = [
        {
            "rating_id": content_id(rid, judge),
            "prompt_id": prompt,
            "response_id": rid,
            "judge": judge,
            "judge_model": "acme/judge-7b",
            "aspect": "helpfulness",
            "template_hash": "r0",
            "probs": [0.2] * 5,
            "expected_score": float(score),
            "valid": True,
            "error": None,
        }
        for rid, score in scores.items()
    ]
    return pl.DataFrame(rows, schema=RATINGS_SCHEMA)


def prompts(ids: Sequence[str], texts: Sequence[str] | None = None) -> pl.DataFrame:
    """PROMPTS rows for ``ids`` (texts default to ``text <id>``), records numbered from 1."""
    texts = list(texts) if texts is not None else [f"text {i}" for i in ids]
    return pl.DataFrame({
        "prompt_id": list(ids), "prompt": texts, "source_file": ["f"] * len(ids),
        "source_record": list(range(1, len(ids) + 1)), "char_len": [len(t) for t in texts],
    })
