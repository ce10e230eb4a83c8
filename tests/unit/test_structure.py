"""The stage registry and the typed config: one list of stages, one union of pool kinds."""

from __future__ import annotations

import importlib

import pytest
from pydantic import ValidationError

from prefcurate.config import STAGE_ORDER, ConfigError, PipelineConfig, load_config
from prefcurate.inference.pool_kinds import POOL_KINDS, parse_pool, pool_kind_names
from prefcurate.inference.pools import EmbeddedPoolConfig, ServersPoolConfig
from prefcurate.stages import STAGE_NAMES, STAGES, load
from prefcurate.steps import available_stages, get_step


def test_every_list_of_stages_is_the_registry():
    assert STAGE_ORDER == list(STAGE_NAMES) == available_stages() == PipelineConfig().stages
    for spec in STAGES:
        step = get_step(spec.name)
        assert step.name == spec.name
        # the config section is typed with the params model the registry names
        assert type(getattr(PipelineConfig(), spec.name)) is load(spec.params)
        flow = load(spec.flow)
        assert flow.name == spec.name and importlib.import_module(spec.flow.split(":")[0])


def test_an_unknown_stage_names_the_known_ones():
    with pytest.raises(KeyError, match="known: \\['ingest'"):
        get_step("dedupe")
    with pytest.raises(ConfigError, match="unknown stages \\['dedupe'\\]"):
        load_config(None, {"stages": ["ingest", "dedupe"]})


def test_sections_and_pools_are_typed_models(tmp_path):
    config = load_config("examples/quickstart.yaml", {
        "pools.remote": {"kind": "servers", "urls": ["http://gpu:8000"]},
        "pools.local": {"model": "default"},  # no kind: the embedded engine
    })
    assert type(config.generate).__name__ == "GenerateParams" and config.generate.generators
    assert isinstance(config.pools["remote"], ServersPoolConfig)
    assert isinstance(config.pools["local"], EmbeddedPoolConfig)
    # the dump a worker receives parses back into the same kinds
    again = PipelineConfig.model_validate(config.model_dump(mode="json"))
    assert again.pools == config.pools and again.generate == config.generate


