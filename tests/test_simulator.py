"""The discrete-event simulator: vLLM-style batching under the shared policies, without an engine."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
import time
from itertools import pairwise

import pytest

from conftest import run_cli
from sloserve.slo import SLO, judge
from sloserve_runtime.core.slo_state import BEST_EFFORT, REJECT, refusal
from sloserve_runtime.core.step_time import PROFILES_DIR, LinearPiece, StepTimeModel, resolve_profile
from sloserve_runtime.measure.ceiling import work_ceiling
from sloserve_runtime.sim import SimConfig, simulate
from sloserve_runtime.sim.loop import Simulation
from sloserve_runtime.workload.programs import ProgramSpec, StageResult, StageSpec
from sloserve_runtime.workload.scenarios import load_scenario

# A CPU-like engine: 512-token chunks, so a long prompt takes several steps to prefill.
MODEL = StepTimeModel(
    name="test-sim",
    pieces=(LinearPiece(per_token=0.0004, per_request=0.001, constant=0.03),),
    max_num_batched_tokens=512,
)
A100_PROFILE = PROFILES_DIR / "a100-opt13b-slos-serve.json"
CHAT = SLO.parse("5x", "100ms")


def program(program_id: int, arrival: float, *stages: StageSpec, kind: str = "chatbot") -> ProgramSpec:
    return ProgramSpec(program_id=program_id, arrival_s=arrival, kind=kind, stages=stages)


def chat(prompt: int, output: int, slo: SLO = CHAT, delay: float = 0.0, name: str = "chat") -> StageSpec:
    return StageSpec(name=name, prompt_tokens=prompt, output_tokens=output, slo=slo, delay_s=delay)


def random_trace(count: int, rate: float, seed: int = 7, stages: int = 1) -> list[ProgramSpec]:
    rng = random.Random(seed)
    arrival, trace = 0.0, []
    for index in range(count):
        arrival += rng.expovariate(rate)
        calls = [chat(rng.randint(20, 900), rng.randint(1, 60), delay=rng.uniform(0, 0.5)) for _ in range(stages)]
        trace.append(program(index, arrival, *calls))
    return trace


def first_tokens(results: list[StageResult]) -> dict[int, float]:
    return {result.program_id: result.token_times[0] for result in results}


@pytest.mark.parametrize("policy", ["sloserve", "vllm", "vllm-priority", "sarathi"])
def test_every_token_comes_after_arrival_in_increasing_time(policy):
    # An overload: every best-effort request is kept to be served (no bound on their queue).
    unbounded = dataclasses.replace(SimConfig.for_step_time(MODEL), max_queued_best_effort=None)
    results = simulate(random_trace(300, rate=8.0), policy, MODEL, unbounded)
    assert len(results) == 300
    for result in results:
        assert result.error is None
        assert len(result.token_times) == result.output_tokens
        assert result.token_times[0] > result.arrival
        assert all(later > earlier for earlier, later in pairwise(result.token_times))


def test_lone_request_runs_at_the_predicted_step_times():
    results = simulate([program(0, 2.0, chat(1000, 3))], "sloserve", MODEL)
    times = results[0].token_times
    # Zero load: the 1000-token prompt runs as chunks of 512 and 488, exactly as prefill_seconds predicts.
    assert times[0] == pytest.approx(2.0 + MODEL.prefill_seconds(1000))
    assert times[1] - times[0] == pytest.approx(MODEL.step_seconds(1, 1, 1001))
    assert times[2] - times[1] == pytest.approx(MODEL.step_seconds(1, 1, 1002))


def test_ttft_target_resolves_the_slowdown_with_the_step_time_model():
    (result,) = simulate([program(0, 0.0, chat(700, 2, SLO.parse("3x", "50ms")))], "sloserve", MODEL)
    assert result.ttft_target_ms == pytest.approx(3 * MODEL.prefill_seconds(700) * 1000)
    assert result.tpot_target_ms == 50


def test_kv_use_stays_within_capacity_while_preempting():
    config = SimConfig(step_time=MODEL, kv_capacity_tokens=2048)
    sim = Simulation(random_trace(200, rate=20.0, seed=3), "vllm", config)
    results = sim.run()
    assert sim.engine.preemptions > 0
    assert 0 < sim.engine.kv.peak_blocks <= config.kv_capacity_blocks
    assert sim.engine.kv.free_blocks == config.kv_capacity_blocks  # everything was given back
    assert all(len(result.token_times) == result.output_tokens for result in results)


def test_last_running_request_is_preempted_and_recomputes():
    # Two 16-token prompts each grow to 45 tokens (3 blocks); 4 blocks hold only one of them.
    config = SimConfig(step_time=MODEL, kv_capacity_tokens=64)
    sim = Simulation([program(0, 0.0, chat(16, 30)), program(1, 0.001, chat(16, 30))], "vllm", config)
    first, second = sim.run()
    assert sim.engine.preemptions == 1
    decode = [later - earlier for earlier, later in pairwise(first.token_times[1:])]
    assert max(decode) < 2 * min(decode)  # the first request never stalls
    assert second.token_times[-1] > first.token_times[-1]
    assert len(second.token_times) == 30


def test_fcfs_serves_equal_requests_in_arrival_order():
    trace = [program(index, 0.01 * index, chat(300, 20)) for index in range(40)]
    sim = Simulation(trace, "vllm", SimConfig(step_time=MODEL))
    order = first_tokens(sim.run())
    assert sim.engine.preemptions == 0
    assert [order[index] for index in range(40)] == sorted(order.values())
    assert order[0] < order[39]


@pytest.mark.parametrize(("policy", "loose_served_first"), [("sloserve", 1), ("vllm", 6)])
def test_tight_request_jumps_a_queue_of_loose_long_prefills(policy, loose_served_first):
    loose = SLO.parse("120s", "100ms")
    trace = [program(index, 0.001 * index, chat(1400, 1, loose)) for index in range(6)]
    # It arrives while the first long prompt is prefilling and the other five are queued; its
    # TTFT is attainable only if it goes next (the prefill under way takes about 0.66 s more).
    trace.append(program(99, 0.05, chat(10, 1, SLO.parse("1s", "100ms"))))
    first = first_tokens(simulate(trace, policy, MODEL))
    # Deadline order lets only the in-flight prefill finish first (the tight prompt rides in its
    # last step's leftover budget); FCFS serves it after every loose prompt has been admitted.
    assert sum(first[index] <= first[99] for index in range(6)) == loose_served_first


def test_a_tight_request_that_cannot_make_it_goes_best_effort():
    loose = SLO.parse("120s", "100ms")
    trace = [program(index, 0.001 * index, chat(1400, 1, loose)) for index in range(6)]
    trace.append(program(99, 0.05, chat(10, 1, SLO.parse("500ms", "100ms"))))
    tight = next(result for result in simulate(trace, "sloserve", MODEL) if result.program_id == 99)
    # The prefill under way alone ends after its deadline: no promise is made, and it says why.
    assert tight.best_effort
    assert tight.admission.startswith("TTFT: first token predicted at")


def test_same_trace_gives_identical_results():
    trace = random_trace(200, rate=10.0, seed=11, stages=2)
    assert simulate(trace, "sloserve", MODEL) == simulate(trace, "sloserve", MODEL)


def test_next_stage_is_sent_after_the_previous_ends_plus_its_delay():
    unbounded = dataclasses.replace(SimConfig.for_step_time(MODEL), max_queued_best_effort=None)  # no stage refused
    results = simulate(random_trace(100, rate=5.0, seed=5, stages=3), "sloserve", MODEL, unbounded)
    by_program: dict[int, list[StageResult]] = {}
    for result in results:
        by_program.setdefault(result.program_id, []).append(result)
    spec = {p.program_id: p for p in random_trace(100, rate=5.0, seed=5, stages=3)}
    for program_id, stages in by_program.items():
        assert len(stages) == 3
        for index in (1, 2):
            sent_at = stages[index - 1].token_times[-1] + spec[program_id].stages[index].delay_s
            assert stages[index].arrival == pytest.approx(sent_at)
            assert stages[index].arrival >= stages[index - 1].token_times[-1]


def test_request_larger_than_the_kv_cache_is_rejected_and_ends_its_program():
    config = SimConfig(step_time=MODEL, kv_capacity_tokens=1024)
    trace = [program(0, 0.0, chat(1000, 100), chat(10, 5)), program(1, 0.0, chat(100, 5))]
    results = simulate(trace, "sloserve", MODEL, config)
    assert [(result.program_id, result.error is None) for result in results] == [(0, False), (1, True)]
    assert "KV capacity" in results[0].error
    assert results[0].token_times == []


def test_kv_capacity_comes_from_the_profile():
    assert SimConfig.from_profile(A100_PROFILE).kv_capacity_tokens == 140_000
    a100 = StepTimeModel.load(A100_PROFILE)
    assert SimConfig.for_step_time(a100).kv_capacity_tokens == 140_000
    assert SimConfig.for_step_time(a100).batched_tokens == 2048
    with pytest.raises(ValueError, match="step_time"):
        simulate([], "sloserve", a100, SimConfig(step_time=MODEL))


def test_ten_thousand_requests_simulate_in_seconds():
    rng = random.Random(1)
    arrival, trace = 0.0, []
    for index in range(10_000):
        arrival += rng.expovariate(0.5)
        trace.append(program(index, arrival, chat(rng.randint(150, 250), rng.randint(150, 250))))
    a100 = StepTimeModel.load(A100_PROFILE)

    def seconds(programs: list[ProgramSpec]) -> float:
        started = time.perf_counter()
        results = simulate(programs, "sloserve", a100)
        assert sum(len(r.token_times) for r in results) == sum(r.output_tokens for r in results)
        return time.perf_counter() - started

    # The cost grows with the trace, not faster: five times the programs (below capacity, so the
    # same load throughout) take about five times as long on any machine, where a cost per step
    # that grew with the requests seen would take far more. About 10 s for the 10,000 on the
    # 2-core AVX-512 development machine, 55 s on an AVX2-only one.
    small, full = seconds(trace[:2_000]), seconds(trace)
    assert full < 8 * small, f"{small:.1f}s for 2,000, {full:.1f}s for 10,000"
    assert full < 300.0, f"{full:.1f}s"


def test_simulate_command_runs_each_cluster_and_counts_the_cluster_rate(tmp_path):
    out = tmp_path / "cluster.json"
    result = run_cli(
        "simulate", "--scenario", "chatbot", "--profile", "a100-opt13b-slos-serve", "--scheduler", "sloserve",
        "--replicas", "1,2", "--router", "slo,round-robin", "--capacity", "--num-requests", "60", "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Routing: capacity per replica" in result.stdout
    assert "Work ceiling" in result.stdout
    payload = json.loads(out.read_text())
    # One engine's work ceiling on the simulated engine's profile (a trace of 60 programs is too
    # short for a steady load, so its capacity is not held to it here; test_ceiling.py does that).
    model = StepTimeModel.load(resolve_profile("a100-opt13b-slos-serve"))
    ceiling = work_ceiling(load_scenario("chatbot"), model).rate
    assert payload["work_ceiling_rps"] == {"chatbot": round(ceiling, 4)}
    entries = payload["results"]
    # One replica needs no router: it runs once.
    assert [(e["replicas"], e["router"]) for e in entries] == [(1, None), (2, "slo"), (2, "round-robin")]
    for entry in entries:
        assert entry["capacity_rps"] > 0
        assert entry["capacity_per_replica_rps"] == pytest.approx(entry["capacity_rps"] / entry["replicas"])
        assert entry["rate"] == entry["capacity_rps"]  # the cluster's rate, as probed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--replicas", "0"], "--replicas '0': every count must be at least 1"),
        (["--replicas", "two"], "--replicas 'two': expected whole numbers"),
        (["--replicas", "2", "--router", "random"], "--router random: unknown; choose from slo, round-robin"),
    ],
)
def test_simulate_cluster_option_mistakes_are_one_line_errors(args, message):
    result = run_cli("simulate", "--scenario", "chatbot", "--rate", "1", *args, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def spec_config(drafts: int, alpha: float) -> SimConfig:
    return SimConfig(step_time=MODEL, num_speculative_tokens=drafts, spec_acceptance=alpha)


def steps_per_token(results: list[StageResult]) -> float:
    """Distinct token times per token after the first: 1 without speculation, less with it."""
    distinct = sum(len(set(result.token_times[1:])) for result in results)
    return distinct / sum(len(result.token_times) - 1 for result in results)


def test_speculation_yields_the_expected_tokens_per_step_and_replays_the_same():
    trace = [program(index, index * 0.5, chat(100, 400, SLO.parse("5x", None))) for index in range(4)]
    runs = [simulate(trace, "vllm", MODEL, spec_config(3, 0.5)) for _ in range(2)]
    assert [r.token_times for r in runs[0]] == [r.token_times for r in runs[1]]
    for result in runs[0]:
        assert len(result.token_times) == result.output_tokens
    # vLLM verifies all 3 drafts: (1 - 0.5^4) / (1 - 0.5) = 1.875 tokens a step on average.
    assert 1 / steps_per_token(runs[0]) == pytest.approx(1.875, rel=0.08)
    # Drafts that are never accepted give one token a step, as without speculation.
    assert steps_per_token(simulate(trace, "vllm", MODEL, spec_config(3, 0.0))) == 1.0


def test_loose_tier_drafts_nothing_and_tight_tier_speculates():
    loose = [program(index, index * 0.5, chat(100, 200, SLO.parse("5x", "2s"))) for index in range(3)]
    tight = [program(index, index * 0.5, chat(100, 200, SLO.parse("5x", "20ms"))) for index in range(3)]
    config = spec_config(3, 0.8)
    assert steps_per_token(simulate(loose, "sloserve", MODEL, config)) == 1.0
    assert steps_per_token(simulate(tight, "sloserve", MODEL, config)) < 0.6


def test_simulate_cli_labels_speculating_schedulers(tmp_path):
    out = tmp_path / "spec.json"
    result = run_cli(
        "simulate", "--scenario", "coding", "--profile", "a100-opt13b-slos-serve", "--scheduler", "sloserve",
        "--speculative-tokens", "0,4", "--rate", "0.5", "--num-requests", "30", "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["results"]
    assert [row["scheduler"] for row in rows] == ["sloserve", "sloserve+spec4"]
    bad = run_cli("simulate", "--scenario", "coding", "--speculative-tokens", "-1", "--rate", "1")
    assert bad.returncode != 0 and "--speculative-tokens" in bad.stderr


def test_simulate_cli_runs_reject_mode_beside_best_effort(tmp_path):
    """``--admission best-effort,reject`` runs ours both ways; stock vLLM admits everything, so once."""
    out = tmp_path / "modes.json"
    result = run_cli(
        "simulate", "--scenario", "overload", "--profile", "cpu-smollm2-135m", "--scheduler", "sloserve,vllm",
        "--admission", "best-effort,reject", "--rate", "8", "--num-requests", "60", "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["results"]
    assert [row["scheduler"] for row in rows] == ["sloserve", "sloserve+reject", "vllm"]
    refused = rows[1]["probes"][0]
    assert refused["failed"] == refused["best_effort"] > 0 and refused["best_effort_completed"] == 0
    bad = run_cli("simulate", "--scenario", "overload", "--admission", "drop", "--rate", "1")
    assert bad.returncode != 0 and "--admission drop" in bad.stderr


def test_simulate_cli_duration_sets_the_programs_of_each_rate(tmp_path):
    out = tmp_path / "duration.json"
    result = run_cli(
        "simulate", "--scenario", "overload", "--profile", "cpu-smollm2-135m", "--scheduler", "vllm",
        "--rates", "2,5", "--duration", "4", "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["duration_s"] == 4.0
    assert [probe["requests"] for probe in data["results"][0]["probes"]] == [8, 20]
    bad = run_cli("simulate", "--scenario", "overload", "--capacity", "--duration", "4")
    assert bad.returncode != 0 and "--duration" in bad.stderr


def test_a_request_that_arrives_mid_step_joins_when_the_step_ends(monkeypatch):
    """As vLLM's engine core adds requests between steps, the simulated engine admits a request
    that arrives during a step when that step ends, and an idle engine at once."""
    from sloserve_runtime.sim.engine import Engine

    model = StepTimeModel("toy", (LinearPiece(per_token=0.001, constant=0.010),), max_num_batched_tokens=512)
    slo = SLO.parse("5s", "100ms")
    trace = [
        ProgramSpec(0, 0.0, "chatbot", (StageSpec("chat", prompt_tokens=500, output_tokens=2, slo=slo),)),
        ProgramSpec(1, 0.1, "chatbot", (StageSpec("chat", prompt_tokens=50, output_tokens=2, slo=slo),)),
    ]
    added: list[float] = []
    original = Engine.add

    def recording_add(self, request, now):  # noqa: ANN001, ANN202
        added.append(now)
        return original(self, request, now)

    monkeypatch.setattr(Engine, "add", recording_add)
    results = simulate(trace, "sloserve", model)
    # The first prompt runs whole in one 0.51 s step; the second, sent at 0.1 s, joins after it.
    assert added == pytest.approx([0.0, 0.51])
    assert results[1].arrival == pytest.approx(0.1) and results[1].token_times[0] > 0.51


def noisy(spread: float, correlation: float) -> SimConfig:
    return SimConfig(step_time=MODEL, step_noise=spread, step_noise_correlation=correlation)


def test_step_noise_has_the_spread_and_correlation_asked_for():
    """A lone decode's gaps are the profile's step times times exp(x), x an AR(1) process."""
    trace = [program(0, 0.0, chat(10, 20_000, SLO.parse("5x", None)))]
    result = simulate(trace, "vllm", MODEL, noisy(0.15, 0.8))[0]
    gaps = [later - earlier for earlier, later in pairwise(result.token_times)]
    errors = [math.log(gap / MODEL.step_seconds(1, 1)) for gap in gaps]  # MODEL has no context term
    assert statistics.pstdev(errors) == pytest.approx(0.15, rel=0.1)
    assert statistics.correlation(errors[:-1], errors[1:]) == pytest.approx(0.8, abs=0.03)
    assert abs(statistics.fmean(errors)) < 0.03
    # The same run again draws the same steps; without noise every gap is the profile's.
    assert simulate(trace, "vllm", MODEL, noisy(0.15, 0.8)) == [result]
    exact = simulate(trace, "vllm", MODEL, noisy(0.0, 0.0))[0]
    assert [later - earlier for earlier, later in pairwise(exact.token_times[:50])] == pytest.approx(
        [MODEL.step_seconds(1, 1)] * 49
    )


def test_step_noise_leaves_a_run_without_it_as_it_was():
    trace = random_trace(150, rate=8.0, seed=3, stages=2)
    assert simulate(trace, "sloserve", MODEL, noisy(0.0, 0.5)) == simulate(trace, "sloserve", MODEL)
    assert simulate(trace, "sloserve", MODEL, noisy(0.1, 0.5)) != simulate(trace, "sloserve", MODEL)


@pytest.mark.parametrize(("spread", "correlation"), [(-0.1, 0.0), (0.1, 1.0), (0.1, -0.2)])
def test_step_noise_out_of_range_is_refused(spread, correlation):
    with pytest.raises(ValueError, match="step noise needs a spread of 0 or more and a correlation in"):
        noisy(spread, correlation)


def test_simulate_command_writes_the_step_noise_it_ran_with(tmp_path):
    out = tmp_path / "noisy.json"
    result = run_cli(
        "simulate", "--scenario", "chatbot", "--scheduler", "sloserve,vllm", "--rate", "0.3",
        "--num-requests", "20", "--step-noise", "0.1", "--step-noise-correlation", "0.7", "--calibrate",
        "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    payload = json.loads(out.read_text())
    assert payload["step_noise"] == [0.1, 0.7]
    assert payload["calibrate"] is True
    refused = run_cli("simulate", "--scenario", "chatbot", "--rate", "1", "--step-noise", "-1", timeout=60)
    assert refused.returncode == 2
    assert "--step-noise" in refused.stderr
    assert "Traceback" not in refused.stderr


def fronted(in_s: float, out_s: float) -> SimConfig:
    return SimConfig(step_time=MODEL, frontend_in_seconds=in_s, frontend_out_seconds=out_s)


def test_the_front_end_delays_what_the_client_sees_and_not_the_engine():
    """A call reaches the engine ``in`` after it was sent and each token reaches the client ``out``
    after the engine emitted it; the next stage is sent once the client has the last token."""
    trace = [program(0, 0.0, chat(100, 3), chat(50, 2, delay=0.2))]
    bare = simulate(trace, "sloserve", MODEL)
    fronted_results = simulate(trace, "sloserve", MODEL, fronted(0.05, 0.01))
    first, second = fronted_results
    assert first.arrival == 0.0
    assert first.token_times == pytest.approx([t + 0.06 for t in bare[0].token_times])
    # The second call is sent 0.2 s after the client read the first call's last token.
    assert second.arrival == pytest.approx(first.token_times[-1] + 0.2)
    assert second.arrival == pytest.approx(bare[1].arrival + 0.06)
    assert second.token_times == pytest.approx([t + 0.12 for t in bare[1].token_times])
    # Without a front end nothing moves.
    assert simulate(trace, "sloserve", MODEL, fronted(0.0, 0.0)) == bare


def test_the_front_end_counts_against_the_slo_from_the_send():
    """The SLO's clock starts at the send, as the server's middleware stamps it: a front end slower
    than a TTFT's slack turns a met first token into a missed one."""
    trace = [program(0, 0.0, chat(100, 3, SLO.parse("200ms", None)))]  # prefill: 71 ms on MODEL
    on_time = simulate(trace, "vllm", MODEL)[0]
    late = simulate(trace, "vllm", MODEL, fronted(0.15, 0.0))[0]
    assert judge(on_time.arrival, on_time.token_times, 200.0, None).ttft_met
    assert not judge(late.arrival, late.token_times, 200.0, None).ttft_met


