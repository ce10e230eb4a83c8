"""The generate stage's Prefect flow: run alone (``prefcurate run generate``, the ``generate-adhoc``
deployment in prefect.yaml) or as a subflow of ``build-dataset``; the same flow either way."""

from prefcurate.flows.stage import stage_flow

generate_flow = stage_flow("generate")
