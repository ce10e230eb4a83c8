"""Consistency filtering against naive binarisation, on a simulation with known ground truth.

Run: ``python bench/filtering.py`` (no arguments; well under a minute). Options: ``--prompts``,
``--responses``, ``--position-bias``, ``--seed``.

Simulation (all draws from one seeded generator)
- Each prompt has ``responses`` responses with latent quality q ~ N(0, 1) and log length
  l ~ N(log 600, 0.35) characters (independent of q). Ground truth: x is better than y iff
  q_x > q_y (strictly, so a pair of equal quality counts as wrong whichever way it goes).
- ``near_duplicate_rate`` of responses are a copy of another response of their prompt with
  a few words changed, with the same quality; ``truncation_rate`` are cut at the token limit
  (RESPONSES.truncated) and lose 0.5 quality.
- Three judges. Judge k sees x first and y second and answers
  P("A") = clip(sigmoid(a_k (q_x - q_y) + lambda_k (l_x - l_y) + e) + position_bias, 0.01, 0.99),
  e ~ N(0, sigma_k) drawn afresh for each order. "Position bias 0.2" is this additive
  shift of P("A") by +0.2 towards whichever response is shown first. Both orders are
  judged; p_a = (p_first_ab + 1 - p_first_ba) / 2 as in the JUDGMENTS table.
  Judges: (a, sigma, lambda) = (1.5, 0.6, 0.3), (1.2, 0.8, 0.5), (1.0, 1.0, 0.2).
- Rubric ratings: every judge rates every response;
  expected score = clip(3 + 0.6 q + 0.6 (l - mean l) + N(0, 1.0), 1, 5): a single rating
  correlates ~0.5 with quality, and verbosity pulls it. Single-text ratings are noisier
  than pairwise comparisons (QuRating's premise; Peering Through Preferences finds ratings
  and rankings disagree often), but how much noisier is an assumption: the gain over (a)
  is set mostly by this noise, since ours is near the ceiling. The run therefore also
  prints (a) and (c) for rating noise 0.6 and 1.4 (``sensitivity``).

Methods, each emitting at most one pair per prompt
- (a) argmax: distilabel-style binarisation, argmax/argmin of the mean rubric score per
  prompt, no checks (:func:`argmax_baseline_pairs`);
- (b) single_order: judge 1 only, a-first order only, verdicts at face value, Copeland
  best-vs-worst per prompt (:func:`single_order_pairs`);
- (c) ours: :func:`apply_filters` with its defaults (mean jury, every default check,
  best_vs_worst by Bradley-Terry margin, one pair per prompt).

Also printed (no RESULT keys): ``strategy judged`` (every candidate that passed the checks,
as the jury oriented it), and the default filter on *hard* verdicts (each order thresholded
to A or B, so a flip is an exact tie): its dropped pairs counted once by primary reason,
next to the per-reason sum that used to count a flip three times. When
``../shared/data/pandalm/`` exists, the filter on PandaLM's real judgments against its human
labels (see :func:`pandalm_lines`; a few seconds). The baselines are
tie-aware: a tied rating or a verdict of exactly 0.5 emits no pair.

Reported: agreement = share of emitted pairs whose chosen has the higher latent quality,
in percent. ``kept_share`` = prompts for which ours emits a pair / prompts, i.e. our pairs
relative to the one pair per prompt that (a) emits; the share of candidate pairs that pass
every check is printed too (``passed_checks``), and is lower, since best-vs-worst needs only
one surviving pair per prompt.
"""

from __future__ import annotations

import sys
from pathlib import Path

# the repository root first on sys.path, so this checkout's prefcurate is the one measured
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from prefcurate.tasks.filter import (
    FilterParams,
    apply_filters,
    argmax_baseline_pairs,
    single_order_pairs,
)

from tests.support.rows import judgments_from_arrays

