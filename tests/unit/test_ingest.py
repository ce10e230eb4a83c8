import json

import polars as pl
import pytest
from prefcurate.tasks.ingest import IngestError, IngestParams, ingest_file

from tests.unit.bad_inputs import BAD_INPUTS
from tests.unit.bad_rows import EXPECTED_REASONS, write_bad_file


def test_every_kind_of_bad_row_is_quarantined_with_its_record_and_reason(tmp_path):
    result = ingest_file(IngestParams(path=str(write_bad_file(tmp_path)), max_chars=200))
    reasons = dict(zip(result.quarantine["source_record"].to_list(), result.quarantine["reason"].to_list()))
    assert reasons == EXPECTED_REASONS
    for message, record in zip(result.quarantine["message"], result.quarantine["source_record"]):
        assert str(record) in message
    assert result.quarantine["raw"].null_count() == 0  # nothing is lost
    # accounting: read = accepted + quarantined + duplicates (the blank line is not a record)
    assert result.rows_read == 12
    assert (result.accepted.height, result.quarantine.height, result.duplicates) == (3, 8, 1)
    assert result.rows_read == result.accepted.height + result.quarantine.height + result.duplicates


def test_normalisation_nfc_and_whitespace(tmp_path):
    result = ingest_file(IngestParams(path=str(write_bad_file(tmp_path)), max_chars=200))
    prompts = result.accepted["prompt"].to_list()
    assert "What is the capital of France?" in prompts
    assert "Caf\u00e9 au lait?" in prompts  # composed form
    assert json.loads(result.accepted.filter(pl.col("source_id") == "a3")["metadata"][0]) == {"topic": "cs"}


def test_metadata_holds_only_the_fields_each_record_has(tmp_path):
    # the reader gives every record every field of the file, null where one lacks it
    records = [{"prompt": "p1", "lang": "en"}, {"prompt": "p2", "source": "web", "lang": None},
               {"prompt": "p3"}, {"prompt": "p4", "nested": {"a": 1}, "lang": "de", "source_file": "theirs"}]
    path = tmp_path / "mixed_fields.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    accepted = ingest_file(IngestParams(path=str(path))).accepted.sort("source_record")
    metadata = [None if m is None else json.loads(m) for m in accepted["metadata"]]
    assert metadata == [{"lang": "en"}, {"source": "web"}, None, {"lang": "de", "nested": {"a": 1}, "source_file": "theirs"}]
    assert accepted["source_file"].to_list() == [str(path)] * 4  # the record's own field stays in metadata


def test_metadata_of_records_with_many_different_sets_of_fields(tmp_path):
    # 8 optional fields, each record a different subset: more sets than are encoded set by set
    records = [{"prompt": f"p{i}", **{f"f{k}": i * 10 + k for k in range(8) if i >> k & 1}} for i in range(256)]
    path = tmp_path / "sparse.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    accepted = ingest_file(IngestParams(path=str(path))).accepted.sort("source_record")
    expected = [{k: v for k, v in r.items() if k != "prompt"} or None for r in records]
    assert [None if m is None else json.loads(m) for m in accepted["metadata"]] == expected


def test_same_text_gets_the_same_id_in_any_format(tmp_path):
    frame = pl.DataFrame({"id": ["1", "2"], "prompt": ["Hello  world", "Second prompt"]})
    frame.write_parquet(tmp_path / "p.parquet")
    frame.write_csv(tmp_path / "p.csv")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in frame.to_dicts()) + "\n")
    ids = [
        ingest_file(IngestParams(path=str(tmp_path / name)))
        .accepted.sort("source_record")["prompt_id"].to_list()
        for name in ("p.parquet", "p.csv", "p.jsonl")
    ]
    assert ids[0] == ids[1] == ids[2]


def test_field_mapping_and_existing_dataset_dedup(tmp_path):
    path = tmp_path / "q.csv"
    pl.DataFrame({"key": ["k1", "k2"], "question": ["One?", "Two?"], "sys": ["Be brief.", ""]}).write_csv(path)
    params = IngestParams.model_validate(
        {"path": str(path), "fields": {"prompt": "question", "id": "key", "system_prompt": "sys"}}
    )
    first = ingest_file(params)
    assert first.accepted["system_prompt"].to_list() == ["Be brief.", None]
    again = ingest_file(params, existing=first.accepted.select("prompt_id", "source_id"))
    assert again.accepted.height == 0 and again.duplicates == 2


