"""A user's mistakes get a clear message naming the file and line, never our traceback."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from conftest import run_cli

GOOD_HEAD = "from sloserve import App, stage\napp = App('demo')\n"


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "app.py"
    path.write_text(textwrap.dedent(body))
    return path


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (GOOD_HEAD + "def broken(:\n    pass\n", ":3: syntax error"),
        (GOOD_HEAD, "has no program"),
        ("x = 1\n", "defines no sloserve App"),
        (
            GOOD_HEAD + "\n@stage(ttft='soon')\nasync def s(llm):\n    return ''\n",
            ":4: SLOError: invalid SLO ttft='soon'",
        ),
        (GOOD_HEAD + "@stage(tpot='3parsecs')\nasync def s(llm):\n    return ''\n", "unknown unit 'parsecs'"),
        (GOOD_HEAD + "import not_a_module_anywhere\n", ":3: ModuleNotFoundError"),
    ],
    ids=["syntax", "no-program", "no-app", "bad-ttft", "bad-unit", "import-error"],
)
def test_broken_app_file_gets_a_clear_error(tmp_path, body, expected):
    path = write(tmp_path, body)
    result = run_cli("run", str(path), "--endpoint", "http://127.0.0.1:9/v1", timeout=60)
    assert result.returncode == 2
    assert expected in result.stderr
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_missing_app_file(tmp_path):
    result = run_cli("run", str(tmp_path / "nope.py"), timeout=60)
    assert result.returncode == 2
    assert "no such file" in result.stderr


def test_unreachable_endpoint_is_reported_without_traceback(tmp_path):
    path = write(tmp_path, GOOD_HEAD + "@app.program\nasync def main():\n    return 1\n")
    result = run_cli("run", str(path), "--endpoint", "http://127.0.0.1:9/v1", timeout=60)
    assert result.returncode == 2
    assert "cannot reach the endpoint http://127.0.0.1:9/v1" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flag", ["--slo-ttft-ms", "--slo-tpot-ms"])
def test_serve_refuses_a_bad_default_slo(flag):
    result = run_cli("serve", "--port", "1", flag, "-5", timeout=60)
    assert result.returncode == 2
    assert f"invalid SLO {flag}" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_profile_it_cannot_find():
    result = run_cli("serve", "--port", "1", "--profile", "h100-nope", timeout=60)
    assert result.returncode == 2
    assert "--profile 'h100-nope': no such file or bundled profile" in result.stderr
    assert "a100-opt13b-slos-serve" in result.stderr  # it says what there is
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("scheduler", "message"), [("vllm", "stock scheduler has none"), ("sloserve-edf", "deadline only")]
)
def test_serve_refuses_max_yields_for_a_scheduler_without_the_planner(scheduler, message):
    result = run_cli("serve", "--port", "1", "--scheduler", scheduler, "--max-yields", "0", timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--replicas", "2", "--router", "random"], "--router 'random' is not one of slo, power-of-two"),
        (["--min-replicas", "3", "--max-replicas", "2"], "1 <= --min-replicas <= --max-replicas"),
    ],
    ids=["unknown-router", "scaling-bounds"],
)
def test_bad_replica_options_get_a_clear_error_before_ray_starts(args, expected):
    result = run_cli("serve", "--port", "8097", *args, timeout=60)
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr
