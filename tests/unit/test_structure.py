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
