"""Import step: one unit per (file and joined files' bytes, mapping); see tasks/import_judgments.py.

The import reads files and writes tables: no model, no cluster. ``prefcurate import
judgments`` therefore runs its one unit in this process (:func:`run_import`), through the
same plan -> pending -> run_unit -> register path a stage flow uses, so the unit's manifest,
contract gate, idempotency and ``repair`` behave as for every other stage.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefcurate.schemas.ids import content_id, file_sha256
from prefcurate.steps.base import StageContext, Step, Unit, context_for
from prefcurate.tasks.import_judgments import ImportMapping, detect_format, import_file

OUTPUTS = ("prompts", "responses", "judgments", "ratings", "quarantine")
ID_COLUMNS = {"prompts": "prompt_id", "responses": "response_id", "judgments": "judgment_id", "ratings": "rating_id"}


class ImportJudgmentsStep(Step):
    name = "import"

    def __init__(self, path: str | Path, mapping: ImportMapping):
        self.path = Path(path).expanduser().resolve()
        self.mapping = mapping

    def plan(self, ctx: StageContext) -> list[Unit]:
        detect_format(self.path, self.mapping.format)  # a missing file or unknown format fails here
        joined = [file_sha256(self.path.parent / j.file if not Path(j.file).is_absolute() else j.file)
                  for j in self.mapping.join]
        mapping = self.mapping.model_dump(mode="json")
        key = content_id("import-judgments", file_sha256(self.path), joined, mapping)
        return [Unit(self.name, key, OUTPUTS, {"path": str(self.path), "mapping": mapping})]

    def compute(self, unit: Unit, ctx: StageContext):
        store = ctx.store()

        def stored(table: str, ids):
            return store.stored_ids(table, ID_COLUMNS[table], ids)

        result = import_file(unit.payload["path"], ImportMapping.model_validate(unit.payload["mapping"]), stored)
        frames = {"prompts": result.prompts, "responses": result.responses, "judgments": result.judgments,
                  "ratings": result.ratings, "quarantine": result.quarantine}
        return frames, dict(result.counts)


def run_import(dataset: str | Path, path: str | Path, mapping: ImportMapping, notify=None) -> dict:
    """Import one file into ``dataset`` (created when missing) under its writer lock.

    Returns the counts; ``already_imported`` is 1 when this file was imported with this
    mapping before (nothing is added then).
    """
    from prefcurate.config import PipelineConfig
    from prefcurate.store import Store

    store = Store.open_or_init(dataset)
    step = ImportJudgmentsStep(path, mapping)
    with store.writer_lock("prefcurate import judgments", notify=notify):
        run_id = store.start_run("import", {"path": str(step.path), "mapping": mapping.model_dump(mode="json")})
        started = time.perf_counter()
        try:
            ctx = context_for(store.root, PipelineConfig(), run_id)
            todo, done = step.pending(ctx, step.plan(ctx))
            counts: dict = {"already_imported": int(bool(done) and not todo)}
            for unit in todo:
                result = step.run_unit(unit, ctx)
                store.register(result.shards, unit=(step.name, unit.key), counts=result.counts)
                counts.update(result.counts)
        except BaseException as error:
            store.finish_run(run_id, "failed", {}, {"seconds": time.perf_counter() - started},
                             message=f"{type(error).__name__}: {error}")
            raise
        store.finish_run(run_id, "completed", counts, {"seconds": time.perf_counter() - started})
    return {"run_id": run_id, "dataset": str(store.root), **counts}
