"""Cost of the inference layers against direct ``vllm.LLM.generate`` (CPU, Gemma 3 270M).

One run, the same prompts (same token ids) everywhere, greedy, ``max_tokens`` fixed with
``ignore_eos`` so every path decodes exactly the same number of tokens, n = 1:

- direct: ``vllm.LLM.generate`` on token-id prompts with one ``SamplingParams``;
- engine: :class:`VLLMEngine` wrapping *the same* ``vllm.LLM`` instance, so only the layer
  differs (rendering, tokenization, per-request parameters, result conversion, metrics);
- pool: :class:`ServerPool` over one ``vllm serve`` replica started with the same settings
  (dtype, max_model_len, KV cache, max_num_seqs, prefix caching), with a concurrency cap
  above the batch size so the server batches the whole batch as ``LLM.generate`` does.

Each instance of this float32 model takes ~6 GB on this CPU build, so the server phase
runs first and its replica is stopped before the in-process ``vllm.LLM`` loads (one model
in memory at a time; each load first waits for the memory, other jobs share the machine).
Every path is warmed up first (first-request costs, prefix caches: all measured rounds are
equally warm), then ``ROUNDS`` rounds, the paths of a phase in rotating order.

The ratios are wall-clock tokens/s, median over rounds, median(path) / median(direct).
engine and direct alternate on one instance, so engine_ratio is robust; pool and direct
run in phases minutes apart, so on this shared 2-core machine other jobs' load moves
pool_ratio (seen from 0.89 to 3.0 under load averages of 10-20; ~0.93 when calm). Tokens
per CPU-second of the serving process trees are printed too, but they are no fairer: the
in-process tree burns ~1.8 CPU-seconds per wall-second (vLLM's front end and engine-core
polling) where the server's tree burns ~1.3.

Also printed: the pool against the same server's own batch request (one POST carrying all
prompts), which isolates the pool's cost from the server's and needs no second phase.

``verdicts_per_s``: wall-clock ``score_choices`` throughput on ``VERDICTS`` pairwise-judge
prompts (" A"/" B") through the embedded engine, the stages' default (pool and a direct
``logprob_token_ids`` baseline are printed too). Each path scores its own prompt set after
a warm-up on another, so only the judge template's shared prefix is cached, as in a real
annotate stage; the figure reflects the machine's load at the time.

Last line: ``RESULT pool_ratio=.. engine_ratio=.. ratio=<min of the two> verdicts_per_s=..``
"""

from __future__ import annotations

import sys
from pathlib import Path

# the repository root first on sys.path, so this checkout's prefcurate is the one measured
sys.path[0] = str(Path(__file__).resolve().parents[1])

import importlib.util
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

REPO = Path(__file__).resolve().parents[1]

import httpx

from prefcurate.inference.base import ChoiceRequest, GenerateRequest, SamplingParams
from prefcurate.inference.models import resolve_model_path

N_PROMPTS = 32
MAX_TOKENS = 32
ROUNDS = 3
VERDICTS = 32
MAX_MODEL_LEN = 1024
MAX_NUM_SEQS = 64
KV_CACHE_GB = 1
NEED_GIB = 6.5  # one float32 Gemma 3 270M instance here: ~4 GiB worker + front end + engine core

TOPICS = [
    "the water cycle", "photosynthesis", "the French revolution", "binary search", "volcanoes",
    "the stock market", "black holes", "the immune system", "machine learning", "the Roman empire",
    "climate change", "jazz music", "the printing press", "plate tectonics", "vaccines",
    "the internet", "honey bees", "the moon landing", "electric cars", "coral reefs",
    "the Renaissance", "quantum computing", "rainforests", "the Silk Road", "earthquakes",
    "chess openings", "the human heart", "solar panels", "ancient Egypt", "sourdough bread",
    "glaciers", "the Olympic games",
]  # fmt: skip


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def with_memory(what: str, load, need_gib: float = NEED_GIB, wait_s: float = 300.0, tries: int = 2):
    """Load ``what`` once ~``need_gib`` is free (other jobs share this machine's 24 GiB),
    retrying once if the load itself runs out of memory."""
    for attempt in range(1, tries + 1):
        deadline = time.monotonic() + wait_s
        while available_gib() < need_gib and time.monotonic() < deadline:
            time.sleep(5)
        if available_gib() < need_gib:
            print(f"  only {available_gib():.1f} GiB free for {what}; trying anyway", flush=True)
        try:
            return load()
        except Exception as error:
            if attempt == tries:
                raise
            print(f"  loading {what} failed ({type(error).__name__}: {str(error)[:200]}); retrying", flush=True)


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
        f"[Option A] A short explanation of {a} (draft {i}).\n[Option B] A short explanation of {b}.\n"
        "Respond only with a single letter.\nAnswer:"
    )


