"""The annotate stage's Prefect flow: run alone (``prefcurate run annotate``, the ``annotate-adhoc``
deployment in prefect.yaml) or as a subflow of ``build-dataset``; the same flow either way."""

from prefcurate.flows.stage import stage_flow

annotate_flow = stage_flow("annotate")
