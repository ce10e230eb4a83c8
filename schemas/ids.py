"""Content-addressed ids: the same defining inputs always give the same id."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

ID_HEX_CHARS = 24  # 96 bits: collision-free far past the scales we target


def content_id(*parts: Any) -> str:
    """Hash of the canonical JSON of ``parts`` (dicts key-sorted), as hex."""
    canonical = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:ID_HEX_CHARS]


def ordered_pair(first: str, second: str) -> tuple[str, str]:
    """The canonical (response_a, response_b) order of a pair: by id."""
    return (first, second) if first < second else (second, first)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in blocks (inputs and model files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
