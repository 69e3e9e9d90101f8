"""Promotion of best-effort requests once room returns: forward EDF and SLOs-Serve's DP."""

from __future__ import annotations

import math

import pytest

from sloserve.slo import SLO, judge
from sloserve_runtime.core.planner import LiveRequest, Planner
from sloserve_runtime.core.slo_state import SLORequestState
from sloserve_runtime.core.step_time import LinearPiece, StepTimeModel
from sloserve_runtime.sim import simulate
from sloserve_runtime.workload.programs import ProgramSpec, StageSpec

# 10 ms a step plus 0.1 ms a token, 512 tokens a step: a full step takes 61.2 ms.
MODEL = StepTimeModel("promotion-test", (LinearPiece(per_token=0.0001, constant=0.010),), max_num_batched_tokens=512)


def waiting(name: str, prompt: int, deadline: float, best_effort: bool = True) -> LiveRequest:
    """A request that has not started, with a first-token deadline and no TPOT target."""
    state = SLORequestState(name, 0.0, prompt, first_token_deadline=deadline, tpot_seconds=math.inf)
    state.best_effort = best_effort
    return LiveRequest(state, to_compute=prompt, context=0)


def names(requests: list[LiveRequest]) -> list[str]:
    return [r.state.request_id for r in requests]


def test_dp_promotes_two_short_prompts_where_edf_takes_the_long_one():
    # The long prompt's deadline comes first. Taken, it takes two full steps (122 ms) and a short
    # one after it would end at 158 ms, past its deadline; left out, both short ones come in time
    # (36 and 71 ms). EDF takes what fits in deadline order; the DP takes the largest set that fits.
    long = waiting("long", 1024, deadline=0.150)
    shorts = [waiting("short-1", 256, deadline=0.155), waiting("short-2", 256, deadline=0.155)]
    candidates = [long, *shorts]
    assert names(Planner(MODEL, 512, promotion="edf").promote(0.0, candidates, [])) == ["long"]
    assert names(Planner(MODEL, 512, promotion="dp").promote(0.0, candidates, [])) == ["short-1", "short-2"]
    assert Planner(MODEL, 512, promotion="none").promote(0.0, candidates, []) == []


@pytest.mark.parametrize("promotion", ["edf", "dp"])
@pytest.mark.parametrize(("admitted_deadline", "promoted"), [(0.150, []), (0.200, ["early"])])
def test_promotion_never_makes_an_admitted_request_late(promotion, admitted_deadline, promoted):
    # The admitted prompt is on time alone (two full steps from the next one: 122 ms); with the
    # candidate ahead of it (an earlier deadline, one full step), at about 184 ms.
    admitted = waiting("admitted", 1024, deadline=admitted_deadline, best_effort=False)
    candidate = waiting("early", 512, deadline=0.130)
    planner = Planner(MODEL, 512, promotion=promotion)
    assert names(planner.promote(0.0, [candidate], [admitted])) == promoted


@pytest.mark.parametrize("promotion", ["edf", "dp"])
def test_deadlines_already_passed_are_not_promoted(promotion):
    late = waiting("late", 16, deadline=0.5)
    assert Planner(MODEL, 512, promotion=promotion).promote(1.0, [late], []) == []


# 10 ms a step, 20 ms a request in the batch: one decode of a 50 ms TPOT fits a step, two do not.
PER_REQUEST = StepTimeModel(
    "promotion-test-per-request", (LinearPiece(per_token=0.001, per_request=0.020, constant=0.010),), 512
)
TIGHT = SLO.parse("2000ms", "50ms")


@pytest.mark.parametrize(
    ("policy", "promoted"), [("sloserve", True), ("sloserve-dp", True), ("sloserve-arrival", False)]
)
def test_a_request_refused_at_arrival_is_promoted_when_a_decode_finishes(policy, promoted):
    first = ProgramSpec(0, 0.0, "coding", (StageSpec("complete", prompt_tokens=50, output_tokens=20, slo=TIGHT),))
    second = ProgramSpec(1, 0.1, "coding", (StageSpec("complete", prompt_tokens=50, output_tokens=20, slo=TIGHT),))
    results = {result.program_id: result for result in simulate([first, second], policy, PER_REQUEST)}
    refused = results[1]
    # At 0.1 s the first request decodes: a second decode would break both TPOTs. It finishes
    # about 0.6 s later, well before the second one's 2 s TTFT deadline.
    assert refused.admission.startswith("admitted: promoted") == promoted
    assert refused.best_effort != promoted
    assert not results[0].best_effort
    if promoted:
        assert "decode capacity" in refused.admission  # the reason it was refused at arrival
        assert judge(refused.arrival, refused.token_times, refused.ttft_target_ms, refused.tpot_target_ms).met
