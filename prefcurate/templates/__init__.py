"""Versioned prompt templates, the built-in pairwise criteria, and the one template loader.

A template is a plain text file named ``<kind>_v<N>.txt`` with ``{placeholder}`` fields in
:meth:`str.format` syntax (literal braces doubled). Each *kind* (:data:`TEMPLATE_KINDS`)
names the placeholders its templates hold, exactly; a judge mode that needs a new kind
registers it with :func:`register_kind`. The packaged kinds:

- ``pairwise``, ``rubric``, ``rationale``: annotate's judges (``tasks/annotate.py``,
  ``tasks/judge_modes.py``);
- ``qurating``: QuRating's pairwise quality prompt (``tasks/qurating.py``);
- ``critiq_worker``, ``critiq_propose``, ``critiq_critique``, ``critiq_rewrite``: CritiQ's
  worker and manager prompts (``tasks/critiq.py``).

A template ends exactly where the model's answer is due; the judge templates end with
``[[`` so that the option ("A"/"B", "1".."5") is the next token on its own for common
tokenizers (Gemma splits ``[[`` and digits into separate tokens). A packaged template is
never edited in place: a change is a new version, so stored results stay traceable through
their ``template_hash``. Every template a unit uses is hashed into its key (read from the
file when the key is computed), so a user's template edited in place is computed again.

Layout, for vLLM's prefix cache: what is the same for every request of a judge (the
instructions, the examples, the criterion) comes first, and the request and the answers
last, so a batch computes the shared part once (the two orders of a pair share the request
too). ``pairwise_v3`` and ``rationale_v2`` (the defaults) are ``pairwise_v1`` and
``rationale_v1`` with the criterion moved ahead of the request: 57 instead of 85 prompt
tokens to compute per verdict on the gold pairs (32-token KV blocks), 1.5x fewer. The rubric
templates keep the aspect last on purpose: a response is rated on several aspects, and
those requests share everything up to the aspect. The QuRating and CritiQ templates keep
their papers' wording (they were inline strings before; the files hold the same text, so
their hashes and the unit keys built from them did not change).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import polars as pl
import yaml

TEMPLATE_SUFFIX = ".txt"


# ------------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class TemplateKind:
    """What a template of one kind must hold.

    ``fields``: its placeholders, every one required and no other allowed. ``generated``:
    a field the engine writes (a rationale): it must appear once, after every other, and a
    prompt can be rendered up to it (``Template.render_column(stop_before=...)``).
    ``format_specs``: placeholders may carry a format spec (``{accuracy:.0%}``); such
    templates render with :meth:`Template.render` only.
    """

    name: str
    fields: frozenset[str]
    generated: str | None = None
    format_specs: bool = False


TEMPLATE_KINDS: dict[str, TemplateKind] = {}


def register_kind(
    name: str, fields: frozenset[str] | set[str], *, generated: str | None = None, format_specs: bool = False
) -> TemplateKind:
    """Declare a template kind (idempotent for the same definition; a clash raises)."""
    kind = TemplateKind(name, frozenset(fields), generated, format_specs)
    if generated is not None and generated not in kind.fields:
        raise ValueError(f"template kind {name!r}: generated field {generated!r} is not one of its fields")
    known = TEMPLATE_KINDS.get(name)
    if known is not None and known != kind:
        raise ValueError(f"template kind {name!r} is already registered with other fields")
    TEMPLATE_KINDS[name] = kind
    return kind


PAIRWISE_FIELDS = frozenset({"prompt", "response_first", "response_second", "criterion_description"})
SCORE_OPTIONS: tuple[str, ...] = ("1", "2", "3", "4", "5")
RUBRIC_FIELDS = frozenset(
    {"prompt", "response", "aspect", "aspect_description"} | {f"score_{s}" for s in SCORE_OPTIONS}
)
RATIONALE_FIELDS = PAIRWISE_FIELDS | {"rationale"}

register_kind("pairwise", PAIRWISE_FIELDS)
register_kind("rubric", RUBRIC_FIELDS)
register_kind("rationale", RATIONALE_FIELDS, generated="rationale")
register_kind("qurating", {"description", "text_a", "text_b"})
register_kind("critiq_worker", {"name", "description", "text_a", "text_b"})
register_kind("critiq_propose", {"examples", "banned", "existing"})
register_kind("critiq_critique", {"name", "description", "text_a", "text_b", "truth", "wrong"})
register_kind("critiq_rewrite", {"name", "description", "accuracy", "critiques"}, format_specs=True)


# --------------------------------------------------------------------------- packaged files


def template_names() -> list[str]:
    """Names (without ``.txt``) of the packaged templates, sorted."""
    return sorted(
        entry.name[: -len(TEMPLATE_SUFFIX)]
        for entry in resources.files(__name__).iterdir()
        if entry.name.endswith(TEMPLATE_SUFFIX)
    )


def read_template_text(name: str) -> str:
    """The raw text of a packaged template; ``name`` with or without ``.txt``."""
    stem = name.removesuffix(TEMPLATE_SUFFIX)
    entry = resources.files(__name__).joinpath(stem + TEMPLATE_SUFFIX)
    if not entry.is_file():
        raise FileNotFoundError(
            f"no packaged template {stem!r}; available: {', '.join(template_names())}"
        )
    return entry.read_text(encoding="utf-8")


def read_criteria() -> dict[str, str]:
    """The built-in pairwise criteria: name -> description (from ``criteria.yaml``)."""
    raw = yaml.safe_load(resources.files(__name__).joinpath("criteria.yaml").read_text("utf-8"))
    return {name: " ".join(str(entry["description"]).split()) for name, entry in raw.items()}


# ------------------------------------------------------------------------------ templates


def template_hash(text: str) -> str:
    """The hash stored with results and entered into unit keys: of the text as used."""
    from prefcurate.schemas.ids import content_id

    return content_id("template", text)


@dataclass(frozen=True)
class Template:
    """A validated template: its text (as used) and the hash stored with what it produced."""

    name: str
    kind: str
    text: str
    hash: str

    @property
    def segments(self) -> list[tuple[str, str | None]]:
        """``(literal, field)`` pieces in order; literals already un-escaped."""
        return [(literal, field) for literal, field, _, _ in string.Formatter().parse(self.text)]

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(field for _, field in self.segments if field is not None)

    def render(self, **values) -> str:
        return self.text.format(**values)

    def render_column(self, frame: pl.DataFrame, stop_before: str | None = None) -> list[str]:
        """Render every row of ``frame`` (one column per field), vectorised with polars;
        the same text :meth:`render` gives for string values.

        With ``stop_before``, the text ends just before that field's first occurrence
        (the rationale-generation prompt of a rationale template).
        """
        if TEMPLATE_KINDS[self.kind].format_specs:
            raise ValueError(f"template {self.name!r} has format specs: render it row by row")
        parts: list[pl.Expr] = []
        for literal, field in self.segments:
            if literal:
                parts.append(pl.lit(literal))
            if field is None:
                continue
            if field == stop_before:
                break
            parts.append(pl.col(field).cast(pl.String).fill_null(""))
        if not parts:
            return [""] * frame.height
        return frame.select(pl.concat_str(parts).alias("rendered"))["rendered"].to_list()


def _template_kind(stem: str, kind: str | None) -> str:
    if kind is None:
        # the longest kind the name starts with: critiq_worker_v1 -> critiq_worker
        matches = [k for k in TEMPLATE_KINDS if stem == k or stem.startswith(k + "_")]
        if not matches:
            raise ValueError(
                f"cannot tell the kind of template {stem!r} from its name; name it "
                f"<kind>_vN with kind one of {', '.join(TEMPLATE_KINDS)}, or pass kind="
            )
        kind = max(matches, key=len)
    if kind not in TEMPLATE_KINDS:
        raise ValueError(f"unknown template kind {kind!r}; known: {', '.join(TEMPLATE_KINDS)}")
    return kind


def load_template(name: str, kind: str | None = None) -> Template:
    """Load and validate a template: a packaged name (``pairwise_v1``) or a ``.txt`` path.

    Read from the file on every call (so a key computed now sees an edit made now).
    Trailing newlines of the file are dropped (the template must end where the answer is
    due; editors add a final newline). Raises ``ValueError`` naming the missing or unknown
    placeholders, and when no answer cue follows the last placeholder.
    """
    path = Path(name).expanduser()
    if path.suffix == TEMPLATE_SUFFIX and path.is_file():
        stem, raw = path.stem, path.read_text(encoding="utf-8")
    else:
        stem = name.removesuffix(TEMPLATE_SUFFIX)
        raw = read_template_text(name)
    kind = _template_kind(stem, kind)
    spec = TEMPLATE_KINDS[kind]
    text = raw.rstrip("\r\n")
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as error:  # e.g. a single '{' or '}'
        raise ValueError(
            f"template {stem!r} is malformed ({error}); write literal braces as {{{{ }}}}"
        ) from None
    fields = [field for _, field, _, _ in parsed if field is not None]
    odd = sorted({f for f in fields if not f.isidentifier()})
    if odd:
        raise ValueError(f"template {stem!r} has placeholders that are not names: {odd}")
    if not spec.format_specs and any(
        format_spec or conversion for _, field, format_spec, conversion in parsed if field is not None
    ):
        raise ValueError(f"template {stem!r}: placeholders take no format spec or conversion")
    missing = sorted(spec.fields - set(fields))
    if missing:
        raise ValueError(
            f"{kind} template {stem!r} is missing placeholder(s) "
            + ", ".join("{" + f + "}" for f in missing)
        )
    unknown = sorted(set(fields) - spec.fields)
    if unknown:
        raise ValueError(
            f"{kind} template {stem!r} has unknown placeholder(s) "
            + ", ".join("{" + f + "}" for f in unknown)
            + f"; allowed: {', '.join(sorted(spec.fields))}"
        )
    if not parsed or parsed[-1][1] is not None or not parsed[-1][0].strip():
        raise ValueError(
            f"template {stem!r} ends with a placeholder; it must end with the cue after "
            "which the answer is due (e.g. 'Verdict: [[')"
        )
    if spec.generated is not None and (fields.count(spec.generated) != 1 or fields[-1] != spec.generated):
        raise ValueError(
            f"{kind} template {stem!r} must hold {{{spec.generated}}} once, after every "
            f"other placeholder (the {spec.generated} is generated there, the answer follows)"
        )
    return Template(stem, kind, text, template_hash(text))
