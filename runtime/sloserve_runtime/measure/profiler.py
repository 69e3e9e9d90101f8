"""`sloserve profile`: time the live engine's steps over a grid and fit the step-time model."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from rich.progress import Progress

from sloserve_runtime.core.profile_fit import FitResult, StepSample, fit_step_time
from sloserve_runtime.serving import server


@dataclass(frozen=True)
class ProfileGrid:
    """The workloads the profiler runs: every (prompt length, concurrent requests) pair."""

    prompt_lengths: tuple[int, ...] = (16, 128, 512, 1024, 1960)  # up to the default 2,048-token context
    concurrency: tuple[int, ...] = (1, 4, 16, 32)
    output_tokens: int = 24  # decode steps per request
    repeats: int = 2

    def cells(self) -> list[tuple[int, int]]:
        return list(itertools.product(self.prompt_lengths, self.concurrency)) * self.repeats


async def _run_cell(
    client: httpx.AsyncClient, model: str, prompt_tokens: int, requests: int, output_tokens: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    # Random token ids: no two prompts share a prefix, so the prefix cache cannot skip work.
    bodies = [
        {
            "model": model,
            "prompt": rng.integers(100, 20_000, size=prompt_tokens).tolist(),
            "max_tokens": output_tokens,
            "ignore_eos": True,
            # Streamed, as clients of a latency-bound service read: the API server's per-token work
            # then shares the CPU with the engine as it does in serving, and the cycle times show it.
            "stream": True,
        }
        for _ in range(requests)
    ]
    await asyncio.gather(*(_stream(client, body) for body in bodies))


async def _stream(client: httpx.AsyncClient, body: dict) -> None:
    async with client.stream("POST", "/completions", json=body) as response:
        response.raise_for_status()
        async for _ in response.aiter_lines():
            pass


async def _drive(base_url: str, model: str, grid: ProfileGrid, progress: Progress) -> None:
    cells = grid.cells()
    task = progress.add_task("Profiling engine steps", total=len(cells))
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        for seed, (prompt_tokens, requests) in enumerate(cells):
            await _run_cell(client, model, prompt_tokens, requests, grid.output_tokens, seed)
            progress.advance(task)


def read_steps(path: Path) -> list[StepSample]:
    return [StepSample.from_record(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def profile_engine(
    model: str | None, grid: ProfileGrid, progress: Progress, steps_out: Path | None = None
) -> tuple[FitResult, dict[str, str]]:
    """Start an engine that logs its steps, run the grid, fit, and describe what was measured."""
    with tempfile.TemporaryDirectory(prefix="sloserve-profile-") as scratch:
        step_log = Path(scratch) / "steps.jsonl"
        options = server.ServerOptions(
            model=model,
            port=server.free_port(),
            step_log=str(step_log),
            extra_args=["--no-enable-prefix-caching"],
        )
        with server.embedded_server(options) as running:
            asyncio.run(_drive(running.url, running.served_model, grid, progress))
        samples = read_steps(step_log)
        if steps_out is not None:
            steps_out.write_text(step_log.read_text())
    name = f"{platform.machine()}-{running.served_model}".lower()
    source = (
        f"measured by `sloserve profile` on this machine: {len(samples)} engine steps over prompt lengths "
        f"{list(grid.prompt_lengths)} x concurrency {list(grid.concurrency)}, {grid.output_tokens} output "
        "tokens each, streamed, prefix caching off; fitted to each step's engine cycle (schedule() to the "
        "next schedule() while busy), timed inside the scheduler"
    )
    fit = fit_step_time(samples, name, source, options.max_num_batched_tokens)
    hardware = f"{os.cpu_count()} CPUs ({platform.machine()}), vLLM engine as `sloserve serve` starts it"
    metadata = {"model": running.served_model, "hardware": hardware}
    return fit, metadata
