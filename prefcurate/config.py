"""The pipeline config: one YAML file, validated by pydantic.

Errors name the field and the line: ``examples/x.yaml:12: generate.generators.0.n: Input
should be greater than or equal to 1``. Unknown keys are errors everywhere (a typo must not
silently fall back to a default).

Stage sections are the stage's own parameter models, defined beside the stage logic in
``tasks/`` and named by the stage registry (``prefcurate/stages.py``), so one place
documents each parameter; pools are one of the kinds in ``inference/pool_kinds.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from prefcurate.errors import InputError
from prefcurate.inference.pool_kinds import PoolConfig, pool_kind_names
from prefcurate.inference.pools import EmbeddedPoolConfig
from prefcurate.stages import STAGE_NAMES, STAGES, load, stage_spec
from prefcurate.tasks.annotate import AnnotateParams
from prefcurate.tasks.estimate import BudgetConfig
from prefcurate.tasks.export_config import ExportParams
from prefcurate.tasks.filter import FilterParams
from prefcurate.tasks.generate import GenerateParams
from prefcurate.tasks.ingest import IngestParams
from prefcurate.tasks.score import ScoreParams
from prefcurate.tasks.selection import SelectParams


class ConfigError(InputError):
    """The config is unusable; the message names file:line: field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExecutorConfig(Strict):
    """Where shard tasks run: a Dask LocalCluster here, or an existing scheduler by address."""

    kind: Literal["dask", "sequential"] = "dask"
    address: str | None = Field(None, description="tcp://host:8786 of an existing Dask scheduler")
    n_workers: int = Field(1, ge=1, description="LocalCluster worker processes")
    threads_per_worker: int = Field(1, ge=1)
    model_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Dask worker resources a unit needs when it runs an embedded model, e.g. "
                    "{GPU: 1}: such units go only to workers started with `--resources GPU=1`",
    )


class PipelineConfig(Strict):
    """Everything a build needs. See examples/quickstart.yaml for a commented example.

    Typed all the way down: each stage section is its stage's params model (listed in the
    stage registry, :mod:`prefcurate.stages`), each pool one kind of the pool union, so the
    JSON schema (the Prefect UI form) shows every parameter and ``config.generate`` is a
    :class:`GenerateParams` wherever it is read.
    """

    name: str = "prefcurate"
    dataset: str = Field("datasets/quickstart", description="dataset directory (created if missing)")
    seed: int = 0
    pools: dict[str, PoolConfig] = Field(
        # the pools the stages' defaults name (equal settings: one engine serves both)
        default_factory=lambda: {"generators": EmbeddedPoolConfig(), "judges": EmbeddedPoolConfig()},
        description="named inference pools, each one kind (`kind:`): an embedded engine, a list of vLLM servers, ...",
    )
    stages: list[str] = Field(
        default_factory=lambda: list(STAGE_NAMES),
        description="stages `build` runs, in order",
    )
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    contracts: bool = Field(True, description="run the Great Expectations gates on every shard before it is written")
    export_dir: str | None = Field(None, description="where `export` writes; default DATASET/export")
    budget: BudgetConfig = Field(default_factory=BudgetConfig, description="spend cap over priced pools (USD)")

    # one section per stage of the registry (checked below, at import)
    ingest: IngestParams = Field(default_factory=IngestParams)
    generate: GenerateParams = Field(default_factory=GenerateParams)
    annotate: AnnotateParams = Field(default_factory=AnnotateParams)
    filter: FilterParams = Field(default_factory=FilterParams)
    score: ScoreParams = Field(default_factory=ScoreParams)
    select: SelectParams = Field(default_factory=SelectParams)
    export: ExportParams = Field(default_factory=ExportParams)

    @model_validator(mode="after")
    def _known_stages(self) -> PipelineConfig:
        unknown = [s for s in self.stages if s not in STAGE_ORDER]
        if unknown:
            raise ValueError(f"unknown stages {unknown}; known: {STAGE_ORDER}")
        return self

    def dataset_path(self, base: Path | None = None) -> Path:
        path = Path(self.dataset).expanduser()
        return path if path.is_absolute() or base is None else base / path

    def section(self, name: str) -> BaseModel:
        """The params model of stage ``name`` (prefer the typed attribute, ``config.generate``)."""
        return getattr(self, stage_spec(name).name)


STAGE_ORDER = list(STAGE_NAMES)


def _sections_match_the_registry() -> None:
    """Each registered stage has its section, typed with the params model the registry names."""
    for spec in STAGES:
        field = PipelineConfig.model_fields.get(spec.name)
        if field is None or field.annotation is not load(spec.params):
            raise TypeError(f"PipelineConfig.{spec.name} must be typed {spec.params} (prefcurate/stages.py)")


_sections_match_the_registry()


# ---- loading with line numbers ------------------------------------------------------------