def main() -> None:
    started = time.perf_counter()
    model = resolve_model_path("default")
    params = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_tokens=MAX_TOKENS)
    requests = [GenerateRequest(f"Write a paragraph about {t}.", params=params) for t in TOPICS[:N_PROMPTS]]
    # disjoint verdict sets (warm-up, direct, engine, pool): each timed set is new to the
    # prefix cache of the engine that scores it, beyond the judge template's shared prefix
    verdict_sets = [
        [ChoiceRequest(judge_prompt(k * VERDICTS + i), (" A", " B")) for i in range(VERDICTS)] for k in range(4)
    ]

    pool_runs, pool_vps = measure_pool(model, requests, verdict_sets[0], verdict_sets[3])
    print(f"[{time.perf_counter() - started:.0f} s] pool measured; server stopped", flush=True)
    in_process_runs, direct_vps, engine_vps = measure_in_process(model, requests, verdict_sets)
    runs = {**in_process_runs, **pool_runs}

    per_cpu = {name: statistics.median(r.per_cpu_s for r in rs) for name, rs in runs.items()}
    wall = {name: statistics.median(r.per_wall_s for r in rs) for name, rs in runs.items()}
    best_wall = {name: max(r.per_wall_s for r in rs) for name, rs in runs.items()}
    print(f"{N_PROMPTS} prompts x {MAX_TOKENS} tokens, greedy, ignore_eos; {ROUNDS} rounds per path")
    for name in ("direct", "engine", "server_batch", "pool"):
        print(
            f"  {name:12s} tokens/s median {wall[name]:6.1f} (ratio {wall[name] / wall['direct']:.3f})"
            f"  best {best_wall[name]:6.1f} (ratio {best_wall[name] / best_wall['direct']:.3f})"
            f"  tokens per CPU-second {per_cpu[name]:6.1f} (ratio {per_cpu[name] / per_cpu['direct']:.3f})"
        )
    batch_ratio = wall["pool"] / wall["server_batch"]
    print(f"  pool / the same server's own batch request (one POST, all prompts): {batch_ratio:.3f} (wall)")
    print(f"verdicts/s ({VERDICTS} A/B judgments, wall): direct={direct_vps:.2f} engine={engine_vps:.2f} pool={pool_vps:.2f}")
    print(f"total {time.perf_counter() - started:.0f} s")
    engine_ratio = wall["engine"] / wall["direct"]
    pool_ratio = wall["pool"] / wall["direct"]
    print(
        f"RESULT pool_ratio={pool_ratio:.3f} engine_ratio={engine_ratio:.3f} "
        f"ratio={min(pool_ratio, engine_ratio):.3f} verdicts_per_s={engine_vps:.2f}",
        flush=True,
    )


@dataclass
class Run:
    tokens: int
    wall_s: float
    cpu_s: float

    @property
    def per_wall_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def per_cpu_s(self) -> float:
        return self.tokens / self.cpu_s


