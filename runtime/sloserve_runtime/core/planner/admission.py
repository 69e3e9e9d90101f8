"""Soft admission: a request is admitted only if every admitted request stays feasible; promotion
of best-effort requests that fit later (in deadline order, or by SLOs-Serve's dynamic programme);
and the admitted decodes given up when they no longer fit their TPOT.

A mixin of ``Planner``. A feasibility query (``admit``, ``first_token_time``) changes no state:
with speculation it plans the lengths for the decodes there would be, and puts the step's back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import accumulate
from typing import NamedTuple

from sloserve_runtime.core.planner.forecast import DecodeLoad, Forecast
from sloserve_runtime.core.planner.views import (
    ADMITTED,
    CONTEXT,
    TO_COMPUTE,
    Decision,
    LiveRequest,
    admitted_decodes_of,
    prefill_order,
    prefills_of,
)


class _Decoders(NamedTuple):
    """What admission's decode check needs of a set of requests that decode (or will)."""

    tiers: frozenset[float]  # their TPOTs (seconds)
    count: int
    context: int  # their KV once each has its prompt

    @classmethod
    def of(cls, requests: Sequence[LiveRequest]) -> _Decoders:
        context = sum(map(CONTEXT, requests)) + sum(map(TO_COMPUTE, requests))
        return cls(frozenset({r.state.tpot_seconds for r in requests}), len(requests), context)

    def plus(self, r: LiveRequest) -> _Decoders:
        return _Decoders(self.tiers | {r.state.tpot_seconds}, self.count + 1, self.context + r.context + r.to_compute)

    def reserving(self, tiers: frozenset[float], count: int, context: int) -> _Decoders:
        """With the decodes that admitted program runs between stages will bring back."""
        if not count:
            return self
        return _Decoders(self.tiers | tiers, self.count + count, self.context + context)

    def growing(self, r: LiveRequest, future: tuple[float, int] | None) -> _Decoders:
        """With ``r`` holding its place through its program's later stages (``future``: their
        tightest TPOT and most context), where it is a program's first stage."""
        if future is None:
            return self
        tpot, context = future
        return _Decoders(self.tiers | {tpot}, self.count, self.context + max(0, context - r.context - r.to_compute))


class _Path(NamedTuple):
    """One way through the promotion DP: the requests taken, and where the forward simulation stands."""

    end: float  # when the last prefill so far brings its first token
    load: DecodeLoad  # the decodes every later step carries
    taken: tuple[LiveRequest, ...]  # the pending requests promoted on this path
    decoders: _Decoders  # the admitted requests and those taken, for the decode check


def _keep(paths: dict[tuple[int, ...], _Path], key: tuple[int, ...], path: _Path) -> None:
    """Of two paths to the same tier counts, the one whose prefills end earlier dominates."""
    if key not in paths or path.end < paths[key].end:
        paths[key] = path


