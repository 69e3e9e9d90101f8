"""Scenario files and the traces they generate, without the engine."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from sloserve.slo import SLO
from sloserve_runtime.workload.programs import ProgramSpec
from sloserve_runtime.workload.scenarios import SCENARIO_NAMES, SCENARIOS_DIR, StageClass, load_scenario


def gaps(trace: list[ProgramSpec]) -> np.ndarray:
    return np.diff([program.arrival_s for program in trace])


def test_every_scenario_file_is_named_and_loads():
    assert {path.stem for path in SCENARIOS_DIR.glob("*.yaml")} == set(SCENARIO_NAMES)
    for name in SCENARIO_NAMES:
        scenario = load_scenario(name)
        assert scenario.name == name
        assert scenario.lengths_source
        assert len(scenario.trace(rate=1.0, num_programs=20)) == 20


def test_unknown_scenario_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown scenario 'chat'; available: chatbot, coding, .*burst"):
        load_scenario("chat")


@pytest.mark.parametrize(
    ("name", "stage", "slo"),
    [("chatbot", "chat", SLO(ttft_slowdown=5, tpot_ms=100)), ("coding", "complete", SLO(ttft_slowdown=5, tpot_ms=50)),
     ("summarization", "summarize", SLO(ttft_slowdown=3, tpot_ms=100))],
)  # fmt: skip
def test_single_stage_slos_follow_the_design(name, stage, slo):
    for program in load_scenario(name).trace(rate=1.0, num_programs=50):
        assert [(call.name, call.slo) for call in program.stages] == [(stage, slo)]


def test_same_seed_same_trace_and_other_seed_another():
    scenario = load_scenario("tool-calling")
    assert scenario.trace(3.0, 200, seed=7) == scenario.trace(3.0, 200, seed=7)
    assert scenario.trace(3.0, 200, seed=7) != scenario.trace(3.0, 200, seed=8)


def test_program_ids_count_up_and_arrivals_increase_at_the_rate():
    trace = load_scenario("chatbot").trace(rate=4.0, num_programs=5000, seed=3)
    assert [program.program_id for program in trace] == list(range(5000))
    assert trace[0].arrival_s == 0.0
    assert np.all(gaps(trace) > 0)
    assert gaps(trace).mean() == pytest.approx(1 / 4.0, rel=0.05)


def test_low_burstiness_spreads_inter_arrivals_more_than_poisson():
    chatbot = load_scenario("chatbot")
    poisson = gaps(chatbot.trace(rate=2.0, num_programs=5000, seed=1))
    bursty = gaps(chatbot.with_burstiness(0.25).trace(rate=2.0, num_programs=5000, seed=1))
    assert poisson.std() / poisson.mean() == pytest.approx(1.0, abs=0.05)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.1)  # CV = 1/sqrt(burstiness)
    assert bursty.mean() == pytest.approx(0.5, rel=0.05)  # the rate is kept
    assert np.all(bursty >= 0)


def test_burst_stretch_arrives_four_times_denser():
    trace = load_scenario("burst").trace(rate=1.0, num_programs=5000, seed=2)
    arrivals = np.array([program.arrival_s for program in trace])
    inside = np.diff(arrivals[1500:2500])  # programs 30 % .. 50 % of the trace
    outside = np.concatenate([np.diff(arrivals[:1500]), np.diff(arrivals[2500:])])
    assert outside.mean() / inside.mean() == pytest.approx(4.0, rel=0.1)
    assert outside.mean() == pytest.approx(1.0, rel=0.05)


def test_mixed_interleaves_three_kinds_in_equal_shares():
    trace = load_scenario("mixed").trace(rate=1.0, num_programs=3000, seed=0)
    kinds, counts = np.unique([program.kind for program in trace], return_counts=True)
    assert kinds.tolist() == ["chatbot", "coding", "summarization"]
    assert counts / 3000 == pytest.approx([1 / 3] * 3, abs=0.03)
    assert {program.stages[0].name for program in trace if program.kind == "coding"} == {"complete"}


def test_slo_scale_doubles_targets_in_ms_and_keeps_slowdowns():
    scenario = load_scenario("reasoning")
    base, scaled = scenario.trace(1.0, 50, seed=4), scenario.trace(1.0, 50, seed=4, slo_scale=2.0)
    for program, twin in zip(base, scaled, strict=True):
        for call, double in zip(program.stages, twin.stages, strict=True):
            assert double.slo.tpot_ms == 2 * call.slo.tpot_ms
            assert double.slo.ttft_slowdown == call.slo.ttft_slowdown
            assert (double.prompt_tokens, double.output_tokens) == (call.prompt_tokens, call.output_tokens)
    base, scaled = (
        load_scenario("chat-ttft").trace(1.0, 5, seed=4),
        load_scenario("chat-ttft").trace(1.0, 5, seed=4, slo_scale=5.0),
    )
    for program, twin in zip(base, scaled, strict=True):
        assert program.stages[0].slo.ttft_ms == 500
        assert twin.stages[0].slo.ttft_ms == 2500
        assert twin.stages[0].slo.tpot_ms is None


def test_length_scale_shrinks_every_length():
    scenario = load_scenario("chatbot")
    full, quarter = scenario.trace(1.0, 300, seed=5), scenario.trace(1.0, 300, seed=5, length_scale=0.25)
    for program, small in zip(full, quarter, strict=True):
        call, short = program.stages[0], small.stages[0]
        assert abs(short.output_tokens - call.output_tokens / 4) <= 1
        assert abs(short.prompt_tokens - call.prompt_tokens / 4) <= 1
        assert short.output_tokens >= 1 and short.prompt_tokens >= 1


@pytest.mark.parametrize("name", SCENARIO_NAMES)
def test_max_model_len_fits_every_call(name):
    trace = load_scenario(name).trace(rate=1.0, num_programs=300, seed=6, max_model_len=2048)
    calls = [call for program in trace for call in program.stages]
    assert all(call.prompt_tokens + call.output_tokens <= 2048 for call in calls)
    assert all(call.prompt_tokens >= 1 and call.output_tokens >= 1 for call in calls)


def test_clipping_shrinks_prompt_and_output_in_proportion():
    # An unclipped summarization call has a prompt of thousands of tokens; clipped, it stays prompt-heavy.
    full = load_scenario("summarization").trace(1.0, 200, seed=9)
    clipped = load_scenario("summarization").trace(1.0, 200, seed=9, max_model_len=2048)
    for program, small in zip(full, clipped, strict=True):
        call, short = program.stages[0], small.stages[0]
        if call.prompt_tokens + call.output_tokens > 2048:
            assert short.prompt_tokens / short.output_tokens == pytest.approx(
                call.prompt_tokens / call.output_tokens, rel=0.05
            )
        else:
            assert short == call


def test_tool_calling_loops_then_answers_with_a_growing_context():
    trace = load_scenario("tool-calling").trace(rate=1.0, num_programs=500, seed=10)
    lengths = {len(program.stages) for program in trace}
    assert lengths == {3, 4, 5, 6, 7}  # 2 to 6 loop turns, then the answer
    for program in trace:
        *loops, final = program.stages
        assert [call.name for call in loops] == ["tool-loop"] * len(loops) and final.name == "final"
        assert all(call.slo == SLO(ttft_slowdown=3, tpot_ms=50) for call in loops)
        assert final.slo == SLO(ttft_slowdown=3, tpot_ms=100)
        assert program.stages[0].delay_s == 0.0 and all(call.delay_s > 0 for call in program.stages[1:])
        for before, after in zip(program.stages, program.stages[1:], strict=False):
            assert after.prompt_tokens > before.prompt_tokens + before.output_tokens


def test_reasoning_thinks_then_answers_in_one_generation():
    trace = load_scenario("reasoning").trace(rate=1.0, num_programs=200, seed=11)
    for program in trace:
        (call,) = program.stages
        assert call.name == "reason"
        assert call.slo == SLO(ttft_slowdown=3, tpot_ms=100, thinking_tpot_ms=50)
        assert 0 < call.thinking_tokens < call.output_tokens  # it thinks, then answers
    assert np.mean([program.stages[0].thinking_tokens for program in trace]) > 2000  # thinking is long
    fitted = load_scenario("reasoning").trace(rate=1.0, num_programs=50, seed=11, max_model_len=2048)
    assert all(0 < c.thinking_tokens < c.output_tokens and c.prompt_tokens + c.output_tokens <= 2048
               for p in fitted for c in p.stages)  # fmt: skip


def test_a_reasoning_stage_needs_both_its_thinking_lengths_and_tpot():
    with pytest.raises(ValidationError, match="thinking"):
        StageClass(name="s", prompt={"mean": 10, "std": 1}, output={"mean": 10, "std": 1}, ttft="3x",
                   tpot="50ms", thinking_tpot="20ms")  # fmt: skip


def test_a_stage_with_an_unparsable_slo_is_rejected():
    with pytest.raises(ValidationError, match="invalid SLO ttft='fast'"):
        StageClass(name="s", prompt={"mean": 10, "std": 1}, output={"mean": 10, "std": 1}, ttft="fast", tpot="50ms")


def test_invalid_trace_arguments_are_rejected():
    scenario = load_scenario("chatbot")
    with pytest.raises(ValueError, match="must be positive"):
        scenario.trace(rate=0.0, num_programs=10)
    with pytest.raises(ValueError, match="max_model_len=1"):
        scenario.trace(rate=1.0, num_programs=10, max_model_len=1)


def test_an_apps_own_scenario_file_loads_by_its_path(tmp_path):
    path = tmp_path / "my-agent.yaml"
    path.write_text(
        "name: my-agent\ndescription: an app's own workload\nlengths_source: recorded from its runs\n"
        "classes:\n  - name: agent\n    stages:\n"
        "      - {name: act, prompt: {mean: 300, std: 50}, output: {mean: 40, std: 10}, ttft: 1s, tpot: 150ms,"
        " repeat: {2: 1}}\n"
        "      - {name: respond, prompt: {mean: 100, std: 10}, output: {mean: 60, std: 10}, ttft: 5x, tpot: 300ms}\n"
    )
    trace = load_scenario(str(path)).trace(rate=1.0, num_programs=5)
    assert [stage.name for stage in trace[0].stages] == ["act", "act", "respond"]
    with pytest.raises(ValueError, match="No such file"):
        load_scenario(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("classes: 3\n")
    with pytest.raises(ValueError, match="classes must be a list"):
        load_scenario(str(tmp_path / "bad.yaml"))


def test_a_program_class_may_give_its_runs_a_deadline(tmp_path):
    path = tmp_path / "agents.yaml"
    path.write_text(
        "name: agents\ndescription: examples/agents' shape\nlengths_source: recorded from its runs\n"
        "classes:\n  - name: agent\n    deadline: 15s\n    stages:\n"
        "      - {name: act, prompt: {mean: 80, std: 20}, output: {mean: 40, std: 10}, ttft: 1s, tpot: 150ms}\n"
    )
    trace = load_scenario(str(path)).trace(rate=1.0, num_programs=3)
    assert [program.deadline_s for program in trace] == [15.0, 15.0, 15.0]
    assert all(program.deadline_s is None for program in load_scenario("tool-calling").trace(1.0, 3))
    path.write_text(path.read_text().replace("deadline: 15s", "deadline: soon"))
    with pytest.raises(ValueError, match="deadline"):
        load_scenario(str(path))
