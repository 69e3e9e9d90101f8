"""Window slack: a step may spend what fast tokens left in each decode's attainment windows."""

from __future__ import annotations

import math

import pytest

from sloserve.slo import SLO, judge
from sloserve_runtime.core.planner import LiveRequest, Planner
from sloserve_runtime.core.slo_state import SLORequestState
from sloserve_runtime.core.speculation import TierSpeculation
from sloserve_runtime.core.step_time import LinearPiece, StepTimeModel
from sloserve_runtime.sim import simulate
from sloserve_runtime.workload.programs import ProgramSpec, StageSpec

# 20 ms a step plus 1 ms a token: a decode-only step of a few requests is far under a 100 ms TPOT.
MODEL = StepTimeModel("window-test", (LinearPiece(per_token=0.001, constant=0.020),), max_num_batched_tokens=512)
CHAT = SLO.parse("5x", "100ms")


def decode_state(gaps: list[float], name: str = "d") -> SLORequestState:
    """A request whose output tokens came at these gaps after a first token at t = 1 s."""
    state = SLORequestState.create(name, CHAT, 0.0, 100, MODEL)
    now = 1.0
    state.record_output(now, 1)
    for index, gap in enumerate(gaps, start=2):
        now += gap
        state.record_output(now, index)
    return state


def last_token(state: SLORequestState) -> float:
    return state.token_times[-1]


def test_fast_tokens_leave_slack_for_one_long_step():
    state = decode_state([0.04] * 20)
    # Each later gap planned at 75 ms: 10 x 100 - 9 x 75 = 325 ms for the next one.
    assert state.window_bound(last_token(state), 0.1, 0.075) == pytest.approx(0.325)
    # Planned at a full TPOT each, the later gaps leave no slack: one TPOT, as the per-step rule.
    assert state.window_bound(last_token(state), 0.1, 0.1) == pytest.approx(0.1)
    # Time already past since the last token counts against the step.
    assert state.window_bound(last_token(state) + 0.05, 0.1, 0.075) == pytest.approx(0.275)


def test_slack_once_spent_holds_the_next_steps_to_the_reserve():
    state = decode_state([0.04] * 20 + [0.325])
    assert state.window_bound(last_token(state), 0.1, 0.075) == pytest.approx(0.075)


def test_the_first_window_is_held_to_its_own_tokens():
    # A request may end before its first window fills, when its few gaps form the only window.
    assert decode_state([]).window_bound(1.0, 0.1, 0.075) == pytest.approx(0.1)
    state = decode_state([0.04, 0.04])
    assert state.window_bound(last_token(state), 0.1, 0.075) == pytest.approx(0.3 - 0.08)


def test_late_tokens_leave_less_than_one_tpot():
    # The last nine gaps took 930 ms: the next may take 70 ms, whatever the per-step rule says.
    state = decode_state([0.05] * 20 + [0.93 / 9] * 9)
    assert state.window_bound(last_token(state), 0.1, 0.075) == pytest.approx(0.07)


def test_no_slack_without_a_tpot_or_an_output():
    free = SLORequestState.create("f", SLO.parse("5x", None), 0.0, 100, MODEL)
    free.record_output(1.0, 1)
    assert math.isinf(free.window_bound(1.0, math.inf, math.inf))
    assert math.isinf(SLORequestState.create("w", CHAT, 0.0, 100, MODEL).window_bound(1.0, 0.1, 0.075))


def test_speculated_tokens_count_once_each():
    state = SLORequestState.create("s", CHAT, 0.0, 100, MODEL)
    state.record_output(1.0, 1)
    state.record_output(1.05, 4)  # three tokens in one step
    assert list(state.token_times) == [1.0, 1.05, 1.05, 1.05]
    state.record_output(1.05, 4)  # recorded again: nothing new
    assert state.output_tokens == 4 and len(state.token_times) == 4


def budget(planner: Planner, decodes: list[LiveRequest], now: float | None, admitted_waiting: bool = True) -> int:
    """The budget of a step at ``now``, asked as the engines ask: hold-back first, then the budget."""
    hold = planner.held_back(decodes, admitted_waiting, now)
    return planner.token_budget(decodes, now=now, hold=hold)


def test_budget_spends_the_slack_on_an_admitted_prompt_and_then_holds_back():
    planner = Planner(MODEL, max_budget=512, headroom=1.0, window_reserve=0.75)
    fast = decode_state([0.04] * 20)
    decodes = [LiveRequest(fast, 1, 200)]
    now = last_token(fast)
    # Per-step rule: (100 - 20) / 1 = 80 tokens; the window lets the step take 325 ms (305 tokens).
    assert budget(planner, decodes, None) == 80
    assert budget(planner, decodes, now) == 305
    spent = decode_state([0.04] * 20 + [0.325])
    # After the long step each later one is held to the reserve: (75 - 20) / 1 = 55 tokens.
    assert budget(planner, [LiveRequest(spent, 1, 200)], last_token(spent)) == pytest.approx(55, abs=1)


def test_best_effort_gets_no_window_slack():
    planner = Planner(MODEL, max_budget=512, headroom=1.0, window_reserve=0.75)
    fast = decode_state([0.04] * 20)
    # No admitted prompt waits or runs: whatever the step leaves would go to best effort.
    assert budget(planner, [LiveRequest(fast, 1, 200)], last_token(fast), admitted_waiting=False) == 80


