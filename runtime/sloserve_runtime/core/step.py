"""One engine step, planned once for every engine: promote, order, make room, demote, hold back, budget.

The vLLM adapter (``engine.scheduler``) and the simulator (``sim.engine``) each give ``plan_step``
their engine as a ``StepEngine`` (views of its requests, and the few changes the plan makes to
its queues) and then run the step vLLM's way with the plan's holds and token budget. The order of
the calls below is the contract of ``SchedulingPolicy``; it is written here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from sloserve_runtime.core.planner import LiveRequest
from sloserve_runtime.core.policies import SchedulingPolicy


class StepEngine(Protocol):
    """An engine as the step pipeline sees it. Views are of the engine's requests in its current
    order; each change is applied when asked, so the next view sees it."""

    def promotion_candidates(self, now: float) -> list[LiveRequest]:
        """Best-effort requests with no output yet whose first-token deadline is after ``now``,
        in first-token-deadline order."""
        ...

    def admitted_requests(self) -> list[LiveRequest]:
        """Every admitted request in the engine, running or waiting."""
        ...

    def promoted(self, requests: list[LiveRequest]) -> None:
        """These best-effort requests are admitted now (their SLO state says so already)."""
        ...

    def order_queues(self) -> None:
        """Sort the waiting and running requests by the policy's keys."""
        ...

    def running_requests(self) -> list[LiveRequest]:
        """The running requests, in running order."""
        ...

    def admitted_waiting_at_cap(self) -> int:
        """How many admitted requests wait while every place under the engine's cap on running
        requests is taken (0 while a place is free or nobody waits)."""
        ...

    def admitted_kv_short(self) -> int:
        """Tokens of KV the admitted request at the head of the waiting queue lacks to start (0: it
        fits, or none waits)."""
        ...

    def preempt(self, requests: list[LiveRequest]) -> None:
        """Send these running requests back to wait, as vLLM preempts for memory, and re-sort."""
        ...

    def demoted(self, requests: list[LiveRequest]) -> None:
        """These admitted requests are best effort now (their SLO state says so already)."""
        ...

    def kv_room(self) -> int | None:
        """Tokens of KV a step's new tokens may take without preempting: the free blocks (cached
        prefixes among them), less one, since a chunk's first block may be one part-filled already.
        None: not known."""
        ...

    def start_prefix(self) -> int | None:
        """The cached prompt tokens of the request that would start this step, if one can (a place
        is free and one waits); None if none can."""
        ...

    def admitted_can_start(self) -> list[LiveRequest] | None:
        """The admitted requests that wait, if one heads the waiting queue with the KV memory to
        start this step; None otherwise. Asked only when a request can start (``start_prefix``)."""
        ...


@dataclass(frozen=True)
class StepPlan:
    """What a step does beyond vLLM's own batching: the engine runs ``running`` with the ``held``
    ones sitting out and at most ``token_budget`` tokens."""

    running: list[LiveRequest]  # the running requests, in running order, after preemption
    held: list[bool]  # per running request: True, it sits the step out
    token_budget: int
    promoted: list[LiveRequest] = field(default_factory=list)
    preempted: list[LiveRequest] = field(default_factory=list)  # places given up to admitted requests
    demoted: list[LiveRequest] = field(default_factory=list)


def plan_step(policy: SchedulingPolicy, engine: StepEngine, now: float) -> StepPlan:
    """Plan the engine's step starting at ``now`` and make its queue changes on ``engine``."""
    promoted = _promote(policy, engine, now)
    engine.order_queues()  # promotions change the keys
    running = engine.running_requests()
    preempted = _make_room(policy, engine, running)
    if preempted:
        gone = {id(r.state) for r in preempted}
        running = [r for r in running if id(r.state) not in gone]
    demoted = policy.demote(running)
    if demoted:
        engine.demoted(demoted)
    prefix = engine.start_prefix()
    waiting = engine.admitted_can_start() if prefix is not None else None
    hold = policy.held_back(running, waiting is not None, now, waiting, engine.kv_room())
    budget = policy.token_budget(running, prefix is not None, now, prefix or 0, hold)
    return StepPlan(running, hold.held, budget, promoted, preempted, demoted)


def _promote(policy: SchedulingPolicy, engine: StepEngine, now: float) -> list[LiveRequest]:
    candidates = engine.promotion_candidates(now)
    if not candidates:
        return []
    promoted = policy.promote(now, candidates, engine.admitted_requests())
    if promoted:
        engine.promoted(promoted)
    return promoted


def _make_room(policy: SchedulingPolicy, engine: StepEngine, running: list[LiveRequest]) -> list[LiveRequest]:
    waiting = engine.admitted_waiting_at_cap()
    kv_short = engine.admitted_kv_short()
    if waiting <= 0 and kv_short <= 0:
        return []
    victims = policy.make_room(running, waiting, kv_short)
    if victims:
        engine.preempt(victims)
    return victims