def test_unusable_input_is_a_clear_error(tmp_path):
    with pytest.raises(IngestError, match="does not exist"):
        ingest_file(IngestParams(path=str(tmp_path / "missing.jsonl")))
    path = tmp_path / "other.jsonl"
    path.write_text('{"text": "hi"}\n')
    with pytest.raises(IngestError, match="prompt field 'prompt'.*text"):
        ingest_file(IngestParams(path=str(path)))
    weird = tmp_path / "data.bin"
    weird.write_text("x")
    with pytest.raises(IngestError, match="cannot tell the format"):
        ingest_file(IngestParams(path=str(weird)))


def test_input_errors_are_not_retried_but_other_failures_are():
    from prefcurate.flows.common import run_unit_task
    from prefcurate.tasks.calibration import GateError
    from prefect.states import Failed

    from prefcurate.config import ConfigError
    from prefcurate.inference.scoring import PoolCapabilityError

    should_retry = run_unit_task.retry_condition_fn
    assert not should_retry(run_unit_task, None, Failed(data=IngestError("no prompt field")))
    assert not should_retry(run_unit_task, None, Failed(data=ConfigError("bad config")))
    assert not should_retry(run_unit_task, None, Failed(data=GateError("no judge left in the jury")))
    assert not should_retry(run_unit_task, None, Failed(data=PoolCapabilityError("a generative model's pool")))
    assert should_retry(run_unit_task, None, Failed(data=ConnectionError("engine went away")))


