"""The select stage's Prefect flow: run alone (``prefcurate run select``, the ``select-adhoc``
deployment in prefect.yaml) or as a subflow of ``build-dataset``; the same flow either way."""

from prefcurate.flows.stage import stage_flow

select_flow = stage_flow("select")
