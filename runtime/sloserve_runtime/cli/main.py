"""The `sloserve` command line."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.table import Table

from sloserve.slo import SLO, SLOError, parse_tpot, parse_ttft
from sloserve_runtime.cli import bench, measure, simulate
from sloserve_runtime.cli.app_loader import AppFileError, load_app, pick_program
from sloserve_runtime.cli.measure import MeasureError
from sloserve_runtime.cli.runner import Runs, program_inputs, run_program, runs_at_rate
from sloserve_runtime.core.policies import PLANNER_POLICIES, POLICIES, scheduler_name
from sloserve_runtime.core.slo_state import ADMISSION_MODES, DEFAULT_MAX_QUEUED_BEST_EFFORT, REJECT
from sloserve_runtime.core.step_time import resolve_profile
from sloserve_runtime.measure.report import losses_table, run_outcomes, stage_table, wasted_tokens
from sloserve_runtime.serving import server
from sloserve_runtime.serving.model import ModelConversionError

cli = typer.Typer(
    name="sloserve",
    help="Serve LLM programs whose stages have latency objectives.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(width=None if sys.stdout.isatty() else 200)
errors = Console(stderr=True)
USER_ERRORS = (AppFileError, ModelConversionError, server.ServerError, SLOError)

ReplicasOption = Annotated[
    int, typer.Option(min=1, help="Engine replicas on Ray, behind one endpoint that routes each request.")
]
RouterOption = Annotated[
    str,
    typer.Option(
        help="With --replicas: slo (feasible with the most slack), power-of-two (Ray Serve's default), "
        "round-robin or least-loaded."
    ),
]
MinReplicasOption = Annotated[
    int | None, typer.Option(min=1, help="Autoscale: at least this many replicas (default: --replicas).")
]
MaxReplicasOption = Annotated[
    int | None,
    typer.Option(min=1, help="Autoscale on SLO attainment up to this many replicas (default: --replicas)."),
]
RayAddressOption = Annotated[
    str | None, typer.Option(help="Join this Ray cluster (e.g. ray://head:10001 or auto) instead of a local one.")
]
ModelOption = Annotated[
    str | None,
    typer.Option("--model", help="A vLLM model name or path (default: the embedded SmolLM2-135M-Instruct)."),
]


def _fail(message: str) -> typer.Exit:
    errors.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    return typer.Exit(code=2)


def _default_slo(ttft: str | None, tpot: str | None) -> SLO:
    try:
        ttft_ms, ttft_slowdown = parse_ttft(ttft, "--slo-ttft-ms")
        return SLO(ttft_ms=ttft_ms, ttft_slowdown=ttft_slowdown, tpot_ms=parse_tpot(tpot, "--slo-tpot-ms"))
    except SLOError as exc:
        raise _fail(str(exc)) from None


# `sloserve serve [MODEL] -- ARGS`: ARGS go to vLLM unchanged (split off before typer parses).
_vllm_args: list[str] = []


@cli.command()
def serve(
    model: Annotated[str | None, typer.Argument(help="A vLLM model name or path (default: embedded SmolLM2).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind (0.0.0.0 exposes it to the network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8011,
    slo_ttft_ms: Annotated[str | None, typer.Option(help="Default TTFT target: ms, or a slowdown such as 3x.")] = None,
    slo_tpot_ms: Annotated[str | None, typer.Option(help="Default TPOT target in ms.")] = None,
    api_key: Annotated[str | None, typer.Option(help="Require this key as a Bearer token.")] = None,
    scheduler: Annotated[
        str,
        typer.Option(
            help=f"One of {', '.join(POLICIES)}: sloserve is the SLO planner, vllm runs vLLM's stock scheduler; "
            "the others are the ablations and baselines `sloserve simulate --scheduler` takes too."
        ),
    ] = "sloserve",
    step_log: Annotated[
        Path | None,
        typer.Option(
            help="Append one JSON line per engine step (features, durations, tokens emitted) to this file; "
            "with --scheduler vllm, vLLM's stock scheduler decides and a thin subclass only times its steps."
        ),
    ] = None,
    admission: Annotated[
        str,
        typer.Option(
            help="What a request the planner cannot promise its SLO gets: best-effort (served from leftover "
            "budget) or reject (HTTP 429 with Retry-After). A request may ask otherwise with x-slo-admission."
        ),
    ] = "best-effort",
    max_queued_best_effort: measure.MaxQueuedBestEffort = DEFAULT_MAX_QUEUED_BEST_EFFORT,
    profile: Annotated[
        str | None,
        typer.Option(
            help="The step-time profile the planner starts from: a bundled name (a100-opt13b-slos-serve, ...) "
            "or a JSON from `sloserve profile` (default: the default model's, for the dtype this CPU runs)."
        ),
    ] = None,
    calibrate: Annotated[
        bool,
        typer.Option(
            help="Refit the step-time profile to the steps this engine takes (online calibration); "
            "--no-calibrate plans with the profile as shipped."
        ),
    ] = True,
    max_yields: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Steps in a row a decode without a TPOT target may sit out while an admitted prompt waits "
            "to start (default 4): more gets first tokens sooner, 0 keeps every decode batched (throughput).",
        ),
    ] = None,
    replicas: ReplicasOption = 1,
    router: RouterOption = "slo",
    ray_address: RayAddressOption = None,
    min_replicas: MinReplicasOption = None,
    max_replicas: MaxReplicasOption = None,
) -> None:
    """Run vLLM's OpenAI-compatible server with SLO scheduling. Args after -- go to vLLM."""
    try:
        scheduler = scheduler_name(scheduler)
    except ValueError as exc:
        raise _fail(f"--scheduler: {exc}") from None
    if admission not in ADMISSION_MODES:
        raise _fail(f"--admission {admission!r} is not one of {', '.join(ADMISSION_MODES)}")
    stock = server.scheduler_cls(scheduler) is None
    if admission == REJECT and stock:
        raise _fail("--admission reject needs our scheduler (sloserve): vLLM's stock one admits everything")
    if max_yields is not None and scheduler not in PLANNER_POLICIES:
        if stock:
            raise _fail("--max-yields is a setting of our planner (sloserve): vLLM's stock scheduler has none")
        raise _fail(f"--max-yields is a setting of the planner; {scheduler} orders by deadline only")
    if step_log is not None and not step_log.resolve().parent.is_dir():
        raise _fail(f"--step-log {step_log}: folder {step_log.resolve().parent} does not exist")
    if profile is not None:
        try:
            profile = str(resolve_profile(profile).resolve())
        except ValueError as exc:
            raise _fail(str(exc)) from None
    options = server.ServerOptions(
        model=model,
        host=host,
        port=port,
        default_slo=_default_slo(slo_ttft_ms, slo_tpot_ms),
        api_key=api_key,
        scheduler=scheduler,
        profile=profile,
        step_log=None if step_log is None else str(step_log.resolve()),
        calibrate=calibrate,
        max_yields=max_yields,
        admission=admission,
        max_queued_best_effort=measure.queue_bound(max_queued_best_effort),
        extra_args=list(_vllm_args),
    )
    if not server.port_is_free(host, port):
        raise _fail(f"port {port} on {host} is in use; pick another with --port")
    if replicas > 1 or ray_address is not None or (max_replicas or 1) > 1:
        _serve_replicated(options, replicas, router, ray_address, min_replicas, max_replicas)
        return
    try:
        args = server.command(options)
    except USER_ERRORS as exc:
        raise _fail(str(exc)) from None
    errors.print(
        f"Serving {server.resolve_model(model)[1]} on {options.url} (scheduler: {scheduler}, admission: {admission})"
    )
    # vLLM's server takes over this process: signals and exit codes are its own.
    os.execvpe(args[0], args, server.environment(options))


