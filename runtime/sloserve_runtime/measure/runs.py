"""Runs behind `sloserve simulate` and `sloserve bench`: one rate, a sweep, or a capacity search."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.progress import Progress

from sloserve_runtime.core.slo_state import BEST_EFFORT, REJECT
from sloserve_runtime.measure.bench import Endpoint, replay
from sloserve_runtime.measure.capacity import find_capacity
from sloserve_runtime.measure.server_stats import ServerStats, sample_while, summarize_samples
from sloserve_runtime.measure.summary import Summary, summarize
from sloserve_runtime.sim import SimConfig, simulate
from sloserve_runtime.workload.programs import ProgramSpec, StageResult
from sloserve_runtime.workload.scenarios import Scenario


@dataclass(frozen=True)
class TraceOptions:
    """How a scenario becomes a trace; the same options give the same trace."""

    num_programs: int = 200
    seed: int = 0
    slo_scale: float = 1.0  # stretches every TPOT target, for slower hardware
    length_scale: float = 1.0  # multiplies every prompt and output length
    max_model_len: int | None = None  # clips each call to fit the model's context
    # Arrivals span this long at every rate (the programs are the rate times it, at least one),
    # instead of ``num_programs`` at each: a sustained load lasts as long at 3x as at 1x.
    duration_s: float | None = None

    def programs_at(self, rate: float) -> int:
        return self.num_programs if self.duration_s is None else max(1, math.ceil(rate * self.duration_s))

    def trace(self, scenario: Scenario, rate: float) -> list[ProgramSpec]:
        return scenario.trace(
            rate, self.programs_at(rate), seed=self.seed, slo_scale=self.slo_scale,
            length_scale=self.length_scale, max_model_len=self.max_model_len,
        )  # fmt: skip


@dataclass
class Measurement:
    """The outcome of one target (a scheduler in the simulator, or an endpoint) at one or more rates."""

    label: str
    probes: list[tuple[float, Summary]] = field(default_factory=list)  # (rate, summary), in probe order
    capacity_rps: float | None = None  # set by a capacity search; the whole cluster's rate
    results_at: dict[float, list[StageResult]] = field(default_factory=dict)  # raw results per rate
    # What the server went through in each probe, in probe order (a bench run; None: no /metrics).
    server_stats: list[ServerStats | None] = field(default_factory=list)
    replicas: int = 1  # engine replicas the rates were spread over
    router: str | None = None  # the router in front of them (None: one replica, nothing to route)

    @property
    def capacity_per_replica_rps(self) -> float | None:
        return None if self.capacity_rps is None else self.capacity_rps / self.replicas

    def at(self, rate: float) -> Summary:
        return next(summary for probed, summary in reversed(self.probes) if probed == rate)

    @property
    def headline(self) -> tuple[float, Summary]:
        """The capacity probe if there was a search, else the last rate run."""
        if self.capacity_rps:
            return self.capacity_rps, self.at(self.capacity_rps)
        return self.probes[-1]


def run_label(policy: str, drafts: int = 0, admission: str = BEST_EFFORT) -> str:
    """A simulated scheduler's name in tables and JSON: ``sloserve+spec4+reject`` and the like."""
    return policy + (f"+spec{drafts}" if drafts else "") + ("+reject" if admission == REJECT else "")


Runner = Callable[[list[ProgramSpec]], tuple[list[StageResult], float]]


def measure(
    label: str,
    run: Runner,
    scenario: Scenario,
    options: TraceOptions,
    rates: list[float] | None,
    capacity_start: float | None,
    keep_results: bool = False,
    replicas: int = 1,
    router: str | None = None,
) -> Measurement:
    """Run the trace at each rate, or search the capacity starting from ``capacity_start``.

    ``replicas`` and ``router`` only label the measurement: ``run`` is what serves the trace.
    """
    measurement = Measurement(label, replicas=replicas, router=router)

    def attainment_at(rate: float) -> float:
        results, duration = run(options.trace(scenario, rate))
        summary = summarize(results, duration)
        measurement.probes.append((rate, summary))
        if keep_results:
            measurement.results_at[rate] = results
        return summary.program_attainment

    if capacity_start is not None:
        measurement.capacity_rps, _ = find_capacity(attainment_at, capacity_start)
    for rate in rates or []:
        attainment_at(rate)
    return measurement


def simulator_runner(policy: str, config: SimConfig, replicas: int = 1, router: str = "slo") -> Runner:
    def run(trace: list[ProgramSpec]) -> tuple[list[StageResult], float]:
        results = simulate(trace, policy, config.step_time, config, replicas, router)
        end = max((t for result in results for t in result.token_times), default=0.0)
        return results, max(end, trace[-1].arrival_s if trace else 0.0)

    return run


def endpoint_runner(
    endpoint: Endpoint,
    config: SimConfig,
    progress: Progress,
    label: str,
    server_stats: list[ServerStats | None] | None = None,
) -> Runner:
    """Replay each trace against ``endpoint``; what its server went through in each run (sampled
    from its ``/metrics``) is added to ``server_stats``, if given."""
    model = endpoint.model_card()["id"]

    async def sampled(trace: list[ProgramSpec], advance: Callable[[], None]) -> tuple[list[StageResult], float]:
        work = asyncio.ensure_future(replay(trace, endpoint, model, config.step_time, advance))
        samples = await sample_while(work, endpoint.base_url, endpoint.headers)
        if server_stats is not None:
            server_stats.append(summarize_samples(samples))
        return await work

    def run(trace: list[ProgramSpec]) -> tuple[list[StageResult], float]:
        task = progress.add_task(f"{label}: {len(trace)} programs", total=len(trace))
        try:
            return asyncio.run(sampled(trace, lambda: progress.advance(task)))
        finally:
            progress.remove_task(task)

    return run
