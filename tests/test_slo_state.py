"""Deadline arithmetic, ordering keys and the step-time model, without the engine."""

from __future__ import annotations

import math

import pytest

from sloserve.slo import SLO
from sloserve_runtime.core.slo_state import SLORequestState, slo_from_xargs, slo_to_xargs
from sloserve_runtime.core.step_time import DEFAULT_PROFILE, LinearPiece, StepTimeModel

MODEL = StepTimeModel(
    name="test",
    pieces=(LinearPiece(per_token=0.001, constant=0.01), LinearPiece(per_request=0.004)),
    max_num_batched_tokens=100,
)


def state(slo: SLO, arrival: float = 100.0, prompt: int = 50, rid: str = "r") -> SLORequestState:
    return SLORequestState.create(rid, slo, arrival, prompt, MODEL)


def test_step_time_is_the_max_of_its_pieces():
    assert MODEL.step_seconds(tokens=10, requests=1) == pytest.approx(0.02)
    assert MODEL.step_seconds(tokens=10, requests=10) == pytest.approx(0.04)


def test_zero_load_prefill_runs_one_chunk_per_step():
    # 250 tokens in chunks of 100: (0.1+0.01) + (0.1+0.01) + (0.05+0.01)
    assert MODEL.prefill_seconds(250) == pytest.approx(0.28)


def test_token_budget_fits_the_step_time_bound():
    assert MODEL.chunk_budget(0.05, tokens=0, requests=2, context_tokens=0, attended=0, prefix=0) == 40
    assert MODEL.chunk_budget(0.005, tokens=0, requests=2, context_tokens=0, attended=0, prefix=0) == 0


def test_deadlines_follow_the_slo_contract():
    request = state(SLO.parse("500ms", "50ms"))
    assert request.first_token_deadline == pytest.approx(100.5)
    assert request.token_deadline(0) == pytest.approx(100.5)
    assert request.token_deadline(4) == pytest.approx(100.5 + 4 * 0.05)


def test_slowdown_deadline_uses_predicted_prefill():
    request = state(SLO.parse("3x"), prompt=250)
    assert request.first_token_deadline == pytest.approx(100.0 + 3 * 0.28)
    assert math.isinf(request.token_deadline(5))


def test_unconstrained_request_sorts_after_constrained_ones():
    loose, tight = state(SLO(), rid="loose"), state(SLO.parse("2s"), arrival=105.0, rid="tight")
    ordered = sorted([loose, tight], key=SLORequestState.waiting_key)
    assert [s.request_id for s in ordered] == ["tight", "loose"]


def test_waiting_order_is_earliest_first_token_deadline_then_arrival():
    early_loose = state(SLO.parse("10s"), arrival=100.0, rid="early-loose")
    late_tight = state(SLO.parse("1s"), arrival=101.0, rid="late-tight")  # due at 102.0
    same_deadline_earlier = state(SLO.parse("1.5s"), arrival=100.5, rid="same-deadline")  # due at 102.0
    ordered = sorted([early_loose, late_tight, same_deadline_earlier], key=SLORequestState.waiting_key)
    assert [s.request_id for s in ordered] == ["same-deadline", "late-tight", "early-loose"]


def test_running_order_puts_the_tightest_next_deadline_first():
    coding = state(SLO.parse("1s", "50ms"), rid="coding")
    chat = state(SLO.parse("1s", "100ms"), rid="chat")
    # both have produced 10 tokens: coding's 11th token is due sooner
    keys = {s.request_id: s.running_key(10) for s in (coding, chat)}
    assert keys["coding"] < keys["chat"]


def test_xargs_round_trip():
    slo = SLO.parse("3x", "40ms")
    xargs = slo_to_xargs(slo, arrival=12.5)
    assert xargs == {"slo_ttft_slowdown": 3.0, "slo_tpot_ms": 40.0, "slo_arrival": 12.5}
    assert slo_from_xargs(xargs) == slo
    assert slo_from_xargs(None) == SLO()


def test_shipped_profile_loads_and_names_its_source():
    model = StepTimeModel.load(DEFAULT_PROFILE)
    assert model.source
    assert 0.0 < model.prefill_seconds(100) < 1.0