@pytest.mark.parametrize("kind,name,write,expected", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_of_every_kind_are_quarantined_or_refused_with_accounting(tmp_path, kind, name, write, expected):
    from prefcurate.steps.base import StageContext
    from prefcurate.steps.ingest import IngestStep, ingest_accounting
    from prefcurate.store import Store

    path = tmp_path / name
    write(path)
    store = Store.init(tmp_path / "ds")
    ctx = StageContext(str(store.root), {"contracts": False}, "run-1")
    step = IngestStep(IngestParams(path=str(path)))
    if expected[0] == "error":
        with pytest.raises(IngestError, match=expected[1]):
            for unit in step.plan(ctx):
                step.run_unit(unit, ctx)
        return
    reasons, accepted = expected
    for unit in step.plan(ctx):
        result = step.run_unit(unit, ctx)
        store.register(result.shards, unit=("ingest", unit.key), counts=result.counts)
    quarantine = store.query("SELECT source_record, field, reason, message FROM quarantine ORDER BY source_record")
    assert dict(zip(quarantine["source_record"].to_list(), quarantine["reason"].to_list())) == reasons
    for record, field, reason, message in quarantine.rows():
        assert message.startswith(f"record {record}: ")
        if reason in ("wrong_type", "missing_prompt", "control_character"):
            assert field in ("prompt", "system_prompt") and field in message
    counts = ingest_accounting(store).row(0, named=True)
    assert counts["accepted"] == accepted and counts["quarantined"] == len(reasons)
    assert counts["rows_read"] == counts["accepted"] + counts["quarantined"] + counts["duplicates"]


def test_blank_lines_inside_a_prompt_survive_normalisation(tmp_path):
    text = "Fix this code:\r\n\r\n    def f(x):\n        return  x\n\n\nThanks.  "
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": text}) + "\n")
    (prompt,) = ingest_file(IngestParams(path=str(path))).accepted["prompt"].to_list()
    # line breaks kept as they are (blank lines too); other whitespace runs become one space
    assert prompt == "Fix this code:\n\ndef f(x):\nreturn x\n\n\nThanks."


def test_a_large_file_with_a_few_bad_lines_keeps_every_good_record(tmp_path):
    """The vectorised reader takes the good lines; only the bad ones go record by record,
    and each keeps its line number (blank lines count) and names the field."""
    lines = [json.dumps({"id": f"r{i}", "prompt": f"prompt number {i}", "n": i}) for i in range(3000)]
    lines[10] = '{"id": "r10", "prompt": "cut off'  # malformed
    lines[500] = ""  # blank: not a record, but it still counts as a line
    lines[1200] = json.dumps({"id": "r1200", "prompt": 12})  # wrong type, object-looking
    lines[1300] = json.dumps({"id": "r1300", "prompt": "12 monkeys"})  # looks like a number, is text
    lines[2500] = json.dumps({"id": "r2500", "prompt": "late metadata", "late_field": [1, 2]})
    lines[2600] = '  {"id": "r2600", "prompt": "indented line"}'
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = ingest_file(IngestParams(path=str(path)))
    quarantine = result.quarantine.select("source_record", "field", "reason").rows()
    assert quarantine == [(11, None, "malformed_json"), (1201, "prompt", "wrong_type")]
    assert result.rows_read == 2999 and result.accepted.height == 2997
    accepted = result.accepted
    assert accepted.filter(pl.col("source_id") == "r1300")["prompt"].item() == "12 monkeys"
    assert accepted.filter(pl.col("source_id") == "r2600")["source_record"].item() == 2601
    assert accepted.filter(pl.col("source_id") == "r2999")["source_record"].item() == 3000
    late = json.loads(accepted.filter(pl.col("source_id") == "r2500")["metadata"].item())
    assert late["late_field"] == [1, 2]  # a key first seen past the reader's inference window is kept
    assert accepted["source_record"].is_sorted()


def test_a_field_whose_type_widens_after_the_first_lines_keeps_every_value(tmp_path):
    # polars infers types from the first 100 lines: a float at line 500 fails that parse
    lines = [json.dumps({"prompt": f"p {i}", "score": i if i < 500 else i + 0.5}) for i in range(1000)]
    path = tmp_path / "widen.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = ingest_file(IngestParams(path=str(path)))
    assert (result.accepted.height, result.quarantine.height) == (1000, 0)
    scores = result.accepted["metadata"].str.json_decode(pl.Struct({"score": pl.Float64})).struct.field("score")
    assert scores.to_list() == [i if i < 500 else i + 0.5 for i in range(1000)]


#: Unicode White_Space (what the normalisation's regex ``\s`` means), the line break aside
_WHITESPACE = "\t\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"


def _reference_normalise(text: str) -> str:
    """The documented rule, written plainly with the standard library."""
    import re
    import unicodedata

    text = re.sub(r"\r\n?", "\n", unicodedata.normalize("NFC", text))
    text = re.sub(f"[{re.escape(_WHITESPACE)}]+", " ", text)
    return re.sub(r" ?\n ?", "\n", text).strip(_WHITESPACE + "\n")


def test_normalisation_matches_the_rule_on_random_text():
    import random

    from prefcurate.tasks.ingest import _normalise

    rng = random.Random(7)
    # letters, spaces in runs, other whitespace, line breaks, combining marks and a sign NFC maps to ASCII
    alphabet = ["a", "b", "Z", "1", "#", " ", "  ", "   ", "\n", "\r\n", "\r", "\t", "\x0b", "\x0c", "\x1f",
                "e\u0301", "\u212a", "\u00e9", "\u00a0", "\u3000", "\u2028", "\u200a", "\x85", "漢", "🙂"]
    ascii_only = [c for c in alphabet if c.isascii()]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30))) for _ in range(3000)]
    texts += ["".join(rng.choice(ascii_only) for _ in range(rng.randrange(0, 30))) for _ in range(3000)]
    # mostly plain rows, as real prompts are: each rewrite runs on its rows only
    texts += ["plain  text with  double spaces", "plain text"] * 7000 + [None]
    texts += ["x" + " " * n + "y" for n in (2, 3, 4, 5, 17, 1000)]  # runs that take several literal passes
    got = _normalise(pl.Series("t", texts)).to_list()
    want = [None if t is None else _reference_normalise(t) for t in texts]
    assert got == want
    # a column where most rows need a rewrite takes the whole-column path, with the same result
    odd = texts[:3000]
    assert _normalise(pl.Series("t", odd)).to_list() == want[:3000]