JUDGES = [
    ("judge-1", "alpha-7b", 1.5, 0.6, 0.3),
    ("judge-2", "beta-8b", 1.2, 0.8, 0.5),
    ("judge-3", "gamma-9b", 1.0, 1.0, 0.2),
]
RATING_NOISE = 1.0
RATING_LENGTH_PULL = 0.6
VOCABULARY = (
    "the of and to in is that for it as with was on be by this are or an from at which but not have "
    "has were can all their more one its also when been other these into than then some could only "
    "model data answer result value method step first second because example number function"
)
WORDS = np.array(VOCABULARY.split())


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def simulate(
    n_prompts: int = 2000,
    n_responses: int = 4,
    position_bias: float = 0.2,
    near_duplicate_rate: float = 0.03,
    truncation_rate: float = 0.03,
    seed: int = 0,
    rating_noise: float = RATING_NOISE,
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, dict[str, float]]:
    """(judgments, ratings, responses, true quality by response id)."""
    rng = np.random.default_rng(seed)
    n = n_prompts * n_responses
    prompt_of = np.repeat(np.arange(n_prompts), n_responses)
    quality = rng.normal(0.0, 1.0, n)
    log_len = rng.normal(np.log(600), 0.35, n)

    n_words = np.maximum((np.exp(log_len) / 5.0).astype(int), 5)
    texts = [" ".join(rng.choice(WORDS, size=k)) for k in n_words]
    # near-duplicates: copy the previous response of the same prompt, change a few words
    copy = (rng.random(n) < near_duplicate_rate) & (np.arange(n) % n_responses > 0)
    for i in np.flatnonzero(copy):
        words = texts[i - 1].split()
        for position in rng.choice(len(words), size=min(3, len(words)), replace=False):
            words[position] = str(rng.choice(WORDS))
        texts[i] = " ".join(words)
        quality[i] = quality[i - 1]
        log_len[i] = np.log(len(texts[i]))
    truncated = rng.random(n) < truncation_rate
    quality = quality - 0.5 * truncated

    prompt_ids = np.array([f"p{p:05d}" for p in prompt_of])
    # random id suffixes: which response of a pair is "response_a" (smaller id) carries no signal
    ids = np.array(
        [f"{prompt}-{suffix:012x}" for prompt, suffix in zip(prompt_ids, rng.integers(0, 1 << 48, n))]
    )
    generators = np.array(["gen-small", "gen-large"])[rng.integers(0, 2, n)]
    responses = pl.DataFrame(
        {
            "response_id": ids,
            "prompt_id": prompt_ids,
            "generator": generators,
            "model": np.where(generators == "gen-small", "org/delta-1b", "org/epsilon-3b"),
            "text": texts,
            "truncated": truncated,
        }
    )

    left, right = np.triu_indices(n_responses, k=1)
    base = (np.arange(n_prompts) * n_responses)[:, None]
    i = (base + left[None, :]).ravel()
    j = (base + right[None, :]).ravel()
    swap = ids[i] > ids[j]  # response_a < response_b in id order
    a = np.where(swap, j, i)
    b = np.where(swap, i, j)

    judgment_frames = []
    rating_frames = []
    for name, model, slope, noise, length_pull in JUDGES:

        def first_prob(
            x: np.ndarray, y: np.ndarray, slope=slope, noise=noise, pull=length_pull
        ) -> np.ndarray:
            logit = slope * (quality[x] - quality[y]) + pull * (log_len[x] - log_len[y])
            logit = logit + rng.normal(0.0, noise, x.size)
            return np.clip(_sigmoid(logit) + position_bias, 0.01, 0.99)

        p_ab = first_prob(a, b)
        p_ba = first_prob(b, a)
        judgment_frames.append(judgments_from_arrays(prompt_ids[a], ids[a], ids[b], p_ab, p_ba, name, model))
        score = (
            3.0
            + 0.6 * quality
            + RATING_LENGTH_PULL * (log_len - log_len.mean())
            + rng.normal(0.0, rating_noise, n)
        )
        rating_frames.append(
            pl.DataFrame(
                {
                    "rating_id": [f"{name}-r{k}" for k in range(n)],
                    "prompt_id": prompt_ids,
                    "response_id": ids,
                    "judge": name,
                    "judge_model": model,
                    "aspect": "helpfulness",
                    "template_hash": "r0",
                    "expected_score": np.clip(score, 1.0, 5.0),
                    "valid": True,
                    "error": None,
                },
                schema_overrides={"error": pl.String},
            )
        )
    truth = dict(zip(ids.tolist(), quality.tolist()))
    return pl.concat(judgment_frames), pl.concat(rating_frames), responses, truth


def agreement(pairs: pl.DataFrame, truth: dict[str, float]) -> float:
    """Percent of pairs whose chosen response has the strictly higher latent quality."""
    if pairs.height == 0:
        return float("nan")
    quality = pl.DataFrame({"response_id": list(truth), "q": list(truth.values())})
    joined = pairs.join(quality.rename({"response_id": "chosen_id", "q": "qc"}), on="chosen_id").join(
        quality.rename({"response_id": "rejected_id", "q": "qr"}), on="rejected_id"
    )
    return 100.0 * float((joined["qc"] > joined["qr"]).mean())