def _check_router(router: str) -> None:
    from sloserve_runtime.cluster.deployment import SERVE_ROUTERS

    if router not in SERVE_ROUTERS:
        raise _fail(f"--router {router!r} is not one of {', '.join(SERVE_ROUTERS)}")


def _serve_replicated(
    options: server.ServerOptions,
    replicas: int,
    router: str,
    ray_address: str | None,
    min_replicas: int | None,
    max_replicas: int | None,
) -> None:
    from sloserve_runtime.cluster.deployment import ReplicaError, Scaling, serve_forever

    _check_router(router)
    try:
        scaling = Scaling.of(replicas, min_replicas, max_replicas)
    except ReplicaError as exc:
        raise _fail(str(exc)) from None
    where = ray_address or "a local Ray instance"
    count = f"{scaling.min_replicas}-{scaling.max_replicas}" if scaling.autoscaled else str(scaling.min_replicas)
    errors.print(f"Starting {count} replicas of {server.resolve_model(options.model)[1]} on Ray Serve ({where}) ...")
    errors.print(f"Serving on {options.url} (router: {router}, scheduler: {options.scheduler})")
    try:
        serve_forever(options, replicas, router, ray_address, min_replicas, max_replicas)
    except KeyboardInterrupt:
        return
    except (*USER_ERRORS, ReplicaError) as exc:
        raise _fail(str(exc)) from None