def test_a_negative_front_end_is_refused():
    with pytest.raises(ValueError, match="the front end's delays must be 0 or more"):
        fronted(-0.01, 0.0)


def test_simulate_command_runs_and_records_a_front_end(tmp_path):
    out = tmp_path / "fronted.json"
    result = run_cli(
        "simulate", "--scenario", "chatbot", "--scheduler", "vllm", "--rate", "0.3", "--num-requests", "20",
        "--frontend-in-ms", "45", "--frontend-out-ms", "8", "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["frontend_ms"] == [45.0, 8.0]
    refused = run_cli("simulate", "--scenario", "chatbot", "--rate", "1", "--frontend-out-ms", "-5", timeout=60)
    assert refused.returncode == 2
    assert "--frontend-out-ms" in refused.stderr
    assert "Traceback" not in refused.stderr


def _overload(admission: str, max_queued_best_effort: int | None = 16) -> tuple[list[StageResult], list[StageResult]]:
    """The overload scenario at about three times what ours holds on the CPU profile."""
    from sloserve_runtime.measure.runs import TraceOptions

    config = dataclasses.replace(
        SimConfig.from_profile(resolve_profile("cpu-smollm2-135m")),
        admission=admission,
        max_queued_best_effort=max_queued_best_effort,
    )
    trace = TraceOptions(num_programs=300).trace(load_scenario("overload"), 8.6)
    results = simulate(trace, "sloserve", config.step_time, config)
    admitted = [result for result in results if not result.best_effort]
    return results, admitted


def test_reject_mode_refuses_at_arrival_and_the_refused_take_no_step():
    results, admitted = _overload("reject")
    refused = [result for result in results if result.best_effort]
    assert refused and all(result.error.startswith("rejected (HTTP 429): reject mode; ") for result in refused)
    assert all(result.token_times == [] for result in refused)
    assert len(admitted) + len(refused) == len(results)


def test_best_effort_queue_is_bounded_under_overload():
    """Past ``max_queued_best_effort`` best-effort requests waiting to start, a request the planner
    cannot promise is refused as in reject mode; without the bound the queue takes them all."""
    results, admitted = _overload("best-effort", max_queued_best_effort=4)
    refused = [result for result in results if result.error is not None]
    served = [result for result in results if result.best_effort and result.error is None]
    assert refused and all("best-effort queue full (4 waiting to start, at most 4)" in r.error for r in refused)
    assert all(result.token_times == [] for result in refused)
    assert served and all(len(result.token_times) == result.output_tokens for result in served)
    unbounded, _ = _overload("best-effort", max_queued_best_effort=None)
    assert not any(result.error for result in unbounded)
    # The refused ones are spared the wait: the run ends sooner, having answered the rest.
    assert max(r.token_times[-1] for r in served) < max(r.token_times[-1] for r in unbounded if r.token_times)


def test_refusal_follows_the_mode_and_the_queue_bound():
    assert refusal(REJECT, 0, None) == "reject mode"
    assert refusal(BEST_EFFORT, 15, 16) is None
    assert refusal(BEST_EFFORT, 16, 16) == "best-effort queue full (16 waiting to start, at most 16)"
    assert refusal(BEST_EFFORT, 10_000, None) is None
    with pytest.raises(ValueError, match="max_queued_best_effort must be 0 or more"):
        dataclasses.replace(SimConfig.for_step_time(MODEL), max_queued_best_effort=-1)


@pytest.mark.parametrize("admission", ["best-effort", "reject"])
def test_admitted_requests_keep_their_slo_at_three_times_capacity(admission):
    """Admitted requests keep their promise under a 3x overload, in each tier (here: the one)."""
    _, admitted = _overload(admission)
    met = [judge(r.arrival, r.token_times, r.ttft_target_ms, r.tpot_target_ms).met for r in admitted]
    assert len(admitted) >= 50
    assert sum(met) / len(met) >= 0.9


def test_an_unknown_admission_mode_is_refused():
    with pytest.raises(ValueError, match="use one of best-effort, reject"):
        dataclasses.replace(SimConfig.for_step_time(MODEL), admission="drop")
