"""The score stage's Prefect flow: run alone (``prefcurate run score``, the ``score-adhoc``
deployment in prefect.yaml) or as a subflow of ``build-dataset``; the same flow either way."""

from prefcurate.flows.stage import stage_flow

score_flow = stage_flow("score")
