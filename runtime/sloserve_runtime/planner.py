"""The SLO planner: a per-step token budget and soft admission. Imports no vLLM.

Both the vLLM adapter (``scheduler.py``) and the simulator call it, through the ``sloserve``
policy, on ``LiveRequest`` views of their own request objects.

* **Budget.** The tightest TPOT among the admitted requests that decode bounds the step time;
  the step-time model turns that bound into the most tokens a step may schedule. Decodes come
  first (the policy's running order), prefill chunks get what is left, earliest first-token
  deadline first. With window slack on (the ``sloserve`` policy), a step that runs an admitted
  prompt may spend what fast tokens left in the decodes' 10-token attainment windows.
* **Admission.** A new request is admitted only if every admitted request stays feasible: the
  decodes it adds must still fit a step within the tightest TPOT, and a forward simulation of
  the prefill queue in deadline order, at the budget those decodes leave, must still bring every
  admitted request's first token before its deadline. Otherwise it goes to the best-effort
  class: served after every admitted request from leftover budget, and preempted first.
* **Speculation.** With speculative decoding on, a decode of each tier verifies its tier's length
  of tokens per step (``TierSpeculation``) and yields more than one token per step on average, so
  the step may take that many TPOTs: the bound is the tightest ``TPOT x tokens per step``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from operator import itemgetter
from typing import NamedTuple

from sloserve_runtime.slo_state import SLORequestState
from sloserve_runtime.speculation import TierSpeculation
from sloserve_runtime.step_time import StepTimeModel, attended_pairs


class LiveRequest(NamedTuple):
    """What the planner needs of one request in the engine (admitted or not yet scheduled)."""

    state: SLORequestState
    to_compute: int  # tokens to compute before its next output token (1 while decoding)
    context: int  # tokens whose KV exists

    @property
    def decoding(self) -> bool:
        return self.to_compute <= 1 and self.context > 0

    @classmethod
    def of(cls, state: SLORequestState, num_tokens: int, computed_tokens: int) -> LiveRequest:
        """A request with ``num_tokens`` to have computed, ``computed_tokens`` of them done; one that
        has not started is planned from the prefix the engine's cache is expected to hold for it."""
        computed = computed_tokens or state.cached_tokens
        return cls(state, num_tokens - computed, computed)


# Sums over every live request read their fields through these: a C-level ``map`` takes about half
# the time of a comprehension. (Not ``attrgetter("state.tpot_seconds")``: that is slower than one.)
_TO_COMPUTE = itemgetter(1)  # LiveRequest.to_compute
_CONTEXT = itemgetter(2)  # LiveRequest.context


class _DecodeLoad(NamedTuple):
    """The decodes a forward simulation of the prefill queue carries in every step."""

    bound: float  # seconds a step may take: the tightest TPOT x tokens per step (inf: none)
    requests: int  # decoding requests with a TPOT target
    tokens: int  # tokens they compute per step (more than one each with speculation)
    context: int  # their KV context, which their queries attend to
    # Decodes without a TPOT target: they sit out the steps an admitted prefill waits for, all
    # but one in ``max_yields + 1`` (``Planner._yields``).
    free: int = 0
    free_context: int = 0


class _Running(NamedTuple):
    """The running requests of one step, sorted in one pass: ``held_back`` makes it, ``token_budget`` uses it."""

    of: Sequence[LiveRequest]  # the list sorted (both engines hand the same one to both calls)
    decodes: list[LiveRequest]  # the admitted decodes
    best_effort: list[LiveRequest]
    tiers: set[float]  # the admitted decodes' TPOTs (seconds)

    @classmethod
    def of_step(cls, running: Sequence[LiveRequest]) -> _Running:
        decodes = _admitted_decodes(running)
        return cls(running, decodes, _best_effort(running), {r.state.tpot_seconds for r in decodes})


class _Decoders(NamedTuple):
    """What admission's decode check needs of a set of requests that decode (or will)."""

    tiers: frozenset[float]  # their TPOTs (seconds)
    count: int
    context: int  # their KV once each has its prompt

    @classmethod
    def of(cls, requests: Sequence[LiveRequest]) -> _Decoders:
        context = sum(map(_CONTEXT, requests)) + sum(map(_TO_COMPUTE, requests))
        return cls(frozenset({r.state.tpot_seconds for r in requests}), len(requests), context)

    def plus(self, r: LiveRequest) -> _Decoders:
        return _Decoders(self.tiers | {r.state.tpot_seconds}, self.count + 1, self.context + r.context + r.to_compute)


