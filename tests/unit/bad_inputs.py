"""Bad input files of every kind, kept as data: (kind, file name, how to write it, expected).

``expected`` is either ``{record: reason}`` of the quarantined records plus the accepted
count, or ``("error", pattern)`` for a file that is unusable as a whole.
"""

import gzip
import json

import polars as pl

OK = b'{"prompt": "a good prompt"}\n'


def _bytes(data: bytes):
    return lambda path: path.write_bytes(data)


def _parquet(column):
    return lambda path: pl.DataFrame({"prompt": column}).write_parquet(path)


def _directory(path):
    path.mkdir()


def _missing(path):
    pass


WRONG_TYPES = b"".join(json.dumps({"prompt": v}).encode() + b"\n" for v in ["text", 7, True, ["a"], {"a": 1}, None])

BAD_INPUTS = [
    ("invalid_utf8", "f.jsonl", _bytes(OK + b'{"prompt": "bad \xff\xfe bytes"}\n'), ({2: "invalid_utf8"}, 1)),
    ("nul_byte", "f.jsonl", _bytes(OK + b'{"prompt": "a\x00b"}\n'), ({2: "malformed_json"}, 1)),
    ("bom", "f.jsonl", _bytes(b"\xef\xbb\xbf" + OK + b'{"prompt": "second"}\n'), ({}, 2)),
    ("crlf", "f.jsonl", _bytes(OK.replace(b"\n", b"\r\n") + b'{"prompt": "second"}\r\n'), ({}, 2)),
    ("line_50mb", "f.jsonl", _bytes(OK + b'{"prompt": "' + b"x" * 50_000_000 + b'"}\n'), ({2: "prompt_too_long"}, 1)),
    ("deeply_nested", "f.jsonl", _bytes(OK + b'{"prompt": ' + b"[" * 15_000 + b"]" * 15_000 + b"}\n"),
     ({2: "nested_too_deep"}, 1)),
    # a file holding one JSON array (Alpaca-style) is read element by element: records number elements
    ("json_array", "f.json", _bytes(b'[{"prompt": "a"}, {"prompt": "b"}]\n'), ({}, 2)),
    ("json_array_pretty", "f.json", _bytes(json.dumps([{"prompt": "a"}, 7, ["x"], {"prompt": "b\nc"}, None],
                                                     indent=2).encode()),
     ({2: "not_an_object", 3: "not_an_object", 5: "not_an_object"}, 2)),
    ("json_array_big_integer", "f.json", _bytes(b'[{"prompt": "a", "n": 123456789012345678901234567890}]'), ({}, 1)),
    ("json_array_truncated", "f.json", _bytes(b'[\n  {"prompt": "a"},\n  {"prompt": "b'),
     ("error", "starts like a JSON array but is not one .*line 3 column")),
    ("json_array_invalid_utf8", "f.json", _bytes(b'[{"prompt": "bad \xff"}]'), ("error", "invalid UTF-8 at byte 17")),
    ("jsonl_first_line_an_array", "f.jsonl", _bytes(b'[1, 2]\n' + OK), ({1: "not_an_object"}, 1)),
    ("wrong_types", "f.jsonl", _bytes(WRONG_TYPES),
     ({2: "wrong_type", 3: "wrong_type", 4: "wrong_type", 5: "wrong_type", 6: "missing_prompt"}, 1)),
    ("only_numbers", "f.jsonl", _bytes(b'{"prompt": 7}\n{"prompt": 8}\n'), ({1: "wrong_type", 2: "wrong_type"}, 0)),
    # a NUL or an escape sequence is corrupt text; U+001F would make a prompt's id ambiguous
    ("control_characters", "f.jsonl", _bytes(OK + b'{"prompt": "red \\u001b[31m text"}\n'
                                             + b'{"prompt": "p", "system_prompt": "a\\u001fb"}\n'),
     ({2: "control_character", 3: "control_character"}, 1)),
    ("parquet_nul", "f.parquet", _parquet(["fine", "a\x00b"]), ({2: "control_character"}, 1)),
    ("system_prompt_number", "f.jsonl", _bytes(OK + b'{"prompt": "p", "system_prompt": 5}\n'), ({2: "wrong_type"}, 1)),
    ("ragged_csv", "f.csv", _bytes(b"prompt,x\nhello,1\nhi,2,3\nthree\n"), ({2: "ragged_row", 3: "ragged_row"}, 1)),
    # the separator is the one the header line holds most often: spreadsheets in many locales write ";"
    ("csv_semicolons", "f.csv", _bytes(b'prompt;id\n"a; b, c";1\nsecond;2\n'), ({}, 2)),
    ("csv_pipes_ragged", "f.csv", _bytes(b"prompt|id\nfirst|1\nsecond|2|3\n"), ({2: "ragged_row"}, 1)),
    ("csv_invalid_utf8", "f.csv", _bytes(b"prompt\nhello\nbad \xff\n"), ({2: "invalid_utf8"}, 1)),
    ("empty_jsonl", "f.jsonl", _bytes(b""), ({}, 0)),
    ("empty_csv", "f.csv", _bytes(b""), ({}, 0)),
    ("blank_lines_only", "f.jsonl", _bytes(b"\n\n  \n"), ({}, 0)),
    ("empty_directory", "d.jsonl", _directory, ("error", "the folder .* holds no .jsonl, .json, .parquet or .csv file")),
    ("missing_file", "gone.jsonl", _missing, ("error", "does not exist")),
    ("gzip_jsonl", "f.jsonl.gz", lambda path: path.write_bytes(gzip.compress(OK + b'{"prompt": 3}\n')),
     ({2: "wrong_type"}, 1)),
    ("truncated_gzip", "f.jsonl.gz", lambda path: path.write_bytes(gzip.compress(OK * 100)[:30]),
     ("error", "gzip but cannot be decompressed")),
    ("parquet_list_column", "f.parquet", _parquet([["a", "b"], ["c"]]), ({1: "wrong_type", 2: "wrong_type"}, 0)),
    ("parquet_binary_column", "f.parquet", _parquet([b"ab", b"c"]), ({1: "wrong_type", 2: "wrong_type"}, 0)),
    ("parquet_number_column", "f.parquet", _parquet([1, 2]), ({1: "wrong_type", 2: "wrong_type"}, 0)),
    ("not_parquet", "f.parquet", _bytes(b"PAR1 but not really"), ("error", "cannot read .* as parquet")),
]
