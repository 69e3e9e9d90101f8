"""The per-step token budget, and which running requests sit a step out (best effort, and the
decodes without a TPOT target while an admitted prompt needs the step).

A mixin of ``Planner``. ``held_back`` returns a ``Hold`` that ``token_budget`` takes for the same
step: what one call decided reaches the next as a value, not as state on the planner.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from sloserve_runtime.core.planner.forecast import Forecast
from sloserve_runtime.core.planner.views import (
    CONTEXT,
    LiveRequest,
    Running,
    admitted_decodes_of,
    best_effort_of,
    decodes_of,
    prefill_order,
    prefills_of,
)


class Hold(NamedTuple):
    """What ``held_back`` decided for a step, for ``token_budget`` to plan the same step."""

    held: list[bool]  # per running request, in running order: True, it sits the step out
    admitted_waiting: bool  # an admitted request waits to start and could this step
    running: Running | None = None  # the running requests as sorted for the step (None: sort again)
    # The prompt tokens the admitted requests that wait to start have left (None: not known).
    waiting_tokens: int | None = None
    # Seconds the step may take where it is a prompt's own (every decode sits it out); None: it is not.
    solo: float | None = None


class Budget(Forecast):
    """Tokens a step may schedule, and who runs in it."""

    def token_budget(
        self,
        running: Sequence[LiveRequest],
        waiting: bool = True,
        now: float | None = None,
        start_prefix: int = 0,
        hold: Hold | None = None,
    ) -> int:
        """Tokens the next step, starting at ``now``, may schedule, given the running requests
        (decodes and chunks); without ``now``, each decode's bound is one TPOT.

        ``waiting``: a request waits that could start this step and take what the running ones
        leave; ``start_prefix``: the prompt tokens the prefix cache holds for it, which its chunk
        attends to; ``hold``: what ``held_back`` decided for this step (None: nobody sits it out
        and no admitted request waits).
        """
        if hold is None:
            hold = Hold([False] * len(running), admitted_waiting=False)
        if hold.solo is not None:  # the admitted prompts' own step: as many of their tokens as it holds
            prompts = [r for r in prefills_of(running) if not r.state.best_effort]
            prefix = prompts[0].context if prompts else start_prefix
            tokens = sum(r.to_compute for r in prompts) + (hold.waiting_tokens or 0)
            budget = self.step_time.chunk_budget(hold.solo, 0, 1, 0, 0, prefix)
            return max(1, min(budget, tokens or budget, self.max_budget))
        step = hold.running if hold.running is not None and hold.running.of is running else Running.of_step(running)
        admitted_waiting = hold.admitted_waiting
        decodes = step.decodes
        if self.speculation is not None:
            self.speculation.plan(len(decodes), sum(map(CONTEXT, decodes)))
        per_step, bound = self._bounds(decodes, now, step.tiers)
        if math.isinf(bound):
            held = hold.held if len(hold.held) == len(running) else [False] * len(running)
            return self._arrival_budget(running, held, waiting, start_prefix)
        # The first admitted prefill chunk under way, if any (running requests sort in deadline order).
        chunk = next((r for r in prefills_of(running) if not r.state.best_effort), None)
        if bound > per_step and chunk is None and not admitted_waiting:
            # Window slack goes to admitted prompts only: best effort that got a first token from it
            # could no longer be promoted, and would then decode only on leftover time.
            bound = per_step
        # Best effort joins only while no admitted prefill waits: a step planned for joiners that
        # then sit out would leave the waiting request a budget cut by their per-request time.
        prompts = self._best_effort_prompts(now)
        joining = [] if admitted_waiting else self._best_effort_joining(running, bound, step.best_effort, prompts)
        # What the decodes leave goes to a prefill chunk: the first admitted one running (vLLM
        # serves running requests first), else a best-effort one that joins, else a prompt that
        # starts. Its attention grows with its length and with what its prompt has computed so
        # far: a best-effort prompt recomputed after preemption runs chunks thousands of tokens
        # in, and a budget that took it for a fresh prompt overran the bound of every decode.
        taker = chunk if chunk is not None else next((r for r in joining if not r.decoding), None)
        if taker is not None and taker is not chunk:
            joining = [r for r in joining if r is not taker]
        verified = None if self.speculation is None else [self._verified(r.state.tpot_seconds) for r in decodes]
        fixed = (len(decodes) if verified is None else sum(verified)) + len(joining)
        if chunk is None and not admitted_waiting and not prompts:
            # What the decodes leave would go to best-effort prompts: the step is theirs alone,
            # and needs no pass over their context (the common step while runs are turned away).
            return max(fixed, 1)
        # A decode attends to its whole context (``attended_pairs(1, n) == n``), once per verified
        # token: without speculation the attention work of the decodes equals their context.
        context = sum(map(CONTEXT, decodes)) + sum(map(CONTEXT, joining)) + len(decodes) + len(joining)
        attended = context
        if verified is not None:
            attended += sum((n - 1) * (r.context + 1) for r, n in zip(decodes, verified, strict=True))
        # Each request of the step costs its per-request time: the admitted decodes and chunks, the
        # best-effort requests that join, and, while a request waits to start, one more for it (it
        # takes what a finishing chunk leaves). Reserving that time when nobody waits would cost
        # the running chunk a per-request time of tokens every step.
        requests = len(running) - len(step.best_effort) + len(joining) + int(waiting) + int(taker is not chunk)
        prefix = taker.context if taker is not None else start_prefix if waiting else 0
        budget = fixed + self.step_time.chunk_budget(bound, fixed, requests, context, attended, prefix)
        if chunk is not None or (admitted_waiting and hold.waiting_tokens is not None):
            # A step planned for admitted prompts runs nothing else: vLLM would start waiting
            # best-effort prompts on what they leave, and the step would outrun the bound their
            # first tokens were promised on (one such step cost a promoted request 80 ms).
            prompts = sum(r.to_compute for r in prefills_of(running) if not r.state.best_effort)
            budget = min(budget, fixed + prompts + (hold.waiting_tokens or 0))
        # Admitted decodes always run: admission keeps them within the bound, and a step that
        # skipped one would break its TPOT for sure.
        return max(fixed, min(budget, self.max_budget), 1)

    def held_back(
        self,
        running: Sequence[LiveRequest],
        admitted_waiting: bool,
        now: float | None = None,
        waiting: Sequence[LiveRequest] | None = None,
        kv_room: int | None = None,
    ) -> Hold:
        """Best effort runs on leftover time only: which running requests sit this step out.

        While an admitted request waits to start, every best-effort request waits too (vLLM would
        serve running requests first), and so do the decodes without a TPOT target if the
        admitted prompts need the step (``_yield_needed``; ``waiting``: the admitted requests
        that wait, None: they always do). Otherwise the best-effort requests that
        ``token_budget`` planned for join (see ``_best_effort_joining``) and the rest wait.
        Every decode sits out where an admitted prompt gets a step of its own (``_solo_needed``;
        ``kv_room``: the KV tokens the engine has free for it, None: not known).
        The ``Hold`` says so per running request, for ``token_budget`` to plan the same step.
        """
        step = Running.of_step(running)
        solo = self._solo_needed(running, waiting if admitted_waiting else (), now, kv_room)
        if solo is not None:
            held = [r.state.best_effort or r.decoding for r in running]
            return Hold(held, admitted_waiting, step, sum(r.to_compute for r in waiting or ()), solo)
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
                prompts = self._best_effort_prompts(now)
                joining = {id(r) for r in self._best_effort_joining(running, bound, step.best_effort, prompts)}
                held = [r.state.best_effort and id(r) not in joining for r in running]
        waiting_tokens = None if waiting is None else sum(r.to_compute for r in waiting)
        return Hold(held, admitted_waiting, step, waiting_tokens)

    def _arrival_budget(
        self, running: Sequence[LiveRequest], held: list[bool], waiting: bool, start_prefix: int
    ) -> int:
        """The budget of a step when no admitted decode has a TPOT target (``arrival_share``).

        Every decode that runs this step (``held_back`` said which sit out) gets its token; a
        prefill chunk (the first running one, or a prompt that starts) gets what is left of the
        arrival bound. Without a TTFT among the admitted requests either, the engine's budget.
        """
        bound = self._arrival_bound(running)
        if math.isinf(bound):
            return self.max_budget
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
        best-effort prefill; on the CPU engine a full step takes a good share of a tight TTFT
        target, which a prompt that arrives during it would wait out before its own prefill started.
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
        if not any(math.isinf(r.state.tpot_seconds) for r in decodes_of(admitted)):
            return False  # nobody to yield: best effort sits out anyway, paced decodes never do
        pending = sorted([*prefills_of(admitted), *waiting], key=prefill_order)[: self.yield_lookahead]
        times = self._first_tokens(now, pending, admitted, yielding=False)
        stretch = 1.0 + self.yield_margin
        return any(now + (times[r.state.request_id] - now) * stretch > r.state.first_token_deadline for r in pending)

    def _solo_needed(
        self,
        running: Sequence[LiveRequest],
        waiting: Sequence[LiveRequest] | None,
        now: float | None,
        kv_room: int | None = None,
    ) -> float | None:
        """The bound of a step of the admitted prompts alone (the running chunks, then the
        ``waiting`` requests), where the first of them needs one (``solo_prompts``): with the
        running decodes in every step its first token, predicted ``yield_margin`` later, would
        miss its deadline, and what is left of it fits one step that every admitted decode's
        windows can spare (``_solo_step``), and its KV is free (``kv_room``). None: no such step
        (nor with speculation on).
        """
        if not self.solo_prompts or now is None:
            return None
        admitted = [r for r in running if not r.state.best_effort]
        prompts = [*prefills_of(admitted), *(waiting or ())]
        if not prompts:
            return None
        head = min(prompts, key=prefill_order)
        if kv_room is not None and head.to_compute > kv_room:
            # Its KV is not free: vLLM would preempt for its blocks (the prompt itself, where it runs
            # last), and a step whose decodes all sit out would run nothing.
            return None
        decodes = admitted_decodes_of(admitted)
        if all(math.isinf(r.state.tpot_seconds) for r in decodes):
            return None  # nothing to gain over ``_yields`` (and no forward simulation to ask)
        if not self._late(now, self._first_tokens(now, [head], admitted, yielding=False)[head.state.request_id], head):
            return None
        deadline = self._solo_deadline(now, decodes, head)
        if deadline is None or head.to_compute > self.max_budget:
            return None
        room = self._solo_room(now, head, decodes, deadline)  # as ``_solo_step`` asks it, once
        return room if self._alone_seconds(head) <= room else None

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
        self, running: Sequence[LiveRequest], bound: float, best_effort: list[LiveRequest], prompts: bool = True
    ) -> list[LiveRequest]:
        """The best-effort running requests that join a step bounded by ``bound``, in running order.

        None while an admitted prefill chunk runs: admission promised that chunk the prefill budget
        the admitted decodes leave, and a best-effort request would take a per-request time of it.
        Otherwise they join as long as the step, with one token for each and one more request for
        whoever takes the leftover budget, stays within the bound; the best-effort prompts only
        with ``prompts`` (``_best_effort_prompts``), else the decodes alone. ``best_effort``: the
        best-effort requests of ``running``, in running order (``Running``).
        """
        if not best_effort:
            return []
        admitted = [r for r in running if not r.state.best_effort]
        if prefills_of(admitted):
            return []
        tokens = requests = len(admitted)
        context = sum(r.context + 1 for r in admitted)
        joining = []
        for r in best_effort if prompts else decodes_of(best_effort):
            tokens, requests, context = tokens + 1, requests + 1, context + r.context + 1
            if self.step_time.step_seconds(tokens, requests + 1, context, context) > bound:
                break  # the step is full: the rest wait too
            joining.append(r)
        return joining

    def _best_effort_prompts(self, now: float | None) -> bool:
        """Whether best-effort prompts may take what the admitted decodes with a TPOT leave of a
        step starting at ``now``: once admission has turned no program run away for
        ``best_effort_calm_s`` (``last_refusal``, which the policy sets).
        Until then they wait (their queue bounded by the server's ``--max-queued-best-effort``);
        the best-effort decodes still join, and a step without such decodes is theirs as before."""
        calm = self.best_effort_calm_s
        return calm is None or now is None or now - self.last_refusal >= calm

    def make_room(self, running: Sequence[LiveRequest], admitted_waiting: int, kv_short: int = 0) -> list[LiveRequest]:
        """The best-effort running requests (in ``running``, running order) to preempt so that the
        ``admitted_waiting`` admitted requests that wait can start: with the engine at its cap on
        running requests (``max_running``) they would wait for a request to finish, however much
        budget a step had; and with the KV cache full (``kv_short``: the tokens of KV the first of
        them lacks) they would wait for blocks, past their first-token deadline. Best effort is
        preempted first: the last in running order go, at most one for each admitted request
        that wants a place, and as many as free the KV it lacks. vLLM keeps a preempted
        request's blocks cached, so it resumes from what was computed unless they are evicted first.
        """
        victims = best_effort_of(running)[::-1]
        wanted = 0
        if self.max_running is not None and admitted_waiting > 0:
            wanted = max(0, admitted_waiting - max(0, self.max_running - len(running)))
        freed = sum(r.context for r in victims[:wanted])
        while kv_short > freed and wanted < len(victims):
            freed += victims[wanted].context
            wanted += 1
        return victims[:wanted]
