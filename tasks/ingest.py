"""Ingest: prompts from JSONL (or one JSON array), Parquet or CSV -> validated, normalised, de-duplicated rows.

Accounting holds for every file: ``rows_read = accepted + quarantined + duplicates``,
where duplicates are exact duplicates of the normalised (system prompt, prompt), within
the file or against prompts already in the dataset. Nothing is dropped silently: every
rejected row lands in the quarantine frame with the reason, the field and the raw text.

Normalisation: Unicode NFC; line breaks (CRLF, CR) as "\\n" and kept, blank lines included,
since prompts with code, lists or paragraphs need them; any other whitespace run becomes one
space; a space at either end of a line and whitespace at either end of the text go. Nothing
else changes: the text is otherwise byte for byte what the file holds. The prompt id hashes
the normalised (system prompt, prompt), so equal prompts get equal ids in any file.

Reading is vectorised: a JSONL file's lines are found with numpy and parsed together by
polars' reader; only lines that are not one object each, or that the reader refuses, go
through the per-record path, so a bad line costs its own parse, not the file's. A file holding
one JSON array is rewritten as JSONL first (one element per line, by orjson).
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import itertools
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import orjson
import polars as pl
import pyarrow as pa
from prefcurate.schemas.ids import hex_ids
from pydantic import BaseModel, ConfigDict, Field, model_validator

from prefcurate.errors import InputError
from prefcurate.scratch_db import scratch_cursor

BUNDLED = "bundled"
_TYPE_PREFIX = "_type:"  # internal column per text field: the JSON type of a non-text value, else null
_BOM = b"\xef\xbb\xbf"
_GZIP_MAGIC = b"\x1f\x8b"

# quarantine reason codes
MALFORMED_JSON = "malformed_json"
INVALID_UTF8 = "invalid_utf8"
NOT_AN_OBJECT = "not_an_object"
NESTED_TOO_DEEP = "nested_too_deep"
RAGGED_ROW = "ragged_row"
MISSING_PROMPT = "missing_prompt"
EMPTY_PROMPT = "empty_prompt"
WRONG_TYPE = "wrong_type"
PROMPT_TOO_LONG = "prompt_too_long"
PROMPT_TOO_SHORT = "prompt_too_short"
DUPLICATE_ID_CONFLICT = "duplicate_id_conflict"
CONTROL_CHARACTER = "control_character"
WRONG_TYPE_SYSTEM = "_wrong_type_system"  # internal: reported as WRONG_TYPE on the system-prompt field
CONTROL_CHARACTER_SYSTEM = "_control_character_system"  # internal: CONTROL_CHARACTER on the system prompt
_ON_SYSTEM_PROMPT = {WRONG_TYPE_SYSTEM: WRONG_TYPE, CONTROL_CHARACTER_SYSTEM: CONTROL_CHARACTER}

#: the C0 and C1 control characters that normalisation leaves (it makes tabs, form feeds and
#: line breaks whitespace): a NUL, an escape sequence or mojibake means corrupt text, and a
#: prompt's id joins its system prompt and text with U+001F, which must not occur in either or
#: two different prompts could share one id
CONTROL_CHARACTERS = r"[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f]"


class IngestError(InputError):
    """The whole input is unusable (missing file, unknown format, no prompt field...)."""


class FieldMapping(BaseModel):
    """Which input fields hold what. ``metadata: null`` keeps every other field."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = "prompt"
    system_prompt: str | None = "system_prompt"
    id: str | None = "id"
    category: str | None = "category"
    metadata: list[str] | None = None


class IngestParams(BaseModel):
    """Where prompts come from and which ones are accepted."""

    model_config = ConfigDict(extra="forbid")
    path: str | list[str] = Field(BUNDLED, min_length=1, description="file to read, a folder of them or "
                                  "a glob pattern (each file once), a list of those, or 'bundled' for the "
                                  "demo prompt set")
    #: jsonl (and json) read one object per line or a file holding one JSON array of objects
    format: Literal["auto", "jsonl", "json", "parquet", "csv"] = "auto"
    fields: FieldMapping = Field(default_factory=FieldMapping)
    csv_separator: Literal[",", ";", "\t", "|"] | None = Field(
        None, description="a CSV file's field separator; default: tab for .tsv, else whichever of "
                          "these the header line holds most often (a comma when it holds none)")
    min_chars: int = Field(1, ge=1, description="shorter prompts are quarantined")
    max_chars: int = Field(8000, ge=1, description="longer prompts are quarantined")
    limit: int | None = Field(None, ge=1, description="ingest at most this many accepted prompts (of one file)")
    shard_rows: int = Field(50_000, ge=1, description="prompts per shard (the unit of work downstream)")

    @model_validator(mode="after")
    def _sizes_in_order(self) -> IngestParams:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) is greater than max_chars ({self.max_chars})")
        return self


@dataclass
class IngestResult:
    accepted: pl.DataFrame  # PROMPTS columns (without provenance)
    quarantine: pl.DataFrame  # QUARANTINE columns (without provenance)
    rows_read: int
    duplicates: int
    source_file: str
    counts: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.counts = {
            "rows_read": self.rows_read,
            "accepted": self.accepted.height,
            "quarantined": self.quarantine.height,
            "duplicates": self.duplicates,
        }


def bundled_prompts_path() -> Path:
    return Path(str(resources.files("prefcurate.data") / "prompts.jsonl"))


#: the format a file's suffix (after ``.gz``) says it holds
_FORMAT_OF_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet",
                     ".csv": "csv", ".tsv": "csv"}
#: the suffixes :func:`suffix_format` knows, for messages
RECORD_SUFFIXES = ", ".join(_FORMAT_OF_SUFFIX) + " (.gz too)"
_GLOB_CHARACTERS = "*?["


def _suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]).lower().removesuffix(".gz")


def suffix_format(path: Path) -> str | None:
    """The format ``path``'s suffix says (``.gz`` looked through), or None. Every reader of
    user files (ingest, import, gold pairs, review labels) asks this one table."""
    suffix = _suffix(path)
    return next((fmt for ending, fmt in _FORMAT_OF_SUFFIX.items() if suffix.endswith(ending)), None)


def record_format(path: Path) -> str | None:
    """The ``fmt`` :func:`read_records` reads ``path`` with, by its suffix: as
    :func:`suffix_format`, but "json" for ``.json`` (an array's values read as text)."""
    return "json" if _suffix(path).endswith(".json") else suffix_format(path)


def _hidden(path: Path, under: Path) -> bool:
    """A dot file or one in a dot folder below ``under`` (left out, as a shell's ``*`` does)."""
    return any(part.startswith(".") for part in path.relative_to(under).parts)


