from pathlib import Path

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


@pytest.mark.parametrize("yaml_text, located", [
    pytest.param(
        "dataset: x\ningest:\n  limit: 0\n  fields:\n    promt: text\nsurprise: 1\n",
        ["3: ingest.limit", "5: ingest.fields.promt: unknown key", "6: surprise: unknown key"],
        id="top-level",
    ),
    pytest.param(
        "generate:\n  generators:\n    - name: g\n      n: 0\nfilter:\n  strategy: best_of_all\n",
        ["4: generate.generators.0.n", "6: filter.strategy"],
        id="stage-section",
    ),
])
def test_config_errors_name_the_field_and_line(tmp_path, yaml_text, located):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    text = str(error.value)
    for where in located:
        assert f"{path}:{where}" in text


@pytest.mark.parametrize("path", ["examples/quickstart.yaml", "examples/gpu_cluster.yaml"])
def test_shipped_configs_are_valid(path):
    from prefcurate.stages import STAGES, load

    config = load_config(path)
    for spec in STAGES:  # every section parsed into its stage's params model
        assert isinstance(getattr(config, spec.name), load(spec.params))
    assert {"generators", "judges"} <= set(config.pools)


def test_the_built_in_defaults_name_only_pools_they_define():
    """`prefcurate build` without a config file runs on the embedded default: the stages'
    defaults name the pools `generators` and `judges`, and the default `pools` define both."""
    from prefcurate.tasks.annotate import check_judge_pools
    from prefcurate.tasks.generate import check_pools

    from prefcurate.config import _undefined_pool_references

    config = load_config(None)
    assert _undefined_pool_references(config, pools_given=True) == []
    check_pools(config.generate.generators, config.pools)  # what generate's plan checks first
    check_judge_pools(config.annotate.judges, config.pools, config.annotate)


def test_dotted_overrides_reach_list_items():
    config = load_config("examples/quickstart.yaml", {"generate.generators.1.n": 3, "ingest.limit": 5})
    assert config.generate.generators[1].n == 3 and config.ingest.limit == 5
    with pytest.raises(ConfigError, match="not an index"):
        load_config("examples/quickstart.yaml", {"generate.generators.7.n": 3})
    # a list the file leaves at its default: the override edits the default's item
    defaults = load_config(None)
    edited = load_config(None, {"generate.generators.0.n": defaults.generate.generators[0].n + 2})
    assert edited.generate.generators[0].n == defaults.generate.generators[0].n + 2
    assert edited.generate.generators[0].name == defaults.generate.generators[0].name


def test_an_error_in_an_override_names_the_override_not_a_line_of_the_file(tmp_path):
    for overrides, expected in (({"ingest.limt": 3}, "--set ingest.limt: unknown key"),
                                ({"ingest.limit": "abc"}, "--set ingest.limit: Input should be a valid integer"),
                                ({"generate.generators.0.n": -1}, "--set generate.generators.0.n: Input should be")):
        with pytest.raises(ConfigError) as raised:
            load_config("examples/quickstart.yaml", overrides)
        assert expected in str(raised.value) and "quickstart.yaml:" not in str(raised.value)
    typo = tmp_path / "typo.yaml"
    typo.write_text(Path("examples/quickstart.yaml").read_text().replace("  limit: 24", "  limt: 24"))
    with pytest.raises(ConfigError, match=r"typo.yaml:\d+: ingest.limt: unknown key"):  # the file's own keeps its line
        load_config(typo, {"ingest.max_chars": 100})


QUICKSTART = "examples/quickstart.yaml"
ALIAS_BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8))


def _quickstart_with(old: str, new: str) -> bytes:
    text = open(QUICKSTART, encoding="utf-8").read()
    assert old in text
    return text.replace(old, new, 1).encode()


# (case, file bytes (None: the path is a directory), expected error pattern)
BAD_CONFIGS = [
    ("alias_bomb", ALIAS_BOMB.encode(), r"c\.yaml:\d+: anchors and aliases expand past"),
    ("not_utf8", "name: caf\xe9\n".encode("latin-1"), r"c\.yaml:1: not UTF-8"),
    ("empty", b"  \n", r"c\.yaml: the config file is empty"),
    ("directory", None, r"is a directory"),
    ("duplicate_key", b"seed: 1\nname: x\nseed: 2\n", r"c\.yaml:3: seed: duplicate key \(first given on line 1\)"),
    ("min_above_max", b"ingest:\n  min_chars: 50\n  max_chars: 10\n", r"c\.yaml:1: ingest: .*min_chars \(50\) is greater"),
    ("negative_size", b"ingest:\n  max_chars: -5\n", r"c\.yaml:2: ingest\.max_chars"),
    ("zero_shard_rows", b"ingest:\n  shard_rows: 0\n", r"c\.yaml:2: ingest\.shard_rows"),
    ("undefined_judge_pool", _quickstart_with("{name: judge-reply, pool: judges", "{name: judge-reply, pool: nojudges"),
     r"c\.yaml:\d+: annotate\.judges\.1\.pool: pool 'nojudges' is not defined"),
    ("undefined_score_pool", _quickstart_with("  pool: judges", "  pool: scorers"),
     r"c\.yaml:\d+: score\..*pool: pool 'scorers' is not defined"),
    ("missing_model_folder", _quickstart_with("model: default ", "model: /nonexistent/model "),
     r"c\.yaml:\d+: pools\.\w+\.model: model folder /nonexistent/model does not exist"),
    ("missing_gold_file", _quickstart_with("annotate:\n", "annotate:\n  gold_path: /nonexistent/gold.jsonl\n"),
     r"c\.yaml:\d+: annotate\.gold_path: file /nonexistent/gold\.jsonl does not exist"),
    ("missing_judge_gold_file", _quickstart_with(
        "{name: judge-reply, pool: judges, template: pairwise_v2}",
        "{name: judge-reply, pool: judges, mode: density_ratio, mode_options: {gold_path: /nonexistent/g.jsonl}}"),
     r"c\.yaml:\d+: annotate\.judges\.1\.mode_options\.gold_path: file /nonexistent/g\.jsonl does not exist"),
]


@pytest.mark.parametrize("case,content,expected", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_configs_are_refused_before_any_work(tmp_path, case, content, expected):
    path = tmp_path / "c.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_an_override_below_a_scalar_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"override 'seed\.x': 'seed' is a value"):
        load_config(QUICKSTART, {"seed.x": 1})


def test_aliases_within_the_budget_still_work(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"ingest: &base\n  max_chars: 100\nname: &n demo\ndataset: *n\n")
    config = load_config(path)
    assert config.ingest.max_chars == 100 and config.dataset == "demo"
