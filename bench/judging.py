"""Probability-read judging vs a free-text judge, on the same pairs, engine and run.

Both judge the packaged gold pairs (``prefcurate/data/gold_pairs.jsonl``) in both orders
on the embedded Gemma 3 270M (in-process vLLM, CPU):

- ours: the pairwise template ending at ``[[``; ``score_choices`` reads P("A") vs P("B")
  from one decode step (``prefcurate.tasks.annotate.score_options``, as the stage does);
  a verdict fails only when no valid probability comes back.
- baseline: the same prompt without the trailing ``[[`` (ending at "### Verdict"), greedy
  generation of up to 24 tokens of verdict text, then a lenient regex for A/B
  (``[[A]]``, "Answer A"/"Response B", or a bare leading letter); no match = parse failure.

The prefix cache is reset before every timed call, so neither method reuses the other's
prefill (the prompts share everything up to the verdict cue); a warm-up precedes timing.
The two methods alternate in chunks of ``CHUNK`` verdicts (swapping which goes first)
over ``ROUNDS`` rounds and the times are summed, so bursts of load from other processes
on the shared machine hit both alike.

What to expect on a CPU: the verdict prompt's unique part (~85 tokens here, after the
prefix-cached few-shot header) costs about as much compute as the free-text judge's 24
decode steps (each decode token also pays the 262k-vocabulary output layer), so the
speedup is bounded near 2x by arithmetic. On a GPU, decode steps are memory-bound and
cost far more than their FLOPs, which is where one-token verdicts gain most.

Prints per-method verdicts/s, seconds and decode tokens per verdict, CPU-seconds per
verdict (the engine processes' user + system time: on a shared machine wall time mostly
measures the other processes), parse failures and per-verdict agreement with the human
gold label; the last line is
``RESULT speedup=<baseline s per verdict / ours> parse_failures=<ours>
baseline_parse_failures=<baseline>``.
"""

from __future__ import annotations

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# bench/ must not be first on sys.path: bench/select.py would shadow the stdlib `select`
sys.path[0] = str(Path(__file__).resolve().parents[1])

import sys
from pathlib import Path

# `python bench/judging.py` puts bench/ first on sys.path, where bench/select.py would
# shadow the standard library's `select`; use the checkout root instead (no install needed)
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import re  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from prefcurate.inference.base import GenerateRequest, SamplingParams  # noqa: E402
from prefcurate.tasks.annotate import (  # noqa: E402
    PAIRWISE_OPTIONS,
    load_gold_pairs,
    load_template,
    resolve_criteria,
    score_options,
)

ROUNDS = 2
BATCH = 64
CHUNK = 28  # verdicts per alternation (14 pairs x 2 orders)
PREFIX_NOTE = "176-token few-shot header shared by all, prefix-cached within a chunk"
FREE_TEXT_MAX_TOKENS = 24
VERDICT_CUE = "[["
VERDICT_PATTERN = re.compile(
    r"\[\[\s*([AB])\s*\]\]|\b(?:Answer|Response|Option)\s+([AB])\b|^\W*([AB])\b"
)


def parse_verdict(text: str) -> str | None:
    match = VERDICT_PATTERN.search(text)
    if match is None:
        return None
    return next(group for group in match.groups() if group)


def build_prompts() -> tuple[list[str], np.ndarray]:
    """Rendered prompts for both orders of every gold pair, and which option is correct."""
    gold = load_gold_pairs()
    template = load_template("pairwise_v1")
    description = resolve_criteria(["overall"])["overall"]
    ab = gold.select(
        "prompt",
        pl.col("response_a").alias("response_first"),
        pl.col("response_b").alias("response_second"),
        pl.lit(description).alias("criterion_description"),
        (pl.col("winner") == "A").alias("first_is_better"),
    )
    ba = ab.with_columns(
        pl.col("response_second").alias("response_first"),
        pl.col("response_first").alias("response_second"),
        ~pl.col("first_is_better"),
    )
    # interleave (ab, ba) per pair, as the stage sends them
    orders = pl.concat([ab.with_row_index("pair"), ba.with_row_index("pair")])
    orders = orders.sort("pair", maintain_order=True)
    return template.render_column(orders), orders["first_is_better"].to_numpy()


def run_ours(engine, prompts):
    started = time.perf_counter()
    probs, errors = score_options(engine, prompts, PAIRWISE_OPTIONS, batch_size=BATCH)
    seconds = time.perf_counter() - started
    p_first = probs[:, 0]
    # a verdict fails when no valid probability came back (the error says why)
    failures = int(np.sum(~np.isfinite(p_first)))
    assert failures == sum(error is not None for error in errors)
    return seconds, p_first, failures


def run_free_text(engine, prompts):
    sampling = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_tokens=FREE_TEXT_MAX_TOKENS)
    requests = [GenerateRequest(p, None, sampling, chat=False) for p in prompts]
    started = time.perf_counter()
    results = []
    for start in range(0, len(requests), BATCH):
        results.extend(engine.generate(requests[start : start + BATCH]))
    seconds = time.perf_counter() - started
    texts = ["" if r.error else r.completions[0].text for r in results]
    tokens = [0 if r.error else r.completions[0].tokens_out for r in results]
    verdicts = [parse_verdict(t) for t in texts]
    return seconds, verdicts, tokens, texts


