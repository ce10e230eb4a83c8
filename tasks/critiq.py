"""CritiQ-style mining of data-quality criteria from a few human-labelled pairs.

Method (CritiQ; public code KYLN24/CritiQ), as we implement it:

- Worker: one judgment per (pair, criterion): "Which is better in the aspect of
  {criterion}?", the criterion's description, both texts, answer A, B or None (not
  applicable, same, unsure). CritiQ parses a JSON answer from a chat model; we read the
  next-token probabilities of the three options with ``score_choices`` (no parse
  failures, one decode step), so it runs on the embedded 270M base model. Each pair is
  shown in both orders and the two probability vectors are averaged with A/B swapped back
  (balanced position calibration; ``balance_positions``), then the largest option is the
  answer; an exact A/B tie is None. CritiQ instead shows each training pair once in a
  random order.
- The worker prompt ends "Answer:" and the options are the bare tokens "A", "B", "None".
  Measured on the embedded 270M base model (8 bundled human pairs, both orders, with
  transformers): this ending agreed with the humans on 7/8 pairs with a first-position
  share of 0.60, against 5/8 (0.67) for the options " A"/" B" with a leading space and 4/8
  (0.90) for an "Answer: [[" cue. Small numbers; the choice is the least position-biased.
- A criterion's accuracy excludes its None answers (a failed request counts as wrong);
  no correct answer at all is accuracy 0, as in their evaluator. Verdict over criteria:
  count A and B answers, the larger wins, a tie is None and counts wrong.
- Flow: the human pairs are split into training and held-out pairs. The seed knowledge
  base is evaluated on the training pairs; those with accuracy > 0.5 are kept, the best
  ``n_criteria``; when fewer, the manager proposes more. Then, for a fixed number of
  iterations: evaluate the working set; accuracy >= 0.75 keep; between 0.5 and 0.75 the
  manager critiques each wrong case (up to ``max_reflection_cases``) and rewrites the
  description (reflection); <= 0.5 ban the criterion and propose replacements up to
  ``n_criteria``. After the last iteration the working set is evaluated once more. The
  final set is every criterion ever seen (best-scoring version per name) with accuracy
  >= 0.75. When none reaches it (likely with a small base model) we fall back to the
  best ``fallback_k`` and the report says so.
- Prompts: the worker's and the manager's are versioned templates
  (``prefcurate/templates/critiq_*_v1.txt``, or the user's files via ``*_template``); their
  text enters the score stage's key (:func:`inputs_hash`). The worker's both orders go
  through the both-orders primitive of ``tasks/judge_modes.py``.
- Manager: CritiQ's manager is a chat model answering JSON. Ours uses completion-style
  prompts that end where the wanted line starts ("- name:", "Problem:", "{name}:"), so a
  base model continues them; outputs are sanitised (first line, stripped, length cap,
  garbage rejected) and a rejected rewrite keeps the previous description.
- Judgments are memoised per (name, description): a criterion that did not change is not
  judged again, which keeps the reported accuracies of one description identical.
- Scorer: workers label unlabelled pairs with the final criteria (ties dropped); a small
  pairwise scorer over text embeddings is trained with -log sigmoid(r_chosen -
  r_rejected) (``tasks/scorer.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from prefcurate.tasks.ingest import read_records, record_format
from prefcurate.tasks.judge_modes import ask_both_orders
from prefcurate.tasks.qurating import NonBlank, make_excerpts
from pydantic import BaseModel, ConfigDict, Field, model_validator

from prefcurate.errors import InputError
from prefcurate.inference.base import Engine, GenerateRequest, InferenceError, SamplingParams
from prefcurate.templates import Template, load_template

WORKER_OPTIONS = ("A", "B", "None")
ANSWER_A, ANSWER_B, ANSWER_NONE, ANSWER_ERROR = 0, 1, 2, -1

DATA_DIR = Path(str(resources.files("prefcurate.data")))
DEFAULT_HUMAN_PAIRS = DATA_DIR / "critiq_pairs.jsonl"
DEFAULT_SEED_CRITERIA = DATA_DIR / "critiq_criteria.yaml"

#: the prompts, as versioned templates (prefcurate/templates/): role -> (default, kind)
TEMPLATE_ROLES: dict[str, tuple[str, str]] = {
    "worker": ("critiq_worker_v1", "critiq_worker"),
    "propose": ("critiq_propose_v1", "critiq_propose"),
    "critique": ("critiq_critique_v1", "critiq_critique"),
    "rewrite": ("critiq_rewrite_v1", "critiq_rewrite"),
}


class Criterion(BaseModel):
    """A natural-language quality criterion; ``accuracy`` on the training pairs once judged."""

    model_config = ConfigDict(extra="forbid")

    name: NonBlank = Field(min_length=1)
    description: NonBlank = Field(min_length=1)
    accuracy: float | None = None


class CritiQParams(BaseModel):
    """Parameters of criteria mining (CritiQ's defaults where they have one)."""

    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(2, ge=1, description="optimisation iterations after the init step")
    n_criteria: int = Field(10, ge=1, description="size of the working set (CritiQ: 10)")
    keep_threshold: float = Field(0.75, gt=0.0, le=1.0, description="accuracy >= this: keep")
    ban_threshold: float = Field(0.5, ge=0.0, lt=1.0, description="accuracy <= this: ban")
    kb_min_accuracy: float = Field(0.5, ge=0.0, lt=1.0, description="seed criteria kept when accuracy > this")
    heldout_fraction: float = Field(0.3, ge=0.0, lt=1.0, description="human pairs held out for the final accuracy")
    fallback_k: int = Field(3, ge=1, description="best-k kept when no criterion reaches keep_threshold")
    balance_positions: bool = Field(True, description="judge both orders and average (else one order)")
    excerpt_chars: int = Field(1200, ge=50, description="longest text shown to a worker, in characters")
    manager_excerpt_chars: int = Field(300, ge=50, description="longest text shown to the manager")
    manager_examples: int = Field(2, ge=0, description="human pairs shown when proposing criteria")
    max_reflection_cases: int = Field(3, ge=1, description="wrong cases critiqued per revised criterion")
    proposal_samples: int = Field(3, ge=1, description="manager samples drawn per criterion needed")
    rewrite_samples: int = Field(3, ge=1, description="rewrites sampled per revised criterion; the first usable one wins")
    description_max_chars: int = Field(240, ge=20, description="cap on a (rewritten) description")
    manager_max_tokens: int = Field(64, ge=8)
    manager_temperature: float = Field(0.7, ge=0.0)
    manager_chat: bool = Field(False, description="send manager prompts through the chat template")
    worker_template: str = Field(TEMPLATE_ROLES["worker"][0], description="worker prompt (template name or .txt)")
    propose_template: str = Field(TEMPLATE_ROLES["propose"][0], description="manager: propose criteria")
    critique_template: str = Field(TEMPLATE_ROLES["critique"][0], description="manager: critique a wrong case")
    rewrite_template: str = Field(TEMPLATE_ROLES["rewrite"][0], description="manager: rewrite a description")
    scorer: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides of tasks/scorer.py ScorerParams for train_critiq_scorer "
        "(a dict so that loading a config does not import torch)",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _ordered_thresholds(self) -> CritiQParams:
        if not self.ban_threshold < self.keep_threshold:
            raise ValueError("ban_threshold must be below keep_threshold")
        critiq_templates(self)  # a bad template fails when the config loads
        return self


def critiq_templates(params: CritiQParams | None = None) -> dict[str, Template]:
    """The worker and manager prompts of ``params`` (role -> template), read from their
    files now."""
    params = params or CritiQParams()
    return {role: load_template(getattr(params, f"{role}_template"), kind)
            for role, (_, kind) in TEMPLATE_ROLES.items()}


# --------------------------------------------------------------------------- data files


def inputs_hash(
    human_pairs: str | Path | None = None,
    seed_criteria: str | Path | None = None,
    params: CritiQParams | None = None,
) -> str:
    """Hash of what CritiQ's mining reads besides its parameters: the manager and worker
    prompt templates of ``params`` and the human pairs and seed criteria files (contents,
    so an in-place edit counts). It enters the score stage's unit key. The short inline
    phrases ``_Miner`` adds to the manager prompt are not in it: they are code, and a code
    change re-keys nothing."""
    from prefcurate.schemas.ids import content_id, file_sha256

    files = []
    for field_name, path, default in (("human_pairs", human_pairs, DEFAULT_HUMAN_PAIRS),
                                      ("seed_criteria", seed_criteria, DEFAULT_SEED_CRITERIA)):
        path = Path(path).expanduser() if path is not None else default
        if not path.is_file():
            raise FileNotFoundError(f"score.critiq.{field_name}: {path} is not a file")
        files.append(file_sha256(path))
    texts = {role: template.text for role, template in critiq_templates(params).items()}
    return content_id("critiq-inputs", texts["worker"], _FORMAT_EXAMPLES, texts["propose"],
                      texts["critique"], texts["rewrite"], files)


def load_human_pairs(path: str | Path | None = None) -> pl.DataFrame:
    """The human-labelled pairs ({"id", "text_a", "text_b", "answer": "A"|"B"} records), read
    as ingest reads files: JSONL (by default, whatever the suffix), a JSON array, CSV, TSV or
    Parquet, ``.gz`` too. Mining needs every pair, so a record that cannot be read stops it
    with its record number."""
    path = Path(path) if path is not None else DEFAULT_HUMAN_PAIRS
    records, unreadable = read_records(path, record_format(path) or "jsonl")
    if unreadable.height:
        raise InputError(f"score.critiq.human_pairs {path}: " + "; ".join(unreadable["message"].head(3))
                         + (f" (and {unreadable.height - 3} more)" if unreadable.height > 3 else ""))
    return as_pairs_frame(records.drop("source_record"), require_answer=True)


def load_seed_criteria(path: str | Path | None = None) -> list[Criterion]:
    """The seed knowledge base of criteria (YAML list of {name, description})."""
    import yaml

    path = Path(path) if path is not None else DEFAULT_SEED_CRITERIA
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    if isinstance(data, dict):  # also accept {criteria: [...]} or {name: description}
        data = data.get("criteria", [{"name": k, "description": v} for k, v in data.items()])
    return [Criterion(name=str(d["name"]), description=str(d["description"])) for d in data]


def as_pairs_frame(pairs: Any, require_answer: bool = False) -> pl.DataFrame:
    """Normalise pairs (a frame, or dicts with text_a/text_b[/answer][/id]) to a frame."""
    frame = pairs if isinstance(pairs, pl.DataFrame) else pl.DataFrame(list(pairs))
    missing = {"text_a", "text_b"} - set(frame.columns)
    if missing:
        raise ValueError(f"pairs lack columns {sorted(missing)}")
    if "id" not in frame.columns:
        frame = frame.with_row_index("id").with_columns(pl.col("id").cast(pl.String))
    if require_answer:
        if "answer" not in frame.columns:
            raise ValueError("human pairs need an 'answer' column (A or B)")
        answers = frame["answer"].cast(pl.String).str.strip_chars().str.to_uppercase()
        bad = frame.filter(~answers.is_in(["A", "B"]))
        if bad.height:
            raise ValueError(f"answers must be A or B; bad rows: {bad['id'].to_list()[:5]}")
        frame = frame.with_columns(answer=answers)
    return frame.with_columns(pl.col("text_a", "text_b").cast(pl.String).fill_null(""))


# --------------------------------------------------------------------------- worker

def build_worker_prompt(
    criterion: Criterion, text_a: str, text_b: str, template: str = TEMPLATE_ROLES["worker"][0]
) -> str:
    """CritiQ's worker question, completion-style: ends where "A", "B" or "None" is due."""
    return load_template(template, "critiq_worker").render(
        name=criterion.name,
        description=criterion.description,
        text_a=text_a.strip(),
        text_b=text_b.strip(),
    )


@dataclass
class CriteriaVerdicts:
    """Worker answers for pairs x criteria, and the majority verdict per pair.

    ``probs`` [pairs, criteria, 3]: P(A), P(B), P(None) in the pair's own orientation
    (A = text_a), averaged over both orders when balanced; ``answers`` [pairs, criteria]:
    0 = A, 1 = B, 2 = None, -1 = failed request; ``verdict``: "A", "B" or None (tie).
    """

    criteria: list[str]
    probs: np.ndarray
    answers: np.ndarray
    votes_a: np.ndarray
    votes_b: np.ndarray
    verdict: list[str | None]

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "pair_index": np.arange(len(self.verdict), dtype=np.int64),
                "verdict": pl.Series(self.verdict, dtype=pl.String),
                "votes_a": self.votes_a.astype(np.int64),
                "votes_b": self.votes_b.astype(np.int64),
            }
        )


