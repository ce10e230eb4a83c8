"""A unit key and a row id change when anything that changes the output changes.

The pool is the one source of "which model": its served name and a fingerprint of its model
folder enter the generate/annotate/score unit keys and the row ids, and every template a
unit uses enters the keys. Tested where ``plan`` decides a unit is done (the registry), on
a real store, with fake Hugging Face style folders (a config.json and a dummy weights file:
enough to compute keys; no engine reads them) and a scripted test double for the engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from prefcurate.config import load_config
from prefcurate.inference import pools as pools_module
from prefcurate.inference.pools import EmbeddedPoolConfig, parse_pool
from prefcurate.steps import get_step
from prefcurate.steps.base import context_for
from prefcurate.steps.engines import close_all
from prefcurate.store import Store
from prefcurate.templates import read_template_text
from tests.support.engines import ScriptedEngine
from tests.support.rows import prompts


def fake_model_folder(parent: Path, layers: int, name: str = "tiny-lm") -> Path:
    """An HF-style folder: same name for every call, so only the contents tell them apart."""
    folder = parent / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["TinyForCausalLM"], "num_hidden_layers": layers}))
    (folder / "tokenizer_config.json").write_text('{"chat_template": null}')
    (folder / "model.safetensors").write_bytes(b"\0" * (1024 * layers))
    return folder


@pytest.fixture
def scripted_pools(monkeypatch):
    """Every pool opens a scripted engine named like the real one would be."""
    def open_scripted(name, config):
        config = parse_pool(config)
        return ScriptedEngine(choice_fn=lambda prompt, options: [0.6] + [0.4 / (len(options) - 1)] * (len(options) - 1),
                              generate_fn=lambda request, i: f"answer {i} to {request.prompt[-12:]}",
                              model=config.provenance_name())

    monkeypatch.setattr(pools_module, "open_engine", open_scripted)
    yield
    close_all()


@pytest.fixture
def world(tmp_path, scripted_pools):
    store = Store.init(tmp_path / "ds")
    two = prompts(["p1", "p2"], ["What is steady?", "Name a colour."])
    store.register([store.write("prompts", two, key="shard-0", run_id="r0", stage="ingest")])
    rubric = tmp_path / "my_rubric.txt"
    rubric.write_text(read_template_text("rubric_v1"))
    first = fake_model_folder(tmp_path / "a", layers=2)
    second = fake_model_folder(tmp_path / "b", layers=3)
    return {"store": store, "rubric": rubric, "first": first, "second": second, "tmp": tmp_path}


def _context(world, model: Path, run_id: str = "r1", **overrides):
    config = load_config("examples/quickstart.yaml", {
        "pools.generators": {"kind": "embedded", "model": str(model)},
        "pools.judges": {"kind": "embedded", "model": str(model)},
        "annotate.judges": [{"name": "judge", "pool": "judges", "template": "pairwise_v3",
                             "rubric_template": str(world["rubric"])}],
        "annotate.rubric_aspects": ["helpfulness"], "annotate.calibration_pairs": 1, "contracts": False,
        **overrides,
    })
    return context_for(world["store"].root, config, run_id)


def _keys(ctx, stage: str) -> set[str]:
    return {unit.key for unit in get_step(stage).plan(ctx)}


def _run_stage(stage: str, ctx) -> int:
    """Run the stage's pending units as a build does; returns how many ran."""
    store = ctx.store()
    step = get_step(stage)
    todo, _ = step.pending(ctx, step.plan(ctx))
    for unit in todo:
        store.register(step.run_unit(unit, ctx).shards)
    return len(todo)


def _generated_and_annotated(world):
    """The first run (r1, the first model folder) through generate and annotate: what the
    changes below are made against."""
    ctx = _context(world, world["first"])
    _run_stage("generate", ctx)
    _run_stage("annotate", ctx)
    return ctx


def test_nothing_changed_means_the_rerun_does_nothing(world):
    ctx = _context(world, world["first"])
    assert _run_stage("generate", ctx) == 1 and _run_stage("annotate", ctx) == 2  # shard + calibration
    again = _context(world, world["first"], run_id="r2")  # a fresh load of the same config
    assert _run_stage("generate", again) == 0 and _run_stage("annotate", again) == 0
    assert _keys(again, "score") == _keys(ctx, "score")


