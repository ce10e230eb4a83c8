"""Named inference pools: configuration models and the factory that opens an Engine.

A pool is one of the kinds registered in :mod:`prefcurate.inference.pool_kinds` (a
discriminated union by ``kind``): the embedded in-process engine (``kind: embedded``), a list
of OpenAI-compatible ``vllm serve`` replicas (``kind: servers``), ... Pools are named in the
pipeline config (``generators``, ``judges``, ...); ``infra/vllm/pools.*.yaml`` hold
examples, and their ``launch:`` sections drive ``infra/vllm/launch.py``.

    engine = open_engine("judges", ServersPoolConfig(urls=[...]))
    engine = open_engine("embedded", EmbeddedPoolConfig())    # the embedded default
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

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


class PoolConfigBase(BaseModel):
    """What every pool kind has: the model it serves and how that model is identified.

    A kind is a subclass with ``kind: Literal["<name>"]``, its own fields, and ``open`` (the
    Engine) and ``concurrency_slots``; it is registered in :mod:`prefcurate.inference.pool_kinds`.
    """

    model_config = ConfigDict(extra="forbid")

    kind: str
    #: "default" (the embedded Gemma 3 270M folder) or a local model folder
    model: str = "default"
    #: the name the servers serve the model under (``--served-model-name``); also the
    #: model name recorded for provenance. Default: the model folder's name.
    served_model_name: str | None = None
    #: a declared model revision (a checkpoint tag, a date): part of the model identity. Set
    #: it, and change it when the model changes, for a server pool whose model folder is not
    #: on this host (its contents cannot be fingerprinted here)
    revision: str | None = None
    #: prepend BOS when the tokenizer omits it ("auto": for gemma/llama/mistral families)
    add_bos: bool | Literal["auto"] = "auto"
    max_model_len: int = Field(1024, ge=16)
    #: passed to vLLM's sampling parameters of every generate request (e.g. ignore_eos)
    extra_sampling: dict[str, Any] = Field(default_factory=dict)

    def open(self, name: str) -> Engine:
        raise NotImplementedError

    def concurrency_slots(self) -> int:
        """Units this pool serves at once (its Prefect global concurrency limit)."""
        raise NotImplementedError

    def identity_settings(self) -> Any:
        """Settings of this kind that change what the model answers (hashed into the identity)."""
        return None

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
        answers (:meth:`identity_settings`, ``add_bos``, ``extra_sampling``).
        Computed at plan time without starting an engine or asking a server: a server pool
        whose folder lives elsewhere is identified by name, ``model`` and ``revision``.
        """
        return f"{self.provenance_name()}@{_identity_digest(self)}"


class EmbeddedPoolConfig(PoolConfigBase):
    """The in-process vLLM engine. Defaults describe the embedded Gemma 3 270M on CPU."""

    kind: Literal["embedded"] = "embedded"
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

    def identity_settings(self) -> Any:
        return self.dtype

    def concurrency_slots(self) -> int:
        return 1  # one engine serves one unit at a time

    def open(self, name: str) -> Engine:
        from prefcurate.inference.vllm_engine import VLLMEngine

        return VLLMEngine(
            self.model,
            name=name,
            served_model_name=self.provenance_name(),
            max_model_len=self.max_model_len,
            dtype=self.dtype,
            enforce_eager=self.enforce_eager,
            enable_prefix_caching=self.enable_prefix_caching,
            kv_cache_space_gb=self.kv_cache_space_gb,
            max_num_seqs=self.max_num_seqs,
            block_size=self.block_size,
            seed=self.seed,
            add_bos=self.add_bos,
            extra_sampling=self.extra_sampling,
        )


