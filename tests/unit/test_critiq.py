"""CritiQ-style criteria mining with scripted workers and a scripted manager."""

from __future__ import annotations

import re
import zlib

import numpy as np
import polars as pl
import pytest
from prefcurate.tasks.critiq import (
    ANSWER_A,
    ANSWER_B,
    ANSWER_ERROR,
    ANSWER_NONE,
    Criterion,
    CritiQParams,
    answers_from_probs,
    build_worker_prompt,
    criterion_accuracy,
    critiq_quality,
    judge_with_criteria,
    load_human_pairs,
    load_seed_criteria,
    majority_vote,
    mine_criteria,
    parse_proposal,
    parse_proposals,
    sanitise_line,
    split_pairs,
    train_critiq_scorer,
    vote_accuracy,
)

from tests.support.engines import ScriptedEngine

_WORKER = re.compile(
    r"aspect of (?P<name>[^?]+)\?\n(?P=name): (?P<description>.*?)\n\n\[Text A\]\n(?P<a>.*?)\n\n"
    r"\[Text B\]\n(?P<b>.*?)\n\nAnswer",
    re.DOTALL,
)

A, B, NONE = (0.9, 0.05, 0.05), (0.05, 0.9, 0.05), (0.05, 0.05, 0.9)


def world_pairs(n: int = 30) -> list[dict]:
    """Pairs of a good and a poor text; the human prefers the good one."""
    pairs = []
    for k in range(n):
        good, poor = f"good text {k} with care", f"poor text {k} carelessly"
        good_first = k % 2 == 0
        pairs.append(
            {
                "id": f"p{k}",
                "text_a": good if good_first else poor,
                "text_b": poor if good_first else good,
                "answer": "A" if good_first else "B",
            }
        )
    return pairs


def number(text: str) -> int:
    return int(re.search(r"\d+", text).group())


def scripted_worker(prompt: str, options) -> tuple[float, ...]:
    """planted: always right; contrarian*: always wrong; partial: wrong on every third pair
    until its description says REVISED; abstainer: always None; depth_*: right; others:
    a fixed coin flip per (criterion, pair)."""
    assert options == ("A", "B", "None")
    m = _WORKER.search(prompt)
    name, description, a, b = m["name"], m["description"], m["a"], m["b"]
    good_is_a = a.startswith("good")
    right, wrong = (A, B) if good_is_a else (B, A)
    if a.startswith("good") and b.startswith("good"):
        return A  # position bias on a true tie: averaging both orders cancels it
    if name == "planted" or name.startswith("depth"):
        return right
    if name.startswith("contrarian"):
        return wrong
    if name == "abstainer":
        return NONE
    if name in ("partial", "weak"):
        if "REVISED" in description:
            return right
        return wrong if number(a) % 3 == 0 else right
    coin = zlib.crc32(f"{name}{number(a)}".encode()) % 2
    return right if coin else wrong


PROPOSALS = [
    "contrarian_style: prefers the text that sounds careless and rushed.",
    "depth_of_explanation: prefers texts that explain their ideas in depth.",
    "depth_two: prefers texts that give the reasons behind their claims.",
]


def scripted_manager(request, i) -> str:
    prompt = request.prompt
    if prompt.endswith("Problem:"):
        return " The description ignores how carefully the text is written."
    if prompt.endswith("New description:"):
        return " REVISED: prefer the text written with care over a careless one.\nmore text"
    if prompt.endswith("\n-"):
        # sampling: a different unlisted proposal per sample (seed_base + sample index)
        available = [line for line in PROPOSALS if line.split(":")[0] not in prompt]
        if not available:
            return " ???"
        return " " + available[(request.params.seed % 1000) % len(available)] + "\n"
    raise AssertionError(f"unexpected manager prompt: {prompt[-80:]!r}")


class CountingEngine(ScriptedEngine):
    def __init__(self, choice_fn=scripted_worker, generate_fn=scripted_manager):
        super().__init__(choice_fn=choice_fn, generate_fn=generate_fn)
        self.batches: list[tuple[str, int]] = []

    def score_choices(self, requests):
        self.batches.append(("score_choices", len(requests)))
        return super().score_choices(requests)

    def generate(self, requests):
        self.batches.append(("generate", len(requests)))
        return super().generate(requests)


