"""What the measuring commands share: their options, errors and output; and `sloserve overhead`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from sloserve_runtime.core.step_time import DEFAULT_PROFILE, engine_profile, resolve_profile
from sloserve_runtime.measure.plots import attainment_and_ttft
from sloserve_runtime.measure.runs import Measurement
from sloserve_runtime.sim import SimConfig
from sloserve_runtime.workload.scenarios import SCENARIO_NAMES, load_scenario
from sloserve_runtime.workload.scenarios import Scenario as ScenarioSpec

console = Console(width=None if sys.stdout.isatty() else 200)
ENGINE_PROFILE = engine_profile().stem  # what `sloserve serve` plans with on this CPU

Scenario = Annotated[
    str, typer.Option(help=f"One of {', '.join(SCENARIO_NAMES)}, or the path of a scenario file (.yaml).")
]
Rate = Annotated[float | None, typer.Option(help="Programs per second.")]
Rates = Annotated[str | None, typer.Option(help="A sweep: comma-separated rates.")]
Capacity = Annotated[bool, typer.Option(help="Search the highest rate with >= 90 % attainment.")]
NumRequests = Annotated[int, typer.Option(help="Programs per run (a flat request is a program of one stage).")]
Seed = Annotated[int, typer.Option(help="Seed of the trace: the same seed gives the same trace.")]
SloScale = Annotated[
    float, typer.Option(help="Multiply every target in ms: TPOT, and TTFT where not a slowdown (slower hardware).")
]
LengthScale = Annotated[float, typer.Option(help="Multiply every prompt and output length.")]
JsonOut = Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")]
StepNoise = Annotated[
    float,
    typer.Option(
        min=0.0,
        help="The simulated engine's steps stray from the profile: each takes its time times exp(x), x an "
        "AR(1) process with this standard deviation (0: exact; the CPU engine's step logs show 0.08-0.15).",
    ),
]
StepNoiseCorrelation = Annotated[
    float,
    typer.Option(min=0.0, max=0.99, help="How much of a step's error carries to the next (the CPU engine's: 0.5-0.8)."),
]
FrontendInMs = Annotated[
    float,
    typer.Option(
        min=0.0,
        help="The simulated front end: a call reaches the engine this many ms after the client sent it "
        "(docs/scripts/frontend_delay.py measures it from a bench run and the server's step log).",
    ),
]
FrontendOutMs = Annotated[
    float,
    typer.Option(min=0.0, help="The simulated front end: a token reaches the client this many ms after the engine."),
]
Duration = Annotated[
    float | None,
    typer.Option(
        min=1.0,
        help="Seconds of arrivals at every rate (the programs are the rate times it), instead of "
        "--num-requests programs: a sustained load, as long at 3x capacity as at 1x.",
    ),
]
MaxQueuedBestEffort = Annotated[
    int,
    typer.Option(
        min=-1,
        help="Best-effort requests that may wait to start at once; past it, a request the planner cannot "
        "promise gets HTTP 429 with Retry-After, as in reject mode (-1: no bound, as vLLM's queue).",
    ),
]
PlotOut = Annotated[Path | None, typer.Option("--plot", help="Write attainment-vs-rate and TTFT CDF plots here.")]


class MeasureError(ValueError):
    """A bad combination of options; the message says which."""


def queue_bound(max_queued_best_effort: int) -> int | None:
    """``--max-queued-best-effort`` as the server and simulator take it: -1 (Ray Serve's "no limit") is None."""
    return None if max_queued_best_effort < 0 else max_queued_best_effort


def check_duration(duration: float | None, capacity: bool) -> None:
    if duration is not None and capacity:
        raise MeasureError("--duration sets the programs of each rate: give --rate or --rates, not --capacity")


def rates_of(rate: float | None, rates: str | None, capacity: bool) -> list[float] | None:
    given = [rate is not None, rates is not None, capacity]
    if sum(given) != 1:
        raise MeasureError("give exactly one of --rate, --rates or --capacity")
    if rates is not None:
        try:
            parsed = [float(value) for value in rates.split(",") if value.strip()]
        except ValueError:
            raise MeasureError(f"--rates {rates!r}: expected comma-separated numbers like 0.5,1,2") from None
        rate_list = parsed
    else:
        rate_list = [rate] if rate is not None else []
    if any(value <= 0 for value in rate_list):
        raise MeasureError("rates must be positive")
    return rate_list or None


def parse_names(option: str, value: str, known: dict) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        shown = ",".join(unknown) if unknown else repr(value)
        raise MeasureError(f"{option} {shown}: unknown; choose from {', '.join(known)}")
    return names


def parse_counts(option: str, values: str, minimum: int) -> list[int]:
    """Comma-separated whole numbers, each at least ``minimum``, in the order given, once each."""
    try:
        counts = [int(value) for value in values.split(",") if value.strip()]
    except ValueError:
        raise MeasureError(f"{option} {values!r}: expected whole numbers like {minimum},{minimum + 1}") from None
    if not counts or min(counts) < minimum:
        raise MeasureError(f"{option} {values!r}: every count must be at least {minimum}")
    return list(dict.fromkeys(counts))


def scenario_of(name: str) -> ScenarioSpec:
    try:
        return load_scenario(name)
    except ValueError as exc:
        raise MeasureError(str(exc)) from None


def profile_config(path: str, option: str = "--profile") -> SimConfig:
    try:
        return SimConfig.from_profile(resolve_profile(path, option))
    except ValueError as exc:
        raise MeasureError(str(exc)) from None


def progress_columns() -> tuple:
    return (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def plot_results(path: Path, title: str, rows: list[tuple[str, str, Measurement]]) -> None:
    attainment, goodput = {}, {}
    for scenario, label, measurement in rows:
        attainment[f"{scenario}/{label}"] = [(rate, summary.program_attainment) for rate, summary in measurement.probes]
        goodput[f"{scenario}/{label}"] = [(rate, summary.goodput_rps) for rate, summary in measurement.probes]
    ttfts: dict[str, list[float]] = {}
    for scenario, label, measurement in rows:
        rate, _ = measurement.headline
        results = measurement.results_at.get(rate, [])
        ttfts[f"{scenario}/{label} @ {rate:.3g}/s"] = [
            (r.token_times[0] - r.arrival) * 1000 for r in results if r.token_times
        ]
    attainment_and_ttft(path, title, attainment, ttfts, goodput)
    console.print(f"Wrote {path}")


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")
    console.print(f"Wrote {path}")


def overhead_command(
    profile: Annotated[str, typer.Option(help="A bundled profile name or a profile JSON path.")] = str(DEFAULT_PROFILE),
    live: Annotated[str, typer.Option(help="Comma-separated numbers of live requests.")] = "64,512,2048",
    repeats: Annotated[int, typer.Option(min=1, help="Planning calls timed per size.")] = 200,
) -> None:
    """Time one planning call (admission, and one step's promotion, demotion, budget, hold-back) at N requests."""
    from sloserve_runtime.measure.overhead import measure_overhead

    try:
        sizes = [int(value) for value in live.split(",")]
    except ValueError:
        raise MeasureError(f"--live {live!r}: give whole numbers separated by commas, e.g. 64,512,2048") from None
    if not sizes or min(sizes) < 1:
        raise MeasureError(f"--live {live!r}: every size must be at least 1")
    step_time = profile_config(profile).step_time
    table = Table(title=f"Planning overhead, policy sloserve, profile {step_time.name} (ms, median of {repeats})")
    columns = (
        "live requests",
        "admission",
        "full admission check",
        "step (promotion, demotion, budget, hold-back)",
        "total",
        "p99 total",
        "forward simulation, every prefill",
        "hold-back for a waiting prompt, TTFT only",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for size in sizes:
        result = measure_overhead(step_time, size, repeats)
        figures = (
            result.admit_ms, result.full_check_ms, result.step_ms, result.total_ms, result.p99_ms, result.walk_ms,
            result.yield_ms,
        )  # fmt: skip
        table.add_row(str(size), *(f"{value:.3f}" for value in figures))
    console.print(table)
