"""Export curated preference pairs: DPO JSONL, Parquet and a dataset card.

Input: a polars frame with one row per curated pair and at least ``prompt``, ``chosen`` and
``rejected`` (text); every other column (scores, ids, generators, cluster, provenance) is
carried along as metadata. Output folder layout::

    out_dir/
      README.md                     dataset card (YAML header that `datasets` reads)
      data/train.jsonl              {"prompt", "chosen", "rejected", ...metadata} per line
      data/train.parquet            the same rows, zstd-compressed
      plots/score_distribution.png  histograms of the score columns present
      plots/cluster_coverage.png    pairs per cluster (and pool coverage when known)

    data/train_conversational.jsonl TRL's conversational preference format (message lists)
    llamafactory/ranking.json       LLaMA-Factory's ranking format (alpaca columns + system)
    llamafactory/dataset_info.json  its dataset entry ``prefcurate_pairs`` (ranking: true)
    dropped_pairs.jsonl             pairs the trainer-integrity check dropped, with reasons

Trainer integrity (:func:`check_integrity`): with the target tokenizer and TRL's length
budget, pairs whose prompt alone fills ``max_length``, or whose chosen or rejected become
empty or identical after truncation, are dropped (or flagged); the card says how many, why.
The card also reports the length-bias share, each judge's agreement with the exported
verdicts and the share of pairs whose verdict came from a single presentation order.

Both files load with ``datasets.load_dataset("json" | "parquet", data_files=...)`` and the
folder itself with ``load_dataset(out_dir)`` (the card's ``configs`` entry points at the
Parquet file). The JSONL uses the plain-string DPO format TRL's ``DPOTrainer`` reads.

Every file is written to a temporary name in its folder and renamed into place, so a crash
never leaves a half-written file under a final name. Plots use Matplotlib's object API on
the Agg canvas (no pyplot state, safe in worker threads).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")
#: score columns plotted and summarised when present, in this order
SCORE_COLUMNS = ("p_chosen", "margin", "agreement", "chosen_score", "rejected_score", "quality")
SPLIT = "train"


def export_pairs(frame: pl.DataFrame, out_dir: str | os.PathLike, **options: Any) -> dict[str, Path]:
    """Write the pairs and the card; returns ``{"jsonl", "parquet", "card", plot names...}`` -> path.

    ``options``: the keyword arguments of :func:`export_curated` (formats, card_stats, plots,
    trainer formats, integrity, judgments).
    """
    return export_curated(frame, out_dir, **options)[0]


def export_curated(
    frame: pl.DataFrame,
    out_dir: str | os.PathLike,
    *,
    formats: Iterable[str] = ("jsonl", "parquet"),
    card_stats: Mapping[str, Any] | None = None,
    plots: bool = True,
    trainer_formats: Iterable[str] = (),
    integrity: Any = None,
    judgments: pl.DataFrame | None = None,
    length_ratio: float = 1.5,
    tokenizer: Any = None,
) -> tuple[dict[str, Path], dict]:
    """:func:`export_pairs` with the trainer's side: returns (written files, counts).

    ``integrity`` (:class:`prefcurate.tasks.export_config.IntegrityParams`, None: off) checks
    each pair against ``tokenizer`` (default: loaded from ``integrity.tokenizer``).
    ``trainer_formats``: extra files (``trl_conversational``, ``llamafactory_ranking``).
    ``judgments`` (the pairs' valid judgments) feed the card's per-judge agreement and
    single-order share.

    ``card_stats`` feeds the card. Recognised keys: ``title``, ``description``, ``sources``
    (dict, list of records or list), ``filters`` (dict, e.g. reason -> dropped count or parameter -> value),
    ``selection`` (dict, e.g. :func:`prefcurate.tasks.selection.selection_report`),
    ``cluster_pool_counts`` (cluster -> items before selection), ``provenance`` (dict);
    anything else is listed under "Other statistics".
    """
    formats = tuple(dict.fromkeys(formats))
    unknown = set(formats) - {"jsonl", "parquet"}
    if unknown or not formats:
        raise ValueError(f"formats must be a non-empty subset of ('jsonl', 'parquet'), got {formats}")
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"the frame lacks required columns {missing}")
    unknown_trainer = set(trainer_formats) - set(TRAINER_FORMATS)
    if unknown_trainer:
        raise ValueError(f"trainer_formats must be among {TRAINER_FORMATS}, got {sorted(unknown_trainer)}")
    stats = dict(card_stats or {})
    out = Path(out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    frame = _ordered(frame)
    counts: dict[str, Any] = {"pairs_in": frame.height}
    written: dict[str, Path] = {}
    trainer_stats: dict[str, Any] = {}
    if integrity is not None and integrity.action != "off":
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(integrity.tokenizer)
        checked = check_integrity(frame, tokenizer, integrity.max_length, integrity.max_prompt_length)
        failing = checked.filter(pl.col("integrity_issue").is_not_null())
        per_reason = dict(_value_counts(failing, "integrity_issue")) if failing.height else {}
        trainer_stats["integrity"] = {
            "tokenizer": getattr(tokenizer, "name_or_path", str(integrity.tokenizer)),
            "max_length": integrity.max_length, "max_prompt_length": integrity.max_prompt_length,
            "action": integrity.action, "checked": checked.height, "failing": failing.height, "reasons": per_reason,
        }
        counts.update({f"integrity.{k}": v for k, v in per_reason.items()})
        if integrity.action == "drop":
            if failing.height:
                keep = [c for c in ("pair_id", "prompt_id", "chosen_id", "rejected_id") if c in failing.columns]
                dropped = failing.select(*keep, pl.col("integrity_issue").alias("reason"), "prompt_tokens",
                                         "chosen_tokens", "rejected_tokens")
                written["dropped"] = _atomic_write(out / DROPPED_FILE, lambda p: dropped.write_ndjson(p))
            frame = checked.filter(pl.col("integrity_issue").is_null()).drop(INTEGRITY_COLUMNS)
        else:
            frame = checked
    else:
        trainer_stats["integrity"] = {"action": "off"}
    counts["dropped"] = counts["pairs_in"] - frame.height
    counts["exported"] = frame.height
    trainer_stats["length_bias"] = length_bias(frame, length_ratio)
    if judgments is not None:
        trainer_stats.update(judge_agreement(frame, judgments))

    if "jsonl" in formats:
        written["jsonl"] = _atomic_write(
            out / "data" / f"{SPLIT}.jsonl", lambda p: _json_ready(frame).write_ndjson(p)
        )
    if "parquet" in formats:
        written["parquet"] = _atomic_write(
            out / "data" / f"{SPLIT}.parquet", lambda p: frame.write_parquet(p, compression="zstd")
        )
    plot_paths: dict[str, Path] = {}
    if plots:
        (out / "plots").mkdir(exist_ok=True)
        score_plot = plot_score_distribution(frame, out / "plots" / "score_distribution.png")
        if score_plot is not None:
            plot_paths["score_plot"] = score_plot
        cluster_plot = plot_cluster_coverage(
            frame, out / "plots" / "cluster_coverage.png", stats.get("cluster_pool_counts")
        )
        if cluster_plot is not None:
            plot_paths["cluster_plot"] = cluster_plot
    written.update(plot_paths)
    if "trl_conversational" in trainer_formats:
        conversational = trl_conversational(frame)
        written["trl_conversational"] = _atomic_write(
            out / "data" / f"{SPLIT}_conversational.jsonl", lambda p: conversational.write_ndjson(p))
    if "llamafactory_ranking" in trainer_formats:
        (out / "llamafactory").mkdir(exist_ok=True)
        ranking = llamafactory_ranking(frame)
        written["llamafactory_ranking"] = _atomic_write(
            out / "llamafactory" / LLAMAFACTORY_FILE, lambda p: ranking.write_json(p))
        info = json.dumps(LLAMAFACTORY_DATASET_INFO, indent=2) + "\n"
        written["llamafactory_info"] = _atomic_write(
            out / "llamafactory" / "dataset_info.json", lambda p: Path(p).write_text(info, encoding="utf-8"))
    card = dataset_card(
        frame,
        stats,
        data_files={k: written[k] for k in ("parquet", "jsonl") if k in written},
        plots=plot_paths,
        root=out,
        trainer={**trainer_stats, "files": {k: written[k] for k in ("trl_conversational", "llamafactory_ranking",
                                                                     "llamafactory_info", "dropped") if k in written}},
    )
    written["card"] = _atomic_write(out / "README.md", lambda p: Path(p).write_text(card, encoding="utf-8"))
    return written, counts


# --- trainer formats --------------------------------------------------------------------
TRAINER_FORMATS = ("trl_conversational", "llamafactory_ranking")
LLAMAFACTORY_FILE = "ranking.json"
LLAMAFACTORY_DATASET = "prefcurate_pairs"
#: LLaMA-Factory's data/dataset_info.json entry for the ranking file (alpaca columns)
LLAMAFACTORY_DATASET_INFO = {
    LLAMAFACTORY_DATASET: {
        "file_name": LLAMAFACTORY_FILE,
        "ranking": True,
        "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected",
                    "system": "system"},
    }
}
DROPPED_FILE = "dropped_pairs.jsonl"


def _system(frame: pl.DataFrame) -> pl.Expr:
    if "system_prompt" not in frame.columns:
        return pl.lit(None, dtype=pl.String)
    return pl.when(pl.col("system_prompt").str.strip_chars() != "").then(pl.col("system_prompt")).otherwise(None)


def _message(role: str, content: pl.Expr) -> pl.Expr:
    return pl.struct(pl.lit(role).alias("role"), content.cast(pl.String).alias("content"))


def trl_conversational(frame: pl.DataFrame) -> pl.DataFrame:
    """TRL's conversational preference rows: ``prompt`` = [system?, user] messages, ``chosen``
    and ``rejected`` = [assistant] messages (the trainer applies the chat template)."""
    system = _system(frame)
    user = _message("user", pl.col("prompt"))
    prompt = (pl.when(system.is_null()).then(pl.concat_list([user]))
              .otherwise(pl.concat_list([_message("system", system), user])))
    extra = [c for c in ("pair_id",) if c in frame.columns]
    return frame.select(
        prompt.alias("prompt"),
        pl.concat_list([_message("assistant", pl.col("chosen"))]).alias("chosen"),
        pl.concat_list([_message("assistant", pl.col("rejected"))]).alias("rejected"),
        *extra,
    )


def llamafactory_ranking(frame: pl.DataFrame) -> pl.DataFrame:
    """LLaMA-Factory's ranking (pairwise) rows in the alpaca layout, with the system prompt."""
    return frame.select(
        pl.col("prompt").alias("instruction"), pl.lit("").alias("input"),
        pl.col("chosen").cast(pl.String), pl.col("rejected").cast(pl.String),
        _system(frame).fill_null("").alias("system"),
    )


# --- trainer integrity ------------------------------------------------------------------
#: the prompt alone reaches max_length: no token is left for chosen or rejected
PROMPT_FILLS_BUDGET = "prompt_fills_budget"
#: chosen or rejected has no token left after truncation (or was empty)
EMPTY_AFTER_TRUNCATION = "empty_after_truncation"
#: chosen and rejected are the same tokens after truncation: nothing to prefer
IDENTICAL_AFTER_TRUNCATION = "identical_after_truncation"
INTEGRITY_COLUMNS = ["prompt_tokens", "chosen_tokens", "rejected_tokens", "integrity_issue"]


def load_tokenizer(name: str = "default"):
    """The tokenizer of a local folder, or of the embedded model for ``default`` (never a hub).

    A folder whose ``tokenizer.json`` says everything the check needs is read as a
    :class:`TokenCounter`; any other is loaded by transformers' ``AutoTokenizer``.
    """
    from prefcurate.inference.models import resolve_model_path

    try:
        path = Path(resolve_model_path(name))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error} (the export's trainer-integrity check needs a tokenizer: set "
                                "export.integrity.tokenizer to a local folder, or export.integrity.action: off)") from None
    counter = TokenCounter.from_folder(path)
    if counter is not None:
        return counter
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


