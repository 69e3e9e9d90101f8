"""`sloserve run` on both examples: against the session engine, and on its own embedded engine."""

from __future__ import annotations

import subprocess

import pytest

from conftest import run_cli


def engine_processes() -> set[int]:
    found = subprocess.run(["pgrep", "-f", "vllm.entrypoints.openai.api_server"], capture_output=True, text=True)
    return {int(pid) for pid in found.stdout.split()}


@pytest.mark.parametrize(
    ("app", "stages", "title"),
    [("examples/reasoning/app.py", ("think", "answer"), "reasoning: solve"),
     ("examples/agents/app.py", ("act", "respond"), "agents: agent")],
)  # fmt: skip
def test_run_prints_results_and_stage_table(engine, app, stages, title):
    result = run_cli("run", app, "--endpoint", engine.base_url, "--concurrency", "2")
    assert result.returncode == 0, result.stderr
    assert title in result.stdout
    assert "Per-stage SLOs" in result.stdout
    for stage in stages:
        assert stage in result.stdout
    assert "Program attainment:" in result.stdout and "/2 runs" in result.stdout


def test_run_passes_app_args_and_repeats_requests(engine):
    result = run_cli(
        "run", "examples/reasoning/app.py", "--endpoint", engine.base_url, "--requests", "3",
        "--concurrency", "3", "--", "What is 2 + 2?",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("What is 2 + 2?") == 3
    assert "/3 runs" in result.stdout


def test_run_on_the_embedded_engine_starts_and_stops_it(engine):
    before = engine_processes()
    result = run_cli("run", "examples/reasoning/app.py", "--requests", "1", timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Engine ready" in result.stdout
    assert "reasoning: solve" in result.stdout and "Per-stage SLOs" in result.stdout
    assert engine_processes() == before, "the embedded engine must not outlive `sloserve run`"