def test_swapping_the_model_behind_a_pool_recomputes(world):
    store = world["store"]
    ctx = _generated_and_annotated(world)
    before = store.query("SELECT response_id, model FROM responses")
    score_before = _keys(ctx, "score")

    swapped = _context(world, world["second"], run_id="r2")  # same folder name, another model
    assert _run_stage("generate", swapped) == 1
    after = store.query("SELECT response_id, model FROM responses WHERE run_id = 'r2'")
    assert after.height == before.height  # every sample again, under new ids
    assert set(after["response_id"]).isdisjoint(before["response_id"])
    # rows record the pool's identity: its served name and the folder's fingerprint
    assert set(before["model"]) == {EmbeddedPoolConfig(model=str(world["first"])).model_identity()}
    assert set(after["model"]) == {EmbeddedPoolConfig(model=str(world["second"])).model_identity()}
    assert after["model"][0].startswith("tiny-lm@") and after["model"][0] != before["model"][0]
    assert _run_stage("annotate", swapped) == 2
    judged = store.query("SELECT DISTINCT judge_model FROM judgments WHERE run_id = 'r2'")["judge_model"]
    assert judged.to_list() == [EmbeddedPoolConfig(model=str(world["second"])).model_identity()]
    assert _keys(swapped, "score").isdisjoint(score_before)