class TokenCounter:
    """What the integrity check asks of a tokenizer (encode, BOS/EOS ids, the chat template),
    read from a folder's ``tokenizer.json`` by the ``tokenizers`` library itself.

    Written by hand because transformers' ``AutoTokenizer`` took 4-8 s of an export here for
    Gemma's 33 MB ``tokenizer.json`` (it imports its model registry, then parses the file
    twice in Python to rebuild the vocabulary); ``tokenizers`` reads it in about a second.
    The token ids are the same as the transformers tokenizer's, and the template is rendered
    by transformers' own ``render_jinja_template`` with the special tokens as variables
    (tests/unit/test_export_trainer.py compares both). :meth:`from_folder` declines, and
    ``AutoTokenizer`` loads the folder as before, when the folder has no ``tokenizer.json``,
    its tokenizer runs its own code (``auto_map``), or its config leaves BOS or EOS unsaid
    (the tokenizer class would supply them) or names several chat templates.
    """

    SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

    def __init__(self, backend, special_tokens: dict[str, str | None], chat_template: str | None, name_or_path: str):
        self.backend = backend
        self.special_tokens = special_tokens
        self.chat_template = chat_template
        self.name_or_path = name_or_path
        self.bos_token_id = self._id(special_tokens["bos_token"])
        self.eos_token_id = self._id(special_tokens["eos_token"])

    @classmethod
    def from_folder(cls, folder: Path) -> TokenCounter | None:
        config_file, tokenizer_file = folder / "tokenizer_config.json", folder / "tokenizer.json"
        if not (config_file.is_file() and tokenizer_file.is_file()):
            return None
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if "auto_map" in config or not {"bos_token", "eos_token"} <= set(config):
            return None
        template = config.get("chat_template")
        for name, key in (("chat_template.jinja", None), ("chat_template.json", "chat_template")):
            if template is None and (folder / name).is_file():
                text = (folder / name).read_text(encoding="utf-8")
                template = json.loads(text).get(key) if key else text
        if template is not None and not isinstance(template, str):  # named templates: AutoTokenizer picks
            return None
        from tokenizers import Tokenizer

        special = {key: _token_text(config.get(key)) for key in cls.SPECIAL_TOKENS}
        return cls(Tokenizer.from_file(str(tokenizer_file)), special, template, str(folder))

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return {"input_ids": [encoding.ids for encoding in encodings]}

    def apply_chat_template(self, conversations: list[list[dict]], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> list[str]:
        if tokenize:
            raise ValueError("TokenCounter renders templates as text; encode the rendered text")
        if not self.chat_template:
            raise ValueError(f"the tokenizer in {self.name_or_path} has no chat template")
        from transformers.utils.chat_template_utils import render_jinja_template

        tokens = {key: value for key, value in self.special_tokens.items() if value is not None}
        rendered, _ = render_jinja_template(conversations=conversations, chat_template=self.chat_template,
                                            add_generation_prompt=add_generation_prompt, **tokens)
        return rendered


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: text, or an AddedToken's dict."""
    return value.get("content") if isinstance(value, dict) else value


def prompt_texts(frame: pl.DataFrame) -> pl.Series:
    """The prompt as the standard format shows it: the system prompt, a blank line, the prompt."""
    system = _system(frame)
    return frame.select(
        pl.when(system.is_null()).then(pl.col("prompt"))
        .otherwise(pl.concat_str([system, pl.lit("\n\n"), pl.col("prompt")])).alias("text")
    )["text"]


def check_integrity(frame: pl.DataFrame, tokenizer, max_length: int,
                    max_prompt_length: int | None = None) -> pl.DataFrame:
    """``frame`` plus the tokens each part keeps after TRL-style truncation and the first
    failing reason (``integrity_issue``, null when the pair is fine).

    The prompt is counted as the tokenizer's chat template renders it (system and user
    turns and the generation prompt: what TRL feeds for conversational data, and the
    longer of the two formats) when it has one, else as plain text with a BOS; each
    completion gets an EOS. The prompt keeps its last ``max_prompt_length`` tokens, the
    completions their first ``max_length - prompt tokens``.
    """
    eos = int(getattr(tokenizer, "eos_token_id", None) is not None)
    templated = _chat_prompts(frame, tokenizer)
    if templated is not None:  # the template writes its own BOS and turn markers
        prompts, bos = templated, 0
    else:
        prompts, bos = prompt_texts(frame), int(getattr(tokenizer, "bos_token_id", None) is not None)
    prompt_tokens = np.concatenate([np.zeros(0, np.int64), *map(_lengths, _token_ids(tokenizer, prompts))]) + bos
    if max_prompt_length is not None:
        prompt_tokens = np.minimum(prompt_tokens, max_prompt_length)
    budget = np.maximum(max_length - prompt_tokens - eos, 0)
    chosen_tokens, rejected_tokens = np.zeros(frame.height, np.int64), np.zeros(frame.height, np.int64)
    identical = np.zeros(frame.height, dtype=bool)
    start = 0
    for chosen, rejected in zip(_token_ids(tokenizer, frame["chosen"]), _token_ids(tokenizer, frame["rejected"])):
        rows = slice(start, start + len(chosen))
        chosen_tokens[rows] = np.minimum(_lengths(chosen), budget[rows])
        rejected_tokens[rows] = np.minimum(_lengths(rejected), budget[rows])
        # the same tokens after truncation: only pairs that keep as many of each can be, few
        for k in np.flatnonzero(chosen_tokens[rows] == rejected_tokens[rows]):
            keep = int(chosen_tokens[start + k])
            identical[start + k] = list(chosen[k][:keep]) == list(rejected[k][:keep])
        start += len(chosen)
    checked = pl.DataFrame({"prompt_tokens": prompt_tokens, "chosen_tokens": chosen_tokens,
                            "rejected_tokens": rejected_tokens}).with_columns(
        pl.when(pl.col("prompt_tokens") + eos >= max_length).then(pl.lit(PROMPT_FILLS_BUDGET))
        .when((pl.col("chosen_tokens") == 0) | (pl.col("rejected_tokens") == 0)).then(pl.lit(EMPTY_AFTER_TRUNCATION))
        .when(pl.Series(identical)).then(pl.lit(IDENTICAL_AFTER_TRUNCATION))
        .otherwise(None).alias("integrity_issue"))
    return pl.concat([frame.drop([c for c in INTEGRITY_COLUMNS if c in frame.columns]), checked], how="horizontal")


#: texts a tokenizer encodes at once in the integrity check: its encodings (ids, offsets,
#: token strings) take ~100x the text's size, so a whole export at once took gigabytes
ENCODE_CHUNK = 4096


def _token_ids(tokenizer, texts: pl.Series):
    """The token ids of ``texts`` (no special tokens), :data:`ENCODE_CHUNK` texts at a time."""
    values = texts.fill_null("").to_list()
    for start in range(0, len(values), ENCODE_CHUNK):
        yield tokenizer(values[start:start + ENCODE_CHUNK], add_special_tokens=False)["input_ids"]


def _lengths(ids: list) -> np.ndarray:
    return np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))


