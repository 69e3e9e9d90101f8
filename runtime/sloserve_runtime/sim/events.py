"""Simulation events: each handles itself against the simulation and returns the events it causes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

from sloserve_runtime.sim.cluster import Cluster, Replica
from sloserve_runtime.sim.engine import Batch
from sloserve_runtime.sim.request import SimRequest
from sloserve_runtime.sim.stages import StageCalls


class Simulation(Protocol):
    """What an event acts on: the trace's stage calls and the cluster that serves them (``loop.Simulation``)."""

    cluster: Cluster
    stages: StageCalls


class Event(ABC):
    """Something that happens at ``time`` (simulated seconds from the start of the trace)."""

    time: float

    @abstractmethod
    def handle(self, sim: Simulation) -> list[Event]:
        """Apply the event; return the events it schedules (none earlier than ``time``)."""


@dataclass(frozen=True)
class StageArrival(Event):
    """A client sends a stage call: a program's first stage, or the next one after a finished stage."""

    time: float
    program_index: int  # position of the program in the trace
    stage_index: int  # which of its stages

    def handle(self, sim: Simulation) -> list[Event]:
        events: list[Event] = []
        for stage_index in sim.stages.group_of(self.program_index, self.stage_index):  # a fan-out goes at once
            request = sim.stages.start(self.program_index, stage_index, self.time)
            if request is None:
                continue
            frontend = sim.stages.config.frontend_in_seconds
            if frontend > 0:
                events.append(EngineArrival(self.time + frontend, request))
            else:
                events.extend(EngineArrival(self.time, request).handle(sim))
        return events


@dataclass(frozen=True)
class EngineArrival(Event):
    """A stage call comes through the front end to the cluster."""

    time: float
    request: SimRequest

    def handle(self, sim: Simulation) -> list[Event]:
        replica = sim.cluster.place(self.request, self.time)
        if replica.stepping:
            # vLLM's engine core adds the requests that came in during a step before it schedules
            # the next one: admission runs then, between steps.
            replica.arrived.append(self.request)
            return []
        replica.engine.add(self.request, self.time)
        # An idle engine wakes up at once, as vLLM's busy loop does when a request comes in.
        replica.stepping = True
        return [EngineStep(self.time, replica)]


@dataclass(frozen=True)
class EngineStep(Event):
    """A replica's engine is free: it forms the next batch, or goes idle when there is no work."""

    time: float
    replica: Replica

    def handle(self, sim: Simulation) -> list[Event]:
        engine = self.replica.engine
        for request in self.replica.arrived:
            engine.add(request, self.time)
        self.replica.arrived.clear()
        batch = engine.schedule(self.time)
        if batch is None:
            if engine.has_work:
                raise RuntimeError(f"simulated engine stalled at t={self.time:.3f}s: the policy gave no token budget")
            self.replica.stepping = False
            return []
        return [StepDone(self.time + batch.seconds, self.replica, batch)]


@dataclass(frozen=True)
class StepDone(Event):
    """A batch finishes: tokens come out, finished stages send their program's next stage."""

    time: float
    replica: Replica
    batch: Batch

    def handle(self, sim: Simulation) -> list[Event]:
        events: list[Event] = []
        for request in self.replica.engine.complete(self.batch, self.time):
            following = sim.stages.next_stage(request, self.time)
            if following is not None:
                arrival, stage_index = following
                events.append(StageArrival(arrival, request.program_index, stage_index))
        events.append(EngineStep(self.time, self.replica))
        return events