def test_prompt_ids_are_the_sha256_of_system_prompt_and_prompt(tmp_path):
    """The id is what hashlib gives for the normalised (system prompt, prompt): it must not move
    when the vectorised hash behind it changes, or every dataset's ids would."""
    import hashlib

    rows = [{"prompt": "Hello  world"}, {"prompt": "Caf\u00e9?", "system_prompt": "Be brief."}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    accepted = ingest_file(IngestParams(path=str(tmp_path / "p.jsonl"))).accepted.sort("source_record")
    want = [hashlib.sha256(key.encode()).hexdigest()[:24] for key in ("\x1fHello world", "Be brief.\x1fCaf\u00e9?")]
    assert accepted["prompt_id"].to_list() == want


def test_control_characters_are_quarantined_so_no_two_prompts_share_an_id(tmp_path):
    """U+001F joins the system prompt and the prompt in a prompt's key: were it allowed inside
    either, ("a<US>b", "c") and ("a", "b<US>c") would be one prompt, the second a "duplicate"."""
    rows = [{"system_prompt": "a\x1fb", "prompt": "c"}, {"system_prompt": "a", "prompt": "b\x1fc"},
            {"prompt": "Caf\u00e9 \x85 au lait, \x1b[1mbold\x1b[0m"}, {"prompt": "tabs\tand\x0cfeeds are whitespace"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = ingest_file(IngestParams(path=str(tmp_path / "p.jsonl")))
    assert result.duplicates == 0 and result.accepted["prompt"].to_list() == ["tabs and feeds are whitespace"]
    found = result.quarantine.select("source_record", "field", "reason", "message").rows()
    assert found == [
        (1, "system_prompt", "control_character",
         "record 1: field 'system_prompt' holds a control character (U+001F, character 2 after normalisation)"),
        (2, "prompt", "control_character", "record 2: field 'prompt' holds a control character (U+001F, character 2 after normalisation)"),
        # (U+0085, next line, is whitespace: the first control character left is the escape)
        (3, "prompt", "control_character", "record 3: field 'prompt' holds a control character (U+001B, character 15 after normalisation)"),
    ]


def test_hashed_duplicate_checks_are_exact_even_when_hashes_collide(monkeypatch):
    """De-duplication compares hashes first and texts only where hashes repeat: the answer must
    be the texts' own, including when different texts share a hash."""
    import random

    from prefcurate.tasks.ingest import _all_distinct, _first_of_each

    rng = random.Random(5)
    texts = pl.Series("t", [None if rng.random() < 0.02 else f"p{rng.randrange(400)}" for _ in range(1000)])
    distinct = pl.Series("t", [f"p{i}" for i in range(1000)])

    def check():
        assert _first_of_each(texts).to_list() == texts.is_first_distinct().to_list()
        assert _first_of_each(distinct).all() and _first_of_each(distinct.head(0)).len() == 0
        assert _all_distinct(distinct) and not _all_distinct(texts.drop_nulls())

    check()
    # a hash with few values: most different texts collide, and only the texts can tell them apart
    monkeypatch.setattr(pl.Series, "hash", lambda self, *args, **kwargs: self.str.len_bytes().cast(pl.UInt64))
    check()


def test_validation_on_row_ranges_side_by_side_gives_the_rows_of_one_pass(tmp_path, monkeypatch):
    import random

    from prefcurate.tasks import ingest

    rng = random.Random(3)
    pieces = ["a", " ", "   ", "\t", "\n", "\u00a0", "e\u0301", "x" * 40]
    rows = []
    for i in range(3000):
        row = {"id": f"r{rng.randrange(2500)}", "prompt": "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 8)))}
        if i % 97 == 0:
            row["prompt"] = rng.choice([5, True, ["a"], None])
        if i % 31 == 0:
            row["system_prompt"] = "Be brief."
        rows.append(row)
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    params = IngestParams(path=str(path), max_chars=60)
    monkeypatch.setattr(ingest, "_PARALLEL_ROWS", 10**9)
    one = ingest_file(params)
    monkeypatch.setattr(ingest, "_PARALLEL_ROWS", 500)
    monkeypatch.setattr(ingest, "_cores", lambda: 4)
    assert len(ingest._row_ranges(len(rows))) == 4
    split = ingest_file(params)
    assert one.quarantine.height and one.duplicates  # the file exercises every path
    assert split.accepted.equals(one.accepted) and split.quarantine.equals(one.quarantine)
    assert split.counts == one.counts


def test_a_csv_read_with_the_wrong_separator_says_so_and_the_option_keys_only_when_set(tmp_path):
    from prefcurate.schemas.ids import content_id, file_sha256

    from prefcurate.steps.base import StageContext
    from prefcurate.steps.ingest import IngestStep
    from prefcurate.store import Store

    path = tmp_path / "semi.csv"
    path.write_text("prompt;id\nfirst prompt;1\n")
    with pytest.raises(IngestError, match="looks like a whole header line: set ingest.csv_separator"):
        ingest_file(IngestParams(path=str(path), csv_separator=","))
    assert ingest_file(IngestParams(path=str(path))).accepted["prompt"].to_list() == ["first prompt"]

    ctx = StageContext(str(Store.init(tmp_path / "ds").root), {}, "run-1")
    detected = IngestParams(path=str(path))
    (unit,) = IngestStep(detected).plan(ctx)
    # left to detection, the option is not in the key: datasets ingested before it existed stay done
    legacy = {k: v for k, v in detected.model_dump(mode="json").items() if k != "csv_separator"}
    assert unit.key == content_id("ingest", file_sha256(path), legacy)
    (explicit,) = IngestStep(IngestParams(path=str(path), csv_separator=";")).plan(ctx)
    assert explicit.key != unit.key
