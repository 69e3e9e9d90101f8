"""`sloserve simulate` and `sloserve bench`: our figures next to vLLM's stock scheduler, one run each."""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sloserve_runtime.core.policies import ALIASES, POLICIES, scheduler_name
from sloserve_runtime.core.router import ROUTERS
from sloserve_runtime.core.step_time import DEFAULT_PROFILE, engine_profile, resolve_profile
from sloserve_runtime.measure.bench import Endpoint
from sloserve_runtime.measure.plots import attainment_and_ttft
from sloserve_runtime.measure.runs import Measurement, TraceOptions, endpoint_runner, measure, simulator_runner
from sloserve_runtime.measure.summary import Summary, compare, summarize
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


def _summary_row(summary: Summary) -> list[str]:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    return [
        f"{100 * summary.program_attainment:.1f}%", f"{100 * summary.attainment:.1f}%",
        f"{summary.goodput_rps:.2f}", ms(summary.ttft_ms.p50), ms(summary.ttft_ms.p90), ms(summary.ttft_ms.p99),
        ms(summary.tpot_ms.p50), ms(summary.tpot_ms.p90), f"{summary.output_throughput_tps:.0f}",
        "-" if summary.admitted_attainment is None else f"{100 * summary.admitted_attainment:.1f}%",
        f"{summary.best_effort_completed}/{summary.best_effort}" if summary.best_effort else "-",
    ]  # fmt: skip


SUMMARY_COLUMNS = (
    "attain", "req attain", "goodput/s", "TTFT p50", "TTFT p90", "TTFT p99", "TPOT p50", "TPOT p90", "tok/s",
    "admitted attain", "best effort done",
)  # fmt: skip


def results_table(title: str, rows: list[tuple[str, str, Measurement]]) -> Table:
    """One row per rate run (or the capacity probe); replica columns when any target has several."""
    clustered = any(measurement.replicas > 1 for _, _, measurement in rows)
    columns = ("scenario", "scheduler", *(("replicas", "router") if clustered else ()), "rate", "capacity")
    table = Table(title=title)
    for column in (*columns, *(("per replica",) if clustered else ()), *SUMMARY_COLUMNS):
        table.add_column(column, justify="left" if column in ("scenario", "scheduler", "router") else "right")
    for scenario, label, measurement in rows:
        cluster = (str(measurement.replicas), measurement.router or "-") if clustered else ()
        per_replica = (_rate(measurement.capacity_per_replica_rps),) if clustered else ()
        for rate, summary in measurement.probes if measurement.capacity_rps is None else [measurement.headline]:
            capacity = _rate(measurement.capacity_rps)
            table.add_row(scenario, label, *cluster, f"{rate:.3g}", capacity, *per_replica, *_summary_row(summary))
    return table


def stage_table(title: str, rows: list[tuple[str, str, Measurement]]) -> Table:
    """Per stage and rate run: how many calls met their SLO, and which half the others missed."""
    table = Table(title=title)
    for column in ("scheduler", "rate", "stage", "calls", "met", "TTFT met", "TPOT met"):
        table.add_column(column, justify="left" if column in ("scheduler", "stage") else "right")
    for _, label, measurement in rows:
        for rate, summary in measurement.probes:
            for stage, part in summary.by_stage.items():
                shares = (f"{share:.1%}" for share in (part.attainment, part.ttft_met, part.tpot_met))
                table.add_row(label, f"{rate:.3g}", stage, str(part.requests), *shares)
    return table


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def json_entry(scenario: str, label: str, measurement: Measurement, detailed: bool = False) -> dict:
    """One scenario x scheduler (or endpoint) of the JSON; ``detailed``: each probe also lists its
    calls, every token's time among them (``bench --save-detailed``)."""
    rate, summary = measurement.headline
    return {
        "scenario": scenario,
        "scheduler": label,
        "rate": rate,
        "attainment": summary.program_attainment,
        "request_attainment": summary.attainment,
        "capacity_rps": measurement.capacity_rps,
        "replicas": measurement.replicas,
        "router": measurement.router,
        "capacity_per_replica_rps": measurement.capacity_per_replica_rps,
        "ttft_p90_ms": summary.ttft_ms.p90,
        "tpot_p90_ms": summary.tpot_ms.p90,
        "goodput_rps": summary.goodput_rps,
        "output_throughput_tps": summary.output_throughput_tps,
        "admitted_attainment": summary.admitted_attainment,
        "best_effort": summary.best_effort,
        "best_effort_completed": summary.best_effort_completed,
        "probes": [
            {"rate": r, **s.to_json(), **({"calls": _calls(measurement, r)} if detailed else {})}
            for r, s in measurement.probes
        ],
    }


