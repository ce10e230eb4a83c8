"""The one interface every inference backend offers the stages.

Two batched calls:
- :meth:`Engine.generate`: n samples per request, with sampling parameters;
- :meth:`Engine.score_choices`: for each request, the probability of each option
  ("A"/"B", "1".."5") as the model's next answer, normalised over the options.

Backends: the in-process vLLM engine (``vllm_engine.py``) and a pool of OpenAI-compatible
``vllm serve`` replicas (``server_pool.py``). Failures are per request: a request that
cannot run carries ``error`` and the batch goes on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    system_prompt: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    #: apply the model's chat template when it has one (instruction-tuned models)
    chat: bool = True


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" | "length"
    tokens_out: int


@dataclass(frozen=True)
class Generation:
    completions: list[Completion]
    tokens_in: int = 0
    latency_s: float = 0.0
    error: str | None = None  # set when the request failed; completions is then empty
    replica: str | None = None


@dataclass(frozen=True)
class ChoiceRequest:
    """``prompt`` ends exactly where the verdict is due; ``options`` are the answers."""

    prompt: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class ChoiceScore:
    #: probability per option, same order as the request's options, summing to 1;
    #: empty when ``error`` is set
    probs: tuple[float, ...]
    latency_s: float = 0.0
    error: str | None = None
    replica: str | None = None
    #: how the probabilities were read when the backend had to choose (the openai pool:
    #: top_logprobs | logit_bias | reask); None for engines that see the full softmax
    method: str | None = None

    def prob(self, option_index: int) -> float:
        return self.probs[option_index]


@runtime_checkable
class Engine(Protocol):
    """What stages call. ``model`` names the model for provenance."""

    model: str

    def generate(self, requests: Sequence[GenerateRequest]) -> list[Generation]: ...

    def score_choices(self, requests: Sequence[ChoiceRequest]) -> list[ChoiceScore]: ...

    def close(self) -> None: ...


class InferenceError(RuntimeError):
    """A whole pool cannot serve (e.g. every replica is down); names the pool."""
