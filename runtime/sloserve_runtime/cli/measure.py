"""`sloserve simulate` and `sloserve bench`: our figures next to vLLM's stock scheduler, one run each."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sloserve_runtime.core.policies import ALIASES, POLICIES, scheduler_name
from sloserve_runtime.core.router import ROUTERS
from sloserve_runtime.core.slo_state import ADMISSION_MODES, REJECT
from sloserve_runtime.core.step_time import DEFAULT_PROFILE, engine_profile, resolve_profile
from sloserve_runtime.measure.bench import Endpoint
from sloserve_runtime.measure.fidelity import FIDELITY_METRICS, engine_strays, fidelity
from sloserve_runtime.measure.plots import attainment_and_ttft
from sloserve_runtime.measure.results import Job, jobs, run_all, write_results
from sloserve_runtime.measure.runs import Measurement, TraceOptions, endpoint_runner, measure, simulator_runner
from sloserve_runtime.measure.server_stats import ServerStats
from sloserve_runtime.measure.summary import compare
from sloserve_runtime.measure.tables import (
    capacity_ratio_table,
    json_entry,
    results_table,
    routing_table,
    server_table,
    stage_table,
)
from sloserve_runtime.sim import SimConfig
from sloserve_runtime.workload.scenarios import ALL_SCENARIOS, SCENARIO_NAMES, load_scenario
from sloserve_runtime.workload.scenarios import Scenario as ScenarioSpec

console = Console(width=None if sys.stdout.isatty() else 200)
ENGINE_PROFILE = engine_profile().stem  # what `sloserve serve` plans with on this CPU

Scenario = Annotated[str, typer.Option(help=f"One of {', '.join(SCENARIO_NAMES)}.")]
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
PlotOut = Annotated[Path | None, typer.Option("--plot", help="Write attainment-vs-rate and TTFT CDF plots here.")]


class MeasureError(ValueError):
    """A bad combination of options; the message says which."""


def _rates(rate: float | None, rates: str | None, capacity: bool) -> list[float] | None:
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


def _names(option: str, value: str, known: dict) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        shown = ",".join(unknown) if unknown else repr(value)
        raise MeasureError(f"{option} {shown}: unknown; choose from {', '.join(known)}")
    return names


def _scheduler_names(value: str) -> list[str]:
    """The registered schedulers ``--scheduler`` names (aliases such as vllm-fcfs resolved)."""
    known = {**POLICIES, **ALIASES}
    return list(dict.fromkeys(scheduler_name(name) for name in _names("--scheduler", value, known)))


def _label(policy: str, drafts: int, admission: str) -> str:
    """A simulated scheduler's name in the tables: ``sloserve+spec4+reject`` and the like."""
    return policy + (f"+spec{drafts}" if drafts else "") + ("+reject" if admission == REJECT else "")


def _counts(option: str, values: str, minimum: int) -> list[int]:
    """Comma-separated whole numbers, each at least ``minimum``, in the order given, once each."""
    try:
        counts = [int(value) for value in values.split(",") if value.strip()]
    except ValueError:
        raise MeasureError(f"{option} {values!r}: expected whole numbers like {minimum},{minimum + 1}") from None
    if not counts or min(counts) < minimum:
        raise MeasureError(f"{option} {values!r}: every count must be at least {minimum}")
    return list(dict.fromkeys(counts))


def _scenario(name: str) -> ScenarioSpec:
    try:
        return load_scenario(name)
    except ValueError as exc:
        raise MeasureError(str(exc)) from None


def _profile(path: str, option: str = "--profile") -> SimConfig:
    try:
        return SimConfig.from_profile(resolve_profile(path, option))
    except ValueError as exc:
        raise MeasureError(str(exc)) from None


