"""The pool kinds a config may name, as one discriminated union by ``kind``.

Adding a pool kind: a subclass of :class:`~prefcurate.inference.pools.PoolConfigBase` with
``kind: Literal["<name>"]``, its fields, ``open`` and ``concurrency_slots`` (its own module),
and one line in ``POOL_KINDS`` below. The config, ``prefcurate.yaml``'s JSON schema (the
Prefect UI form) and every pool lookup take it from there.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag, TypeAdapter

from prefcurate.inference.openai_pool import OpenAIPoolConfig
from prefcurate.inference.pools import EmbeddedPoolConfig, PoolConfigBase, ServersPoolConfig

POOL_KINDS: tuple[type[PoolConfigBase], ...] = (
    EmbeddedPoolConfig,
    ServersPoolConfig,
    OpenAIPoolConfig,
)



def _kind_of(value: Any) -> str:
    """The tag of a pool: its ``kind`` (a pool without one is the embedded engine)."""
    if isinstance(value, dict):
        return value.get("kind", "embedded")
    return getattr(value, "kind", "embedded")


def _kind_name(kind: type[PoolConfigBase]) -> str:
    return kind.model_fields["kind"].default


PoolConfig = Annotated[
    # A Union built from a runtime tuple has no `X | Y` spelling.
    Union[tuple(Annotated[kind, Tag(_kind_name(kind))] for kind in POOL_KINDS)],  # noqa: UP007
    Discriminator(_kind_of),
]

_ADAPTER: TypeAdapter = TypeAdapter(PoolConfig)


def parse_pool(raw: PoolConfigBase | dict[str, Any] | None) -> PoolConfigBase:
    """A pool's config of the kind its ``kind`` names; a missing ``kind`` means embedded."""
    if isinstance(raw, PoolConfigBase):
        return raw
    return _ADAPTER.validate_python(raw or {})


def pool_kind_names() -> list[str]:
    return [_kind_name(kind) for kind in POOL_KINDS]
