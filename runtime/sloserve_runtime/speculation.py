"""Speculative decoding per tier: how many tokens a decode verifies per step. Imports no vLLM.

With speculation, a decode step verifies ``length`` tokens of a request (``length - 1`` drafted
ones plus the one it samples anyway). If each drafted token is accepted with probability ``α``
(independently, and only after all before it), the step yields on average

    E(length) = (1 - α^length) / (1 - α)

tokens (``E(1) = 1``: no speculation). Verifying more tokens makes the step longer, so the time
per output token of the request is ``step(length) / E(length)``.

Per tier (the request's TPOT target) the planner takes the **shortest length that keeps the
tier's TPOT** (a loose tier does not speculate and leaves the compute to others); a tier whose
TPOT no length keeps gets the length with the least time per token. ``α`` is measured per tier
from the engine's own acceptance counts (``AcceptanceRates``), starting from a prior.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


def expected_tokens(alpha: float, length: int) -> float:
    """Tokens a step yields on average when it verifies ``length`` tokens at acceptance ``alpha``."""
    if length < 1:
        raise ValueError(f"length must be at least 1, got {length}")
    if alpha >= 1.0:
        return float(length)
    return (1.0 - alpha**length) / (1.0 - alpha)


def choose_length(
    tpot_seconds: float, alpha: float, step_seconds: Callable[[int], float], max_length: int, headroom: float = 0.9
) -> int:
    """The speculation length (tokens verified per step, 1..max_length) for a tier.

    ``step_seconds(length)``: the predicted step time when the tier's decodes verify ``length``
    tokens each. The shortest length whose time per token stays within ``tpot_seconds *
    headroom``; if none does, the length with the least time per token.
    """
    if math.isinf(tpot_seconds) or max_length <= 1:
        return 1
    per_token = {length: step_seconds(length) / expected_tokens(alpha, length) for length in range(1, max_length + 1)}
    for length, seconds in per_token.items():
        if seconds <= tpot_seconds * headroom:
            return length
    return min(per_token, key=lambda length: (per_token[length], length))


@dataclass
class AcceptanceRates:
    """Acceptance rate of drafted tokens per tier, from counts, with a prior worth ``prior_weight`` trials.

    Verification keeps the longest accepted prefix of the drafts, so a step that drafted ``d`` and
    accepted ``k`` tried ``k`` tokens that passed and, if ``k < d``, one that failed; the drafts
    after it were never tried. The estimate is ``(passed + prior * weight) / (tried + weight)``:
    a tier starts at the prior and moves to what the engine measures.
    """

    prior: float = 0.5
    prior_weight: float = 20.0
    counts: dict[float, list[int]] = field(default_factory=dict)  # tier (TPOT seconds) -> [passed, tried]

    def record(self, tier: float, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        accepted = max(0, min(accepted, drafted))
        counts = self.counts.setdefault(tier, [0, 0])
        counts[0] += accepted
        counts[1] += accepted + (accepted < drafted)

    def alpha(self, tier: float) -> float:
        passed, tried = self.counts.get(tier, (0, 0))
        return (passed + self.prior * self.prior_weight) / (tried + self.prior_weight)
