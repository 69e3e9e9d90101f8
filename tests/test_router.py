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
    PowerOfTwoRouter,
    PrefixAffinityRouter,
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
from sloserve_runtime.sim.cluster import Replica
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


def replica(
    *admitted: LiveRequest, load: int | None = None, healthy: bool = True, cached: int = 0, recent: float = 0.0
) -> ReplicaView:
    return ReplicaView(Planner(MODEL, 512), admitted, len(admitted) if load is None else load, healthy, cached, recent)


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
    due_in_a_second = arriving("due", SLO.parse("1s", "100ms"), 100)
    assert SLORouter().route(0.0, due_in_a_second, [long_prefill, busy_decoding()]) == Route(1, True)


# ---- the SLO router ----


def test_slo_router_picks_the_feasible_replica_sent_the_least_work_lately():
    new = arriving("new", LOOSE, 100)
    replicas = [replica(recent=300.0), replica(recent=50.0), replica(recent=100.0)]
    assert SLORouter().route(0.0, new, replicas) == Route(1, True)
    # Not the idlest now: the one sent the least lately, whose runs will bring the least back.
    assert SLORouter().route(0.0, new, [replica(recent=400.0), replica(decoding("d"), recent=100.0)]) == Route(1, True)


def test_slo_router_never_picks_an_unhealthy_replica():
    new = arriving("new", LOOSE, 100)
    replicas = [queued(), replica(healthy=False), busy_decoding()]
    assert SLORouter().route(0.0, new, replicas) == Route(0, True)
    # The replica sent the least lately is down: the next one.
    replicas = [replica(recent=300.0), replica(healthy=False), replica(recent=200.0)]
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


def test_equal_recent_work_goes_to_the_less_loaded_replica():
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


def ray_sample(rng: random.Random, candidates: list[int]) -> list[int]:
    """Ray Serve's two draws (``PowerOfTwoChoicesRequestRouter.choose_replicas``), written out again."""
    if len(candidates) == 2:
        return candidates if rng.getrandbits(1) else candidates[::-1]
    first, second = rng.randrange(len(candidates)), rng.randrange(len(candidates) - 1)
    return [candidates[first], candidates[second + (second >= first)]]


def test_power_of_two_sends_each_request_to_the_shorter_queue_of_its_two_samples():
    new = arriving("new", LOOSE, 100)
    loads = [5, 2, 7, 1, 4]
    replicas = [replica(load=load) for load in loads]
    router, draws = PowerOfTwoRouter(seed=3), random.Random(3)
    picks = [router.route(0.0, new, replicas).replica for _ in range(200)]
    expected = [min(ray_sample(draws, list(range(5))), key=loads.__getitem__) for _ in range(200)]
    assert picks == expected
    assert 2 not in picks  # the longest queue loses to any other sample
    assert len(set(picks)) == 4  # not least-loaded: the lightest replica is only sampled now and then


def test_power_of_two_is_seeded_breaks_ties_to_the_first_sample_and_skips_unhealthy_replicas():
    new = arriving("new", LOOSE, 100)
    routers = [PowerOfTwoRouter(seed=seed) for seed in (0, 0, 1)]
    runs = [[router.route(0.0, new, [idle()] * 4).replica for _ in range(50)] for router in routers]
    assert runs[0] == runs[1] != runs[2]
    # Equal queues: the first of the two samples wins, so picks follow Ray's first draw.
    draws = random.Random(0)
    assert runs[0] == [ray_sample(draws, [0, 1, 2, 3])[0] for _ in range(50)]
    # Two healthy replicas of three: both are always the sample, and the shorter queue wins.
    replicas = [replica(load=3), replica(load=0, healthy=False), replica(load=1)]
    assert {PowerOfTwoRouter().route(0.0, new, replicas).replica for _ in range(20)} == {2}
    # One healthy replica: the only choice.
    assert PowerOfTwoRouter().route(0.0, new, [replica(load=9), replica(healthy=False)]) == Route(0, None)


def test_prefix_affinity_uses_rays_defaults():
    router = make_router("prefix-affinity")
    assert isinstance(router, PrefixAffinityRouter)
    assert router.imbalanced_threshold == PrefixAffinityRouter.IMBALANCED_THRESHOLD == float("inf")
    assert router.match_rate_threshold == PrefixAffinityRouter.MATCH_RATE_THRESHOLD == 0.1


def test_prefix_affinity_picks_the_longest_match_while_loads_are_balanced():
    new = arriving("answer", LOOSE, 1000)
    replicas = [replica(load=1), replica(load=6, cached=800), replica(load=0, cached=160)]
    # Ray's default threshold never calls the load imbalanced: the longest match wins, busy or not.
    assert PrefixAffinityRouter().route(0.0, new, replicas) == Route(1, None)
    # A gap of 6 within a threshold of 6 is still balanced (imbalanced is a gap above it).
    assert PrefixAffinityRouter(imbalanced_threshold=6).route(0.0, new, replicas) == Route(1, None)
    # Replicas with the same longest match: the shorter queue among them.
    tied = [replica(load=4, cached=800), replica(load=2, cached=800), replica(load=0)]
    assert PrefixAffinityRouter().route(0.0, new, tied) == Route(1, None)
    # A match of exactly 10 % of the prompt is enough; an unhealthy replica's match does not count.
    assert PrefixAffinityRouter().route(0.0, new, [replica(load=0), replica(load=3, cached=100)]) == Route(1, None)
    unhealthy = [replica(load=0), replica(load=0, cached=800, healthy=False), replica(load=3, cached=400)]
    assert PrefixAffinityRouter().route(0.0, new, unhealthy) == Route(2, None)


