"""Online calibration of the step-time profile, and the prefill chunk's own cost in the step budget."""

from __future__ import annotations

import dataclasses
import random

import pytest

from sloserve.slo import SLO, judge
from sloserve_runtime.core.calibration import StepTimeCalibration
from sloserve_runtime.core.planner import LiveRequest, Planner
from sloserve_runtime.core.policies import make_policy
from sloserve_runtime.core.slo_state import SLORequestState
from sloserve_runtime.core.step_time import DEFAULT_PROFILE, LinearPiece, StepTimeModel, attended_pairs
from sloserve_runtime.sim import SimConfig, simulate
from sloserve_runtime.workload.programs import ProgramSpec, StageSpec

# Two pieces, with context and attention terms, as a measured CPU profile has.
TWO_PIECES = StepTimeModel(
    "calibration-test",
    (
        LinearPiece(per_token=4e-4, per_request=1e-4, per_context_token=1.5e-6, constant=0.048, per_attended_pair=3e-7),
        LinearPiece(per_token=1e-3, constant=0.010),
    ),
    max_num_batched_tokens=512,
)
FEATURES = [(1, 1, 0, 0), (12, 12, 4000, 4000), (300, 5, 3000, 3000 + attended_pairs(290, 800)), (512, 1, 512, 0)]


def random_steps(count: int, seed: int = 0) -> list[tuple[int, int, int, int]]:
    rng = random.Random(seed)
    steps = []
    for _ in range(count):
        decodes, chunk, prefix = rng.randint(0, 16), rng.choice([0, 0, 64, 256, 512]), rng.randint(0, 1500)
        context = decodes * rng.randint(50, 800)
        tokens = decodes + chunk
        requests = decodes + (chunk > 0)
        steps.append(
            (
                max(tokens, 1),
                max(requests, 1),
                context + prefix + chunk,
                context + attended_pairs(chunk, prefix + chunk),
            )
        )
    return steps


@pytest.mark.parametrize("features", FEATURES)
def test_calibrated_model_maps_every_prediction(features):
    calibrated = TWO_PIECES.calibrated(0.8, -0.004)
    assert calibrated.step_seconds(*features) == pytest.approx(0.8 * TWO_PIECES.step_seconds(*features) - 0.004)


@pytest.mark.parametrize("prefix", [0, 100, 1500])
@pytest.mark.parametrize("bound", [0.06, 0.1, 0.25])
def test_chunk_budget_is_the_longest_chunk_within_the_bound(prefix, bound):
    tokens, requests, context, attended = 8, 9, 2000, 2000

    def step(chunk: int) -> float:
        return TWO_PIECES.step_seconds(
            tokens + chunk, requests, context + prefix + chunk, attended + attended_pairs(chunk, prefix + chunk)
        )

    chunk = TWO_PIECES.chunk_budget(bound, tokens, requests, context, attended, prefix)
    assert chunk >= 1
    assert step(chunk) <= bound < step(chunk + 1) + 1e-12  # the longest, up to rounding


def test_calibration_recovers_the_scale_and_offset_of_the_engine_it_watches():
    truth = TWO_PIECES.calibrated(0.7, 0.004)
    calibration = StepTimeCalibration(TWO_PIECES)
    rng = random.Random(1)
    for features in random_steps(256):
        calibration.observe(*features, truth.step_seconds(*features) * rng.uniform(0.97, 1.03))
    assert calibration.scale == pytest.approx(0.7, abs=0.03)
    assert calibration.offset == pytest.approx(0.004, abs=0.003)
    for features in FEATURES:
        assert calibration.model.step_seconds(*features) == pytest.approx(truth.step_seconds(*features), rel=0.05)


def test_steps_of_one_size_fix_the_offset_and_leave_the_scale():
    calibration = StepTimeCalibration(TWO_PIECES, recent_weight=0.0)  # the line alone
    features = (10, 10, 3000, 3000)
    refits = [calibration.observe(*features, TWO_PIECES.step_seconds(*features) - 0.015) for _ in range(64)]
    assert refits.count(True) == 2  # every refit_every steps, once min_steps were seen
    assert calibration.scale == pytest.approx(1.0)
    assert calibration.model == calibration.fitted
    assert calibration.model.step_seconds(*features) == pytest.approx(TWO_PIECES.step_seconds(*features) - 0.015)


