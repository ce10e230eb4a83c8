import pytest

from prefcurate.config import ConfigError, load_config
from prefcurate.sql import ReadOnlyViolation, run_read_only
from prefcurate.store import Store


@pytest.mark.parametrize("query", [
    "DROP TABLE runs",
    "INSERT INTO runs VALUES ('x')",
    "COPY (SELECT 1) TO 'out.csv'",
    "ATTACH 'other.duckdb' AS other",
    "DELETE FROM runs",
    "CREATE TABLE t AS SELECT 1",
    "SELECT 1; DROP TABLE runs",
])
def test_sql_refuses_writes(tmp_path, query):
    store = Store.init(tmp_path / "ds")
    with pytest.raises(ReadOnlyViolation):
        run_read_only(store, query)
    assert run_read_only(store, "SELECT count(*) AS n FROM runs")["n"][0] == 0


def test_sql_cannot_read_files_outside_the_dataset(tmp_path):
    store = Store.init(tmp_path / "ds")
    (tmp_path / "secret.csv").write_text("a\n1\n")
    with pytest.raises(Exception, match="(?i)permission|disabled"):
        run_read_only(store, f"SELECT * FROM read_csv('{tmp_path / 'secret.csv'}')")


def test_config_errors_name_the_field_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: x\ningest:\n  limit: 0\n  fields:\n    promt: text\nsurprise: 1\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    text = str(error.value)
    assert f"{path}:3: ingest.limit" in text
    assert f"{path}:5: ingest.fields.promt: unknown key" in text
    assert f"{path}:6: surprise: unknown key" in text


@pytest.mark.parametrize("path", ["examples/quickstart.yaml", "examples/gpu_cluster.yaml"])
def test_shipped_configs_are_valid(path):
    from prefcurate.config import section

    config = load_config(path)
    for name in ("generate", "annotate", "filter", "score", "select", "export"):
        section(config, name)
    assert {"generators", "judges"} <= set(config.pools)


def test_stage_section_errors_name_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("generate:\n  generators:\n    - name: g\n      n: 0\nfilter:\n  strategy: best_of_all\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    text = str(error.value)
    assert f"{path}:4: generate.generators.0.n" in text
    assert f"{path}:6: filter.strategy" in text


def test_dotted_overrides_reach_list_items():
    from prefcurate.config import section

    config = load_config("examples/quickstart.yaml", {"generate.generators.1.n": 3, "ingest.limit": 5})
    assert section(config, "generate").generators[1].n == 3 and config.ingest.limit == 5
    with pytest.raises(ConfigError, match="not an index"):
        load_config("examples/quickstart.yaml", {"generate.generators.7.n": 3})
