"""Routers: which engine replica gets a new request. Imports no vLLM and no Ray.

A router decides from a ``ReplicaView`` of each replica, the summary a replica publishes: its
planner, its admitted requests and its load. The simulator's cluster and a serving front end call
the same routers. Routers are registered by name in ``ROUTERS``:

* ``slo`` — the replica where the planner finds the request feasible with the most slack before
  its first-token deadline; a later stage of a program stays on the replica that served the
  earlier ones (it holds their prefix) while it is feasible there. When no replica is feasible,
  the least loaded gets it, and its own admission makes it best effort there.
* ``round-robin`` and ``least-loaded`` — the baselines.

>>> from sloserve.slo import SLO
>>> from sloserve_runtime.core.planner import Planner
>>> from sloserve_runtime.core.slo_state import SLORequestState
>>> from sloserve_runtime.core.step_time import LinearPiece, StepTimeModel
>>> model = StepTimeModel("toy", (LinearPiece(per_token=0.001, constant=0.01),))
>>> new = LiveRequest(SLORequestState.create("r", SLO.parse("1s", "50ms"), 0.0, 100, model), 100, 0)
>>> replicas = [ReplicaView(Planner(model, 512), [], load=0, healthy=False), ReplicaView(Planner(model, 512), [], 0)]
>>> make_router("slo").route(0.0, new, replicas)
Route(replica=1, feasible=True)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from sloserve_runtime.core.planner import LiveRequest, Planner


@dataclass(frozen=True)
class ReplicaView:
    """What a router knows of one replica when a request arrives."""

    planner: Planner  # the replica's planner: its step-time model and token limit judge feasibility
    admitted: Sequence[LiveRequest]  # its unfinished admitted requests, which a new one is weighed against
    load: int  # its unfinished requests of every class, admitted and best effort
    healthy: bool = True  # a replica that is down or draining gets no new request


class Route(NamedTuple):
    """A routing decision."""

    replica: int  # index of the chosen replica among the views the router was given
    feasible: bool | None  # whether the planner found the request feasible there (None: not checked)


class NoHealthyReplicaError(RuntimeError):
    """Every replica is unhealthy: the request has nowhere to go."""


class Router(ABC):
    """Picks the replica of each new request.

    Rules for callers: call ``route`` once per request (a program's stage call) as it arrives, with
    a view of every replica, always in the same order (the index names the replica); for a later
    stage of a program pass ``home``, the replica that served its previous stage. A router never
    picks an unhealthy replica and raises ``NoHealthyReplicaError`` when every replica is one.
    """

    name: str

    @abstractmethod
    def route(self, now: float, new: LiveRequest, replicas: Sequence[ReplicaView], home: int | None = None) -> Route:
        """The replica for ``new``, arriving at ``now``."""


def _healthy(replicas: Sequence[ReplicaView]) -> list[int]:
    healthy = [index for index, view in enumerate(replicas) if view.healthy]
    if not healthy:
        raise NoHealthyReplicaError(f"none of the {len(replicas)} replicas is healthy")
    return healthy


def _least_loaded(replicas: Sequence[ReplicaView], candidates: list[int]) -> int:
    """The candidate with the fewest unfinished requests; the lowest index among equals."""
    return min(candidates, key=lambda index: replicas[index].load)


class RoundRobinRouter(Router):
    """Replicas in turn, skipping unhealthy ones."""

    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0  # the replica whose turn it is

    def route(self, now: float, new: LiveRequest, replicas: Sequence[ReplicaView], home: int | None = None) -> Route:
        _healthy(replicas)
        count = len(replicas)
        chosen = next(
            index % count for index in range(self._next, self._next + count) if replicas[index % count].healthy
        )
        self._next = (chosen + 1) % count
        return Route(chosen, None)


class LeastLoadedRouter(Router):
    """The healthy replica with the fewest unfinished requests."""

    name = "least-loaded"

    def route(self, now: float, new: LiveRequest, replicas: Sequence[ReplicaView], home: int | None = None) -> Route:
        return Route(_least_loaded(replicas, _healthy(replicas)), None)


class SLORouter(Router):
    """Feasible with the most slack, from each replica's planner; program stages stay together.

    Slack is the first-token deadline minus the planner's predicted first-token time there; equal
    slack (no TTFT target) goes to the less loaded replica.
    """

    name = "slo"

    def __init__(self, affinity: bool = True) -> None:
        self.affinity = affinity  # a later stage stays on its program's replica while feasible there

    def route(self, now: float, new: LiveRequest, replicas: Sequence[ReplicaView], home: int | None = None) -> Route:
        healthy = _healthy(replicas)
        if self.affinity and home is not None and home in healthy and self._feasible(now, new, replicas[home]):
            return Route(home, True)
        best, best_key = None, (-math.inf, 0)
        for index in healthy:
            view = replicas[index]
            if not self._feasible(now, new, view):
                continue
            slack = new.state.first_token_deadline - view.planner.first_token_time(now, new, view.admitted)
            key = (slack, -view.load)
            if best is None or key > best_key:
                best, best_key = index, key
        if best is None:
            return Route(_least_loaded(replicas, healthy), False)
        return Route(best, True)

    @staticmethod
    def _feasible(now: float, new: LiveRequest, view: ReplicaView) -> bool:
        return view.planner.admit(now, new, view.admitted).admitted


ROUTERS: dict[str, type[Router]] = {router.name: router for router in (SLORouter, RoundRobinRouter, LeastLoadedRouter)}


def make_router(name: str) -> Router:
    """A new router registered as ``name`` (routers keep state, e.g. whose turn it is: one per cluster)."""
    try:
        router = ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; choose from {', '.join(ROUTERS)}") from None
    return router()
