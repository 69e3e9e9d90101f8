"""Our routers as a Ray Serve request router: which engine replica gets each completion call.

``SLORequestRouter`` is a ``ray.serve.request_router.RequestRouter``. For a call from the ingress
(a ``RoutedCall``) it builds a ``ReplicaView`` of each candidate replica and asks a router of
``core/router.py`` (``slo`` by default) for one. A replica's view is what it last reported in its
routing stats (``EngineReplica.record_routing_stats``: its requests in flight, with their SLOs
and output so far) together with the calls this router sent it since and that have not ended,
so a burst between two reports is not routed blind. A program's later call goes to the replica
of its earlier ones while that one is a candidate (``home``), which holds the run's context: its
view counts the prompt of the run's last call as cached there. Other calls (``models``) take any
replica.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from sloserve.slo import SLO
from sloserve_runtime.cluster.replica import RoutedCall
from sloserve_runtime.core.planner import LiveRequest, Planner
from sloserve_runtime.core.router import NoHealthyReplicaError, RecentWork, ReplicaView, make_router
from sloserve_runtime.core.slo_state import SLORequestState
from sloserve_runtime.core.step_time import StepTimeModel

PROGRAMS_REMEMBERED = 10_000  # program runs whose replica the router remembers, for affinity


def live_request(entry: dict[str, Any], step_time: StepTimeModel) -> LiveRequest:
    """A request in a replica's routing stats, as the planner weighs it: prefilling until its
    first output, then decoding."""
    slo = SLO.parse(entry["slo"].get("ttft_ms"), entry["slo"].get("tpot_ms"))
    prompt, output = int(entry["prompt_tokens"]), int(entry["output_tokens"])
    state = SLORequestState.create(entry["id"], slo, float(entry["arrival"]), prompt, step_time)
    if output == 0:
        return LiveRequest(state, prompt, 0)
    return LiveRequest(state, 1, prompt + output)


class SLORequestRouter(RequestRouter):
    """Routes with a ``core/router.py`` router over the replicas' planner views."""

    def initialize_state(
        self, router: str = "slo", profile: str | None = None, max_num_batched_tokens: int = 512, **kwargs: Any
    ) -> None:
        self.step_time = StepTimeModel.load(profile) if profile else StepTimeModel.load()
        self.max_num_batched_tokens = max_num_batched_tokens
        self.router = make_router(router)
        self.planners: dict[ReplicaID, Planner] = {}
        self.sent: dict[ReplicaID, dict[str, dict[str, Any]]] = {}  # calls routed here and not ended
        # program run -> (replica of its last call, that call's prompt tokens: its cache there)
        self.homes: OrderedDict[str, tuple[ReplicaID, int]] = OrderedDict()
        self.recent = RecentWork()  # new prompt tokens sent to each replica lately
        self.ids: dict[str, tuple[ReplicaID, str]] = {}  # Serve's internal id -> (replica, our id)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        call = _call_of(pending_request)
        if call is None or len(candidate_replicas) < 2:
            return [candidate_replicas]
        now = time.time()
        home_id, cached = self.homes.get(call.program, (None, 0)) if call.program else (None, 0)
        cached = min(cached, call.prompt_tokens)
        views = [
            self.view(replica, now, cached if replica.replica_id == home_id else 0) for replica in candidate_replicas
        ]
        new = live_request(call.stats_entry(0), self.step_time)
        ids = [replica.replica_id for replica in candidate_replicas]
        home = ids.index(home_id) if home_id in ids else None
        try:
            chosen = self.router.route(now, new, views, home=home).replica
        except NoHealthyReplicaError:
            return [candidate_replicas]
        self.recent.add(ids[chosen], call.prompt_tokens - views[chosen].cached_tokens, now)
        # Counted there from now on (Serve calls ``on_request_routed`` only where replicas may reject
        # a call); the chosen one first, the rest after it should Serve find it full.
        self._sent_to(ids[chosen], call, pending_request)
        rest = [replica for index, replica in enumerate(candidate_replicas) if index != chosen]
        return [[candidate_replicas[chosen]], rest]

    def view(self, replica: RunningReplica, now: float, cached_tokens: int = 0) -> ReplicaView:
        reported = {entry["id"]: entry for entry in (replica.routing_stats or {}).get("in_flight", [])}
        sent = self.sent.get(replica.replica_id, {})
        entries = {**sent, **reported}  # the replica's own account wins for the calls it has seen
        planner = self.planners.setdefault(replica.replica_id, Planner(self.step_time, self.max_num_batched_tokens))
        admitted = [live_request(entry, self.step_time) for entry in entries.values()]
        recent = self.recent.of(replica.replica_id, now)
        return ReplicaView(planner, admitted, load=len(entries), cached_tokens=cached_tokens, recent_tokens=recent)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        call = _call_of(pending_request)
        if call is not None:
            self._sent_to(replica_id, call, pending_request)

    def _sent_to(self, replica_id: ReplicaID, call: RoutedCall, pending_request: PendingRequest) -> None:
        internal = pending_request.metadata.internal_request_id
        earlier = self.ids.get(internal)
        if earlier is not None:  # routed again (a retry) or to another replica than chosen
            self.sent.get(earlier[0], {}).pop(earlier[1], None)
        self.sent.setdefault(replica_id, {})[call.request_id] = call.stats_entry(0)
        self.ids[internal] = (replica_id, call.request_id)
        if call.program:
            self.homes[call.program] = (replica_id, call.prompt_tokens)
            self.homes.move_to_end(call.program)
            while len(self.homes) > PROGRAMS_REMEMBERED:
                self.homes.popitem(last=False)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        routed = self.ids.pop(internal_request_id, None)
        if routed is not None:
            self.sent.get(routed[0], {}).pop(routed[1], None)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.sent.pop(replica_id, None)
        self.planners.pop(replica_id, None)
        self.recent.forget(replica_id)


def _call_of(pending_request: PendingRequest | None) -> RoutedCall | None:
    if pending_request is None:
        return None
    return next((arg for arg in pending_request.args if isinstance(arg, RoutedCall)), None)
