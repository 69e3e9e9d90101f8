"""Replicas as a Ray Serve application: the request router on hand-built routing stats, the
autoscaling policy, then a real local Ray Serve with two replicas of the default model."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from types import SimpleNamespace

import httpx
import openai
import psutil
import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
from ray.serve.request_router import PendingRequest

from sloserve.slo import SLO
from sloserve_runtime.cluster.autoscaling import CONSECUTIVE, decide, slo_attainment_policy
from sloserve_runtime.cluster.deployment import ReplicaError, Scaling
from sloserve_runtime.cluster.replica import RoutedCall
from sloserve_runtime.cluster.routing import SLORequestRouter
from sloserve_runtime.serving import server

ENGINES = DeploymentID(name="EngineReplica", app_name="sloserve")


def call(name: str, prompt: int, slo: SLO, program: str | None = None, arrival: float | None = None) -> RoutedCall:
    arrival = time.time() if arrival is None else arrival
    return RoutedCall(name, "/v1/completions", {}, {}, arrival, prompt, slo, program)


def replica(name: str, *in_flight: RoutedCall, output_tokens: int = 0) -> SimpleNamespace:
    """A replica as the router sees it: its id and the routing stats it last reported."""
    stats = {"rank": 0, "in_flight": [c.stats_entry(output_tokens) for c in in_flight]}
    return SimpleNamespace(replica_id=ReplicaID(name, ENGINES), routing_stats=stats)


def pending(routed: RoutedCall) -> PendingRequest:
    metadata = RequestMetadata(request_id=routed.request_id, internal_request_id=f"internal-{routed.request_id}")
    return PendingRequest(args=[routed], kwargs={}, metadata=metadata)


async def router(name: str = "slo") -> SLORequestRouter:
    routing = SLORequestRouter(ENGINES, DeploymentHandleSource.UNKNOWN)
    routing.initialize_state(router=name, max_num_batched_tokens=512)
    return routing


async def test_router_sends_a_tight_call_where_the_reported_queue_leaves_room():
    routing = await router()
    busy = replica("busy", *(call(f"q{i}", 1500, SLO.parse("3s")) for i in range(6)))
    idle = replica("idle")
    tight = call("new", 200, SLO.parse("1s"))
    ranks = await routing.choose_replicas([busy, idle], pending(tight))
    assert ranks[0] == [idle] and ranks[1] == [busy]  # the other stays as a fallback


async def test_router_counts_calls_it_sent_since_the_last_report():
    """Two bursts between two reports: the calls the router sent weigh until the replica reports them."""
    routing = await router("least-loaded")
    first, second = replica("first"), replica("second")
    picks = []
    for index in range(4):
        routed = call(f"c{index}", 300, SLO.parse("5s"))
        picks.append((await routing.choose_replicas([first, second], pending(routed)))[0][0])
    assert picks.count(first) == 2 and picks.count(second) == 2
    # The replica reports one of them as its own, with output: counted once, not twice.
    sent = routing.sent[first.replica_id]
    reported = next(iter(sent))
    first.routing_stats = {"in_flight": [{**sent[reported], "output_tokens": 5}]}
    assert routing.view(first, time.time()).load == 2
    # A completed call no longer weighs.
    routing.on_request_completed(first.replica_id, f"internal-{reported}")
    first.routing_stats = {"in_flight": []}
    assert routing.view(first, time.time()).load == 1


async def test_router_keeps_a_program_on_its_replica_while_it_is_a_candidate():
    routing = await router()
    left, right = replica("left"), replica("right")
    first = (await routing.choose_replicas([left, right], pending(call("s1", 100, SLO.parse("5s"), "run-7"))))[0][0]
    other = right if first is left else left
    # The other replica is emptier, but the program's prefix lives on the first one.
    later = await routing.choose_replicas([left, right], pending(call("s2", 120, SLO.parse("5s"), "run-7")))
    assert later[0] == [first]
    # Once its replica is gone, the run goes elsewhere.
    routing.on_replica_actor_died(first.replica_id)
    assert (await routing.choose_replicas([other], pending(call("s3", 120, SLO.parse("5s"), "run-7")))) == [[other]]


async def test_router_leaves_calls_that_are_not_completions_to_any_replica():
    routing = await router()
    both = [replica("a"), replica("b")]
    metadata = RequestMetadata(request_id="m", internal_request_id="m", call_method="models")
    assert await routing.choose_replicas(both, PendingRequest(args=[], kwargs={}, metadata=metadata)) == [both]


def test_autoscaling_adds_a_replica_on_missed_objectives_and_removes_one_when_idle():
    assert decide(2, [1.0, 0.7], [3, 5], low=1, high=4) == 3
    assert decide(4, [0.5, 0.5, 0.5, 0.5], [9, 9, 9, 9], low=1, high=4) == 4  # at the cap
    assert decide(3, [1.0, 1.0, 1.0], [1, 0, 1], low=1, high=4) == 2
    assert decide(2, [1.0, 1.0], [1, 0], low=2, high=4) == 2  # at the floor
    assert decide(2, [0.95, 1.0], [4, 4], low=1, high=4) == 2  # busy and meeting: stay


def test_autoscaling_policy_changes_the_count_only_after_periods_in_a_row():
    """Ray Serve's hook: the same wish for ``CONSECUTIVE`` control periods before a change."""

    def period(state: dict, attainment: list[float]) -> tuple[int, dict]:
        replicas = {f"r{i}": value for i, value in enumerate(attainment)}
        ctx = SimpleNamespace(
            aggregated_metrics={"slo_attainment": replicas, "in_flight": dict.fromkeys(replicas, 4.0)},
            current_num_replicas=len(attainment), capacity_adjusted_min_replicas=1,
            capacity_adjusted_max_replicas=4, policy_state=state,
        )  # fmt: skip
        return slo_attainment_policy(ctx)

    state: dict = {}
    for _ in range(CONSECUTIVE - 1):
        count, state = period(state, [0.5, 1.0])
        assert count == 2  # not yet
    count, state = period(state, [0.5, 1.0])
    assert count == 3
    count, state = period({}, [1.0, 1.0])  # busy and meeting its objectives: stays
    assert count == 2


