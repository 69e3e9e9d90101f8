"""`sloserve simulate` and `sloserve results`: schedulers in the simulator, and the results page's tables."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress

from sloserve_runtime.cli.measure import (
    ENGINE_PROFILE,
    Capacity,
    Duration,
    FrontendInMs,
    FrontendOutMs,
    JsonOut,
    LengthScale,
    MaxQueuedBestEffort,
    MeasureError,
    PlotOut,
    Rate,
    Rates,
    Seed,
    SloScale,
    StepNoise,
    StepNoiseCorrelation,
    check_duration,
    console,
    parse_counts,
    parse_names,
    plot_results,
    profile_config,
    progress_columns,
    queue_bound,
    rates_of,
    scenario_of,
    write_json,
)
from sloserve_runtime.core.policies import ALIASES, POLICIES, scheduler_name
from sloserve_runtime.core.router import ROUTERS
from sloserve_runtime.core.slo_state import ADMISSION_MODES, DEFAULT_MAX_QUEUED_BEST_EFFORT
from sloserve_runtime.measure.ceiling import work_ceiling
from sloserve_runtime.measure.fidelity import engine_strays
from sloserve_runtime.measure.results import Job, jobs, run_all, write_results
from sloserve_runtime.measure.runs import Measurement, TraceOptions, measure, run_label, simulator_runner
from sloserve_runtime.measure.tables import (
    capacity_ratio_table,
    ceiling_table,
    json_entry,
    results_table,
    routing_table,
    stage_table,
)
from sloserve_runtime.workload.scenarios import ALL_SCENARIOS, SCENARIO_NAMES


def _scheduler_names(value: str) -> list[str]:
    """The registered schedulers ``--scheduler`` names (aliases such as vllm-fcfs resolved)."""
    known = {**POLICIES, **ALIASES}
    return list(dict.fromkeys(scheduler_name(name) for name in parse_names("--scheduler", value, known)))


def simulate_command(
    scenario: Annotated[
        str, typer.Option(help=f"One of {', '.join(SCENARIO_NAMES)}, all, or the path of a scenario file (.yaml).")
    ] = "all",
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
    max_queued_best_effort: MaxQueuedBestEffort = DEFAULT_MAX_QUEUED_BEST_EFFORT,
    duration: Duration = None,
    json_out: JsonOut = None,
    plot: PlotOut = None,
) -> None:
    """Simulate schedulers on scenarios with a step-time profile (the same policy code as the engine).

    With ``--replicas K`` the trace goes to K engines behind a router; rates and ``capacity_rps``
    are the whole cluster's, and the tables also give the capacity per replica. The trace has K
    times the programs, so that at K times the rate it spans the same time (a burst lasts as long
    and holds as many programs per replica) and cluster sizes compare like for like.
    """
    rate_list = rates_of(rate, rates, capacity)
    config = profile_config(profile)
    if planner_profile is not None:
        planner = profile_config(planner_profile, "--planner-profile").step_time
        config = dataclasses.replace(config, planner_step_time=planner)
    config = dataclasses.replace(
        config, calibrate=calibrate, enable_prefix_caching=enable_prefix_caching,
        step_noise=step_noise, step_noise_correlation=step_noise_correlation,
        frontend_in_seconds=frontend_in_ms / 1000.0, frontend_out_seconds=frontend_out_ms / 1000.0,
        max_queued_best_effort=queue_bound(max_queued_best_effort),
    )  # fmt: skip
    if not 0.0 <= spec_acceptance <= 1.0:
        raise MeasureError(f"--spec-acceptance {spec_acceptance}: give a probability between 0 and 1")
    drafts = parse_counts("--speculative-tokens", speculative_tokens, minimum=0)
    modes = parse_names("--admission", admission, dict.fromkeys(ADMISSION_MODES))
    schedulers = [
        (run_label(policy, count, mode), policy, count, mode)
        for policy in _scheduler_names(scheduler)
        for count in drafts
        # A scheduler without admission admits everything: reject mode would run it again unchanged.
        for mode in (modes if POLICIES[policy].admits else modes[:1])
    ]
    # One replica needs no router: it runs once, whatever --router says.
    counts = parse_counts("--replicas", replicas, minimum=1)
    clusters = [(count, name) for count in counts for name in parse_names("--router", router, ROUTERS)]
    clusters = list(dict.fromkeys((count, name if count > 1 else None) for count, name in clusters))
    scenarios = list(ALL_SCENARIOS) if scenario == "all" else [scenario]
    check_duration(duration, capacity)
    options = TraceOptions(
        num_programs=num_requests, seed=seed, slo_scale=slo_scale, length_scale=length_scale, duration_s=duration
    )
    rows: list[tuple[str, str, Measurement]] = []
    with Progress(*progress_columns(), console=console, transient=True) as progress:
        task = progress.add_task("Simulating", total=len(scenarios) * len(schedulers) * len(clusters))
        for name in scenarios:
            spec = scenario_of(name)
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
    if not capacity and len(scenarios) == 1 and sum(len(kind.stages) for kind in spec.classes) > 1:
        # Each stage is a tier of its own: whether one pays for another shows only per stage.
        console.print(stage_table("Calls by stage: which half of the SLO they kept", rows))
    if capacity and any(label == "vllm" for label, *_ in schedulers):
        console.print(capacity_ratio_table(rows, "vllm"))
    if capacity and any(count > 1 for count, _ in clusters):
        console.print(routing_table(rows))
    # The capacity any scheduler could reach on one engine: how far the best here is from it.
    ceilings = {}
    if capacity and 1 in counts:
        ceilings = {name: work_ceiling(scenario_of(name), config.step_time).rate for name in scenarios}
        console.print(ceiling_table(rows, ceilings))
    if json_out is not None:
        payload = {
            "profile": config.step_time.name, "num_requests": num_requests, "duration_s": duration, "seed": seed,
            "spec_acceptance": spec_acceptance if any(drafts) else None,
            "planner_profile": None if planner_profile is None else config.scheduler_step_time.name,
            "calibrate": calibrate,
            **engine_strays(config),
        }  # fmt: skip
        if ceilings:
            payload["work_ceiling_rps"] = {name: round(rate, 4) for name, rate in ceilings.items()}
        write_json(json_out, {**payload, "results": [json_entry(*row) for row in rows]})
    if plot is not None:
        plot_results(plot, f"simulated on {config.step_time.name}: {', '.join(scenarios)}", rows)


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
    with Progress(*progress_columns(), console=console) as progress:
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