@cli.command()
def run(
    app_file: Annotated[Path, typer.Argument(help="The app file, e.g. examples/reasoning/app.py.")],
    app_args: Annotated[list[str] | None, typer.Argument(help="Arguments for the program (after --).")] = None,
    model: ModelOption = None,
    endpoint: Annotated[
        str | None, typer.Option(help="Use this OpenAI-compatible endpoint instead of an embedded engine.")
    ] = None,
    program: Annotated[str | None, typer.Option(help="Which program to run, if the app has several.")] = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Program runs in flight at once (a closed loop; default 1).")
    ] = None,
    requests: Annotated[int | None, typer.Option(min=1, help="Program runs in all (default: one per example).")] = None,
    rate: Annotated[
        float | None,
        typer.Option(help="Start program runs at this rate per second, however many are in flight (an open loop)."),
    ] = None,
    duration: Annotated[
        float | None, typer.Option(help="With --rate: start runs for this many seconds (rate x duration runs).")
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="API key for --endpoint.")] = None,
    replicas: ReplicasOption = 1,
    router: RouterOption = "slo",
    ray_address: RayAddressOption = None,
    min_replicas: MinReplicasOption = None,
    max_replicas: MaxReplicasOption = None,
) -> None:
    """Run an app's program on the embedded engine (or --endpoint) and print a per-stage SLO table.

    With --rate R --duration S, runs arrive at R per second for S seconds whatever the engine does,
    and the report adds program attainment, where runs lost their objective and the work
    computed for runs that missed anyway.
    """
    try:
        count = _run_count(requests, rate, duration, concurrency)
        app = load_app(app_file)
        chosen = pick_program(app, program, app_file)
        inputs = program_inputs(chosen, app_args or [], count)
        drive = {"concurrency": concurrency or 1, "rate": rate}
        if endpoint is not None:
            _run_and_report(app, chosen, inputs, endpoint, drive, api_key, model)
            return
        options = server.ServerOptions(model=model, port=server.free_port())
        if replicas > 1 or ray_address is not None or (max_replicas or 1) > 1:
            scaling = (replicas, min_replicas, max_replicas)
            _run_replicated(app, chosen, inputs, options, drive, scaling, router, ray_address)
            return
        started = time.monotonic()
        with console.status("Starting the embedded engine (about half a minute)..."):
            running = server.start(options)
        try:
            with console.status("Warming the engine up (untimed requests)..."):
                running.warm_up()
            console.print(f"Engine ready in {time.monotonic() - started:.0f}s at {running.url}")
            _run_and_report(app, chosen, inputs, running.url, drive, None, running.served_model)
        finally:
            running.stop()
    except USER_ERRORS as exc:
        raise _fail(str(exc)) from None


def _run_count(requests: int | None, rate: float | None, duration: float | None, concurrency: int | None) -> int | None:
    """How many runs `sloserve run` starts (None: one per example); a clear error for options
    that do not go together."""
    if rate is None:
        if duration is not None:
            raise _fail("--duration needs --rate: runs arrive at the rate for that long")
        return requests
    if rate <= 0 or not math.isfinite(rate):
        raise _fail(f"--rate {rate:g}: give a positive number of program runs per second")
    if concurrency is not None:
        raise _fail("--concurrency runs a closed loop, --rate an open one: give one of them")
    if duration is not None and requests is not None:
        raise _fail("give --duration or --requests with --rate, not both")
    if duration is not None:
        if duration <= 0 or not math.isfinite(duration):
            raise _fail(f"--duration {duration:g}: give a positive number of seconds")
        return runs_at_rate(rate, duration)
    if requests is None:
        raise _fail("--rate needs --duration (seconds of arrivals) or --requests (runs in all)")
    return requests


@cli.command()
def profile(
    model: ModelOption = None,
    out: Annotated[Path, typer.Option(help="Where to write the profile JSON.")] = Path("profile.json"),
    quick: Annotated[bool, typer.Option(help="A smaller grid (about a minute on a CPU).")] = False,
    steps_out: Annotated[Path | None, typer.Option(help="Also keep the raw measured steps (JSON lines).")] = None,
) -> None:
    """Time the live engine's steps over a grid, fit the step-time model, print R² and write the profile."""
    from rich.progress import Progress

    from sloserve_runtime.measure.profiler import ProfileGrid, profile_engine

    grid = ProfileGrid(prompt_lengths=(16, 256, 1024), concurrency=(1, 8, 24), repeats=1) if quick else ProfileGrid()
    try:
        with Progress(console=console) as progress:
            fit, metadata = profile_engine(model, grid, progress, steps_out)
    except (*USER_ERRORS, ValueError) as exc:
        raise _fail(str(exc)) from None
    table = Table(title=f"Step-time model {fit.model.name} (seconds)")
    for column in ("piece", "per token", "per request", "per context token", "per attended pair", "constant"):
        table.add_column(column, justify="right")
    for index, piece in enumerate(fit.model.pieces):
        table.add_row(
            str(index), f"{piece.per_token:.3e}", f"{piece.per_request:.3e}",
            f"{piece.per_context_token:.3e}", f"{piece.per_attended_pair:.3e}", f"{piece.constant:.3e}",
        )  # fmt: skip
    console.print(table)
    console.print(f"R² on {fit.test_points} held-out steps: {fit.r2_heldout:.3f} (fitted on {fit.train_points})")
    out.write_text(json.dumps(fit.model.to_json(**metadata), indent=2) + "\n")
    console.print(f"Wrote {out}")