def _under(path: Path, folder: Path | None) -> bool:
    return folder is not None and path.resolve().is_relative_to(folder)


def input_files(params: IngestParams, leave_out: Path | None = None) -> list[Path]:
    """The files ``ingest.path`` names, in order: the file itself, the data files of a folder
    (at any depth; hidden ones and others, a README, left out), a glob pattern's matches, or
    those of each path of a list. A folder's or pattern's files under ``leave_out`` (the
    dataset's own directory, when it lies inside the folder) are left out."""
    if isinstance(params.path, list):
        named = (input_files(params.model_copy(update={"path": path}), leave_out) for path in params.path)
        return list(dict.fromkeys(file for files in named for file in files))  # each once, in order
    if params.path == BUNDLED:
        return [bundled_prompts_path()]
    given = Path(params.path).expanduser()
    if not given.exists() and any(c in params.path for c in _GLOB_CHARACTERS):
        parts = given.parts
        fixed = next(i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARACTERS))
        anchor = Path(*parts[:fixed] or ".")
        files = sorted(p for p in anchor.glob("/".join(parts[fixed:]))
                       if p.is_file() and not _hidden(p, anchor) and not _under(p, leave_out))
        if not files:
            raise IngestError(f"no file matches {params.path}")
        return files
    if given.is_dir():
        files = sorted(
            p for p in given.rglob("*")
            if p.is_file() and suffix_format(p) is not None and not _hidden(p, given)
            and not _under(p, leave_out)
        )
        if not files:
            inside = f" outside the dataset {leave_out}" if leave_out and _under(leave_out, given.resolve()) else ""
            raise IngestError(f"the folder {given} holds no .jsonl, .json, .parquet or .csv file{inside}")
        return files
    return [given]


def resolve_source(params: IngestParams) -> tuple[Path, str]:
    path = bundled_prompts_path() if params.path == BUNDLED else Path(params.path).expanduser()
    if not path.exists():
        raise IngestError(f"input file {path} does not exist")
    if path.is_dir():
        raise IngestError(f"input {path} is a directory; give a .jsonl, .json, .parquet or .csv file")
    fmt = params.format
    if fmt == "auto":
        fmt = suffix_format(path)
        if fmt is None:
            raise IngestError(
                f"cannot tell the format of {path.name} from its suffix; set ingest.format "
                "to jsonl (also a JSON array), parquet or csv"
            )
    return path, fmt


#: given the file's candidate rows (``prompt_id``, ``source_id``), the dataset's prompts that
#: share either id with one of them
ExistingLookup = Callable[[pl.DataFrame], pl.DataFrame]


def ingest_file(params: IngestParams, existing: pl.DataFrame | ExistingLookup | None = None) -> IngestResult:
    """Read, validate, normalise and de-duplicate one input file.

    ``existing`` gives ``prompt_id`` and ``source_id`` of prompts already in the dataset, so a
    re-ingest adds nothing and an id reused for a different text is caught across files:
    either those rows, or a lookup asked for just the rows sharing an id with this file's
    (what a dataset passes, so a file's cost does not grow with the dataset).
    """
    path, fmt = resolve_source(params)
    source = str(path)
    text_fields = [f for f in (params.fields.prompt, params.fields.system_prompt) if f is not None]
    records, unreadable, rows_read = _read(path, fmt, source, text_fields, params.csv_separator)
    accepted, rejected = _validate(records, params, source)
    if callable(existing):
        existing = existing(accepted.select("prompt_id", "source_id"))
    accepted, duplicates, conflicts = _deduplicate(accepted, existing, records)
    quarantine = pl.concat([unreadable, rejected, conflicts], how="vertical_relaxed")
    if params.limit is not None and accepted.height > params.limit:
        # prompts past the limit are neither accepted nor lost: they are simply not read yet
        rows_read -= accepted.height - params.limit
        accepted = accepted.head(params.limit)
    return IngestResult(
        accepted=accepted.sort("source_record"),
        quarantine=quarantine.sort("source_record"),
        rows_read=rows_read,
        duplicates=duplicates,
        source_file=source,
    )


# ---- reading -------------------------------------------------------------------------


def _quarantine_frame(rows: list[dict]) -> pl.DataFrame:
    schema = {
        "source_file": pl.String, "source_record": pl.Int64, "field": pl.String,
        "reason": pl.String, "message": pl.String, "raw": pl.String,
    }
    return pl.DataFrame(rows, schema=schema)


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it is gzip (by its magic number, whatever its name)."""
    data = path.read_bytes()
    if data.startswith(_GZIP_MAGIC):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise IngestError(f"{path} looks like gzip but cannot be decompressed: {error}") from error
    return data


def _with_record_numbers(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_row_index("source_record", offset=1).with_columns(pl.col("source_record").cast(pl.Int64))


def read_records(path: Path, fmt: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Every readable record of a file of any ingest format, with a 1-based ``source_record``,
    and the unreadable ones as quarantine rows (the reader's reason: malformed JSON, invalid
    UTF-8, a ragged CSV row...). For files other than prompts: labelled pairs, judgments.

    ``fmt`` "json" reads a JSON array with every value as text (numbers keep their JSON
    spelling), so mixed types never fail; "jsonl", "csv" and "parquet" are read as ingest
    reads them (a ``.json`` file of one object per line is read as JSONL)."""
    source = str(path)
    if fmt == "json":
        data = _read_bytes(path).removeprefix(_BOM)
        if not data.lstrip().startswith(b"["):
            fmt = "jsonl"
        else:
            try:
                items = json.loads(data)
            except (ValueError, RecursionError) as error:
                raise IngestError(f"cannot read {path} as a JSON array: {error}") from error
            bad = [{"source_file": source, "source_record": n, "field": None, "reason": NOT_AN_OBJECT,
                    "message": f"record {n}: expected a JSON object, got {type(item).__name__}",
                    "raw": json.dumps(item, ensure_ascii=False)[:10_000]}
                   for n, item in enumerate(items, start=1) if not isinstance(item, dict)]
            rows = [{**{k: v if isinstance(v, str) or v is None else json.dumps(v, ensure_ascii=False)
                        for k, v in item.items()}, "source_record": n}
                    for n, item in enumerate(items, start=1) if isinstance(item, dict)]
            frame = (pl.DataFrame(rows, infer_schema_length=None) if rows
                     else pl.DataFrame({"source_record": pl.Series([], dtype=pl.Int64)}))
            return frame.with_columns(pl.col("source_record").cast(pl.Int64)), _quarantine_frame(bad)
    records, unreadable, _ = _read(path, fmt, source, [])
    return records, unreadable