def _chat_prompts(frame: pl.DataFrame, tokenizer) -> pl.Series | None:
    """The prompts rendered by the tokenizer's chat template, or None without a usable one."""
    if not getattr(tokenizer, "chat_template", None) or frame.height == 0:
        return None
    conversations = trl_conversational(frame)["prompt"].to_list()
    try:
        rendered = tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that refuses a role (e.g. system): count the plain text instead
        return None
    return pl.Series(rendered, dtype=pl.String)


# --- card statistics of the exported pairs ----------------------------------------------
def length_bias(frame: pl.DataFrame, ratio: float = 1.5) -> dict:
    """Share of pairs whose chosen is at least ``ratio`` times longer (characters) than the
    rejected one, and the reverse: a trainer on a set with a large first share learns length."""
    if frame.height == 0:
        return {"ratio": ratio, "chosen_longer_share": None, "rejected_longer_share": None}
    chosen = pl.col("chosen").str.len_chars().cast(pl.Float64)
    rejected = pl.col("rejected").str.len_chars().cast(pl.Float64)
    shares = frame.select((chosen >= ratio * rejected).mean().alias("c"), (rejected >= ratio * chosen).mean().alias("r"))
    return {"ratio": ratio, "chosen_longer_share": shares["c"][0], "rejected_longer_share": shares["r"][0]}