def _run_replicated(app, chosen, inputs, options, drive, scaling, router, ray_address) -> None:  # noqa: ANN001
    from sloserve_runtime.cluster.deployment import ReplicaError, replicated

    _check_router(router)
    replicas, min_replicas, max_replicas = scaling
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            with console.status(f"Starting {replicas} engine replicas on Ray Serve (a minute or two)..."):
                running = stack.enter_context(
                    replicated(options, replicas, router, ray_address, min_replicas, max_replicas)
                )
            with console.status("Warming the replicas up (untimed requests)..."):
                server.warm_up(running.url, running.served_model)
            console.print(f"{replicas} replicas ready in {time.monotonic() - started:.0f}s behind {running.url}")
            _run_and_report(app, chosen, inputs, running.url, drive, None, running.served_model)
    except ReplicaError as exc:
        raise _fail(str(exc)) from None


# Beyond this many runs the report shows counts, not every run's input and output.
SHOWN_RUNS = 8


def _run_and_report(app, chosen, inputs, base_url, drive, api_key, model) -> None:  # noqa: ANN001
    import openai

    try:
        runs: Runs = asyncio.run(
            run_program(
                app,
                chosen,
                inputs,
                base_url,
                drive["concurrency"],
                api_key=api_key,
                model=model,
                console=console,
                rate=drive["rate"],
            )  # fmt: skip
        )
    except openai.APIConnectionError as exc:
        raise _fail(f"cannot reach the endpoint {base_url}: {exc}") from None
    results = runs.results
    if len(results) <= SHOWN_RUNS:
        table = Table(title=f"{app.name}: {chosen.name}", show_lines=True)
        table.add_column("input", overflow="fold")
        table.add_column("output", overflow="fold")
        for result in results:
            shown = " ".join(map(str, result.inputs))
            output = f"[red]{type(result.error).__name__}: {result.error}[/]" if result.error else str(result.output)
            table.add_row(shown, output)
        console.print(table)
    console.print(stage_table(runs.records))
    outcomes = run_outcomes(runs.records, runs.failures)
    met = sum(outcome.met for outcome in outcomes)
    deadline = f" and ended within {chosen.deadline_ms / 1000:g} s" if chosen.deadline_ms is not None else ""
    console.print(f"Program attainment: {met}/{len(outcomes)} runs met every stage's SLO{deadline}")
    if drive["rate"] is not None:
        wasted, computed = wasted_tokens(outcomes)
        share = f" ({wasted / computed:.0%})" if computed else ""
        console.print(
            f"Offered {drive['rate']:g} runs/s for {runs.seconds:.0f} s: {met / runs.seconds:.2f} runs/s met their "
            f"objectives; wasted work {wasted} of {computed} tokens{share} went to runs that missed anyway"
        )
    losses = losses_table(outcomes)
    if losses is not None:
        console.print(losses)
    failed = [result for result in results if result.error]
    if failed and drive["rate"] is None:
        raise _fail(f"{len(failed)} of {len(results)} program runs raised an error (shown above)")
    if failed:
        kinds = ", ".join(f"{name} x{count}" for name, count in Counter(runs.failures.values()).most_common())
        console.print(f"{len(failed)} of {len(results)} runs ended in an error ({kinds}); counted as missed")


def _measuring(command):  # noqa: ANN001, ANN202 - wraps a typer command
    """Report a user's mistake in a measuring command as one line, not a traceback."""

    @functools.wraps(command)
    def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        try:
            return command(*args, **kwargs)
        except (MeasureError, *USER_ERRORS) as exc:
            raise _fail(str(exc)) from None
        except httpx.HTTPError as exc:
            raise _fail(f"the endpoint failed: {exc}") from None

    return wrapped


cli.command("simulate")(_measuring(simulate.simulate_command))
cli.command("bench")(_measuring(bench.bench_command))
cli.command("overhead")(_measuring(measure.overhead_command))
cli.command("results")(_measuring(simulate.results_command))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"] and "--" in argv:
        split = argv.index("--")
        _vllm_args[:] = argv[split + 1 :]
        argv = argv[:split]
    cli(args=argv, prog_name="sloserve")