class ServersPoolConfig(PoolConfigBase):
    """OpenAI-compatible ``vllm serve`` replicas, by URL."""

    kind: Literal["servers"] = "servers"
    #: local tokenizer folder for client-side tokenization of server requests; "auto": the
    #: model folder when it exists here, else tokenize on the servers (``/tokenize``)
    tokenizer: str | None = "auto"
    urls: list[str] = Field(default_factory=list)
    max_concurrency_per_replica: int = Field(8, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    retries: int = Field(3, ge=0)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(10.0, ge=0)
    health_interval_s: float = Field(5.0, gt=0)
    launch: LaunchConfig | None = None

    @model_validator(mode="after")
    def _servers_need_urls(self) -> ServersPoolConfig:
        if not self.urls:
            raise ValueError("a 'servers' pool needs at least one url")
        return self

    def concurrency_slots(self) -> int:
        return len(self.urls)  # one unit per replica

    def open(self, name: str) -> Engine:
        from prefcurate.inference.server_pool import ServerPool

        return ServerPool(
            name=name,
            urls=self.urls,
            model=self.provenance_name(),
            tokenizer=_client_tokenizer(self),
            max_concurrency_per_replica=self.max_concurrency_per_replica,
            timeout_s=self.timeout_s,
            connect_timeout_s=self.connect_timeout_s,
            retries=self.retries,
            backoff_base_s=self.backoff_base_s,
            backoff_max_s=self.backoff_max_s,
            health_interval_s=self.health_interval_s,
            max_model_len=self.max_model_len,
            extra_sampling=self.extra_sampling,
        )


def parse_pool(raw: PoolConfigBase | dict | None) -> PoolConfigBase:
    """A pool's config of the kind its ``kind`` names (default: the embedded engine)."""
    from prefcurate.inference.pool_kinds import parse_pool as parse

    return parse(raw)


def _identity_digest(config: PoolConfigBase) -> str:
    try:
        folder = model_folder_fingerprint(resolve_model_path(config.model))
    except FileNotFoundError:  # a server-side path, or the default model not prepared yet
        folder = None
    return content_id(
        "model-identity", folder, None if folder else config.model, config.revision,
        config.identity_settings(), config.add_bos, config.extra_sampling,
    )[:12]


def bind_to_pools(specs: Sequence[Any], pools: dict[str, Any], what: str) -> list[Any]:
    """Generator or judge specs (``name``, ``pool``, ``model``) with ``model`` set to their
    pool's :meth:`PoolConfigBase.model_identity`: the pool decides which model runs.

    A spec's own ``model`` is optional and kept for configs written before; when given it
    must name the pool's model (its ``model``, served name or identity) and is an error
    naming the spec and pool otherwise, since the engine comes from the pool regardless.
    """
    bound = []
    for spec in specs:
        config = parse_pool(pools[spec.pool])
        identity = config.model_identity()
        if spec.model is not None and spec.model not in {config.model, config.provenance_name(), identity}:
            raise ValueError(
                f"{what} {spec.name!r} declares model {spec.model!r}, but its pool {spec.pool!r} "
                f"serves {config.model!r} ({identity}); the pool decides which model runs: drop "
                f"`model:` from the {what}, or point the pool at that model"
            )
        bound.append(spec.model_copy(update={"model": identity}))
    return bound


def concurrency_limits(pools: dict[str, Any]) -> dict[str, int]:
    """The Prefect global concurrency limit guarding each pool: ``pool-<name>`` -> slots.

    An embedded engine serves one unit at a time; a server pool one unit per replica.
    """
    return {f"pool-{name}": parse_pool(pool).concurrency_slots() for name, pool in pools.items()}


def open_engine(name: str, config: PoolConfigBase | dict | None = None) -> Engine:
    """Open the pool ``name``: the Engine its kind provides (tests and benches patch this)."""
    return parse_pool(config).open(name)


def _client_tokenizer(config: ServersPoolConfig):
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


def load_pools(path: str | Path) -> dict[str, PoolConfigBase]:
    """Read a pools YAML (``pools: {name: fields of its kind}``)."""
    import yaml

    document = yaml.safe_load(Path(path).read_text()) or {}
    return {name: parse_pool(body) for name, body in (document.get("pools") or {}).items()}