def as_text_columns(frame: pl.DataFrame, keep: Sequence[str] = ("source_record",)) -> pl.DataFrame:
    """Every column but ``keep`` as text: scalars as they print, nested values as their JSON."""
    nested = (pl.List, pl.Array, pl.Struct)
    return frame.with_columns(
        (_json_text(name) if isinstance(dtype, nested) else pl.col(name).cast(pl.String))
        for name, dtype in frame.schema.items() if name not in keep
    )


def _read(path: Path, fmt: str, source: str, text_fields: list[str],
          separator: str | None = None) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """All records with a 1-based ``source_record`` column, plus the unreadable ones."""
    if fmt in ("jsonl", "json"):
        return _read_jsonl(path, source, text_fields)
    if fmt == "csv":
        return _read_csv(path, source, separator)
    try:
        frame = pl.read_parquet(path)
    except Exception as error:  # polars raises several types for unreadable files
        raise IngestError(f"cannot read {path} as parquet: {error}") from error
    return _with_record_numbers(frame), _quarantine_frame([]), frame.height


def _read_csv(path: Path, source: str, separator: str | None = None) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    data = _read_bytes(path)
    if not data.strip():
        return pl.DataFrame({"source_record": pl.Series([], dtype=pl.Int64)}), _quarantine_frame([]), 0
    if separator is None:
        tsv = _suffix(path).endswith(".tsv")
        separator = "\t" if tsv else _header_separator(data)
    try:
        frame = pl.read_csv(io.BytesIO(data), infer_schema=False, separator=separator, encoding="utf8-lossy")
        ragged = _quarantine_frame([])
    except Exception:  # a ragged row (or another per-row fault): find it row by row
        frame, ragged = _read_csv_rows(data, separator, source)
    frame = _with_record_numbers(frame) if "source_record" not in frame.columns else frame
    # the CSV reader replaced invalid bytes; find those rows and quarantine them
    frame, invalid = _split_lossy_csv_rows(data, frame, source)
    return frame, pl.concat([ragged, invalid]), frame.height + invalid.height + ragged.height


_SEPARATORS = ",;\t|"


def _header_separator(data: bytes) -> str:
    """The separator of :data:`_SEPARATORS` the header line holds most often outside quotes
    (spreadsheets in many locales write ``;``), a comma when it holds none."""
    header = data.removeprefix(_BOM).split(b"\n", 1)[0].decode("utf-8", errors="replace")
    unquoted = "".join(header.split('"')[::2])  # the text outside "..." (a doubled "" quotes nothing)
    counts = [(unquoted.count(candidate), -rank, candidate) for rank, candidate in enumerate(_SEPARATORS)]
    count, _, separator = max(counts)
    return separator if count else ","


def _read_csv_rows(data: bytes, separator: str, source: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The slow path for a CSV the vectorised reader refused: rows whose field count differs
    from the header's are quarantined, the rest kept (record numbers count data rows)."""
    text = data.removeprefix(_BOM).decode("utf-8", errors="replace")
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=separator))
    except csv.Error as error:
        raise IngestError(f"cannot read {source} as csv: {error}") from error
    if not rows:
        return pl.DataFrame({"source_record": pl.Series([], dtype=pl.Int64)}), _quarantine_frame([])
    header, body = rows[0], rows[1:]
    good, bad = [], []
    for number, row in enumerate(body, start=1):
        if len(row) == len(header):
            good.append([number, *row])
        else:
            bad.append({"source_file": source, "source_record": number, "field": None, "reason": RAGGED_ROW,
                        "message": f"record {number}: {len(row)} fields, the header has {len(header)}",
                        "raw": separator.join(row)})
    columns = ["source_record", *header]
    frame = pl.DataFrame(good, schema=columns, orient="row") if good else pl.DataFrame(schema=columns)
    frame = frame.with_columns(pl.col("source_record").cast(pl.Int64), pl.exclude("source_record").cast(pl.String))
    return frame, _quarantine_frame(bad)


def _split_lossy_csv_rows(data: bytes, frame: pl.DataFrame, source: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    replacement = "\ufffd"
    if replacement not in data.decode("utf-8", errors="replace"):
        return frame, _quarantine_frame([])
    text_cols = [c for c, t in frame.schema.items() if t == pl.String]
    bad = pl.any_horizontal([pl.col(c).str.contains(replacement, literal=True).fill_null(False) for c in text_cols])
    invalid = frame.filter(bad)
    rows = [
        {"source_file": source, "source_record": r["source_record"], "field": None,
         "reason": INVALID_UTF8, "message": f"record {r['source_record']}: invalid UTF-8 bytes",
         "raw": json.dumps({k: v for k, v in r.items() if k != "source_record"}, ensure_ascii=False)}
        for r in invalid.to_dicts()
    ]
    return frame.filter(~bad), _quarantine_frame(rows)


def _read_jsonl(path: Path, source: str, text_fields: list[str]) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """Lines that look like one JSON object each are parsed together by polars' reader; only
    the others (and any the reader refuses) go through the per-record path, which names
    the record and why it is unreadable. Record numbers are line numbers (blank lines count)."""
    data = _json_array_as_lines(_read_bytes(path).removeprefix(_BOM), source)
    lines = _JsonLines(data)
    frame, refused = _parse_object_lines(lines, lines.object_like())
    frame = _with_text_types(frame, lines, text_fields)
    others = np.union1d(lines.other(), refused)
    slow, bad, slow_read = _read_jsonl_lines(lines.numbered(others), source, text_fields)
    rows_read = frame.height + slow_read
    if slow.height and frame.height:
        frame = pl.concat([_as_text_like(frame, slow), slow], how="diagonal_relaxed").sort("source_record")
    elif slow.height:
        frame = slow
    return frame, bad, rows_read


def _json_array_as_lines(data: bytes, source: str) -> bytes:
    """A file holding one JSON array (Alpaca-style ``[{...}, ...]``, pretty-printed or not) as
    JSONL: one element per line, so a record number is the element's place in the array and
    every element takes the JSONL path's checks. Other data comes back as it is."""
    if data.lstrip()[:1] != b"[":
        return data
    try:
        items = orjson.loads(data)
    except orjson.JSONDecodeError:
        if _parses(data.lstrip().split(b"\n", 1)[0]):
            return data  # JSONL whose first record is an array: that record is quarantined
        items = _json_array_strictly(data, source)  # what orjson refuses: NaN, integers past 64 bits
        return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items).encode()
    return b"".join(orjson.dumps(item) + b"\n" for item in items)