def test_short_memory_follows_a_drift_the_line_is_too_slow_for():
    """Steps that run 20 % slow for a stretch (a crowded long-context batch), then right again: the
    line over 256 steps barely moves, the short memory predicts the stretch within a few steps and
    lets go of it as fast.
    """
    calibration = StepTimeCalibration(TWO_PIECES)
    steps = random_steps(320, seed=4)
    for features in steps[:256]:
        calibration.observe(*features, TWO_PIECES.step_seconds(*features))
    assert calibration.recent == pytest.approx(0.0, abs=1e-9)
    planned = []
    for features in steps[256:288]:
        planned.append(calibration.model.step_seconds(*features) / TWO_PIECES.step_seconds(*features))
        calibration.observe(*features, 1.2 * TWO_PIECES.step_seconds(*features))
    line = calibration.fitted.step_seconds(*FEATURES[1]) / TWO_PIECES.step_seconds(*FEATURES[1])
    assert line < 1.05  # the line weighs the stretch as 32 steps in 256
    assert planned[0] == pytest.approx(1.0)
    assert all(ratio == pytest.approx(1.2, rel=0.03) for ratio in planned[10:])
    for features in steps[288:300]:
        calibration.observe(*features, TWO_PIECES.step_seconds(*features))
    # Back to the line's own error within a dozen steps.
    assert calibration.model.step_seconds(*FEATURES[2]) == pytest.approx(
        calibration.fitted.step_seconds(*FEATURES[2]), rel=0.03
    )


def test_short_memory_is_moved_by_a_pause_no_more_than_by_a_slow_step():
    calibration = StepTimeCalibration(TWO_PIECES)
    for features in random_steps(64, seed=5):
        calibration.observe(*features, TWO_PIECES.step_seconds(*features))
    calibration.observe(12, 12, 4000, 4000, 1.0 + TWO_PIECES.step_seconds(12, 12, 4000, 4000))  # a 1 s pause
    assert calibration.recent == pytest.approx(0.0, abs=1e-9)  # off the profile by > 4x: not a step
    features = (12, 12, 4000, 4000)
    calibration.observe(*features, 2.5 * TWO_PIECES.step_seconds(*features))  # within 4x, clipped
    assert calibration.recent == pytest.approx(calibration.recent_weight * calibration.recent_limit)


def test_a_pause_of_the_whole_process_is_left_out_of_the_fit():
    calibration = StepTimeCalibration(TWO_PIECES)
    for index, features in enumerate(random_steps(256, seed=2)):
        pause = 1.0 if index % 10 == 0 else 0.0  # a garbage collection, the machine swapping
        calibration.observe(*features, TWO_PIECES.step_seconds(*features) + pause)
    assert calibration.scale == pytest.approx(1.0, abs=1e-6)
    assert calibration.offset == pytest.approx(0.0, abs=1e-6)


def test_a_corrected_step_keeps_a_floor_share_of_the_profile():
    calibration = StepTimeCalibration(TWO_PIECES)
    for features in random_steps(64, seed=3):
        calibration.observe(*features, TWO_PIECES.step_seconds(*features) * 0.3)
    assert calibration.scale == calibration.min_scale
    cheapest = TWO_PIECES.step_seconds(1, 1)
    assert calibration.model.step_seconds(1, 1) >= calibration.min_fraction * cheapest - 1e-12


def test_the_policy_plans_with_the_calibrated_model():
    policy = make_policy("sloserve", TWO_PIECES, 512, calibrate=True)
    truth = TWO_PIECES.calibrated(0.75, 0.0)
    refitted = [policy.observe_step(*features, truth.step_seconds(*features)) for features in random_steps(64)]
    assert all(refitted)  # the short memory moves the model every step
    assert policy.step_time is policy.planner.step_time is policy.speculation.step_time is policy.calibration.model
    for features in FEATURES:
        assert policy.planner.step_time.step_seconds(*features) == pytest.approx(
            truth.step_seconds(*features), rel=0.01
        )
    # Without calibration the policy keeps its profile whatever the engine reports.
    fixed = make_policy("sloserve", TWO_PIECES, 512)
    assert fixed.observe_step(*FEATURES[1], 1.0) is False
    assert fixed.planner.step_time is TWO_PIECES


def test_budget_counts_the_attention_of_a_chunk_late_in_a_long_prompt():
    """The chunk that continues a 1,500-token prompt attends to all of it: the step stays within the TPOT."""
    slo = SLO.parse("10s", "100ms")
    decodes = [
        LiveRequest(SLORequestState.create(f"d{i}", slo, 0.0, 100, TWO_PIECES), to_compute=1, context=300)
        for i in range(4)
    ]
    chunk_state = SLORequestState.create("long", slo, 0.0, 2000, TWO_PIECES)
    chunk = LiveRequest(chunk_state, to_compute=500, context=1500)
    planner = Planner(TWO_PIECES, max_budget=512, headroom=1.0)
    budget = planner.token_budget([*decodes, chunk], waiting=False)
    prefill = budget - len(decodes)
    assert 0 < prefill < 500

    def step(prefill: int) -> float:
        context = sum(r.context + 1 for r in decodes)
        attended = context + attended_pairs(prefill, 1500 + prefill)
        return TWO_PIECES.step_seconds(len(decodes) + prefill, 5, context + 1500 + prefill, attended)

    assert step(prefill) <= 0.1 < step(prefill + 1)


