"""Shared fixtures: one real engine per test session, started through `sloserve serve`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sloserve_runtime.serving.server import free_port

ROOT = Path(__file__).resolve().parents[1]
SLOSERVE = [sys.executable, "-m", "sloserve_runtime"]
# The session engine runs with a server-wide TPOT default, so tests can see defaults applied.
SERVER_DEFAULT_TPOT_MS = 900
MAX_NUM_QUEUED_REQS = 20


class Engine:
    """A running `sloserve serve` process."""

    def __init__(self, port: int, process: subprocess.Popen, log: Path, step_log: Path) -> None:
        self.port = port
        self.process = process
        self.log = log
        self.step_log = step_log  # one JSON line per engine step, written by our scheduler
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.model = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    port = free_port()
    folder = tmp_path_factory.mktemp("engine")
    log, step_log = folder / "serve.log", folder / "steps.jsonl"
    command = [
        *SLOSERVE,
        "serve",
        "--port",
        str(port),
        "--slo-tpot-ms",
        str(SERVER_DEFAULT_TPOT_MS),
        "--step-log",
        str(step_log),
        # vLLM's own queue cap passes through; no other test has this many requests in flight.
        "--",
        "--max-num-queued-reqs",
        str(MAX_NUM_QUEUED_REQS),
    ]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(port, process, log)
        yield Engine(port, process, log, step_log)
    finally:
        _stop(process)


def _wait_healthy(port: int, process: subprocess.Popen, log: Path, timeout: float = 400.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"`sloserve serve` exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    _stop(process)
    pytest.fail(f"`sloserve serve` did not become healthy in {timeout}s:\n{log.read_text()[-4000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the `sloserve` command line as a user would, from the project root."""
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.run([*SLOSERVE, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
