"""The bound on a step's time: the tightest TPOT among the admitted decodes, or what their
attainment windows leave (window slack); with speculation, a TPOT per token a step yields.

A mixin of ``Planner``: it reads the planner's settings (``step_time``, ``speculation``,
``headroom``, ``window_margin``, ``window_reserve``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from sloserve_runtime.core.planner.views import CONTEXT, LiveRequest, admitted_decodes_of


class StepBounds:
    """How long a step may take, for the decodes it carries."""

    @property
    def _share(self) -> float:
        """The share of a TPOT a step is planned to take: the headroom, less the window margin.

        Every step is held to it, not only the admitted decodes' check: a step that best-effort
        decodes or a prompt's chunk fill to the TPOT itself leaves the admitted windows no margin,
        and then the first ten steps in a row that run a little slower than planned break every
        one of them together.
        """
        return self.headroom / (1.0 + self.window_margin)

    def step_bound(self, live: Sequence[LiveRequest], now: float | None = None) -> float:
        """Seconds a step that starts at ``now`` may take: the tightest TPOT among admitted decoding
        requests, or, with ``now`` and window slack on, what their attainment windows leave
        (``_window_bound``). inf: no admitted request decodes.
        """
        return self._bounds(admitted_decodes_of(live), now)[1]

    def _bounds(
        self, decodes: Sequence[LiveRequest], now: float | None = None, tiers: set[float] | None = None
    ) -> tuple[float, float]:
        """(one TPOT a step, the bound with window slack) for a step of these admitted decodes
        (``tiers``: their TPOTs, if known)."""
        if tiers is None:
            tiers = {r.state.tpot_seconds for r in decodes}  # a few tiers among many decodes
        bound = min((self._seconds_per_step(tpot) for tpot in tiers), default=math.inf) * self._share
        if now is None or math.isinf(bound) or self.window_reserve is None:
            return bound, bound
        if self.speculation is not None:
            # A step brings each decode at least one token, so the windows' bound for one token
            # holds; the per-step bound already counts on the tokens speculation yields.
            return bound, max(bound, self._window_bound(decodes, now, bound))
        return bound, self._window_bound(decodes, now, bound)

    def _window_bound(self, decodes: Sequence[LiveRequest], now: float, tpot_bound: float) -> float:
        """The step bound from the decodes' attainment windows instead of one TPOT per step.

        Attainment judges the mean gap over windows of 10 tokens, so tokens that came faster than
        the TPOT leave slack that one longer step may spend (a prompt's chunk runs whole, and its
        first token comes sooner), as long as the tokens after it come faster again: the bound
        assumes each later gap takes ``window_reserve`` of the TPOT, or the decodes' own step
        time if that is longer, and the planner holds later steps to it because their bound is
        computed the same way. In steady state with every gap within the TPOT the bound is at
        least one TPOT, so this never plans a tighter step than the per-step rule unless a
        window is behind.
        """
        count = len(decodes)
        # The decodes alone overrun: no plan keeps the windows. (Their step without context is a
        # lower bound, and a crowded engine stops there without a pass over the decodes.)
        if self.step_time.step_seconds(count, count) > tpot_bound:
            return tpot_bound
        context = sum(map(CONTEXT, decodes)) + count
        decode_only = self.step_time.step_seconds(count, count, context, context)
        if decode_only > tpot_bound:
            return tpot_bound
        bound, share = math.inf, self._share
        for r in decodes:
            tpot = r.state.tpot_seconds * share
            if math.isinf(tpot):
                continue
            window = r.state.window_bound(now, tpot, max(self.window_reserve * tpot, decode_only))
            if window < decode_only:
                # The steps since a slack-spending step have used up what the plan kept back. If
                # steps of decodes alone still keep the window at its very TPOT, hold the prompts
                # back for them: every decode shares the window's steps, so losing it loses them
                # all. A window that even those would break is lost: plan its TPOT instead.
                kept = r.state.window_bound(now, r.state.tpot_seconds, decode_only) >= decode_only
                window = decode_only if kept else tpot
            bound = min(bound, window)
        return bound

    def _seconds_per_step(self, tpot_seconds: float) -> float:
        """How long a step may take for a decode of this tier: its TPOT times the tokens a step yields it."""
        if self.speculation is None or math.isinf(tpot_seconds):
            return tpot_seconds
        return tpot_seconds * self.speculation.window_tokens_per_step(tpot_seconds)

    def _verified(self, tpot_seconds: float) -> int:
        """Tokens a decode of this tier computes per step: one, or its speculation length."""
        return 1 if self.speculation is None else self.speculation.length(tpot_seconds)