def _calls(measurement: Measurement, rate: float) -> list[dict]:
    """The calls of the run at ``rate`` (the last, if a search ran it twice), as vLLM's benchmark
    saves them with --save-detailed: when each was sent and when each of its tokens came."""
    return [dataclasses.asdict(result) for result in measurement.results_at.get(rate, [])]


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
    schedulers = [
        (f"{policy}+spec{count}" if count else policy, policy, count)
        for policy in _scheduler_names(scheduler)
        for count in drafts
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
            for label, policy, draft_count in schedulers:
                engine_config = dataclasses.replace(
                    config, num_speculative_tokens=draft_count, spec_acceptance=spec_acceptance
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
    if capacity and any(label == "vllm" for label, _, _ in schedulers):
        _print_capacity_ratios(rows, "vllm")
    if capacity and any(count > 1 for count, _ in clusters):
        _print_routing(rows)
    if json_out is not None:
        payload = {
            "profile": config.step_time.name, "num_requests": num_requests, "seed": seed,
            "spec_acceptance": spec_acceptance if any(drafts) else None,
            "planner_profile": None if planner_profile is None else config.scheduler_step_time.name,
            "calibrate": calibrate,
            **_engine_strays(config),
        }  # fmt: skip
        _write_json(json_out, {**payload, "results": [json_entry(*row) for row in rows]})
    if plot is not None:
        _plot(plot, f"simulated on {config.step_time.name}: {', '.join(scenarios)}", rows)


def _columns() -> tuple:
    return (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def _target(label: str, measurement: Measurement) -> str:
    """A scheduler's name, with its cluster (``sloserve 4x slo``) when it has several replicas."""
    return label if measurement.replicas == 1 else f"{label} {measurement.replicas}x {measurement.router}"


def _print_capacity_ratios(rows: list[tuple[str, str, Measurement]], baseline: str) -> None:
    """Each scheduler's capacity over ``baseline``'s on the same scenario and cluster."""
    table = Table(title=f"Capacity ratio over {baseline}")
    table.add_column("scheduler")
    table.add_column("per scenario")
    table.add_column("geometric mean", justify="right")
    base = {(scenario, m.replicas, m.router): m.capacity_rps for scenario, label, m in rows if label == baseline}
    for target in dict.fromkeys(_target(label, m) for _, label, m in rows if label != baseline):
        ratios = {
            name: m.capacity_rps / base[name, m.replicas, m.router]
            for name, label, m in rows
            if _target(label, m) == target and base.get((name, m.replicas, m.router))
        }
        geo = statistics.geometric_mean(ratios.values()) if ratios and all(ratios.values()) else 0.0
        table.add_row(target, ", ".join(f"{s} {r:.2f}x" for s, r in ratios.items()), f"{geo:.2f}x")
    console.print(table)


def _print_routing(rows: list[tuple[str, str, Measurement]]) -> None:
    """Capacity per replica against one replica's, and each router's against round-robin's at the same K."""
    table = Table(title="Routing: capacity per replica")
    for column in ("scenario", "scheduler", "replicas", "router", "cluster", "per replica", "vs 1 replica",
                   "vs round-robin"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("scenario", "scheduler", "router") else "right")
    capacity = {(scenario, label, m.replicas, m.router): m.capacity_rps or 0.0 for scenario, label, m in rows}
    for scenario, label, m in rows:
        single = capacity.get((scenario, label, 1, None))
        round_robin = capacity.get((scenario, label, m.replicas, "round-robin"))
        per_replica = m.capacity_per_replica_rps or 0.0
        table.add_row(
            scenario, label, str(m.replicas), m.router or "-", f"{m.capacity_rps or 0.0:.3g}", f"{per_replica:.3g}",
            f"{per_replica / single:.2f}x" if single else "-",
            f"{m.capacity_rps / round_robin:.2f}x" if round_robin and m.capacity_rps else "-",
        )  # fmt: skip
    console.print(table)


def _plot(path: Path, title: str, rows: list[tuple[str, str, Measurement]]) -> None:
    attainment = {
        f"{scenario}/{label}": [(rate, summary.program_attainment) for rate, summary in measurement.probes]
        for scenario, label, measurement in rows
    }
    ttfts: dict[str, list[float]] = {}
    for scenario, label, measurement in rows:
        rate, _ = measurement.headline
        results = measurement.results_at.get(rate, [])
        ttfts[f"{scenario}/{label} @ {rate:.3g}/s"] = [
            (r.token_times[0] - r.arrival) * 1000 for r in results if r.token_times
        ]
    attainment_and_ttft(path, title, attainment, ttfts)
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
    plot: PlotOut = None,
) -> None:
    """Stream a scenario's trace to an endpoint (and --compare) and report SLO attainment side by side."""
    rate_list = _rates(rate, rates, capacity)
    if save_detailed and json_out is None:
        raise MeasureError("--save-detailed saves into the results JSON: give --json FILE too")
    config = _profile(profile)
    spec = _scenario(scenario)
    urls = [endpoint] + ([compare_to] if compare_to else [])
    targets = [Endpoint(url, api_key, send_slo=not server_slo) for url in urls]
    policies = [name.strip() for name in simulate_as.split(",")] if simulate_as else []
    if policies and (len(policies) != len(targets) or any(name not in {**POLICIES, **ALIASES} for name in policies)):
        raise MeasureError(f"--simulate-as needs one of {', '.join(POLICIES)} per endpoint ({len(targets)})")
    max_model_len = targets[0].model_card().get("max_model_len")
    options = TraceOptions(num_requests, seed, slo_scale, length_scale, max_model_len)
    rows: list[tuple[str, str, Measurement]] = []
    with Progress(*_columns(), console=console) as progress:
        for target in targets:
            runner = endpoint_runner(target, config, progress, target.base_url)
            start = 0.25 if capacity else None
            rows.append(
                (scenario, target.base_url, measure(target.base_url, runner, spec, options, rate_list, start, True))
            )
    console.print(results_table(f"{scenario}: {num_requests} programs per run, seed {seed}", rows))
    console.print(stage_table("Calls by stage: which half of the SLO they kept", rows))
    if compare_to:
        _print_comparison(rows[0][2], rows[1][2])
    # With step noise the simulated schedulers calibrate to the noisy steps, as `sloserve serve` does.
    simulated = dataclasses.replace(
        config, step_noise=step_noise, step_noise_correlation=step_noise_correlation, calibrate=step_noise > 0,
        frontend_in_seconds=frontend_in_ms / 1000.0, frontend_out_seconds=frontend_out_ms / 1000.0,
    )  # fmt: skip
    fidelity = [
        _fidelity(row[2], policy, simulated, spec, options) for row, policy in zip(rows, policies, strict=False)
    ]
    if fidelity:
        _print_fidelity(fidelity, config)
    if json_out is not None:
        payload = {
            "scenario": scenario,
            "results": [json_entry(*row, detailed=save_detailed) for row in rows],
            "fidelity": fidelity,
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


FIDELITY_METRICS = ("ttft_p50_ms", "ttft_p90_ms", "tpot_p90_ms", "attainment")


def _fidelity_figures(summary: Summary) -> dict[str, float | None]:
    return {
        "ttft_p50_ms": summary.ttft_ms.p50,
        "ttft_p90_ms": summary.ttft_ms.p90,
        "tpot_p90_ms": summary.tpot_ms.p90,
        "attainment": summary.program_attainment,
    }


def _fidelity(real: Measurement, policy: str, config: SimConfig, spec: ScenarioSpec, options: TraceOptions) -> dict:
    """Simulate the very traces the endpoint served; relative error of each figure, per rate."""
    runner = simulator_runner(policy, config)
    rows = []
    for rate, summary in real.probes:
        simulated = summarize(*runner(options.trace(spec, rate)))
        measured, predicted = _fidelity_figures(summary), _fidelity_figures(simulated)
        errors = {
            key: abs(predicted[key] - measured[key]) / measured[key] if measured[key] and predicted[key] is not None
            else None
            for key in FIDELITY_METRICS
        }  # fmt: skip
        rows.append({"rate": rate, "real": measured, "simulated": predicted, "relative_error": errors})
    return {"endpoint": real.label, "simulated_as": policy, "rates": rows, **_engine_strays(config)}


def _engine_strays(config: SimConfig) -> dict:
    """How the simulated engine strays from the profile, for the JSON: its step noise and front end."""
    frontend_ms = [round(1000.0 * config.frontend_in_seconds, 3), round(1000.0 * config.frontend_out_seconds, 3)]
    return {
        "step_noise": [config.step_noise, config.step_noise_correlation] if config.step_noise else None,
        "frontend_ms": frontend_ms if any(frontend_ms) else None,
    }


def _print_fidelity(fidelity: list[dict], config: SimConfig) -> None:
    table = Table(title=f"Fidelity: real engine vs simulator ({config.step_time.name}), relative error")
    for column in ("endpoint", "simulated as", "rate", *FIDELITY_METRICS):
        table.add_column(column, justify="right" if column in FIDELITY_METRICS or column == "rate" else "left")
    for entry in fidelity:
        for row in entry["rates"]:
            cells = []
            for key in FIDELITY_METRICS:
                real, simulated, error = row["real"][key], row["simulated"][key], row["relative_error"][key]
                shown = "-" if error is None else f"{100 * error:.0f}%"
                cells.append(f"{shown} ({_short(real)} vs {_short(simulated)})")
            table.add_row(entry["endpoint"], entry["simulated_as"], f"{row['rate']:.3g}", *cells)
    console.print(table)


def _short(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


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
