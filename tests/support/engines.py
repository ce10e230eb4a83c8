"""Engine doubles for unit tests of pure stage logic and for benches that measure everything
but the model. They live outside the package on purpose: no user run can reach them.
"""

from __future__ import annotations

from prefcurate.inference.base import ChoiceScore, Completion, Generation


class ScriptedEngine:
    """Scripted engine double (tests/support, outside the package): unit tests of pure logic only.

    ``choice_fn(prompt, options) -> probs`` and ``generate_fn(request, i) -> text`` script
    the answers, so aggregation math can be checked against known values.
    """

    def __init__(self, choice_fn=None, generate_fn=None, model: str = "scripted"):
        self.model = model
        self._choice_fn = choice_fn
        self._generate_fn = generate_fn
        self.calls: list[str] = []

    def generate(self, requests):
        out = []
        for request in requests:
            self.calls.append("generate")
            texts = [self._generate_fn(request, i) for i in range(request.params.n)]
            out.append(
                Generation([Completion(t, "stop", len(t.split())) for t in texts], tokens_in=1)
            )
        return out

    def score_choices(self, requests):
        out = []
        for request in requests:
            self.calls.append("score_choices")
            probs = tuple(float(p) for p in self._choice_fn(request.prompt, request.options))
            total = sum(probs)
            out.append(ChoiceScore(tuple(p / total for p in probs)))
        return out

    def close(self) -> None:
        pass