def test_a_lost_window_does_not_hold_every_prompt_back():
    planner = Planner(MODEL, max_budget=512, headroom=1.0, window_reserve=0.75)
    stalled = decode_state([0.04] * 9 + [1.0])  # a pause of a second: its windows are lost
    assert budget(planner, [LiveRequest(stalled, 1, 200)], last_token(stalled)) == 80


def test_a_window_the_margin_has_spent_is_kept_by_decodes_alone():
    """After a long step, later steps each took a little more than the reserve: planned with the
    calibration's margin, the window is spent, but at its very TPOT decode-only steps still keep
    it. Every decode shares the window's steps, so the prompts wait rather than break it."""
    planner = Planner(MODEL, max_budget=512, headroom=1.0, window_reserve=0.75, window_margin=0.1)
    behind = decode_state([0.04] * 20 + [0.3] + [0.075] * 7)  # that window: 825 ms in 8 gaps
    decodes = [LiveRequest(behind, 1, 200)]
    # Planned short (TPOT 100 / 1.1 ms), the window leaves 909 - 825 - 68 = 16 ms, less than the
    # 21 ms step of the decode alone; at 100 ms it leaves 1000 - 825 - 21 = 154 ms.
    assert budget(planner, decodes, last_token(behind)) == 1
    # One TPOT a step (less the margin: 90.9 ms) would have let a prompt take 69 of the 70 tokens,
    # and that window would break.
    assert budget(planner, decodes, None) == 70
    # A window that decode-only steps cannot keep either is lost: its TPOT planned short (90.9 ms),
    # not a hold on every prompt.
    lost = decode_state([0.04] * 20 + [0.3] + [0.1] * 7)
    assert budget(planner, [LiveRequest(lost, 1, 200)], last_token(lost)) == 70


def long_prompts_beside_decodes() -> list[ProgramSpec]:
    """Decodes of a 100 ms TPOT tier, with 250-token prompts arriving among them."""
    trace = []
    for index in range(60):
        stage = StageSpec("chat", prompt_tokens=250 if index % 3 == 0 else 50, output_tokens=60, slo=CHAT)
        trace.append(ProgramSpec(index, index * 0.6, "chatbot", (stage,)))
    return trace


def test_window_slack_keeps_every_window_and_brings_first_tokens_sooner():
    trace = long_prompts_beside_decodes()
    windows = simulate(trace, "sloserve", MODEL)
    per_step = simulate(trace, "sloserve-tpot", MODEL)
    for results in (windows, per_step):
        assert not any(r.best_effort for r in results)
        outcomes = [judge(r.arrival, r.token_times, r.ttft_target_ms, r.tpot_target_ms) for r in results]
        assert all(outcome.met for outcome in outcomes)

    def mean_ttft(results):
        long = [r for r in results if r.prompt_tokens == 250]
        return sum(r.token_times[0] - r.arrival for r in long) / len(long)

    # Under the per-step rule a 250-token prompt beside decodes takes three 100 ms steps; with the
    # windows' slack its chunk runs whole.
    assert mean_ttft(windows) < 0.85 * mean_ttft(per_step)


def test_admission_plans_the_prompt_in_the_step_the_window_slack_allows():
    # A 300-token prompt with a 350 ms TTFT, admitted between steps: one step of it beside the
    # decode takes 321 ms, but chunked to one TPOT a step (79 tokens each beside the decode's one)
    # it takes four steps, and its first token would come at 384 ms.
    fast = decode_state([0.04] * 20)
    now = last_token(fast)
    decodes = [LiveRequest(fast, 1, 200)]
    slo = SLO.parse("350ms", "100ms")
    new = LiveRequest(SLORequestState.create("new", slo, now, 300, MODEL), 300, 0)
    with_slack = Planner(MODEL, max_budget=512, headroom=1.0, window_reserve=0.75)
    per_step = Planner(MODEL, max_budget=512, headroom=1.0)
    assert with_slack.admit(now, new, decodes).admitted
    refused = per_step.admit(now, new, decodes)
    assert not refused.admitted and refused.reason.startswith("TTFT")
    # A router's prediction (mid-step): the step under way (one TPOT), then the prompt whole in one step.
    first = with_slack.first_token_time(now, new, decodes) - now
    assert first == pytest.approx(0.1 + 0.020 + 0.301, abs=1e-6)
    assert per_step.first_token_time(now, new, decodes) - now == pytest.approx(0.1 + 3 * 0.1 + 0.084, abs=1e-6)


def test_speculation_keeps_the_window_slack_of_its_decodes():
    """With speculation a step already counts on the tokens drafts yield; the windows' slack for
    the next token can still let one step run longer, never shorter, than that per-step bound."""
    speculation = TierSpeculation(MODEL, max_length=4, prior=0.6)
    planner = Planner(MODEL, max_budget=512, headroom=1.0, window_reserve=0.75, speculation=speculation)
    fast = decode_state([0.04] * 20)
    decodes = [LiveRequest(fast, 1, 200)]
    now = last_token(fast)
    per_step = planner.step_bound(decodes)
    assert per_step >= 0.1  # one TPOT times the tokens a step yields over a window
    # The next token may come 325 ms after the last (as without speculation) and the step spends it.
    assert planner.step_bound(decodes, now) == pytest.approx(max(per_step, 0.325))
    assert budget(planner, decodes, now) > budget(planner, decodes, None)
    # A decode behind on its windows: the per-step bound stays.
    late = decode_state([0.05] * 20 + [0.93 / 9] * 9)
    assert planner.step_bound([LiveRequest(late, 1, 200)], last_token(late)) == pytest.approx(per_step)