PANDALM = Path(__file__).resolve().parents[2] / "shared" / "data" / "pandalm"


def pandalm_lines() -> list[str]:
    """The filter on real published judgments, when ``../shared/data/pandalm/`` exists: the
    PandaLM test set imported with examples/import_pandalm.yaml (no code), its two model
    judges (gpt-3.5-turbo, PandaLM-7B: one presentation order, hard verdicts) filtered with
    strategy ``judged``, scored against the majority of the three human annotators (their
    ties left out). Abstention-aware (a judge that says tie abstains; default) against
    ``max_abstain_share 0`` (any abstention drops the pair, which is what counting a tie as
    disagreement did), next to each judge alone through the same filter."""
    if not (PANDALM / "testset-v1.json").exists():
        return ["pandalm: ../shared/data/pandalm/ not found, skipped"]
    import tempfile

    from prefcurate.tasks.import_judgments import load_mapping

    from prefcurate.steps.import_judgments import run_import
    from prefcurate.store import Store

    key = ["prompt_id", "response_a", "response_b"]
    with tempfile.TemporaryDirectory() as folder:
        mapping = load_mapping(Path(__file__).resolve().parents[1] / "examples" / "import_pandalm.yaml")
        run_import(Path(folder) / "pandalm", PANDALM / "testset-v1.json", mapping)
        store = Store.open(Path(folder) / "pandalm")
        frames = {
            t: store.read(f"current_{t}").drop("run_id", "stage", "code_version", "created_at")
            for t in ("judgments", "responses", "ratings")
        }
    human = frames["judgments"]["judge"].str.starts_with("annotator")
    votes = frames["judgments"].filter(human).group_by(key).agg(
        (pl.col("p_a") > 0.5).sum().alias("a"), (pl.col("p_a") < 0.5).sum().alias("b")
    )
    truth = votes.filter(pl.col("a") != pl.col("b")).select(*key, a_better=pl.col("a") > pl.col("b"))
    models = frames["judgments"].filter(~human)
    lines = []
    runs = [
        (f"{judge} alone", models.filter(pl.col("judge") == judge), {}) for judge in sorted(set(models["judge"]))
    ]
    runs += [
        ("2 model judges, abstention-aware", models, {}),
        ("2 model judges, any abstention drops", models, {"max_abstain_share": 0.0}),
    ]
    for label, judged, extra in runs:
        params = FilterParams(strategy="judged", truncation={"enabled": False}, abstention=extra)
        pairs, _, report = apply_filters(judged, frames["ratings"], frames["responses"], params)
        scored = pairs.with_columns(
            response_a=pl.min_horizontal("chosen_id", "rejected_id"),
            response_b=pl.max_horizontal("chosen_id", "rejected_id"),
            a_chosen=pl.col("chosen_id") < pl.col("rejected_id"),
        ).join(truth, on=key)
        agree = 100.0 * float((scored["a_chosen"] == scored["a_better"]).mean())
        lines.append(
            f"pandalm, {label}: {pairs.height} of {report['candidates']} pairs kept, "
            f"{agree:.1f}% agree with the human majority ({scored.height} with a majority); "
            f"position checks not applicable to {report['position_checks_not_applicable']['verdicts']} "
            "single-order verdicts"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--responses", type=int, default=4)
    parser.add_argument("--position-bias", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    judgments, ratings, responses, truth = simulate(
        args.prompts, args.responses, args.position_bias, seed=args.seed
    )
    n_prompts = responses["prompt_id"].n_unique()
    n_judges = judgments["judge"].n_unique()
    print(
        f"simulation: {n_prompts} prompts x {args.responses} responses, {n_judges} judges, "
        f"position bias +{args.position_bias} on P('A'), {judgments.height} judgments"
    )

    started = time.perf_counter()
    baseline = argmax_baseline_pairs(ratings, responses)
    single = single_order_pairs(judgments)
    baseline_s = time.perf_counter() - started
    started = time.perf_counter()
    ours, _, report = apply_filters(judgments, ratings, responses, FilterParams())
    ours_s = time.perf_counter() - started

    rows = [
        ("(a) argmax over ratings", baseline, agreement(baseline, truth)),
        ("(b) single-order judge", single, agreement(single, truth)),
        ("(c) ours (filtered)", ours, agreement(ours, truth)),
    ]
    print(f"{'method':<28}{'pairs':>7}{'per prompt':>12}{'agreement %':>14}")
    for label, pairs, agree in rows:
        print(f"{label:<28}{pairs.height:>7}{pairs.height / n_prompts:>12.3f}{agree:>14.1f}")
    print(
        f"ours: {report['candidates']} candidate pairs, {report['passed_checks']} passed every check "
        f"({100 * report['kept_share']:.1f}%), Fleiss' kappa {report['fleiss_kappa']:.3f} "
        f"over {report['fleiss_items']} items; filter {ours_s:.2f}s, baselines {baseline_s:.2f}s"
    )
    primary = {r: n for r, n in report["drops_per_reason"].items() if n}
    print("dropped pairs per primary reason (each once):", ", ".join(f"{r}={n}" for r, n in primary.items()))
    failed = {r: n for r, n in report["failed_per_reason"].items() if n}
    print(
        "pairs failing each reason (a pair may fail several):",
        ", ".join(f"{r}={n}" for r, n in failed.items()),
    )
    abstained = report["abstentions"]
    print(
        f"judge abstentions: {abstained['verdicts']} verdicts ({abstained['flipped']} flipped, "
        f"{abstained['tied']} tied) on {abstained['pairs']} pairs"
    )
    print(
        "judges:", ", ".join(f"{j}: flip {s['position_flip_rate']:.2f}" for j, s in report["judges"].items())
    )

    sensitivity = []
    for noise in (0.6, 1.4):
        judged, rated, texts, quality = simulate(
            args.prompts // 2, args.responses, args.position_bias, seed=args.seed + 1, rating_noise=noise
        )
        pairs, _, _ = apply_filters(judged, rated, texts, FilterParams())
        sensitivity.append(
            f"rating noise {noise}: argmax {agreement(argmax_baseline_pairs(rated, texts), quality):.1f}, "
            f"ours {agreement(pairs, quality):.1f} ({pairs.height / (args.prompts // 2):.3f} kept)"
        )
    print(f"sensitivity ({args.prompts // 2} prompts each): " + "; ".join(sensitivity))

    # every consistent pair, as judged (strategy judged: no per-prompt cap, no margin cut)
    judged, _, _ = apply_filters(judgments, ratings, responses, FilterParams(strategy="judged"))
    print(
        f"strategy judged: {judged.height} pairs ({judged.height / report['candidates']:.3f} of the "
        f"candidates), agreement {agreement(judged, truth):.1f}%"
    )

    # hard verdicts (each order answers A or B): a flip is an exact tie, which is also an
    # abstention and low confidence; the report counts each such pair once (primary reason)
    half = judgments.filter(pl.col("prompt_id") < f"p{args.prompts // 2:05d}")
    hard = half.with_columns(
        p_first_ab=(pl.col("p_first_ab") > 0.5).cast(pl.Float64),
        p_first_ba=(pl.col("p_first_ba") > 0.5).cast(pl.Float64),
    ).with_columns(p_a=(pl.col("p_first_ab") + 1.0 - pl.col("p_first_ba")) / 2.0)
    hard_pairs, hard_drops, hard_report = apply_filters(hard, ratings, responses, FilterParams())
    dropped = hard_drops.select("prompt_id", "response_a", "response_b").unique().height
    print(
        f"hard verdicts ({args.prompts // 2} prompts): ours {agreement(hard_pairs, truth):.1f}% on "
        f"{hard_pairs.height} pairs; {dropped} dropped pairs = "
        f"{sum(hard_report['drops_per_reason'].values())} counted by primary reason "
        f"(the per-reason sum would say "
        f"{sum(hard_report['failed_per_reason'].values())}); abstentions on "
        f"{hard_report['abstentions']['pairs']} pairs"
    )

    for line in pandalm_lines():
        print(line)

    ours_agree, argmax_agree, single_agree = rows[2][2], rows[0][2], rows[1][2]
    kept_share = ours.height / n_prompts
    print(
        f"RESULT gain_points={ours_agree - argmax_agree:.1f} kept_share={kept_share:.3f} "
        f"ours={ours_agree:.1f} argmax={argmax_agree:.1f} single_order={single_agree:.1f}"
    )


if __name__ == "__main__":
    main()