class _Path(NamedTuple):
    """One way through the promotion DP: the requests taken, and where the forward simulation stands."""

    end: float  # when the last prefill so far brings its first token
    load: _DecodeLoad  # the decodes every later step carries
    taken: tuple[LiveRequest, ...]  # the pending requests promoted on this path
    decoders: _Decoders  # the admitted requests and those taken, for the decode check


def _keep(paths: dict[tuple[int, ...], _Path], key: tuple[int, ...], path: _Path) -> None:
    """Of two paths to the same tier counts, the one whose prefills end earlier dominates."""
    if key not in paths or path.end < paths[key].end:
        paths[key] = path


@dataclass(frozen=True)
class Decision:
    """An admission decision and why, as responses and metrics report it."""

    admitted: bool
    reason: str


ADMITTED = Decision(True, "admitted")


# ``LiveRequest.decoding`` spelled out in these: a property call per request is most of the
# time of a pass over every request in the engine, and the planner makes several per call.


def _decodes(live: Sequence[LiveRequest]) -> list[LiveRequest]:
    return [r for r in live if r.to_compute <= 1 and r.context > 0]


def _prefills(live: Sequence[LiveRequest]) -> list[LiveRequest]:
    """The requests still computing their prompt (not ``decoding``)."""
    return [r for r in live if r.to_compute > 1 or r.context <= 0]


def _admitted_decodes(live: Sequence[LiveRequest]) -> list[LiveRequest]:
    return [r for r in live if r.to_compute <= 1 and r.context > 0 and not r.state.best_effort]


def _best_effort(live: Sequence[LiveRequest]) -> list[LiveRequest]:
    return [r for r in live if r.state.best_effort]


def _prefill_order(r: LiveRequest) -> tuple[bool, float, float]:
    """The forward simulation's prefill order: those under way first (vLLM serves running requests
    before waiting ones), then by first-token deadline."""
    return (r.context == 0, r.state.first_token_deadline, r.state.arrival)