def judge_agreement(frame: pl.DataFrame, judgments: pl.DataFrame) -> dict:
    """Per judge: how many exported pairs it judged and the share it judged for the exported
    chosen (for, against, tie); and the share of pairs whose verdict came from a single
    presentation order (no judge saw both orders). Judgments: valid rows with the pair key,
    ``judge``, ``p_a``, ``p_first_ab``, ``p_first_ba``."""
    needed = {"prompt_id", "chosen_id", "rejected_id"}
    if frame.height == 0 or not needed <= set(frame.columns) or judgments.height == 0:
        return {}
    pairs = frame.select(
        "prompt_id", "chosen_id",
        pl.min_horizontal("chosen_id", "rejected_id").alias("response_a"),
        pl.max_horizontal("chosen_id", "rejected_id").alias("response_b"),
    ).unique(["prompt_id", "response_a", "response_b"])
    rows = judgments.filter(pl.col("p_a").is_not_null() & pl.col("p_a").is_not_nan()).join(
        pairs, on=["prompt_id", "response_a", "response_b"], how="inner")
    if rows.height == 0:
        return {"judged_pairs": 0}
    key = ["prompt_id", "response_a", "response_b"]
    per_judge = rows.group_by(key + ["judge"]).agg(
        pl.col("p_a").mean(), pl.col("chosen_id").first(),
        (pl.col("p_first_ab").is_not_null() & pl.col("p_first_ba").is_not_null()).any().alias("both_orders"),
    ).with_columns(
        pl.when(pl.col("chosen_id") == pl.col("response_a")).then(pl.col("p_a")).otherwise(1.0 - pl.col("p_a"))
        .alias("p_chosen"))
    agreement = per_judge.group_by("judge").agg(
        pl.len().alias("pairs"),
        (pl.col("p_chosen") > 0.5).mean().alias("for_chosen"),
        (pl.col("p_chosen") < 0.5).mean().alias("against"),
        (pl.col("p_chosen") == 0.5).mean().alias("tie"),
        pl.col("both_orders").mean().alias("both_orders_share"),
    ).sort("judge")
    per_pair = per_judge.group_by(key).agg(pl.col("both_orders").any())
    return {
        "judged_pairs": per_pair.height,
        "single_order_share": float((~per_pair["both_orders"]).mean()),
        "judges": {row["judge"]: {k: v for k, v in row.items() if k != "judge"} for row in agreement.to_dicts()},
    }