def simulate_command(
    scenario: Annotated[str, typer.Option(help=f"One of {', '.join(SCENARIO_NAMES)}, or all.")] = "all",
    profile: Annotated[
        str, typer.Option(help="A profile JSON, or a bundled profile's name (default: this CPU's engine).")
    ] = ENGINE_PROFILE,
    scheduler: Annotated[str, typer.Option(help=f"Comma-separated: {', '.join(POLICIES)}.")] = "sloserve,vllm",
    replicas: Annotated[
        str, typer.Option(help="Engine replicas behind a router; comma-separated counts run each, e.g. 1,2,4,8.")
    ] = "1",
    router: Annotated[
        str, typer.Option(help=f"Comma-separated routers for --replicas > 1: {', '.join(ROUTERS)}.")
    ] = "slo",
    rate: Rate = None,
    rates: Rates = None,
    capacity: Capacity = False,
    num_requests: Annotated[
        int, typer.Option(help="Programs per run and replica: K replicas get a trace of K times as many.")
    ] = 1000,
    seed: Seed = 0,
    slo_scale: SloScale = 1.0,
    length_scale: LengthScale = 1.0,
    speculative_tokens: Annotated[
        str,
        typer.Option(
            help="Drafts a decode may verify per step, as vLLM's num_speculative_tokens (0: off); "
            "comma-separated counts run each, e.g. 0,4. A scheduler run with drafts is labelled name+specN."
        ),
    ] = "0",
    spec_acceptance: Annotated[
        float, typer.Option(help="Chance that each draft is accepted (after all drafts before it were).")
    ] = 0.6,
    planner_profile: Annotated[
        str | None,
        typer.Option(
            help="Give the schedulers this profile (JSON or bundled name) while the engine runs at --profile's "
            "step times: a stale or foreign profile. It also resolves TTFT slowdowns, as a server's profile does."
        ),
    ] = None,
    calibrate: Annotated[
        bool, typer.Option(help="The schedulers refit their profile to the simulated steps, as sloserve serve does.")
    ] = False,
    step_noise: StepNoise = 0.0,
    step_noise_correlation: StepNoiseCorrelation = 0.0,
    frontend_in_ms: FrontendInMs = 0.0,
    frontend_out_ms: FrontendOutMs = 0.0,
    enable_prefix_caching: Annotated[
        bool,
        typer.Option(
            help="vLLM's automatic prefix caching (on by default, as in vLLM): a program's later calls "
            "and preempted requests start from the blocks their program left cached."
        ),
    ] = True,
    admission: Annotated[
        str,
        typer.Option(
            help="What a refused request gets, as `sloserve serve --admission`: best-effort, reject (an HTTP 429, "
            "no engine step), or both, comma-separated; a scheduler run in reject mode is labelled name+reject."
        ),
    ] = "best-effort",
    json_out: JsonOut = None,
    plot: PlotOut = None,
) -> None:
    """Simulate schedulers on scenarios with a step-time profile (the same policy code as the engine).

    With ``--replicas K`` the trace goes to K engines behind a router; rates and ``capacity_rps``
    are the whole cluster's, and the tables also give the capacity per replica. The trace has K
    times the programs, so that at K times the rate it spans the same time (a burst lasts as long
    and holds as many programs per replica) and cluster sizes compare like for like.
    """
    rate_list = _rates(rate, rates, capacity)
    config = _profile(profile)
    if planner_profile is not None:
        config = dataclasses.replace(config, planner_step_time=_profile(planner_profile, "--planner-profile").step_time)
    config = dataclasses.replace(
        config, calibrate=calibrate, enable_prefix_caching=enable_prefix_caching,
        step_noise=step_noise, step_noise_correlation=step_noise_correlation,
        frontend_in_seconds=frontend_in_ms / 1000.0, frontend_out_seconds=frontend_out_ms / 1000.0,
    )  # fmt: skip
    if not 0.0 <= spec_acceptance <= 1.0:
        raise MeasureError(f"--spec-acceptance {spec_acceptance}: give a probability between 0 and 1")
    drafts = _counts("--speculative-tokens", speculative_tokens, minimum=0)
    modes = _names("--admission", admission, dict.fromkeys(ADMISSION_MODES))
    schedulers = [
        (_label(policy, count, mode), policy, count, mode)
        for policy in _scheduler_names(scheduler)
        for count in drafts
        # A scheduler without admission admits everything: reject mode would run it again unchanged.
        for mode in (modes if POLICIES[policy].admits else modes[:1])
    ]
    # One replica needs no router: it runs once, whatever --router says.
    counts = _counts("--replicas", replicas, minimum=1)
    clusters = [(count, name) for count in counts for name in _names("--router", router, ROUTERS)]
    clusters = list(dict.fromkeys((count, name if count > 1 else None) for count, name in clusters))
    scenarios = list(ALL_SCENARIOS) if scenario == "all" else [scenario]
    options = TraceOptions(num_programs=num_requests, seed=seed, slo_scale=slo_scale, length_scale=length_scale)
    rows: list[tuple[str, str, Measurement]] = []
    with Progress(*_columns(), console=console, transient=True) as progress:
        task = progress.add_task("Simulating", total=len(scenarios) * len(schedulers) * len(clusters))
        for name in scenarios:
            spec = _scenario(name)
            for label, policy, draft_count, mode in schedulers:
                engine_config = dataclasses.replace(
                    config, num_speculative_tokens=draft_count, spec_acceptance=spec_acceptance, admission=mode
                )
                for count, routing in clusters:
                    progress.update(task, description=f"Simulating {name} / {label} / {count} x {routing or '-'}")
                    runner = simulator_runner(policy, engine_config, count, routing or "slo")
                    cluster_options = dataclasses.replace(options, num_programs=num_requests * count)
                    # The search starts at the same rate per replica for every cluster size.
                    start = 0.5 * count if capacity else None
                    keep = plot is not None
                    result = measure(label, runner, spec, cluster_options, rate_list, start, keep, count, routing)
                    rows.append((name, label, result))
                    progress.advance(task)
    console.print(results_table(f"Simulated on {config.step_time.name}", rows))
    if capacity and any(label == "vllm" for label, *_ in schedulers):
        console.print(capacity_ratio_table(rows, "vllm"))
    if capacity and any(count > 1 for count, _ in clusters):
        console.print(routing_table(rows))
    if json_out is not None:
        payload = {
            "profile": config.step_time.name, "num_requests": num_requests, "seed": seed,
            "spec_acceptance": spec_acceptance if any(drafts) else None,
            "planner_profile": None if planner_profile is None else config.scheduler_step_time.name,
            "calibrate": calibrate,
            **engine_strays(config),
        }  # fmt: skip
        _write_json(json_out, {**payload, "results": [json_entry(*row) for row in rows]})
    if plot is not None:
        _plot(plot, f"simulated on {config.step_time.name}: {', '.join(scenarios)}", rows)


