"""The filter stage's Prefect flow: run alone (``prefcurate run filter``, the ``filter-adhoc``
deployment in prefect.yaml) or as a subflow of ``build-dataset``; the same flow either way."""

from prefcurate.flows.stage import stage_flow

filter_flow = stage_flow("filter")