def _parses(data: bytes) -> bool:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return True


def _json_array_strictly(data: bytes, source: str) -> list:
    hint = "give one JSON array of objects, or JSONL (one JSON object per line)"
    try:
        items = json.loads(data)
    except UnicodeDecodeError as error:
        raise IngestError(f"{source} is a JSON array with invalid UTF-8 at byte {error.start}; {hint}") from None
    except json.JSONDecodeError as error:
        raise IngestError(f"{source} starts like a JSON array but is not one ({error}); {hint}") from None
    except RecursionError:
        raise IngestError(f"{source} is a JSON array nested too deeply to parse; {hint}") from None
    return items


class _JsonLines:
    """A JSONL file's lines as offsets into its bytes, classified without a loop over lines."""

    def __init__(self, data: bytes):
        self.data = data
        buffer = np.frombuffer(data, np.uint8)
        offsets = np.concatenate([np.zeros(1, np.int64), _newlines(buffer) + 1])
        if offsets[-1] != len(data):  # a last line without its newline
            offsets = np.append(offsets, len(data))
        self.offsets = offsets
        starts, stops = offsets[:-1], offsets[1:]
        if not len(starts):
            self.first = self.last = self.length = np.zeros(0, np.int64)
            return
        # the content of each line: without its "\n" and a "\r" before it
        stops = stops - (buffer[stops - 1] == ord("\n"))
        stops = stops - ((stops > starts) & (buffer[np.maximum(stops - 1, 0)] == ord("\r")))
        self.length = stops - starts
        self.first = np.where(self.length > 0, buffer[np.minimum(starts, len(data) - 1)], 0)
        self.last = np.where(self.length > 0, buffer[np.maximum(stops - 1, 0)], 0)

    def object_like(self) -> np.ndarray:
        """Indices of lines written as one object: ``{`` first and ``}`` last."""
        return ((self.first == ord("{")) & (self.last == ord("}"))).nonzero()[0]

    def other(self) -> np.ndarray:
        """Indices of the lines that are neither empty nor object-like (the per-record path
        reads them: whitespace, arrays, malformed text)."""
        return ((self.length > 0) & ~((self.first == ord("{")) & (self.last == ord("}")))).nonzero()[0]

    def arrow(self, indices: np.ndarray | None = None) -> pa.LargeBinaryArray:
        """The lines (each with its newline) as an Arrow array over the file's bytes, no copy."""
        whole = pa.LargeBinaryArray.from_buffers(
            pa.large_binary(), len(self.offsets) - 1, [None, pa.py_buffer(self.offsets), pa.py_buffer(self.data)]
        )
        if indices is None or len(indices) == len(whole):  # (indices are ascending and distinct)
            return whole
        return whole.take(pa.array(indices, pa.int64()))

    def joined(self, indices: np.ndarray) -> bytes | memoryview:
        if len(indices) == len(self.offsets) - 1:
            return self.data
        picked = self.arrow(indices)
        _, offsets, values = picked.buffers()
        bounds = np.frombuffer(offsets, np.int64)[[picked.offset, picked.offset + len(picked)]]
        return memoryview(values)[bounds[0]:bounds[1]]

    def numbered(self, indices: np.ndarray) -> list[tuple[int, bytes]]:
        """(line number, bytes) of a few lines, for the per-record path."""
        return [(int(i) + 1, self.data[self.offsets[i]:self.offsets[i + 1]].removesuffix(b"\n"))
                for i in indices]


def _newlines(buffer: np.ndarray, step: int = 1 << 22) -> np.ndarray:
    """Offsets of the "\\n" bytes, found a few MB at a time on every core (numpy lets go of
    the GIL), each piece's mask the piece's size, not the file's."""
    def found(start: int) -> np.ndarray:
        return np.flatnonzero(buffer[start:start + step] == ord("\n")).astype(np.int64) + start

    return np.concatenate([np.zeros(0, np.int64), *_ingest_threads().map(found, range(0, len(buffer), step))])