def answers_from_probs(probs: np.ndarray) -> np.ndarray:
    """Largest of P(A), P(B), P(None); an exact A/B tie is None; NaN (failed) is -1."""
    probs = np.asarray(probs, dtype=np.float64)
    failed = ~np.isfinite(probs).all(axis=-1)
    answers = np.argmax(np.where(np.isfinite(probs), probs, -1.0), axis=-1).astype(np.int8)
    tie = np.isclose(probs[..., 0], probs[..., 1], rtol=0.0, atol=1e-12) & (answers != ANSWER_NONE)
    answers[tie] = ANSWER_NONE
    answers[failed] = ANSWER_ERROR
    return answers


def majority_vote(answers: np.ndarray) -> tuple[list[str | None], np.ndarray, np.ndarray]:
    """CritiQ's verdict over criteria: count A and B answers; more wins; a tie is None."""
    answers = np.asarray(answers).reshape(len(answers), -1)
    votes_a = (answers == ANSWER_A).sum(axis=1)
    votes_b = (answers == ANSWER_B).sum(axis=1)
    verdict = np.where(votes_a > votes_b, "A", np.where(votes_b > votes_a, "B", ""))
    return [v or None for v in verdict.tolist()], votes_a, votes_b


def criterion_accuracy(answers: np.ndarray, truth: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per criterion: accuracy over the pairs it answered (None excluded, failures wrong),
    and how many pairs entered it. No correct answer gives 0 (as CritiQ's evaluator)."""
    answers = np.asarray(answers).reshape(len(truth), -1)
    truth_code = np.array([ANSWER_A if t == "A" else ANSWER_B for t in truth])[:, None]
    counted = answers != ANSWER_NONE
    correct = (answers == truth_code) & counted
    n_counted = counted.sum(axis=0)
    n_correct = correct.sum(axis=0)
    accuracy = np.where(n_correct > 0, n_correct / np.maximum(n_counted, 1), 0.0)
    return accuracy.astype(np.float64), n_counted.astype(np.int64)


def vote_accuracy(verdict: Sequence[str | None], truth: Sequence[str]) -> float:
    """Share of pairs whose majority verdict matches the human answer (None is wrong)."""
    if len(truth) == 0:
        return float("nan")
    return float(np.mean([v is not None and v == t for v, t in zip(verdict, truth)]))


def _worker_probs(
    engine: Engine,
    criteria: Sequence[Criterion],
    texts_a: Sequence[str],
    texts_b: Sequence[str],
    balance_positions: bool,
    template: Template | None = None,
) -> np.ndarray:
    """probs [pairs, criteria, 3] from one score_choices batch (the both-orders primitive,
    ``tasks/judge_modes.py``: a batch in which every request failed raises)."""
    n_pairs, n_criteria = len(texts_a), len(criteria)
    if n_pairs == 0 or n_criteria == 0:
        return np.zeros((n_pairs, n_criteria, 3))
    template = template or critiq_templates()["worker"]
    pairs = pl.DataFrame(
        {"text_a": [t.strip() for t in texts_a], "text_b": [t.strip() for t in texts_b]},
        schema={"text_a": pl.String, "text_b": pl.String},
    ).join(
        pl.DataFrame({"name": [c.name for c in criteria], "description": [c.description for c in criteria]},
                     schema={"name": pl.String, "description": pl.String}),
        how="cross",
    )  # pair-major: row = pair * n_criteria + criterion
    asked = ask_both_orders(
        engine, template, pairs, "text_a", "text_b", WORKER_OPTIONS,
        both_orders=balance_positions, batch_size=None, all_failed="raise",
    )
    forward = asked.ab.reshape(n_pairs, n_criteria, 3)
    if not balance_positions:
        return forward
    swapped_back = asked.ba.reshape(n_pairs, n_criteria, 3)[..., [1, 0, 2]]
    return (forward + swapped_back) / 2.0


def _raise_if_all_failed(results: Sequence[Any], what: str) -> None:
    """Per-request failures are data (a failed answer counts wrong); a batch in which every
    request failed means the engine is gone, and accuracies computed from it would read as
    real zeros, so it stops the run instead."""
    if results and all(r.error is not None for r in results):
        raise InferenceError(f"every {what} request of a batch of {len(results)} failed: {results[0].error}")


def judge_with_criteria(
    engine: Engine,
    criteria: Sequence[Criterion],
    pairs: Any,
    params: CritiQParams | None = None,
) -> CriteriaVerdicts:
    """Workers judge every pair (frame or dicts with text_a/text_b) under every criterion;
    the verdict per pair is the majority over criteria (tie = None)."""
    params = params or CritiQParams()
    frame = as_pairs_frame(pairs)
    texts_a = make_excerpts(frame["text_a"].to_list(), params.excerpt_chars, params.seed)
    texts_b = make_excerpts(frame["text_b"].to_list(), params.excerpt_chars, params.seed)
    probs = _worker_probs(engine, criteria, texts_a, texts_b, params.balance_positions,
                          critiq_templates(params)["worker"])
    answers = answers_from_probs(probs)
    verdict, votes_a, votes_b = majority_vote(answers)
    return CriteriaVerdicts([c.name for c in criteria], probs, answers, votes_a, votes_b, verdict)


# --------------------------------------------------------------------------- manager

# The manager's prompts are the templates of TEMPLATE_ROLES (prefcurate/templates/
# critiq_{propose,critique,rewrite}_v1.txt). The rewrite prompt carries one worked example:
# without it the base model copies the old description verbatim.

_FORMAT_EXAMPLES = (
    ("clarity", "the text states its ideas plainly and in a logical order."),
    ("accuracy", "the statements in the text are correct and precise."),
)

# text that echoes our prompts (never a usable description or critique)
_PROMPT_ECHO = re.compile(
    r"\[text [ab]\]|\[option|answer:|problem:|criteri(on|a) for judging|old description|"
    r"new description|agreement with human|https?://|```",
    re.IGNORECASE,
)
# a description must not name positions: the worker sees both orders
_POSITION_MENTION = re.compile(r"\btext [ab]\b", re.IGNORECASE)


def sanitise_line(text: str | None, max_chars: int, allow_positions: bool = False) -> str | None:
    """One clean sentence from a model's output, or None when it is empty or garbage.

    Takes the first non-empty line, drops bullets, quotes and a leading "Description:",
    collapses whitespace, cuts at ``max_chars`` on a word boundary. Rejects fewer than 3
    words, mostly non-letters, prompt echoes, degenerate repetition and (unless
    ``allow_positions``, as for critiques of one case) mentions of "Text A"/"Text B".
    """
    if not text:
        return None
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"\s+", " ", line).strip()
    line = re.sub(r"^(?:[-*\u2022>]+|\d+[.)])\s*", "", line)
    line = re.sub(r"^(?:description|answer|new description)\s*:\s*", "", line, flags=re.IGNORECASE)
    line = line.strip(" \"'`")
    if len(line) > max_chars:
        cut = line[:max_chars]
        line = cut[: cut.rindex(" ")] if " " in cut else cut
        line = line.rstrip(",;:- ")
    words = line.split()
    if len(words) < 3:
        return None
    letters = sum(ch.isalpha() for ch in line)
    if letters < 0.6 * len(line.replace(" ", "")):
        return None
    if _PROMPT_ECHO.search(line) or (not allow_positions and _POSITION_MENTION.search(line)):
        return None
    lowered = [w.lower().strip(".,;:!?") for w in words]
    if len(words) >= 6 and len(set(lowered)) < 0.4 * len(words):
        return None
    return line


def parse_proposal(text: str | None, max_chars: int) -> Criterion | None:
    """A "name: description" line proposed by the manager, or None when unusable."""
    if not text:
        return None
    line = next((ln for ln in text.splitlines() if ln.strip()), "").strip()
    line = re.sub(r"^(?:[-*\u2022]+|\d+[.)])\s*", "", line)
    if ":" not in line:
        return None
    raw_name, raw_description = line.split(":", 1)
    name = re.sub(r"[^a-z0-9]+", "_", raw_name.strip().lower()).strip("_")
    if not (3 <= len(name) <= 40) or name.count("_") > 4 or not name[0].isalpha():
        return None
    description = sanitise_line(raw_description, max_chars)
    if description is None:
        return None
    return Criterion(name=name, description=description)


def parse_proposals(text: str | None, max_chars: int) -> list[Criterion]:
    """Every usable "name: description" line of one manager output, in order.

    A base model continuing the criteria list often writes several lines, and not always a
    proposal first (it may open with a blank line or a stray remark); reading every line
    gets more out of each sample than the first line alone.
    """
    found = (parse_proposal(line, max_chars) for line in (text or "").splitlines())
    return [c for c in found if c is not None]


def _generate(engine: Engine, prompts: Sequence[str], params: CritiQParams, seed_base: int) -> list[str]:
    """One completion per prompt (one batch); failed requests give "".

    No stop string: a base model often opens with a newline, and stopping there would
    return nothing; the sanitisers take the first non-empty line instead.
    """
    if not prompts:
        return []
    requests = [
        GenerateRequest(
            prompt=prompt,
            params=SamplingParams(
                n=1,
                temperature=params.manager_temperature,
                top_p=0.95,
                max_tokens=params.manager_max_tokens,
                seed=seed_base + k,
            ),
            chat=params.manager_chat,
        )
        for k, prompt in enumerate(prompts)
    ]
    results = engine.generate(requests)
    _raise_if_all_failed(results, "manager")
    return [r.completions[0].text if r.error is None and r.completions else "" for r in results]


def _word_set(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _quote(text: str, max_chars: int = 80) -> str:
    """A model output as a short one-line quote for the report."""
    return repr(_cut(text, max_chars))


def _cut(text: str, max_chars: int) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= max_chars else text[:max_chars].rsplit(" ", 1)[0] + " ..."


# --------------------------------------------------------------------------- mining


@dataclass
class CritiQResult:
    """Outcome of :func:`mine_criteria`.

    ``criteria``: the final set (accuracy = training accuracy of that version);
    ``iterations``: one dict per (step, criterion, action) with keys ``iteration``
    (0 = init, 1..N, N+1 = final evaluation), ``criterion``, ``accuracy``, ``answered``,
    ``action`` (retrieve | drop | propose | keep | revise | ban | evaluate),
    ``description_before``, ``description_after``, ``note``; ``summaries``: per step,
    the majority-vote accuracy of the working set on the training pairs.
    """

    criteria: list[Criterion]
    iterations: list[dict]
    heldout_accuracy: float | None
    report_markdown: str
    fallback_used: bool = False
    summaries: list[dict] = field(default_factory=list)
    all_seen: list[Criterion] = field(default_factory=list)
    banned: list[str] = field(default_factory=list)
    heldout_per_criterion: dict[str, float] = field(default_factory=dict)
    n_train: int = 0
    n_heldout: int = 0


def split_pairs(n_pairs: int, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train / held-out split; at least one pair on each side when n >= 2 and
    heldout_fraction > 0."""
    rng = np.random.default_rng([seed, 11])
    order = rng.permutation(n_pairs)
    n_held = round(n_pairs * heldout_fraction)
    if heldout_fraction > 0 and n_pairs >= 2:
        n_held = min(max(n_held, 1), n_pairs - 1)
    return np.sort(order[n_held:]), np.sort(order[:n_held])


class _Miner:
    """State of one mining run; :func:`mine_criteria` is the public entry point."""

    def __init__(self, engine: Engine, train: pl.DataFrame, params: CritiQParams):
        self.engine = engine
        self.params = params
        self.texts_a = make_excerpts(train["text_a"].to_list(), params.excerpt_chars, params.seed)
        self.texts_b = make_excerpts(train["text_b"].to_list(), params.excerpt_chars, params.seed)
        self.truth = train["answer"].to_list()
        self.memo: dict[tuple[str, str], np.ndarray] = {}
        self.seen: dict[str, Criterion] = {}
        self.banned: list[str] = []
        self.rows: list[dict] = []
        self.summaries: list[dict] = []
        self._answered: dict[str, int] = {}
        self._seed_counter = params.seed * 100_003
        # read once per run: one run uses one version of each prompt
        self.templates = critiq_templates(params)

    # -- judging, memoised per (name, description)
    def answers(self, criteria: Sequence[Criterion]) -> np.ndarray:
        todo = [c for c in criteria if (c.name, c.description) not in self.memo]
        # a duplicate (name, description) inside todo is judged once
        unique = list({(c.name, c.description): c for c in todo}.values())
        if unique:
            probs = _worker_probs(
                self.engine, unique, self.texts_a, self.texts_b, self.params.balance_positions,
                self.templates["worker"],
            )
            answers = answers_from_probs(probs)
            for k, c in enumerate(unique):
                self.memo[(c.name, c.description)] = answers[:, k]
        if not criteria:
            return np.zeros((len(self.truth), 0), dtype=np.int8)
        return np.stack([self.memo[(c.name, c.description)] for c in criteria], axis=1)

    def evaluate(self, criteria: list[Criterion], iteration: int) -> tuple[list[Criterion], np.ndarray]:
        answers = self.answers(criteria)
        accuracy, answered = criterion_accuracy(answers, self.truth)
        scored = [
            c.model_copy(update={"accuracy": float(a)}) for c, a in zip(criteria, accuracy)
        ]
        verdict, _, _ = majority_vote(answers)
        self.summaries.append(
            {
                "iteration": iteration,
                "n_criteria": len(criteria),
                "train_vote_accuracy": vote_accuracy(verdict, self.truth) if criteria else None,
            }
        )
        self._answered = dict(zip([c.name for c in criteria], answered.tolist()))
        return scored, answers

    def remember(self, criteria: Iterable[Criterion]) -> None:
        """CritiQ's all-criteria update: per name, the best-scoring version (newer wins ties)."""
        for c in criteria:
            old = self.seen.get(c.name)
            if old is None or (c.accuracy or 0.0) >= (old.accuracy or 0.0):
                self.seen[c.name] = c

    def log(self, iteration: int, criterion: Criterion, action: str, before: str | None,
            after: str | None, note: str = "") -> None:
        self.rows.append(
            {
                "iteration": iteration,
                "criterion": criterion.name,
                "accuracy": criterion.accuracy,
                "answered": self._answered.get(criterion.name) if criterion.accuracy is not None else None,
                "action": action,
                "description_before": before,
                "description_after": after,
                "note": note,
            }
        )

    def next_seed(self) -> int:
        self._seed_counter += 1000
        return self._seed_counter

    # -- manager: propose
    def propose(self, needed: int, working: Sequence[Criterion], iteration: int) -> list[Criterion]:
        if needed <= 0:
            return []
        p = self.params
        examples = ""
        shown = min(p.manager_examples, len(self.truth))
        for k in range(shown):
            better, worse = (
                (self.texts_a[k], self.texts_b[k]) if self.truth[k] == "A" else (self.texts_b[k], self.texts_a[k])
            )
            examples += (
                f"\nPreferred text: {_cut(better, p.manager_excerpt_chars)}\n"
                f"Less preferred text: {_cut(worse, p.manager_excerpt_chars)}\n"
            )
        # the latest bans only: the list grows every iteration and the context is small
        banned = (
            f"\nCriteria that failed to predict the preferences: {', '.join(self.banned[-10:])}.\n"
            if self.banned
            else ""
        )
        listed = list(working) or [Criterion(name=n, description=d) for n, d in _FORMAT_EXAMPLES]
        existing = "\n".join(f"- {c.name}: {c.description}" for c in listed)
        prompt = self.templates["propose"].render(examples=examples, banned=banned, existing=existing)
        outputs = _generate(self.engine, [prompt] * (needed * p.proposal_samples), p, self.next_seed())
        taken = {c.name for c in working} | set(self.banned) | {n for n, _ in _FORMAT_EXAMPLES if not working}
        # a base model often copies a listed description under a new name: not a new criterion
        taken_descriptions = [_word_set(c.description) for c in listed]
        proposals: list[Criterion] = []
        unusable: list[str] = []
        duplicates: list[str] = []
        for text in outputs:
            candidates = parse_proposals(text, p.description_max_chars)
            if not candidates:
                unusable.append(text)
            for candidate in candidates:
                words = _word_set(candidate.description)
                if candidate.name in taken or any(_jaccard(words, w) >= 0.7 for w in taken_descriptions):
                    duplicates.append(candidate.name)
                    continue
                taken.add(candidate.name)
                taken_descriptions.append(words)
                proposals.append(candidate)
                self.log(iteration, candidate, "propose", None, candidate.description)
                if len(proposals) == needed:
                    break
            if len(proposals) == needed:
                break
        if len(proposals) < needed:
            self.rows.append(
                {
                    "iteration": iteration,
                    "criterion": None,
                    "accuracy": None,
                    "answered": None,
                    "action": "propose",
                    "description_before": None,
                    "description_after": None,
                    "note": f"manager gave {len(proposals)} usable of {needed} criteria needed "
                    f"({len(outputs)} samples: {len(unusable)} without a usable line"
                    + (f", e.g. {_quote(unusable[0])}" if unusable else "")
                    + f"; {len(duplicates)} repeated a taken name or description"
                    + (f" ({', '.join(sorted(set(duplicates)))})" if duplicates else "")
                    + ")",
                }
            )
        return proposals

    # -- manager: reflect and rewrite
    def revise(self, to_revise: list[tuple[Criterion, np.ndarray]]) -> list[tuple[Criterion, str | None, str]]:
        """For each (criterion, its answers): critique wrong cases, rewrite the description.
        Returns (criterion with new description, accepted rewrite or None, note)."""
        p = self.params
        truth_code = np.array([ANSWER_A if t == "A" else ANSWER_B for t in self.truth])
        critique_prompts: list[str] = []
        owners: list[int] = []
        for index, (criterion, answers) in enumerate(to_revise):
            wrong = np.flatnonzero(answers == ANSWER_B - truth_code)  # answered, and the other side
            for k in wrong[: p.max_reflection_cases].tolist():
                critique_prompts.append(
                    self.templates["critique"].render(
                        name=criterion.name,
                        description=criterion.description,
                        text_a=_cut(self.texts_a[k], p.manager_excerpt_chars),
                        text_b=_cut(self.texts_b[k], p.manager_excerpt_chars),
                        truth=self.truth[k],
                        wrong="B" if self.truth[k] == "A" else "A",
                    )
                )
                owners.append(index)
        raw_critiques = _generate(self.engine, critique_prompts, p, self.next_seed())
        critiques: list[list[str]] = [[] for _ in to_revise]
        for owner, text in zip(owners, raw_critiques):
            clean = sanitise_line(text, p.description_max_chars, allow_positions=True)
            if clean is not None:
                critiques[owner].append(clean)
        rewrite_prompts = [
            self.templates["rewrite"].render(
                name=criterion.name,
                description=criterion.description,
                accuracy=criterion.accuracy or 0.0,
                critiques="\n".join(f"- {c}" for c in found) or "- (no clear problem was named)",
            )
            for (criterion, _), found in zip(to_revise, critiques)
        ]
        k = p.rewrite_samples
        rewrites = _generate(
            self.engine, [prompt for prompt in rewrite_prompts for _ in range(k)], p, self.next_seed()
        )
        out = []
        for index, ((criterion, _), found) in enumerate(zip(to_revise, critiques)):
            raw = rewrites[index * k : (index + 1) * k]
            old = criterion.description.strip().lower()
            candidates = (sanitise_line(text, p.description_max_chars) for text in raw)
            clean = next((c for c in candidates if c is not None and c.lower() != old), None)
            usable = clean is not None
            note = f"{len(found)} critiques"
            if usable:
                out.append((criterion.model_copy(update={"description": clean, "accuracy": None}), clean, note))
            else:
                note += (
                    f"; rewrite rejected (empty, garbage or unchanged, e.g. {_quote(raw[0] if raw else '')}): "
                    "description kept"
                )
                out.append((criterion.model_copy(update={"accuracy": None}), None, note))
        return out


def mine_criteria(
    engine: Engine,
    human_pairs: Any,
    seed_kb: Sequence[Criterion] | None,
    params: CritiQParams | None = None,
) -> CritiQResult:
    """Mine quality criteria from human-labelled pairs (id, text_a, text_b, answer A|B).

    See the module docstring for the flow. ``seed_kb``: None loads the bundled knowledge
    base (``data/critiq_criteria.yaml``); an empty list makes the manager propose the whole
    initial set. Every engine call is one batch per step (all worker
    judgments of a step in one ``score_choices``; critiques, rewrites and proposals each
    in one ``generate``).
    """
    params = params or CritiQParams()
    pairs = as_pairs_frame(human_pairs, require_answer=True)
    if pairs.height < 2:
        raise ValueError("need at least 2 human pairs")
    train_idx, held_idx = split_pairs(pairs.height, params.heldout_fraction, params.seed)
    train = pairs[train_idx.tolist()]
    heldout = pairs[held_idx.tolist()]
    miner = _Miner(engine, train, params)

    # -- init (iteration 0): retrieve from the knowledge base, propose the rest
    working: list[Criterion] = []
    kb = _dedupe(load_seed_criteria() if seed_kb is None else seed_kb)
    if kb:
        scored, _ = miner.evaluate(kb, 0)
        order = sorted(range(len(scored)), key=lambda k: -(scored[k].accuracy or 0.0))
        for rank, k in enumerate(order):
            c = scored[k]
            if (c.accuracy or 0.0) > params.kb_min_accuracy and len(working) < params.n_criteria:
                working.append(c)
                miner.log(0, c, "retrieve", c.description, c.description)
            else:
                reason = (
                    f"accuracy <= {params.kb_min_accuracy}"
                    if (c.accuracy or 0.0) <= params.kb_min_accuracy
                    else f"not in the top {params.n_criteria}"
                )
                miner.log(0, c, "drop", c.description, None, reason)
        miner.remember(working)
    working += miner.propose(params.n_criteria - len(working), working, 0)

    # -- iterations
    for iteration in range(1, params.iterations + 1):
        if not working:
            miner.summaries.append({"iteration": iteration, "n_criteria": 0, "train_vote_accuracy": None})
            working = miner.propose(params.n_criteria, [], iteration)
            continue
        scored, answers = miner.evaluate(working, iteration)
        miner.remember(scored)
        kept: list[Criterion] = []
        to_revise: list[tuple[Criterion, np.ndarray]] = []
        for k, c in enumerate(scored):
            if c.accuracy >= params.keep_threshold:
                kept.append(c)
                miner.log(iteration, c, "keep", c.description, c.description)
            elif c.accuracy > params.ban_threshold:
                to_revise.append((c, answers[:, k]))
            else:
                miner.banned.append(c.name)
                miner.log(iteration, c, "ban", c.description, None)
        revised = miner.revise(to_revise)
        for (old, _), (new, accepted, note) in zip(to_revise, revised):
            miner.log(iteration, old, "revise", old.description, new.description, note)
        working = kept + [new for new, _, _ in revised]
        working += miner.propose(params.n_criteria - len(working), working, iteration)

    # -- final evaluation of the last working set
    final_iteration = params.iterations + 1
    if working:
        scored, _ = miner.evaluate(working, final_iteration)
        miner.remember(scored)
        for c in scored:
            miner.log(final_iteration, c, "evaluate", c.description, c.description)

    seen = sorted(miner.seen.values(), key=lambda c: -(c.accuracy or 0.0))
    final = [c for c in seen if (c.accuracy or 0.0) >= params.keep_threshold]
    fallback_used = not final
    if fallback_used:
        final = seen[: params.fallback_k]

    heldout_accuracy: float | None = None
    heldout_per_criterion: dict[str, float] = {}
    if heldout.height and final:
        verdicts = judge_with_criteria(engine, final, heldout, params)
        truth = heldout["answer"].to_list()
        heldout_accuracy = vote_accuracy(verdicts.verdict, truth)
        per, _ = criterion_accuracy(verdicts.answers, truth)
        heldout_per_criterion = dict(zip(verdicts.criteria, per.tolist()))

    result = CritiQResult(
        criteria=final,
        iterations=miner.rows,
        heldout_accuracy=heldout_accuracy,
        report_markdown="",
        fallback_used=fallback_used,
        summaries=miner.summaries,
        all_seen=seen,
        banned=list(miner.banned),
        heldout_per_criterion=heldout_per_criterion,
        n_train=train.height,
        n_heldout=heldout.height,
    )
    result.report_markdown = render_report(result, params)
    return result


def _dedupe(criteria: Iterable[Criterion]) -> list[Criterion]:
    out: dict[str, Criterion] = {}
    for c in criteria:
        c = c if isinstance(c, Criterion) else Criterion(**dict(c))
        out.setdefault(c.name, c.model_copy(update={"accuracy": None}))
    return list(out.values())


# --------------------------------------------------------------------------- report


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if np.isnan(value) else f"{value:.2f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_report(result: CritiQResult, params: CritiQParams) -> str:
    """Markdown: the split, each step's per-criterion table, the final set, held-out accuracy."""
    lines = [
        "# CritiQ criteria mining",
        "",
        f"Human pairs: {result.n_train} for training, {result.n_heldout} held out. "
        f"Iterations: {params.iterations}. Thresholds: keep >= {params.keep_threshold}, "
        f"ban <= {params.ban_threshold}.",
        "",
    ]
    summaries = {s["iteration"]: s for s in result.summaries}
    steps = sorted({row["iteration"] for row in result.iterations} | set(summaries))
    for step in steps:
        title = (
            "Init (knowledge base)"
            if step == 0
            else "Final evaluation" if step == params.iterations + 1 else f"Iteration {step}"
        )
        lines.append(f"## {title}")
        summary = summaries.get(step)
        if summary and summary.get("train_vote_accuracy") is not None:
            lines.append(
                f"Majority vote of {summary['n_criteria']} criteria on training pairs: "
                f"{_fmt(summary['train_vote_accuracy'])}"
            )
        lines += [
            "",
            "| criterion | accuracy | answered | action | description before | description after | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in (r for r in result.iterations if r["iteration"] == step):
            lines.append(
                "| "
                + " | ".join(
                    _fmt(row[key])
                    for key in (
                        "criterion",
                        "accuracy",
                        "answered",
                        "action",
                        "description_before",
                        "description_after",
                        "note",
                    )
                )
                + " |"
            )
        lines.append("")
    lines.append("## Final criteria")
    if result.fallback_used:
        lines.append(
            f"**Fallback:** no criterion reached accuracy {params.keep_threshold} on the training "
            f"pairs; these are the best {params.fallback_k} seen, not validated criteria."
        )
    lines += ["", "| criterion | train accuracy | held-out accuracy | description |", "|---|---|---|---|"]
    for c in result.criteria:
        lines.append(
            f"| {_fmt(c.name)} | {_fmt(c.accuracy)} | {_fmt(result.heldout_per_criterion.get(c.name))} "
            f"| {_fmt(c.description)} |"
        )
    lines += [
        "",
        f"Held-out accuracy of the majority vote (ties count wrong): {_fmt(result.heldout_accuracy)}",
    ]
    if result.banned:
        lines.append(f"Banned: {', '.join(result.banned)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- scorer


@dataclass
class CritiQScorerReport:
    """Counts of the labelling step and the scorer's own report (``ScorerReport`` as a dict;
    its held-out accuracy is against the criteria's majority verdicts)."""

    judged_pairs: int
    tie_pairs: int
    training_pairs: int
    scorer: dict


def train_critiq_scorer(
    engine: Engine,
    criteria: Sequence[Criterion],
    pairs: Any,
    params: CritiQParams | None = None,
    embed_fn: Callable[[list[str]], np.ndarray] | None = None,
):
    """Label unlabelled pairs (text_a, text_b) with the criteria, drop ties, train a pairwise
    scorer over text embeddings with -log sigmoid(r_chosen - r_rejected).

    Returns ``(scorer, texts, report)``: ``scorer.score(embeddings)`` scores any text by its
    embedding; ``texts`` are the distinct texts it was trained on (the embedding rows).
    ``embed_fn`` defaults to :func:`prefcurate.tasks.embed.embed_texts`.
    """
    from prefcurate.tasks.scorer import ScorerParams, train_reward_model

    params = params or CritiQParams()
    scorer_params = ScorerParams(**params.scorer)
    if embed_fn is None:
        from prefcurate.tasks.embed import embed_texts as embed_fn

    frame = as_pairs_frame(pairs)
    verdicts = judge_with_criteria(engine, criteria, frame, params)
    decided = np.array([v is not None for v in verdicts.verdict], dtype=bool)
    texts_a = frame["text_a"].to_list()
    texts_b = frame["text_b"].to_list()
    unique_texts = list(dict.fromkeys(texts_a + texts_b))
    index = {t: k for k, t in enumerate(unique_texts)}
    a_idx = np.array([index[t] for t in texts_a], dtype=np.int64)
    b_idx = np.array([index[t] for t in texts_b], dtype=np.int64)
    b_wins = np.array([v == "B" for v in verdicts.verdict], dtype=bool)
    chosen = np.where(b_wins, b_idx, a_idx)[decided]
    rejected = np.where(b_wins, a_idx, b_idx)[decided]
    if len(chosen) < 2:
        raise ValueError(f"only {len(chosen)} pairs got a verdict; too few to train a scorer")
    embeddings = np.asarray(embed_fn(unique_texts), dtype=np.float32)
    scorer, report = train_reward_model(embeddings, chosen, rejected, scorer_params, seed=params.seed)
    return scorer, unique_texts, CritiQScorerReport(
        judged_pairs=int(frame.height),
        tie_pairs=int((~decided).sum()),
        training_pairs=len(chosen),
        scorer=report.model_dump(),
    )


def critiq_quality(
    scorer, item_ids: Sequence[str], embeddings: np.ndarray, item_kind: str
) -> pl.DataFrame:
    """QUALITY rows (``method="critiq"``, ``criterion="critiq"``) for embedded items."""
    from prefcurate.tasks.qurating import _quality_frame

    scores = scorer.score(np.asarray(embeddings, dtype=np.float32))
    return _quality_frame(item_ids, item_kind, "critiq", "critiq", scores)