def test_scaling_bounds_are_checked():
    assert Scaling.of(2) == Scaling(2, 2, 2) and not Scaling.of(2).autoscaled
    assert Scaling.of(1, max_replicas=3) == Scaling(1, 3, 1)
    with pytest.raises(ReplicaError, match="--min-replicas"):
        Scaling.of(2, min_replicas=3, max_replicas=2)


# ---- a real local Ray Serve with two replicas of the default model ----


@pytest.fixture(scope="module")
def deployment():
    from sloserve_runtime.cluster.deployment import replicated

    before = _pids(ENGINE_PROCESS), _pids(RAY_PROCESSES)
    with replicated(server.ServerOptions(port=server.free_port()), 2, router="slo") as running:
        yield running
    # Nothing is left: no engine, no Ray process of ours.
    deadline = time.monotonic() + 30
    while (_pids(ENGINE_PROCESS) - before[0] or _pids(RAY_PROCESSES) - before[1]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _pids(ENGINE_PROCESS) - before[0], "an engine outlived the deployment"
    assert not _pids(RAY_PROCESSES) - before[1], "a Ray process outlived the deployment"


ENGINE_PROCESS = "vllm.entrypoints.openai.api_server"
RAY_PROCESSES = "raylet|gcs_server|ray::"


def _pids(pattern: str) -> set[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return {int(pid) for pid in found.stdout.split()}


async def test_two_replicas_answer_the_openai_client(deployment):
    client = openai.AsyncOpenAI(base_url=deployment.url, api_key="unused", max_retries=0)

    async def ask(index: int) -> tuple[str, dict]:
        raw = await client.completions.with_raw_response.create(
            model=deployment.served_model, prompt=f"Count to {index}:", max_tokens=24,
            extra_body={"slo": {"ttft_ms": "20s", "tpot_ms": 2000}},
        )  # fmt: skip
        return raw.headers["x-sloserve-replica"], raw.parse().model_extra["slo"]

    answers = await asyncio.gather(*(ask(index) for index in range(6)))
    assert {replica for replica, _ in answers} == {"0", "1"}  # concurrent load spreads over both
    for _, outcome in answers:
        assert outcome["admission"] == "admitted" and outcome["ttft_ms"] > 0
    stream = await client.chat.completions.create(
        model=deployment.served_model, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True,
        extra_body={"slo": {"ttft_ms": "20s"}},
    )  # fmt: skip
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    assert text
    models = (await client.models.list()).data
    assert models[0].id == deployment.served_model
    # A bad SLO, a conflict between header names and a malformed program field get 400 at the ingress.
    with pytest.raises(openai.BadRequestError, match="slo.ttft_ms"):
        await client.completions.create(
            model=deployment.served_model, prompt="x", max_tokens=2, extra_body={"slo": {"ttft_ms": -1}}
        )
    with pytest.raises(openai.BadRequestError, match="x-llm-d-slo-ttft-ms"):
        await client.completions.create(
            model=deployment.served_model, prompt="x", max_tokens=2,
            extra_headers={"x-slo-ttft-ms": "300", "x-llm-d-slo-ttft-ms": "500"},
        )  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="slo.program.deadline_ms"):
        await client.completions.create(
            model=deployment.served_model, prompt="x", max_tokens=2,
            extra_body={"slo": {"program": {"id": "r", "deadline_ms": 0}}},
        )  # fmt: skip
    # A program's calls stay on one replica, where its prefix is.
    homes = set()
    for stage in range(3):
        raw = await client.completions.with_raw_response.create(
            model=deployment.served_model, prompt=f"Step {stage}:", max_tokens=4,
            extra_headers={"x-slo-program": "run-42", "x-slo-ttft-ms": "20000"},
        )  # fmt: skip
        homes.add(raw.headers["x-sloserve-replica"])
    assert len(homes) == 1


async def test_a_client_that_goes_away_mid_stream_frees_its_engine(deployment):
    client = openai.AsyncOpenAI(base_url=deployment.url, api_key="unused", max_retries=0)
    stream = await client.completions.create(
        model=deployment.served_model, prompt="Write a long story.", max_tokens=1500, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    engine = deployment.replica_infos()[int(stream.response.headers["x-sloserve-replica"])]["url"]
    received = 0
    async for _ in stream:
        received += 1
        if received == 3:
            break
    await stream.close()
    deadline = time.monotonic() + 20
    while _running(engine) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert _running(engine) == 0, "the engine still runs a request whose client went away"


def _running(engine_url: str) -> float:
    """Requests the engine runs or holds, from vLLM's own /metrics."""
    text = httpx.get(engine_url.removesuffix("/v1") + "/metrics", timeout=10).text
    prefixes = ("vllm:num_requests_running{", "vllm:num_requests_waiting{")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefixes))


