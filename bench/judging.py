"""Probability-read judging vs free-text judges, on the same pairs, engine and run.

All judge the packaged gold pairs (``prefcurate/data/gold_pairs.jsonl``) in both orders on
the embedded Gemma 3 270M (in-process vLLM, CPU, the stage's engine defaults), with the
same prompt layout: instructions, a worked example, the criterion, then the request and
the two answers (MT-Bench's order: the judge's instructions and criteria come before the
question and answers).

- ours: the stage's default pairwise template (``JudgeSpec().template``, ending at
  ``[[``); ``score_choices`` reads P("A") vs P("B") from one decode step
  (``prefcurate.tasks.annotate.score_options``, as the stage does); a verdict fails only
  when no valid probability comes back.
- baseline (the RESULT's ``speedup`` and ``baseline_parse_failures``): the free-text judge
  as MT-Bench and FairEval run it, explanation first, then the verdict, parsed from the
  text. ``bench/templates/rationale_explain_v2.txt`` asks for the comparison on
  helpfulness, relevance, accuracy, depth and detail, then ``[[A]]``/``[[B]]``. The model
  here is a base model that follows instructions only by imitation, so the template shows
  one worked example whose explanation is 99 tokens, about what GPT-4 writes per MT-Bench
  judgment (a public write-up of four MT-Bench runs, 4 x 160 single-answer judgments with
  gpt-4-0613 as judge, counted ~60k completion tokens: ~94 per judgment). Greedy, up to
  ``EXPLAIN_MAX_TOKENS``, stopping at ``]]``.
- also printed, the same judge made to write an MT-Bench-length explanation: vLLM's
  ``min_tokens`` = ``MTBENCH_EXPLANATION_TOKENS`` (94), so ``]]`` may end the text only
  after that many tokens; the first bracketed verdict is parsed. The 270M base model
  often writes a shorter explanation than it was shown, or none; this variant measures the
  cost of one that writes what GPT-4 writes (``speedup_mtbench_length``).
- and two cheaper free-text judges, so the speedup can be read as a function of what the
  judge writes:
  - short evidence: the stage's own MEC template (``JudgeSpec().rationale_template``,
    its example is a 22-token evidence sentence), up to ``EVIDENCE_MAX_TOKENS``;
  - verdict only: ours' prompt without the trailing ``[[`` (ending at "### Verdict"), up
    to ``FREE_TEXT_MAX_TOKENS``.

Where the time goes: ours costs the prefill of its prompt (261 tokens) less what vLLM's
prefix cache shares within a batch, in whole KV blocks (32 tokens on CPU, see
``prefcurate.inference.vllm_engine.CPU_BLOCK_SIZE``): the header and criterion are shared
by every request and the request by both orders of a pair, so ~57 tokens per verdict are
computed. A free-text judge costs the same kind of prefill plus its decode steps, and one
decode token (a step of the batch's sequences, each through the 262k-word output layer)
costs several prompt tokens here. Fewer computed prompt tokens per verdict is where this
speedup comes from; with vLLM's CPU default of 128-token blocks, and the criterion after
the answers (``pairwise_v1``), ours computed 133 tokens per verdict and the speedup over
the explanation-first judge was 3.2x (stop 11). On a GPU, decode steps are memory-bound
and cost far more than prompt tokens, so the gap widens.

Parsing (all free-text judges): ``[[A]]`` (or ``[[A`` cut by the stop string), "Answer A" /
"Assistant B", or a bare leading letter; no match = parse failure.

The prefix cache is reset before every timed call, so no method reuses another's prefill
(the prompts share few-shot headers); a warm-up precedes timing. The methods take turns
in chunks of ``CHUNK`` verdicts (rotating which goes first) over ``ROUNDS`` rounds and the
times are summed, so bursts of load from other processes hit all alike. CPU-seconds of the
engine processes are printed too (robust to other load).

Position-free judges (``--position-free-only`` runs these and ours alone, ~4 min): the
``density_ratio`` mode on the same generative engine (the expert-preamble context over the
plain one, two prefills per response, ``prompt_logprobs``) and the ``reward_model`` mode on
the seeded reward checkpoint (``prefcurate.inference.reward_models``: the embedded model
with a random score head, on vLLM's pooling runner, a second in-process engine), judging
the same 42 gold pairs. They are timed in turn with ours (its 84 both-orders requests),
prefix cache reset before each call, over ``ROUNDS`` rounds; the figure is *pair*
verdicts/s (ours needs two requests per pair verdict, they one score per response, each
response once). The temperature is given (1.0): fitting it on the gold pairs is a one-off
per model, timed and printed apart. The reward head is random: its agreement with gold is
printed but means nothing. Measured here (``--position-free-only``, 2 cores, other jobs
waiting on the machine): ours 11.5 pair verdicts/s, reward_model 28.4 (x2.46), density_ratio
1.18 (x0.10). The density ratio is slow on this model because ``prompt_logprobs`` makes vLLM
run the 262k-word output layer (and a log-softmax over it) at *every* prompt position, the
expert preamble's included, and such requests skip the prefix cache; ours runs it at one
position after a prefix-cached prompt. The fitted temperatures: reward_model ``inf`` (the
random head carries no signal: every verdict a tie), density_ratio 13 (agreement with gold
0.60 on 42 pairs, not distinguishable from chance).

Last line: ``RESULT speedup=<explanation-first free-text s per verdict / ours>
parse_failures=<ours> baseline_parse_failures=<explanation-first> decode_tokens=<baseline's
mean per verdict> speedup_mtbench_length=<..> mtbench_length_parse_failures=<..>
speedup_short_evidence=<..> short_evidence_parse_failures=<..>
speedup_verdict_only=<..> verdict_only_parse_failures=<..> probability_pairs_per_s=<..> reward_model_pairs_per_s=<..>
density_ratio_pairs_per_s=<..> reward_model_vs_probability=<..> density_ratio_vs_probability=<..>``
(the free-text keys are ``na`` with ``--position-free-only``).
"""