def test_prefix_affinity_falls_back_to_power_of_two_when_loads_are_imbalanced():
    new = arriving("answer", LOOSE, 1000)
    loads = [9, 0, 3, 2]
    replicas = [replica(load=load, cached=800 if index == 0 else 0) for index, load in enumerate(loads)]
    router, twin = PrefixAffinityRouter(seed=5, imbalanced_threshold=8), PowerOfTwoRouter(seed=5)
    picks = [router.route(0.0, new, replicas).replica for _ in range(40)]
    assert picks == [twin.route(0.0, new, replicas).replica for _ in range(40)]
    assert 0 not in picks  # the match sits on the replica with the longest queue


def tree_tokens(router: PrefixAffinityRouter) -> dict[int, float]:
    """The prompt tokens each replica's part of the router's prefix tree holds."""
    return {index: router.tree.of(index, 0.0) for index in router.tree.tokens}


def test_prefix_affinity_goes_to_the_smallest_tenant_when_the_match_is_short():
    new = arriving("chat", LOOSE, 1000)
    short = [replica(load=2, cached=96), replica(load=1), replica(load=3)]  # 9.6 %: under the threshold
    router = PrefixAffinityRouter()
    # A new router's tree is empty: every replica is a smallest tenant, and the shortest queue wins.
    assert router.route(0.0, new, short) == Route(1, None)
    assert tree_tokens(router) == {1: 1000}
    # Now replicas 0 and 2 hold less of the tree than replica 1: the shorter queue of those two.
    assert router.route(0.0, new, short) == Route(0, None)
    assert tree_tokens(router) == {1: 1000, 0: 1000 - 96}  # the tree inserts what it did not hold
    assert router.route(0.0, new, short) == Route(2, None)
    # A match (800 tokens on replica 2) wins over tenancy; only the unmatched tokens join the tree.
    matched = [replica(load=0), replica(load=0), replica(load=5, cached=800)]
    assert router.route(0.0, new, matched) == Route(2, None)
    assert tree_tokens(router) == {1: 1000, 0: 904, 2: 1200}


def test_routers_are_made_by_name():
    assert {name: type(make_router(name)) for name in ROUTERS} == {
        "slo": SLORouter,
        "round-robin": RoundRobinRouter,
        "least-loaded": LeastLoadedRouter,
        "power-of-two": PowerOfTwoRouter,
        "prefix-affinity": PrefixAffinityRouter,
    }
    with pytest.raises(
        ValueError,
        match="unknown router 'random'; choose from slo, round-robin, least-loaded, power-of-two, prefix-affinity",
    ):
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


def two_call_trace(count: int, rate: float, seed: int = 3) -> list[ProgramSpec]:
    """Programs of two calls; the second resends the first's prompt and answer (its prefix) and more."""
    rng = random.Random(seed)
    arrival, trace = 0.0, []
    for index in range(count):
        arrival += rng.expovariate(rate)
        prompt, output = rng.randint(200, 800), rng.randint(5, 30)
        first = StageSpec("ask", prompt, output, CHAT)
        second = StageSpec("answer", prompt + output + 50, 10, CHAT, delay_s=0.05, shared_prefix_tokens=prompt + output)
        trace.append(ProgramSpec(index, arrival, "tool-calling", (first, second)))
    return trace


def kv_state(replica) -> tuple:
    kv = replica.engine.kv
    shared = {key: tuple(entry) for key, entry in kv.shared.items()}
    return kv.free_blocks, kv.cached_blocks, dict(kv.cached), dict(kv.pinned), shared, dict(kv.sharing)


def test_cluster_views_carry_each_replicas_cached_prefix_and_prefix_affinity_follows_it(monkeypatch):
    trace = two_call_trace(120, rate=6.0)
    sim = Simulation(trace, "sloserve", SimConfig(step_time=ENGINE), replicas=3, router="prefix-affinity")
    view = Replica.view

    def checked_view(replica, request=None, recent_tokens=0.0):
        before = kv_state(replica)
        seen = view(replica, request, recent_tokens)
        assert kv_state(replica) == before  # looked up, not claimed
        assert seen.cached_tokens == replica.engine.kv.hit_tokens(request.program_index, request.cache_limit)
        return seen

    monkeypatch.setattr(Replica, "view", checked_view)
    routes: list[tuple[int, int, list[int], int]] = []  # (program, stage, cached tokens per replica, replica)
    route = sim.cluster.router.route

    def recorded(now, new, replicas, home=None):
        chosen = route(now, new, replicas, home)
        program, stage = (int(part) for part in new.state.request_id.split("/"))
        routes.append((program, stage, [view.cached_tokens for view in replicas], chosen.replica))
        return chosen

    sim.cluster.router.route = recorded
    results = sim.run()
    assert all(len(result.token_times) == result.output_tokens for result in results if result.error is None)
    first_calls = {program: replica for program, stage, _, replica in routes if stage == 0}
    later = [(program, cached, replica) for program, stage, cached, replica in routes if stage == 1]
    assert all(not any(cached) for program, stage, cached, _ in routes if stage == 0)  # nothing to share yet
    matched = [(program, cached, replica) for program, cached, replica in later if any(cached)]
    assert len(matched) > len(later) / 2  # the first call's context is still held or cached
    for program, cached, replica in matched:
        # Only the replica that served the first call holds its prefix, and the second call goes there.
        assert [index for index, tokens in enumerate(cached) if tokens] == [first_calls[program]] == [replica]
