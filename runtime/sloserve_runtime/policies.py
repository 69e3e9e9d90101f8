"""Scheduling policies: the ordering (and token budget) rules shared by the vLLM adapter and the simulator.

A policy sees only ``SLORequestState`` and counts, never an engine object, so the vLLM adapter
(``scheduler.py``) and the simulator (``simulator/``) call the very same code. Policies are
registered by name in ``POLICIES``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from sloserve_runtime.slo_state import SLORequestState

SortKey = tuple[float, ...]


class SchedulingPolicy(ABC):
    """Orders a step's waiting and running requests; vLLM-style batching does the rest.

    Rules for callers: call ``waiting_key``/``running_key`` on every request of the queue and sort
    ascending (stable); the first request is served first, and the last running request is the
    first to be preempted when KV memory runs out.
    """

    name: str

    @abstractmethod
    def waiting_key(self, state: SLORequestState) -> SortKey:
        """Sort key of a request that has not started (or was preempted)."""

    @abstractmethod
    def running_key(self, state: SLORequestState, output_tokens: int) -> SortKey:
        """Sort key of a running request that has produced ``output_tokens`` tokens."""

    def token_budget(self, default_budget: int) -> int:
        """Tokens the next step may schedule; the default is the engine's own budget."""
        return default_budget


class DeadlinePolicy(SchedulingPolicy):
    """sloserve: earliest first-token deadline first; running by tightest next-token deadline."""

    name = "sloserve"

    def waiting_key(self, state: SLORequestState) -> SortKey:
        return state.waiting_key()

    def running_key(self, state: SLORequestState, output_tokens: int) -> SortKey:
        return state.running_key(output_tokens)


class FCFSPolicy(SchedulingPolicy):
    """vLLM v1's stock policy: first come, first served."""

    name = "vllm-fcfs"

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

    def token_budget(self, default_budget: int) -> int:
        return min(default_budget, self.chunk_tokens)


POLICIES: dict[str, type[SchedulingPolicy]] = {
    policy.name: policy for policy in (DeadlinePolicy, FCFSPolicy, TierPriorityPolicy, SarathiPolicy)
}


def make_policy(name: str) -> SchedulingPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(POLICIES)}") from None
