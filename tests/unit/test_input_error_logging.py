"""Prefect's flow and task engines log a failed run's exception with its traceback; for an
InputError (a bad file or config) that was a 60-line wall above the CLI's one ``error:``
line. Importing the flows makes those loggers log an InputError's message alone, and any
other exception with its traceback as before."""

from __future__ import annotations

import io
import logging

import prefcurate.flows.common  # noqa: F401  (installs the filter, as the CLI and workers do)
import pytest
from prefcurate.tasks.ingest import IngestError
from prefect.logging.loggers import get_logger


@pytest.mark.filterwarnings("ignore:Logger 'prefect:UserWarning")  # (no flow run here to send logs to)
@pytest.mark.parametrize("name", ["prefect.flow_runs", "prefect.task_runs"])
def test_an_input_error_is_logged_without_its_traceback_and_a_bug_with_it(name):
    logger = get_logger(name)  # the logger Prefect's engine logs a run's exception to
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        for error in (IngestError("record 3: field 'prompt' is not text"), RuntimeError("a bug")):
            try:
                raise error
            except Exception as exc:
                logger.exception("Encountered exception during execution: %r", exc)  # noqa: TRY401  (as Prefect logs it)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    first, second = text.split("Encountered exception during execution: RuntimeError")
    assert "record 3: field 'prompt' is not text" in first and "Traceback" not in first
    assert "Traceback" in second and "RuntimeError: a bug" in second
