"""Versioned judge templates and the built-in pairwise criteria, shipped as package data.

A template is a plain text file named ``<kind>_v<N>.txt`` (kinds: ``pairwise``,
``rubric``, ``rationale``) with ``{placeholder}`` fields in :meth:`str.format` syntax
(literal braces doubled). It ends exactly where the judge's answer token is due; the
templates here end with ``[[`` so that the option ("A"/"B", "1".."5") is the next token
on its own for common tokenizers (Gemma splits ``[[`` and digits into separate tokens).
A template is never edited in place: a change is a new version, so stored judgments stay
traceable through their ``template_hash``.

Layout, for vLLM's prefix cache: what is the same for every request of a judge (the
instructions, the examples, the criterion) comes first, and the request and the answers
last, so a batch computes the shared part once (the two orders of a pair share the request
too). ``pairwise_v3`` and ``rationale_v2`` (the defaults) are ``pairwise_v1`` and
``rationale_v1`` with the criterion moved ahead of the request: 57 instead of 85 prompt
tokens to compute per verdict on the gold pairs (32-token KV blocks), 1.5x fewer. The rubric
templates keep the aspect last on purpose: a response is rated on several aspects, and
those requests share everything up to the aspect.

Validation and hashing live in :func:`prefcurate.tasks.annotate.load_template`; this
module only reads the packaged files.
"""

from __future__ import annotations

from importlib import resources

import yaml

TEMPLATE_SUFFIX = ".txt"


def template_names() -> list[str]:
    """Names (without ``.txt``) of the packaged templates, sorted."""
    return sorted(
        entry.name[: -len(TEMPLATE_SUFFIX)]
        for entry in resources.files(__name__).iterdir()
        if entry.name.endswith(TEMPLATE_SUFFIX)
    )


def read_template_text(name: str) -> str:
    """The raw text of a packaged template; ``name`` with or without ``.txt``."""
    stem = name[: -len(TEMPLATE_SUFFIX)] if name.endswith(TEMPLATE_SUFFIX) else name
    entry = resources.files(__name__).joinpath(stem + TEMPLATE_SUFFIX)
    if not entry.is_file():
        raise FileNotFoundError(
            f"no packaged judge template {stem!r}; available: {', '.join(template_names())}"
        )
    return entry.read_text(encoding="utf-8")


def read_criteria() -> dict[str, str]:
    """The built-in pairwise criteria: name -> description (from ``criteria.yaml``)."""
    raw = yaml.safe_load(resources.files(__name__).joinpath("criteria.yaml").read_text("utf-8"))
    return {name: " ".join(str(entry["description"]).split()) for name, entry in raw.items()}
