"""Named inference pools: configuration models and the factory that opens an Engine.

A pool is either the embedded in-process engine (``kind: embedded``) or a list of
OpenAI-compatible ``vllm serve`` replicas (``kind: servers``). Pools are named in the
pipeline config (``generators``, ``judges``, ...); ``infra/vllm/pools.*.yaml`` hold
examples, and their ``launch:`` sections drive ``infra/vllm/launch.py``.

    engine = open_engine("judges", EngineConfig(kind="servers", urls=[...]))
    engine = open_engine("embedded", EngineConfig())          # the embedded default
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from prefcurate.inference.base import Engine
from prefcurate.inference.models import DEFAULT_MODEL_NAME, model_folder_fingerprint, resolve_model_path
from prefcurate.schemas.ids import content_id


class LaunchConfig(BaseModel):
    """How ``infra/vllm/launch.py`` starts this pool's replicas (mirrors its LaunchSpec)."""

    model_config = ConfigDict(extra="forbid")

    device: Literal["cpu", "cuda"] = "cpu"
    replicas: int = Field(1, ge=1)
    #: GPU indices, one replica per GPU (cuda); default 0..replicas-1
    gpus: list[int] | None = None
    host: str = "127.0.0.1"
    #: replica i listens on base_port + i
    base_port: int = 8100
    dtype: str | None = None
    #: VLLM_CPU_KVCACHE_SPACE in GiB (cpu)
    kv_cache_space_gb: int = 2
    gpu_memory_utilization: float | None = None
    max_num_seqs: int | None = None
    enable_prefix_caching: bool = True
    #: KV cache block in tokens (``--block-size``); default: 32 on cpu, vLLM's own on cuda
    block_size: int | None = Field(None, ge=1)
    #: extra command-line arguments for every replica
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)


