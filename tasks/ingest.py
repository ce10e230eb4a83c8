"""Ingest: prompts from JSONL, Parquet or CSV -> validated, normalised, de-duplicated rows.

Accounting holds for every file: ``rows_read = accepted + quarantined + duplicates``,
where duplicates are exact duplicates of the normalised (system prompt, prompt), within
the file or against prompts already in the dataset. Nothing is dropped silently: every
rejected row lands in the quarantine frame with the reason, the field and the raw text.

Normalisation: Unicode NFC, then whitespace runs collapsed to one space (newlines kept as
single newlines, since prompts with code or lists need them), then trimmed. The prompt id
hashes the normalised (system prompt, prompt), so equal prompts get equal ids in any file.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from prefcurate.errors import InputError
from prefcurate.schemas.ids import ID_HEX_CHARS

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
WRONG_TYPE_SYSTEM = "_wrong_type_system"  # internal: reported as WRONG_TYPE on the system-prompt field


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
    path: str = Field(BUNDLED, description="file to read, or 'bundled' for the demo prompt set")
    format: Literal["auto", "jsonl", "parquet", "csv"] = "auto"
    fields: FieldMapping = Field(default_factory=FieldMapping)
    min_chars: int = Field(1, ge=1, description="shorter prompts are quarantined")
    max_chars: int = Field(8000, ge=1, description="longer prompts are quarantined")
    limit: int | None = Field(None, ge=1, description="ingest at most this many accepted prompts")
    shard_rows: int = Field(50_000, ge=1, description="prompts per shard (the unit of work downstream)")

    @model_validator(mode="after")
    def _sizes_in_order(self) -> "IngestParams":
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


def resolve_source(params: IngestParams) -> tuple[Path, str]:
    path = bundled_prompts_path() if params.path == BUNDLED else Path(params.path).expanduser()
    if not path.exists():
        raise IngestError(f"input file {path} does not exist")
    if path.is_dir():
        raise IngestError(f"input {path} is a directory; give a .jsonl, .parquet or .csv file")
    fmt = params.format
    if fmt == "auto":
        suffix = "".join(path.suffixes[-2:]).lower().removesuffix(".gz")
        if suffix.endswith((".jsonl", ".ndjson", ".json")):
            fmt = "jsonl"
        elif suffix.endswith(".parquet"):
            fmt = "parquet"
        elif suffix.endswith((".csv", ".tsv")):
            fmt = "csv"
        else:
            raise IngestError(
                f"cannot tell the format of {path.name} from its suffix; set ingest.format "
                "to jsonl, parquet or csv"
            )
    return path, fmt


def ingest_file(params: IngestParams, existing: pl.DataFrame | None = None) -> IngestResult:
    """Read, validate, normalise and de-duplicate one input file.

    ``existing`` holds ``prompt_id`` and ``source_id`` of prompts already in the dataset, so a
    re-ingest adds nothing and an id reused for a different text is caught across files.
    """
    path, fmt = resolve_source(params)
    source = str(path)
    text_fields = [f for f in (params.fields.prompt, params.fields.system_prompt) if f is not None]
    records, unreadable, rows_read = _read(path, fmt, source, text_fields)
    accepted, rejected = _validate(records, params, source)
    accepted, duplicates, conflicts = _deduplicate(accepted, existing, params)
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


def _read(path: Path, fmt: str, source: str, text_fields: list[str]) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """All records with a 1-based ``source_record`` column, plus the unreadable ones."""
    if fmt == "jsonl":
        return _read_jsonl(path, source, text_fields)
    if fmt == "csv":
        return _read_csv(path, source)
    try:
        frame = pl.read_parquet(path)
    except Exception as error:  # polars raises several types for unreadable files
        raise IngestError(f"cannot read {path} as parquet: {error}") from error
    return _with_record_numbers(frame), _quarantine_frame([]), frame.height


def _read_csv(path: Path, source: str) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    data = _read_bytes(path)
    if not data.strip():
        return pl.DataFrame({"source_record": pl.Series([], dtype=pl.Int64)}), _quarantine_frame([]), 0
    separator = "\t" if path.name.lower().removesuffix(".gz").endswith(".tsv") else ","
    try:
        frame = pl.read_csv(io.BytesIO(data), infer_schema=False, separator=separator, encoding="utf8-lossy")
        ragged = _quarantine_frame([])
    except Exception:  # a ragged row (or another per-row fault): find it row by row
        frame, ragged = _read_csv_rows(data, separator, source)
    frame = _with_record_numbers(frame) if "source_record" not in frame.columns else frame
    # the CSV reader replaced invalid bytes; find those rows and quarantine them
    frame, invalid = _split_lossy_csv_rows(data, frame, source)
    return frame, pl.concat([ragged, invalid]), frame.height + invalid.height + ragged.height


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
    data = _read_bytes(path).removeprefix(_BOM)
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    # Fast path: a clean file (no blank lines) parses in one vectorised call, with the text
    # fields typed as strings so a number, list or object there is a type error, not text;
    # any error sends us to the line-by-line path, which says which record and field.
    if lines and all(line.strip() for line in lines) and _is_utf8(data):
        frame = _read_jsonl_strict(data, text_fields, longest=max(map(len, lines)))
        if frame is not None and frame.height == len(lines):
            return _with_record_numbers(frame), _quarantine_frame([]), len(lines)
    return _read_jsonl_lines(lines, source, text_fields)


def _is_utf8(data: bytes) -> bool:
    """The JSON reader passes invalid bytes through; the line-by-line path names them."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _read_jsonl_strict(data: bytes, text_fields: list[str], longest: int) -> pl.DataFrame | None:
    """The whole file in one vectorised parse, or None when any line is not clean."""
    import pyarrow.json as pa_json

    schema = pa.schema([(name, pa.string()) for name in text_fields])
    try:
        table = pa_json.read_json(
            io.BytesIO(data),
            read_options=pa_json.ReadOptions(block_size=max(1 << 20, longest + 2)),
            parse_options=pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="infer"),
        )
        frame = pl.from_arrow(table)
    except Exception:  # a type conflict, a malformed line, a nesting the readers refuse
        return None
    if not isinstance(frame, pl.DataFrame):
        return None
    # the explicit schema adds its fields even when no line has them: drop those again,
    # so a file without the prompt field is the same error on every path
    absent = [name for name in text_fields
              if frame[name].null_count() == frame.height and json.dumps(name).encode() not in data]
    return frame.drop(absent)


