"""`sloserve run`: run an app's program against an endpoint and report per-stage SLOs."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Any

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


async def run_program(
    app: App,
    program: Program,
    inputs: list[tuple[Any, ...]],
    base_url: str,
    concurrency: int,
    api_key: str | None = None,
    model: str | None = None,
    console: Console | None = None,
) -> tuple[list[ProgramResult], list[RequestRecord]]:
    """Run ``program`` once per input, at most ``concurrency`` at a time."""
    limit = asyncio.Semaphore(concurrency)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    async with Session(base_url, model=model, api_key=api_key, tools=app.tools) as session:
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(f"Running {program.name}", total=len(inputs))

            async def one(args: tuple[Any, ...]) -> ProgramResult:
                async with limit:
                    result = ProgramResult(args)
                    try:
                        result.output = await session.run(program, *args)
                    except Exception as exc:  # noqa: BLE001 - reported per run; the others go on
                        result.error = exc
                    progress.advance(task)
                    return result

            results = await asyncio.gather(*(one(args) for args in inputs))
    return list(results), session.records