def crit(name: str, description: str = "a description of it") -> Criterion:
    return Criterion(name=name, description=description)


# ------------------------------------------------------------------ voting math


def test_answers_from_probs_argmax_ties_and_failures():
    probs = np.array(
        [
            [0.6, 0.3, 0.1],  # A
            [0.2, 0.5, 0.3],  # B
            [0.2, 0.2, 0.6],  # None
            [0.45, 0.45, 0.1],  # A/B tie -> None
            [np.nan, np.nan, np.nan],  # failed
        ]
    )
    assert answers_from_probs(probs).tolist() == [ANSWER_A, ANSWER_B, ANSWER_NONE, ANSWER_NONE, ANSWER_ERROR]


_ANSWER_LETTERS = {"A": ANSWER_A, "B": ANSWER_B, "N": ANSWER_NONE, "E": ANSWER_ERROR}


def _answers(*rows: str) -> np.ndarray:
    """An answer matrix written one row a string, one letter an answer: A, B, N (none), E (error)."""
    return np.array([[_ANSWER_LETTERS[letter] for letter in row] for row in rows])


def test_majority_vote_counts_a_and_b_and_ties_are_none():
    answers = _answers("AAB", "ABN", "NNN", "BNE", "AEE")
    verdict, votes_a, votes_b = majority_vote(answers)
    assert verdict == ["A", None, None, "B", "A"]
    assert votes_a.tolist() == [2, 1, 0, 0, 1]
    assert votes_b.tolist() == [1, 1, 0, 1, 0]
    # a tie (None) counts wrong
    assert vote_accuracy(verdict, ["A", "A", "B", "B", "B"]) == pytest.approx(2 / 5)


def test_criterion_accuracy_excludes_none_and_counts_failures_wrong():
    answers = _answers("ANB", "BNB", "EAB", "NNB")
    accuracy, answered = criterion_accuracy(answers, ["A", "B", "A", "A"])
    assert answered.tolist() == [3, 1, 4]
    assert accuracy[0] == pytest.approx(2 / 3)
    assert accuracy[1] == pytest.approx(1.0)
    assert accuracy[2] == pytest.approx(1 / 4)
    none_only, _ = criterion_accuracy(np.full((2, 1), ANSWER_NONE), ["A", "B"])
    assert none_only.tolist() == [0.0]


def test_worker_prompt_and_both_order_averaging():
    crit_x = crit("clarity", "the text is clear.")
    prompt = build_worker_prompt(crit_x, "first", "second")
    assert "Which is better in the aspect of clarity?\nclarity: the text is clear." in prompt
    assert prompt.index("[Text A]\nfirst") < prompt.index("[Text B]\nsecond")
    assert prompt.endswith("Answer:")

    # biased worker: says A 70% whatever it sees, and prefers "first" mildly
    def biased(prompt, options):
        m = _WORKER.search(prompt)
        return (0.7, 0.2, 0.1) if m["a"] == "first" else (0.6, 0.3, 0.1)

    engine = CountingEngine(choice_fn=biased)
    verdicts = judge_with_criteria(engine, [crit_x], [{"text_a": "first", "text_b": "second"}])
    assert engine.batches == [("score_choices", 2)]
    # forward (0.7, 0.2, 0.1); backward shown (second, first) -> (0.6, 0.3, 0.1) -> swapped (0.3, 0.6, 0.1)
    assert verdicts.probs[0, 0].tolist() == pytest.approx([0.5, 0.4, 0.1])
    assert verdicts.verdict == ["A"]
    one_order = judge_with_criteria(
        CountingEngine(choice_fn=biased), [crit_x], [{"text_a": "second", "text_b": "first"}],
        CritiQParams(balance_positions=False),
    )
    assert one_order.verdict == ["A"]  # position bias alone decides without balancing


# ------------------------------------------------------------------ sanitising


