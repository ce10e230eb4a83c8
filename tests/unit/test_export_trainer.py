"""Exports a trainer can trust: integrity against the real tokenizer, formats, card statistics."""

from __future__ import annotations

import json

import polars as pl
import pytest
from prefcurate.tasks.export import (
    EMPTY_AFTER_TRUNCATION,
    IDENTICAL_AFTER_TRUNCATION,
    LLAMAFACTORY_DATASET,
    PROMPT_FILLS_BUDGET,
    check_integrity,
    export_curated,
    judge_agreement,
    length_bias,
    load_tokenizer,
)
from prefcurate.tasks.export_config import IntegrityParams

from prefcurate.inference.models import default_model_dir, is_prepared

needs_tokenizer = pytest.mark.skipif(not is_prepared(default_model_dir()),
                                     reason="the embedded model is not prepared (prefcurate models prepare)")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("default")


def _pairs() -> pl.DataFrame:
    shared = "The answer is " + "very " * 100
    return pl.DataFrame({
        "pair_id": ["ok", "long_prompt", "same_start", "empty"],
        "prompt_id": ["p1", "p2", "p3", "p4"],
        "prompt": ["Say hi.", "word " * 400, "Explain.", "Answer."],
        "system_prompt": ["Be kind.", None, None, None],
        "chosen": ["Hi there!", "yes", shared + "right.", "Something."],
        "rejected": ["Go away.", "no", shared + "wrong.", ""],
        "chosen_id": ["c1", "c2", "c3", "c4"],
        "rejected_id": ["r1", "r2", "r3", "r4"],
    })


@needs_tokenizer
def test_integrity_finds_what_truncation_would_break(tokenizer):
    checked = check_integrity(_pairs(), tokenizer, max_length=64, max_prompt_length=None)
    issues = dict(zip(checked["pair_id"], checked["integrity_issue"]))
    # 400 words alone exceed 64 tokens; 100 shared "very" fill the completions' budget
    assert issues == {"ok": None, "long_prompt": PROMPT_FILLS_BUDGET, "same_start": IDENTICAL_AFTER_TRUNCATION,
                      "empty": EMPTY_AFTER_TRUNCATION}
    # a larger budget keeps the distinguishing tail; max_prompt_length leaves room after a long prompt
    relaxed = check_integrity(_pairs(), tokenizer, max_length=512, max_prompt_length=128)
    assert dict(zip(relaxed["pair_id"], relaxed["integrity_issue"])) == {
        "ok": None, "long_prompt": None, "same_start": None, "empty": EMPTY_AFTER_TRUNCATION}
    assert relaxed.filter(pl.col("pair_id") == "long_prompt")["prompt_tokens"][0] == 128


@needs_tokenizer
def test_drop_and_flag_write_reasons_to_the_drop_file_and_the_card(tmp_path, tokenizer):
    params = IntegrityParams(max_length=64, max_prompt_length=None)
    written, counts = export_curated(_pairs(), tmp_path / "drop", integrity=params, tokenizer=tokenizer, plots=False,
                                     trainer_formats=["trl_conversational", "llamafactory_ranking"])
    assert counts["exported"] == 1 and counts["dropped"] == 3
    dropped = pl.read_ndjson(written["dropped"])
    assert dict(zip(dropped["pair_id"], dropped["reason"])) == {
        "long_prompt": PROMPT_FILLS_BUDGET, "same_start": IDENTICAL_AFTER_TRUNCATION, "empty": EMPTY_AFTER_TRUNCATION}
    card = written["card"].read_text()
    assert "3 of 4 pairs failed and were dropped" in card and f"| {IDENTICAL_AFTER_TRUNCATION} | 1 |" in card
    assert pl.read_ndjson(written["jsonl"])["pair_id"].to_list() == ["ok"]
    flagged, counts = export_curated(_pairs(), tmp_path / "flag", integrity=params.model_copy(update={"action": "flag"}),
                                     tokenizer=tokenizer, plots=False)
    rows = pl.read_ndjson(flagged["jsonl"])
    assert counts["exported"] == 4 and rows["integrity_issue"].null_count() == 1


