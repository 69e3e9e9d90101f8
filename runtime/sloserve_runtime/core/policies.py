"""Scheduling policies: ordering, token budget and admission, shared by the vLLM adapter and the simulator.

A policy sees only ``SLORequestState`` and ``LiveRequest`` views, never an engine object, so the
vLLM adapter (``engine/scheduler.py``) and the simulator (``sim/``) call the very same code,
through the step pipeline (``core/step.py``). Policies are registered by name in ``POLICIES``:
the one list of schedulers ``sloserve serve`` and ``sloserve simulate`` take.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

from sloserve_runtime.core.calibration import StepTimeCalibration
from sloserve_runtime.core.planner import ADMITTED, Decision, Hold, LiveRequest, Planner
from sloserve_runtime.core.programs import CallShape, ProgramBook, call_due, tightest
from sloserve_runtime.core.slo_state import SLORequestState
from sloserve_runtime.core.speculation import TierSpeculation
from sloserve_runtime.core.step_time import StepTimeModel

SortKey = tuple[float, ...]


class SchedulingPolicy(ABC):
    """Orders a step's waiting and running requests; vLLM-style batching does the rest.

    Rules for callers: call ``waiting_key``/``running_key`` on every request of the queue and sort
    ascending (stable); the first request is served first, and the last running request is the
    first to be preempted when KV memory runs out. A step asks the policy in one order, which
    ``core.step.plan_step`` keeps for every engine: ``promote`` (its answer changes the keys),
    sort, ``make_room`` (preempt what it names, and sort the waiting queue again), ``demote``,
    ``held_back``, then ``token_budget`` with the ``Hold`` that ``held_back`` returned; then
    ``spec_length`` for the decodes that run.
    """

    name: str
    stock = False  # vLLM's own scheduler decides as this policy does: a server runs that one
    admits = False  # it decides on admission (``admit``): else every request is admitted

    def __init__(
        self, step_time: StepTimeModel, max_budget: int, max_spec_length: int = 1, calibrate: bool = False
    ) -> None:
        self.step_time = step_time
        self.max_budget = max_budget  # the engine's own per-step token limit
        self.max_spec_length = max_spec_length  # tokens a decode may verify per step (1: no speculation)
        # With ``calibrate``, the step times the engine reports (``observe_step``) correct the model.
        self.calibration = StepTimeCalibration(step_time) if calibrate else None

    @abstractmethod
    def waiting_key(self, state: SLORequestState) -> SortKey:
        """Sort key of a request that has not started (or was preempted)."""

    @abstractmethod
    def running_key(self, state: SLORequestState, output_tokens: int) -> SortKey:
        """Sort key of a running request that has produced ``output_tokens`` tokens."""

    def token_budget(
        self,
        running: Sequence[LiveRequest],
        waiting: bool = True,
        now: float | None = None,
        start_prefix: int = 0,
        hold: Hold | None = None,
    ) -> int:
        """Tokens the next step (starting at ``now``) may schedule, given the running requests and
        whether any request waits that could start (``start_prefix``: the prompt tokens the prefix
        cache holds for it; ``hold``: what ``held_back`` decided for the step); by default the
        engine's own.
        """
        return self.max_budget

    def admit(self, now: float, new: LiveRequest, live: Sequence[LiveRequest]) -> Decision:
        """Decide on a request as it arrives (``live``: the other admitted requests in the engine)."""
        return ADMITTED

    def demote(self, running: Sequence[LiveRequest]) -> list[LiveRequest]:
        """Admitted running requests (in ``running``) given up to best effort before the step is
        planned, so that the others keep their SLO; stock vLLM has no classes to move between."""
        return []

    def held_back(
        self,
        running: Sequence[LiveRequest],
        admitted_waiting: bool,
        now: float | None = None,
        waiting: Sequence[LiveRequest] | None = None,
        kv_room: int | None = None,
    ) -> Hold:
        """Which running requests (in running order) sit the step starting at ``now`` out, while an
        admitted request waits to start or not (``waiting``: the admitted requests that wait, in
        queue order, when one can start); vLLM would serve them all first. ``kv_room``: the
        engine's ``StepEngine.kv_room``."""
        return Hold([False] * len(running), admitted_waiting)

    def make_room(self, running: Sequence[LiveRequest], admitted_waiting: int, kv_short: int = 0) -> list[LiveRequest]:
        """Running requests (in running order) to preempt before the step so that the
        ``admitted_waiting`` admitted requests that wait find a place under the engine's cap on
        running requests, and the first of them the ``kv_short`` tokens of KV it lacks; vLLM
        preempts only when a running request's KV cannot grow."""
        return []

    def promote(self, now: float, candidates: Sequence[LiveRequest], live: Sequence[LiveRequest]) -> list[LiveRequest]:
        """Best-effort requests (no output yet, in first-token-deadline order) admitted now, before the
        step is planned (``live``: the admitted requests); stock vLLM has no classes to move between.
        """
        return []

    def spec_length(self, state: SLORequestState) -> int:
        """Tokens a decode of this request verifies this step; vLLM verifies every draft it has."""
        return self.max_spec_length

    def finished(self, state: SLORequestState, now: float) -> bool:
        """The request ended at ``now`` (done, aborted or refused). True: the engine holds its
        prefix's KV from eviction for its program run's next call (until ``released_holds``
        names the run); stock vLLM keeps nothing of it."""
        return False

    def released_holds(self, now: float) -> list[str]:
        """The program runs whose held KV the engine frees now (their run ended or timed out)."""
        return []

    def midway(self, state: SLORequestState) -> bool:
        """A later stage of a program run this policy let go on at its first (never refused)."""
        return False

    def record_acceptance(self, state: SLORequestState, drafted: int, accepted: int) -> None:
        """The engine verified ``drafted`` drafts of this request and kept ``accepted``; stock vLLM learns nothing."""
        return None

    def observe_step(self, tokens: int, requests: int, context_tokens: int, attended: int, seconds: float) -> bool:
        """The engine ran a step with these features in ``seconds`` (its whole cycle, as a client sees it).

        With calibration on, the policy plans from then on with the model as calibrated to the steps
        so far (the line refitted every few steps, its short memory moved every step); True when
        that model changed just now.
        """
        calibration = self.calibration
        if calibration is None or not calibration.observe(tokens, requests, context_tokens, attended, seconds):
            return False
        self.use_step_time(calibration.model)
        return True

    def use_step_time(self, step_time: StepTimeModel) -> None:
        """Plan with ``step_time`` from the next decision on."""
        self.step_time = step_time