def test_sanitise_line_keeps_one_clean_sentence_or_rejects():
    assert sanitise_line("  - \"The text explains its steps.\"\nand more", 100) == "The text explains its steps."
    assert sanitise_line("Description: prefer precise wording always", 100) == "prefer precise wording always"
    assert sanitise_line("", 100) is None
    assert sanitise_line("\n\n  \n", 100) is None
    assert sanitise_line("ok then", 100) is None  # too short
    assert sanitise_line("!!! ??? ### $$$ %%% 123", 100) is None
    assert sanitise_line("the the the the the the the the", 100) is None
    assert sanitise_line("Text A is better than Text B here", 100) is None  # names positions
    assert sanitise_line("Text A is better than Text B here", 100, allow_positions=True)  # a critique may
    assert sanitise_line("Old description: the text is clear", 100) is None  # prompt echo
    capped = sanitise_line("word " * 100, 40)
    assert capped is None or len(capped) <= 40
    long = sanitise_line("prefer texts that " + "explain clearly and " * 20, 60)
    assert long is not None and len(long) <= 60 and not long.endswith(" ")


def test_parse_proposal():
    c = parse_proposal(" Logical Flow: ideas follow one another in a sensible order.\n- next", 200)
    assert c.name == "logical_flow" and c.description == "ideas follow one another in a sensible order."
    assert parse_proposal("no colon here at all", 200) is None
    assert parse_proposal("x: too short", 200) is None
    assert parse_proposal("a very long name with far too many words: fine description here", 200) is None
    assert parse_proposal("", 200) is None
    several = parse_proposals("\nSome remark without a colon\n- depth: explains the reasons behind claims.\n"
                              "- tone: keeps a calm and even tone.", 200)
    assert [c.name for c in several] == ["depth", "tone"]


# ------------------------------------------------------------------ mining


def test_split_pairs_is_seeded_and_disjoint():
    train, held = split_pairs(30, 0.3, seed=4)
    assert len(held) == 9 and len(train) == 21
    assert not set(train) & set(held)
    again = split_pairs(30, 0.3, seed=4)
    assert np.array_equal(train, again[0])
    assert len(split_pairs(2, 0.1, 0)[1]) == 1


def test_mining_keeps_planted_revises_partial_bans_bad_and_reports_each_step():
    engine = CountingEngine()
    kb = [
        crit("planted", "prefers the text written with care."),
        crit("partial", "prefers the text that seems fine."),
        crit("contrarian", "prefers the careless text."),
        crit("abstainer", "never sure."),
    ]
    params = CritiQParams(iterations=2, n_criteria=3, proposal_samples=2, seed=0)
    result = mine_criteria(engine, world_pairs(30), kb, params)
    rows = result.iterations

    def row(iteration, name, action):
        found = [r for r in rows if r["iteration"] == iteration and r["criterion"] == name and r["action"] == action]
        assert found, (iteration, name, action, rows)
        return found[0]

    # init: retrieve > 0.5, drop the rest, manager proposes up to n_criteria
    assert row(0, "planted", "retrieve")["accuracy"] == 1.0
    assert 0.5 < row(0, "partial", "retrieve")["accuracy"] < 0.75
    assert row(0, "contrarian", "drop")["accuracy"] == 0.0
    assert row(0, "abstainer", "drop")["answered"] == 0
    assert row(0, "contrarian_style", "propose")["description_after"].startswith("prefers the text that sounds")

    # iteration 1: keep / revise / ban (+ a replacement)
    assert row(1, "planted", "keep")["accuracy"] == 1.0
    revised = row(1, "partial", "revise")
    assert revised["description_before"] == "prefers the text that seems fine."
    assert revised["description_after"].startswith("REVISED")
    assert "more text" not in revised["description_after"]  # one line only
    assert row(1, "contrarian_style", "ban")["accuracy"] == 0.0
    assert row(1, "depth_of_explanation", "propose")

    # iteration 2: the revision and the replacement now pass
    assert row(2, "partial", "keep")["accuracy"] == 1.0
    assert row(2, "depth_of_explanation", "keep")["accuracy"] == 1.0
    assert {r["criterion"] for r in rows if r["iteration"] == 3} == {"planted", "partial", "depth_of_explanation"}

    names = {c.name for c in result.criteria}
    assert names == {"planted", "partial", "depth_of_explanation"}
    partial = next(c for c in result.criteria if c.name == "partial")
    assert partial.description.startswith("REVISED") and partial.accuracy == 1.0
    assert "contrarian_style" in result.banned
    assert not result.fallback_used
    assert result.n_train == 21 and result.n_heldout == 9
    assert result.heldout_accuracy == 1.0
    assert all(0.0 <= a <= 1.0 for a in result.heldout_per_criterion.values())
    assert [s["iteration"] for s in result.summaries] == [0, 1, 2, 3]

    md = result.report_markdown
    for text in ("## Init (knowledge base)", "## Iteration 1", "## Iteration 2", "## Final evaluation",
                 "| partial |", "revise", "ban", "propose", "keep", "Held-out accuracy"):
        assert text in md
    assert "Fallback" not in md

    # each step is one batch: worker judgments in one score_choices, manager calls in one
    # generate per kind (critiques, rewrites, proposals)
    kinds = [k for k, _ in engine.batches]
    assert kinds.count("score_choices") <= params.iterations + 3
    assert kinds.count("generate") <= 3 * params.iterations + 1