def cpu_seconds(root_pids: list[int]) -> float:
    """user+system CPU seconds of these processes and all their descendants (Linux /proc).

    Hand-written rather than psutil (not a dependency): one pass over /proc/*/stat."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime+stime
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, stack, seen = 0, list(root_pids), set()
    while stack:
        pid = stack.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        total += stats[pid][1]
        stack.extend(children.get(pid, []))
    return total / os.sysconf("SC_CLK_TCK")


def timed_rounds(paths: dict, rounds: int, root_pids: list[int]) -> dict[str, list[Run]]:
    """One Run per path per round; the order rotates each round (no path always first)."""
    for fn in paths.values():  # warm-up: first-request costs, prefix caches
        fn()
    names = list(paths)
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            cpu0, t0 = cpu_seconds(root_pids), time.perf_counter()
            tokens = paths[name]()
            runs[name].append(Run(tokens, time.perf_counter() - t0, cpu_seconds(root_pids) - cpu0))
        print(
            f"  round {round_index + 1}: "
            + "  ".join(f"{n}={runs[n][-1].per_cpu_s:.1f} tok/cpu-s ({runs[n][-1].per_wall_s:.1f} tok/s)" for n in names),
            flush=True,
        )
    return runs


def verdicts_per_s(fn) -> float:
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


def measure_pool(model, requests, warm_verdicts, timed_verdicts):
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
        (replica,) = with_memory(
            "the vllm serve replica", lambda: launch.start(spec, pid_file, workdir / "logs", 900, log=lambda m: None)
        )
        pool = ServerPool(
            "bench", [replica.url], "gemma3-270m", LocalPromptTokenizer.from_folder(model),
            max_concurrency_per_replica=MAX_NUM_SEQS, timeout_s=900, max_model_len=MAX_MODEL_LEN,
            extra_sampling={"ignore_eos": True},
        )  # fmt: skip
        batch_body = {
            "model": "gemma3-270m", "prompt": [pool.tokenizer.generate_ids(r) for r in requests],
            "max_tokens": MAX_TOKENS, "temperature": 0.0, "top_p": 1.0, "ignore_eos": True,
        }  # fmt: skip

        def server_batch() -> int:
            response = httpx.post(f"{replica.url}/v1/completions", json=batch_body, timeout=900)
            return int(response.json()["usage"]["completion_tokens"])

        with pool:
            print("pool vs one batch POST to the same vllm serve replica:", flush=True)
            paths = {"server_batch": server_batch, "pool": lambda: checked_tokens(pool, requests)}
            runs = timed_rounds(paths, ROUNDS, [os.getpid(), replica.pid])
            checked_scores(pool, warm_verdicts)
            vps = verdicts_per_s(lambda: checked_scores(pool, timed_verdicts))
    finally:
        launch.stop(pid_file, log=lambda m: None)
    return runs, vps


def measure_in_process(model, requests, verdict_sets):
    from prefcurate.inference.vllm_engine import VLLMEngine, apply_cpu_engine_defaults, default_block_size

    # the settings VLLMEngine and the server launcher apply, for the bare vllm.LLM too
    apply_cpu_engine_defaults(KV_CACHE_GB)
    from vllm import LLM
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.inputs import TokensPrompt

    block_size = default_block_size()
    llm = with_memory("the in-process vllm.LLM", lambda: LLM(
        model=model, dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN,
        enable_prefix_caching=True, max_num_seqs=MAX_NUM_SEQS, seed=0,
        **({"block_size": block_size} if block_size else {}),
    ))  # fmt: skip
    engine = VLLMEngine(model, llm=llm, max_model_len=MAX_MODEL_LEN, extra_sampling={"ignore_eos": True})
    token_prompts = [TokensPrompt(prompt_token_ids=engine.tokenizer.generate_ids(r)) for r in requests]
    direct_params = VllmSamplingParams(temperature=0.0, top_p=1.0, max_tokens=MAX_TOKENS, ignore_eos=True)

    def direct() -> int:
        outputs = llm.generate(token_prompts, direct_params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs)

    try:
        print("in-process (direct vllm.LLM.generate vs VLLMEngine on the same instance):", flush=True)
        paths = {"direct": direct, "engine": lambda: checked_tokens(engine, requests)}
        runs = timed_rounds(paths, ROUNDS, [os.getpid()])  # the engine core runs in our children

        option_ids = [engine.tokenizer.option_ids(o) for o in (" A", " B")]
        assert all(len(ids) == 1 for ids in option_ids), option_ids
        wanted = [ids[0] for ids in option_ids]
        warm, direct_set, engine_set = verdict_sets[0], verdict_sets[1], verdict_sets[2]
        direct_prompts = [TokensPrompt(prompt_token_ids=engine.tokenizer.prompt_ids(r.prompt)) for r in direct_set]
        verdict_params = VllmSamplingParams(max_tokens=1, temperature=0.0, logprobs=2, logprob_token_ids=wanted)
        checked_scores(engine, warm)
        direct_vps = verdicts_per_s(lambda: llm.generate(direct_prompts, verdict_params, use_tqdm=False))
        engine_vps = verdicts_per_s(lambda: checked_scores(engine, engine_set))
    finally:
        llm.llm_engine.engine_core.shutdown()
    return runs, direct_vps, engine_vps


if __name__ == "__main__":
    main()