class DeadlinePolicy(SchedulingPolicy):
    """sloserve-edf: deadline order only: earliest first-token deadline; running by next-token deadline."""

    name = "sloserve-edf"

    def waiting_key(self, state: SLORequestState) -> SortKey:
        return state.waiting_key()

    def running_key(self, state: SLORequestState, output_tokens: int) -> SortKey:
        return state.running_key(output_tokens)


class PlannerPolicy(DeadlinePolicy):
    """sloserve: deadline order, the planner's per-step budget, soft admission (best effort) and
    promotion of best-effort requests that fit later.
    """

    name = "sloserve"
    admits = True
    promotion = "edf"  # how best-effort requests are promoted (``Planner.promotion``)
    demotion = True  # admitted decodes that no longer fit are given up to best effort (``demote``)
    window_reserve: float | None = 0.75  # window slack (``Planner.window_reserve``); None: one TPOT a step
    solo_prompts = True  # a prompt that would be late beside the decodes gets a step of its own (``Planner``)
    best_effort_calm_s: float | None = 30.0  # best effort waits while runs are turned away (``Planner``)
    # Program runs are admitted as a whole at their first stage, and their later stages keep
    # their places (``admit``); False: every stage call is decided alone, as a flat request.
    program_aware = True
    hold_context = True  # a program run's context KV is held between its calls (``finished``)

    def __init__(
        self, step_time: StepTimeModel, max_budget: int, max_spec_length: int = 1, calibrate: bool = False
    ) -> None:
        super().__init__(step_time, max_budget, max_spec_length, calibrate)
        self.programs = ProgramBook()
        self.speculation = TierSpeculation(step_time, max_spec_length)
        self.planner = Planner(
            step_time, max_budget, self.speculation if self.speculation.enabled else None,
            promotion=self.promotion, window_reserve=self.window_reserve, solo_prompts=self.solo_prompts,
            best_effort_calm_s=self.best_effort_calm_s,
        )  # fmt: skip

    def use_step_time(self, step_time: StepTimeModel) -> None:
        super().use_step_time(step_time)
        self.planner.step_time = self.speculation.step_time = step_time
        if self.calibration is not None:  # the calibrated model's own error, ten steps at a time
            self.planner.window_margin = self.calibration.window_margin

    def running_key(self, state: SLORequestState, output_tokens: int) -> SortKey:
        # Decodes with a TPOT target first (each needs one token this step to keep it), then prefill
        # chunks, then decodes without one (no deadline: they take what the chunks leave); each group
        # by deadline. Best effort after all admitted work.
        group = 1 if output_tokens == 0 else 2 if math.isinf(state.tpot_seconds) else 0
        return (state.best_effort, group, state.token_deadline(output_tokens), state.tpot_seconds)

    def token_budget(
        self,
        running: Sequence[LiveRequest],
        waiting: bool = True,
        now: float | None = None,
        start_prefix: int = 0,
        hold: Hold | None = None,
    ) -> int:
        return self.planner.token_budget(running, waiting, now, start_prefix, hold)

    def admit(self, now: float, new: LiveRequest, live: Sequence[LiveRequest]) -> Decision:
        call = new.state.program if self.program_aware else None
        decision = self.planner.admit(now, new, live) if call is None else self._admit_stage(now, new, live)
        new.state.best_effort = not decision.admitted
        new.state.admission = decision.reason
        if not decision.admitted and call is not None:  # a run turned away (``Planner.best_effort_calm_s``)
            self.planner.last_refusal = now
        return decision

    def _admit_stage(self, now: float, new: LiveRequest, live: Sequence[LiveRequest]) -> Decision:
        """A stage call of a program run: its run is decided at its first stage, as a whole.

        A later stage of an admitted run is admitted by right, ahead of any new run (its decode
        and KV were reserved while its run waited). A first stage is admitted only if, beside
        every promise and every reserved decode and KV, its decode fits with the place its run's
        later stages will need, the KV of all admitted runs fits the engine, and the run's
        expected work at its stages' pace ends by the program's deadline. A later stage of a run
        left best effort is weighed as a first stage: if it fits, the run is kept from then on.
        """
        state, book = new.state, self.programs
        call = state.program
        shape = CallShape(
            state.prompt_tokens, new.to_compute, state.first_token_deadline - state.arrival, state.tpot_seconds
        )
        expected = book.arrive(call, now, shape)
        run = book.run_of(call)
        if run is not None and run.admitted:
            state.continues_run = True
            return Decision(
                True, f"admitted: call {run.calls} of program run {call.run_id}, admitted at its first stage"
            )
        future = tightest(expected) if expected else None
        decision = self.planner.admit(now, new, live, future, self.reserved_decodes())
        if decision.admitted:
            decision = self._kv_fits(new, live, expected)
        due = call_due(call.deadline(now if run is None else run.first_arrival), expected)
        # This call takes its time too: as long as its stage's calls have lately taken.
        end = now + book.served_seconds(call)
        if decision.admitted and due is not None and end > due:
            decision = Decision(
                False,
                f"program deadline: this call and the {sum(s.calls for s in expected):.1f} expected after it "
                f"end {end - due:.1f} s after the run's deadline, as its stages' calls have lately been served",
            )
        if run is None:
            book.decided(call, decision.admitted, now, expected)
        elif decision.admitted:  # a run left best effort whose later call fits now: kept from here on
            book.promoted(call)
        return decision

    def reserved_decodes(self) -> tuple[frozenset[float], int, int]:
        """The decodes the admitted runs between stages will bring back: (tiers, count, context)."""
        book = self.programs
        return frozenset(book.reserved_tiers), book.reserved_calls, book.reserved_kv

    def _kv_fits(self, new: LiveRequest, live: Sequence[LiveRequest], expected: tuple) -> Decision:
        """The KV every admitted run will hold at once fits the engine: the admitted calls grown by
        the output learnt for their stages, the next calls of the admitted runs between stages
        (``ProgramBook.reserved_kv``), and the most the new run will hold at any of its calls.
        Without it, a run's later call finds the blocks taken and its held context evicted, and
        waits for KV past its first-token deadline."""
        capacity = self.planner.kv_capacity_tokens
        if capacity is None:
            return ADMITTED
        book = self.programs
        need = sum(
            r.context + r.to_compute
            + (0 if r.state.program is None else max(0, round(book.output_of(r.state.program)) - r.state.output_tokens))
            for r in live if not r.state.best_effort and r.state is not new.state
        )  # fmt: skip
        own = new.context + new.to_compute + round(book.output_of(new.state.program))
        total = need + book.reserved_kv + max([own, *(stage.context for stage in expected)])
        if total <= capacity:
            return ADMITTED
        return Decision(
            False,
            f"KV: admitted program runs would hold {total} tokens at once, over the engine's {capacity} "
            f"({book.reserved_kv} kept for the next calls of admitted runs between stages)",
        )

    def finished(self, state: SLORequestState, now: float) -> bool:
        if state.program is None or not self.program_aware:
            return False
        return self.programs.finish(state.program, now, state.output_tokens, state.arrival) and self.hold_context

    def released_holds(self, now: float) -> list[str]:
        return self.programs.released(now) if self.program_aware else []

    def demote(self, running: Sequence[LiveRequest]) -> list[LiveRequest]:
        """The decodes ``Planner.overrun`` gives up, marked best effort with the reason."""
        if not self.demotion:
            return []
        given_up, overrun = self.planner.overrun(running)
        for request in given_up:
            request.state.best_effort = True
            request.state.admission = f"demoted to best effort: {overrun.reason}"
        return given_up

    def held_back(
        self,
        running: Sequence[LiveRequest],
        admitted_waiting: bool,
        now: float | None = None,
        waiting: Sequence[LiveRequest] | None = None,
        kv_room: int | None = None,
    ) -> Hold:
        return self.planner.held_back(running, admitted_waiting, now, waiting, kv_room)

    def make_room(self, running: Sequence[LiveRequest], admitted_waiting: int, kv_short: int = 0) -> list[LiveRequest]:
        return self.planner.make_room(running, admitted_waiting, kv_short)

    def promote(self, now: float, candidates: Sequence[LiveRequest], live: Sequence[LiveRequest]) -> list[LiveRequest]:
        promoted = self.planner.promote(now, candidates, live)
        for request in promoted:
            request.state.best_effort = False
            request.state.admission = f"admitted: promoted from best effort ({request.state.admission})"
            if self.program_aware:
                self.programs.promoted(request.state.program)
        return promoted

    def midway(self, state: SLORequestState) -> bool:
        return self.program_aware and self._later_stage(state)

    def _later_stage(self, state: SLORequestState) -> bool:
        run = self.programs.run_of(state.program)
        return run is not None and run.calls > 1

    def spec_length(self, state: SLORequestState) -> int:
        # Its tier's length, planned in ``token_budget`` (best effort too: a tier's drafts serve its TPOT).
        return self.speculation.length(state.tpot_seconds)

    def record_acceptance(self, state: SLORequestState, drafted: int, accepted: int) -> None:
        self.speculation.record(state.tpot_seconds, drafted, accepted)