class Admission(Forecast):
    """Who may be promised their SLO, at arrival and later."""

    def admit(
        self,
        now: float,
        new: LiveRequest,
        live: Sequence[LiveRequest],
        future: tuple[float, int] | None = None,
        reserved: tuple[frozenset[float], int, int] | None = None,
    ) -> Decision:
        """Whether ``new`` can join the admitted requests in ``live`` without breaking any promise.

        ``future``: where ``new`` is a program's first stage, the tightest TPOT and most context of
        the stages its run is expected to call after it, in the place it takes now. ``reserved``:
        the decodes (tiers, count, context) that admitted program runs between stages will bring
        back, counted in the decode check beside those in the engine.
        """
        admitted = [r for r in live if not r.state.best_effort and r.state is not new.state]
        decoders = _Decoders.of(admitted)
        if reserved is not None:
            decoders = decoders.reserving(*reserved)
        return self._check(now, new, admitted, decoders, future=future)

    def _check(
        self,
        now: float,
        new: LiveRequest,
        admitted: list[LiveRequest],
        decoders: _Decoders | None = None,
        future: tuple[float, int] | None = None,
    ) -> Decision:
        """The forward-EDF check: ``new``'s decode fits beside the admitted ones and every first token is on time.

        ``decoders``: the admitted requests' ``_Decoders``, if the caller keeps them as running
        totals; ``future``: as ``admit``.
        """
        with_new = (_Decoders.of(admitted) if decoders is None else decoders).plus(new).growing(new, future)
        if self.speculation is None:
            return self._feasible(now, new, admitted, with_new)
        with self.speculation.planning(with_new.count, with_new.context):  # the decodes there will be once it runs
            return self._feasible(now, new, admitted, with_new)

    def _feasible(self, now: float, new: LiveRequest, admitted: list[LiveRequest], with_new: _Decoders) -> Decision:
        """The decodes with ``new`` (``with_new``) fit the engine, then every first token is on time."""
        decision = self._fits_engine(with_new)
        return self._prefills_fit(now, new, admitted) if decision.admitted else decision

    def _decode_fits(self, new: LiveRequest, admitted: list[LiveRequest]) -> Decision:
        """The decodes of every admitted request (and the new one) fit a step within the tightest TPOT."""
        return self._decoders_fit(_Decoders.of(admitted).plus(new))

    def _fits_engine(self, decoders: _Decoders) -> Decision:
        """These admitted requests all have a place in the engine at once, and their decodes fit."""
        if self.max_running is not None and decoders.count > self.max_running:
            return Decision(
                False,
                f"running requests: {decoders.count} admitted requests, over the engine's "
                f"{self.max_running} at once (max_num_seqs)",
            )
        return self._decoders_fit(decoders)

    def _decoders_fit(self, decoders: _Decoders) -> Decision:
        """These decoders' decodes fit one step within the tightest TPOT among them."""
        # Every admitted request decodes (or will, once its prefill is done) and costs step time;
        # the TPOTs among them bound that time.
        tiers, count, context = decoders
        if all(math.isinf(tpot) for tpot in tiers):
            return ADMITTED
        # A decode that runs long meets its TPOT only if every window of ten steps does: they are
        # held to the margin by which ten steps in a row have lately run slower than the model.
        # With speculation, any length that keeps every tier will do: the per-step choice then
        # picks the shortest that still does.
        spec, share = self.speculation, self._share
        for length in range(1, 1 + (spec.max_length if spec is not None else 1)):
            bound = share * min(
                tpot if spec is None or math.isinf(tpot) else tpot * spec.window_tokens_per_step(tpot, length)
                for tpot in tiers
            )
            if spec is None:  # one query each: their attention work is their context
                seconds = self.step_time.step_seconds(count, count, context, context)
            else:
                seconds = spec.uniform_step(length, count, context)
            if seconds <= bound:
                return ADMITTED
        return Decision(
            False,
            f"decode capacity: {count} decodes would take {seconds * 1000:.1f} ms a step, "
            f"over the tightest TPOT budget of {bound * 1000:.1f} ms",
        )

    def _prefills_fit(self, now: float, new: LiveRequest, admitted: list[LiveRequest]) -> Decision:
        """Simulate the prefill queue in deadline order: every first token must come on time.

        Each predicted wait is stretched by ``window_margin``, as each step is planned that much
        short: a prefill spans a few steps, and a few steps in a row run that much slower than the
        model as often as ten do (on the CPU engine under load, when the API server's work takes
        the engine's cores). Without calibration the margin is 0 and the prediction stands.
        """
        waiting = prefills_of(admitted)
        with_new = self._stretched(now, self._first_tokens(now, [*waiting, new], admitted))
        late = [r for r in (*waiting, new) if with_new[r.state.request_id] > r.state.first_token_deadline]
        if not late:
            return ADMITTED
        mine = with_new[new.state.request_id]
        if late[-1] is new:
            ahead = sum(1 for r in waiting if with_new[r.state.request_id] < mine)
            target = (new.state.first_token_deadline - new.state.arrival) * 1000
            return Decision(
                False,
                f"TTFT: first token predicted at {(mine - new.state.arrival) * 1000:.0f} ms, "
                f"target {target:.0f} ms ({ahead} requests with earlier deadlines ahead)",
            )
        without_new = self._stretched(now, self._first_tokens(now, waiting, admitted))
        broken = [r for r in late if without_new[r.state.request_id] <= r.state.first_token_deadline]
        if broken:
            return Decision(False, f"TTFT: would make admitted request {broken[0].state.request_id} late")
        return ADMITTED  # those already late are late with or without it

    def _stretched(self, now: float, times: dict[str, float]) -> dict[str, float]:
        """Predicted first-token times with the wait from ``now`` stretched by ``window_margin``."""
        if not self.window_margin:
            return times
        stretch = 1.0 + self.window_margin
        return {request_id: now + (at - now) * stretch for request_id, at in times.items()}

    def overrun(self, running: Sequence[LiveRequest]) -> tuple[list[LiveRequest], Decision]:
        """The admitted decodes to give up so that the others' decodes fit a step within their TPOT,
        and the decode check that failed (``ADMITTED``, and none to give up, when they all fit).

        Admission keeps the decodes within the bound when it lets a request in, but the bound can
        move under them: each decode's context grows by a token a step (on the CPU engine a long
        reasoning call's decode costs several times what it did at its start), and online
        calibration can find the engine slower than the profile. Once the decodes alone
        overrun the tightest TPOT, every window of every admitted decode breaks together; giving
        up some of them keeps the others' promises. The tightest tier goes first: it is the one
        the engine cannot keep beside the others, and a looser tier that fits once it is gone
        must not pay for it (a loose decode given up sits out whole steps, where a tight one it
        made room for would have run on). Within a tier, those with the most context go first:
        each costs the most step time, so the fewest are lost. A later stage of an admitted
        program run goes last of all: giving it up loses the work its run has already had.
        """
        decodes = admitted_decodes_of(running)
        if not decodes:
            return [], ADMITTED
        decoders = _Decoders.of(decodes)
        overrun = self._decoders_fit(decoders)
        if overrun.admitted:
            return [], overrun
        # The most decodes that still fit, by bisection on running totals (fewer decodes, less
        # context and no tighter tier always fit better): a crowded engine may give up many.
        # The loosest tier first, the least context first within it: the last are the first to go.
        kept = sorted(decodes, key=lambda r: (not r.state.continues_run, -r.state.tpot_seconds, r.context))
        totals = list(accumulate((r.context + r.to_compute for r in kept), initial=0))
        first: dict[float, int] = {}  # each tier's first place in ``kept``: present while kept beyond it
        for index, r in enumerate(kept):
            first.setdefault(r.state.tpot_seconds, index)

        def fits(count: int) -> bool:
            tiers = frozenset(tpot for tpot, index in first.items() if index < count)
            return self._decoders_fit(_Decoders(tiers, count, totals[count])).admitted

        fit, over = 0, len(kept)  # none fit trivially; all overrun
        while over - fit > 1:
            middle = (fit + over) // 2
            fit, over = (middle, over) if fits(middle) else (fit, middle)
        return kept[fit:][::-1], overrun

    def promote(
        self,
        now: float,
        candidates: Sequence[LiveRequest],
        live: Sequence[LiveRequest],
    ) -> list[LiveRequest]:
        """The best-effort ``candidates`` (no output yet, in first-token-deadline order) that can be promised now.

        Admission decides at arrival; a request refused then may fit later, when decodes finish or
        the prefill queue drains before its first-token deadline. Each step the planner weighs
        the ``promotion_candidates`` earliest still-open deadlines against the admitted requests
        in ``live``, with the same forward simulation as admission:

        * "edf" takes them one by one in deadline order, each if it fits beside those taken;
        * "dp" runs SLOs-Serve's dynamic programme over them (``_most_that_fit``): the largest
          set whose decodes fit and whose prefills, in deadline order among the admitted ones,
          all come on time, so that one long prompt does not shut out several short ones.
        """
        if self.promotion == "none":
            return []
        pending = [r for r in candidates if r.state.first_token_deadline > now][: self.promotion_candidates]
        if not pending:
            return []
        admitted = [r for r in live if not r.state.best_effort]
        decoders = _Decoders.of(admitted)
        if self.promotion == "dp":
            chosen = self._most_that_fit(now, pending, admitted, decoders)
        else:
            chosen = []
            for request in pending:
                # The decode check first, on running totals: a crowded engine refuses there cheaply.
                if (
                    self._fits_engine(decoders.plus(request)).admitted
                    and self._check(now, request, [*admitted, *chosen], decoders).admitted
                ):
                    chosen.append(request)
                    decoders = decoders.plus(request)
        if chosen and self.speculation is not None:
            together = (*admitted, *chosen)
            self.speculation.plan(len(together), sum(r.context + r.to_compute for r in together))
        return chosen

    def _most_that_fit(
        self, now: float, pending: list[LiveRequest], admitted: list[LiveRequest], decoders: _Decoders
    ) -> list[LiveRequest]:
        """SLOs-Serve's admission DP: the largest subset of ``pending`` that keeps every promise.

        Prefills are taken in the forward simulation's order (those under way, then by deadline),
        the admitted ones always, each pending one or not. A state is the count of taken requests
        per TPOT tier (which, with the admitted decodes, sets the per-step prefill budget); of the
        paths reaching a state the one whose prefills end earliest dominates. A path dies when a
        taken request would miss its first-token deadline, its decodes would not fit beside the
        others, or an admitted prefill on time without it would be late. The largest surviving
        state wins (the earliest end on ties); with one pending request it asks what admission asks.
        """
        # Those whose decode does not fit even alone beside the admitted ones are out at once.
        pending = [r for r in pending if self._fits_engine(decoders.plus(r)).admitted]
        if not pending:
            return []
        waiting = prefills_of(admitted)
        tiers = sorted({r.state.tpot_seconds for r in pending})
        clock, load = self._forward_start(now, admitted, len(waiting) + len(pending), step_under_way=False)
        on_time = {}  # the admitted prefills' first tokens with nothing promoted
        end, after = clock, load
        for request in sorted(waiting, key=prefill_order):
            end, after = self._prefill(end, after, request)
            on_time[request.state.request_id] = end
        states = {(0,) * len(tiers): _Path(clock, load, (), decoders)}
        mine = {id(r) for r in pending}
        for request in sorted([*waiting, *pending], key=prefill_order):
            deadline = request.state.first_token_deadline
            following: dict[tuple[int, ...], _Path] = {}
            for key, path in states.items():
                end, after = self._prefill(path.end, path.load, request)
                if id(request) not in mine:  # admitted: always served
                    if end <= deadline or on_time[request.state.request_id] > deadline:
                        _keep(following, key, path._replace(end=end, load=after))
                    continue
                _keep(following, key, path)  # left best effort
                with_it = path.decoders.plus(request)
                if end <= deadline and self._fits_engine(with_it).admitted:
                    counts = list(key)
                    counts[tiers.index(request.state.tpot_seconds)] += 1
                    _keep(following, tuple(counts), _Path(end, after, (*path.taken, request), with_it))
            states = following
        if not states:
            return []
        return list(min(states.values(), key=lambda path: (-len(path.taken), path.end)).taken)
