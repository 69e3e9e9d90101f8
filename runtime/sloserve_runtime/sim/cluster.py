"""The simulated cluster: K independent engines and the router that places each stage call."""

from __future__ import annotations

from dataclasses import dataclass, field

from sloserve_runtime.core.planner import Planner
from sloserve_runtime.core.policies import PlannerPolicy, make_policy
from sloserve_runtime.core.router import RecentWork, ReplicaView, make_router
from sloserve_runtime.sim.config import SimConfig
from sloserve_runtime.sim.engine import Engine
from sloserve_runtime.sim.request import SimRequest


@dataclass(eq=False)
class Replica:
    """One engine of the cluster, with its own policy instance, and the state of its step loop."""

    index: int  # the replica's place in the cluster, as the router names it
    engine: Engine
    planner: Planner  # what the router asks about feasibility: the policy's own planner where it has one
    stepping: bool = False  # whether a step is under way or due (else the engine idles)
    # Requests placed here during the step under way: the engine adds them when it ends.
    arrived: list[SimRequest] = field(default_factory=list)

    def view(self, request: SimRequest | None = None, recent_tokens: float = 0.0) -> ReplicaView:
        """What the router knows of this replica: its admitted requests and those placed here that
        its engine takes at the end of the step under way (the front end's router counts the calls
        it sent since the replica's last report the same way); with ``request``, also the prompt
        tokens of it that this replica's prefix cache holds now (looked up, not claimed: the cache
        is left as it was)."""
        engine = self.engine
        admitted = [other.live() for other in engine.admitted.values()]
        admitted += [other.live() for other in self.arrived]
        load = len(engine.running) + len(engine.waiting) + len(self.arrived)
        cached = 0 if request is None else engine.kv.hit_tokens(request.program_index, request.cache_limit)
        policy = engine.policy
        reserved = policy.reserved_decodes() if isinstance(policy, PlannerPolicy) and policy.program_aware else None
        return ReplicaView(
            self.planner, admitted, load=load, cached_tokens=cached, recent_tokens=recent_tokens, reserved=reserved
        )


class Cluster:
    """K replicas of one engine config under one policy; a router places every stage call.

    A later stage of a program is routed with the replica of its previous stage as its home.
    With one replica there is nothing to decide and the router is not called.
    """

    def __init__(self, policy_name: str, config: SimConfig, replicas: int = 1, router: str = "slo") -> None:
        if replicas < 1:
            raise ValueError(f"a cluster needs at least one replica (got {replicas})")
        self.router = make_router(router)
        self.replicas = [self._replica(index, policy_name, config) for index in range(replicas)]
        self._homes: dict[int, int] = {}  # program index -> replica of its latest stage call
        self.recent = RecentWork()  # new prompt tokens routed to each replica lately
        self.infeasible_routes = 0  # stage calls no replica could take within their SLO

    def place(self, request: SimRequest, now: float) -> Replica:
        """The replica that gets ``request``, arriving at ``now``."""
        if len(self.replicas) == 1:
            return self.replicas[0]
        views = [replica.view(request, self.recent.of(replica.index, now)) for replica in self.replicas]
        route = self.router.route(now, request.live(), views, self._homes.get(request.program_index))
        self.recent.add(route.replica, max(0, request.state.prompt_tokens - views[route.replica].cached_tokens), now)
        self._homes[request.program_index] = route.replica
        self.infeasible_routes += route.feasible is False
        return self.replicas[route.replica]

    @staticmethod
    def _replica(index: int, policy_name: str, config: SimConfig) -> Replica:
        policy = make_policy(
            policy_name, config.scheduler_step_time, config.batched_tokens, config.max_spec_length, config.calibrate,
            max_running=config.max_num_seqs, kv_capacity_tokens=config.kv_capacity_blocks * config.block_size,
        )  # fmt: skip
        # Policies without a planner still get one for routing: its feasibility is the router's estimate.
        if isinstance(policy, PlannerPolicy):
            planner = policy.planner
        else:
            planner = Planner(config.scheduler_step_time, config.batched_tokens)
        return Replica(index, Engine(policy, config, seed=index), planner)
