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

Both files load with ``datasets.load_dataset("json" | "parquet", data_files=...)`` and the
folder itself with ``load_dataset(out_dir)`` (the card's ``configs`` entry points at the
Parquet file). The JSONL uses the plain-string DPO format TRL's ``DPOTrainer`` reads.

Every file is written to a temporary name in its folder and renamed into place, so a crash
never leaves a half-written file under a final name. Plots use Matplotlib's object API on
the Agg canvas (no pyplot state, safe in worker threads).
"""

from __future__ import annotations

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


def export_pairs(
    frame: pl.DataFrame,
    out_dir: str | os.PathLike,
    *,
    formats: Iterable[str] = ("jsonl", "parquet"),
    card_stats: Mapping[str, Any] | None = None,
    plots: bool = True,
) -> dict[str, Path]:
    """Write the pairs and the card; returns ``{"jsonl", "parquet", "card", plot names...}`` -> path.

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
    stats = dict(card_stats or {})
    out = Path(out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    frame = _ordered(frame)

    written: dict[str, Path] = {}
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
    card = dataset_card(
        frame,
        stats,
        data_files={k: written[k] for k in ("parquet", "jsonl") if k in written},
        plots=plot_paths,
        root=out,
    )
    written["card"] = _atomic_write(out / "README.md", lambda p: Path(p).write_text(card, encoding="utf-8"))
    return written


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
    provenance = stats.get("provenance")
    if provenance:
        body += ["## Provenance", "", _table(_flatten(provenance), ("", "value")), ""]
    known = {"title", "description", "sources", "filters", "selection", "cluster_pool_counts", "provenance"}
    other = {k: v for k, v in stats.items() if k not in known}
    if other:
        body += ["## Other statistics", "", _table(_flatten(other), ("statistic", "value")), ""]
    return "\n".join(header + body).rstrip() + "\n"
