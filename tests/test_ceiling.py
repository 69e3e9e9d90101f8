"""The work ceiling: what a program scenario's work costs on a profile, and that no scheduler passes it."""

from __future__ import annotations

import pytest

from sloserve.slo import SLO
from sloserve_runtime.core.step_time import LinearPiece, StepTimeModel, resolve_profile
from sloserve_runtime.measure.ceiling import call_work, tightest_tpot_s, work_ceiling
from sloserve_runtime.measure.summary import summarize
from sloserve_runtime.sim.loop import simulate
from sloserve_runtime.workload.programs import ProgramSpec, StageSpec
from sloserve_runtime.workload.scenarios import load_scenario
from sloserve_runtime.workload.scenarios.spec import Scenario


def test_a_call_pays_for_its_new_tokens_and_each_decode_reads_its_context():
    piece = LinearPiece(per_token=1.0, per_request=10.0, per_context_token=0.5, per_attended_pair=0.01)
    # 100 prompt tokens, 60 of them cached: 40 computed, attending to 40·100 − 40·39/2 = 3,220 keys.
    stage = StageSpec("turn", prompt_tokens=100, output_tokens=3, slo=SLO.parse("3x", "50ms"), shared_prefix_tokens=60)
    prefill = 40 * 1.0 + 10.0 + 0.5 * 100 + 0.01 * 3220
    # Decodes read contexts of 100, 101 and 102 tokens and attend to one more each.
    decodes = 3 * (1.0 + 10.0) + 0.5 * 303 + 0.01 * 306
    assert call_work(piece, stage) == pytest.approx(prefill + decodes)


def test_the_tightest_tpot_counts_a_thinking_phase():
    answer = StageSpec("answer", 10, 10, SLO.parse("3x", "100ms"))
    reason = StageSpec("reason", 10, 10, SLO(ttft_slowdown=3.0, tpot_ms=100.0, thinking_tpot_ms=40.0))
    untimed = StageSpec("batch", 10, 10, SLO())
    assert tightest_tpot_s([ProgramSpec(0, 0.0, "a", (answer, reason))]) == pytest.approx(0.04)
    assert tightest_tpot_s([ProgramSpec(0, 0.0, "b", (untimed,))]) is None


def test_a_fixed_step_cost_and_fewer_programs_met_move_the_ceiling():
    chat = Scenario.model_validate({
        "name": "chat", "description": "", "lengths_source": "",
        "classes": [{"name": "chat", "stages": [
            {"name": "chat", "prompt": {"mean": 100, "std": 0}, "output": {"mean": 50, "std": 0},
             "ttft": "3x", "tpot": "50ms"}]}],
    })  # fmt: skip
    # 0.15 s of work a program; 20 steps a second at 10 ms leave 0.8 s of each second.
    model = StepTimeModel("toy", (LinearPiece(per_token=0.001, constant=0.01),))
    full = work_ceiling(chat, model, attainment=1.0, samples=20)
    assert (full.work_s, full.steps_per_s, full.fixed_share) == pytest.approx((0.15, 20.0, 0.2))
    assert full.rate == pytest.approx(0.8 / 0.15)
    # Missing a tenth of the programs before any of their work leaves room for a tenth more.
    assert work_ceiling(chat, model, attainment=0.9, samples=20).rate == pytest.approx(full.rate / 0.9)
    # Of two pieces (a step takes the longer), the one that leaves less room binds.
    slow = LinearPiece(per_token=0.0005, constant=0.04)  # 0.075 s a program, 0.8 s of steps' fixed cost
    costly = StepTimeModel("toy2", (LinearPiece(per_token=0.001, constant=0.01), slow))
    assert work_ceiling(chat, costly, attainment=1.0, samples=20).rate == pytest.approx(0.2 / 0.075)
    with pytest.raises(ValueError, match="attainment"):
        work_ceiling(chat, model, attainment=0.0)


def test_no_scheduler_keeps_nine_programs_in_ten_at_the_ceiling():
    model = StepTimeModel.load(resolve_profile("h200-opt13b-measured"))
    scenario = load_scenario("tool-calling")
    ceiling = work_ceiling(scenario, model)
    trace = scenario.trace(ceiling.rate, 200, seed=0)
    for policy in ("sloserve", "vllm"):
        results = simulate(trace, policy, model)
        assert summarize(results, trace[-1].arrival_s).program_attainment < 0.9, policy