def _columns() -> tuple:
    return (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def _plot(path: Path, title: str, rows: list[tuple[str, str, Measurement]]) -> None:
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


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")
    console.print(f"Wrote {path}")


def bench_command(
    scenario: Scenario = "chatbot",
    rate: Rate = None,
    rates: Rates = None,
    capacity: Capacity = False,
    num_requests: NumRequests = 40,
    endpoint: Annotated[str, typer.Option(help="The endpoint to measure.")] = "http://127.0.0.1:8011/v1",
    compare_to: Annotated[
        str | None, typer.Option("--compare", help="A second endpoint: the same trace, in the same run.")
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="API key for the endpoints.")] = None,
    server_slo: Annotated[
        bool,
        typer.Option(
            help="Send requests without an SLO, so each server's defaults (--slo-ttft-ms) apply; "
            "the scenario's SLOs still judge them."
        ),
    ] = False,
    profile: Annotated[
        str, typer.Option(help="Profile that resolves TTFT slowdowns (default: this CPU's engine, as the server's).")
    ] = ENGINE_PROFILE,
    seed: Seed = 0,
    slo_scale: SloScale = 1.0,
    length_scale: LengthScale = 1.0,
    simulate_as: Annotated[
        str | None,
        typer.Option(help="Fidelity: also simulate each endpoint's trace as these schedulers (one per endpoint)."),
    ] = None,
    step_noise: StepNoise = 0.0,
    step_noise_correlation: StepNoiseCorrelation = 0.0,
    frontend_in_ms: FrontendInMs = 0.0,
    frontend_out_ms: FrontendOutMs = 0.0,
    json_out: JsonOut = None,
    save_detailed: Annotated[
        bool,
        typer.Option(
            help="With --json: also save every call (its id, when it was sent, when each token came), "
            "as vLLM's benchmark does; lay them beside a server's --step-log with "
            "docs/scripts/frontend_delay.py."
        ),
    ] = False,
    admission: Annotated[
        str | None,
        typer.Option(
            help="The admission mode the requests to --endpoint ask for (header x-slo-admission): best-effort, "
            "reject, or both, comma-separated, each a run of its own (default: the server's --admission)."
        ),
    ] = None,
    duration: Annotated[
        float | None,
        typer.Option(
            min=1.0,
            help="Seconds of arrivals at every rate (the programs are the rate times it), instead of "
            "--num-requests programs: a sustained load, as long at 3x capacity as at 1x.",
        ),
    ] = None,
    plot: PlotOut = None,
) -> None:
    """Stream a scenario's trace to an endpoint (and --compare) and report SLO attainment side by side.

    Each run also samples the servers' /metrics: their memory and vLLM's queue lengths.
    """
    rate_list = _rates(rate, rates, capacity)
    if save_detailed and json_out is None:
        raise MeasureError("--save-detailed saves into the results JSON: give --json FILE too")
    config = _profile(profile)
    spec = _scenario(scenario)
    modes = [None] if admission is None else _names("--admission", admission, dict.fromkeys(ADMISSION_MODES))
    if duration is not None and capacity:
        raise MeasureError("--duration sets the programs of each rate: give --rate or --rates, not --capacity")
    targets = [Endpoint(endpoint, api_key, send_slo=not server_slo, admission=mode) for mode in modes]
    if compare_to:
        targets.append(Endpoint(compare_to, api_key, send_slo=not server_slo))
    policies = [name.strip() for name in simulate_as.split(",")] if simulate_as else []
    if policies and (len(policies) != len(targets) or any(name not in {**POLICIES, **ALIASES} for name in policies)):
        raise MeasureError(f"--simulate-as needs one of {', '.join(POLICIES)} per endpoint ({len(targets)})")
    max_model_len = targets[0].model_card().get("max_model_len")
    options = TraceOptions(num_requests, seed, slo_scale, length_scale, max_model_len, duration)
    rows: list[tuple[str, str, Measurement]] = []
    with Progress(*_columns(), console=console) as progress:
        for target in targets:
            stats: list[ServerStats | None] = []
            runner = endpoint_runner(target, config, progress, target.label, stats)
            start = 0.25 if capacity else None
            measured = measure(target.label, runner, spec, options, rate_list, start, True)
            rows.append((scenario, target.label, dataclasses.replace(measured, server_stats=stats)))
    per_run = f"{duration:g} s of arrivals" if duration is not None else f"{num_requests} programs"
    console.print(results_table(f"{scenario}: {per_run} per run, seed {seed}", rows))
    console.print(stage_table("Calls by stage: which half of the SLO they kept", rows))
    servers = server_table("The servers during each run: memory and vLLM's queues", rows)
    if servers is not None:
        console.print(servers)
    if compare_to:
        _print_comparison(rows[0][2], rows[-1][2])
    # With step noise the simulated schedulers calibrate to the noisy steps, as `sloserve serve` does.
    simulated = dataclasses.replace(
        config, step_noise=step_noise, step_noise_correlation=step_noise_correlation, calibrate=step_noise > 0,
        frontend_in_seconds=frontend_in_ms / 1000.0, frontend_out_seconds=frontend_out_ms / 1000.0,
    )  # fmt: skip
    fidelities = [
        fidelity(row[2], policy, simulated, spec, options) for row, policy in zip(rows, policies, strict=False)
    ]
    if fidelities:
        _print_fidelity(fidelities, config)
    if json_out is not None:
        payload = {
            "scenario": scenario,
            "results": [json_entry(*row, detailed=save_detailed) for row in rows],
            "fidelity": fidelities,
        }
        _write_json(json_out, payload)
    if plot is not None:
        _plot(plot, f"{scenario} on {endpoint}" + (f" vs {compare_to}" if compare_to else ""), rows)