from __future__ import annotations

import sys
from pathlib import Path

# the repository root first on sys.path, so this checkout's prefcurate is the one measured
sys.path[0] = str(Path(__file__).resolve().parents[1])

import re
import time
from dataclasses import dataclass, field

import numpy as np
import polars as pl
from prefcurate.tasks.annotate import (
    PAIRWISE_OPTIONS,
    JudgeSpec,
    load_gold_pairs,
    load_template,
    resolve_criteria,
    score_options,
)

from prefcurate.inference.base import GenerateRequest, SamplingParams

ROUNDS = 2
BATCH = 64
CHUNK = 28  # verdicts per alternation (14 pairs x 2 orders)
PREFIX_NOTE = (
    "the header and criterion shared by all and the request by both orders are prefix-cached within a chunk"
)
FREE_TEXT_MAX_TOKENS = 24
EXPLAIN_TEMPLATE = Path(__file__).resolve().parent / "templates" / "rationale_explain_v2.txt"
#: MT-Bench lets its judge write up to 2048 tokens; 256 is 2.5x the worked example and
#: still bounds a judge that never closes its verdict
EXPLAIN_MAX_TOKENS = 256
#: the write-up's ~94 tokens per GPT-4 judgment: the "explanation, MT-Bench length" variant
#: makes the same judge write at least this many before its verdict may end the text
MTBENCH_EXPLANATION_TOKENS = 94
FORCED_MAX_TOKENS = MTBENCH_EXPLANATION_TOKENS + 32
#: one or two sentences of evidence (the template's example is 22 tokens), the "### Verdict"
#: header and "[[A]]": 64 tokens leave room for all three
EVIDENCE_MAX_TOKENS = 64
VERDICT_CUE = "[["
#: a free-text judge stops once its verdict is out (the stop string is not returned, so
#: "[[A" ends the text); without it the base model goes on writing the next few-shot item
VERDICT_STOP = ("]]",)
#: tried in order: the bracketed verdict wins over a letter in the evidence before it
VERDICT_PATTERNS = (
    re.compile(r"\[\[\s*([AB])\s*(?:\]\]|$)"),
    re.compile(r"\b(?:Answer|Assistant|Response|Option)\s+([AB])\b"),
    re.compile(r"^\W*([AB])\b"),
)


@dataclass
class FreeTextJudge:
    """One free-text baseline: what it is asked and may write, and what it wrote per prompt."""

    label: str
    prompts: list[str]
    max_tokens: int
    min_tokens: int = 0
    verdicts: list[str | None] = field(init=False)
    tokens: list[int] = field(init=False)
    texts: list[str] = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.prompts)
        self.verdicts, self.tokens, self.texts = [None] * n, [0] * n, [""] * n


