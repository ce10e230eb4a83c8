"""A JSONL file mixing every kind of bad row, with its expected accounting."""

from pathlib import Path

LINES = [
    b'{"id": "a1", "prompt": "What is   the capital of France?"}',
    b'{"id": "a2", "prompt": "  What is the capital of France? "}',  # exact duplicate after normalisation
    b'{"id": "a3", "prompt": "Explain recursion.", "topic": "cs"}',
    b'{"id": "a4", "prompt": "broken json',  # malformed JSON
    b'{"id": "a5"}',  # missing prompt
    b'{"id": "a6", "prompt": "   "}',  # empty prompt
    b'{"id": "a7", "prompt": "bad \xff\xfe bytes"}',  # invalid UTF-8
    b'{"id": "a8", "prompt": "' + b"x" * 300 + b'"}',  # over-length (max_chars=200)
    b'{"id": "a1", "prompt": "A different text reusing id a1"}',  # duplicate id, different text
    b'["not", "an", "object"]',  # not an object
    b'{"id": "a9", "prompt": 42}',  # wrong type
    b"",  # blank line: not a record
    b'{"id": "a10", "prompt": "Cafe\xcc\x81 au lait?"}',  # NFD input, NFC after normalisation
]

EXPECTED_REASONS = {
    4: "malformed_json",
    5: "missing_prompt",
    6: "empty_prompt",
    7: "invalid_utf8",
    8: "prompt_too_long",
    9: "duplicate_id_conflict",
    10: "not_an_object",
    11: "wrong_type",
}


def write_bad_file(directory: Path) -> Path:
    path = directory / "mixed.jsonl"
    path.write_bytes(b"\n".join(LINES) + b"\n")
    return path