def _print_comparison(ours: Measurement, theirs: Measurement) -> None:
    table = Table(title=f"{ours.label} / {theirs.label}")
    table.add_column("rate")
    for key in ("capacity", "attainment", "goodput", "output_throughput", "ttft_p90"):
        table.add_column(key, justify="right")
    pairs = [
        (rate, summary, theirs.at(rate)) for rate, summary in ours.probes if any(r == rate for r, _ in theirs.probes)
    ]
    capacity = f"{ours.capacity_rps / theirs.capacity_rps:.2f}x" if ours.capacity_rps and theirs.capacity_rps else "-"
    for rate, mine, other in pairs:
        ratios = compare(mine, other)
        cells = [f"{ratios[k]:.2f}x" if ratios.get(k) is not None else "-" for k in
                 ("program_attainment", "goodput", "output_throughput", "ttft_p90")]  # fmt: skip
        table.add_row(f"{rate:.3g}", capacity, *cells)
    console.print(table)


def _print_fidelity(results: list[dict], config: SimConfig) -> None:
    table = Table(title=f"Fidelity: real engine vs simulator ({config.step_time.name}), relative error")
    for column in ("endpoint", "simulated as", "rate", *FIDELITY_METRICS):
        table.add_column(column, justify="right" if column in FIDELITY_METRICS or column == "rate" else "left")
    for entry in results:
        for row in entry["rates"]:
            cells = []
            for key in FIDELITY_METRICS:
                real, simulated, error = row["real"][key], row["simulated"][key], row["relative_error"][key]
                shown = "-" if error is None else f"{100 * error:.0f}%"
                cells.append(f"{shown} ({_short(real)} vs {_short(simulated)})")
            table.add_row(entry["endpoint"], entry["simulated_as"], f"{row['rate']:.3g}", *cells)
    console.print(table)


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
    step_time = _profile(profile).step_time
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


