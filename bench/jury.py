"""Jury aggregation against its best member: a simulation with known truth, and PandaLM.

Run: ``python bench/jury.py`` (no arguments, CPU, well under a minute). The juries are the
project's own code: judgments frames go through ``tasks.filter.judge_verdicts`` and
``tasks.filter._jury_from_verdicts`` (mean) / ``tasks.jury.latent_jury`` (calibrated,
unsupervised), weights from ``tasks.jury.accuracy_weight``.

Simulation (seeded). 6000 test pairs and 300 labelled ("gold") pairs from the same
distribution; truth: a is better with probability 0.5. Judge j sees the pair and forms a
belief ``x = sign * mu_j + eps`` (eps ~ N(0, 1)); its accuracy is Phi(mu_j). It answers
P("A") = sigmoid(k_j * x + b_j + e) with response a first and sigmoid(-k_j * x + b_j + e')
with b first (b_j = position bias towards the first slot, e, e' ~ N(0, 0.3) per order).
Each verdict is missing (an invalid judgment) with probability 0.1.
Judges: ``strong`` (mu 1.2, acc ~0.88, k 1.5); ``weak_1`` and ``weak_2`` (mu 0.35, k 1.5)
that share 80% of their noise (correlated: they copy each other's mistakes); ``loud``
(mu 0.25, k 5: weak and over-confident, it dominates a mean of probabilities);
``biased`` (mu 0.6, b 2.5: mostly follows the first slot, so it flips often);
``contrarian`` (mu -0.4, acc ~0.34: consistently wrong, yet passes every consistency check).

Methods and why each baseline is the strongest honest one
- best single judge: the member with the highest precision *on the test pairs* (an oracle
  choice; picking by gold accuracy can only do worse), through the filter's own single-judge
  rules (a flipped verdict fails, |p_a - 0.5| >= 0.1).
- single order (tie-aware): the same best judge with one presentation order only, a tied
  P("A") emitting nothing (not a win for either side); what a pipeline without BPC emits.
- argmax: the best judge's 1-5 rubric rating of each response (its belief plus rating
  noise, rounded to half points), argmax vs argmin, a tied rating emitting nothing.
- mean jury: the filter's default mean jury (``jury_from_verdicts``) with its default
  checks re-stated here over the verdicts (|p - 0.5| >= 0.1, agreement >= 0.6 among judges
  that took a side, at most half the judges abstaining), not via ``apply_filters``, so that
  every method sees the same candidates and no rating or transitivity check.
- calibrated / unsupervised: ``p_a`` from this project's juries, emitted at |p - 0.5| >= 0.1.
Precision = share of emitted pairs whose chosen side is the true winner; coverage = emitted
/ pairs. "At equal coverage" = the method's pairs ranked by |p_a - 0.5| and cut at the
other method's count, so a jury cannot win by emitting less.

PandaLM (when ``../shared/data/pandalm/`` exists; skipped otherwise): 999 items, gpt-3.5
and PandaLM-7B verdicts (one order; "Tie" and unparseable answers abstain), label = the
majority of three annotators (an emitted pair on a human tie counts as wrong; an item
without a majority counts as a tie). The calibrated jury is cross-fitted: weights from
4 folds of labelled items, applied to the 5th, so no item calibrates its own verdict.

RESULT: ``calibrated_vs_best_points`` = calibrated precision minus the best single judge's
at the best judge's coverage (target >= 0); ``unsupervised_vs_mean_points`` = unsupervised
minus mean at the mean jury's coverage (target >= 3); ``coverage`` = the calibrated jury's
own coverage at its threshold (target >= the best judge's, printed beside it);
``pandalm_calibrated`` / ``pandalm_best_single`` = precision (percent) at the best single
judge's coverage on PandaLM.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefcurate.tasks.jury import PAIR_KEY, accuracy_weight, judge_verdicts, latent_jury, vote_expr
from prefcurate.tasks.jury import jury_from_verdicts as _jury_from_verdicts

from tests.support.rows import judgments_from_arrays

PANDALM = ROOT.parent / "shared" / "data" / "pandalm"
MARGIN = 0.1
JUDGES = {  # name: (mu, k, position bias, noise group)
    "strong": (1.2, 1.5, 0.3, None),
    "weak_1": (0.35, 1.5, 0.2, "copy"),
    "weak_2": (0.35, 1.5, -0.2, "copy"),
    "loud": (0.25, 5.0, 0.0, None),
    "biased": (0.6, 1.5, 2.5, None),
    "contrarian": (-0.4, 1.5, 0.1, None),
}


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def simulate(n: int, rng: np.random.Generator) -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
    """(judgments frame, truth a-wins, best judge's ratings a - b)."""
    truth = rng.random(n) < 0.5
    sign = np.where(truth, 1.0, -1.0)
    shared = rng.normal(size=n)
    frames, belief_strong = [], None
    for name, (mu, k, bias, group) in JUDGES.items():
        own = rng.normal(size=n)
        eps = np.sqrt(0.8) * shared + np.sqrt(0.2) * own if group else own
        x = sign * mu + eps
        p_ab = _sigmoid(k * x + bias + rng.normal(0, 0.3, n))
        p_ba = _sigmoid(-k * x + bias + rng.normal(0, 0.3, n))
        valid = rng.random(n) >= 0.1
        if name == "strong":
            belief_strong = x
        frames.append(judgments_from_arrays([f"p{i:06d}" for i in range(n)], ["a"] * n, ["b"] * n, p_ab, p_ba,
                                            name, valid=valid))
    rating_gap = np.round(2 * (belief_strong + rng.normal(0, 1.0, n))) / 2 - np.round(2 * rng.normal(0, 1.0, n)) / 2
    return pl.concat(frames), truth, rating_gap


def _truth_frame(n: int, truth: np.ndarray) -> pl.DataFrame:
    return pl.DataFrame({"prompt_id": [f"p{i:06d}" for i in range(n)], "truth_a": truth})


def score(p_a: pl.DataFrame, truth: pl.DataFrame, n: int, emit: pl.Expr | None = None) -> dict:
    """Precision/coverage of the rows of ``p_a`` (prompt_id, p_a[, ...]) that ``emit``."""
    emit = emit if emit is not None else ((pl.col("p_a") - 0.5).abs() >= MARGIN - 1e-9)
    rows = p_a.join(truth, on="prompt_id").filter(emit & pl.col("p_a").is_not_null())
    right = ((rows["p_a"] > 0.5) & rows["truth_a"]) | ((rows["p_a"] < 0.5) & ~rows["truth_a"])
    return {"precision": 100.0 * float(right.mean()) if rows.height else float("nan"),
            "coverage": 100.0 * rows.height / n, "emitted": rows.height}


def at_count(p_a: pl.DataFrame, truth: pl.DataFrame, n: int, count: int) -> dict:
    """Precision of the ``count`` most confident rows (equal-coverage comparison)."""
    ranked = (
        p_a.filter(pl.col("p_a").is_not_null() & ((pl.col("p_a") - 0.5).abs() > 1e-12))
        .with_columns(_c=(pl.col("p_a") - 0.5).abs())
        .sort(["_c", "prompt_id"], descending=[True, False])
        .head(count)
    )
    return score(ranked, truth, n, emit=pl.lit(True))


def single_judge(verdicts: pl.DataFrame, judge: str) -> pl.DataFrame:
    """The filter's rules for a lone judge: a flip fails, else its balanced p_a."""
    own = verdicts.filter(pl.col("judge") == judge).with_columns(_vote=vote_expr())
    return own.with_columns(p_a=pl.when(pl.col("_vote") == 0).then(0.5).otherwise(pl.col("p_a")))


def mean_jury(verdicts: pl.DataFrame) -> pl.DataFrame:
    """Mean p_a with the filter's default agreement (among judges that took a side) and
    position-flip (at most half the judges flipping) checks folded into ``emit``."""
    jury = _jury_from_verdicts(verdicts, PAIR_KEY, "mean", None)
    votes = verdicts.with_columns(_vote=vote_expr()).group_by(PAIR_KEY).agg(
        (pl.col("_vote") > 0).sum().alias("_a"), (pl.col("_vote") < 0).sum().alias("_b"),
        (pl.col("_vote") == 0).mean().alias("_flip_share"),
    )
    sided = pl.col("_a") + pl.col("_b")
    agreement = pl.max_horizontal("_a", "_b") / pl.when(sided > 0).then(sided).otherwise(1)
    jury = jury.join(votes, on=PAIR_KEY).with_columns(
        _ok=(agreement >= 0.6 - 1e-9) & (pl.col("_flip_share") <= 0.5 + 1e-9) & (sided > 0)
    )
    return jury.with_columns(p_a=pl.when(pl.col("_ok")).then(pl.col("p_a")).otherwise(0.5))


def gold_weights(verdicts: pl.DataFrame, labels: pl.DataFrame) -> dict[str, float]:
    """Log-odds weights from each judge's votes on labelled pairs (abstentions left out)."""
    voted = verdicts.with_columns(_vote=vote_expr()).filter(pl.col("_vote") != 0).join(labels, on="prompt_id")
    stats = voted.group_by("judge").agg(
        ((pl.col("_vote") > 0) == pl.col("truth_a")).sum().alias("correct"), pl.len().alias("n")
    )
    weights = accuracy_weight(stats["correct"].to_numpy(), stats["n"].to_numpy())
    return dict(zip(stats["judge"].to_list(), weights.tolist()))


def _row(name: str, result: dict, note: str = "") -> str:
    return f"  {name:<34} precision {result['precision']:6.2f}%  coverage {result['coverage']:6.2f}%  {note}"


def run_simulation(rng: np.random.Generator) -> dict:
    n_test, n_gold = 6000, 300
    judgments, truth, rating_gap = simulate(n_test, rng)
    gold_judgments, gold_truth, _ = simulate(n_gold, rng)
    t0 = time.perf_counter()
    verdicts = judge_verdicts(judgments, by_criterion=False)
    gold_verdicts = judge_verdicts(gold_judgments, by_criterion=False)
    truth_frame = _truth_frame(n_test, truth)
    weights = gold_weights(gold_verdicts, _truth_frame(n_gold, gold_truth))

    singles = {j: score(single_judge(verdicts, j), truth_frame, n_test) for j in JUDGES}
    best = max(singles, key=lambda j: singles[j]["precision"])
    mean = mean_jury(verdicts)
    calibrated, _ = latent_jury(verdicts, PAIR_KEY, "calibrated", weights)
    t_em = time.perf_counter()
    unsupervised, accuracy = latent_jury(verdicts, PAIR_KEY, "unsupervised")
    em_seconds = time.perf_counter() - t_em

    one_order = judgments.filter((pl.col("judge") == best) & pl.col("valid")).select(
        "prompt_id", pl.col("p_first_ab").alias("p_a")
    )
    argmax = pl.DataFrame({"prompt_id": truth_frame["prompt_id"],
                           "p_a": np.where(rating_gap > 0, 1.0, np.where(rating_gap < 0, 0.0, 0.5))})

    results = {
        "mean": score(mean, truth_frame, n_test),
        "calibrated": score(calibrated, truth_frame, n_test),
        "unsupervised": score(unsupervised, truth_frame, n_test),
        "single_order": score(one_order, truth_frame, n_test, emit=(pl.col("p_a") - 0.5).abs() > 1e-12),
        "argmax": score(argmax, truth_frame, n_test, emit=(pl.col("p_a") - 0.5).abs() > 1e-12),
    }
    best_r = singles[best]
    cal_at_best = at_count(calibrated, truth_frame, n_test, best_r["emitted"])
    uns_at_mean = at_count(unsupervised, truth_frame, n_test, results["mean"]["emitted"])

    true_acc = {j: 100.0 * float(
        single_judge(verdicts, j).join(truth_frame, on="prompt_id")
        .filter(pl.col("_vote") != 0).select((pl.col("_vote") > 0) == pl.col("truth_a"))
        .to_series().mean()) for j in JUDGES}
    print(f"simulation: {n_test} test pairs, {n_gold} gold pairs, {len(JUDGES)} judges "
          f"(jury code {time.perf_counter() - t0:.2f} s, EM {em_seconds:.3f} s)")
    print("  judge        true acc.(votes)  EM estimate  gold weight")
    em = dict(zip(accuracy["judge"].to_list(), accuracy["accuracy"].to_list()))
    for j in JUDGES:
        print(f"  {j:<12} {true_acc[j]:8.1f}%       {100 * em[j]:8.1f}%    {weights.get(j, 0.0):+.2f}")
    for j in JUDGES:
        print(_row(f"single judge {j}" + (" (best)" if j == best else ""), singles[j]))
    print(_row(f"single order, tie-aware ({best})", results["single_order"]))
    print(_row(f"argmax of ratings, tie-aware ({best})", results["argmax"]))
    print(_row("mean jury (default checks)", results["mean"]))
    print(_row("calibrated jury", results["calibrated"]))
    print(_row("unsupervised jury (one-coin EM)", results["unsupervised"]))
    print(_row("calibrated at best judge's coverage", cal_at_best))
    print(_row("unsupervised at mean jury's coverage", uns_at_mean))
    return {
        "calibrated_vs_best": cal_at_best["precision"] - best_r["precision"],
        "unsupervised_vs_mean": uns_at_mean["precision"] - results["mean"]["precision"],
        "calibrated_coverage": results["calibrated"]["coverage"],
        "best_coverage": best_r["coverage"],
        "calibrated_natural_vs_best": results["calibrated"]["precision"] - best_r["precision"],
    }


def _pandalm_judgments() -> tuple[pl.DataFrame, pl.DataFrame] | None:
    if not (PANDALM / "testset-v1.json").exists():
        return None
    items = json.loads((PANDALM / "testset-v1.json").read_text())
    gpt = {r["idx"]: str(r["gpt_result"]).strip() for r in json.loads((PANDALM / "gpt-3.5-turbo-testset-v1.json").read_text())}
    panda = {r["idx"]: str(r["pandalm_result"]).strip() for r in json.loads((PANDALM / "pandalm-7b-testset-v1.json").read_text())}
    to_p = {"1": 1.0, "2": 0.0, "0": 0.5, "Tie": 0.5}
    rows, labels = [], []
    for item in items:
        idx = item["idx"]
        votes = [str(item[f"annotator{k}"]) for k in (1, 2, 3)]
        top = max(set(votes), key=votes.count)
        label = top if votes.count(top) >= 2 else "0"
        labels.append({"prompt_id": str(idx), "label": label})
        for judge, answers in (("gpt-3.5-turbo", gpt), ("pandalm-7b", panda)):
            p = to_p.get(answers.get(idx, ""), None)
            rows.append({"prompt_id": str(idx), "response_a": "1", "response_b": "2", "judge": judge,
                         "judge_model": judge, "criterion": "overall", "valid": p is not None,
                         "p_first_ab": None, "p_first_ba": None, "p_a": p})
    return pl.DataFrame(rows, schema_overrides={"p_first_ab": pl.Float64, "p_first_ba": pl.Float64}), pl.DataFrame(labels)


def run_pandalm() -> dict | None:
    loaded = _pandalm_judgments()
    if loaded is None:
        print("pandalm: ../shared/data/pandalm/ not found, skipped")
        return None
    judgments, labels = loaded
    n = labels.height
    # precision counts an emitted pair on a human tie as wrong: truth_a is null there
    truth = labels.select("prompt_id", truth_a=pl.when(pl.col("label") == "0").then(None)
                          .otherwise(pl.col("label") == "1"))
    truth_scored = truth.with_columns(pl.col("truth_a"))
    verdicts = judge_verdicts(judgments, by_criterion=False)
    singles = {}
    for j in verdicts["judge"].unique().sort().to_list():
        singles[j] = _score_tied(single_judge(verdicts, j), truth_scored, n)
    best = max(singles, key=lambda j: singles[j]["precision"])
    mean = _score_tied(mean_jury(verdicts), truth_scored, n)

    folds = (labels["prompt_id"].cast(pl.Int64) % 5).to_numpy()
    labelled = truth.filter(pl.col("truth_a").is_not_null())
    parts = []
    for fold in range(5):
        held = labels["prompt_id"].filter(pl.Series(folds == fold))
        fit_labels = labelled.filter(~pl.col("prompt_id").is_in(held.implode()))
        weights = gold_weights(verdicts.filter(~pl.col("prompt_id").is_in(held.implode())), fit_labels)
        jury, _ = latent_jury(verdicts.filter(pl.col("prompt_id").is_in(held.implode())), PAIR_KEY, "calibrated", weights)
        parts.append(jury)
    calibrated = pl.concat(parts)
    unsupervised, accuracy = latent_jury(verdicts, PAIR_KEY, "unsupervised")
    cal = _score_tied(calibrated, truth_scored, n)
    uns = _score_tied(unsupervised, truth_scored, n)
    cal_at_best = _score_tied(_top(calibrated, singles[best]["emitted"]), truth_scored, n, everything=True)
    print(f"pandalm: {n} items, 2 judges, majority of 3 annotators ({labels.filter(pl.col('label') == '0').height} ties)")
    em = dict(zip(accuracy["judge"].to_list(), accuracy["accuracy"].to_list()))
    for j, r in singles.items():
        print(_row(f"single judge {j}" + (" (best)" if j == best else ""), r, f"EM acc. estimate {100 * em[j]:.1f}%"))
    print(_row("mean jury (default checks)", mean))
    print(_row("calibrated jury (5-fold cross-fitted)", cal))
    print(_row("unsupervised jury (one-coin EM)", uns))
    print(_row("calibrated at best judge's coverage", cal_at_best))
    print("  (argmax baseline: na, PandaLM has no ratings; the single judges are single-order, tie-aware)")
    return {"calibrated": cal_at_best["precision"], "best_single": singles[best]["precision"]}


def _top(p_a: pl.DataFrame, count: int) -> pl.DataFrame:
    return (p_a.filter(pl.col("p_a").is_not_null() & ((pl.col("p_a") - 0.5).abs() > 1e-12))
            .with_columns(_c=(pl.col("p_a") - 0.5).abs())
            .sort(["_c", "prompt_id"], descending=[True, False]).head(count))


def _score_tied(p_a: pl.DataFrame, truth: pl.DataFrame, n: int, everything: bool = False) -> dict:
    """Like :func:`score`, a null truth (human tie) counting as wrong."""
    emit = pl.lit(True) if everything else ((pl.col("p_a") - 0.5).abs() >= MARGIN - 1e-9)
    rows = p_a.join(truth, on="prompt_id").filter(emit & pl.col("p_a").is_not_null())
    right = (((pl.col("p_a") > 0.5) & pl.col("truth_a")) | ((pl.col("p_a") < 0.5) & ~pl.col("truth_a"))).fill_null(False)
    share = rows.select(right.mean()).item() if rows.height else float("nan")
    return {"precision": 100.0 * float(share), "coverage": 100.0 * rows.height / n, "emitted": rows.height}


def main() -> None:
    rng = np.random.default_rng(20261202)
    sim = run_simulation(rng)
    print(f"calibrated jury coverage {sim['calibrated_coverage']:.2f}% vs best judge's {sim['best_coverage']:.2f}%; "
          f"calibrated at its own threshold vs best: {sim['calibrated_natural_vs_best']:+.2f} points")
    panda = run_pandalm()
    fmt = (lambda v: "na" if v is None else f"{v:.2f}")
    print(
        f"RESULT calibrated_vs_best_points={sim['calibrated_vs_best']:.2f} "
        f"unsupervised_vs_mean_points={sim['unsupervised_vs_mean']:.2f} "
        f"coverage={sim['calibrated_coverage']:.2f} "
        f"pandalm_calibrated={fmt(panda and panda['calibrated'])} "
        f"pandalm_best_single={fmt(panda and panda['best_single'])}"
    )


if __name__ == "__main__":
    main()
