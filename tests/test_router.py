"""Routers on hand-built replica states, and a cluster of simulated replicas behind them."""

from __future__ import annotations

import random

import pytest

from sloserve.slo import SLO
from sloserve_runtime.core.planner import LiveRequest, Planner
from sloserve_runtime.core.router import (
    ROUTERS,
    LeastLoadedRouter,
    NoHealthyReplicaError,
    ReplicaView,
    RoundRobinRouter,
    Route,
    SLORouter,
    make_router,
)
from sloserve_runtime.core.slo_state import SLORequestState
from sloserve_runtime.core.step_time import LinearPiece, StepTimeModel
from sloserve_runtime.measure.summary import summarize
from sloserve_runtime.sim import simulate
from sloserve_runtime.sim.config import SimConfig
from sloserve_runtime.sim.loop import Simulation
from sloserve_runtime.workload.programs import ProgramSpec, StageResult, StageSpec

# 10 ms a step plus 1 ms a token: easy arithmetic.
MODEL = StepTimeModel("router-test", (LinearPiece(per_token=0.001, constant=0.010),), max_num_batched_tokens=512)
TIGHT = SLO.parse("2000ms", "50ms")
LOOSE = SLO.parse("2000ms", "100ms")


def arriving(name: str, slo: SLO, prompt: int, arrival: float = 0.0) -> LiveRequest:
    return LiveRequest(SLORequestState.create(name, slo, arrival, prompt, MODEL), to_compute=prompt, context=0)


def decoding(name: str, slo: SLO = LOOSE, context: int = 100) -> LiveRequest:
    return LiveRequest(SLORequestState.create(name, slo, 0.0, context, MODEL), to_compute=1, context=context)


def replica(*admitted: LiveRequest, load: int | None = None, healthy: bool = True) -> ReplicaView:
    return ReplicaView(Planner(MODEL, 512), admitted, len(admitted) if load is None else load, healthy)


def queued() -> ReplicaView:
    """A 400-token prefill waits, with an earlier deadline than any new request's."""
    return replica(arriving("queued", LOOSE, 400, arrival=-0.1))


def idle() -> ReplicaView:
    return replica()


def busy_decoding() -> ReplicaView:
    """Five loose decodes: a new prefill shares each step with them."""
    return replica(*(decoding(f"d{i}") for i in range(5)))


def full_of_decodes(count: int = 40) -> ReplicaView:
    """Loose decodes that a tight request's 45 ms step bound cannot hold one more of (10 ms + 41 ms > 45 ms)."""
    return replica(*(decoding(f"f{i}") for i in range(count)))


def first_token(view: ReplicaView, new: LiveRequest) -> float:
    return view.planner.first_token_time(0.0, new, view.admitted)


# ---- the planner's prediction the SLO router ranks by ----


def test_first_token_time_on_an_idle_replica_is_one_prefill_step():
    new = arriving("new", LOOSE, 100)
    assert first_token(idle(), new) == pytest.approx(0.010 + 0.100)


def test_queued_prefill_and_decodes_delay_the_predicted_first_token():
    new = arriving("new", LOOSE, 100)
    assert first_token(idle(), new) < first_token(busy_decoding(), new) < first_token(queued(), new)
    # The queued prefill runs first: a 400-token step, then 400 tokens more before new's turn.
    assert first_token(queued(), new) > 0.010 + 0.400 + 0.010 + 0.400


def test_a_prefill_under_way_goes_before_a_new_request_whatever_its_deadline():
    new = arriving("new", LOOSE, 100)
    # 1,500 of 2,000 prompt tokens still to compute, due in 10 s: deadline order alone would let
    # new overtake it, but vLLM serves a running request before a waiting one.
    under_way = LiveRequest(SLORequestState.create("long", SLO.parse("10s", "100ms"), 0.0, 2000, MODEL), 1500, 500)
    long_prefill = replica(under_way)
    assert first_token(long_prefill, new) > 1.5  # three 512-token steps (0.522 s each) come first
    assert SLORouter().route(0.0, new, [long_prefill, busy_decoding()]) == Route(1, True)