def parse_verdict(text: str) -> str | None:
    for pattern in VERDICT_PATTERNS:
        match = pattern.search(text)
        if match is not None:
            return match.group(1)
    return None


def build_prompts() -> tuple[list[str], list[str], list[str], np.ndarray]:
    """For both orders of every gold pair: the verdict prompt, the explanation-first prompt
    (open at "### Explanation"), the short-evidence prompt (the stage's MEC template open at
    "### Evidence"), and which option is correct."""
    gold = load_gold_pairs()
    judge = JudgeSpec(name="bench")
    template = load_template(judge.template)
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
    explain = load_template(str(EXPLAIN_TEMPLATE), "rationale").render_column(orders, stop_before="rationale")
    evidence = load_template(judge.rationale_template, "rationale").render_column(orders, stop_before="rationale")
    return template.render_column(orders), explain, evidence, orders["first_is_better"].to_numpy()


def run_ours(engine, prompts):
    started = time.perf_counter()
    probs, errors = score_options(engine, prompts, PAIRWISE_OPTIONS, batch_size=BATCH)
    seconds = time.perf_counter() - started
    p_first = probs[:, 0]
    # a verdict fails when no valid probability came back (the error says why)
    failures = int(np.sum(~np.isfinite(p_first)))
    assert failures == sum(error is not None for error in errors)
    return seconds, p_first, failures


def run_free_text(engine, prompts, max_tokens=FREE_TEXT_MAX_TOKENS, min_tokens=0):
    sampling = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens, stop=VERDICT_STOP)
    requests = [GenerateRequest(p, None, sampling, chat=False) for p in prompts]
    # min_tokens is vLLM's own sampling parameter (stop strings count only after it)
    engine.extra_sampling = {"min_tokens": min_tokens} if min_tokens else {}
    started = time.perf_counter()
    results = []
    try:
        for start in range(0, len(requests), BATCH):
            results.extend(engine.generate(requests[start : start + BATCH]))
    finally:
        engine.extra_sampling = {}
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


def gold_jobs() -> tuple[pl.DataFrame, np.ndarray]:
    """The gold pairs as judge-mode jobs (one per pair), and whether response_a won."""
    gold = load_gold_pairs()
    jobs = gold.with_row_index("job").select(
        "job", "prompt", pl.col("response_a").alias("text_a"), pl.col("response_b").alias("text_b"),
        pl.lit(resolve_criteria(["overall"])["overall"]).alias("criterion_description"),
    )  # fmt: skip
    return jobs, (gold["winner"] == "A").to_numpy()


def position_free_modes():
    from prefcurate.tasks.judge_modes_position_free import (
        DensityRatioMode,
        DensityRatioOptions,
        RewardModelMode,
        RewardModelOptions,
    )

    return (
        RewardModelMode(JudgeSpec(name="bench-reward"), RewardModelOptions(temperature=1.0)),
        DensityRatioMode(JudgeSpec(name="bench-cdr"), DensityRatioOptions(temperature=1.0)),
    )


