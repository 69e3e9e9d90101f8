"""`sloserve run`: run an app's program against an endpoint and report per-stage SLOs.

Runs go a few at a time (a closed loop: ``--concurrency``), or arrive at a rate whatever the
engine does (an open loop: ``--rate``, paced with ``asyncio-throttle``), which is how an app's
owner learns what load it will hold.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from asyncio_throttle import Throttler
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sloserve.app import App, Program
from sloserve.session import RequestRecord, Session


@dataclass
class ProgramResult:
    """One program run: its input, and its output or the error it raised."""

    inputs: tuple[Any, ...]
    output: Any = None
    error: BaseException | None = None


@dataclass
class Runs:
    """What `sloserve run` ran: each run's result, every LLM request, and the errors by run id."""

    results: list[ProgramResult]
    records: list[RequestRecord]
    failures: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0  # from the first run's start to the last one's end


def program_inputs(program: Program, cli_args: list[str], requests: int | None) -> list[tuple[Any, ...]]:
    """Inputs for each run: the CLI's args (all runs alike) or the program's examples, cycled."""
    if cli_args:
        pool: list[tuple[Any, ...]] = [tuple(cli_args)]
    elif program.examples:
        pool = program.examples
    else:
        pool = [()]
    count = requests if requests is not None else len(pool)
    return list(itertools.islice(itertools.cycle(pool), count))


def runs_at_rate(rate: float, duration_s: float) -> int:
    """How many runs arrive in ``duration_s`` at ``rate`` per second (at least one)."""
    return max(1, math.ceil(rate * duration_s))


async def run_program(
    app: App,
    program: Program,
    inputs: list[tuple[Any, ...]],
    base_url: str,
    concurrency: int | None = 1,
    api_key: str | None = None,
    model: str | None = None,
    console: Console | None = None,
    rate: float | None = None,
) -> Runs:
    """Run ``program`` once per input: at most ``concurrency`` at a time, or, with ``rate``, one
    starting every 1/``rate`` seconds however many are in flight."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    loop = asyncio.get_running_loop()
    async with Session(base_url, model=model, api_key=api_key, tools=app.tools) as session:
        with Progress(*columns, console=console, transient=True) as progress:
            how = f"at {rate:g}/s" if rate is not None else f"{concurrency} at a time"
            task = progress.add_task(f"Running {program.name} {how}", total=len(inputs))

            async def one(args: tuple[Any, ...]) -> ProgramResult:
                result = ProgramResult(args)
                try:
                    result.output = await session.run(program, *args)
                except Exception as exc:  # noqa: BLE001 - reported per run; the others go on
                    result.error = exc
                progress.advance(task)
                return result

            started = loop.time()
            if rate is None:
                results = await _closed_loop(one, inputs, concurrency or 1)
            else:
                results = await _open_loop(one, inputs, rate)
            seconds = loop.time() - started
    return Runs(list(results), session.records, dict(session.failures), seconds)


async def _closed_loop(
    one: Callable[[tuple[Any, ...]], Awaitable[ProgramResult]], inputs: list[tuple[Any, ...]], concurrency: int
) -> list[ProgramResult]:
    limit = asyncio.Semaphore(concurrency)

    async def limited(args: tuple[Any, ...]) -> ProgramResult:
        async with limit:
            return await one(args)

    return list(await asyncio.gather(*(limited(args) for args in inputs)))


async def _open_loop(
    one: Callable[[tuple[Any, ...]], Awaitable[ProgramResult]], inputs: list[tuple[Any, ...]], rate: float
) -> list[ProgramResult]:
    """Start a run every 1/``rate`` seconds, each as its own task: a slow engine does not slow the
    arrivals (an open loop), so the load is the rate asked for."""
    throttler = Throttler(rate_limit=1, period=1.0 / rate, retry_interval=min(0.01, 0.1 / rate))
    tasks = []
    for args in inputs:
        async with throttler:
            tasks.append(asyncio.ensure_future(one(args)))
    return list(await asyncio.gather(*tasks))