def test_unchanged_criteria_are_not_judged_again():
    engine = CountingEngine()
    kb = [crit("planted", "prefers the text written with care.")]
    mine_criteria(engine, world_pairs(12), kb, CritiQParams(iterations=3, n_criteria=1))
    # init judges it once; iterations and the final evaluation reuse it; held-out judges once
    assert [k for k, _ in engine.batches] == ["score_choices", "score_choices"]


def test_fallback_to_best_k_when_nothing_reaches_the_keep_threshold():
    def garbage_manager(request, i):
        return "  \n" if i % 2 else "$$$ ### !!!"

    engine = CountingEngine(generate_fn=garbage_manager)
    kb = [
        crit("weak", "prefers the text that seems fine."),
        crit("coin", "prefers one at random."),
        crit("contrarian", "prefers the careless text."),
    ]
    params = CritiQParams(iterations=2, n_criteria=3, fallback_k=2, seed=1)
    result = mine_criteria(engine, world_pairs(30), kb, params)
    assert result.fallback_used
    assert result.criteria and len(result.criteria) <= 2
    assert result.criteria[0].name == "weak"
    assert all(c.accuracy < 0.75 for c in result.criteria)
    assert "**Fallback:**" in result.report_markdown
    rewrites = [r for r in result.iterations if r["action"] == "revise" and r["criterion"] == "weak"]
    assert rewrites and all(r["description_after"] == r["description_before"] for r in rewrites)
    assert all("rewrite rejected" in r["note"] for r in rewrites)
    failed = [r for r in result.iterations if r["action"] == "propose" and r["criterion"] is None]
    assert failed and "usable" in failed[0]["note"]
    assert 0.0 <= result.heldout_accuracy <= 1.0


def test_empty_knowledge_base_starts_from_proposals():
    result = mine_criteria(CountingEngine(), world_pairs(20), [], CritiQParams(iterations=1, n_criteria=2))
    proposed = [r["criterion"] for r in result.iterations if r["action"] == "propose" and r["iteration"] == 0]
    assert proposed == ["contrarian_style", "depth_of_explanation"]
    # the contrarian proposal is banned in iteration 1, its replacement passes the final evaluation
    assert result.banned == ["contrarian_style"]
    assert {c.name for c in result.criteria} == {"depth_of_explanation", "depth_two"}


def test_bad_human_pairs_are_rejected():
    with pytest.raises(ValueError, match="A or B"):
        mine_criteria(CountingEngine(), [{"text_a": "x", "text_b": "y", "answer": "C"}] * 3, [])
    with pytest.raises(ValueError, match="answer"):
        mine_criteria(CountingEngine(), [{"text_a": "x", "text_b": "y"}] * 3, [])


def test_bundled_files_load():
    pairs = load_human_pairs()
    assert pairs.height >= 20 and set(pairs["answer"]) <= {"A", "B"}
    kb = load_seed_criteria()
    assert len(kb) >= 5 and all(c.description for c in kb)