def test_changing_the_model_folder_in_place_recomputes(world):
    ctx = _context(world, world["first"])
    _run_stage("generate", ctx)
    keys = _keys(ctx, "generate")
    config_json = world["first"] / "config.json"
    config_json.write_text(config_json.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 20'))
    changed = _context(world, world["first"], run_id="r2")
    assert _keys(changed, "generate").isdisjoint(keys)
    assert _run_stage("generate", changed) == 1


def test_editing_a_custom_rubric_file_rejudges_what_it_rated(world):
    store = world["store"]
    _generated_and_annotated(world)
    ratings = store.count("ratings")
    assert ratings > 0

    rubric = world["rubric"]
    rubric.write_text(rubric.read_text().replace("Only the stated aspect counts", "Only the aspect named counts"))
    edited = _context(world, world["first"], run_id="r2")
    assert _run_stage("generate", edited) == 0  # generation never saw the rubric
    assert _run_stage("annotate", edited) >= 1
    new = store.query("SELECT rating_id, template_hash FROM ratings WHERE run_id = 'r2'")
    old = store.query("SELECT rating_id, template_hash FROM ratings WHERE run_id = 'r1'")
    assert new.height == ratings and set(new["rating_id"]).isdisjoint(old["rating_id"])
    assert set(new["template_hash"]).isdisjoint(old["template_hash"])


def test_every_template_a_judge_uses_enters_the_annotate_keys(world):
    pairwise = world["tmp"] / "my_pairwise.txt"
    pairwise.write_text(read_template_text("pairwise_v3"))
    rationale = world["tmp"] / "my_rationale.txt"
    rationale.write_text(read_template_text("rationale_v2"))
    judges = [{"name": "judge", "pool": "judges", "template": str(pairwise), "rationale_template": str(rationale),
               "rubric_template": str(world["rubric"])}]
    per_judge = [judges[0] | {"mode": "rationale", "mode_options": {"k": 1}}]  # the judge's own mode
    plain = _context(world, world["first"], **{"annotate.judges": judges})
    mec = _context(world, world["first"], **{"annotate.judges": judges, "annotate.rationale_k": 1})
    keys = {"plain": _keys(plain, "annotate"), "mec": _keys(mec, "annotate"),
            "per_judge": _keys(_context(world, world["first"], **{"annotate.judges": per_judge}), "annotate")}
    assert keys["per_judge"].isdisjoint(keys["plain"])

    rationale.write_text(rationale.read_text() + " ")  # an edit only rationale mode sees
    assert _keys(_context(world, world["first"], **{"annotate.judges": judges}), "annotate") == keys["plain"]
    assert _keys(_context(world, world["first"], **{"annotate.judges": judges, "annotate.rationale_k": 1}),
                 "annotate").isdisjoint(keys["mec"])
    assert _keys(_context(world, world["first"], **{"annotate.judges": per_judge}),
                 "annotate").isdisjoint(keys["per_judge"])

    pairwise.write_text(pairwise.read_text().replace("Verdict", "Decision", 1))
    assert _keys(_context(world, world["first"], **{"annotate.judges": judges}), "annotate").isdisjoint(keys["plain"])


def test_a_position_free_judges_gold_file_enters_the_annotate_keys_when_it_fits_t(world):
    from prefcurate.tasks.annotate import load_gold_pairs

    gold = world["tmp"] / "rm_gold.jsonl"
    gold.write_text(load_gold_pairs().write_ndjson())

    def keys(**options) -> set[str]:
        judges = [{"name": "cdr", "pool": "judges", "mode": "density_ratio", "mode_options": {"gold_path": str(gold),
                                                                                          **options}}]
        return _keys(_context(world, world["first"], **{"annotate.judges": judges, "annotate.rubric_aspects": []}),
                     "annotate")

    fitted, given = keys(), keys(temperature=1.0)
    assert keys() == fitted and fitted.isdisjoint(given)
    gold.write_text(gold.read_text().replace('"winner":"A"', '"winner":"B"', 1))  # a label edited in place
    assert keys().isdisjoint(fitted)  # t is fitted again, so the shard is judged again
    assert keys(temperature=1.0) == given  # a given t never reads the file


def test_a_gold_label_edited_in_place_calibrates_again_and_an_edit_mid_build_is_refused(world):
    from prefcurate.tasks.annotate import load_gold_pairs

    from prefcurate.errors import InputError

    gold = world["tmp"] / "gold.jsonl"
    gold.write_text(load_gold_pairs().write_ndjson())  # ids given in the file: a label edit keeps them
    ctx = _context(world, world["first"], **{"annotate.gold_path": str(gold)})
    _run_stage("generate", ctx)
    assert _run_stage("annotate", ctx) == 2  # the shard and the calibration
    first = gold.read_text().splitlines()[0]
    flipped = first.replace('"winner":"A"', '"winner":"B"') if '"winner":"A"' in first else \
        first.replace('"winner":"B"', '"winner":"A"')
    gold.write_text(gold.read_text().replace(first, flipped, 1))

    edited = _context(world, world["first"], run_id="r2", **{"annotate.gold_path": str(gold)})
    step = get_step("annotate")
    todo, _ = step.pending(edited, step.plan(edited))
    assert [unit.payload.get("calibration") for unit in todo] == [True]  # the shard is judged already
    gold.write_text(gold.read_text().replace(flipped, first, 1))  # edited again after the plan
    with pytest.raises(InputError, match="changed after this build planned"):
        step.run_unit(todo[0], edited)


def test_the_score_key_follows_its_pools_prompts_and_data_files(world):
    from prefcurate.tasks import critiq

    pairs = world["tmp"] / "human_pairs.jsonl"
    pairs.write_text(critiq.DEFAULT_HUMAN_PAIRS.read_text())
    judge_prompt = world["tmp"] / "my_qurating.txt"
    judge_prompt.write_text(read_template_text("qurating_v1"))
    worker_prompt = world["tmp"] / "my_worker.txt"
    worker_prompt.write_text(read_template_text("critiq_worker_v1"))
    on = {"score.critiq.enabled": True, "score.critiq.human_pairs": str(pairs),
          "score.qurating.template": str(judge_prompt), "score.critiq.params.worker_template": str(worker_prompt)}
    base = _keys(_context(world, world["first"], **on), "score")
    assert _keys(_context(world, world["first"], **on), "score") == base

    pairs.write_text(pairs.read_text().replace("water", "sea water", 1))  # edited in place
    edited = _keys(_context(world, world["first"], **on), "score")
    assert edited.isdisjoint(base)

    # the QuRating and CritiQ prompts are template files: edited in place, they score again
    judge_prompt.write_text(judge_prompt.read_text().replace("Compare", "Contrast", 1))
    judged = _keys(_context(world, world["first"], **on), "score")
    assert judged.isdisjoint(edited)
    worker_prompt.write_text(worker_prompt.read_text().replace("Compare", "Contrast", 1))
    assert _keys(_context(world, world["first"], **on), "score").isdisjoint(judged | edited)


def test_a_server_pool_is_identified_by_served_name_revision_and_local_folder(tmp_path):
    remote = {"kind": "servers", "urls": ["http://gpu-node-1:8000"], "model": "/models/Qwen2.5-7B-Instruct",
              "served_model_name": "qwen"}
    identity = parse_pool(remote).model_identity()  # no server asked
    assert identity.startswith("qwen@")
    assert parse_pool(remote | {"urls": ["http://other:8000"]}).model_identity() == identity
    assert parse_pool(remote | {"revision": "2026-11"}).model_identity() != identity
    assert parse_pool(remote | {"served_model_name": "qwen-2"}).model_identity() != identity

    folder = fake_model_folder(tmp_path, layers=2)
    local = {"kind": "servers", "urls": ["http://127.0.0.1:8100"], "model": str(folder)}
    before = parse_pool(local).model_identity()
    (folder / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    assert parse_pool(local).model_identity() != before


def test_the_fingerprint_reads_small_files_and_only_the_size_of_weights(tmp_path):
    from prefcurate.inference.models import model_folder_fingerprint

    folder = fake_model_folder(tmp_path, layers=2)
    fingerprint = model_folder_fingerprint(folder)
    copy = fake_model_folder(tmp_path / "elsewhere", layers=2, name="renamed")
    assert model_folder_fingerprint(copy) == fingerprint  # the contents count, not the path
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\1" * weights.stat().st_size)  # same size: weights are not read
    assert model_folder_fingerprint(folder) == fingerprint
    weights.write_bytes(b"\1" * (weights.stat().st_size + 1))
    assert model_folder_fingerprint(folder) != fingerprint


def test_a_generator_or_judge_naming_another_model_than_its_pool_is_an_error(world):
    other = {"generate.generators": [{"name": "g", "pool": "generators", "model": "/models/other"}]}
    with pytest.raises(ValueError, match=r"generator 'g'.*pool 'generators'"):
        get_step("generate").plan(_context(world, world["first"], **other))
    judge = {"annotate.judges": [{"name": "j", "pool": "judges", "model": "default"}]}
    with pytest.raises(ValueError, match=r"judge 'j'.*pool 'judges'"):
        get_step("annotate").plan(_context(world, world["first"], **judge))
    # naming the pool's own model is accepted (configs written before the pool decided)
    same = {"generate.generators": [{"name": "g", "pool": "generators", "model": str(world["first"])}]}
    assert len(get_step("generate").plan(_context(world, world["first"], **same))) == 1


def test_self_preference_families_see_through_the_identity_suffix():
    from prefcurate.tasks.filter import model_family

    names = pl.DataFrame({"model": [EmbeddedPoolConfig(served_model_name="in-house-judge").model_identity(),
                                    EmbeddedPoolConfig(served_model_name="google/gemma-3-1b-it").model_identity()]})
    families = names.select(model_family(pl.col("model"), {"in-house-judge": "acme"}))["model"].to_list()
    assert families == ["acme", "gemma"]


def test_a_missing_critiq_file_is_named_when_the_config_loads_and_at_plan_time(world):
    from prefcurate.tasks import critiq

    from prefcurate.config import ConfigError

    pairs = world["tmp"] / "human_pairs.jsonl"
    on = {"score.critiq.enabled": True, "score.critiq.human_pairs": str(pairs)}
    with pytest.raises(ConfigError, match=r"score\.critiq\.human_pairs: file .*human_pairs\.jsonl does not exist"):
        _context(world, world["first"], **on)
    pairs.write_text(critiq.DEFAULT_HUMAN_PAIRS.read_text())
    ctx = _context(world, world["first"], **on)
    pairs.unlink()  # gone after the config was read
    with pytest.raises(FileNotFoundError, match=r"score\.critiq\.human_pairs: .*human_pairs\.jsonl"):
        get_step("score").plan(ctx)
