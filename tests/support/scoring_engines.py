"""Position-free scoring doubles (tests/support, outside the package): for unit tests of the
reward-model and density-ratio judge modes' pure logic, and benches that measure everything
but the model. No user run can reach them.
"""

from __future__ import annotations

from prefcurate.inference.scoring import ContinuationLogprob, RewardScore


class ScriptedScoringEngine:
    """``reward_fn(prompt, response) -> float`` and ``logprob_fn(context, continuation) ->
    (sum logprob, tokens)`` script the answers; a function raising makes that request fail
    (its error is the exception's text). ``requests`` counts what was asked, per call."""

    def __init__(self, reward_fn=None, logprob_fn=None, model: str = "scripted-scorer", name: str = "scripted"):
        self.model, self.name = model, name
        self._reward_fn, self._logprob_fn = reward_fn, logprob_fn
        self.requests: dict[str, int] = {"score_rewards": 0, "continuation_logprobs": 0}

    def score_rewards(self, requests):
        out = []
        for request in requests:
            self.requests["score_rewards"] += 1
            try:
                out.append(RewardScore(float(self._reward_fn(request.prompt, request.response)), 1))
            except Exception as error:  # a scripted failure: this request only
                out.append(RewardScore(float("nan"), 1, 0.0, f"scripted: {error}"))
        return out

    def continuation_logprobs(self, requests):
        out = []
        for request in requests:
            self.requests["continuation_logprobs"] += 1
            try:
                total, tokens = self._logprob_fn(request.context, request.continuation)
                out.append(ContinuationLogprob(float(total), int(tokens)))
            except Exception as error:
                out.append(ContinuationLogprob(float("nan"), 0, 0.0, f"scripted: {error}"))
        return out

    def close(self) -> None:
        pass