class StageLevelPolicy(PlannerPolicy):
    """sloserve-stage: the planner deciding every stage call alone, blind to its program (an ablation)."""

    name = "sloserve-stage"
    program_aware = False


class NoHoldPolicy(PlannerPolicy):
    """sloserve-nohold: the program-aware planner without holding a run's context between its calls (an ablation)."""

    name = "sloserve-nohold"
    hold_context = False


class ArrivalAdmissionPolicy(PlannerPolicy):
    """sloserve-arrival: the planner with admission at arrival only; best effort stays best effort."""

    name = "sloserve-arrival"
    promotion = "none"


class StepBoundPolicy(PlannerPolicy):
    """sloserve-tpot: the planner with every step bounded by one TPOT, without window slack (an ablation)."""

    name = "sloserve-tpot"
    window_reserve = None


class SharedStepsPolicy(PlannerPolicy):
    """sloserve-nosolo: the planner without a prompt's own step: the admitted decodes with a TPOT
    run in every step, prompts beside them (an ablation)."""

    name = "sloserve-nosolo"
    solo_prompts = False


class NoCalmPolicy(PlannerPolicy):
    """sloserve-nocalm: the program-aware planner whose best-effort prompts take what the admitted
    decodes leave even while admission turns runs away, as SLOs-Serve's (an ablation)."""

    name = "sloserve-nocalm"
    best_effort_calm_s = None