@dataclass
class Planner:
    """Budget and admission for one engine, from its step-time model."""

    step_time: StepTimeModel
    max_budget: int  # the engine's own per-step token limit
    # Speculation lengths per tier; None (or a max length of 1): every decode verifies one token.
    speculation: TierSpeculation | None = None
    # Plan steps this much shorter than the tightest TPOT. Only a hair: attainment is judged on
    # windows of 10 tokens, over which an unbiased error of the step-time model averages out,
    # while every percent kept back costs decode slots and prefill budget (with a large
    # per-request term, 10 % is one decode in five at a 50 ms TPOT). A step planned at exactly
    # the bound would break it on clock rounding alone.
    headroom: float = 0.99
    # Window slack (``_window_bound``): the share of the TPOT each later token is planned to take
    # after a step that spends its window's slack. None: every step is bounded by one TPOT.
    window_reserve: float | None = None
    # The share of each attainment window every step keeps back (``_share``: the per-step bound,
    # window slack, the decode check of admission and ``overrun``, the forward simulation): how
    # much slower than the model ten steps in a row have lately run (online calibration's
    # ``window_margin``; 0 without).
    window_margin: float = 0.0
    # Steps in a row a decode without a TPOT target may give up to waiting prefills (``_yields``).
    max_yields: int = 4
    # Such decodes give a step up only when the admitted prompts would otherwise be late
    # (``_yield_needed``): when their first tokens, predicted with those decodes in every step
    # and this much slower than the model, would miss a deadline. None: whenever an admitted
    # prompt waits. On the real engine a step after one they sat out runs about 7 % slower (vLLM's
    # model runner drops them from its persistent batch and adds them back), and every step they
    # sit out is output they do not produce.
    yield_margin: float | None = 1.0
    # The prompts that check weighs: the first this many in prefill order (the rest start later,
    # and the check runs again every step, so a yield they come to need is still there for them).
    yield_lookahead: int = 8
    # With no TPOT target among the admitted decodes, a step may take this share of the tightest
    # TTFT target among the admitted running requests (``_arrival_bound``): a prompt that arrives
    # during a step waits for it. None: such steps fill the whole token budget. Every step also
    # pays the engine's fixed time (40-60 ms on the CPU engine), so a shorter bound costs output
    # throughput: at 0.5 the simulated CPU engine served 1-8 % fewer tokens than stock vLLM on
    # chat-ttft near saturation, at 0.7 1-2.5 %, with P90 TTFT still within the target.
    arrival_share: float | None = 0.7
    # How best-effort requests that still wait for their first token are promised their SLO once
    # room returns (``promote``): "none", "edf" (the arrival check, in deadline order) or "dp"
    # (SLOs-Serve's dynamic programme: the most requests that fit together).
    promotion: str = "edf"
    # The earliest-deadline best-effort requests weighed for promotion each step.
    promotion_candidates: int = 8
    # The engine's cap on running requests (vLLM's ``max_num_seqs``; 128 on the CPU API server).
    # An admitted request that finds every place taken waits for one to finish, whatever the
    # budget, so admission keeps the admitted requests within it, and best-effort requests give
    # their places up to admitted ones (``make_room``). None: no cap.
    max_running: int | None = None
    # Whether an admitted request waits to start, as the engine said this step (``held_back``,
    # called before ``token_budget``) or as an admission since implies.
    _admitted_waiting: bool = field(default=False, repr=False)
    # What ``held_back`` said of each running request this step (True: it sits the step out).
    _held: list[bool] = field(default_factory=list, repr=False)
    # The running requests as ``held_back`` sorted them this step, for ``token_budget`` (once).
    _step: _Running | None = field(default=None, repr=False)

    # ---- per-step budget ----

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
        return self._bounds(_admitted_decodes(live), now)[1]

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
        context = sum(map(_CONTEXT, decodes)) + count
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

    def token_budget(
        self, running: Sequence[LiveRequest], waiting: bool = True, now: float | None = None, start_prefix: int = 0
    ) -> int:
        """Tokens the next step, starting at ``now``, may schedule, given the running requests
        (decodes and chunks); without ``now``, each decode's bound is one TPOT.

        ``waiting``: a request waits that could start this step and take what the running ones
        leave; ``start_prefix``: the prompt tokens the prefix cache holds for it, which its chunk
        attends to.
        """
        step, self._step = self._step, None
        if step is None or step.of is not running:
            step = _Running.of_step(running)
        decodes = step.decodes
        if self.speculation is not None:
            self.speculation.plan(len(decodes), sum(map(_CONTEXT, decodes)))
        per_step, bound = self._bounds(decodes, now, step.tiers)
        if math.isinf(bound):
            return self._arrival_budget(running, waiting, start_prefix)
        # The first admitted prefill chunk under way, if any (running requests sort in deadline order).
        chunk = next((r for r in _prefills(running) if not r.state.best_effort), None)
        if bound > per_step and chunk is None and not self._admitted_waiting:
            # Window slack goes to admitted prompts only: best effort that got a first token from it
            # could no longer be promoted, and would then decode only on leftover time.
            bound = per_step
        # Best effort joins only while no admitted prefill waits: a step planned for joiners that
        # then sit out would leave the waiting request a budget cut by their per-request time.
        joining = [] if self._admitted_waiting else self._best_effort_joining(running, bound, step.best_effort)
        # A decode attends to its whole context (``attended_pairs(1, n) == n``), once per verified
        # token: without speculation the attention work of the decodes equals their context.
        context = sum(map(_CONTEXT, decodes)) + sum(map(_CONTEXT, joining)) + len(decodes) + len(joining)
        if self.speculation is None:
            verified_tokens, attended = len(decodes), context
        else:
            verified = [self._verified(r.state.tpot_seconds) for r in decodes]
            verified_tokens = sum(verified)
            attended = context + sum((n - 1) * (r.context + 1) for r, n in zip(decodes, verified, strict=True))
        # Each request of the step costs its per-request time: the admitted decodes and chunks, the
        # best-effort requests that join, and, while a request waits to start, one more for it (it
        # takes what a finishing chunk leaves). Reserving that time when nobody waits would cost
        # the running chunk a per-request time of tokens every step.
        requests = len(running) - len(step.best_effort) + len(joining) + int(waiting)
        # What the decodes leave goes to a prefill chunk: the first running one (vLLM serves running
        # requests first), or else a prompt that starts. Its attention grows with its length and with
        # what its prompt has computed so far.
        fixed = verified_tokens + len(joining)
        prefix = chunk.context if chunk is not None else start_prefix if waiting else 0
        budget = fixed + self.step_time.chunk_budget(bound, fixed, requests, context, attended, prefix)
        # Admitted decodes always run: admission keeps them within the bound, and a step that
        # skipped one would break its TPOT for sure.
        return max(fixed, min(budget, self.max_budget), 1)

    def overrun(self, running: Sequence[LiveRequest]) -> tuple[list[LiveRequest], Decision]:
        """The admitted decodes to give up so that the others' decodes fit a step within their TPOT,
        and the decode check that failed (``ADMITTED``, and none to give up, when they all fit).

        Admission keeps the decodes within the bound when it lets a request in, but the bound can
        move under them: each decode's context grows by a token a step (on the CPU engine a
        reasoning call's thinking costs three times as much a step once it has 1,000 tokens), and
        online calibration can find the engine slower than the profile. Once the decodes alone
        overrun the tightest TPOT, every window of every admitted decode breaks together; giving
        up some of them keeps the others' promises. Those with the most context go first: each
        costs the most step time, so the fewest are lost.
        """
        decodes = _admitted_decodes(running)
        if not decodes:
            return [], ADMITTED
        decoders = _Decoders.of(decodes)
        overrun = self._decoders_fit(decoders)
        if overrun.admitted:
            return [], overrun
        # The most decodes that still fit, by bisection on running totals (fewer decodes, less
        # context and no tighter tier always fit better): a crowded engine may give up many.
        kept = sorted(decodes, key=_CONTEXT)  # the most context last: the first to go
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

    def make_room(self, running: Sequence[LiveRequest], admitted_waiting: int) -> list[LiveRequest]:
        """The best-effort running requests (in ``running``, running order) to preempt so that the
        ``admitted_waiting`` admitted requests that wait can start: with the engine at its cap on
        running requests (``max_running``) they would wait for a request to finish, however much
        budget a step had. Best effort is preempted first: the last in running order go, at most
        one for each admitted request that wants a place. vLLM keeps a preempted request's blocks
        cached, so it resumes from what was computed unless they are evicted first.
        """
        if self.max_running is None or admitted_waiting <= 0:
            return []
        wanted = admitted_waiting - max(0, self.max_running - len(running))
        if wanted <= 0:
            return []
        return _best_effort(running)[::-1][:wanted]

    def held_back(
        self,
        running: Sequence[LiveRequest],
        admitted_waiting: bool,
        now: float | None = None,
        waiting: Sequence[LiveRequest] | None = None,
    ) -> list[bool]:
        """Best effort runs on leftover time only: which running requests sit this step out.

        While an admitted request waits to start, every best-effort request waits too (vLLM would
        serve running requests first), and so do the decodes without a TPOT target if the
        admitted prompts need the step (``_yield_needed``; ``waiting``: the admitted requests
        that wait, None: they always do). Otherwise the best-effort requests that
        ``token_budget`` planned for join (see ``_best_effort_joining``) and the rest wait.
        """
        self._admitted_waiting = admitted_waiting
        self._step = step = _Running.of_step(running)
        if admitted_waiting and not self._yield_needed(running, waiting, now):
            for r in running:
                r.state.yielded_steps = 0
            held = [r.state.best_effort for r in running]
        elif admitted_waiting:
            held = [r.state.best_effort or self._yields(r) for r in running]
        else:
            for r in running:
                r.state.yielded_steps = 0
            # No slack for best effort (``token_budget``).
            bound = min(self._bounds(step.decodes, now, step.tiers))
            if math.isinf(bound) or not step.best_effort:
                held = [False] * len(running)
            else:
                joining = {id(r) for r in self._best_effort_joining(running, bound, step.best_effort)}
                held = [r.state.best_effort and id(r) not in joining for r in running]
        self._held = held
        return held

    def _arrival_budget(self, running: Sequence[LiveRequest], waiting: bool, start_prefix: int) -> int:
        """The budget of a step when no admitted decode has a TPOT target (``arrival_share``).

        Every decode that runs this step (``held_back`` said which sit out) gets its token; a
        prefill chunk (the first running one, or a prompt that starts) gets what is left of the
        arrival bound. Without a TTFT among the admitted requests either, the engine's budget.
        """
        bound = self._arrival_bound(running)
        if math.isinf(bound):
            return self.max_budget
        # ``held_back`` saw the same running requests in the same order (the engines ask it first).
        held = self._held if len(self._held) == len(running) else [False] * len(running)
        decodes = [r for r, sits in zip(running, held, strict=True) if r.decoding and not sits]
        chunk = next((r for r, sits in zip(running, held, strict=True) if not r.decoding and not sits), None)
        context = sum(r.context + 1 for r in decodes)
        prefix = chunk.context if chunk is not None else start_prefix if waiting else 0
        requests = len(decodes) + int(chunk is not None or waiting)
        fixed = len(decodes)
        budget = fixed + self.step_time.chunk_budget(bound, fixed, requests, context, context, prefix)
        return max(fixed, min(budget, self.max_budget), 1)

    def _arrival_bound(self, running: Sequence[LiveRequest]) -> float:
        """How long a step may take when no admitted decode has a TPOT target: ``arrival_share``
        of the tightest TTFT target among the admitted running requests (inf: none has one).

        Without a TPOT the step has no bound of its own, and leftover budget fills it with
        best-effort prefill; on the CPU engine a full 512-token step takes about 350 ms, which a
        prompt that arrives with a 500 ms TTFT would wait out before its own prefill started.
        The admitted running requests stand for the tiers being served, including those that
        will arrive (a best-effort request's target was out of reach: it sets no bound).
        """
        if self.arrival_share is None:
            return math.inf
        targets = (r.state.first_token_deadline - r.state.arrival for r in running if not r.state.best_effort)
        ttft = min(targets, default=math.inf)
        return ttft * self.arrival_share

    def _yield_needed(
        self, running: Sequence[LiveRequest], waiting: Sequence[LiveRequest] | None, now: float | None
    ) -> bool:
        """Whether the decodes without a TPOT target should sit this step out for the admitted
        prompts: the running chunks and the ``waiting`` admitted requests, whose first tokens,
        predicted with those decodes in every step, would come late once the prediction's time
        from ``now`` is ``yield_margin`` longer (the first ``yield_lookahead`` of them in prefill
        order: a long queue would make the check cost a walk of every prefill each step).
        Without the waiting requests or a time to predict from, they always sit out, as
        admission assumed they would (``_first_tokens``): so the yield is there whenever a prompt
        would otherwise be late.
        """
        if self.yield_margin is None or waiting is None or now is None:
            return True
        admitted = [r for r in running if not r.state.best_effort]
        if not any(math.isinf(r.state.tpot_seconds) for r in _decodes(admitted)):
            return False  # nobody to yield: best effort sits out anyway, paced decodes never do
        pending = sorted([*_prefills(admitted), *waiting], key=_prefill_order)[: self.yield_lookahead]
        times = self._first_tokens(now, pending, admitted, yielding=False)
        stretch = 1.0 + self.yield_margin
        return any(now + (times[r.state.request_id] - now) * stretch > r.state.first_token_deadline for r in pending)

    def _yields(self, r: LiveRequest) -> bool:
        """Whether an admitted running request gives this step to the admitted prefill that waits.

        Only a decode without a TPOT target does: it has no deadline, and the waiting request's
        first token does. At most ``max_yields`` steps in a row, so a stream of prefills never
        starves it.
        """
        if not r.decoding or not math.isinf(r.state.tpot_seconds):
            return False
        if r.state.yielded_steps >= self.max_yields:
            r.state.yielded_steps = 0
            return False
        r.state.yielded_steps += 1
        return True

    def _best_effort_joining(
        self, running: Sequence[LiveRequest], bound: float, best_effort: list[LiveRequest]
    ) -> list[LiveRequest]:
        """The best-effort running requests that join a step bounded by ``bound``, in running order.

        None while an admitted prefill chunk runs: admission promised that chunk the prefill budget
        the admitted decodes leave, and a best-effort request would take a per-request time of it.
        Otherwise they join as long as the step, with one token for each and one more request for
        whoever takes the leftover budget, stays within the bound. ``best_effort``: the best-effort
        requests of ``running``, in running order (``_Running``).
        """
        if not best_effort:
            return []
        admitted = [r for r in running if not r.state.best_effort]
        if _prefills(admitted):
            return []
        tokens = requests = len(admitted)
        context = sum(r.context + 1 for r in admitted)
        joining = []
        for r in best_effort:
            tokens, requests, context = tokens + 1, requests + 1, context + r.context + 1
            if self.step_time.step_seconds(tokens, requests + 1, context, context) > bound:
                break  # the step is full: the rest wait too
            joining.append(r)
        return joining

    # ---- admission ----

    def admit(self, now: float, new: LiveRequest, live: Sequence[LiveRequest]) -> Decision:
        """Whether ``new`` can join the admitted requests in ``live`` without breaking any promise."""
        admitted = [r for r in live if not r.state.best_effort and r.state is not new.state]
        decision = self._check(now, new, admitted)
        self._admitted_waiting |= decision.admitted
        return decision

    def _check(
        self, now: float, new: LiveRequest, admitted: list[LiveRequest], decoders: _Decoders | None = None
    ) -> Decision:
        """The forward-EDF check: ``new``'s decode fits beside the admitted ones and every first token is on time.

        ``decoders``: the admitted requests' ``_Decoders``, if the caller keeps them as running totals.
        """
        with_new = (_Decoders.of(admitted) if decoders is None else decoders).plus(new)
        if self.speculation is not None:  # lengths for the decodes there will be once it runs
            self.speculation.plan(with_new.count, with_new.context)
        decision = self._fits_engine(with_new)
        if decision.admitted:
            decision = self._prefills_fit(now, new, admitted)
        return decision

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
        """Simulate the prefill queue in deadline order: every first token must come on time."""
        waiting = _prefills(admitted)
        with_new = self._first_tokens(now, [*waiting, new], admitted)
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
        without_new = self._first_tokens(now, waiting, admitted)
        broken = [r for r in late if without_new[r.state.request_id] <= r.state.first_token_deadline]
        if broken:
            return Decision(False, f"TTFT: would make admitted request {broken[0].state.request_id} late")
        return ADMITTED  # those already late are late with or without it

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
        for request in sorted(pending, key=_prefill_order):
            if math.isinf(clock):  # no budget left for prefill: every later first token is as late
                times[request.state.request_id] = clock
                continue
            if not yielding and load.free:  # they take their tokens in every step, as paced decodes do
                load = _DecodeLoad(
                    load.bound, load.requests + load.free, load.tokens + load.free,
                    load.context + load.free_context,
                )  # fmt: skip
            clock, load = self._prefill(clock, load, request, first_bound)
            first_bound = None
            times[request.state.request_id] = clock
        return times

    def _slack_bound(self, now: float, admitted: list[LiveRequest], load: _DecodeLoad) -> float | None:
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
        window = self._window_bound(_admitted_decodes(admitted), now, per_step)
        return window if per_step < window < math.inf else None

    def _forward_start(
        self, now: float, admitted: list[LiveRequest], pending: int, step_under_way: bool
    ) -> tuple[float, _DecodeLoad]:
        """When the first of ``pending`` prefills can start, and the decodes every step carries until then."""
        load = self._decode_load(_decodes(admitted))
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
        self, clock: float, load: _DecodeLoad, request: LiveRequest, first_bound: float | None = None
    ) -> tuple[float, _DecodeLoad]:
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

    def _chunked(self, clock: float, load: _DecodeLoad, request: LiveRequest) -> tuple[float, int]:
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

    def _decode_load(self, decodes: list[LiveRequest]) -> _DecodeLoad:
        """The load of these decodes: ``_with_decode`` of each, in one pass (the hot path of admission)."""
        # Counted per tier (a few TPOTs among many decodes), with the per-request work in
        # comprehensions, C-level maps and ``Counter``: admission runs this over every decode in the engine.
        tpots = [r.state.tpot_seconds for r in decodes]
        context = sum(map(_CONTEXT, decodes)) + len(decodes)
        bound, requests, tokens, free, free_context = math.inf, 0, 0, 0, 0
        for tpot, count in Counter(tpots).items():
            if math.isinf(tpot):
                free = count
                free_context = sum([r.context for r, t in zip(decodes, tpots, strict=True) if t == tpot]) + count
                continue
            bound, requests = min(bound, self._seconds_per_step(tpot)), requests + count
            tokens += count * self._verified(tpot)
        return _DecodeLoad(bound, requests, tokens, context - free_context, free, free_context)

    def _with_decode(self, load: _DecodeLoad, tpot_seconds: float, context: int) -> _DecodeLoad:
        """``load`` with one more decode of this tier over ``context`` KV tokens."""
        # Built positionally: the forward simulation makes one per request, and ``_replace`` is slow.
        if math.isinf(tpot_seconds):
            bound, requests, tokens, paced = load.bound, load.requests, load.tokens, load.context
            return _DecodeLoad(bound, requests, tokens, paced, load.free + 1, load.free_context + context)
        return _DecodeLoad(
            min(load.bound, self._seconds_per_step(tpot_seconds)),
            load.requests + 1,
            load.tokens + self._verified(tpot_seconds),
            load.context + context,
            load.free,
            load.free_context,
        )

    def _free_step_seconds(self, load: _DecodeLoad) -> float:
        """A step of every decode of ``load``, those without a TPOT target included."""
        tokens, requests, context = load.tokens + load.free, load.requests + load.free, load.context + load.free_context
        return self.step_time.step_seconds(tokens, requests, context, context)

    def _step_seconds(self, load: _DecodeLoad, prefill: int, prefix: int = 0) -> float:
        """A step of the decodes of ``load`` and one chunk of ``prefill`` tokens after ``prefix`` computed ones."""
        tokens, requests = load.tokens + prefill, load.requests + (prefill > 0)
        context = load.context + (prefix + prefill if prefill else 0)
        attended = load.context + attended_pairs(prefill, prefix + prefill)
        return self.step_time.step_seconds(tokens, requests, context, attended)

    def _prefill_rate(self, load: _DecodeLoad, prefix: int = 0, bound: float | None = None) -> tuple[float, int]:
        """Seconds per full step, and prefill tokens per step, while the decodes of ``load`` run beside
        chunks that follow ``prefix`` computed tokens of their prompt. ``bound``: the step's bound
        (headroom included), if not one TPOT of ``load``.
        """
        prefill = self._prefill_tokens(load, prefix, bound)
        return self._step_seconds(load, prefill, prefix), prefill

    def _prefill_tokens(self, load: _DecodeLoad, prefix: int = 0, bound: float | None = None) -> int:
        """The prefill tokens of a full step of ``_prefill_rate``."""
        if math.isinf(load.bound):
            return max(self.max_budget - load.tokens, 0)
        requests, bound = load.requests + 1, load.bound * self._share if bound is None else bound
        chunk = self.step_time.chunk_budget(bound, load.tokens, requests, load.context, load.context, prefix)
        return max(min(load.tokens + chunk, self.max_budget) - load.tokens, 0)

    # ---- promotion ----

    def promote(self, now: float, candidates: Sequence[LiveRequest], live: Sequence[LiveRequest]) -> list[LiveRequest]:
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
        self._admitted_waiting |= bool(chosen)
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
        waiting = _prefills(admitted)
        tiers = sorted({r.state.tpot_seconds for r in pending})
        clock, load = self._forward_start(now, admitted, len(waiting) + len(pending), step_under_way=False)
        on_time = {}  # the admitted prefills' first tokens with nothing promoted
        end, after = clock, load
        for request in sorted(waiting, key=_prefill_order):
            end, after = self._prefill(end, after, request)
            on_time[request.state.request_id] = end
        states = {(0,) * len(tiers): _Path(clock, load, (), decoders)}
        mine = {id(r) for r in pending}
        for request in sorted([*waiting, *pending], key=_prefill_order):
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

    # ---- routing ----

    def first_token_time(self, now: float, new: LiveRequest, live: Sequence[LiveRequest]) -> float:
        """When ``new``'s first token is predicted if it joined the admitted requests in ``live`` now.

        The forward simulation admission runs (prefills under way first, then deadline order),
        after the step the replica is in the middle of. A router compares it with the deadline to
        find the replica with the most slack.
        """
        admitted = [r for r in live if not r.state.best_effort and r.state is not new.state]
        waiting = _prefills(admitted)
        return self._first_tokens(now, [*waiting, new], admitted, step_under_way=True)[new.state.request_id]