def _ordered(frame: pl.DataFrame) -> pl.DataFrame:
    rest = [c for c in frame.columns if c not in REQUIRED_COLUMNS]
    return frame.select(
        *[pl.col(c).cast(pl.String) for c in REQUIRED_COLUMNS],
        *rest,
    )


def _json_ready(frame: pl.DataFrame) -> pl.DataFrame:
    """Temporal columns as ISO-8601 strings, so JSON readers need no schema to parse them."""
    temporal = [c for c, t in frame.schema.items() if t.is_temporal()]
    if not temporal:
        return frame
    return frame.with_columns(
        pl.col(c).dt.to_string("iso") if frame.schema[c] != pl.Time else pl.col(c).cast(pl.String)
        for c in temporal
    )


def _atomic_write(path: Path, write: Callable[[str], Any]) -> Path:
    """Run ``write(tmp)`` on a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; an export is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --- plots ------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_figure(figure, path: Path) -> Path:
    return _atomic_write(path, lambda p: figure.savefig(p, format="png"))


def plot_score_distribution(frame: pl.DataFrame, path: Path) -> Path | None:
    """Histograms of the score columns present (None when there are none or no rows)."""
    columns = [c for c in SCORE_COLUMNS if c in frame.columns and frame.schema[c].is_numeric()]
    columns = [c for c in columns if frame[c].drop_nulls().drop_nans().len() > 0] if frame.height else []
    if not columns:
        return None
    per_row = min(3, len(columns))
    rows = math.ceil(len(columns) / per_row)
    figure = _figure(4.0 * per_row, 3.0 * rows)
    axes = np.atleast_1d(figure.subplots(rows, per_row)).ravel()
    for ax, column in zip(axes, columns, strict=False):
        values = frame[column].drop_nulls().drop_nans().to_numpy()
        ax.hist(values, bins=min(50, max(5, int(np.sqrt(values.size)))), color="#4C72B0")
        ax.set_title(f"{column} (n={values.size}, median={np.median(values):.3g})", fontsize=9)
        ax.set_ylabel("pairs")
    for ax in axes[len(columns) :]:
        ax.set_visible(False)
    return _save_figure(figure, path)


def plot_cluster_coverage(
    frame: pl.DataFrame, path: Path, pool_counts: Mapping[Any, int] | None = None
) -> Path | None:
    """Pairs per cluster, largest first; with ``pool_counts``, the share of each cluster's pool kept."""
    if "cluster" not in frame.columns or frame.height == 0:
        return None
    counts = (
        frame.group_by("cluster")
        .len()
        .sort(["len", "cluster"], descending=[True, False])
        .drop_nulls("cluster")
    )
    if counts.height == 0:
        return None
    exported_by_cluster = dict(zip(counts["cluster"].to_list(), counts["len"].to_list(), strict=True))
    pool: dict[int, int] = {}
    if pool_counts:
        pool = {int(c): int(v) for c, v in pool_counts.items()}
        # every pool cluster gets a bar, so uncovered clusters show as pool-only bars
        clusters = sorted(set(pool) | set(exported_by_cluster), key=lambda c: (-pool.get(c, 0), c))
    else:
        clusters = list(exported_by_cluster)
    labels = [str(c) for c in clusters]
    exported = np.array([exported_by_cluster.get(c, 0) for c in clusters])
    figure = _figure(min(16.0, 4.0 + 0.12 * len(labels)), 3.6)
    ax = figure.subplots()
    positions = np.arange(len(labels))
    if pool:
        ax.bar(
            positions, [pool.get(c, 0) for c in clusters], color="#DDDDDD", label="pool (before selection)"
        )
    ax.bar(positions, exported, color="#4C72B0", label="exported")
    covered = f"{len(exported_by_cluster)} of {len(pool)}" if pool else str(len(exported_by_cluster))
    ax.set_title(f"pairs per cluster ({covered} clusters)", fontsize=10)
    ax.set_xlabel("cluster")
    ax.set_ylabel("pairs")
    if len(labels) <= 40:
        ax.set_xticks(positions, labels, fontsize=7, rotation=90)
    else:
        ax.set_xticks([])
    ax.legend(fontsize=8)
    return _save_figure(figure, path)