#: the most YAML nodes a config may expand to through anchors and aliases; a real config has
#: a few hundred, an alias bomb of 300 bytes billions
MAX_EXPANDED_NODES = 20_000


def _refuse_alias_bombs(text: str, source: str) -> None:
    """Count the nodes the document expands to from its event stream, before anything builds
    it: an alias adds the size of its anchor, so the count (and the time) stays bounded."""
    anchor_sizes: dict[str, int] = {}
    open_nodes: list[list] = []  # [expanded size so far, anchor] of each open mapping/sequence
    total = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            open_nodes.append([1, event.anchor])
            continue
        if isinstance(event, yaml.AliasEvent):
            size = anchor_sizes.get(event.anchor, 1)
        elif isinstance(event, yaml.ScalarEvent):
            size = 1
            if event.anchor:
                anchor_sizes[event.anchor] = 1
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            size, anchor = open_nodes.pop()
            if anchor:
                anchor_sizes[anchor] = size
        else:
            continue
        if open_nodes:
            open_nodes[-1][0] += size
            total_now = open_nodes[-1][0]
        else:
            total += size
            total_now = total
        if total_now > MAX_EXPANDED_NODES:
            raise ConfigError(
                f"{source}:{event.start_mark.line + 1}: anchors and aliases expand past "
                f"{MAX_EXPANDED_NODES} nodes; write the config out without aliases"
            )


def _refuse_duplicate_keys(node: yaml.Node, source: str, seen: set | None = None) -> None:
    seen = set() if seen is None else seen
    if id(node) in seen:  # an aliased node is checked once
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                line = key.start_mark.line + 1
                if key.value in first_line:
                    raise ConfigError(
                        f"{source}:{line}: {key.value}: duplicate key (first given on line "
                        f"{first_line[key.value]}); keep one"
                    )
                first_line[key.value] = line
            _refuse_duplicate_keys(value, source, seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, source, seen)


def _read_config_text(path: Path) -> str:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if path.is_dir():
        raise ConfigError(f"config {path} is a directory; give a YAML file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 (byte {error.start}); save the config as UTF-8") from None
    if not text.strip():
        raise ConfigError(f"{path}: the config file is empty")
    return text


def _line_index(node: yaml.Node, path: tuple = ()) -> dict[tuple, int]:
    """Map every key path in a YAML document to its 1-based line."""
    lines = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = path + (key.value,)
            lines[child] = key.start_mark.line + 1
            lines.update({k: v for k, v in _line_index(value, child).items() if k != child})
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.update(_line_index(item, path + (index,)))
    return lines


def _line_of(lines: dict[tuple, int], loc: tuple) -> int | None:
    loc = tuple(int(p) if isinstance(p, str) and p.isdigit() else p for p in loc)
    for cut in range(len(loc), -1, -1):
        key = tuple(str(p) if not isinstance(p, int) else p for p in loc[:cut])
        if key in lines:
            return lines[key]
    return None


def format_errors(items: list[dict], source: str, lines: dict[tuple, int], overrides: Iterable[str] = ()) -> str:
    """One line per error: where (``file:line``, or the ``--set`` override that put the value
    there), the field and what is wrong."""
    set_by = {tuple(dotted.split(".")): dotted for dotted in overrides}
    messages = []
    for item in items:
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        if len(loc) > 2 and loc[0] == "pools" and loc[2] in pool_kind_names():
            loc = loc[:2] + loc[3:]  # the union's tag: the pool's `kind`, not a key of the file
        # an override at the field, inside it, or one that made the structure around it
        given = [dotted for path, dotted in set_by.items()
                 if tuple(map(str, loc[:len(path)])) == path or tuple(map(str, loc)) == path[:len(loc)]]
        line = _line_of(lines, loc)
        where = f"--set {given[0]}" if given else f"{source}:{line}" if line else source
        field = ".".join(str(p) for p in loc) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see examples/quickstart.yaml)"
        messages.append(f"{where}: {message}" if given and given[0] == field else f"{where}: {field}: {message}")
    return "invalid config:\n  " + "\n  ".join(messages)


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> PipelineConfig:
    """Load and validate a config file (or the defaults), with optional dotted overrides."""
    data: dict = {}
    lines: dict[tuple, int] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        text = _read_config_text(path)
        try:
            _refuse_alias_bombs(text, source)  # before anything expands the document
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            if node is not None:
                _refuse_duplicate_keys(node, source)
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        lines = _line_index(node) if node is not None else {}
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_errors(error.errors(), source, lines, overrides or {})) from None
    # what the config refers to exists here, checked once before any work
    errors = (_missing_model_folders(config) + _missing_data_files(config)
              + _undefined_pool_references(config, "pools" in data))
    errors = errors or _unservable_judge_modes(config)
    if errors:
        raise ConfigError(format_errors(errors, source, lines, overrides or {}))
    return config