class KeepAdmittedPolicy(PlannerPolicy):
    """sloserve-keep: the planner without demotion: an admitted decode is never given up (an ablation)."""

    name = "sloserve-keep"
    demotion = False


class DPPromotionPolicy(PlannerPolicy):
    """sloserve-dp: the planner, promoting best-effort requests by SLOs-Serve's dynamic programme."""

    name = "sloserve-dp"
    promotion = "dp"


class FCFSPolicy(SchedulingPolicy):
    """vLLM v1's stock policy: first come, first served. ``sloserve serve`` runs vLLM's own scheduler
    for it, so comparisons differ from ours in the scheduler only."""

    name = "vllm"
    stock = True

    def waiting_key(self, state: SLORequestState) -> SortKey:
        return (state.arrival,)

    def running_key(self, state: SLORequestState, output_tokens: int) -> SortKey:
        return (state.arrival,)


class TierPriorityPolicy(SchedulingPolicy):
    """vLLM's priority policy with the SLO tier as the priority: tighter TPOT, then TTFT, first."""

    name = "vllm-priority"

    def waiting_key(self, state: SLORequestState) -> SortKey:
        return (state.tpot_seconds, state.first_token_deadline - state.arrival, state.arrival)

    def running_key(self, state: SLORequestState, output_tokens: int) -> SortKey:
        return self.waiting_key(state)


