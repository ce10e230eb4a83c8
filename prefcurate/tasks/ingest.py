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

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from prefcurate.schemas.ids import ID_HEX_CHARS

BUNDLED = "bundled"
_TYPES = "_value_types"  # internal column: JSON {field: type} of non-text values per record

# quarantine reason codes
MALFORMED_JSON = "malformed_json"
INVALID_UTF8 = "invalid_utf8"
NOT_AN_OBJECT = "not_an_object"
MISSING_PROMPT = "missing_prompt"
EMPTY_PROMPT = "empty_prompt"
WRONG_TYPE = "wrong_type"
PROMPT_TOO_LONG = "prompt_too_long"
PROMPT_TOO_SHORT = "prompt_too_short"
DUPLICATE_ID_CONFLICT = "duplicate_id_conflict"


class IngestError(ValueError):
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
        suffix = "".join(path.suffixes[-2:]).lower()
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
    records, unreadable, rows_read = _read(path, fmt, source)
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


def _read(path: Path, fmt: str, source: str) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """All records as strings-or-structs with a 1-based ``source_record`` column."""
    if fmt == "jsonl":
        return _read_jsonl(path, source)
    try:
        if fmt == "parquet":
            frame = pl.read_parquet(path)
        else:
            separator = "\t" if path.suffix.lower() == ".tsv" else ","
            frame = pl.read_csv(path, infer_schema=False, separator=separator, encoding="utf8-lossy")
    except Exception as error:  # polars raises several types for unreadable files
        raise IngestError(f"cannot read {path} as {fmt}: {error}") from error
    frame = frame.with_row_index("source_record", offset=1).with_columns(pl.col("source_record").cast(pl.Int64))
    if fmt == "csv":
        # the CSV reader replaced invalid bytes; find those rows and quarantine them
        frame, invalid = _split_lossy_csv_rows(path, frame, source)
        return frame, invalid, frame.height + invalid.height
    return frame, _quarantine_frame([]), frame.height


def _split_lossy_csv_rows(path: Path, frame: pl.DataFrame, source: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    replacement = "\ufffd"
    if replacement not in path.read_bytes().decode("utf-8", errors="replace"):
        return frame, _quarantine_frame([])
    text_cols = [c for c, t in frame.schema.items() if t == pl.String]
    bad = pl.any_horizontal([pl.col(c).str.contains(replacement, literal=True).fill_null(False) for c in text_cols])
    invalid = frame.filter(bad)
    rows = [
        {"source_file": source, "source_record": r["source_record"], "field": None,
         "reason": INVALID_UTF8, "message": f"row {r['source_record']}: invalid UTF-8 bytes",
         "raw": json.dumps({k: v for k, v in r.items() if k != "source_record"}, ensure_ascii=False)}
        for r in invalid.to_dicts()
    ]
    return frame.filter(~bad), _quarantine_frame(rows)


def _read_jsonl(path: Path, source: str) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    # Fast path: a clean file (no blank lines) parses in one vectorised call; any error
    # sends us to the line-by-line path, which can say which line was bad.
    if lines and all(lines):
        try:
            frame = pl.read_ndjson(data, infer_schema_length=None)
            if frame.height == len(lines):
                frame = frame.with_row_index("source_record", offset=1).with_columns(
                    pl.col("source_record").cast(pl.Int64)
                )
                return frame, _quarantine_frame([]), len(lines)
        except Exception:
            pass
    return _read_jsonl_lines(lines, source)


def _read_jsonl_lines(lines: list[bytes], source: str) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    records: list[dict] = []
    bad: list[dict] = []
    rows_read = 0
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue  # blank lines are not records
        rows_read += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            bad.append({"source_file": source, "source_record": number, "field": None, "reason": INVALID_UTF8,
                        "message": f"line {number}: invalid UTF-8 at byte {error.start}",
                        "raw": raw.decode("utf-8", errors="backslashreplace")})
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            bad.append({"source_file": source, "source_record": number, "field": None, "reason": MALFORMED_JSON,
                        "message": f"line {number}: malformed JSON ({error.msg} at column {error.colno})",
                        "raw": text})
            continue
        if not isinstance(value, dict):
            bad.append({"source_file": source, "source_record": number, "field": None, "reason": NOT_AN_OBJECT,
                        "message": f"line {number}: expected a JSON object, got {type(value).__name__}",
                        "raw": text})
            continue
        # every value becomes text so mixed-type fields never fail the frame; which fields
        # were not text is kept so validation can still reject a non-text prompt
        value_types = {k: type(v).__name__ for k, v in value.items() if v is not None and not isinstance(v, str)}
        value = {k: (v if isinstance(v, str) or v is None else json.dumps(v, ensure_ascii=False))
                 for k, v in value.items()}
        value["source_record"] = number
        value[_TYPES] = json.dumps(value_types)
        records.append(value)
    frame = pl.DataFrame(records, infer_schema_length=None, strict=False) if records else pl.DataFrame(
        {"source_record": pl.Series([], dtype=pl.Int64)}
    )
    return frame.with_columns(pl.col("source_record").cast(pl.Int64)), _quarantine_frame(bad), rows_read


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
    columns = [c for c in records.columns if c not in ("source_record", _TYPES)]
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
        return pl.col(name).cast(pl.String)

    raw_json = pl.struct([pl.col(c) for c in columns]).struct.json_encode().alias("raw")
    frame = records.with_columns(
        text_column(mapping.prompt).alias("_prompt_raw"),
        text_column(mapping.system_prompt).alias("_system_raw"),
        text_column(mapping.id).alias("source_id"),
        text_column(mapping.category).alias("category"),
        pl.col(mapping.prompt).is_null().alias("_prompt_missing"),
    )
    prompt_dtype = records.schema[mapping.prompt]
    if _TYPES in records.columns:
        prompt_type = pl.col(_TYPES).str.json_path_match(f"$.{mapping.prompt}")
    else:
        prompt_type = pl.lit(None if prompt_dtype in (pl.String, pl.Null) else str(prompt_dtype), pl.String)
    frame = frame.with_columns(prompt_type.alias("_prompt_type"))
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
        .when(pl.col("char_len") == 0).then(pl.lit(EMPTY_PROMPT))
        .when(pl.col("char_len") < params.min_chars).then(pl.lit(PROMPT_TOO_SHORT))
        .when(pl.col("char_len") > params.max_chars).then(pl.lit(PROMPT_TOO_LONG))
        .otherwise(None)
    )
    frame = frame.with_columns(reason.alias("_reason"))
    messages = {
        MISSING_PROMPT: f"has no {mapping.prompt!r} field",
        WRONG_TYPE: f"field {mapping.prompt!r} is not text",
        EMPTY_PROMPT: f"field {mapping.prompt!r} is empty after normalisation",
        PROMPT_TOO_SHORT: f"field {mapping.prompt!r} is shorter than {params.min_chars} characters",
        PROMPT_TOO_LONG: f"field {mapping.prompt!r} is longer than {params.max_chars} characters",
    }
    rejected = frame.filter(pl.col("_reason").is_not_null()).with_columns(raw_json).select(
        pl.lit(source).alias("source_file"),
        "source_record",
        pl.lit(mapping.prompt).alias("field"),
        pl.col("_reason").alias("reason"),
        (pl.lit("record ") + pl.col("source_record").cast(pl.String) + pl.lit(": ")
         + pl.col("_reason").replace_strict(messages, default="invalid")
         + pl.when(pl.col("_reason") == PROMPT_TOO_LONG)
             .then(pl.lit(" (") + pl.col("char_len").cast(pl.String) + pl.lit(")"))
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
