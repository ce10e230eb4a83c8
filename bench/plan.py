"""Planning cost of generate and annotate on a finished dataset of 100,000 prompts.

Measures planning only, no model: a synthetic registered dataset (100,000 prompts in
1,000-row shards, 3 responses per prompt, 1% of them failed, 1 judgment and 3 ratings per
prompt) is written directly as shards through the store, then the good/failed-id lookups
that ``plan()`` makes are timed in the grouped form (one query per table per stage,
``_ids_by_shard``) and in the earlier per-shard form (a query per prompt shard and table,
``_good_ids``/``_failed_ids``), kept here as the baseline. Both must give the same ids.

Then every stage after ingest is planned as a build plans it (``plan`` and ``pending`` with the
quickstart's config): first on the dataset as written (generate and annotate make their
lookups and remember them for this registry state, ``plan_s_stages_first``), then again
(``plan_s_stages_again``: the registry is read, not the shards), as a no-op re-run does.

Run: ``.venv/bin/python bench/plan.py`` (no arguments). Last line:
``RESULT plan_s_old=<..> plan_s_new=<..> ratio=<old/new> plan_s_stages_first=<..> plan_s_stages_again=<..>``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
from prefcurate.schemas.tables import TABLES

from prefcurate.steps import model_stages
from prefcurate.store import Store

PROMPTS, SHARD_ROWS = 100_000, 1_000
_PROVENANCE = {"run_id", "stage", "code_version", "created_at"}
LOOKUPS = [("responses", "response_id", model_stages._RESPONSE_OK),  # generate, and annotate's key
           ("judgments", "judgment_id", "valid"), ("ratings", "rating_id", "valid")]  # annotate


def _filler(field: pa.Field, n: int) -> pa.Array:
    t = field.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pa.array(["x"] * n, t)
    if pa.types.is_boolean(t):
        return pa.array([True] * n, t)
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return pa.array(np.zeros(n), pa.float64()).cast(t)
    return pa.nulls(n, t)


def _frame(table: str, columns: dict[str, list]) -> pa.Table:
    """A table of the store's schema: the given columns, the rest filled by type."""
    n = len(next(iter(columns.values())))
    # the store adds the provenance columns and nulls the nullable ones left out
    fields = [f for f in TABLES[table] if f.name in columns or not (f.nullable or f.name in _PROVENANCE)]
    arrays = [pa.array(columns[f.name], f.type) if f.name in columns else _filler(f, n) for f in fields]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def build(root: Path) -> Store:
    store = Store.init(root)
    shards = []
    for index in range(PROMPTS // SHARD_ROWS):
        prompt_ids = [f"p{index}-{i}" for i in range(SHARD_ROWS)]
        shards.append(store.write("prompts", _frame("prompts", {"prompt_id": prompt_ids}),
                                  key=f"prompts-{index}", run_id="r0", stage="ingest"))
        per_prompt = np.repeat(prompt_ids, 3).tolist()
        response_ids = [f"{p}-r{k}" for p in prompt_ids for k in range(3)]
        finish = ["error" if (i % 100 == 0) else "stop" for i in range(len(response_ids))]
        shards.append(store.write("responses", _frame("responses", {
            "response_id": response_ids, "prompt_id": per_prompt, "finish_reason": finish}),
            key=f"responses-{index}", run_id="r1", stage="generate"))
        shards.append(store.write("judgments", _frame("judgments", {
            "judgment_id": [f"{p}-j" for p in prompt_ids], "prompt_id": prompt_ids,
            "valid": [i % 50 != 0 for i in range(SHARD_ROWS)]}),
            key=f"judgments-{index}", run_id="r2", stage="annotate"))
        shards.append(store.write("ratings", _frame("ratings", {
            "rating_id": response_ids, "prompt_id": per_prompt, "response_id": response_ids}),
            key=f"ratings-{index}", run_id="r2", stage="annotate"))
    store.register(shards)
    return store


def per_shard_lookups(store: Store) -> list:
    """The earlier form: every prompt shard read, then a query per table and shard."""
    found = []
    for shard in store.shards("prompts"):
        prompt_ids = store.read_shard(shard["path"])["prompt_id"].to_list()
        for table, id_column, ok in LOOKUPS:
            found.append((shard["path"], table, "good",
                          sorted(model_stages._good_ids(store, table, id_column, ok, prompt_ids))))
            found.append((shard["path"], table, "failed",
                          sorted(model_stages._failed_ids(store, table, id_column, ok, prompt_ids))))
    return found


def grouped_lookups(store: Store) -> list:
    shards = store.shards("prompts")
    prompt_shards = model_stages._prompt_ids_by_shard(store, shards)
    per_table = {table: model_stages._ids_by_shard(store, prompt_shards, table, id_column, ok)
                 for table, id_column, ok in LOOKUPS}
    found = []
    for shard in shards:
        for table, _, _ in LOOKUPS:
            good, failed = per_table[table]
            found.append((shard["path"], table, "good", sorted(good.get(shard["path"], []))))
            found.append((shard["path"], table, "failed", sorted(failed.get(shard["path"], []))))
    return found


def plan_stages(store: Store) -> float:
    """Seconds to plan every stage after ingest (plan + pending) with the quickstart's config."""
    from prefcurate.config import load_config
    from prefcurate.stages import STAGE_NAMES
    from prefcurate.steps import get_step
    from prefcurate.steps.base import context_for

    ctx = context_for(store.root, load_config(str(Path(__file__).parents[1] / "examples" / "quickstart.yaml")),
                      "bench-plan")
    start = time.perf_counter()
    for stage in STAGE_NAMES[1:]:
        step = get_step(stage)
        step.pending(ctx, step.plan(ctx))
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        store = build(Path(tmp) / "ds")
        print(f"built {PROMPTS} prompts in {PROMPTS // SHARD_ROWS} shards: {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        new = grouped_lookups(store)
        new_s = time.perf_counter() - start
        start = time.perf_counter()
        old = per_shard_lookups(store)
        old_s = time.perf_counter() - start
        assert new == old, "grouped planning found other ids than the per-shard queries"
        failed = sum(len(ids) for _, _, kind, ids in new if kind == "failed")
        print(f"both forms agree: {failed} failed ids over {len(new)} (shard, table, kind) lookups")
        first_s = plan_stages(store)
        again_s = plan_stages(store)
        print(f"every stage after ingest planned: {first_s:.2f} s, again (nothing changed): {again_s:.2f} s")
        print(f"RESULT plan_s_old={old_s:.2f} plan_s_new={new_s:.2f} ratio={old_s / new_s:.1f} "
              f"plan_s_stages_first={first_s:.2f} plan_s_stages_again={again_s:.2f}")


if __name__ == "__main__":
    pl.Config.set_tbl_rows(5)
    main()