def test_trainer_formats_carry_the_system_prompt_and_load(tmp_path):
    written, _ = export_curated(_pairs(), tmp_path, plots=False,
                                trainer_formats=["trl_conversational", "llamafactory_ranking"])
    first = json.loads(written["trl_conversational"].read_text().splitlines()[0])
    assert first["prompt"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hi."}]
    assert first["chosen"] == [{"role": "assistant", "content": "Hi there!"}]
    assert first["rejected"] == [{"role": "assistant", "content": "Go away."}]
    second = json.loads(written["trl_conversational"].read_text().splitlines()[1])
    assert [m["role"] for m in second["prompt"]] == ["user"]
    ranking = json.loads(written["llamafactory_ranking"].read_text())
    assert ranking[0] == {"instruction": "Say hi.", "input": "", "chosen": "Hi there!", "rejected": "Go away.",
                          "system": "Be kind."}
    info = json.loads(written["llamafactory_info"].read_text())[LLAMAFACTORY_DATASET]
    assert info["ranking"] is True and info["file_name"] == written["llamafactory_ranking"].name
    assert set(info["columns"].values()) <= set(ranking[0])
    from datasets import load_dataset

    conversational = load_dataset("json", data_files=str(written["trl_conversational"]), split="train")
    assert conversational[0]["prompt"][1]["content"] == "Say hi." and len(conversational) == 4
    card = written["card"].read_text()
    assert "TRL preference, conversational" in card and f"dataset: {LLAMAFACTORY_DATASET}" in card
    assert "Not checked" in card  # no integrity parameters given: the card says so


def test_card_statistics_length_bias_judge_agreement_and_single_order():
    pairs = pl.DataFrame({"prompt_id": ["p1", "p2", "p3", "p4"], "chosen_id": ["a1", "b2", "a3", "a4"],
                          "rejected_id": ["b1", "a2", "b3", "b4"],
                          "chosen": ["long " * 10, "x", "yy", "zzz"], "rejected": ["s", "x", "yy", "zzz"]})
    assert length_bias(pairs, 1.5)["chosen_longer_share"] == 0.25
    judgments = pl.DataFrame({
        "prompt_id": ["p1", "p1", "p2", "p2", "p3", "p9"],
        "response_a": ["a1", "a1", "a2", "a2", "a3", "a9"], "response_b": ["b1", "b1", "b2", "b2", "b3", "b9"],
        "judge": ["x", "y", "x", "y", "x", "x"],
        "p_a": [0.9, 0.6, 0.2, 0.5, 0.3, 0.9],
        "p_first_ab": [0.9, 0.6, 0.2, None, 0.3, 0.9], "p_first_ba": [0.1, None, 0.8, 0.5, None, 0.1],
    })
    stats = judge_agreement(pairs, judgments)
    # p2's chosen is b2 (the canonical b): x's p_a 0.2 is a vote for it; y's 0.5 is a tie
    assert stats["judges"]["x"] == {"pairs": 3, "for_chosen": pytest.approx(2 / 3), "against": pytest.approx(1 / 3),
                                    "tie": 0.0, "both_orders_share": pytest.approx(2 / 3)}
    assert stats["judges"]["y"]["tie"] == 0.5 and stats["judges"]["y"]["both_orders_share"] == 0.0
    assert stats["judged_pairs"] == 3 and stats["single_order_share"] == pytest.approx(1 / 3)  # p3 only


def test_integrity_params_refuse_a_prompt_budget_above_the_total():
    with pytest.raises(ValueError, match="exceeds max_length"):
        IntegrityParams(max_length=128, max_prompt_length=256)


@needs_tokenizer
def test_a_chat_template_counts_the_prompt_as_the_trainer_renders_it(tokenizer):
    frame = _pairs().head(1)
    plain = check_integrity(frame, tokenizer, max_length=64)["prompt_tokens"][0]
    saved = tokenizer.chat_template
    tokenizer.chat_template = ("{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n"
                               "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    try:
        templated = check_integrity(frame, tokenizer, max_length=64)["prompt_tokens"][0]
        # the turn markers count: a prompt that fits as plain text may not once templated
        assert templated > plain
        assert check_integrity(frame, tokenizer, max_length=templated + 1)["integrity_issue"][0] == PROMPT_FILLS_BUDGET
    finally:
        tokenizer.chat_template = saved


GEMMA_LIKE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}"
    "{% endif %}<start_of_turn>{{ m.role }}\n{{ m.content | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _tokenizer_folder(tmp_path, **config):
    folder = tmp_path / "tok"
    folder.mkdir(parents=True)
    (folder / "tokenizer.json").symlink_to(default_model_dir() / "tokenizer.json")
    base = json.loads((default_model_dir() / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**base, **config}))
    return folder