def bench_position_free(engine, prompts: list[str]) -> dict[str, float]:
    """Ours vs the reward-model and density-ratio modes on the same gold pairs (docstring)."""
    from prefcurate.inference.reward_models import prepare_seeded_reward_model
    from prefcurate.inference.vllm_engine import VLLMEngine

    jobs, a_wins = gold_jobs()
    pairs = jobs.height
    loading = time.perf_counter()
    reward_engine = VLLMEngine(str(prepare_seeded_reward_model()), name="bench-reward", kv_cache_space_gb=1)
    print(f"reward engine ({reward_engine.runner} runner) loaded in {time.perf_counter() - loading:.0f} s", flush=True)
    reward_mode, density_mode = position_free_modes()
    wall = {"ours": 0.0, "reward_model": 0.0, "density_ratio": 0.0}
    agreement: dict[str, float] = {}
    try:
        reward_mode.judge(jobs.head(2), reward_engine)  # warm-up
        density_mode.judge(jobs.head(2), engine)
        order = list(wall)
        for round_index in range(ROUNDS):
            shift = round_index % len(order)
            for method in order[shift:] + order[:shift]:
                target = reward_engine if method == "reward_model" else engine
                reset_prefix_cache(target)
                started = time.perf_counter()
                if method == "ours":
                    score_options(engine, prompts, PAIRWISE_OPTIONS, batch_size=BATCH)
                else:
                    mode = reward_mode if method == "reward_model" else density_mode
                    p_a = mode.judge(jobs, target, batch_size=BATCH).p_a
                    margin = np.where(np.abs(p_a - 0.5) < 1e-9, 0.0, p_a - 0.5)
                    agreement[method] = float(np.mean(np.where(a_wins, margin > 0, margin < 0)))
                wall[method] += time.perf_counter() - started
            print(f"position-free round {round_index + 1} (cumulative): "
                  + ", ".join(f"{m} {wall[m]:.1f} s" for m in order), flush=True)
        fitting = time.perf_counter()
        from prefcurate.tasks.judge_modes_position_free import DensityRatioMode, RewardModelMode

        fitted = {
            "reward_model": RewardModelMode(JudgeSpec(name="fit-reward")).fit_on_gold(reward_engine, BATCH),
            "density_ratio": DensityRatioMode(JudgeSpec(name="fit-cdr")).fit_on_gold(engine, BATCH),
        }
        print(f"temperature fitted on the {pairs} gold pairs in {time.perf_counter() - fitting:.1f} s (both): "
              + ", ".join(f"{m} t={t:.3g}" for m, t in fitted.items()))
    finally:
        reward_engine.close()
    rates = {m: ROUNDS * pairs / wall[m] for m in wall}
    for method, rate in rates.items():
        requests = {"ours": "2 requests per pair", "reward_model": "1 reward per response",
                    "density_ratio": "2 prefills per response"}[method]
        extra = f"  agreement with gold {agreement[method]:.2f}" if method in agreement else ""
        print(f"{method:14s}: {rate:7.2f} pair verdicts/s  ({requests}){extra}  "
              f"x{rate / rates['ours']:.2f} vs probability")
    return rates