def test_human_pairs_file_of_any_ingest_format(tmp_path):
    bundled = load_human_pairs()
    as_csv = tmp_path / "pairs.csv"
    bundled.select("id", "text_a", "text_b", "answer").write_csv(as_csv, separator=";")
    again = load_human_pairs(as_csv)
    assert again.select("text_a", "text_b", "answer").equals(bundled.select("text_a", "text_b", "answer"))
    broken = tmp_path / "pairs.jsonl"
    broken.write_text('{"text_a": "x", "text_b": "y", "answer": "A"}\n{"text_a": "x", \n')
    with pytest.raises(ValueError, match="record 2: malformed JSON"):
        load_human_pairs(broken)


# ------------------------------------------------------------------ scorer


def test_critiq_scorer_learns_from_voted_pairs_and_drops_ties():
    pytest.importorskip("prefcurate.tasks.scorer")
    rng = np.random.default_rng(0)
    care = rng.normal(size=8)

    def embed(texts):
        out = rng.normal(scale=0.3, size=(len(texts), 8))
        goodness = np.array([1.0 if t.startswith("good") else -1.0 for t in texts])
        return (out + goodness[:, None] * care).astype(np.float32)

    pairs = world_pairs(40) + [
        {"text_a": f"good text {k} with care", "text_b": f"good text {k + 1} with care"} for k in range(0, 10, 2)
    ]
    criteria = [crit("planted", "care"), crit("depth_x", "depth"), crit("contrarian", "careless")]
    scorer, texts, report = train_critiq_scorer(
        CountingEngine(), criteria, pairs, CritiQParams(scorer={"epochs": 60}), embed_fn=embed
    )
    assert report.judged_pairs == 45
    assert report.tie_pairs == 5  # good-vs-good: every criterion answers None
    assert report.training_pairs == 40
    assert len(texts) == 80  # distinct texts (the good-vs-good pairs reuse world texts)
    assert report.scorer["heldout_accuracy"] is not None and report.scorer["heldout_accuracy"] >= 0.9
    test_texts = [f"good text {k} with care" for k in range(100, 110)] + [
        f"poor text {k} carelessly" for k in range(100, 110)
    ]
    rows = critiq_quality(scorer, [f"t{k}" for k in range(20)], embed(test_texts), "response")
    assert rows["method"].unique().to_list() == ["critiq"]
    scores = rows["score"].to_numpy()
    assert scores[:10].min() > scores[10:].max()


def test_no_knowledge_base_given_uses_the_bundled_one():
    result = mine_criteria(CountingEngine(), world_pairs(12), None, CritiQParams(iterations=1, n_criteria=2))
    judged = {r["criterion"] for r in result.iterations if r["iteration"] == 0 and r["action"] in ("retrieve", "drop")}
    assert judged == {c.name for c in load_seed_criteria()}
    assert sum(r["action"] == "retrieve" for r in result.iterations if r["iteration"] == 0) <= 2


def test_a_dead_engine_stops_mining_instead_of_scoring_zeros():
    from prefcurate.inference.base import ChoiceScore, InferenceError

    class Dead(CountingEngine):
        def score_choices(self, requests):
            return [ChoiceScore((), error="engine died") for _ in requests]

    with pytest.raises(InferenceError, match="engine died"):
        mine_criteria(Dead(), world_pairs(10), [crit("planted")], CritiQParams(iterations=1, n_criteria=1))


def test_a_proposal_copying_an_existing_description_is_not_taken():
    def copycat(request, i):
        return (
            " fresh_name: prefers the text written with care.\n"
            "- near_copy: prefers the text written with much care.\n"
            "- other_name: looks at the examples given.\n"
        )

    engine = CountingEngine(generate_fn=copycat)
    kb = [crit("planted", "prefers the text written with care.")]
    result = mine_criteria(engine, world_pairs(12), kb, CritiQParams(iterations=1, n_criteria=2))
    proposed = [r["criterion"] for r in result.iterations if r["action"] == "propose" and r["iteration"] == 0]
    assert proposed == ["other_name"]


