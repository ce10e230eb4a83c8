"""``content_ids`` (schemas/ids.py) gives, for every row at once, exactly the id
``content_id`` gives row by row: the ids of existing datasets must not change."""

from __future__ import annotations

import random

import polars as pl
import pytest
from prefcurate.schemas.ids import Column, content_id, content_ids

# every character JSON escapes, and some it must leave as they are (ensure_ascii=False)
_CHARACTERS = ['a', 'Z', '"', '\\', '/', '\n', '\t', '\x00', '\x1f', '\x7f', 'é', '☃', '\u2028', '𝄞', ' ']
_DEFINITIONS = {"wit": {"score_1": "no", "weights": [1, 2.5]}, "tone": "plain \"quoted\""}


def _rows(n: int = 1500) -> pl.DataFrame:
    rng = random.Random(7)

    def text() -> str:
        return "".join(rng.choice(_CHARACTERS) for _ in range(rng.randrange(8)))

    return pl.DataFrame({
        "hex": [f"{rng.getrandbits(96):024x}" for _ in range(n)],
        "text": [text() for _ in range(n)],
        "maybe": [None if rng.random() < 0.3 else text() for _ in range(n)],
        "int": pl.Series([rng.randrange(-5, 10**12) for _ in range(n)], dtype=pl.Int64),
        "small": pl.Series([rng.randrange(4) for _ in range(n)], dtype=pl.Int32),
        "float": [rng.random() * 10 for _ in range(n)],
        "flag": [rng.random() < 0.5 for _ in range(n)],
        "aspect": [rng.choice(list(_DEFINITIONS)) for _ in range(n)],
    })


@pytest.mark.parametrize("parts, per_row", [
    (("judgment", Column("hex"), Column("hex"), "j", {"z": 1, "a": [1, "é"]}, Column("text")),
     lambda r: ("judgment", r["hex"], r["hex"], "j", {"z": 1, "a": [1, "é"]}, r["text"])),
    ((Column("hex"),), lambda r: (r["hex"],)),
    ((Column("int"), Column("small"), Column("float"), Column("flag")),
     lambda r: (r["int"], r["small"], r["float"], r["flag"])),
    (("x", Column("maybe"), None, 3), lambda r: ("x", r["maybe"], None, 3)),
    (("rating", Column("aspect", lambda a: (a, _DEFINITIONS[a])), "end"),
     lambda r: ("rating", r["aspect"], _DEFINITIONS[r["aspect"]], "end")),
], ids=["text-and-constants", "one-column", "numbers", "nulls", "a-value-standing-for-two-parts"])
def test_each_rows_id_is_the_content_id_of_its_parts(parts, per_row):
    rows = _rows()
    assert content_ids(rows, *parts).to_list() == [content_id(*per_row(r)) for r in rows.iter_rows(named=True)]


def test_no_rows_give_no_ids_and_the_format_is_unchanged():
    assert content_ids(_rows().head(0), "a", Column("hex")).to_list() == []
    # the id of a response as every version so far has written it
    assert content_id("response", "p1", {"name": "g"}, 0) == "d5a1615e8ded548b383a8e96"
    assert content_ids(pl.DataFrame({"p": ["p1"], "i": [0]}), "response", Column("p"), {"name": "g"},
                       Column("i")).item() == "d5a1615e8ded548b383a8e96"
