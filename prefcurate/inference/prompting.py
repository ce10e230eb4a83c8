"""Prompt rendering and tokenization shared by the in-process engine and the server pool.

Both backends send vLLM *token ids*, never text, when the tokenizer is local: the exact
prompt length is known before a request is sent (so a prompt longer than the context
fails alone, with a recorded reason), token counts are exact, and the beginning-of-sequence
token is under our control.

Rendering (:meth:`PromptTokenizer.render`):

- ``request.chat`` and the tokenizer has a chat template: the template is applied to
  ``[system?, user]`` with the generation prompt appended. Templates that reject a system
  role get the system prompt folded into the user turn.
- otherwise (base models such as the embedded Gemma 3 270M, which ship no template): the
  plain format ``"{system}\\n\\n{prompt}"`` (just ``prompt`` without a system prompt).

BOS: the embedded Gemma folder's tokenizer (converted from GGUF) does not add ``<bos>``,
and Gemma degrades without it. ``add_bos="auto"`` prepends the tokenizer's BOS token
when encoding did not add it and the model family is known to be trained with one
(``model_type`` gemma*/llama*/mistral*); ``True``/``False`` force it.

Choice scoring (:func:`choice_plan`): options are tokenized on their own, without special
tokens, and appended to the prompt's ids (as lm-evaluation-harness scores continuations),
so the probability is exactly that of the option's token ids after the prompt. When the
options differ only in one token after a shared prefix (usually the prefix is empty:
"A"/"B"; Gemma writes " 1".." 5" as "▁" + digit), one decode step after ``prompt + prefix``
gives them all: ``logprob_token_ids`` makes vLLM return the log-probability of exactly
those ids under the full softmax, however low they rank, so an option outside any top-k is
never read as zero. Otherwise each option's sequence log-probability is summed from
``prompt_logprobs`` over ``prompt + option`` (one prefill per option; vLLM skips the
prefix cache for such requests). Either way the log-probabilities are normalised with a
softmax over the options only (the shared prefix's probability cancels).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from prefcurate.inference.base import GenerateRequest

_BOS_FAMILIES = ("gemma", "llama", "mistral")

def plain_prompt(prompt: str, system_prompt: str | None) -> str:
    """The fallback format for models without a chat template (base models).

    A bare prompt makes a base model continue the *question* (or start with a blank line,
    which a stop on "\n\n" turns into an empty answer); a question/answer frame makes the
    answer the natural continuation, and a blank line its natural end.
    """
    framed = f"Question: {prompt}\nAnswer:"
    return f"{system_prompt}\n\n{framed}" if system_prompt else framed


def chat_messages(prompt: str, system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


@dataclass(frozen=True)
class ChoicePlan:
    """How to score one request's options (see the module docstring).

    ``first_token``: after ``prompt + shared`` each option continues with exactly one
    token, all different (``next_ids``): one decode step with ``logprob_token_ids`` gives
    every option. The shared prefix's probability is the same factor for every option,
    so it cancels in the normalisation; e.g. Gemma splits " 1".." 5" into "▁" + digit.
    ``sequence``: anything else; each option is scored in full by ``prompt_logprobs``.
    """

    kind: Literal["first_token", "sequence"]
    shared: tuple[int, ...] = ()
    next_ids: tuple[int, ...] = ()


def choice_plan(option_ids: Sequence[Sequence[int]]) -> ChoicePlan:
    shared = _common_prefix(option_ids)
    tails = [tuple(ids[len(shared) :]) for ids in option_ids]
    if all(len(tail) == 1 for tail in tails) and len({t[0] for t in tails}) == len(tails):
        return ChoicePlan("first_token", shared, tuple(t[0] for t in tails))
    return ChoicePlan("sequence")


def _common_prefix(sequences: Sequence[Sequence[int]]) -> tuple[int, ...]:
    if not sequences:
        return ()
    shortest = min(len(s) for s in sequences)
    for position in range(shortest):
        if len({s[position] for s in sequences}) > 1:
            return tuple(sequences[0][:position])
    return tuple(sequences[0][:shortest])


def normalise_logprobs(logprobs: Sequence[float]) -> tuple[float, ...]:
    """Softmax over the options' log-probabilities (stable: shift by the max).

    Raises ValueError when no option has a finite log-probability, rather than returning
    a uniform or zero distribution that would look like a real verdict.
    """
    values = np.asarray(logprobs, dtype=np.float64)
    if values.size == 0 or not np.isfinite(values).any():
        raise ValueError(f"no option has a finite log-probability: {list(values)}")
    shifted = np.exp(values - values[np.isfinite(values)].max())
    return tuple(float(p) for p in shifted / shifted.sum())


class PromptTokenizer(Protocol):
    def render(self, request: GenerateRequest) -> str: ...

    def generate_ids(self, request: GenerateRequest) -> list[int]: ...

    def prompt_ids(self, text: str) -> list[int]: ...

    def option_ids(self, option: str) -> tuple[int, ...]: ...


@dataclass
class LocalPromptTokenizer:
    """A Hugging Face tokenizer from a local folder, with the rendering rules above."""

    tokenizer: object
    add_bos: bool
    _option_cache: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_folder(cls, folder: str | Path, add_bos: bool | str = "auto") -> LocalPromptTokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return cls.from_tokenizer(tokenizer, add_bos, folder)

    @classmethod
    def from_tokenizer(
        cls, tokenizer, add_bos: bool | str = "auto", folder: str | Path | None = None
    ) -> LocalPromptTokenizer:
        if add_bos == "auto":
            add_bos = _family_wants_bos(folder)
        return cls(tokenizer, bool(add_bos))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, request: GenerateRequest) -> str:
        if request.chat and self.has_chat_template:
            try:
                return self.tokenizer.apply_chat_template(
                    chat_messages(request.prompt, request.system_prompt),
                    tokenize=False,
                    add_generation_prompt=True,
                )
            except Exception:  # templates that reject the system role (jinja raises)
                if not request.system_prompt:
                    raise
                return self.tokenizer.apply_chat_template(
                    chat_messages(f"{request.system_prompt}\n\n{request.prompt}", None),
                    tokenize=False,
                    add_generation_prompt=True,
                )
        return plain_prompt(request.prompt, request.system_prompt)

    def generate_ids(self, request: GenerateRequest) -> list[int]:
        return self.prompt_ids(self.render(request))

    def prompt_ids(self, text: str) -> list[int]:
        bos_text = getattr(self.tokenizer, "bos_token", None)
        # chat templates usually write the BOS text themselves; do not add a second one
        has_bos_text = bool(bos_text) and text.startswith(bos_text)
        ids = list(self.tokenizer.encode(text, add_special_tokens=not has_bos_text))
        bos_id = getattr(self.tokenizer, "bos_token_id", None)
        if self.add_bos and bos_id is not None and (not ids or ids[0] != bos_id):
            ids.insert(0, bos_id)
        return ids

    def option_ids(self, option: str) -> tuple[int, ...]:
        cached = self._option_cache.get(option)
        if cached is None:
            cached = tuple(self.tokenizer.encode(option, add_special_tokens=False))
            if not cached:
                raise ValueError(f"option {option!r} tokenizes to nothing")
            self._option_cache[option] = cached
        return cached


def _family_wants_bos(folder: str | Path | None) -> bool:
    if folder is None:
        return False
    config = Path(folder) / "config.json"
    if not config.exists():
        return False
    model_type = str(json.loads(config.read_text()).get("model_type", "")).lower()
    return model_type.startswith(_BOS_FAMILIES)