def test_the_score_stage_trains_a_critiq_scorer_next_to_qurating(tmp_path):
    """tasks.score.fit_quality_models with CritiQ on: criteria mined from the human pairs, a
    scorer trained on the unlabelled pairs, scored as its own (critiq, critiq) column."""
    pytest.importorskip("prefcurate.tasks.scorer")
    import json

    from prefcurate.tasks.score import ScoreParams, fit_quality_models

    rng = np.random.default_rng(0)
    care = rng.normal(size=8)

    def embed(texts):
        goodness = np.array([1.0 if t.startswith("good") else -1.0 for t in texts])
        return (rng.normal(scale=0.3, size=(len(texts), 8)) + goodness[:, None] * care).astype(np.float32)

    human = tmp_path / "human.jsonl"
    human.write_text("".join(json.dumps(pair) + "\n" for pair in world_pairs(12)))
    seeds = tmp_path / "seeds.yaml"
    seeds.write_text("- {name: planted, description: care}\n")
    params = ScoreParams.model_validate({
        "qurating": {"sample_size": 6, "pairs_per_item": 2, "train_scorer": False},
        "critiq": {"enabled": True, "human_pairs": str(human), "seed_criteria": str(seeds),
                   "params": {"iterations": 1, "n_criteria": 1, "scorer": {"epochs": 60}}},
    })
    texts = [f"good text {k} with care" for k in range(3)] + [f"poor text {k} carelessly" for k in range(3)]
    unlabelled = pl.DataFrame({"text_a": [p["text_a"] for p in world_pairs(30)[12:]],
                               "text_b": [p["text_b"] for p in world_pairs(30)[12:]]})
    qurating_judge = ScriptedEngine(choice_fn=lambda prompt, options: [0.5] * len(options))
    models = fit_quality_models([f"i{k}" for k in range(6)], texts, embed(texts), unlabelled, params,
                                qurating_judge, CountingEngine(), embed_fn=embed)
    assert models.methods == [("critiq", "critiq")]
    assert models.report["critiq"]["criteria"] == ["planted"]
    assert models.report["critiq"]["scorer"]["training_pairs"] == 18
    scores = models.score(embed(texts))[:, 0]
    assert scores[:3].min() > scores[3:].max()
    frames = models.quality_frames(pl.Series([f"i{k}" for k in range(6)]), models.score(embed(texts)))
    assert [frame["method"].unique().to_list() for frame in frames[1:]] == [["critiq"]]


@pytest.mark.parametrize("kb_names", [["planted", "partial", "contrarian", "abstainer"], []])
def test_the_estimate_bounds_the_requests_mining_makes(tmp_path, kb_names):
    """`prefcurate estimate`'s CritiQ rows are an upper bound of what mining asks for."""
    import json

    import yaml
    from prefcurate.tasks.estimate import _add_critiq
    from prefcurate.tasks.score import CritiQStageParams

    descriptions = {"planted": "prefers the text written with care.", "partial": "prefers the text that seems fine.",
                    "contrarian": "prefers the careless text.", "abstainer": "never sure."}
    kb = [crit(name, descriptions[name]) for name in kb_names]
    pairs = world_pairs(30)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (tmp_path / "kb.yaml").write_text(yaml.safe_dump([{"name": c.name, "description": c.description} for c in kb]))
    params = CritiQParams(iterations=2, n_criteria=3, proposal_samples=2, seed=0)
    engine = CountingEngine()
    mine_criteria(engine, load_human_pairs(tmp_path / "pairs.jsonl"), kb, params)
    asked = {kind: sum(n for k, n in engine.batches if k == kind) for kind in ("score_choices", "generate")}
    rows = {}
    stage = CritiQStageParams(enabled=True, human_pairs=str(tmp_path / "pairs.jsonl"),
                              seed_criteria=str(tmp_path / "kb.yaml"), params=params)
    _add_critiq(lambda stage, pool, what, requests, chars, tokens: rows.update({what: requests}), stage, 200.0)
    mining = next(v for k, v in rows.items() if k.startswith("CritiQ workers: criteria"))
    manager = next(v for k, v in rows.items() if k.startswith("CritiQ manager"))
    assert asked["score_choices"] > 0 and asked["generate"] > 0
    assert asked["score_choices"] <= mining and asked["generate"] <= manager
