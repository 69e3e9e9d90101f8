"""The forward simulation: when the prefills in the queue bring their first tokens, step by step,
beside the decodes every step carries. Admission, promotion, the yield check and the router ask it.

A mixin of ``Planner`` (its settings, and the bounds of ``StepBounds``). It changes no state.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

from sloserve_runtime.core.planner.bounds import StepBounds
from sloserve_runtime.core.planner.views import (
    CONTEXT,
    LiveRequest,
    admitted_decodes_of,
    decodes_of,
    prefill_order,
    prefills_of,
)
from sloserve_runtime.core.step_time import attended_pairs


class DecodeLoad(NamedTuple):
    """The decodes a forward simulation of the prefill queue carries in every step."""

    bound: float  # seconds a step may take: the tightest TPOT x tokens per step (inf: none)
    requests: int  # decoding requests with a TPOT target
    tokens: int  # tokens they compute per step (more than one each with speculation)
    context: int  # their KV context, which their queries attend to
    # Decodes without a TPOT target: they sit out the steps an admitted prefill waits for, all
    # but one in ``max_yields + 1`` (``Planner._yields``).
    free: int = 0
    free_context: int = 0


class Forecast(StepBounds):
    """First-token times of pending prefills, predicted with the step-time model."""

    def _first_tokens(
        self,
        now: float,
        pending: list[LiveRequest],
        admitted: list[LiveRequest],
        step_under_way: bool = False,
        yielding: bool = True,
    ) -> dict[str, float]:
        """Predicted first-token times (by request id) of ``pending`` prefills, one after another.

        Prefills already under way (some KV computed) go first whatever their deadlines, as vLLM
        serves running requests before waiting ones; the rest in deadline order. The running
        decodes with a TPOT target take their tokens first in every step (those without one run
        one step in ``max_yields + 1``, as ``held_back`` lets them); each prefill, once done,
        decodes too and narrows the prefill budget of the ones after it (finishing decodes are
        not counted: the prediction errs late).

        ``step_under_way``: the engine is mid-step, and the step is counted whole (a router
        placing a request). Admission and promotion run between steps, where vLLM's engine core
        adds requests and schedules: the next step is the first the prefill can join.
        ``yielding``: False, the decodes without a TPOT target run in every step too.
        """
        clock, load = self._forward_start(now, admitted, len(pending), step_under_way)
        first_bound = self._slack_bound(now, admitted, load)
        times = {}
        solo_first = yielding and self.solo_prompts  # the prompts so far each had a step of their own
        solo_decodes: list[LiveRequest] | None = None  # the admitted decodes, once a prompt asks
        solo_deadline: float | None = None  # their ``_solo_deadline``
        for request in sorted(pending, key=prefill_order):
            if math.isinf(clock):  # no budget left for prefill: every later first token is as late
                times[request.state.request_id] = clock
                continue
            if not yielding and load.free:  # they take their tokens in every step, as paced decodes do
                load = DecodeLoad(
                    load.bound, load.requests + load.free, load.tokens + load.free,
                    load.context + load.free_context,
                )  # fmt: skip
            end, after = self._prefill(clock, load, request, first_bound)
            if solo_first and self._late(clock, end, request):
                # A step of its own, as ``Budget.held_back`` gives a prompt that would be late
                # beside the decodes, while their windows can spare it.
                if solo_decodes is None:
                    solo_decodes = admitted_decodes_of(admitted)
                    solo_deadline = self._solo_deadline(clock, solo_decodes, request)
                solo = self._solo_step(clock, request, solo_decodes, solo_deadline)
                if solo is not None and clock + solo < end:
                    end, after = (
                        clock + solo,
                        self._with_decode(load, request.state.tpot_seconds, request.context + request.to_compute),
                    )
                else:
                    solo_first = False
            else:
                solo_first = False  # once a prompt runs beside the decodes, those after it do too
            clock, load = end, after
            first_bound = None
            times[request.state.request_id] = clock
        return times

    def _solo_step(
        self, now: float, prompt: LiveRequest, decodes: Sequence[LiveRequest], deadline: float | None
    ) -> float | None:
        """The seconds of a step of what is left of ``prompt``'s prefill alone, starting at ``now``,
        while the admitted ``decodes`` all sit it out; None where it does not fit one step before
        their own next step must start (``deadline``: their ``_solo_deadline``), counted with
        ``prompt``'s first decode in it.
        """
        if deadline is None or prompt.to_compute > self.max_budget:
            return None
        seconds = self._alone_seconds(prompt)
        return seconds if seconds <= self._solo_room(now, prompt, decodes, deadline) else None

    def _alone_seconds(self, prompt: LiveRequest) -> float:
        """A step of what is left of ``prompt``'s prefill, and nothing else."""
        tokens, context = prompt.to_compute, prompt.context + prompt.to_compute
        return self.step_time.step_seconds(tokens, 1, context, attended_pairs(tokens, context))

    def _solo_room(self, now: float, prompt: LiveRequest, decodes: Sequence[LiveRequest], deadline: float) -> float:
        """Seconds a step of prompts alone may take from ``now``: until ``deadline``, less the
        ``decodes``' own next step, ``prompt``'s first decode in it."""
        count = len(decodes) + 1
        context = sum(map(CONTEXT, decodes)) + prompt.context + prompt.to_compute + count
        return deadline - now - self.step_time.step_seconds(count, count, context, context)

    def _late(self, now: float, at: float, prompt: LiveRequest) -> bool:
        """Whether ``prompt``'s first token, predicted at ``at``, misses its deadline once the wait
        from ``now`` is ``yield_margin`` longer (the margin the yields of ``Budget`` plan with)."""
        return now + (at - now) * (1.0 + (self.yield_margin or 0.0)) > prompt.state.first_token_deadline

    def _solo_deadline(self, now: float, decodes: Sequence[LiveRequest], prompt: LiveRequest) -> float | None:
        """By when the next token of every one of these admitted ``decodes`` must come for the
        tightest of their attainment windows, each later gap planned as in ``_window_bound`` (as
        long as a step of them all with ``prompt``'s first decode): a step of prompts alone may run
        until their own next step has to start. One pass over the decodes, whatever the prompts
        asking (a time, not a length, so it holds for each). None: off (``solo_prompts``), no decode
        with a TPOT target among them (nothing to gain over ``_yields``), or speculation on.
        """
        if not self.solo_prompts or self.window_reserve is None or self.speculation is not None:
            return None
        paced = [r for r in decodes if not math.isinf(r.state.tpot_seconds)]
        if not paced:
            return None
        count = len(decodes) + 1
        share = self._share
        tightest = min(r.state.tpot_seconds for r in paced) * share
        # Where the decodes' own steps already take a TPOT, their windows have no slack to spare
        # (a crowded engine stops here, without a pass over them).
        if self.step_time.step_seconds(count, count) >= tightest:
            return None
        context = sum(map(CONTEXT, decodes)) + prompt.context + prompt.to_compute + count
        decode_only = self.step_time.step_seconds(count, count, context, context)
        if decode_only >= tightest:
            return None
        latest = math.inf
        for r in paced:
            tpot = r.state.tpot_seconds * share
            latest = min(latest, r.state.window_bound(now, tpot, max(self.window_reserve * tpot, decode_only)))
        return now + latest

    def _slack_bound(self, now: float, admitted: list[LiveRequest], load: DecodeLoad) -> float | None:
        """The bound of the next prefill step, where the decodes' window slack lets it run longer
        than one TPOT (``_window_bound``), as ``token_budget`` will let it; None: no slack.

        Only that one step is planned longer: the steps after it are held to a TPOT each, which
        errs late while the windows recover. ``load``: the admitted decodes' load, whose bound
        is the per-step one.
        """
        if self.window_reserve is None or not load.requests:
            return None
        per_step = load.bound * self._share
        # The decodes alone overrun (a crowded engine): no slack, and no pass over them to find it.
        if self.step_time.step_seconds(load.requests, load.requests) > per_step:
            return None
        window = self._window_bound(admitted_decodes_of(admitted), now, per_step)
        return window if per_step < window < math.inf else None

    def _forward_start(
        self, now: float, admitted: list[LiveRequest], pending: int, step_under_way: bool
    ) -> tuple[float, DecodeLoad]:
        """When the first of ``pending`` prefills can start, and the decodes every step carries until then."""
        load = self._decode_load(decodes_of(admitted))
        clock = now
        if not step_under_way:
            return clock, load
        if load.requests:
            # A step is under way, and the budget lets it fill the bound: best-effort work and
            # prefill chunks take what the decodes leave.
            clock += self._prefill_rate(load)[0]
        elif pending > 1:  # a step of admitted prefill is under way
            _, per_step = self._prefill_rate(load)
            queued = sum(r.to_compute for r in admitted if not r.decoding)
            clock += self._step_seconds(load, min(per_step, queued))
        elif load.free:  # a step of the decodes without a TPOT target is under way
            clock += self._free_step_seconds(load)
        return clock, load

    def _prefill(
        self, clock: float, load: DecodeLoad, request: LiveRequest, first_bound: float | None = None
    ) -> tuple[float, DecodeLoad]:
        """``request``'s prefill from ``clock`` beside the decodes of ``load``: its first token's time, then load.

        ``first_bound``: its first step may take this long (window slack), not just one TPOT.
        """
        if first_bound is not None and request.to_compute > 0:
            seconds, chunk = self._prefill_rate(load, request.context, first_bound)
            if chunk >= request.to_compute:  # the whole prefill in that one step
                clock += self._step_seconds(load, request.to_compute, request.context)
                return clock, self._with_decode(load, request.state.tpot_seconds, request.context + request.to_compute)
            if chunk > 0:
                clock += seconds
                request = request._replace(to_compute=request.to_compute - chunk, context=request.context + chunk)
        if self.step_time.context_aware:
            clock, steps = self._chunked(clock, load, request)
        else:  # every chunk costs the same: count whole steps
            seconds, per_step = self._prefill_rate(load)
            if per_step <= 0:
                clock, steps = math.inf, 0
            else:
                full_steps, rest = divmod(request.to_compute, per_step)
                clock += full_steps * seconds + (self._step_seconds(load, rest) if rest else 0.0)
                steps = full_steps + (rest > 0)
        if load.free and math.isfinite(clock):  # the decodes without a TPOT target run one step after every max_yields
            clock += steps // (self.max_yields + 1) * self._free_step_seconds(load)
        return clock, self._with_decode(load, request.state.tpot_seconds, request.context + request.to_compute)

    def _chunked(self, clock: float, load: DecodeLoad, request: LiveRequest) -> tuple[float, int]:
        """The prefill chunk by chunk, each as long as the bound lets it be after those before it: (end, steps)."""
        prefix, left, steps = request.context, request.to_compute, 0
        while left > 0:
            chunk = self._prefill_tokens(load, prefix)
            if chunk <= 0:
                return math.inf, steps
            chunk = min(chunk, left)
            clock += self._step_seconds(load, chunk, prefix)
            prefix, left, steps = prefix + chunk, left - chunk, steps + 1
        return clock, steps

    def _decode_load(self, decodes: list[LiveRequest]) -> DecodeLoad:
        """The load of these decodes: ``_with_decode`` of each, in one pass (the hot path of admission)."""
        # Counted per tier (a few TPOTs among many decodes), with the per-request work in
        # comprehensions, C-level maps and ``Counter``: admission runs this over every decode in the engine.
        tpots = [r.state.tpot_seconds for r in decodes]
        context = sum(map(CONTEXT, decodes)) + len(decodes)
        bound, requests, tokens, free, free_context = math.inf, 0, 0, 0, 0
        for tpot, count in Counter(tpots).items():
            if math.isinf(tpot):
                free = count
                free_context = sum([r.context for r, t in zip(decodes, tpots, strict=True) if t == tpot]) + count
                continue
            bound, requests = min(bound, self._seconds_per_step(tpot)), requests + count
            tokens += count * self._verified(tpot)
        return DecodeLoad(bound, requests, tokens, context - free_context, free, free_context)

    def _with_decode(self, load: DecodeLoad, tpot_seconds: float, context: int) -> DecodeLoad:
        """``load`` with one more decode of this tier over ``context`` KV tokens."""
        # Built positionally: the forward simulation makes one per request, and ``_replace`` is slow.
        if math.isinf(tpot_seconds):
            bound, requests, tokens, paced = load.bound, load.requests, load.tokens, load.context
            return DecodeLoad(bound, requests, tokens, paced, load.free + 1, load.free_context + context)
        return DecodeLoad(
            min(load.bound, self._seconds_per_step(tpot_seconds)),
            load.requests + 1,
            load.tokens + self._verified(tpot_seconds),
            load.context + context,
            load.free,
            load.free_context,
        )

    def _free_step_seconds(self, load: DecodeLoad) -> float:
        """A step of every decode of ``load``, those without a TPOT target included."""
        tokens, requests, context = load.tokens + load.free, load.requests + load.free, load.context + load.free_context
        return self.step_time.step_seconds(tokens, requests, context, context)

    def _step_seconds(self, load: DecodeLoad, prefill: int, prefix: int = 0) -> float:
        """A step of the decodes of ``load`` and one chunk of ``prefill`` tokens after ``prefix`` computed ones."""
        tokens, requests = load.tokens + prefill, load.requests + (prefill > 0)
        context = load.context + (prefix + prefill if prefill else 0)
        attended = load.context + attended_pairs(prefill, prefix + prefill)
        return self.step_time.step_seconds(tokens, requests, context, attended)

    def _prefill_rate(self, load: DecodeLoad, prefix: int = 0, bound: float | None = None) -> tuple[float, int]:
        """Seconds per full step, and prefill tokens per step, while the decodes of ``load`` run beside
        chunks that follow ``prefix`` computed tokens of their prompt. ``bound``: the step's bound
        (headroom included), if not one TPOT of ``load``.
        """
        prefill = self._prefill_tokens(load, prefix, bound)
        return self._step_seconds(load, prefill, prefix), prefill

    def _prefill_tokens(self, load: DecodeLoad, prefix: int = 0, bound: float | None = None) -> int:
        """The prefill tokens of a full step of ``_prefill_rate``."""
        if math.isinf(load.bound):
            return max(self.max_budget - load.tokens, 0)
        requests, bound = load.requests + 1, load.bound * self._share if bound is None else bound
        chunk = self.step_time.chunk_budget(bound, load.tokens, requests, load.context, load.context, prefix)
        return max(min(load.tokens + chunk, self.max_budget) - load.tokens, 0)

    def first_token_time(self, now: float, new: LiveRequest, live: Sequence[LiveRequest]) -> float:
        """When ``new``'s first token is predicted if it joined the admitted requests in ``live`` now.

        The forward simulation admission runs (prefills under way first, then deadline order),
        after the step the replica is in the middle of. A router compares it with the deadline to
        find the replica with the most slack.
        """
        admitted = [r for r in live if not r.state.best_effort and r.state is not new.state]
        waiting = prefills_of(admitted)
        return self._first_tokens(now, [*waiting, new], admitted, step_under_way=True)[new.state.request_id]