def cpu_seconds() -> float:
    """User + system CPU time of this process and its children (vLLM's engine core and
    worker run in subprocesses): the compute a call used, whatever else loads the machine."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def reset_prefix_cache(engine) -> None:
    llm = getattr(engine, "llm", None)
    if llm is not None and hasattr(llm, "reset_prefix_cache"):
        llm.reset_prefix_cache()


def main() -> None:
    from prefcurate.inference.pools import EngineConfig, open_engine

    prompts, first_is_better = build_prompts()
    free_prompts = [p[: -len(VERDICT_CUE)] for p in prompts]
    assert all(p.endswith(VERDICT_CUE) for p in prompts)
    n = len(prompts)
    print(f"{n} verdicts per method ({n // 2} gold pairs x 2 orders), {ROUNDS} rounds, chunks of {CHUNK}")

    loading = time.perf_counter()
    # 1 GiB of KV cache holds this workload and leaves room on a shared machine
    engine = open_engine("bench-judge", EngineConfig(kv_cache_space_gb=1))
    print(f"engine {engine.model} loaded in {time.perf_counter() - loading:.0f} s", flush=True)
    ours_s = free_s = ours_cpu = free_cpu = 0.0
    p_first = np.full(n, np.nan)
    verdicts: list[str | None] = [None] * n
    tokens = [0] * n
    texts = [""] * n
    try:
        score_options(engine, prompts[:4], PAIRWISE_OPTIONS, batch_size=BATCH)  # warm-up
        run_free_text(engine, free_prompts[:4])
        if hasattr(engine, "drain_metrics"):
            engine.drain_metrics()  # count only the timed requests' prompt tokens
        # alternate the methods chunk by chunk (and which goes first), so bursts of load
        # from other processes on the shared machine hit both alike
        for round_index in range(ROUNDS):
            for chunk_index, start in enumerate(range(0, n, CHUNK)):
                part = slice(start, start + CHUNK)

                def ours() -> tuple[float, float]:
                    reset_prefix_cache(engine)
                    cpu = cpu_seconds()
                    seconds, p_part, _ = run_ours(engine, prompts[part])
                    p_first[part] = p_part
                    return seconds, cpu_seconds() - cpu

                def free() -> tuple[float, float]:
                    reset_prefix_cache(engine)
                    cpu = cpu_seconds()
                    seconds, v_part, t_part, x_part = run_free_text(engine, free_prompts[part])
                    verdicts[part], tokens[part], texts[part] = v_part, t_part, x_part
                    return seconds, cpu_seconds() - cpu

                runs = (ours, free) if (round_index + chunk_index) % 2 == 0 else (free, ours)
                for run in runs:
                    wall, cpu = run()
                    if run is ours:
                        ours_s, ours_cpu = ours_s + wall, ours_cpu + cpu
                    else:
                        free_s, free_cpu = free_s + wall, free_cpu + cpu
            print(
                f"round {round_index + 1}: ours {ours_s:.1f} s ({ours_cpu:.1f} cpu-s), "
                f"free text {free_s:.1f} s ({free_cpu:.1f} cpu-s) (cumulative)",
                flush=True,
            )
        metrics = engine.drain_metrics() if hasattr(engine, "drain_metrics") else []
    finally:
        engine.close()

    ours_failures = int(np.sum(~np.isfinite(p_first)))
    free_failures = sum(v is None for v in verdicts)
    ours_per = ours_s / (ROUNDS * n)
    free_per = free_s / (ROUNDS * n)
    ours_agree = float(np.mean((p_first > 0.5) == first_is_better))
    parsed = [(v == "A") == f for v, f in zip(verdicts, first_is_better) if v]
    prompt_tokens = [m["tokens_in"] for m in metrics if m["kind"] == "score_choices" and m["tokens_in"]]
    print(
        f"ours      : {1 / ours_per:7.2f} verdicts/s  {ours_per * 1000:8.1f} ms/verdict  "
        f"1.0 decode tokens/verdict  parse failures {ours_failures}/{n}  "
        f"agreement with gold {ours_agree:.2f}  mean P(A) {np.nanmean(p_first):.2f}"
    )
    print(
        f"free text : {1 / free_per:7.2f} verdicts/s  {free_per * 1000:8.1f} ms/verdict  "
        f"{np.mean(tokens):.1f} decode tokens/verdict  parse failures {free_failures}/{n}  "
        f"agreement with gold (parsed) {np.mean(parsed) if parsed else float('nan'):.2f} on {len(parsed)}"
    )
    if prompt_tokens:
        print(f"prompt tokens per verdict (both methods): {np.mean(prompt_tokens):.0f} "
              f"(a {PREFIX_NOTE})")
    print(
        f"compute per verdict (cpu-s, robust to load from other processes): ours "
        f"{ours_cpu / (ROUNDS * n):.3f}, free text {free_cpu / (ROUNDS * n):.3f}, "
        f"ratio {free_cpu / max(ours_cpu, 1e-9):.2f}"
    )
    print("free-text samples:", [t[:40] for t in texts[:3]])
    print(
        f"RESULT speedup={free_per / ours_per:.2f} parse_failures={ours_failures} "
        f"baseline_parse_failures={free_failures}"
    )


if __name__ == "__main__":
    main()
