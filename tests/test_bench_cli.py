"""`sloserve bench` against the real engine and `sloserve simulate`, through the command line."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli


def test_short_bench_run_against_the_real_engine(engine, tmp_path):
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    result = run_cli(
        "bench", "--scenario", "chatbot", "--rate", "2", "--num-requests", "20", "--length-scale", "0.1",
        "--endpoint", engine.base_url, "--compare", engine.base_url, "--simulate-as", "sloserve,vllm",
        "--json", str(out), "--plot", str(plot), "--save-detailed", "--frontend-in-ms", "60", "--frontend-out-ms", "8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Fidelity" in result.stdout
    data = json.loads(out.read_text())
    assert [entry["scheduler"] for entry in data["results"]] == [engine.base_url, engine.base_url]
    probe = data["results"][0]["probes"][0]
    assert probe["requests"] == 20 and probe["failed"] == 0 and probe["completed"] == 20
    assert 0.0 <= probe["attainment"] <= 1.0
    assert probe["output_throughput_tps"] > 0
    assert probe["ttft_ms"]["p50"] <= probe["ttft_ms"]["p90"] <= probe["ttft_ms"]["p99"]
    fidelity = data["fidelity"][0]["rates"][0]
    assert set(fidelity["relative_error"]) == {"ttft_p50_ms", "ttft_p90_ms", "tpot_p90_ms", "attainment"}
    assert data["fidelity"][0]["frontend_ms"] == [60.0, 8.0]
    assert plot.stat().st_size > 10_000
    # --save-detailed: every call, with the server's id for it and every token's time, in the step
    # log's timeline of the engine too.
    calls = probe["calls"]
    assert len(calls) == 20 and all(call["request_id"].startswith("cmpl-") for call in calls)
    # Our scheduler decided on every call: the decision and its reason came with the last chunk.
    assert all(call["admission"] for call in calls)
    assert probe["admitted_attainment"] is not None
    assert sum(call["best_effort"] for call in calls) == probe["best_effort"]
    for call in calls:
        assert len(call["token_times"]) == call["output_tokens"]
        assert call["arrival"] <= call["token_times"][0]
        assert call["token_times"] == sorted(call["token_times"])
    logged = engine.step_log.read_text()
    assert all(f'"{call["request_id"]}-0-' in logged for call in calls)


def test_sustained_bench_in_both_admission_modes_reports_the_server(engine, tmp_path):
    """``--duration`` sets the programs of each rate; ``--admission`` runs each mode against the
    endpoint; every run samples the server's memory and vLLM's queues from its /metrics."""
    out = tmp_path / "overload.json"
    result = run_cli(
        "bench", "--scenario", "overload", "--rates", "2,4", "--duration", "3", "--length-scale", "0.25",
        "--endpoint", engine.base_url, "--admission", "best-effort,reject", "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "memory and vLLM's queues" in result.stdout
    data = json.loads(out.read_text())
    labels = [entry["scheduler"] for entry in data["results"]]
    assert labels == [f"{engine.base_url} [best-effort]", f"{engine.base_url} [reject]"]
    for entry in data["results"]:
        assert [probe["requests"] for probe in entry["probes"]] == [6, 12]
        for probe in entry["probes"]:
            server = probe["server"]
            assert server["samples"] >= 1 and server["running_max"] >= 0 and server["waiting_max"] >= 0
            # The engine core holds the model and the KV cache: far more than the client's own process.
            assert server["rss_start_mb"] > 200 and server["rss_peak_mb"] >= server["rss_start_mb"]
    mistake = run_cli("bench", "--scenario", "overload", "--capacity", "--duration", "5", timeout=60)
    assert mistake.returncode != 0 and "--duration" in mistake.stderr


def test_save_detailed_needs_a_json_file():
    result = run_cli("bench", "--scenario", "chatbot", "--rate", "1", "--save-detailed", timeout=60)
    assert result.returncode == 2
    assert "--save-detailed saves into the results JSON: give --json FILE too" in result.stderr
    assert "Traceback" not in result.stderr


def test_simulate_writes_the_documented_json(tmp_path):
    out = tmp_path / "sim.json"
    result = run_cli(
        "simulate", "--scenario", "coding", "--profile", "a100-opt13b-slos-serve", "--scheduler",
        "sloserve,vllm", "--rate", "1", "--num-requests", "200", "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    entries = json.loads(out.read_text())["results"]
    assert [(e["scenario"], e["scheduler"], e["rate"]) for e in entries] == [
        ("coding", "sloserve", 1.0),
        ("coding", "vllm", 1.0),
    ]
    for entry in entries:
        assert {"attainment", "capacity_rps", "ttft_p90_ms", "tpot_p90_ms"} <= set(entry)
        assert entry["capacity_rps"] is None
        assert entry["ttft_p90_ms"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scenario", "chatbot", "--rate", "1", "--capacity"], "exactly one of --rate, --rates or --capacity"),
        (["--scenario", "nope", "--rate", "1"], "unknown scenario 'nope'"),
        (["--scenario", "chatbot", "--rates", "1,x"], "expected comma-separated numbers"),
        (["--scenario", "chatbot", "--rate", "1", "--scheduler", "magic"], "--scheduler magic: unknown"),
        (["--scenario", "chatbot", "--rate", "1", "--profile", "h900"], "no such file or bundled profile"),
    ],
)
def test_simulate_option_mistakes_are_one_line_errors(args, message):
    result = run_cli("simulate", *args, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_overhead_prints_one_row_per_size():
    result = run_cli("overhead", "--live", "8,32", "--repeats", "5", "--profile", "a100-opt13b-slos-serve", timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.strip().startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == ["8", "32"]
    assert all(float(cell.strip()) >= 0 for row in rows for cell in row.split("│")[2:-1])


@pytest.mark.parametrize(("live", "message"), [("64,lots", "give whole numbers"), ("0", "at least 1")])
def test_overhead_option_mistakes_are_one_line_errors(live, message):
    result = run_cli("overhead", "--live", live, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_call_counts_as_admitted_in_its_last_state_as_in_the_simulator():
    from sloserve_runtime.measure.bench import _note_admission
    from sloserve_runtime.workload.programs import StageResult

    def noted(outcome: dict) -> StageResult:
        result = StageResult(0, "two-tiers", "interactive", 0.0, [], 128, 64, 500.0, 30.0)
        _note_admission(result, outcome)
        return result

    admitted = noted({"admission": "admitted", "admission_reason": "admitted", "admission_changes": []})
    assert not admitted.best_effort and admitted.admission == "admitted"
    demoted = noted({
        "admission": "admitted", "admission_reason": "admitted",
        "admission_changes": [{"change": "demoted", "reason": "demoted to best effort: decode capacity: ..."}],
    })  # fmt: skip
    assert demoted.best_effort and demoted.admission.startswith("demoted to best effort")
    promoted = noted({
        "admission": "best-effort", "admission_reason": "TTFT: ...",
        "admission_changes": [{"change": "promoted", "reason": "admitted: promoted from best effort (...)"}],
    })  # fmt: skip
    assert not promoted.best_effort
    assert noted({"admission": None}).admission is None  # stock vLLM reports none
