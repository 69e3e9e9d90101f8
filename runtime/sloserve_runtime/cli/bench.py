"""`sloserve bench`: a scenario's trace against real endpoints, side by side, with the servers' own figures."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from sloserve_runtime.cli.measure import (
    ENGINE_PROFILE,
    Capacity,
    Duration,
    FrontendInMs,
    FrontendOutMs,
    JsonOut,
    LengthScale,
    MeasureError,
    NumRequests,
    PlotOut,
    Rate,
    Rates,
    Scenario,
    Seed,
    SloScale,
    StepNoise,
    StepNoiseCorrelation,
    check_duration,
    console,
    parse_names,
    plot_results,
    profile_config,
    progress_columns,
    rates_of,
    scenario_of,
    write_json,
)
from sloserve_runtime.core.policies import ALIASES, POLICIES
from sloserve_runtime.core.slo_state import ADMISSION_MODES
from sloserve_runtime.measure.bench import Endpoint
from sloserve_runtime.measure.fidelity import FIDELITY_METRICS, fidelity
from sloserve_runtime.measure.runs import Measurement, TraceOptions, endpoint_runner, measure
from sloserve_runtime.measure.server_stats import ServerStats
from sloserve_runtime.measure.summary import compare
from sloserve_runtime.measure.tables import (
    json_entry,
    results_table,
    server_table,
    stage_table,
)
from sloserve_runtime.sim import SimConfig


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
    duration: Duration = None,
    plot: PlotOut = None,
) -> None:
    """Stream a scenario's trace to an endpoint (and --compare) and report SLO attainment side by side.

    Each run also samples the servers' /metrics: their memory and vLLM's queue lengths.
    """
    rate_list = rates_of(rate, rates, capacity)
    if save_detailed and json_out is None:
        raise MeasureError("--save-detailed saves into the results JSON: give --json FILE too")
    config = profile_config(profile)
    spec = scenario_of(scenario)
    modes = [None] if admission is None else parse_names("--admission", admission, dict.fromkeys(ADMISSION_MODES))
    check_duration(duration, capacity)
    targets = [Endpoint(endpoint, api_key, send_slo=not server_slo, admission=mode) for mode in modes]
    if compare_to:
        targets.append(Endpoint(compare_to, api_key, send_slo=not server_slo))
    policies = [name.strip() for name in simulate_as.split(",")] if simulate_as else []
    if policies and (len(policies) != len(targets) or any(name not in {**POLICIES, **ALIASES} for name in policies)):
        raise MeasureError(f"--simulate-as needs one of {', '.join(POLICIES)} per endpoint ({len(targets)})")
    max_model_len = targets[0].model_card().get("max_model_len")
    options = TraceOptions(num_requests, seed, slo_scale, length_scale, max_model_len, duration)
    rows: list[tuple[str, str, Measurement]] = []
    with Progress(*progress_columns(), console=console) as progress:
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
        write_json(json_out, payload)
    if plot is not None:
        plot_results(plot, f"{scenario} on {endpoint}" + (f" vs {compare_to}" if compare_to else ""), rows)


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


def _short(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