@needs_tokenizer
def test_the_token_counter_encodes_and_renders_as_transformers_does(tmp_path):
    from prefcurate.tasks.export import TokenCounter
    from transformers import AutoTokenizer

    folder = _tokenizer_folder(tmp_path, chat_template=GEMMA_LIKE_TEMPLATE)
    counter = load_tokenizer(str(folder))
    assert isinstance(counter, TokenCounter)
    reference = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    texts = ["Say hi.", "  two  spaces\tand a tab\n\nand lines  ", "ünïcödé 漢字 🙂 naïve café", "",
             "<start_of_turn>user\nmarkers<end_of_turn>", "<bos>special<eos> tokens", "def f(x):\n    return x ** 2\n"]
    for special in (False, True):
        assert counter(texts, add_special_tokens=special)["input_ids"] == \
            reference(texts, add_special_tokens=special)["input_ids"]
    assert (counter.bos_token_id, counter.eos_token_id) == (reference.bos_token_id, reference.eos_token_id)
    conversations = [[{"role": "user", "content": " hello "}], [{"role": "user", "content": "a\nb"}]]
    assert counter.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True) == \
        reference.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
    # a template that refuses the system role raises, so the check counts the plain text instead
    with pytest.raises(Exception, match="no system role"):
        counter.apply_chat_template([[{"role": "system", "content": "x"}]], add_generation_prompt=True)
    frame = _pairs()
    assert check_integrity(frame, counter, max_length=64).equals(check_integrity(frame, reference, max_length=64))


@needs_tokenizer
def test_folders_the_token_counter_cannot_read_whole_go_to_transformers(tmp_path):
    from prefcurate.tasks.export import TokenCounter

    assert TokenCounter.from_folder(_tokenizer_folder(tmp_path, auto_map={"AutoTokenizer": "x.Y"})) is None
    named = _tokenizer_folder(tmp_path / "named", chat_template=[{"name": "default", "template": "{{ 1 }}"}])
    assert TokenCounter.from_folder(named) is None
    unsaid = tmp_path / "unsaid" / "tok"
    unsaid.mkdir(parents=True)
    (unsaid / "tokenizer.json").symlink_to(default_model_dir() / "tokenizer.json")
    (unsaid / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    assert TokenCounter.from_folder(unsaid) is None
    assert type(load_tokenizer(str(unsaid))).__name__ == "GemmaTokenizer"
    # a template in its own file is read like the config's
    separate = _tokenizer_folder(tmp_path / "separate")
    (separate / "chat_template.jinja").write_text(GEMMA_LIKE_TEMPLATE)
    assert TokenCounter.from_folder(separate).chat_template == GEMMA_LIKE_TEMPLATE


@needs_tokenizer
def test_integrity_encodes_in_chunks_with_the_same_result(tokenizer, monkeypatch):
    from prefcurate.tasks import export

    frame = pl.concat([_pairs().with_columns(pl.col("pair_id") + f"-{k}") for k in range(3)])
    whole = check_integrity(frame, tokenizer, max_length=64)
    monkeypatch.setattr(export, "ENCODE_CHUNK", 5)  # chunks that cut the repeats at other rows each time
    chunked = check_integrity(frame, tokenizer, max_length=64)
    assert chunked.equals(whole)
    assert chunked["integrity_issue"].to_list() == [None, PROMPT_FILLS_BUDGET, IDENTICAL_AFTER_TRUNCATION,
                                                    EMPTY_AFTER_TRUNCATION] * 3