class EngineConfig(BaseModel):
    """One named pool. Defaults describe the embedded Gemma 3 270M on CPU."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["embedded", "servers"] = "embedded"
    #: "default" (the embedded Gemma 3 270M folder) or a local model folder
    model: str = "default"
    #: the name the servers serve the model under (``--served-model-name``); also the
    #: model name recorded for provenance. Default: the model folder's name.
    served_model_name: str | None = None
    #: a declared model revision (a checkpoint tag, a date): part of the model identity. Set
    #: it, and change it when the model changes, for a server pool whose model folder is not
    #: on this host (its contents cannot be fingerprinted here)
    revision: str | None = None
    #: local tokenizer folder for client-side tokenization of server requests; "auto": the
    #: model folder when it exists here, else tokenize on the servers (``/tokenize``)
    tokenizer: str | None = "auto"
    #: prepend BOS when the tokenizer omits it ("auto": for gemma/llama/mistral families)
    add_bos: bool | Literal["auto"] = "auto"
    max_model_len: int = Field(1024, ge=16)
    #: passed to vLLM's sampling parameters of every generate request (e.g. ignore_eos)
    extra_sampling: dict[str, Any] = Field(default_factory=dict)

    # servers
    urls: list[str] = Field(default_factory=list)
    max_concurrency_per_replica: int = Field(8, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    retries: int = Field(3, ge=0)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(10.0, ge=0)
    health_interval_s: float = Field(5.0, gt=0)
    launch: LaunchConfig | None = None

    # embedded
    dtype: str = "float32"
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    #: VLLM_CPU_KVCACHE_SPACE in GiB unless the environment sets it
    kv_cache_space_gb: int = Field(2, ge=1)
    max_num_seqs: int | None = None
    #: KV cache block in tokens; default: 32 on vLLM's CPU platform (finer prefix-cache
    #: reuse, see vllm_engine.CPU_BLOCK_SIZE), vLLM's own elsewhere
    block_size: int | None = Field(None, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _servers_need_urls(self) -> "EngineConfig":
        if self.kind == "servers" and not self.urls:
            raise ValueError("a 'servers' pool needs at least one url")
        return self

    def provenance_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model == "default":
            return DEFAULT_MODEL_NAME
        return Path(self.model).name

    def model_identity(self) -> str:
        """Which model this pool serves, as unit keys and row ids hash it and rows record it
        (``model`` / ``judge_model``): ``<served name>@<12 hex>``.

        The hex digest covers the fingerprint of the model folder when it is on this host
        (:func:`~prefcurate.inference.models.model_folder_fingerprint`: config, tokenizer
        and chat template by content, weights by name and size), else the configured
        ``model``; the declared ``revision``; and the settings that change what the model
        answers (``dtype`` of an embedded engine, ``add_bos``, ``extra_sampling``).
        Computed at plan time without starting an engine or asking a server: a server pool
        whose folder lives elsewhere is identified by name, ``model`` and ``revision``.
        """
        return f"{self.provenance_name()}@{_identity_digest(self)}"


def _identity_digest(config: EngineConfig) -> str:
    try:
        folder = model_folder_fingerprint(resolve_model_path(config.model))
    except FileNotFoundError:  # a server-side path, or the default model not prepared yet
        folder = None
    return content_id(
        "model-identity", folder, None if folder else config.model, config.revision,
        config.dtype if config.kind == "embedded" else None, config.add_bos, config.extra_sampling,
    )[:12]


def bind_to_pools(specs: Sequence[Any], pools: dict[str, dict], what: str) -> list[Any]:
    """Generator or judge specs (``name``, ``pool``, ``model``) with ``model`` set to their
    pool's :meth:`EngineConfig.model_identity`: the pool decides which model runs.

    A spec's own ``model`` is optional and kept for configs written before; when given it
    must name the pool's model (its ``model``, served name or identity) and is an error
    naming the spec and pool otherwise, since the engine comes from the pool regardless.
    """
    bound = []
    for spec in specs:
        config = EngineConfig.model_validate(pools[spec.pool])
        identity = config.model_identity()
        if spec.model is not None and spec.model not in {config.model, config.provenance_name(), identity}:
            raise ValueError(
                f"{what} {spec.name!r} declares model {spec.model!r}, but its pool {spec.pool!r} "
                f"serves {config.model!r} ({identity}); the pool decides which model runs: drop "
                f"`model:` from the {what}, or point the pool at that model"
            )
        bound.append(spec.model_copy(update={"model": identity}))
    return bound


def concurrency_limits(pools: dict[str, dict]) -> dict[str, int]:
    """The Prefect global concurrency limit guarding each pool: ``pool-<name>`` -> slots.

    An embedded engine serves one unit at a time; a server pool one unit per replica.
    """
    limits = {}
    for name, pool in pools.items():
        config = EngineConfig.model_validate(pool)
        limits[f"pool-{name}"] = 1 if config.kind == "embedded" else len(config.urls)
    return limits


def open_engine(name: str, config: EngineConfig | dict | None = None) -> Engine:
    """Open the pool ``name``: the in-process engine or a client over its servers."""
    if config is None:
        config = EngineConfig()
    elif isinstance(config, dict):
        config = EngineConfig.model_validate(config)
    if config.kind == "embedded":
        from prefcurate.inference.vllm_engine import VLLMEngine

        return VLLMEngine(
            config.model,
            name=name,
            served_model_name=config.provenance_name(),
            max_model_len=config.max_model_len,
            dtype=config.dtype,
            enforce_eager=config.enforce_eager,
            enable_prefix_caching=config.enable_prefix_caching,
            kv_cache_space_gb=config.kv_cache_space_gb,
            max_num_seqs=config.max_num_seqs,
            block_size=config.block_size,
            seed=config.seed,
            add_bos=config.add_bos,
            extra_sampling=config.extra_sampling,
        )

    from prefcurate.inference.server_pool import ServerPool

    return ServerPool(
        name=name,
        urls=config.urls,
        model=config.provenance_name(),
        tokenizer=_client_tokenizer(config),
        max_concurrency_per_replica=config.max_concurrency_per_replica,
        timeout_s=config.timeout_s,
        connect_timeout_s=config.connect_timeout_s,
        retries=config.retries,
        backoff_base_s=config.backoff_base_s,
        backoff_max_s=config.backoff_max_s,
        health_interval_s=config.health_interval_s,
        max_model_len=config.max_model_len,
        extra_sampling=config.extra_sampling,
    )


def _client_tokenizer(config: EngineConfig):
    from prefcurate.inference.prompting import LocalPromptTokenizer

    if config.tokenizer is None:
        return None
    if config.tokenizer == "auto":
        try:
            folder = resolve_model_path(config.model)
        except FileNotFoundError:
            return None  # the model lives on the servers only: tokenize there
    else:
        folder = resolve_model_path(config.tokenizer)
    return LocalPromptTokenizer.from_folder(folder, config.add_bos)


def load_pools(path: str | Path) -> dict[str, EngineConfig]:
    """Read a pools YAML (``pools: {name: EngineConfig fields}``)."""
    import yaml

    document = yaml.safe_load(Path(path).read_text()) or {}
    return {name: EngineConfig.model_validate(body) for name, body in (document.get("pools") or {}).items()}