def _unservable_judge_modes(config: PipelineConfig) -> list[dict]:
    """A judge whose mode its pool cannot serve (e.g. a reward-model judge on a generative
    model's pool): the mode's plan-time check (``JudgeMode.check_pool``), here so that it
    stops a build before its first stage, not at annotate after generation."""
    if "annotate" not in config.stages:
        return []
    from prefcurate.tasks.annotate import judge_mode

    errors = []
    for index, judge in enumerate(config.annotate.judges):
        if judge.pool not in config.pools:
            continue  # a defaulted pool name (see _undefined_pool_references)
        try:
            judge_mode(judge, config.annotate).check_pool(judge.pool, config.pools[judge.pool], judge.name)
        except (ValueError, FileNotFoundError) as error:
            errors.append(_error(("annotate", "judges", index, "pool"), str(error)))
    return errors


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    """``generate.generators.0.n = 3``: dict keys by name, list items by index."""
    keys = dotted.split(".")
    cursor: Any = data
    for position, key in enumerate(keys):
        last = position == len(keys) - 1
        if isinstance(cursor, list):
            if not key.isdigit() or int(key) >= len(cursor):
                raise ConfigError(f"override {dotted!r}: {key!r} is not an index of that list (0..{len(cursor) - 1})")
            if last:
                cursor[int(key)] = value
            else:
                cursor = cursor[int(key)]
        elif not isinstance(cursor, dict):
            parent = ".".join(keys[:position])
            raise ConfigError(f"override {dotted!r}: {parent!r} is a value ({cursor!r}), not a section")
        elif last:
            cursor[key] = value
        else:
            if key not in cursor and keys[position + 1].isdigit():  # an item of a list left at its default
                cursor[key] = _default_at(keys[: position + 1])
            cursor = cursor.setdefault(key, {})


def _default_at(keys: list[str]) -> Any:
    """The built-in default at ``keys`` (JSON-like, a fresh copy), or None past it."""
    value: Any = PipelineConfig().model_dump(mode="json")
    for key in keys:
        value = value[int(key)] if isinstance(value, list) and key.isdigit() and int(key) < len(value) else \
            value.get(key) if isinstance(value, dict) else None
    return value if value is not None else {}


def _missing_data_files(config: PipelineConfig) -> list[dict]:
    """Labelled-data files the stages that run would read (gold pairs, CritiQ's human pairs
    and seed criteria): a missing one is said now, not after the stages before it ran."""
    wanted: list[tuple[tuple, str | None]] = []
    if "annotate" in config.stages:
        wanted.append((("annotate", "gold_path"), config.annotate.gold_path))
        for index, judge in enumerate(config.annotate.judges):
            wanted.append((("annotate", "judges", index, "mode_options", "gold_path"),
                           judge.mode_options.get("gold_path")))
    critiq = config.score.critiq
    if "score" in config.stages and critiq.enabled:
        wanted += [(("score", "critiq", "human_pairs"), critiq.human_pairs),
                   (("score", "critiq", "seed_criteria"), critiq.seed_criteria)]
    return [_error(loc, f"file {path} does not exist") for loc, path in wanted
            if isinstance(path, str) and path and not Path(path).expanduser().is_file()]


def _missing_model_folders(config: PipelineConfig) -> list[dict]:
    errors = []
    for name, pool in config.pools.items():
        if pool.kind == "embedded" and pool.model != "default" and not Path(pool.model).expanduser().is_dir():
            errors.append(_error(("pools", name, "model"),
                                 f"model folder {pool.model} does not exist (an embedded pool loads a local folder)"))
    return errors


def _error(loc: tuple, message: str) -> dict:
    return {"loc": loc, "msg": message, "type": "value_error"}


def _undefined_pool_references(config: PipelineConfig, pools_given: bool) -> list[dict]:
    """Every `pool:` a stage section names must be one of `pools`, checked before any work.

    Pools named in the file are checked; defaulted ones too when the file defines `pools`
    and the stage is one that runs (a file's own `pools` may lack those the defaults name).
    """
    errors: list[dict] = []
    defined = set(config.pools)
    check_defaults = pools_given

    def walk(value: Any, loc: tuple, in_stage: bool) -> None:
        if isinstance(value, BaseModel):
            for name in type(value).model_fields:
                child = getattr(value, name)
                explicit = name in value.model_fields_set
                if name == "pool" and isinstance(child, str):
                    if child not in defined and (explicit or (check_defaults and in_stage)):
                        errors.append(_error(loc + (name,), f"pool {child!r} is not defined under `pools` "
                                                            f"(defined: {sorted(defined)})"))
                elif explicit or check_defaults:
                    walk(child, loc + (name,), in_stage)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, loc + (index,), in_stage)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, loc + (key,), in_stage)

    for name in STAGE_NAMES:
        walk(getattr(config, name), (name,), name in config.stages)
    return errors


def section(config: PipelineConfig, name: str) -> BaseModel:
    """The parsed parameter model of a stage section (``config.<name>``, typed)."""
    return config.section(name)