def chat_trace(rate: float, count: int, seed: int = 0) -> list[ProgramSpec]:
    rng = random.Random(seed)
    slo = SLO.parse("5x", "100ms")
    trace, now = [], 0.0
    for index in range(count):
        now += rng.expovariate(rate)
        stage = StageSpec("chat", rng.choice([40, 200, 700, 1500]), rng.randint(50, 300), slo)
        trace.append(ProgramSpec(index, now, "chatbot", (stage,)))
    return trace


def test_a_scheduler_given_a_too_fast_profile_keeps_its_promises_once_calibrated():
    """The simulated engine runs at the shipped CPU profile's step times; the scheduler was given a profile
    a third faster. Uncalibrated it plans steps that overrun the TPOT; calibrated it plans the real ones.
    """
    truth = SimConfig.from_profile(DEFAULT_PROFILE)
    fast = truth.step_time.calibrated(0.67, 0.0)
    trace = chat_trace(rate=0.15, count=150)

    def tpot_misses(calibrate: bool) -> int:
        config = dataclasses.replace(truth, planner_step_time=fast, calibrate=calibrate)
        results = simulate(trace, "sloserve", config.step_time, config)
        outcomes = [judge(r.arrival, r.token_times, r.ttft_target_ms, r.tpot_target_ms) for r in results]
        return sum(not outcome.tpot_met for outcome in outcomes)

    stale, calibrated = tpot_misses(False), tpot_misses(True)
    assert stale >= 15  # one request in ten
    assert calibrated <= stale // 3


def test_window_margin_is_how_much_slower_than_planned_ten_steps_in_a_row_ran():
    """Steps the model predicts exactly leave no margin; stretches of steps that run slow together
    (the error the short memory cannot see coming) set it to the slow stretches' excess, at most
    ``max_margin``."""
    exact = StepTimeCalibration(TWO_PIECES)
    for features in random_steps(320, seed=6):
        exact.observe(*features, TWO_PIECES.step_seconds(*features))
    assert exact.window_margin == 0.0
    rng = random.Random(1)
    slow = StepTimeCalibration(TWO_PIECES)
    for index, features in enumerate(random_steps(512, seed=7)):
        # Every fifth stretch of 10 steps runs 6 % slow, drawn afresh each step: the memory lags it.
        factor = 1.06 if (index // 10) % 5 == 0 else 1.0
        slow.observe(*features, TWO_PIECES.step_seconds(*features) * factor * rng.uniform(0.99, 1.01))
    assert 0.02 < slow.window_margin < 0.07
    wild = StepTimeCalibration(TWO_PIECES)
    for index, features in enumerate(random_steps(512, seed=8)):
        wild.observe(*features, TWO_PIECES.step_seconds(*features) * (1.8 if index % 20 < 10 else 0.7))
    assert wild.window_margin == wild.max_margin


def test_the_planner_keeps_the_margin_back_from_each_window():
    """The policy hands the calibration's margin to the planner, which plans each window that much short."""
    policy = make_policy("sloserve", TWO_PIECES, 512, calibrate=True)
    for index, features in enumerate(random_steps(256, seed=9)):
        policy.observe_step(*features, TWO_PIECES.step_seconds(*features) * (1.05 if (index // 10) % 4 == 0 else 1.0))
    margin = policy.calibration.window_margin
    assert margin > 0.0 and policy.planner.window_margin == margin
    state = SLORequestState.create("d", SLO.parse("5x", "100ms"), 0.0, 100, TWO_PIECES)
    for index in range(1, 21):
        state.record_output(1.0 + 0.06 * index, index)
    decodes = [LiveRequest(state, 1, 300)]
    now = state.token_times[-1]
    with_margin = policy.planner.step_bound(decodes, now)
    policy.planner.window_margin = 0.0
    without = policy.planner.step_bound(decodes, now)
    assert with_margin < without
    # Each window is planned as if its TPOT were 1 + margin tighter.
    planner = policy.planner
    tpot = 0.1 * planner.headroom / (1 + margin)
    decode_only = planner.step_time.step_seconds(1, 1, 301, 301)
    assert with_margin == pytest.approx(state.window_bound(now, tpot, max(planner.window_reserve * tpot, decode_only)))