# --- dataset card -----------------------------------------------------------------------


def _size_category(n: int) -> str:
    for limit, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if n < limit:
            return name
    return "1M<n<10M"


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(_flatten(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(_cell(v) for v in value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: Iterable[tuple[Any, ...]], header: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _value_counts(frame: pl.DataFrame, column: str, top: int = 20) -> list[tuple[Any, int]]:
    counts = frame.group_by(column).len().sort(["len", column], descending=[True, False], nulls_last=True)
    return [(row[0], row[1]) for row in counts.head(top).iter_rows()]


def dataset_card(
    frame: pl.DataFrame,
    stats: Mapping[str, Any],
    *,
    data_files: Mapping[str, Path],
    plots: Mapping[str, Path],
    root: Path,
    trainer: Mapping[str, Any] | None = None,
) -> str:
    """The README.md text: YAML header for `datasets`, counts, sources, filters, scores, loading."""
    rel = {k: Path(p).relative_to(root).as_posix() for k, p in data_files.items()}
    main_kind = "parquet" if "parquet" in rel else "jsonl"
    title = stats.get("title", "Curated preference pairs (prefcurate)")
    header = [
        "---",
        "configs:",
        "- config_name: default",
        "  data_files:",
        f"  - split: {SPLIT}",
        f"    path: {rel[main_kind]}",
        "task_categories:",
        "- text-generation",
        "tags:",
        "- dpo",
        "- preference",
        "- synthetic",
        "- prefcurate",
        "size_categories:",
        f"- {_size_category(frame.height)}",
        "---",
        "",
        f"# {title}",
        "",
        stats.get(
            "description",
            "Synthetic preference pairs (prompt, chosen, rejected) built and curated with prefcurate: "
            "responses judged pairwise by an LLM jury in both orders, filtered for consistency, "
            "scored for quality and selected for quality and diversity.",
        ),
        "",
    ]
    body: list[str] = ["## Summary", ""]
    summary = [("pairs", frame.height)]
    if "prompt_id" in frame.columns:
        summary.append(("distinct prompts", frame["prompt_id"].n_unique()))
    else:
        summary.append(("distinct prompts", frame["prompt"].n_unique()))
    for column in ("strategy", "chosen_generator", "rejected_generator", "category"):
        if column in frame.columns:
            summary.append((f"distinct {column}", frame[column].n_unique()))
    body += [_table(summary, ("", "count")), ""]

    body += ["## Sources", ""]
    sources = stats.get("sources")
    if isinstance(sources, Mapping):
        body += [_table(_flatten(sources), ("source", "value")), ""]
    elif isinstance(sources, (list, tuple)) and sources and all(isinstance(s, Mapping) for s in sources):
        # records (e.g. rows of a SQL query): one table, columns in first-seen order
        columns = list(dict.fromkeys(key for record in sources for key in record))
        body += [_table([tuple(r.get(c, "") for c in columns) for r in sources], tuple(columns)), ""]
    elif isinstance(sources, (list, tuple)):
        body += [f"- {_cell(s)}" for s in sources] + [""]
    for column in ("source_file", "category", "chosen_generator", "rejected_generator", "strategy"):
        if column in frame.columns:
            body += [f"Pairs by `{column}`:", "", _table(_value_counts(frame, column), (column, "pairs")), ""]
    if not sources and not any(c in frame.columns for c in ("source_file", "category", "chosen_generator")):
        body += ["Not recorded.", ""]

    body += ["## Filters", ""]
    filters = stats.get("filters")
    if filters:
        body += [_table(_flatten(filters), ("filter", "value")), ""]
    else:
        body += ["No filter summary was given.", ""]

    # judges used, their labelled accuracy and the calibration gate (tasks/calibration.card_judges)
    judges = stats.get("judges")
    if judges:
        body += ["## Judges and calibration", ""]
        if stats.get("judge_warning"):
            body += [f"> **Warning:** {stats['judge_warning']}", ""]
        columns = list(dict.fromkeys(key for record in judges for key in record))
        body += [f"Jury aggregation: `{stats.get('jury_method', 'mean')}`.", "",
                 _table([tuple(r.get(c, "") for c in columns) for r in judges], tuple(columns)), ""]

    selection = stats.get("selection")
    if selection:
        body += ["## Selection", "", _table(_flatten(selection), ("statistic", "value")), ""]

    body += ["## Scores", ""]
    score_rows = []
    for column in SCORE_COLUMNS:
        if column in frame.columns and frame.schema[column].is_numeric():
            values = frame[column].drop_nulls().drop_nans().to_numpy().astype(np.float64)
            if values.size:
                q = np.quantile(values, [0.0, 0.25, 0.5, 0.75, 1.0])
                score_rows.append((column, values.size, values.mean(), *q))
    if score_rows:
        body += [_table(score_rows, ("score", "n", "mean", "min", "p25", "median", "p75", "max")), ""]
    else:
        body += ["No score columns.", ""]
    if "score_plot" in plots:
        body += [f"![score distribution]({Path(plots['score_plot']).relative_to(root).as_posix()})", ""]

    if "cluster" in frame.columns:
        body += ["## Cluster coverage", ""]
        n_clusters = frame["cluster"].drop_nulls().n_unique()
        pool = stats.get("cluster_pool_counts")
        line = f"The pairs cover {n_clusters} embedding clusters"
        line += f" of {len(pool)} in the de-duplicated pool." if pool else "."
        body += [line, ""]
        if "cluster_plot" in plots:
            body += [f"![cluster coverage]({Path(plots['cluster_plot']).relative_to(root).as_posix()})", ""]

    body += ["## Columns", "", _table([(c, str(t)) for c, t in frame.schema.items()], ("column", "type")), ""]

    body += ["## How to load", "", "```python", "from datasets import load_dataset", ""]
    if "parquet" in rel:
        body.append(f'pairs = load_dataset("parquet", data_files="{rel["parquet"]}", split="{SPLIT}")')
    if "jsonl" in rel:
        body.append(f'pairs = load_dataset("json", data_files="{rel["jsonl"]}", split="{SPLIT}")')
    body += [
        "# or the folder itself, through this card's `configs` entry:",
        f'pairs = load_dataset("path/to/this/folder", split="{SPLIT}")',
        "```",
        "",
        "Each row has `prompt`, `chosen` and `rejected` as plain strings, the format of TRL's "
        "`DPOTrainer`; the other columns are metadata.",
        "",
    ]
    if trainer is not None:
        body += _trainer_sections(trainer, rel, root)
    provenance = stats.get("provenance")
    if provenance:
        body += ["## Provenance", "", _table(_flatten(provenance), ("", "value")), ""]
    known = {"title", "description", "sources", "filters", "selection", "cluster_pool_counts", "provenance"}
    other = {k: v for k, v in stats.items() if k not in known}
    if other:
        body += ["## Other statistics", "", _table(_flatten(other), ("statistic", "value")), ""]
    return "\n".join(header + body).rstrip() + "\n"


def _trainer_sections(trainer: Mapping[str, Any], rel: Mapping[str, str], root: Path) -> list[str]:
    """The card's formats (how to load each), integrity and verdict-statistics sections."""
    files = {k: Path(p).relative_to(root).as_posix() for k, p in (trainer.get("files") or {}).items()}
    standard = rel.get("jsonl") or rel.get("parquet")
    lines = ["## Formats", "", _table(
        [("TRL preference, standard (strings)", standard or "-", "prompt (system prompt not included), chosen, rejected")]
        + ([("TRL preference, conversational", files["trl_conversational"],
             "prompt = [system?, user] messages; chosen/rejected = [assistant] message")]
           if "trl_conversational" in files else [])
        + ([("LLaMA-Factory ranking (alpaca)", files["llamafactory_ranking"],
             f"instruction, input, chosen, rejected, system; entry `{LLAMAFACTORY_DATASET}` in dataset_info.json")]
           if "llamafactory_ranking" in files else []),
        ("format", "file", "columns")), ""]
    integrity = trainer.get("integrity") or {}
    max_length = integrity.get("max_length", 1024)
    max_prompt = integrity.get("max_prompt_length", 512)
    lines += ["```python", "from datasets import load_dataset", "from trl import DPOConfig, DPOTrainer", ""]
    if standard:
        kind = "json" if standard.endswith(".jsonl") else "parquet"
        lines.append(f'standard = load_dataset("{kind}", data_files="{standard}", split="{SPLIT}")')
    if "trl_conversational" in files:
        lines.append(f'conversational = load_dataset("json", data_files="{files["trl_conversational"]}", split="{SPLIT}")')
    lines += [f"args = DPOConfig(output_dir=\"dpo\", max_length={max_length}, max_prompt_length={max_prompt})",
              "trainer = DPOTrainer(model=model, args=args, train_dataset=conversational, processing_class=tokenizer)"
              if "trl_conversational" in files else
              "trainer = DPOTrainer(model=model, args=args, train_dataset=standard, processing_class=tokenizer)",
              "```", ""]
    if "llamafactory_ranking" in files:
        folder = Path(files["llamafactory_ranking"]).parent.as_posix()
        lines += [f"LLaMA-Factory: set `dataset_dir: {folder}` (this folder's copy) and `dataset: {LLAMAFACTORY_DATASET}` "
                  "with `stage: dpo` in the training YAML (the entry sets `ranking: true`).", ""]
    lines += ["## Trainer integrity", ""]
    if integrity.get("action", "off") == "off":
        lines += ["Not checked (export.integrity.action: off).", ""]
    else:
        lines += [
            f"Checked with the tokenizer `{integrity.get('tokenizer')}` at max_length {max_length} and "
            f"max_prompt_length {max_prompt} (TRL's truncation: the prompt keeps its last tokens, the "
            f"completions their first). {integrity.get('failing', 0)} of {integrity.get('checked', 0)} pairs "
            f"failed and were {'dropped' if integrity.get('action') == 'drop' else 'flagged (column integrity_issue)'}.",
            "",
        ]
        reasons = integrity.get("reasons") or {}
        if reasons:
            lines += [_table(sorted(reasons.items()), ("reason", "pairs")), ""]
        if "dropped" in files:
            lines += [f"The dropped pairs and their token counts: `{files['dropped']}`.", ""]
    lines += ["## Verdicts", ""]
    bias = trainer.get("length_bias") or {}
    rows = []
    if bias.get("chosen_longer_share") is not None:
        rows += [(f"chosen at least {bias['ratio']:g}x longer than rejected (length bias)", bias["chosen_longer_share"]),
                 (f"rejected at least {bias['ratio']:g}x longer than chosen", bias["rejected_longer_share"])]
    if trainer.get("single_order_share") is not None:
        rows.append(("verdict from a single presentation order (no judge saw both)", trainer["single_order_share"]))
    if rows:
        lines += [_table(rows, ("share of pairs", "value")), ""]
    judges = trainer.get("judges") or {}
    if judges:
        lines += ["Per-judge agreement with the exported verdict (share of the pairs each judge judged):", "",
                  _table([(j, v["pairs"], v["for_chosen"], v["against"], v["tie"], v["both_orders_share"])
                          for j, v in judges.items()],
                         ("judge", "pairs", "for chosen", "against", "tie", "both orders")), ""]
    return lines
