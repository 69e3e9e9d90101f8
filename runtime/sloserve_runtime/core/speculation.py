"""Speculative decoding per tier: how many tokens a decode verifies per step. Imports no vLLM.

With speculation, a decode step verifies ``length`` tokens of a request (``length - 1`` drafted
ones plus the one it samples anyway). If each drafted token is accepted with probability ``α``
(independently, and only after all before it), the step yields on average

    E(length) = (1 - α^length) / (1 - α)

tokens (``E(1) = 1``: no speculation). Verifying more tokens makes the step longer, so the time
per output token of the request is ``step(length) / E(length)``.

Per tier (the request's TPOT target) the planner takes the **shortest length that keeps the
tier's TPOT**, but never less than the length with the least *marginal* step time per token
(what one more decode adds to a step, over its expected tokens) where that is a fifth cheaper
than no speculation; a tier whose TPOT no length keeps gets the length with the least time per
token. Where a verified token costs far more than
a request in the batch (a small model on a CPU) the marginal choice is 1: a loose tier does not
speculate and leaves the compute to others. Where a request costs far more than a token (a large
model on a GPU, whose step is dominated by per-request and fixed costs) every tier drafts: a
request that finishes sooner frees its place in the batch for the next. ``α`` is measured per tier
from the engine's own acceptance counts (``AcceptanceRates``), starting from a prior.
``TierSpeculation`` holds both for one engine: the planner plans its steps with it, and the vLLM
adapter and the simulator cut each request's drafts to its length.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sloserve.slo import ATTAINMENT_WINDOW
from sloserve_runtime.core.step_time import StepTimeModel, attended_pairs


def expected_tokens(alpha: float, length: int) -> float:
    """Tokens a step yields on average when it verifies ``length`` tokens at acceptance ``alpha``."""
    if length < 1:
        raise ValueError(f"length must be at least 1, got {length}")
    if alpha >= 1.0:
        return float(length)
    return (1.0 - alpha**length) / (1.0 - alpha)


# Speculate beyond what a tier's TPOT needs only if it cuts a decode's marginal step time per
# token by at least a fifth: rejected drafts take compute that prefill chunks could use.
MARGINAL_GAIN = 0.8


def choose_length(
    tpot_seconds: float,
    alpha: float,
    step_seconds: Callable[[int], float],
    max_length: int,
    headroom: float = 0.9,
    marginal_seconds: Callable[[int], float] | None = None,
) -> int:
    """The speculation length (tokens verified per step, 1..max_length) for a tier.

    ``step_seconds(length)``: the predicted step time when the tier's decodes verify ``length``
    tokens each. The shortest length whose time per token stays within ``tpot_seconds *
    headroom``; if none does, the length with the least time per token.

    ``marginal_seconds(length)``: what one more decode verifying ``length`` tokens adds to a step.
    Given, the length is at least the one with the least marginal time per token, if that is at
    most ``MARGINAL_GAIN`` times the marginal time per token of no speculation: where a request
    in the batch costs far more than a verified token (a large model on a GPU), drafts are nearly
    free and a request that finishes sooner gives its place in the batch to the next.
    """
    if max_length <= 1:
        return 1
    cheapest = 1
    if marginal_seconds is not None:
        marginal = {
            length: marginal_seconds(length) / expected_tokens(alpha, length) for length in range(1, max_length + 1)
        }
        cheapest = min(marginal, key=lambda length: (marginal[length], length))
        if marginal[cheapest] > MARGINAL_GAIN * marginal[1]:
            cheapest = 1  # not worth the compute its rejected drafts take from prefill chunks
    if math.isinf(tpot_seconds):
        return cheapest
    per_token = {length: step_seconds(length) / expected_tokens(alpha, length) for length in range(1, max_length + 1)}
    for length, seconds in per_token.items():
        if seconds <= tpot_seconds * headroom:
            return max(length, cheapest)
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


WINDOW = ATTAINMENT_WINDOW  # tokens per attainment window
WINDOW_QUANTILE = 0.9  # how surely a window's tokens come within the steps the planner counts on


@functools.lru_cache(maxsize=4096)
def steps_for_tokens(alpha: float, length: int, tokens: int, quantile: float) -> int:
    """The fewest steps that yield ``tokens`` tokens with probability at least ``quantile``.

    A step verifying ``length`` tokens yields k < length tokens with probability α^(k-1)(1 - α),
    and all ``length`` with probability α^(length-1).
    """
    yields = [alpha ** (k - 1) * (1 - alpha) for k in range(1, length)] + [alpha ** (length - 1)]
    short = {0: 1.0}  # tokens so far (fewer than ``tokens``) -> probability, after ``steps`` steps
    steps = 0
    while sum(short.values()) > 1 - quantile:
        steps += 1
        after: dict[int, float] = {}
        for have, p in short.items():
            for k, q in enumerate(yields, start=1):
                if have + k < tokens:
                    after[have + k] = after.get(have + k, 0.0) + p * q
        short = after
    return max(steps, 1)


class TierSpeculation:
    """The speculation length of each tier for one engine's next step, and the acceptance it measured.

    Rules for callers: ``plan`` once per step with the step's decodes, before asking ``length``;
    ``record`` every verification the engine reports. With ``max_length`` 1 (no speculation
    configured) every length is 1.
    """

    def __init__(self, step_time: StepTimeModel, max_length: int, prior: float = 0.5, headroom: float = 0.5) -> None:
        self.step_time = step_time
        self.headroom = headroom
        self.max_length = max_length  # tokens a step may verify per request: 1 + vLLM's num_speculative_tokens
        self.acceptance = AcceptanceRates(prior=prior)
        self._lengths: dict[float, int] = {}  # tier (TPOT seconds) -> length, for the planned step
        self._decodes, self._context = 1, 0  # the planned step's decodes and their KV context

    @property
    def enabled(self) -> bool:
        return self.max_length > 1

    def plan(self, decodes: int, context: int) -> None:
        """A new step with ``decodes`` decoding requests over ``context`` KV tokens: choose lengths afresh."""
        self._lengths.clear()
        self._decodes, self._context = max(1, decodes), context

    @contextmanager
    def planning(self, decodes: int, context: int) -> Iterator[None]:
        """Lengths for a step of ``decodes`` over ``context`` while the block runs; then the step
        planned before is back, so a feasibility query (admission) leaves the step's lengths alone."""
        saved = dict(self._lengths), self._decodes, self._context
        self.plan(decodes, context)
        try:
            yield
        finally:
            self._lengths, self._decodes, self._context = saved

    def length(self, tpot_seconds: float) -> int:
        """Tokens a decode of this tier verifies in the planned step (1: no speculation)."""
        if not self.enabled:
            return 1
        length = self._lengths.get(tpot_seconds)
        if length is None:
            alpha = self.acceptance.alpha(tpot_seconds)
            length = choose_length(
                tpot_seconds, alpha, self.uniform_step, self.max_length, self.headroom, self._marginal_step
            )
            self._lengths[tpot_seconds] = length
        return length

    def window_tokens_per_step(self, tpot_seconds: float, length: int | None = None) -> float:
        """Output tokens per step a decode of this tier can count on over an attainment window.

        Attainment judges the mean gap over windows of ``WINDOW`` tokens, and acceptance is random:
        a window that meets several rejections takes more steps than the mean suggests. This is
        ``WINDOW`` over the steps that bring ``WINDOW`` tokens with probability ``WINDOW_QUANTILE``.
        """
        length = self.length(tpot_seconds) if length is None else length
        if length <= 1:
            return 1.0
        return WINDOW / steps_for_tokens(self.acceptance.alpha(tpot_seconds), length, WINDOW, WINDOW_QUANTILE)

    def record(self, tpot_seconds: float, drafted: int, accepted: int) -> None:
        self.acceptance.record(tpot_seconds, drafted, accepted)

    def _marginal_step(self, length: int) -> float:
        """What one more decode, over the planned decodes' mean context, adds to a step where all verify ``length``."""
        context = self._context + self._context // self._decodes
        return self.uniform_step(length, self._decodes + 1, context) - self.uniform_step(length)

    def uniform_step(self, length: int, decodes: int | None = None, context: int | None = None) -> float:
        """Predicted step time when every decode (by default the planned step's) verifies ``length`` tokens.

        Each query attends to its request's context and to the drafts before it.
        """
        count = self._decodes if decodes is None else decodes
        context = self._context if context is None else context
        attended = length * context + count * attended_pairs(length, length)
        return self.step_time.step_seconds(count * length, count, context, attended)
