"""The ingest stage's Prefect flow: run alone (``prefcurate run ingest``, the ``ingest-adhoc``
deployment in prefect.yaml) or as a subflow of ``build-dataset``; the same flow either way."""

from prefcurate.flows.stage import stage_flow

ingest_flow = stage_flow("ingest")
