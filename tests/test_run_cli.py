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
    [("examples/reasoning/app.py", ("reason",), "reasoning: solve"),
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


def test_run_drives_an_app_at_a_rate_and_reports_programs(engine):
    result = run_cli(
        "run", "examples/agents/app.py", "--endpoint", engine.base_url, "--rate", "2", "--duration", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Per-stage SLOs" in result.stdout and "act" in result.stdout
    assert "/4 runs met every stage's SLO" in result.stdout
    assert "Offered 2 runs/s" in result.stdout and "wasted work" in result.stdout


@pytest.mark.parametrize(
    ("options", "message"),
    [(["--duration", "5"], "--duration needs --rate"),
     (["--rate", "2", "--concurrency", "2", "--duration", "3"], "closed loop"),
     (["--rate", "0", "--duration", "3"], "positive number of program runs"),
     (["--rate", "2"], "--rate needs --duration")],
)  # fmt: skip
def test_run_rate_options_that_do_not_go_together_say_so(options, message):
    result = run_cli("run", "examples/agents/app.py", "--endpoint", "http://127.0.0.1:9/v1", *options)
    assert result.returncode == 2  # a usage error, as typer's own
    assert message in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