# ---- the SLO router ----


def test_slo_router_picks_the_feasible_replica_with_most_slack():
    new = arriving("new", LOOSE, 100)
    replicas = [queued(), idle(), busy_decoding()]
    assert SLORouter().route(0.0, new, replicas) == Route(1, True)


def test_slo_router_never_picks_an_unhealthy_replica():
    new = arriving("new", LOOSE, 100)
    replicas = [queued(), replica(healthy=False), busy_decoding()]
    assert SLORouter().route(0.0, new, replicas) == Route(2, True)


def test_slo_router_skips_a_replica_where_the_request_is_infeasible():
    new = arriving("new", TIGHT, 100)
    crowded, waiting = full_of_decodes(), queued()
    # By slack alone the crowded replica would win: its decodes leave prefill budget every step.
    assert first_token(crowded, new) < first_token(waiting, new)
    assert not crowded.planner.admit(0.0, new, crowded.admitted).admitted
    assert SLORouter().route(0.0, new, [crowded, waiting]) == Route(1, True)


def test_slo_router_sends_a_request_feasible_nowhere_to_the_least_loaded_replica():
    new = arriving("new", TIGHT, 100)
    replicas = [full_of_decodes(45), full_of_decodes(41), full_of_decodes(43)]
    assert SLORouter().route(0.0, new, replicas) == Route(1, False)


def test_equal_slack_goes_to_the_less_loaded_replica():
    no_ttft = SLO.parse(None, "100ms")
    new = arriving("new", no_ttft, 100)
    replicas = [busy_decoding(), replica(*(decoding(f"d{i}") for i in range(2)))]
    assert SLORouter().route(0.0, new, replicas) == Route(1, True)


def test_later_stage_stays_on_the_replica_holding_its_prefix_while_feasible_there():
    new = arriving("answer", LOOSE, 100)
    replicas = [queued(), idle()]
    assert SLORouter().route(0.0, new, replicas, home=0) == Route(0, True)
    assert SLORouter(affinity=False).route(0.0, new, replicas, home=0) == Route(1, True)


def test_later_stage_leaves_its_home_when_infeasible_or_unhealthy_there():
    new = arriving("answer", TIGHT, 100)
    assert SLORouter().route(0.0, new, [full_of_decodes(), queued(), idle()], home=0) == Route(2, True)
    assert SLORouter().route(0.0, new, [replica(healthy=False), queued()], home=0) == Route(1, True)


# ---- the baselines ----


def test_round_robin_cycles_through_the_replicas():
    router, new = RoundRobinRouter(), arriving("new", LOOSE, 100)
    replicas = [full_of_decodes(), idle(), queued()]
    assert [router.route(0.0, new, replicas).replica for _ in range(5)] == [0, 1, 2, 0, 1]


def test_round_robin_skips_unhealthy_replicas():
    router, new = RoundRobinRouter(), arriving("new", LOOSE, 100)
    replicas = [idle(), replica(healthy=False), idle()]
    assert [router.route(0.0, new, replicas).replica for _ in range(4)] == [0, 2, 0, 2]


def test_least_loaded_picks_the_lightest_healthy_replica():
    new = arriving("new", LOOSE, 100)
    replicas = [replica(load=3), replica(load=1), replica(load=1), replica(load=0, healthy=False)]
    assert LeastLoadedRouter().route(0.0, new, replicas) == Route(1, None)


@pytest.mark.parametrize("name", list(ROUTERS))
def test_no_healthy_replica_is_an_error(name):
    with pytest.raises(NoHealthyReplicaError, match="none of the 2 replicas"):
        make_router(name).route(0.0, arriving("new", LOOSE, 100), [replica(healthy=False)] * 2)