def test_pool_errors_name_the_pool_field_not_the_union_tag(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pools:\n  judges:\n    kind: servers\n    urls: [http://x]\n    dtype: float16\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:5: pools\.judges\.dtype: unknown key"):
        load_config(path)
    path.write_text("pools:\n  judges:\n    kind: tpu\n")
    with pytest.raises(ConfigError, match=r"pools\.judges: .*'tpu'.*'embedded', 'servers'"):
        load_config(path)


def test_each_pool_kind_declares_its_tag_and_slots():
    assert pool_kind_names() == [kind.model_fields["kind"].default for kind in POOL_KINDS]
    assert len(set(pool_kind_names())) == len(POOL_KINDS)
    assert parse_pool(None).concurrency_slots() == 1
    assert parse_pool({"kind": "servers", "urls": ["http://a", "http://b"]}).concurrency_slots() == 2
    with pytest.raises(ValidationError, match="needs at least one url"):
        parse_pool({"kind": "servers"})


def test_the_ui_form_schema_shows_stage_parameters_and_pool_kinds():
    schema = PipelineConfig.model_json_schema()
    properties = schema["properties"]
    for name in STAGE_NAMES:
        assert "$ref" in properties[name] or "allOf" in properties[name], name  # a model, not a free dict
    generate = schema["$defs"]["GenerateParams"]["properties"]
    assert "generators" in generate
    pool_union = properties["pools"]["additionalProperties"]
    kinds = {ref["$ref"].rsplit("/", 1)[-1] for ref in pool_union["oneOf"]}
    assert kinds == {kind.__name__ for kind in POOL_KINDS}


# ---- stage stats, reports, flows ---------------------------------------------------------

def test_stage_stats_merge_units_without_dropping_values():
    from prefcurate.steps.base import StageStats, UnitResult

    stats = StageStats()
    stats.add_unit(UnitResult("unit-a", [], {"rows": 3, "ok": True, "report": {"drops": 1}, "note": "x"},
                              model_seconds=1.5))
    stats.add_unit(UnitResult("unit-b", [], {"rows": 4, "report": {"drops": 2}}, model_seconds=0.5))
    stats.add({"calibrated": 2}, "finalize")
    assert stats.counts == {"rows": 7, "ok": 1, "calibrated": 2}
    assert stats.timings == {"model_seconds": 2.0}
    # both units' reports of one name are kept, each under its unit
    assert stats.reports == {"report": {"unit-a": {"drops": 1}, "unit-b": {"drops": 2}}, "note": {"unit-a": "x"}}
    summary = stats.summary()
    assert summary["rows"] == 7 and summary["model_seconds"] == 2.0
    assert summary["reports"]["note"] == "x" and set(summary["reports"]["report"]) == {"unit-a", "unit-b"}


def test_stage_reports_have_a_table_of_their_own(tmp_path):
    import duckdb

    from prefcurate.report import status_text
    from prefcurate.store import Store

    store = Store.init(tmp_path / "ds")
    older = store.start_run("filter")
    store.record_reports(older, "filter", {"report": {"unit-1": {"drops_per_reason": {"too_close": 1}}}})
    store.finish_run(older, "completed", {"pairs": 1}, {"seconds": 1.0})
    newer = store.start_run("filter")
    store.record_reports(newer, "filter", {"report": {"unit-2": {"drops_per_reason": {"too_close": 5}}}})
    store.finish_run(newer, "completed", {"pairs": 3}, {"seconds": 1.0})
    assert store.latest_reports("filter", "report") == [{"drops_per_reason": {"too_close": 5}}]
    assert store.latest_reports("select", "report") == []
    # a dataset made before the table existed gains it on open, and `status` works
    with duckdb.connect(str(store.catalog)) as con:
        con.execute("DROP TABLE stage_reports")
        con.execute("UPDATE _meta SET value = 'older' WHERE key = 'schema'")
    from prefcurate import store as store_module

    store_module._checked_catalogs.clear()
    reopened = Store.open(tmp_path / "ds")
    assert reopened.latest_reports("filter", "report") == []
    assert "recent runs" in status_text(reopened)


def test_unit_task_runs_are_named_by_stage_and_key():
    from prefcurate.flows.common import UNIT_NAME_KEY_CHARS, run_unit_task, unit_run_name

    from prefcurate.steps.base import Unit

    unit = Unit("generate", "3f9a0c1b2d4e5f60718293a4b5c6d7e8", ("responses",))
    assert run_unit_task.task_run_name is unit_run_name
    assert unit_run_name({"stage": "generate", "unit": unit, "ctx": None}) == "generate-3f9a0c1b2d4e"
    assert UNIT_NAME_KEY_CHARS == 12


def test_each_stage_flow_shows_its_parameters_in_the_ui_form():
    from prefect.utilities.callables import parameter_schema

    for spec in STAGES:
        schema = parameter_schema(load(spec.flow)).model_dump()
        assert set(schema["properties"]) == {"parameters", "stage_params", "cluster", "parent_run"}, spec.name
        params_model = load(spec.params)
        assert params_model.__name__ in schema["definitions"], spec.name
        shown = schema["definitions"][params_model.__name__]["properties"]
        assert set(shown) == set(params_model.model_fields), spec.name


def test_stage_params_given_in_the_form_override_the_config_section():
    from prefcurate.flows.common import RunParameters
    from prefcurate.flows.stage import with_stage_params
    from prefcurate.tasks.ingest import IngestParams

    parameters = RunParameters(config_path="examples/quickstart.yaml", dataset="unused",
                               overrides={"ingest.limit": 50})
    merged = with_stage_params(parameters, "ingest", IngestParams(limit=7))
    assert merged.overrides == {"ingest.limit": 7}
    assert with_stage_params(parameters, "ingest", None) is parameters
    from prefcurate.config import load_config

    config = load_config(merged.config_path, merged.overrides)
    assert config.ingest.limit == 7 and config.ingest.path == load_config("examples/quickstart.yaml").ingest.path


def test_prefect_yaml_deploys_every_registered_stage_under_a_unique_name():
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[2]
    deployments = yaml.safe_load((repo / "prefect.yaml").read_text())["deployments"]
    names = [d["name"] for d in deployments]
    assert len(names) == len(set(names))  # `prefect deploy --name <one>` finds exactly one
    entrypoints = {d["name"]: d["entrypoint"] for d in deployments}
    for spec in STAGES:
        module, function = spec.flow.split(":")
        assert entrypoints[f"{spec.name}-adhoc"] == f"flows/{module.rsplit('.', 1)[1]}.py:{function}"
        assert (repo / "flows" / f"{spec.name}.py").is_file()