def _parse_object_lines(lines: _JsonLines, indices: np.ndarray) -> tuple[pl.DataFrame, np.ndarray]:
    """The lines parsed by polars with a ``source_record`` column, and the lines it refused.

    One call for a clean file. When it fails, one more with the types inferred from every line
    (a field whose type widens after the first lines); then DuckDB marks the lines that are
    not valid UTF-8 JSON objects (they are refused), and the rest is parsed in halves until
    each failure is one line: one bad line in a million costs a few more parses, not a
    line-by-line read.
    """
    empty = pl.DataFrame({"source_record": pl.Series([], dtype=pl.Int64)})
    if not len(indices):
        return empty, indices
    for every_line in (False, True):
        frame = _read_ndjson(lines.joined(indices), every_line)
        if frame is not None and frame.height == len(indices):
            return _numbered(frame, indices, lines, every_line), np.zeros(0, np.int64)
    valid = _valid_objects(lines.arrow(indices))
    refused = [indices[~valid]]
    parts: list[pl.DataFrame] = []
    pending = [indices[valid]]
    while pending:
        chunk = pending.pop()
        if not len(chunk):
            continue
        frame = _read_ndjson(lines.joined(chunk), every_line=True)
        if frame is not None and frame.height == len(chunk):
            parts.append(_numbered(frame, chunk, lines, inferred_from_every_line=True))
        elif len(chunk) == 1:
            refused.append(chunk)
        else:
            pending += [chunk[len(chunk) // 2:], chunk[: len(chunk) // 2]]
    frame = pl.concat(parts, how="diagonal_relaxed").sort("source_record") if parts else empty
    return frame, np.sort(np.concatenate(refused))


def _read_ndjson(data, every_line: bool = False) -> pl.DataFrame | None:
    try:
        return pl.read_ndjson(io.BytesIO(data), infer_schema_length=None if every_line else 100)
    except Exception:  # malformed or non-UTF-8 lines, nesting past the reader's limit, type clashes
        return None


def _numbered(
    frame: pl.DataFrame, indices: np.ndarray, lines: _JsonLines, inferred_from_every_line: bool
) -> pl.DataFrame:
    """``source_record`` (the line number) added; every key of every line kept as a column.

    The reader infers columns from its first 100 lines; DuckDB lists the keys of all of them,
    and a key found later (metadata the first lines lack) means one more, fully inferred, parse.
    """
    if frame.height > 100 and not inferred_from_every_line:
        keys = _all_keys(lines.arrow(indices))
        if keys is None or not keys <= set(frame.columns):
            again = _read_ndjson(lines.joined(indices), every_line=True)
            # (polars read these lines with the first lines' types, so it reads them again)
            frame = again if again is not None and again.height == frame.height else frame
    return frame.with_columns(pl.Series("source_record", indices + 1, dtype=pl.Int64))


def _duckdb_lines(lines: pa.LargeBinaryArray, sql: str, parsed: bool = False):
    """``sql`` over the table ``lines(line)``: the lines as text, null where one is not UTF-8.

    ``parsed``: polars has read these lines, so they are valid UTF-8 (its reader refuses a
    stream that is not) and DuckDB reads them as text over the same buffers, not decoded again.
    """
    with scratch_cursor() as con:
        if parsed:
            text = pa.LargeStringArray.from_buffers(len(lines), lines.buffers()[1], lines.buffers()[2],
                                                    offset=lines.offset)
            con.register("lines", pa.table({"line": text}))
            return con.sql(sql).fetchnumpy()
        con.register("raw_lines", pa.table({"line": lines}))
        return con.sql(f"WITH lines AS (SELECT try(decode(line)) AS line FROM raw_lines) {sql}").fetchnumpy()


def _valid_objects(lines: pa.LargeBinaryArray) -> np.ndarray:
    result = _duckdb_lines(
        lines, "SELECT CASE WHEN json_valid(line) THEN json_type(line) = 'OBJECT' ELSE false END AS ok FROM lines"
    )
    return np.asarray(result["ok"], dtype=bool)


def _all_keys(lines: pa.LargeBinaryArray) -> set[str] | None:
    """The keys of lines polars has parsed."""
    try:
        return set(_duckdb_lines(lines, "SELECT DISTINCT unnest(json_keys(line)) AS k FROM lines", parsed=True)["k"]
                   .tolist())
    except Exception:
        return None


# what polars writes for a number, boolean, list or object read into a text column
_MAYBE_NOT_TEXT = r"^(?:[-0-9\[{]|true$|false$)"
_DUCKDB_TYPES = {"BIGINT": "number", "UBIGINT": "number", "HUGEINT": "number", "DOUBLE": "number",
                 "BOOLEAN": "boolean", "ARRAY": "array", "OBJECT": "object"}


def _with_text_types(frame: pl.DataFrame, lines: _JsonLines, text_fields: list[str]) -> pl.DataFrame:
    """A ``_type:<field>`` column per text field: the JSON type of a value that is not text.

    Polars reads a number, boolean, list or object in a text column as its JSON text, so only
    rows whose text could be one of those are asked again, of DuckDB, what their line holds.
    """
    for name in text_fields:
        if name not in frame.columns:
            continue
        column = frame[name]
        if column.dtype in (pl.String, pl.Null):
            # (a column of nulls made by polars: a Python list of a million Nones took ~0.1 s)
            kinds = pl.repeat(None, frame.height, dtype=pl.String, eager=True).alias(_TYPE_PREFIX + name)
            maybe = column.str.contains(_MAYBE_NOT_TEXT).fill_null(False) if column.dtype == pl.String else None
            if maybe is not None and maybe.any():
                rows = maybe.arg_true()
                path = "$." + json.dumps(name)
                found = _duckdb_lines(lines.arrow(frame["source_record"].gather(rows).to_numpy() - 1),
                                      f"SELECT json_type(line, {_sql_text(path)}) AS t FROM lines")["t"]
                kinds = kinds.scatter(rows, pl.Series([_DUCKDB_TYPES.get(t) for t in found.tolist()],
                                                      dtype=pl.String))
            frame = frame.with_columns(kinds)
        else:  # the whole column holds another type: every non-null value is not text
            kind = "boolean" if column.dtype == pl.Boolean else (
                "array" if isinstance(column.dtype, (pl.List, pl.Array)) else
                "object" if isinstance(column.dtype, pl.Struct) else "number")
            frame = frame.with_columns(
                pl.when(pl.col(name).is_not_null()).then(pl.lit(kind)).otherwise(None).alias(_TYPE_PREFIX + name),
                _json_text(name),
            )
    return frame


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _json_text(name: str) -> pl.Expr:
    """A column as text, nested values as their JSON."""
    return pl.struct(pl.col(name).alias("v")).struct.json_encode().str.slice(5).str.strip_suffix("}").alias(name)


def _as_text_like(frame: pl.DataFrame, texts: pl.DataFrame) -> pl.DataFrame:
    """``frame``'s columns that the per-record path holds as text, as JSON text too, so the two concatenate."""
    clash = [c for c in frame.columns if c in texts.columns and frame.schema[c] != texts.schema[c]
             and texts.schema[c] == pl.String]
    return frame.with_columns(
        [_json_text(c) if frame.schema[c].is_nested() else pl.col(c).cast(pl.String) for c in clash]
    )


def _read_jsonl_lines(
    lines: list[tuple[int, bytes]], source: str, text_fields: list[str]
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """The per-record path, for the lines the vectorised reader could not take."""
    records: list[dict] = []
    bad: list[dict] = []
    rows_read = 0

    def reject(number: int, reason: str, message: str, raw: str) -> None:
        bad.append({"source_file": source, "source_record": number, "field": None, "reason": reason,
                    "message": f"record {number}: {message}", "raw": raw})

    for number, raw in lines:
        if not raw.strip():
            continue  # blank lines are not records
        rows_read += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            reject(number, INVALID_UTF8, f"invalid UTF-8 at byte {error.start}",
                   raw.decode("utf-8", errors="backslashreplace"))
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            reject(number, MALFORMED_JSON, f"malformed JSON ({error.msg} at column {error.colno})", text)
            continue
        except RecursionError:
            reject(number, NESTED_TOO_DEEP, "JSON nested too deeply to parse", text)
            continue
        if not isinstance(value, dict):
            kind = "null" if value is None else "a JSON string" if isinstance(value, str) \
                else f"a JSON {_json_type(value)}"
            reject(number, NOT_AN_OBJECT, f"expected a JSON object, got {kind} (each record must be one object)", text)
            continue
        try:
            # every value becomes text so mixed-type fields never fail the frame; the JSON
            # type of a non-text value in a text field is kept so validation rejects it
            record = {k: (v if isinstance(v, str) or v is None else json.dumps(v, ensure_ascii=False))
                      for k, v in value.items()}
        except RecursionError:
            reject(number, NESTED_TOO_DEEP, "JSON nested too deeply to parse", text)
            continue
        for name in text_fields:
            found = value.get(name)
            record[_TYPE_PREFIX + name] = None if found is None or isinstance(found, str) else _json_type(found)
        record["source_record"] = number
        records.append(record)
    frame = pl.DataFrame(records, infer_schema_length=None, strict=False) if records else pl.DataFrame(
        {"source_record": pl.Series([], dtype=pl.Int64)}
    )
    return frame.with_columns(pl.col("source_record").cast(pl.Int64)), _quarantine_frame(bad), rows_read


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "array" if isinstance(value, list) else "object"


# ---- validation and normalisation -------------------------------------------------------


def _normalise(series: pl.Series) -> pl.Series:
    """NFC, line breaks as "\\n", runs of other whitespace as one space, no space at either end
    of a line, trimmed. Line breaks themselves are kept, blank lines included; null stays null.

    NFC, the CR rewrite and the per-line trim each run only on the rows that can change (a
    byte count or a literal search finds them): a ``when/then`` would run them on every row.
    """
    text = series.cast(pl.String)
    # NFC is the identity on ASCII (as many bytes as characters)
    not_ascii = text.str.len_bytes() != text.str.len_chars()
    text = _rewrite_where(text, not_ascii, lambda t: t.str.normalize("NFC"))
    text = _rewrite_where(text, text.str.contains("\r", literal=True), lambda t: t.str.replace_all(r"\r\n?", "\n"))
    # whitespace other than a space or a line break is a tab, a vertical tab, a form feed or
    # non-ASCII: those rows take the whole rule (a single space is left alone rather than
    # rewritten); in the others only runs of spaces can be, found by a literal search
    odd = not_ascii | text.str.contains(r"[\t\x0b\x0c]")
    text = _rewrite_where(text, odd, lambda t: t.str.replace_all(r"[^\S\n]{2,}|[^\S\n ]", " "))
    text = _single_spaces(text)
    text = _rewrite_where(text, text.str.contains("\n", literal=True), lambda t: t.str.replace_all(r" ?\n ?", "\n"))
    return text.str.strip_chars().alias(series.name)


def _single_spaces(text: pl.Series) -> pl.Series:
    """Runs of spaces as one space. A literal "  " -> " " pass halves every run and costs
    less than half of the regex ``" {2,}"``; the rows still holding a double space take the
    next pass (a run of n spaces needs log2(n) of them), so clean rows are searched once."""
    rows = text.str.contains("  ", literal=True).fill_null(False).arg_true()
    while rows.len():
        text = _rewrite_at(text, rows, lambda t: t.str.replace_all("  ", " ", literal=True))
        rows = rows.filter(text.gather(rows).str.contains("  ", literal=True).fill_null(False))
    return text


def _rewrite_where(text: pl.Series, rows: pl.Series, rewrite) -> pl.Series:
    """``rewrite`` (the identity on the other rows) applied to the rows marked in ``rows``."""
    return _rewrite_at(text, rows.fill_null(False).arg_true(), rewrite)


def _rewrite_at(text: pl.Series, picked: pl.Series, rewrite) -> pl.Series:
    """``rewrite`` applied to the rows at the positions ``picked``: to the whole column when
    they are most of it, else to those rows alone."""
    if picked.len() == 0:
        return text
    if 2 * picked.len() > text.len():
        return rewrite(text)
    return text.clone().scatter(picked, rewrite(text.gather(picked)))


def _validate(records: pl.DataFrame, params: IngestParams, source: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    mapping = params.fields
    columns = [c for c in records.columns if c != "source_record" and not c.startswith(_TYPE_PREFIX)]
    if records.height and mapping.prompt not in columns:
        separated = [c for c in columns if any(sep in c and mapping.prompt in c.split(sep) for sep in _SEPARATORS)]
        hint = (f" (a field named {separated[0]!r} looks like a whole header line: set ingest.csv_separator)"
                if separated else "")
        raise IngestError(
            f"no record in {source} has the prompt field {mapping.prompt!r}; fields found: "
            f"{sorted(columns)[:20]}; set ingest.fields.prompt in the config{hint}"
        )
    if not records.height:
        return _empty_prompts(), _quarantine_frame([])
    # polars runs a string function on one series in one thread: row ranges side by side
    # use every core (a row's verdict depends on that row alone)
    ranges = _row_ranges(records.height)
    if len(ranges) == 1:
        return _validate_rows(records, params, source, columns)
    done = list(_ingest_threads().map(
        lambda rows: _validate_rows(records.slice(*rows), params, source, columns), ranges))
    return pl.concat([accepted for accepted, _ in done]), pl.concat([rejected for _, rejected in done])


_PARALLEL_ROWS = 50_000  # fewer rows per thread cost more in start-up than they save


def _row_ranges(rows: int) -> list[tuple[int, int]]:
    """(offset, length) of about equal row ranges, one per core, at least _PARALLEL_ROWS each."""
    count = max(1, min(_cores(), rows // _PARALLEL_ROWS))
    bounds = np.linspace(0, rows, count + 1).astype(int)
    return [(int(start), int(stop - start)) for start, stop in itertools.pairwise(bounds)]


def _cores() -> int:
    """The cores polars works on (its pool follows the CPU quota and POLARS_MAX_THREADS, where
    ``os.cpu_count()`` counts every core of the host)."""
    return max(1, pl.thread_pool_size())


@functools.cache
def _ingest_threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_cores(), thread_name_prefix="prefcurate-ingest")


# a forked child has the pool's object but not its threads: work sent to it would wait forever
os.register_at_fork(after_in_child=_ingest_threads.cache_clear)


def _validate_rows(
    records: pl.DataFrame, params: IngestParams, source: str, columns: list[str]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Accepted rows (with ids) and quarantine rows of ``records``, whose fields are ``columns``."""
    mapping = params.fields

    def text_column(name: str | None) -> pl.Expr:
        if name is None or name not in columns:
            return pl.lit(None, dtype=pl.String)
        dtype = records.schema[name]
        if _is_text(dtype):
            return pl.col(name).cast(pl.String)
        if name in (mapping.prompt, mapping.system_prompt):
            return pl.lit(None, dtype=pl.String)  # rejected as wrong_type below
        if dtype.is_nested():  # an id or category given as a list or object: its JSON text
            return _json_text(name)
        return pl.col(name).cast(pl.String, strict=False)

    def type_error(name: str | None) -> pl.Expr:
        """The JSON (or column) type of a non-text value in a text field, else null."""
        if name is None or name not in columns:
            return pl.lit(None, dtype=pl.String)
        if _TYPE_PREFIX + name in records.columns:  # the line-by-line JSONL reader kept the type
            return pl.col(_TYPE_PREFIX + name)
        dtype = records.schema[name]
        # a whole column of another type (Parquet list<string>, binary, numbers): every row
        return pl.lit(None if _is_text(dtype) else str(dtype), dtype=pl.String)

    raw_json = _raw_json(columns)
    frame = records.with_columns(
        text_column(mapping.prompt).alias("_prompt_raw"),
        text_column(mapping.system_prompt).alias("_system_raw"),
        text_column(mapping.id).alias("source_id"),
        text_column(mapping.category).alias("category"),
        pl.col(mapping.prompt).is_null().alias("_prompt_missing"),
        type_error(mapping.prompt).alias("_prompt_type"),
        type_error(mapping.system_prompt).alias("_system_type"),
    )
    frame = frame.with_columns(
        _normalise(frame["_prompt_raw"].fill_null("")).alias("prompt"),
        _normalise(frame["_system_raw"]).alias("system_prompt"),
    ).with_columns(
        pl.when(pl.col("system_prompt") == "").then(None).otherwise(pl.col("system_prompt")).alias("system_prompt"),
        pl.col("prompt").str.len_chars().cast(pl.Int32).alias("char_len"),
    )
    reason = (
        pl.when(pl.col("_prompt_missing")).then(pl.lit(MISSING_PROMPT))
        .when(pl.col("_prompt_type").is_not_null()).then(pl.lit(WRONG_TYPE))
        .when(pl.col("_system_type").is_not_null()).then(pl.lit(WRONG_TYPE_SYSTEM))
        .when(pl.col("prompt").str.contains(CONTROL_CHARACTERS)).then(pl.lit(CONTROL_CHARACTER))
        .when(pl.col("system_prompt").str.contains(CONTROL_CHARACTERS)).then(pl.lit(CONTROL_CHARACTER_SYSTEM))
        .when(pl.col("char_len") == 0).then(pl.lit(EMPTY_PROMPT))
        .when(pl.col("char_len") < params.min_chars).then(pl.lit(PROMPT_TOO_SHORT))
        .when(pl.col("char_len") > params.max_chars).then(pl.lit(PROMPT_TOO_LONG))
        .otherwise(None)
    )
    frame = frame.with_columns(reason.alias("_reason"))
    messages = {
        MISSING_PROMPT: f"has no {mapping.prompt!r} field (or it is null)",
        WRONG_TYPE: f"field {mapping.prompt!r} is not text",
        WRONG_TYPE_SYSTEM: f"field {mapping.system_prompt!r} is not text",
        CONTROL_CHARACTER: f"field {mapping.prompt!r} holds a control character",
        CONTROL_CHARACTER_SYSTEM: f"field {mapping.system_prompt!r} holds a control character",
        EMPTY_PROMPT: f"field {mapping.prompt!r} is empty after normalisation",
        PROMPT_TOO_SHORT: f"field {mapping.prompt!r} is shorter than {params.min_chars} characters",
        PROMPT_TOO_LONG: f"field {mapping.prompt!r} is longer than {params.max_chars} characters",
    }
    rejected = frame.filter(pl.col("_reason").is_not_null()).with_columns(raw_json).select(
        pl.lit(source).alias("source_file"),
        "source_record",
        pl.when(pl.col("_reason").is_in(list(_ON_SYSTEM_PROMPT))).then(pl.lit(mapping.system_prompt))
        .otherwise(pl.lit(mapping.prompt)).alias("field"),
        pl.col("_reason").replace(_ON_SYSTEM_PROMPT).alias("reason"),
        (pl.lit("record ") + pl.col("source_record").cast(pl.String) + pl.lit(": ")
         + pl.col("_reason").replace_strict(messages, default="invalid")
         + pl.when(pl.col("_reason") == PROMPT_TOO_LONG)
             .then(pl.lit(" (") + pl.col("char_len").cast(pl.String) + pl.lit(")"))
             .when(pl.col("_reason") == WRONG_TYPE)
             .then(pl.lit(" (") + pl.col("_prompt_type") + pl.lit(")"))
             .when(pl.col("_reason") == WRONG_TYPE_SYSTEM)
             .then(pl.lit(" (") + pl.col("_system_type") + pl.lit(")"))
             .when(pl.col("_reason") == CONTROL_CHARACTER).then(_first_control_character("prompt"))
             .when(pl.col("_reason") == CONTROL_CHARACTER_SYSTEM).then(_first_control_character("system_prompt"))
             .otherwise(pl.lit(""))).alias("message"),
        "raw",
    )
    metadata_cols = (
        [c for c in columns if c not in {mapping.prompt, mapping.system_prompt, mapping.id, mapping.category}]
        if mapping.metadata is None else [c for c in mapping.metadata if c in columns]
    )
    kept = frame.select(list(dict.fromkeys(["source_record", "prompt", "system_prompt", "source_id", "category",
                                            "char_len", *metadata_cols, "_reason"])))
    accepted = kept.filter(pl.col("_reason").is_null()) if rejected.height else kept
    accepted = accepted.with_columns(
        _metadata_json(accepted, metadata_cols),
        pl.concat_str([pl.col("system_prompt").fill_null(""), pl.lit("\x1f"), pl.col("prompt")])
        .alias("_key"),
        pl.lit(source).alias("source_file"),
    )
    accepted = accepted.with_columns(_hash_ids(accepted["_key"]).alias("prompt_id"))
    return accepted.select(
        "prompt_id", "prompt", "system_prompt", "source_id", "source_file", "source_record",
        "category", "metadata", "char_len",
    ), rejected


#: sets of null fields up to which records are encoded a set at a time (above: field by field)
_METADATA_GROUPS = 64


def _metadata_json(frame: pl.DataFrame, columns: list[str]) -> pl.Series:
    """Each record's other fields (``columns``) as one JSON object, null when it has none,
    leaving out the fields it lacks (or holds null): a reader fills the fields some records
    lack with null, so encoding every column would give each record every key the file has.

    Records are encoded a group at a time, one group per set of null fields (one when none is
    null, a few in most files), so each row is encoded once, as a whole-struct encode would;
    with more sets than :data:`_METADATA_GROUPS`, each field is encoded on its own and the
    present ones joined (~4x the work, but no loop that grows with the rows)."""
    if not columns:
        return pl.Series("metadata", [None] * frame.height, pl.String)
    fields = frame.select(columns)
    present = fields.select([pl.col(c).is_not_null() for c in columns])
    if all(column.all() for column in present):
        return fields.select(pl.struct(columns).struct.json_encode().alias("metadata")).to_series()
    pattern = present.select(pl.concat_str([pl.col(c).cast(pl.UInt8) for c in columns])).to_series()
    keys = pattern.unique()
    if keys.len() > _METADATA_GROUPS:
        # one single-field object per column, its braces cut, the present ones joined
        members = [pl.when(pl.col(c).is_not_null())
                   .then(pl.struct(pl.col(c)).struct.json_encode().str.strip_prefix("{").str.strip_suffix("}"))
                   for c in columns]
        joined = pl.concat_str(members, separator=",", ignore_nulls=True)
        return fields.select(pl.when(joined != "").then(pl.lit("{") + joined + pl.lit("}")).alias("metadata")).to_series()
    rows, encoded = [], []
    for key in keys.to_list():
        picked = pattern == key
        kept = [c for c, bit in zip(columns, key) if bit == "1"]
        rows.append(picked.arg_true())
        encoded.append(fields.filter(picked).select(pl.struct(kept).struct.json_encode()).to_series()
                       if kept else pl.Series([None] * int(picked.sum()), dtype=pl.String))
    order = pl.concat(rows).arg_sort()
    return pl.concat(encoded).gather(order).alias("metadata")


def _first_control_character(name: str) -> pl.Expr:
    """" (U+001B, character 12 after normalisation)": the first control character of column ``name`` and where.

    Its code point is the last byte of its UTF-8 (one byte for C0 and DEL; C2 and the code
    point for C1), so the hex of that byte names it."""
    found = pl.col(name).str.extract(f"({CONTROL_CHARACTERS})")
    before = pl.col(name).str.replace(f"(?s){CONTROL_CHARACTERS}.*", "").str.len_chars()
    return (pl.lit(" (U+00") + found.str.encode("hex").str.slice(-2).str.to_uppercase()
            + pl.lit(", character ") + (before + 1).cast(pl.String) + pl.lit(" after normalisation)"))


def _raw_json(columns: list[str]) -> pl.Expr:
    """A record as JSON text, for its quarantine row (computed for quarantined rows only)."""
    return pl.struct([pl.col(c) for c in columns]).struct.json_encode().alias("raw")


def _is_text(dtype: pl.DataType) -> bool:
    return dtype in (pl.String, pl.Null) or isinstance(dtype, (pl.Categorical, pl.Enum))


def _hash_ids(keys: pl.Series) -> pl.Series:
    """:func:`hex_ids` of each key, as a Series."""
    return keys.alias("k").to_frame().select(hex_ids(pl.col("k")).alias("prompt_id")).to_series()


def _deduplicate(
    accepted: pl.DataFrame, existing: pl.DataFrame | None, records: pl.DataFrame
) -> tuple[pl.DataFrame, int, pl.DataFrame]:
    """Drop exact duplicates; quarantine ids reused for a different text.

    ``records`` are the rows as read, for the quarantine's raw text of a conflicting row.
    """
    has_existing = existing is not None and existing.height > 0
    # without a repeated source id (in the file or against the dataset) there is no conflict
    if has_existing or not _all_distinct(accepted["source_id"].drop_nulls()):
        accepted, conflicts = _split_id_conflicts(accepted, existing if has_existing else None, records)
    else:
        conflicts = _quarantine_frame([])
    before = accepted.height
    kept = accepted.filter(_first_of_each(accepted["prompt_id"]))
    if has_existing:
        kept = kept.join(existing.select("prompt_id").unique(), on="prompt_id", how="anti")
    return kept, before - kept.height, conflicts


def _all_distinct(texts: pl.Series) -> bool:
    """Whether no text repeats. Distinct 64-bit hashes prove it; only when they are not are
    the texts compared (on 1M ids: 0.015 s, where ``n_unique`` on the texts took 0.07 s)."""
    return texts.hash().n_unique() == texts.len() or texts.n_unique() == texts.len()


def _first_of_each(texts: pl.Series) -> pl.Series:
    """True at the first row of each distinct text, exactly as ``is_first_distinct``.

    Rows whose 64-bit hash no other row has are firsts; the texts themselves are compared only
    among the rows that share a hash (the duplicates, and any collision). On 1M prompt ids
    with 1% duplicates: 0.06 s, where ``is_first_distinct`` on the texts took 0.16 s.
    """
    shared = texts.hash().is_duplicated()
    rows = shared.arg_true()
    return (~shared).scatter(rows, texts.gather(rows).is_first_distinct()) if rows.len() else ~shared


def _split_id_conflicts(
    accepted: pl.DataFrame, existing: pl.DataFrame | None, records: pl.DataFrame
) -> tuple[pl.DataFrame, pl.DataFrame]:
    source_ids = accepted.filter(pl.col("source_id").is_not_null())
    # first occurrence of each source id wins; later rows with another text conflict
    known = source_ids.group_by("source_id", maintain_order=True).agg(pl.col("prompt_id").first().alias("_first"))
    if existing is not None:
        prior = existing.filter(pl.col("source_id").is_not_null()).group_by("source_id").agg(
            pl.col("prompt_id").first().alias("_first")
        )
        known = pl.concat([prior, known]).unique("source_id", keep="first", maintain_order=True)
    flagged = accepted.join(known, on="source_id", how="left", maintain_order="left")
    conflict_mask = flagged["_first"].is_not_null() & (flagged["_first"] != flagged["prompt_id"])
    conflicting = flagged.filter(conflict_mask)
    columns = [c for c in records.columns if c != "source_record" and not c.startswith(_TYPE_PREFIX)]
    raw = records.join(conflicting.select("source_record"), on="source_record", how="semi").select(
        "source_record", _raw_json(columns)
    )
    conflicts = conflicting.join(raw, on="source_record", how="left").select(
        "source_file", "source_record", pl.lit("id").alias("field"),
        pl.lit(DUPLICATE_ID_CONFLICT).alias("reason"),
        (pl.lit("record ") + pl.col("source_record").cast(pl.String) + pl.lit(": id ")
         + pl.col("source_id") + pl.lit(" was already used for a different prompt")).alias("message"),
        "raw",
    )
    return flagged.filter(~conflict_mask).drop("_first"), conflicts


def _empty_prompts() -> pl.DataFrame:
    return pl.DataFrame(schema={
        "prompt_id": pl.String, "prompt": pl.String, "system_prompt": pl.String, "source_id": pl.String,
        "source_file": pl.String, "source_record": pl.Int64, "category": pl.String, "metadata": pl.String,
        "char_len": pl.Int32,
    })


def shard_frames(frame: pl.DataFrame, rows_per_shard: int) -> list[pl.DataFrame]:
    """Split accepted prompts into work units of at most ``rows_per_shard`` rows."""
    return [frame.slice(offset, rows_per_shard) for offset in range(0, frame.height, rows_per_shard)] or []
