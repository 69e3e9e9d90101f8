"""The discrete-event loop: a heap of (time, seq, event), each event returning the events it causes."""

from __future__ import annotations

import heapq
from itertools import count

from sloserve_runtime.core.step_time import StepTimeModel
from sloserve_runtime.sim.cluster import Cluster
from sloserve_runtime.sim.config import SimConfig
from sloserve_runtime.sim.engine import Engine
from sloserve_runtime.sim.events import Event, StageArrival
from sloserve_runtime.sim.stages import StageCalls
from sloserve_runtime.workload.programs import ProgramSpec, StageResult


class Simulation:
    """One run of a trace through a cluster of simulated engines (by default one) under one policy."""

    def __init__(
        self, trace: list[ProgramSpec], policy_name: str, config: SimConfig, replicas: int = 1, router: str = "slo"
    ) -> None:
        self.cluster = Cluster(policy_name, config, replicas, router)
        self.stages = StageCalls(trace, config)
        self._events: list[tuple[float, int, Event]] = []
        # Ties in time go in the order events were scheduled, which keeps runs deterministic.
        self._seq = count()
        for index, program in enumerate(trace):
            self._push(StageArrival(program.arrival_s, index, 0))

    def run(self) -> list[StageResult]:
        while self._events:
            _, _, event = heapq.heappop(self._events)
            for caused in event.handle(self):
                self._push(caused)
        return self.stages.results()

    @property
    def engine(self) -> Engine:
        """The first replica's engine: with one replica, the engine."""
        return self.cluster.replicas[0].engine

    def _push(self, event: Event) -> None:
        heapq.heappush(self._events, (event.time, next(self._seq), event))


def simulate(
    trace: list[ProgramSpec],
    policy_name: str,
    step_time: StepTimeModel,
    config: SimConfig | None = None,
    replicas: int = 1,
    router: str = "slo",
) -> list[StageResult]:
    """Replay ``trace`` on a simulated vLLM engine scheduled by the policy ``policy_name``.

    Times in the results are simulated seconds from the start of the trace. ``config`` defaults
    to ``SimConfig.for_step_time(step_time)``; when given, it must carry the same ``step_time``.
    With ``replicas`` > 1 the trace goes to that many such engines, each with its own policy
    instance, and the router named ``router`` (see ``sloserve_runtime.core.router``) places each stage call.

    >>> from sloserve.slo import SLO
    >>> from sloserve_runtime.core.step_time import StepTimeModel, LinearPiece
    >>> from sloserve_runtime.workload.programs import ProgramSpec, StageSpec
    >>> model = StepTimeModel("toy", (LinearPiece(per_token=0.001, constant=0.01),))
    >>> chat = StageSpec("chat", prompt_tokens=100, output_tokens=3, slo=SLO.parse("3x", "50ms"))
    >>> [round(t, 3) for t in simulate([ProgramSpec(0, 0.0, "chatbot", (chat,))], "sloserve", model)[0].token_times]
    [0.11, 0.121, 0.132]
    """
    if config is None:
        config = SimConfig.for_step_time(step_time)
    elif config.step_time != step_time:
        raise ValueError("config.step_time differs from step_time; pass the same model to both")
    return Simulation(trace, policy_name, config, replicas, router).run()
