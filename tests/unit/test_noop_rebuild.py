"""A finished build re-run with the same config does nothing, before Prefect or Dask start.

A small build runs every stage unit by unit as the coordinator does (plan -> pending ->
run_unit -> register with the unit's counts), with the instant engine double for the models
(tests/support: what is under test is planning, not a model). Then ``prefcurate build`` runs
in this process with Prefect's API and the Dask cluster replaced by functions that raise: a
finished dataset must not reach them, and must change no table; a dataset with a new prompt
must reach them (it has work).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from prefcurate.config import load_config
from prefcurate.stages import STAGE_NAMES
from prefcurate.steps.build_plan import plan_build
from prefcurate.store import Store
from tests.unit.stage_runs import run_every_stage

PROMPTS = 12


class PrefectStarted(Exception):
    """Raised where the build would start Prefect's API or a Dask cluster."""


@pytest.fixture
def instant_models(monkeypatch):
    from prefcurate.tasks import embed

    from prefcurate.inference import pools
    from tests.support.instant_engine import InstantEngine, instant_embed_texts

    monkeypatch.setattr(pools, "open_engine", lambda name, config=None: InstantEngine(f"instant-{name}"))
    monkeypatch.setattr(embed, "embed_texts", instant_embed_texts)


@pytest.fixture
def no_prefect(monkeypatch):
    """Prefect's API and the cluster raise if reached; no watchdog is started for pytest."""
    from prefcurate.flows import common

    from prefcurate import procwatch

    def started(*args, **kwargs):
        raise PrefectStarted()

    monkeypatch.setattr(common, "start_prefect_api", started)
    monkeypatch.setattr(common, "dask_cluster", started)
    monkeypatch.setattr(procwatch, "start_watchdog", lambda dataset: None)


def _write_prompts(path: Path, n: int) -> None:
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"explain topic {i} in steps"}) + "\n"
                            for i in range(n)))


def _config(tmp_path: Path) -> Path:
    settings = yaml.safe_load((Path(__file__).parents[2] / "examples" / "quickstart.yaml").read_text())
    settings["ingest"].pop("limit", None)
    settings["ingest"].update(path=str(tmp_path / "prompts.jsonl"), shard_rows=6)
    settings.setdefault("filter", {})["calibration"] = {"gate": "warn"}  # hashed verdicts: chance on gold
    settings.setdefault("export", {})["integrity"] = {"action": "off"}  # no tokenizer to load
    settings.update(contracts=False, dataset=str(tmp_path / "ds"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def _build(store: Store, config_path: Path) -> dict[str, int]:
    return run_every_stage(store, load_config(str(config_path)), str(config_path))


def _catalog(store: Store) -> tuple:
    return (store.query("SELECT table_name, shard_key, path, rows FROM _shards ORDER BY ALL").rows(),
            store.query("SELECT stage, unit_key, counts FROM unit_counts ORDER BY ALL").rows())


def _cli_build(config_path: Path, command: tuple[str, ...] = ("build",)):
    from prefcurate.cli import app

    return CliRunner().invoke(app, [*command, "-c", str(config_path)])


def test_a_finished_build_rerun_does_nothing_and_a_new_prompt_makes_work(tmp_path, instant_models, no_prefect):
    _write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    config_path = _config(tmp_path)
    store = Store.init(tmp_path / "ds")
    first = _build(store, config_path)
    assert all(first.values()), first  # every stage had work, export included
    assert store.count("pairs") > 0 and (tmp_path / "ds" / "export").exists()
    assert _build(store, config_path) == {stage: 0 for stage in STAGE_NAMES}  # the export is not redone

    before = _catalog(store)
    result = _cli_build(config_path)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "nothing to do: every stage is up to date" in result.output
    assert _catalog(store) == before  # no shard and no unit recorded
    build_run = store.runs().filter(kind="build").to_dicts()[-1]
    assert build_run["status"] == "completed" and "nothing to do" in build_run["message"]
    assert json.loads(build_run["counts"])["generate"] == {"units": 2, "units_skipped": 2}
    for command in (("export",), ("run", "annotate")):  # a stage alone: the same, for that stage
        result = _cli_build(config_path, command)
        assert result.exit_code == 0 and '"nothing_to_do": true' in result.output, (result.output, result.exception)
    assert _catalog(store) == before
    assert [run["kind"] for run in store.runs().to_dicts()[-2:]] == ["export", "annotate"]

    # the export's files are gone: the export (only) is pending
    for path in (tmp_path / "ds" / "export" / "data").iterdir():
        path.unlink()
    plan = plan_build(load_config(str(config_path)), store, list(STAGE_NAMES))
    assert not plan.complete and plan.stages[-1] == ("export", 1, 1)
    assert _build(store, config_path)["export"] == 1

    # one prompt more in the input file: ingest has work, so the build goes on to Prefect
    _write_prompts(tmp_path / "prompts.jsonl", PROMPTS + 1)
    plan = plan_build(load_config(str(config_path)), store, list(STAGE_NAMES))
    assert not plan.complete and plan.stages == [("ingest", 1, 1)]
    result = _cli_build(config_path)
    assert isinstance(result.exception, PrefectStarted), (result.output, result.exception)
    again = _build(store, config_path)
    assert again["ingest"] == again["generate"] == 1 and again["export"] == 1, again
    assert store.count("prompts") == PROMPTS + 1
    assert "nothing to do" in _cli_build(config_path).output


def _plan_reading_no_shard(monkeypatch, config, store):
    """``plan_build`` with every way to read table rows refused; (the plan, the reads tried)."""
    import polars as pl

    reads = []

    def refused(name):
        def refuse(*args, **kwargs):
            reads.append(name)
            raise AssertionError(f"planning read rows: {name}")
        return refuse

    with monkeypatch.context() as patch:
        for owner, name in ((Store, "query"), (Store, "read"), (Store, "read_shard"), (pl, "scan_parquet"),
                            (pl, "read_parquet")):
            patch.setattr(owner, name, refused(name))
        return plan_build(config, store, list(STAGE_NAMES)), reads


def test_planning_a_finished_build_reads_the_registry_not_the_shards(tmp_path, instant_models, monkeypatch):
    from prefcurate.steps import model_stages

    _write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    config_path = _config(tmp_path)
    config = load_config(str(config_path))
    store = Store.init(tmp_path / "ds")
    _build(store, config_path)
    plan, reads = _plan_reading_no_shard(monkeypatch, config, store)
    assert plan.complete and not reads, (plan, reads)

    # a new prompt shard is a new registry state: the lookups are made again, then remembered
    looked_up = []
    lookups = model_stages._prompt_ids_by_shard
    monkeypatch.setattr(model_stages, "_prompt_ids_by_shard", lambda *a: looked_up.append(1) or lookups(*a))
    _write_prompts(tmp_path / "prompts.jsonl", PROMPTS + 1)
    ran = _build(store, config_path)
    assert ran["generate"] == 1 and looked_up
    plan, reads = _plan_reading_no_shard(monkeypatch, config, store)
    assert plan.complete and not reads, (plan, reads)