def test_routers_are_made_by_name():
    assert {name: type(make_router(name)) for name in ("slo", "round-robin", "least-loaded")} == {
        "slo": SLORouter,
        "round-robin": RoundRobinRouter,
        "least-loaded": LeastLoadedRouter,
    }
    with pytest.raises(ValueError, match="unknown router 'random'; choose from slo, round-robin, least-loaded"):
        make_router("random")


# ---- a cluster of simulated replicas ----

ENGINE = StepTimeModel(
    name="test-cluster",
    pieces=(LinearPiece(per_token=0.0004, per_request=0.001, constant=0.03),),
    max_num_batched_tokens=512,
)
CHAT = SLO.parse("5x", "100ms")


def chat_trace(count: int, rate: float, seed: int = 7) -> list[ProgramSpec]:
    rng = random.Random(seed)
    arrival, trace = 0.0, []
    for index in range(count):
        arrival += rng.expovariate(rate)
        stage = StageSpec("chat", prompt_tokens=rng.randint(20, 900), output_tokens=rng.randint(1, 60), slo=CHAT)
        trace.append(ProgramSpec(index, arrival, "chatbot", (stage,)))
    return trace


def attainment(results: list[StageResult]) -> float:
    return summarize(results, max(t for result in results for t in result.token_times)).program_attainment


def test_round_robin_cluster_is_deterministic_and_uses_every_replica():
    trace = chat_trace(300, rate=24.0)
    config = SimConfig(step_time=ENGINE, max_queued_best_effort=None)  # every request is served
    sim = Simulation(trace, "sloserve", config, replicas=3, router="round-robin")
    results = sim.run()
    assert results == simulate(trace, "sloserve", ENGINE, config, replicas=3, router="round-robin")
    assert all(len(result.token_times) == result.output_tokens for result in results)
    assert all(replica.engine.kv.peak_blocks > 0 for replica in sim.cluster.replicas)
    assert all(replica.engine.kv.free_blocks == config.kv_capacity_blocks for replica in sim.cluster.replicas)


def test_two_replicas_at_twice_the_rate_attain_like_one():
    one = attainment(simulate(chat_trace(400, rate=3.0), "sloserve", ENGINE))
    two = {
        router: attainment(simulate(chat_trace(400, rate=6.0), "sloserve", ENGINE, replicas=2, router=router))
        for router in ("round-robin", "slo")
    }
    assert 0.5 < one < 0.95  # a loaded engine, where routing matters
    assert two["round-robin"] == pytest.approx(one, abs=0.1)
    # The SLO router pools the two: a request one replica cannot serve in time goes to the other.
    assert one <= two["round-robin"] <= two["slo"] <= one + 0.15


def test_slo_router_spreads_long_prompts_that_round_robin_piles_on_one_replica():
    # Long and short prompts alternate: round-robin sends every long one to replica 0, which takes
    # longer to prefill one (two 0.23 s steps) than the 0.4 s until the next comes.
    calls = [StageSpec("chat", 1000 if index % 2 == 0 else 50, 5, SLO.parse("2x", "100ms")) for index in range(40)]
    trace = [ProgramSpec(index, 0.2 * index, "chatbot", (call,)) for index, call in enumerate(calls)]
    by_router = {name: attainment(simulate(trace, "sloserve", ENGINE, replicas=2, router=name)) for name in ROUTERS}
    assert by_router["slo"] == 1.0
    assert by_router["round-robin"] < 0.9


def test_cluster_needs_a_replica_and_a_known_router():
    with pytest.raises(ValueError, match="at least one replica"):
        simulate(chat_trace(3, 1.0), "sloserve", ENGINE, replicas=0)
    with pytest.raises(ValueError, match="unknown router 'nearest'"):
        simulate(chat_trace(3, 1.0), "sloserve", ENGINE, replicas=2, router="nearest")
