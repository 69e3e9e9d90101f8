"""A prompt's own step: the admitted decodes sit a step out for a prompt that would be late beside
them, where every decode's attainment windows can spare that step and its own next one."""

from __future__ import annotations

import pytest

from sloserve.slo import SLO, judge
from sloserve_runtime.core.planner import LiveRequest, Planner
from sloserve_runtime.core.slo_state import SLORequestState
from sloserve_runtime.core.step_time import LinearPiece, StepTimeModel
from sloserve_runtime.sim import simulate
from sloserve_runtime.workload.programs import ProgramSpec, StageSpec

# 10 ms a step, 0.1 ms a token, 2 us a token of context read: ten decodes over 2,000 tokens of
# context each take 51 ms a step, a 200-token prompt alone 30 ms, and beside them 71 ms.
MODEL = StepTimeModel(
    "solo-test", (LinearPiece(per_token=0.0001, per_context_token=2e-6, constant=0.010),), max_num_batched_tokens=4096
)
DECODE = SLO.parse("5x", "100ms")


def decode(name: str, gaps: list[float], context: int = 2000) -> LiveRequest:
    """An admitted decode whose output tokens came at these gaps after a first token at t = 1 s."""
    state = SLORequestState.create(name, DECODE, 0.0, context, MODEL)
    now = 1.0
    state.record_output(now, 1)
    for index, gap in enumerate(gaps, start=2):
        now += gap
        state.record_output(now, index)
    return LiveRequest(state, 1, context)


def prompt(now: float, ttft: str, tokens: int = 200) -> LiveRequest:
    return LiveRequest(SLORequestState.create("prompt", SLO.parse(ttft, "100ms"), now, tokens, MODEL), tokens, 0)


def planner(**settings) -> Planner:
    return Planner(MODEL, max_budget=4096, headroom=1.0, window_reserve=0.75, **settings)


def ahead_of_pace() -> list[LiveRequest]:
    """Ten decodes whose last ten tokens came every 60 ms, against a 100 ms TPOT."""
    return [decode(f"d{i}", [0.06] * 20) for i in range(10)]


def test_a_prompt_late_beside_the_decodes_gets_a_step_of_its_own():
    decodes = ahead_of_pace()
    now = decodes[0].state.token_times[-1]
    new = prompt(now, "60ms")
    solo = planner()
    hold = solo.held_back(decodes, True, now, [new])
    assert hold.held == [True] * len(decodes)
    assert solo.token_budget(decodes, True, now, 0, hold) == 200  # the whole prompt, nothing else
    # Without it, decodes with a TPOT never sit out, and the prompt shares their step.
    shared = planner(solo_prompts=False)
    assert shared.held_back(decodes, True, now, [new]).held == [False] * len(decodes)


def test_admission_counts_on_that_step():
    decodes = ahead_of_pace()
    now = decodes[0].state.token_times[-1]
    new = prompt(now, "60ms")
    assert planner().admit(now, new, decodes).admitted
    assert planner().first_token_time(now, new, decodes) > now  # a router's prediction still counts the step under way
    refused = planner(solo_prompts=False).admit(now, new, decodes)
    assert not refused.admitted and refused.reason.startswith("TTFT: first token predicted at 71 ms")


def test_no_step_of_its_own_for_a_prompt_on_time_beside_the_decodes():
    decodes = ahead_of_pace()
    now = decodes[0].state.token_times[-1]
    hold = planner().held_back(decodes, True, now, [prompt(now, "2s")])
    assert hold.held == [False] * len(decodes) and hold.solo is None


def test_a_decode_behind_its_pace_keeps_every_decode_in_the_step():
    # One decode's last nine gaps took 900 ms: its window leaves no room for a step without it.
    decodes = [*ahead_of_pace()[:9], decode("behind", [0.06] * 20 + [0.1] * 9)]
    now = max(r.state.token_times[-1] for r in decodes)
    new = prompt(now, "60ms")
    assert planner().held_back(decodes, True, now, [new]).held == [False] * len(decodes)
    assert not planner().admit(now, new, decodes).admitted


def test_no_step_of_its_own_without_the_prompts_kv():
    decodes = ahead_of_pace()
    now = decodes[0].state.token_times[-1]
    new = prompt(now, "60ms")
    # The engine's free KV (``kv_room``) must hold the prompt's 200 tokens.
    assert planner().held_back(decodes, True, now, [new], kv_room=199).solo is None
    assert planner().held_back(decodes, True, now, [new], kv_room=200).solo is not None


def busy_decodes_and_short_prompts() -> list[ProgramSpec]:
    """Long decodes with 2,000-token prompts (TPOT 100 ms), and 200-token prompts with a 60 ms TTFT among them."""
    trace = []
    for index in range(8):
        long = StageSpec("long", prompt_tokens=2000, output_tokens=400, slo=SLO.parse("3s", "100ms"))
        trace.append(ProgramSpec(index, index * 0.3, "long", (long,)))
    for index in range(20):
        short = StageSpec("short", prompt_tokens=200, output_tokens=10, slo=SLO.parse("60ms", "100ms"))
        trace.append(ProgramSpec(8 + index, 3.0 + index * 0.7, "short", (short,)))
    return trace


def test_a_simulated_engine_keeps_every_window_and_meets_the_first_tokens():
    trace = busy_decodes_and_short_prompts()
    solo = simulate(trace, "sloserve", MODEL)
    shared = simulate(trace, "sloserve-nosolo", MODEL)

    def met(results, kind, admitted_only=False):
        return [
            judge(r.arrival, r.token_times, r.ttft_target_ms, r.tpot_target_ms).met
            for r in results
            if r.kind == kind and not (admitted_only and r.best_effort)
        ]

    # The long decodes keep every window with or without the short prompts' own steps.
    assert all(met(solo, "long")) and all(met(shared, "long"))
    # Beside the decodes a short prompt's first token comes after 75-105 ms: all are refused. With
    # a step of its own it comes in 30-60 ms, where the decodes' windows have room for that step.
    assert not any(met(shared, "short")) and all(r.best_effort for r in shared if r.kind == "short")
    assert sum(met(solo, "short")) >= 15
    assert all(met(solo, "short", admitted_only=True))


@pytest.mark.parametrize("policy", ["sloserve", "sloserve-stage"])
def test_every_planner_has_the_step_and_the_ablation_has_not(policy):
    from sloserve_runtime.core.policies import make_policy

    assert make_policy(policy, MODEL, 4096).planner.solo_prompts
    assert not make_policy("sloserve-nosolo", MODEL, 4096).planner.solo_prompts
