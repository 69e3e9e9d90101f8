"""Routers: which engine replica gets a new request. Imports no vLLM and no Ray.

A router decides from a ``ReplicaView`` of each replica, the summary a replica publishes: its
planner, its admitted requests and its load. The simulator's cluster and a serving front end call
the same routers. Routers are registered by name in ``ROUTERS``:

* ``slo`` — among the replicas where the planner finds the request feasible (its prefill spared
  what each one's cache holds), the one sent the least new prompt work lately; a later stage of a
  program stays on the replica that served the earlier ones (it holds their prefix) while it is
  feasible there. When no replica is feasible, the least loaded gets it, and its own admission
  makes it best effort there.
* ``round-robin`` and ``least-loaded`` — the baselines.
* ``power-of-two`` and ``prefix-affinity`` — Ray Serve's baselines: its default request router
  (``PowerOfTwoChoicesRequestRouter``) and Ray Serve LLM's ``PrefixCacheAffinityRouter``, each
  reduced to its rule on queue lengths (and prefix matches), as their docstrings say.

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
import random
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
    # The new request's prompt tokens this replica already holds (its longest cached prefix), as
    # the replica's prefix cache or a router's prefix tree knows them; 0 where nobody says.
    cached_tokens: int = 0
    # The new prompt tokens routed to it lately (``RecentWork``): the work its recent calls and the
    # runs they started still bring.
    recent_tokens: float = 0.0
    # The decodes (tiers, count, context) its admitted program runs between calls will bring back
    # (``ProgramBook``'s reservations): work it has promised that is not in flight. None: none known.
    reserved: tuple[frozenset[float], int, int] | None = None


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
    """Feasible first, then balanced by recent work; program stages stay together.

    A replica is a candidate where its planner finds the request feasible beside its admitted
    requests and the decodes its program runs between calls will bring back, the request's prefill
    spared what that replica's cache holds of its prompt (``ReplicaView.cached_tokens``). Among the
    candidates the request goes to the one sent the least new prompt work lately
    (``ReplicaView.recent_tokens``), the less loaded on a tie. Picking the candidate with the most
    slack instead (the first-token deadline minus the planner's prediction) was the rule before:
    it sends a burst of new runs to the replica that is momentarily idle, whose runs' later calls
    then come back together, and lost to round-robin and to Ray Serve LLM's prefix-affinity router
    in the simulator (``docs/benchmarks.md``, "Routers").
    """

    name = "slo"

    def __init__(self, affinity: bool = True) -> None:
        self.affinity = affinity  # a later stage stays on its program's replica while feasible there

    def route(self, now: float, new: LiveRequest, replicas: Sequence[ReplicaView], home: int | None = None) -> Route:
        healthy = _healthy(replicas)
        if self.affinity and home is not None and home in healthy and self._feasible(now, new, replicas[home]):
            return Route(home, True)
        feasible = [index for index in healthy if self._feasible(now, new, replicas[index])]
        if not feasible:
            return Route(_least_loaded(replicas, healthy), False)
        return Route(min(feasible, key=lambda index: (replicas[index].recent_tokens, replicas[index].load)), True)

    @staticmethod
    def _feasible(now: float, new: LiveRequest, view: ReplicaView) -> bool:
        return view.planner.admit(now, _there(new, view), view.admitted, None, view.reserved).admitted


class RecentWork:
    """The new prompt tokens routed to each replica lately, decayed with a half-life: what a router's
    caller keeps for ``ReplicaView.recent_tokens`` (keyed by whatever names a replica)."""

    HALF_LIFE_S = 10.0

    def __init__(self, half_life_s: float = HALF_LIFE_S) -> None:
        self.half_life_s = half_life_s
        self.tokens: dict[object, tuple[float, float]] = {}  # replica -> (tokens, as of when)

    def of(self, replica: object, now: float) -> float:
        tokens, then = self.tokens.get(replica, (0.0, now))
        return tokens * 0.5 ** (max(0.0, now - then) / self.half_life_s)

    def add(self, replica: object, tokens: float, now: float) -> None:
        self.tokens[replica] = (self.of(replica, now) + tokens, now)

    def forget(self, replica: object) -> None:
        self.tokens.pop(replica, None)


def _there(new: LiveRequest, view: ReplicaView) -> LiveRequest:
    """The request as the replica would run it: its prefill spared the prompt tokens that replica's
    cache holds (a program's context, on the replica that served its earlier calls)."""
    if new.context or not view.cached_tokens:
        return new
    return new._replace(to_compute=max(1, new.to_compute - view.cached_tokens))


def _two_choices(rng: random.Random, candidates: Sequence[int]) -> list[int]:
    """Ray Serve's sample for the power of two choices: two distinct candidates in random order
    (one when there is one), drawn as ``PowerOfTwoChoicesRequestRouter.choose_replicas`` draws them."""
    count = len(candidates)
    if count == 1:
        return [candidates[0]]
    if count == 2:
        return [candidates[0], candidates[1]] if rng.getrandbits(1) else [candidates[1], candidates[0]]
    first, second = rng.randrange(count), rng.randrange(count - 1)
    if second >= first:
        second += 1
    return [candidates[first], candidates[second]]


def _shortest_queue(replicas: Sequence[ReplicaView], chosen: Sequence[int]) -> int:
    """The chosen replica with the shortest queue; the first chosen among equals (Ray's strict ``<``)."""
    return min(chosen, key=lambda index: replicas[index].load)


class PowerOfTwoRouter(Router):
    """Ray Serve's default request router (``PowerOfTwoChoicesRequestRouter``), on queue lengths.

    Two distinct healthy replicas are sampled at random (Ray's draw, from a seeded
    ``random.Random``: the same seed routes a trace the same way) and the request goes to the one
    with the shorter queue (``ReplicaView.load``), the first sampled on a tie.

    Left out of Ray's router: its locality and model-multiplexing preferences (which replicas are
    sampled from), the queue-length probes (here the load is known exactly, as of the arrival),
    the ``max_ongoing_requests`` cap (a replica at it refuses, and Ray samples again after a
    backoff: here every replica accepts), and the FIFO order of requests waiting to be routed.
    """

    name = "power-of-two"

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def route(self, now: float, new: LiveRequest, replicas: Sequence[ReplicaView], home: int | None = None) -> Route:
        return Route(_shortest_queue(replicas, _two_choices(self.rng, _healthy(replicas))), None)


class PrefixAffinityRouter(Router):
    """Ray Serve LLM's ``PrefixCacheAffinityRouter``, on queue lengths and prefix matches.

    Its rule (Ray 2.60's ``_prefix_match_best_replicas``), with Ray's defaults:

    * when the load is imbalanced, the longest queue more than ``imbalanced_threshold`` requests
      longer than the shortest (Ray's default: infinity, so never), power of two choices;
    * else, when the longest prefix match is at least ``match_rate_threshold`` of the prompt (Ray's
      default: 0.1), the replicas holding that longest match; when it is shorter, the *smallest
      tenants*: the replicas whose share of Ray's prefix tree is the smallest;
    * among the replicas so chosen, the one with the shortest queue, the first on a tie.

    The prefix match is ``ReplicaView.cached_tokens`` over the prompt. The tree's share of a replica
    is counted here: the prompt tokens routed to it that it did not hold (the tokens Ray's tree
    inserts for it, in tokens rather than characters); Ray's tree evicts nothing by default, and
    neither does this count.

    Left out, as for ``power-of-two``: the locality and multiplexing preferences, the queue-length
    probes, ``max_ongoing_requests`` and the FIFO order. The match is the replica's own cache as
    of the arrival (``cached_tokens``), where Ray's tree remembers every prompt it routed, evicted
    by the engine or not, and matches text across requests, where the simulator's cache shares
    prefixes only within a program run.
    """

    name = "prefix-affinity"
    IMBALANCED_THRESHOLD = math.inf  # Ray's default ``imbalanced_threshold``
    MATCH_RATE_THRESHOLD = 0.1  # Ray's default ``match_rate_threshold``

    def __init__(
        self, seed: int = 0, imbalanced_threshold: float = IMBALANCED_THRESHOLD,
        match_rate_threshold: float = MATCH_RATE_THRESHOLD,
    ) -> None:  # fmt: skip
        self.rng = random.Random(seed)
        self.imbalanced_threshold = imbalanced_threshold
        self.match_rate_threshold = match_rate_threshold
        # Replica index -> prompt tokens its part of the tree holds (never evicted: no decay).
        self.tree = RecentWork(half_life_s=math.inf)

    def route(self, now: float, new: LiveRequest, replicas: Sequence[ReplicaView], home: int | None = None) -> Route:
        healthy = _healthy(replicas)
        # Ray draws the power-of-two sample first, whether it falls back to it or not.
        chosen = _two_choices(self.rng, healthy)
        loads = [replicas[index].load for index in healthy]
        if max(loads) - min(loads) <= self.imbalanced_threshold:
            longest = max(replicas[index].cached_tokens for index in healthy)
            prompt = max(new.state.prompt_tokens, 1)
            if longest > 0 and longest / prompt >= self.match_rate_threshold:
                chosen = [index for index in healthy if replicas[index].cached_tokens == longest]
            else:
                smallest = min(self.tree.of(index, now) for index in healthy)
                chosen = [index for index in healthy if self.tree.of(index, now) == smallest]
        picked = _shortest_queue(replicas, chosen)
        self.tree.add(picked, max(new.state.prompt_tokens - replicas[picked].cached_tokens, 0), now)
        return Route(picked, None)


ROUTERS: dict[str, type[Router]] = {
    router.name: router
    for router in (SLORouter, RoundRobinRouter, LeastLoadedRouter, PowerOfTwoRouter, PrefixAffinityRouter)
}


def make_router(name: str) -> Router:
    """A new router registered as ``name`` (routers keep state, e.g. whose turn it is: one per cluster)."""
    try:
        router = ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; choose from {', '.join(ROUTERS)}") from None
    return router()