def _read_jsonl_lines(
    lines: list[bytes], source: str, text_fields: list[str]
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    records: list[dict] = []
    bad: list[dict] = []
    rows_read = 0

    def reject(number: int, reason: str, message: str, raw: str) -> None:
        bad.append({"source_file": source, "source_record": number, "field": None, "reason": reason,
                    "message": f"record {number}: {message}", "raw": raw})

    for number, raw in enumerate(lines, start=1):
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
            kind = "a JSON array (the file must hold one object per line)" if isinstance(value, list) \
                else type(value).__name__
            reject(number, NOT_AN_OBJECT, f"expected a JSON object, got {kind}", text)
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
    """NFC, collapse whitespace runs (keeping single newlines), trim; vectorised.

    NFC is the identity on ASCII, so only non-ASCII rows go through it, and the newline
    rules only run on rows that have a newline: the common case costs one regex pass.
    """
    needs_nfc = series.str.contains(r"[^\x00-\x7F]").fill_null(False)
    if needs_nfc.any():
        composed = pl.Series(series.name, pc.utf8_normalize(series.filter(needs_nfc).to_arrow(), "NFC"))
        series = series.scatter(needs_nfc.arg_true(), composed)
    series = series.str.replace_all(r"[^\S\n]+", " ")
    has_newline = series.str.contains("\n", literal=True).fill_null(False)
    if has_newline.any():
        lines = (
            series.filter(has_newline)
            .str.replace_all(r"\r\n?", "\n")
            .str.replace_all(r" ?\n[ \n]*", "\n")
        )
        series = series.scatter(has_newline.arg_true(), lines)
    return series.str.strip_chars()


def _validate(records: pl.DataFrame, params: IngestParams, source: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    mapping = params.fields
    columns = [c for c in records.columns if c != "source_record" and not c.startswith(_TYPE_PREFIX)]
    if records.height and mapping.prompt not in columns:
        raise IngestError(
            f"no record in {source} has the prompt field {mapping.prompt!r}; fields found: "
            f"{sorted(columns)[:20]}; set ingest.fields.prompt in the config"
        )
    if not records.height:
        return _empty_prompts(), _quarantine_frame([])

    def text_column(name: str | None) -> pl.Expr:
        if name is None or name not in columns:
            return pl.lit(None, dtype=pl.String)
        dtype = records.schema[name]
        if _is_text(dtype):
            return pl.col(name).cast(pl.String)
        if name in (mapping.prompt, mapping.system_prompt):
            return pl.lit(None, dtype=pl.String)  # rejected as wrong_type below
        if dtype.is_nested():  # an id or category given as a list or object: its JSON text
            return pl.struct(pl.col(name).alias("v")).struct.json_encode().str.slice(5).str.strip_suffix("}")
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

    raw_json = pl.struct([pl.col(c) for c in columns]).struct.json_encode().alias("raw")
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
        _normalise(frame["_system_raw"].fill_null("")).alias("system_prompt"),
    ).with_columns(
        pl.when(pl.col("system_prompt") == "").then(None).otherwise(pl.col("system_prompt")).alias("system_prompt"),
        pl.col("prompt").str.len_chars().cast(pl.Int32).alias("char_len"),
    )
    reason = (
        pl.when(pl.col("_prompt_missing")).then(pl.lit(MISSING_PROMPT))
        .when(pl.col("_prompt_type").is_not_null()).then(pl.lit(WRONG_TYPE))
        .when(pl.col("_system_type").is_not_null()).then(pl.lit(WRONG_TYPE_SYSTEM))
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
        EMPTY_PROMPT: f"field {mapping.prompt!r} is empty after normalisation",
        PROMPT_TOO_SHORT: f"field {mapping.prompt!r} is shorter than {params.min_chars} characters",
        PROMPT_TOO_LONG: f"field {mapping.prompt!r} is longer than {params.max_chars} characters",
    }
    rejected = frame.filter(pl.col("_reason").is_not_null()).with_columns(raw_json).select(
        pl.lit(source).alias("source_file"),
        "source_record",
        pl.when(pl.col("_reason") == WRONG_TYPE_SYSTEM).then(pl.lit(mapping.system_prompt))
        .otherwise(pl.lit(mapping.prompt)).alias("field"),
        pl.col("_reason").replace(WRONG_TYPE_SYSTEM, WRONG_TYPE).alias("reason"),
        (pl.lit("record ") + pl.col("source_record").cast(pl.String) + pl.lit(": ")
         + pl.col("_reason").replace_strict(messages, default="invalid")
         + pl.when(pl.col("_reason") == PROMPT_TOO_LONG)
             .then(pl.lit(" (") + pl.col("char_len").cast(pl.String) + pl.lit(")"))
             .when(pl.col("_reason") == WRONG_TYPE)
             .then(pl.lit(" (") + pl.col("_prompt_type") + pl.lit(")"))
             .when(pl.col("_reason") == WRONG_TYPE_SYSTEM)
             .then(pl.lit(" (") + pl.col("_system_type") + pl.lit(")"))
             .otherwise(pl.lit(""))).alias("message"),
        "raw",
    )
    metadata_cols = (
        [c for c in columns if c not in {mapping.prompt, mapping.system_prompt, mapping.id, mapping.category}]
        if mapping.metadata is None else [c for c in mapping.metadata if c in columns]
    )
    metadata = (
        pl.struct([pl.col(c) for c in metadata_cols]).struct.json_encode() if metadata_cols else pl.lit(None, pl.String)
    )
    accepted = frame.filter(pl.col("_reason").is_null()).with_columns(
        raw_json,
        pl.concat_str([pl.col("system_prompt").fill_null(""), pl.lit("\x1f"), pl.col("prompt")])
        .alias("_key"),
        metadata.alias("metadata"),
        pl.lit(source).alias("source_file"),
    )
    accepted = accepted.with_columns(_hash_ids(accepted["_key"]).alias("prompt_id"))
    return accepted.select(
        "prompt_id", "prompt", "system_prompt", "source_id", "source_file", "source_record",
        "category", "metadata", "char_len", "raw",
    ), rejected


def _is_text(dtype: pl.DataType) -> bool:
    return dtype in (pl.String, pl.Null) or isinstance(dtype, (pl.Categorical, pl.Enum))


def _hash_ids(keys: pl.Series) -> pl.Series:
    """sha256 of each key, vectorised through DuckDB (stable across versions, unlike polars' hash)."""
    import duckdb

    table = pa.table({"k": keys.to_arrow()})
    con = duckdb.connect()
    con.register("keys", table)
    hashed = con.sql(f"SELECT left(sha256(k), {ID_HEX_CHARS}) AS h FROM keys").to_arrow_table()["h"]
    con.close()
    return pl.Series("prompt_id", hashed)


def _deduplicate(
    accepted: pl.DataFrame, existing: pl.DataFrame | None, params: IngestParams
) -> tuple[pl.DataFrame, int, pl.DataFrame]:
    """Drop exact duplicates; quarantine ids reused for a different text."""
    source_ids = accepted.filter(pl.col("source_id").is_not_null())
    # first occurrence of each source id wins; later rows with another text conflict
    first_text = source_ids.group_by("source_id", maintain_order=True).agg(pl.col("prompt_id").first().alias("_first"))
    known = first_text
    if existing is not None and existing.height:
        prior = existing.filter(pl.col("source_id").is_not_null()).group_by("source_id").agg(
            pl.col("prompt_id").first().alias("_first")
        )
        known = pl.concat([prior, first_text]).unique("source_id", keep="first", maintain_order=True)
    flagged = accepted.join(known, on="source_id", how="left")
    conflict_mask = flagged["_first"].is_not_null() & (flagged["_first"] != flagged["prompt_id"])
    conflicts = flagged.filter(conflict_mask).select(
        "source_file", "source_record", pl.lit("id").alias("field"),
        pl.lit(DUPLICATE_ID_CONFLICT).alias("reason"),
        (pl.lit("record ") + pl.col("source_record").cast(pl.String) + pl.lit(": id ")
         + pl.col("source_id") + pl.lit(" was already used for a different prompt")).alias("message"),
        "raw",
    )
    kept = flagged.filter(~conflict_mask).drop("_first")
    before = kept.height
    kept = kept.unique("prompt_id", keep="first", maintain_order=True)
    if existing is not None and existing.height:
        kept = kept.join(existing.select("prompt_id").unique(), on="prompt_id", how="anti")
    duplicates = before - kept.height
    return kept.drop("raw"), duplicates, conflicts


def _empty_prompts() -> pl.DataFrame:
    return pl.DataFrame(schema={
        "prompt_id": pl.String, "prompt": pl.String, "system_prompt": pl.String, "source_id": pl.String,
        "source_file": pl.String, "source_record": pl.Int64, "category": pl.String, "metadata": pl.String,
        "char_len": pl.Int32, "raw": pl.String,
    })


def shard_frames(frame: pl.DataFrame, rows_per_shard: int) -> list[pl.DataFrame]:
    """Split accepted prompts into work units of at most ``rows_per_shard`` rows."""
    return [frame.slice(offset, rows_per_shard) for offset in range(0, frame.height, rows_per_shard)] or []
