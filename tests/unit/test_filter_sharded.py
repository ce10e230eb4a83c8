"""The filter streamed by prompt shard (tasks.filter.apply_filters_sharded) gives the whole-dataset
filter's result (tasks.filter.apply_filters) row for row: pairs, drops with their reasons,
details and numbers, and the report, under every strategy and jury method."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal
from prefcurate.tasks import filter as F

from tests.support.rows import judgment, judgments, ratings, responses

#: the judgment columns the jury reads: what the filter step reads of the judgments table
JURY_COLUMNS = ["prompt_id", "response_a", "response_b", "judge", "judge_model", "criterion", "valid",
                "p_a", "p_first_ab", "p_first_ba"]


def random_dataset(seed: int = 3, prompts: int = 40):
    """Prompts with 4 responses each, 3 judges (soft and hard verdicts, invalid rows, two
    criteria), near-duplicate and truncated texts, a response with no row, rubric ratings."""
    rng = np.random.default_rng(seed)
    rows, resp = [], []
    for prompt in range(prompts):
        ids = [f"p{prompt:02d}-{k}" for k in range(4)]
        base = f"answer {rng.integers(1000)} to prompt {prompt} " * int(rng.integers(1, 4))
        texts = {i: (base + ("!" if rng.random() < 0.3 else f" variant {i} {rng.integers(99)}"))
                 * int(rng.choice([1, 1, 3])) for i in ids}
        quality = rng.normal(0, 2, size=4)
        kept = ids if rng.random() > 0.1 else ids[:3]  # sometimes a response row is missing
        resp.append(responses(
            ids=tuple(kept), prompt=f"p{prompt:02d}", texts=texts,
            truncated=tuple(i for i in kept if rng.random() < 0.1),
            generator={i: ["g1", "g2", "g3"][int(rng.integers(3))] for i in kept},
            model={i: ["acme/acme-1b", "judgy/judgy-2b"][int(rng.integers(2))] for i in kept},
        ))
        for i in range(4):
            for j in range(i + 1, 4):
                for judge, model in (("j1", "acme/acme-7b"), ("j2", "judgy/judgy-3b"), ("j3", "other/other-1b")):
                    for criterion in ("overall", "style"):
                        # verdicts follow a latent quality, with noise, position bias and hard answers
                        gap = quality[i] - quality[j]
                        p_ab = float(1 / (1 + np.exp(-(gap + 0.4 + rng.normal(0, 1)))))
                        p_ba = float(1 / (1 + np.exp(gap - 0.4 + rng.normal(0, 1))))
                        if rng.random() < 0.2:
                            p_ab, p_ba = round(p_ab), round(p_ba)
                        rows.append(judgment(ids[i], ids[j], p_ab, p_ba=p_ba, judge=judge, model=model,
                                             prompt=f"p{prompt:02d}", criterion=criterion,
                                             valid=bool(rng.random() > 0.05)))
    resp_frame = pl.concat(resp)
    rat = pl.concat([ratings({i: float(rng.uniform(1, 5))}, prompt="p") for i in resp_frame["response_id"]])
    labels = pl.DataFrame({"prompt_id": ["p03", "p07"], "response_a": ["p03-0", "p07-1"],
                           "response_b": ["p03-1", "p07-3"], "winner": ["B", "tie"]})
    return judgments(*rows), rat, resp_frame, labels


def shard_reader(rat: pl.DataFrame, resp: pl.DataFrame, seen: list[int]):
    """Reads a shard's ratings and responses by response id, as the filter step does, and
    records how many prompts each read spans."""
    def read(response_ids: pl.Series):
        wanted = pl.DataFrame({"response_id": response_ids})
        shard_resp = resp.join(wanted, on="response_id", how="semi", maintain_order="left")
        seen.append(shard_resp["prompt_id"].n_unique())
        return rat.join(wanted, on="response_id", how="semi", maintain_order="left"), shard_resp
    return read


PARAMS = [
    {},
    {"strategy": "best_vs_random", "length_bias": {"enabled": True, "max_share": 0.1}},
    {"strategy": "all_above_margin", "pairs_per_prompt": None, "margin": 0.2,
     "self_preference": {"enabled": True}},
    {"strategy": "judged", "criteria": ["overall"]},
    {"jury_method": "unsupervised", "strategy": "all_above_margin", "pairs_per_prompt": 2},
    {"jury_method": "weighted", "judge_weights": {"j1": 2.0, "j3": 0.5},
     "near_duplicate": {"threshold": 0.6, "ngram": 3}},
]


@pytest.mark.parametrize("options", PARAMS, ids=lambda p: ",".join(p) or "defaults")
def test_sharded_filter_equals_the_whole_dataset_filter(options):
    jud, rat, resp, labels = random_dataset()
    params = F.FilterParams(**options)
    pairs, drops, report = F.apply_filters(jud, rat, resp, params, human_labels=labels)
    assert pairs.height and drops.height and drops["reason"].n_unique() >= 4  # the case exercises the checks
    for shard_prompts in (1, 7, 1000):
        seen: list[int] = []
        got_pairs, got_drops, got_report = F.apply_filters_sharded(
            jud.select(JURY_COLUMNS), shard_reader(rat, resp, seen), params, human_labels=labels,
            shard_prompts=shard_prompts,
        )
        assert max(seen) <= shard_prompts and len(seen) == -(-40 // shard_prompts)
        assert_frame_equal(got_pairs, pairs, check_exact=True)
        assert_frame_equal(got_drops, drops, check_exact=True)
        assert got_report == report


def test_sharded_filter_on_no_candidates():
    jud, rat, resp, _ = random_dataset(prompts=2)
    none = jud.head(0)
    pairs, drops, report = F.apply_filters(none, rat, resp)
    got = F.apply_filters_sharded(none.select(JURY_COLUMNS), shard_reader(rat, resp, []), shard_prompts=5)
    assert_frame_equal(got[0], pairs)
    assert_frame_equal(got[1], drops)
    assert got[2] == report and report["candidates"] == 0


def test_prompt_shards_are_consecutive_sorted_chunks():
    chunks = list(F.prompt_shards(pl.Series(["c", "a", "b", "a", "d"]), 3))
    assert [c.to_list() for c in chunks] == [["a", "b", "c"], ["d"]]
    with pytest.raises(ValueError, match="shard_prompts"):
        list(F.prompt_shards(pl.Series(["a"]), 0))
