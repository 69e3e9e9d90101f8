"""The waiting queue, kept in the policy's waiting order without re-sorting it every step."""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from itertools import count

from sloserve_runtime.core.policies import SchedulingPolicy, SortKey
from sloserve_runtime.sim.request import SimRequest


class WaitingQueue:
    """Requests not running, served in ascending ``policy.waiting_key`` order.

    The vLLM adapter stably sorts vLLM's waiting deque every step; vLLM appends arrivals at the
    back and puts preempted requests back at the front. A waiting key depends only on the
    request's SLO state, which changes while it waits only when the policy promotes it (then
    ``rekey``), so a heap ordered by (key, position) gives the same order: arrivals take
    increasing positions, preempted requests decreasing negative ones (the latest preempted
    first among equal keys). With thousands
    waiting under overload this keeps each step O(admitted · log n) instead of O(n log n).
    """

    def __init__(self, policy: SchedulingPolicy) -> None:
        self.policy = policy
        self._heap: list[tuple[SortKey, int, SimRequest]] = []
        self._positions = count(1)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[SimRequest]:
        """The waiting requests, in no particular order."""
        return (request for _, _, request in self._heap)

    def push_back(self, request: SimRequest) -> None:
        self._push(request, next(self._positions))

    def push_front(self, request: SimRequest) -> None:
        self._push(request, -next(self._positions))

    def _push(self, request: SimRequest, position: int) -> None:
        heapq.heappush(self._heap, (self.policy.waiting_key(request.state), position, request))

    def rekey(self) -> None:
        """Sort again after the policy changed some requests' classes (a promotion), keeping positions."""
        key = self.policy.waiting_key
        self._heap = [(key(request.state), position, request) for _, position, request in self._heap]
        heapq.heapify(self._heap)

    def peek(self) -> SimRequest:
        return self._heap[0][2]

    def pop(self) -> SimRequest:
        return heapq.heappop(self._heap)[2]