class SarathiPolicy(FCFSPolicy):
    """Sarathi-Serve: FCFS with a small fixed token budget, so prefill chunks stall decodes less."""

    name = "sarathi"
    chunk_tokens = 256

    def token_budget(
        self,
        running: Sequence[LiveRequest],
        waiting: bool = True,
        now: float | None = None,
        start_prefix: int = 0,
        hold: Hold | None = None,
    ) -> int:
        return min(self.max_budget, self.chunk_tokens)


POLICIES: dict[str, type[SchedulingPolicy]] = {
    policy.name: policy
    for policy in (
        PlannerPolicy,
        StageLevelPolicy,
        NoHoldPolicy,
        ArrivalAdmissionPolicy,
        StepBoundPolicy,
        SharedStepsPolicy,
        NoCalmPolicy,
        KeepAdmittedPolicy,
        DPPromotionPolicy,
        DeadlinePolicy,
        FCFSPolicy,
        TierPriorityPolicy,
        SarathiPolicy,
    )  # fmt: skip
}


# Older names that still work: ``vllm-fcfs`` was the simulator's name for stock vLLM.
ALIASES = {"vllm-fcfs": "vllm"}


def scheduler_name(name: str) -> str:
    """The registered name ``name`` stands for (itself, or what its alias names); ValueError if none."""
    name = ALIASES.get(name, name)
    if name not in POLICIES:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(POLICIES)}")
    return name


# The policies that plan with a ``Planner`` (and so take its settings, such as ``max_yields``).
PLANNER_POLICIES = tuple(name for name, policy in POLICIES.items() if issubclass(policy, PlannerPolicy))


def make_policy(
    name: str,
    step_time: StepTimeModel,
    max_budget: int,
    max_spec_length: int = 1,
    calibrate: bool = False,
    max_yields: int | None = None,
    max_running: int | None = None,
    kv_capacity_tokens: int | None = None,
) -> SchedulingPolicy:
    """The policy registered as ``name``, for an engine with this step-time model, token limit and
    speculation; with ``calibrate``, the model is refitted to the steps the engine reports.
    ``max_yields``: the planner's ``Planner.max_yields`` instead of its default (planner policies only).
    ``max_running``: the engine's cap on running requests (vLLM's ``max_num_seqs``; None: none),
    which a planner keeps its admitted requests within (``Planner.max_running``).
    ``kv_capacity_tokens``: the engine's KV cache, which a planner keeps its admitted program runs
    within (``Planner.kv_capacity_tokens``).
    """
    name = scheduler_name(name)
    if max_running is not None and max_running < 1:
        raise ValueError(f"max_running {max_running}: the engine must run at least one request")
    policy = POLICIES[name](step_time, max_budget, max_spec_length, calibrate)
    if isinstance(policy, PlannerPolicy):
        policy.planner.max_running = max_running
        policy.planner.kv_capacity_tokens = kv_capacity_tokens
    if max_yields is not None:
        if name not in PLANNER_POLICIES:
            planners = ", ".join(PLANNER_POLICIES)
            raise ValueError(f"max_yields is a setting of the planner ({planners}); {name!r} has none")
        if max_yields < 0:
            raise ValueError(f"max_yields {max_yields}: give 0 or more steps")
        policy.planner.max_yields = max_yields
    return policy