def _short(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def results_command(
    page: Annotated[Path, typer.Option(help="The results page whose bench: blocks are rewritten.")] = Path(
        "docs/benchmarks.md"
    ),
    data: Annotated[Path, typer.Option(help="Where the data files and plots go.")] = Path("docs/data"),
    processes: Annotated[int, typer.Option(min=1, help="Capacity searches run at once (one per core).")] = 2,
) -> None:
    """Regenerate the simulator tables of the results page (what `make bench` runs): every scenario's
    capacity, ours and stock vLLM, with and without speculation, on the A100 and H200 profiles."""
    if not page.is_file():
        raise MeasureError(f"--page {page}: no such file; run from the project root or give the page's path")
    if not data.is_dir():
        raise MeasureError(f"--data {data}: no such folder")
    todo = jobs()
    with Progress(*_columns(), console=console) as progress:
        task = progress.add_task("Capacity searches", total=len(todo))

        def advance(job: Job) -> None:
            progress.update(task, advance=1, description=f"Done {job.table.marker} / {job.scenario} / {job.label}")

        entries = run_all(todo, processes, advance)
    try:
        written = write_results(entries, page, data)
    except ValueError as exc:
        raise MeasureError(f"--page {page}: {exc}") from None
    for path in written:
        console.print(f"Wrote {path}")