async def test_killed_replica_is_routed_around_and_replaced_by_ray_serve(deployment):
    client = openai.AsyncOpenAI(base_url=deployment.url, api_key="unused", max_retries=0)
    # A long answer is streaming from some replica when its engine dies.
    stream = await client.completions.create(
        model=deployment.served_model, prompt="Write a long story about a lighthouse.", max_tokens=1500,
        stream=True, extra_body={"slo": {"ttft_ms": "20s"}, "ignore_eos": True},
    )  # fmt: skip
    rank = int(stream.response.headers["x-sloserve-replica"])
    victim = deployment.replica_infos()[rank]
    received = 0
    with pytest.raises(openai.APIError, match=f"replica {rank} failed mid-answer"):
        async for _ in stream:
            received += 1
            if received == 3:
                os.kill(victim["engine_pid"], signal.SIGKILL)
                killed_at = time.monotonic()
    assert received >= 3

    # Within 2 s of the kill, new calls go to the survivor only.
    await asyncio.sleep(max(0.0, killed_at + 2.0 - time.monotonic()))

    async def ask() -> str:
        raw = await client.completions.with_raw_response.create(
            model=deployment.served_model, prompt="Hello", max_tokens=4, extra_body={"slo": {"ttft_ms": "20s"}}
        )
        assert raw.parse().choices[0].text is not None
        return raw.headers["x-sloserve-replica"]

    assert set(await asyncio.gather(*(ask() for _ in range(4)))) == {str(1 - rank)}
    assert not psutil.pid_exists(victim["replica_pid"])  # the replica died with its engine

    # Ray Serve starts a new replica, with a fresh engine, and routes to it again.
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        restarted = deployment.replica_infos().get(rank)
        if restarted is not None and restarted["engine_pid"] != victim["engine_pid"]:
            break
        await asyncio.sleep(1)
    else:
        pytest.fail("Ray Serve did not bring the replica back")
    served = set()
    for _ in range(30):
        if served == {"0", "1"}:
            break
        served |= set(await asyncio.gather(*(ask() for _ in range(4))))
    assert served == {"0", "1"}
    assert httpx.get(deployment.url.removesuffix("/v1") + "/health", timeout=10).status_code == 200
