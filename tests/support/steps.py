"""Steps for tests of the store and the unit machinery (outside the package on purpose)."""

from __future__ import annotations

from prefcurate.steps.base import Step
from tests.support.rows import prompts


class CountingIngestStep(Step):
    """An ingest unit that writes three prompts and counts how often it computed, so a test
    can 'kill' its process at some point and tell a re-run from an adopted result."""

    name = "ingest"

    def __init__(self):
        self.computed = 0

    def compute(self, unit, ctx):
        self.computed += 1
        return {"prompts": prompts(["x", "y", "z"])}, {}