def main() -> None:
    from prefcurate.inference.pools import EmbeddedPoolConfig, open_engine

    position_free_only = "--position-free-only" in sys.argv[1:]
    prompts, explain_prompts, evidence_prompts, first_is_better = build_prompts()
    verdict_prompts = [p[: -len(VERDICT_CUE)] for p in prompts]
    assert all(p.endswith(VERDICT_CUE) for p in prompts)
    n = len(prompts)
    print(f"{n} verdicts per method ({n // 2} gold pairs x 2 orders), {ROUNDS} rounds, chunks of {CHUNK}")

    loading = time.perf_counter()
    # 1 GiB of KV cache holds this workload and leaves room on a shared machine
    engine = open_engine("bench-judge", EmbeddedPoolConfig(kv_cache_space_gb=1))
    print(f"engine {engine.model} loaded in {time.perf_counter() - loading:.0f} s", flush=True)
    p_first = np.full(n, np.nan)
    free = {} if position_free_only else {
        "explain": FreeTextJudge("free text, explanation", explain_prompts, EXPLAIN_MAX_TOKENS),
        "explain_94": FreeTextJudge("explanation, MT-Bench length", explain_prompts, FORCED_MAX_TOKENS,
                                    MTBENCH_EXPLANATION_TOKENS),
        "evidence": FreeTextJudge("free text, short evidence", evidence_prompts, EVIDENCE_MAX_TOKENS),
        "verdict": FreeTextJudge("free text, verdict", verdict_prompts, FREE_TEXT_MAX_TOKENS),
    }
    wall = dict.fromkeys(["ours", *free], 0.0)
    cpu = dict.fromkeys(["ours", *free], 0.0)
    try:
        score_options(engine, prompts[:4], PAIRWISE_OPTIONS, batch_size=BATCH)  # warm-up
        for judge in free.values():
            run_free_text(engine, judge.prompts[:4], judge.max_tokens, judge.min_tokens)
        if hasattr(engine, "drain_metrics"):
            engine.drain_metrics()  # count only the timed requests' prompt tokens

        def timed(method: str, part: slice) -> None:
            reset_prefix_cache(engine)
            cpu_before = cpu_seconds()
            if method == "ours":
                seconds, p_first[part], _ = run_ours(engine, prompts[part])
            else:
                judge = free[method]
                seconds, judge.verdicts[part], judge.tokens[part], judge.texts[part] = run_free_text(
                    engine, judge.prompts[part], judge.max_tokens, judge.min_tokens
                )
            wall[method] += seconds
            cpu[method] += cpu_seconds() - cpu_before

        # the methods take turns chunk by chunk, in rotating order, so bursts of load from
        # other processes on the shared machine hit all alike
        order = ["ours", *free]
        for round_index in range(ROUNDS):
            for chunk_index, start in enumerate(range(0, n, CHUNK)):
                shift = (round_index + chunk_index) % len(order)
                for method in order[shift:] + order[:shift]:
                    timed(method, slice(start, start + CHUNK))
            print(f"round {round_index + 1} (cumulative): "
                  + ", ".join(f"{m} {wall[m]:.1f} s ({cpu[m]:.1f} cpu-s)" for m in order), flush=True)
        metrics = engine.drain_metrics() if hasattr(engine, "drain_metrics") else []
        rates = bench_position_free(engine, prompts)
    finally:
        engine.close()

    verdicts_timed = ROUNDS * n
    per = {m: wall[m] / verdicts_timed for m in wall}
    ours_failures = int(np.sum(~np.isfinite(p_first)))
    ours_agree = float(np.mean((p_first > 0.5) == first_is_better))
    print(
        f"ours                         : {1 / per['ours']:7.2f} verdicts/s  {per['ours'] * 1000:8.1f} ms/verdict  "
        f"1.0 decode tokens/verdict  parse failures {ours_failures}/{n}  "
        f"agreement with gold {ours_agree:.2f}  mean P(A) {np.nanmean(p_first):.2f}"
    )
    failures = {}
    for method, judge in free.items():
        failures[method] = sum(v is None for v in judge.verdicts)
        parsed = [(v == "A") == f for v, f in zip(judge.verdicts, first_is_better) if v]
        print(
            f"{judge.label:29s}: {1 / per[method]:7.2f} verdicts/s  {per[method] * 1000:8.1f} ms/verdict  "
            f"{np.mean(judge.tokens):.1f} decode tokens/verdict (max {judge.max_tokens})  "
            f"parse failures {failures[method]}/{n}  agreement with gold (parsed) "
            f"{np.mean(parsed) if parsed else float('nan'):.2f} on {len(parsed)}  "
            f"speedup {per[method] / per['ours']:.2f}x  "
            f"compute ratio {cpu[method] / max(cpu['ours'], 1e-9):.2f}x (cpu-s)"
        )
        print(f"  samples: {[t[:160] for t in judge.texts[:2]]}")
    prompt_tokens = [m["tokens_in"] for m in metrics if m["kind"] == "score_choices" and m["tokens_in"]]
    if prompt_tokens:
        print(f"prompt tokens per verdict (ours): {np.mean(prompt_tokens):.0f} ({PREFIX_NOTE})")
    def ratio(method: str) -> str:
        return f"{per[method] / per['ours']:.2f}" if method in per else "na"

    def count(method: str) -> str:
        return str(failures[method]) if method in failures else "na"

    decode_tokens = f"{np.mean(free['explain'].tokens):.1f}" if "explain" in free else "na"
    print(
        f"RESULT speedup={ratio('explain')} parse_failures={ours_failures} "
        f"baseline_parse_failures={count('explain')} "
        f"decode_tokens={decode_tokens} "
        f"speedup_mtbench_length={ratio('explain_94')} "
        f"mtbench_length_parse_failures={count('explain_94')} "
        f"speedup_short_evidence={ratio('evidence')} "
        f"short_evidence_parse_failures={count('evidence')} "
        f"speedup_verdict_only={ratio('verdict')} "
        f"verdict_only_parse_failures={count('verdict')} "
        f"probability_pairs_per_s={rates['ours']:.2f} "
        f"reward_model_pairs_per_s={rates['reward_model']:.2f} "
        f"density_ratio_pairs_per_s={rates['density_ratio']:.2f} "
        f"reward_model_vs_probability={rates['reward_model'] / rates['ours']:.2f} "
        f"density_ratio_vs_probability={rates['density_ratio'] / rates['ours']:.2f}"
    )


if __name__ == "__main__":
    main()
