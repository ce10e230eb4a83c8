"""Position-free scoring calls: a reward per response, a log-likelihood per continuation.

Two optional engine capabilities beside :class:`~prefcurate.inference.base.Engine`'s
``generate``/``score_choices``, offered by the in-process engine and the server pool:

- :meth:`RewardEngine.score_rewards`: the scalar a sequence-classification (reward) model
  gives ``prompt`` + ``response``, on vLLM's pooling runner (``LLM.classify`` in-process,
  ``POST /classify`` on a server), the raw score (``use_activation=False``: no sigmoid).
- :meth:`LogprobEngine.continuation_logprobs`: ``sum log p(continuation | context)`` under a
  generative model, read from ``prompt_logprobs`` in one prefill of ``context +
  continuation`` (``max_tokens=1``), with the continuation's token count for a per-token
  mean. This is what the density-ratio judge reads under two configurations.

Tokenization follows :mod:`prefcurate.inference.prompting`: ids, not text, go to vLLM.
``context`` and ``continuation`` are tokenized separately and concatenated (as
lm-evaluation-harness scores continuations), so the scored tokens are exactly the
continuation's. A reward model's input (:func:`reward_text`) is the chat template's
``[user: prompt, assistant: response]`` when the tokenizer has one, else the plain
question/answer frame the generators use (``Question: ...\\nAnswer: <response>``).

Which runner a model folder needs is read from its ``config.json`` (:func:`folder_runner`,
vLLM's own architecture-suffix rule), so a judge mode can refuse a pool that cannot serve it
at plan time, without starting an engine.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from prefcurate.errors import InputError
from prefcurate.inference.prompting import plain_prompt

Runner = Literal["generate", "pooling"]

#: vLLM's ``_SUFFIX_TO_DEFAULTS`` (vllm/config/model.py): the architecture's suffix decides
#: the runner when none is forced; the first match wins
_RUNNER_BY_SUFFIX: tuple[tuple[str, Runner], ...] = (
    ("ForCausalLM", "generate"),
    ("ForConditionalGeneration", "generate"),
    ("ChatModel", "generate"),
    ("LMHeadModel", "generate"),
    ("ForTextEncoding", "pooling"),
    ("EmbeddingModel", "pooling"),
    ("ForSequenceClassification", "pooling"),
    ("ForTokenClassification", "pooling"),
    ("ClassificationModel", "pooling"),
    ("ForRewardModeling", "pooling"),
    ("RewardModel", "pooling"),
    ("Model", "pooling"),
)


@dataclass(frozen=True)
class RewardRequest:
    prompt: str
    response: str


@dataclass(frozen=True)
class RewardScore:
    #: the reward model's raw score; NaN when ``error`` is set
    reward: float
    tokens_in: int = 0
    latency_s: float = 0.0
    error: str | None = None
    replica: str | None = None


@dataclass(frozen=True)
class ContinuationRequest:
    """``continuation`` is scored after ``context`` (the context's tokens are not scored)."""

    context: str
    continuation: str


@dataclass(frozen=True)
class ContinuationLogprob:
    #: sum of the continuation tokens' log-probabilities; NaN when ``error`` is set
    logprob: float
    #: the continuation's token count (the mean log-probability is ``logprob / tokens``)
    tokens: int = 0
    latency_s: float = 0.0
    error: str | None = None
    replica: str | None = None

    @property
    def mean_logprob(self) -> float:
        return self.logprob / self.tokens if self.tokens else float("nan")


@runtime_checkable
class RewardEngine(Protocol):
    model: str

    def score_rewards(self, requests: Sequence[RewardRequest]) -> list[RewardScore]: ...


@runtime_checkable
class LogprobEngine(Protocol):
    model: str

    def continuation_logprobs(self, requests: Sequence[ContinuationRequest]) -> list[ContinuationLogprob]: ...


class PoolCapabilityError(InputError):
    """A pool cannot serve what a judge mode needs (raised before any work starts): the
    config's to change, so a unit that meets it is not retried."""


def folder_runner(folder: str | Path) -> Runner | None:
    """The runner vLLM picks for the model in ``folder`` (from ``config.json``'s first
    architecture); None when the folder or its config is not here."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    architectures = json.loads(config.read_text()).get("architectures") or []
    if not architectures:
        return None
    for suffix, runner in _RUNNER_BY_SUFFIX:
        if str(architectures[0]).endswith(suffix):
            return runner
    return "generate"


def reward_text(tokenizer, prompt: str, response: str) -> str:
    """The text a reward model scores for ``response`` to ``prompt`` (module docstring)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
            tokenize=False,
            add_generation_prompt=False,
        )
    return f"{plain_prompt(prompt, None)} {response}"


def continuation_ids(tokenizer, text: str) -> list[int]:
    """``text``'s token ids as a continuation: no special tokens, nothing prepended."""
    return list(tokenizer.encode(text, add_special_tokens=False))
