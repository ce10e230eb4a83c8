"""The export stage's Prefect flow: run alone (``prefcurate run export``, the ``export-adhoc``
deployment in prefect.yaml) or as a subflow of ``build-dataset``; the same flow either way."""

from prefcurate.flows.stage import stage_flow

export_flow = stage_flow("export")
