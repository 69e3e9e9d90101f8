"""Replicas on Ray behind the gateway: routing state without engines, then a real two-replica run."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import openai
import pytest

from sloserve.slo import SLO
from sloserve_runtime.cluster.gateway import Gateway, InFlight
from sloserve_runtime.core.slo_state import SLORequestState
from sloserve_runtime.core.step_time import DEFAULT_PROFILE, StepTimeModel
from sloserve_runtime.serving import server

STEP_TIME = StepTimeModel.load(DEFAULT_PROFILE)


def gateway(router: str, replicas: int = 2) -> Gateway:
    infos = [{"index": i, "url": f"http://127.0.0.1:{9000 + i}/v1", "started_at": 0.0} for i in range(replicas)]
    return Gateway(infos, router, STEP_TIME, 512, count_tokens=lambda body: 100)


def flight(name: str, prompt: int, slo: SLO, arrival: float | None = None) -> InFlight:
    arrival = time.time() if arrival is None else arrival
    return InFlight(SLORequestState.create(name, slo, arrival, prompt, STEP_TIME), prompt)


def test_in_flight_request_prefills_then_decodes():
    request = flight("a", 300, SLO.parse("2s", "100ms"))
    assert request.live().to_compute == 300 and not request.live().decoding
    request.output_tokens = 5
    assert request.live().decoding and request.live().context == 305


def test_gateway_routes_around_busy_and_unhealthy_replicas():
    front = gateway("slo")
    # Replica 0 has a long queue of tight prefills in flight; a tight new request fits only on 1.
    for index in range(6):
        front.slots[0].in_flight[f"busy-{index}"] = flight(f"busy-{index}", 1500, SLO.parse("3s"))
    tight = flight("new", 200, SLO.parse("1s"))
    assert front._choose(tight, None, set()).index == 1
    front.slots[1].healthy = False
    assert front._choose(tight, None, set()).index == 0  # not feasible anywhere healthy: best effort on 0
    front.slots[0].healthy = False
    assert front._choose(tight, None, set()) is None  # nowhere to go: the caller answers 503


def test_gateway_keeps_a_program_on_its_replica_and_skips_tried_ones():
    front = gateway("slo")
    first = front._choose(flight("stage-1", 100, SLO.parse("5s")), "run-7", set())
    front.slots[first.index].in_flight["stage-1"] = flight("stage-1", 100, SLO.parse("5s"))
    # The other replica is emptier, but the program's prefix lives on the first one.
    assert front._choose(flight("stage-2", 120, SLO.parse("5s")), "run-7", set()).index == first.index
    assert front._choose(flight("other", 120, SLO.parse("5s")), None, set()).index != first.index
    # A retry never goes back to the replica that just failed.
    assert front._choose(flight("stage-3", 120, SLO.parse("5s")), "run-7", {first.index}).index != first.index


def test_round_robin_gateway_alternates():
    front = gateway("round-robin", replicas=3)
    picks = [front._choose(flight(f"r{i}", 50, SLO()), None, set()).index for i in range(6)]
    assert picks == [0, 1, 2, 0, 1, 2]


# ---- a real local Ray instance with two replicas of the default model ----


@pytest.fixture(scope="module")
def deployment():
    from sloserve_runtime.cluster.deployment import replicated

    with replicated(server.ServerOptions(), 2, router="slo") as running:
        yield running


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
    # A bad SLO gets the engine's own 400 at the gateway.
    with pytest.raises(openai.BadRequestError, match="slo.ttft_ms"):
        await client.completions.create(
            model=deployment.served_model, prompt="x", max_tokens=2, extra_body={"slo": {"ttft_ms": -1}}
        )
    # A malformed program field gets the engine's own 400 at the gateway too.
    with pytest.raises(openai.BadRequestError, match="slo.program.deadline_ms"):
        await client.completions.create(
            model=deployment.served_model, prompt="x", max_tokens=2,
            extra_body={"slo": {"program": {"id": "r", "deadline_ms": 0}}},
        )  # fmt: skip


async def test_killed_replica_is_routed_around_and_restarted_by_ray(deployment):
    client = openai.AsyncOpenAI(base_url=deployment.url, api_key="unused", max_retries=0)
    # A long answer is streaming from some replica when its engine dies.
    stream = await client.completions.create(
        model=deployment.served_model, prompt="Write a long story about a lighthouse.", max_tokens=1500,
        stream=True, extra_body={"slo": {"ttft_ms": "20s"}, "ignore_eos": True},
    )  # fmt: skip
    replica = int(stream.response.headers["x-sloserve-replica"])
    other = 1 - replica
    victim = deployment.replicas.infos(30)[replica]
    received = 0
    with pytest.raises(openai.APIError, match=f"replica {replica} failed mid-answer"):
        async for _ in stream:
            received += 1
            if received == 3:
                os.kill(victim["engine_pid"], signal.SIGKILL)
                killed_at = time.monotonic()
    assert received >= 3

    # The gateway stops sending to it within 2 s.
    slot = deployment.gateway.slots[replica]
    while slot.healthy and time.monotonic() - killed_at < 2.0:
        await asyncio.sleep(0.05)
    assert not slot.healthy, "the dead replica was still routed to 2 s after it died"

    # Meanwhile every request is served by the survivor (a request sent to the dead one before any
    # token is retried there).
    async def ask() -> str:
        raw = await client.completions.with_raw_response.create(
            model=deployment.served_model, prompt="Hello", max_tokens=4, extra_body={"slo": {"ttft_ms": "20s"}}
        )
        assert raw.parse().choices[0].text is not None
        return raw.headers["x-sloserve-replica"]

    assert set(await asyncio.gather(*(ask() for _ in range(4)))) == {str(other)}

    # Ray restarts the actor and with it a fresh engine, which the gateway takes back.
    deadline = time.monotonic() + 400
    while not slot.healthy and time.monotonic() < deadline:
        await asyncio.sleep(1)
    assert slot.healthy, "Ray did not bring the replica back"
    restarted = deployment.replicas.infos(30)[replica]
    assert restarted["engine_pid"] != victim["engine_pid"]
    assert slot.url == restarted["url"]
    health = httpx.get(deployment.url.removesuffix("/v1") + "/health", timeout=10).json()
    assert health["healthy_replicas"] == [0, 1]
