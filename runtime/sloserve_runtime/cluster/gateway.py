"""The OpenAI-compatible front of a replicated deployment: route each request, proxy its stream.

``sloserve serve --replicas N`` runs this in front of N engine replicas (``replicas.py``). For
every completion request the gateway

* reads its SLO the way the engine's middleware does (a bad one gets the same HTTP 400),
* builds the planner's view of each replica from the requests it has in flight there (prompt
  length from the model's tokenizer; a request decodes once its first token has passed through),
* asks the router (``router.py``: ``slo``, ``round-robin`` or ``least-loaded``) for a replica,
  with program affinity from the run a call names (``x-slo-program`` or ``slo.program.id``),
* proxies the request there and streams the answer back; the replica's own middleware still
  reports the SLO outcome and admission.

Faults: a replica that fails its health check (every ``HEALTH_INTERVAL_S``) or refuses a
connection gets no new requests until it answers again (Ray restarts it, on a new port). A
request whose replica fails before any output token is retried on another replica; one that
fails mid-answer ends with an error the client can read (HTTP 502, or a final ``error`` event
when streamed).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from sloserve._reassemble import Reassembler
from sloserve.slo import SLO, SLOError
from sloserve_runtime.core.planner import LiveRequest, Planner
from sloserve_runtime.core.router import NoHealthyReplicaError, ReplicaView, make_router
from sloserve_runtime.core.slo_state import SLORequestState
from sloserve_runtime.core.step_time import StepTimeModel
from sloserve_runtime.serving.exchange import sse_data
from sloserve_runtime.serving.requests import (
    HEADER_ADMISSION,
    BodyError,
    parse_body,
    request_admission,
    request_program,
    request_slo,
)

logger = logging.getLogger(__name__)

HEADER_REPLICA = "x-sloserve-replica"  # which replica served the response
HEALTH_INTERVAL_S = 0.5
HEALTH_TIMEOUT_S = 1.0
PROGRAMS_REMEMBERED = 10_000  # program runs whose replica the gateway remembers, for affinity
# Headers that belong to one hop and are not forwarded.
_HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "accept-encoding"}


class ReplicaUnavailable(Exception):
    """The replica failed before producing any output: the request may go elsewhere."""


@dataclass
class InFlight:
    """A request in flight on a replica, as the planner sees it."""

    state: SLORequestState
    prompt_tokens: int
    output_tokens: int = 0

    def live(self) -> LiveRequest:
        if self.output_tokens == 0:
            return LiveRequest(self.state, self.prompt_tokens, 0)
        return LiveRequest(self.state, 1, self.prompt_tokens + self.output_tokens)


@dataclass
class Slot:
    """One replica as the gateway knows it."""

    index: int
    url: str  # its OpenAI base URL, .../v1
    started_at: float
    healthy: bool = True
    in_flight: dict[str, InFlight] = field(default_factory=dict)

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")


class GatewayMetrics:
    """The gateway's own Prometheus metrics (each replica exports its engine's at its /metrics)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.routed = Counter(
            "sloserve_gateway_routed", "Requests sent to each replica.", ["replica"], registry=self.registry
        )
        self.retried = Counter(
            "sloserve_gateway_retried",
            "Requests retried on another replica after theirs failed before any output.",
            registry=self.registry,
        )
        self.failed = Counter(
            "sloserve_gateway_failed", "Requests that ended with an error when their replica failed mid-answer.",
            registry=self.registry,
        )  # fmt: skip
        self.healthy = Gauge(
            "sloserve_gateway_replica_healthy", "1 while the replica passes its health check.", ["replica"],
            registry=self.registry,
        )  # fmt: skip


class Gateway:
    """Routes and proxies completion requests across replicas."""

    def __init__(
        self,
        replicas: list[dict[str, Any]],
        router: str,
        step_time: StepTimeModel,
        max_num_batched_tokens: int,
        count_tokens: Callable[[dict[str, Any]], int],
        default_slo: SLO | None = None,
        default_admission: str = "best-effort",
        refresh: Callable[[int], dict[str, Any] | None] | None = None,
    ) -> None:
        self.slots = [Slot(info["index"], info["url"], info["started_at"]) for info in replicas]
        self.router = make_router(router)
        self.step_time = step_time
        self.planners = [Planner(step_time, max_num_batched_tokens) for _ in self.slots]
        self.homes: OrderedDict[str, int] = OrderedDict()  # program run -> the replica of its last stage
        self.count_tokens = count_tokens
        self.default_slo = default_slo or SLO()
        self.default_admission = default_admission
        self.refresh = refresh  # the replica's current info, from Ray (None while it restarts)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0))
        self.metrics = GatewayMetrics()
        self._ids = itertools.count()
        self._health_task: asyncio.Task[None] | None = None

    # ---- the ASGI app ----

    def app(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self.completion, methods=["POST"]),
            Route("/v1/completions", self.completion, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ]
        return Starlette(routes=routes, lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._health_task = asyncio.create_task(self._watch_health(), name="replica-health")
        try:
            yield
        finally:
            self._health_task.cancel()
            await self.client.aclose()

    async def health(self, request: Request) -> Response:
        healthy = [slot.index for slot in self.slots if slot.healthy]
        return JSONResponse({"healthy_replicas": healthy}, status_code=200 if healthy else 503)

    async def models(self, request: Request) -> Response:
        for slot in self._healthy():
            with contextlib.suppress(httpx.HTTPError):
                upstream = await self.client.get(f"{slot.url}/models", headers=_forward_headers(request))
                return Response(upstream.content, upstream.status_code, media_type="application/json")
        return _error(503, "no replica is healthy; they are restarting")

    async def prometheus(self, request: Request) -> Response:
        for slot in self.slots:
            self.metrics.healthy.labels(str(slot.index)).set(int(slot.healthy))
        return Response(generate_latest(self.metrics.registry), media_type="text/plain; version=0.0.4")

    async def completion(self, request: Request) -> Response:
        arrival = time.time()
        try:
            body = parse_body(await request.body())
        except BodyError as exc:
            return _error(400, str(exc))
        if body is None:
            return _error(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        headers = {key.lower(): value for key, value in request.headers.items()}
        try:
            slo = request_slo(headers, body).merged_over(self.default_slo)
            admission = request_admission(headers, body, self.default_admission)
            call = request_program(headers, body)
        except SLOError as exc:
            return _error(400, str(exc), exc.field)
        prompt_tokens = max(1, self.count_tokens(body))
        request_id = f"gw-{next(self._ids)}"
        flight = InFlight(
            SLORequestState.create(request_id, slo, arrival, prompt_tokens, self.step_time), prompt_tokens
        )
        forward = _forward_headers(request)
        forward[HEADER_ADMISSION] = admission
        program = None if call is None else call.run_id  # a program run: its calls share a prefix
        tried: set[int] = set()
        while True:
            slot = self._choose(flight, program, tried)
            if slot is None:
                return _error(503, "no replica is healthy; they are restarting, retry shortly")
            try:
                return await self._serve(request, slot, body, forward, flight)
            except ReplicaUnavailable as exc:
                logger.warning("replica %d failed before any output (%s); retrying elsewhere", slot.index, exc)
                tried.add(slot.index)
                self.metrics.retried.inc()

    # ---- routing ----

    def _healthy(self) -> list[Slot]:
        return [slot for slot in self.slots if slot.healthy]

    def _choose(self, flight: InFlight, program: str | None, tried: set[int]) -> Slot | None:
        """The router's pick among healthy replicas not tried yet (None: there is none)."""
        views = [
            ReplicaView(
                planner=self.planners[slot.index],
                admitted=[other.live() for other in slot.in_flight.values()],
                load=len(slot.in_flight),
                healthy=slot.healthy and slot.index not in tried,
            )
            for slot in self.slots
        ]
        home = self.homes.get(program) if program else None
        try:
            route = self.router.route(time.time(), flight.live(), views, home=home)
        except NoHealthyReplicaError:
            return None
        if program:
            self.homes[program] = route.replica
            self.homes.move_to_end(program)
            while len(self.homes) > PROGRAMS_REMEMBERED:
                self.homes.popitem(last=False)
        return self.slots[route.replica]

    # ---- proxying ----

    async def _serve(
        self, request: Request, slot: Slot, body: dict[str, Any], headers: dict[str, str], flight: InFlight
    ) -> Response:
        """Send to ``slot``; raises ReplicaUnavailable if it fails before any output."""
        streams = bool(body.get("stream"))
        upstream_body = body if streams else {**body, "stream": True, "stream_options": {"include_usage": True}}
        key = flight.state.request_id
        slot.in_flight[key] = flight
        self.metrics.routed.labels(str(slot.index)).inc()
        try:
            upstream = await self.client.send(
                self.client.build_request("POST", slot.url + request.url.path.removeprefix("/v1"), json=upstream_body,
                                          headers=headers),
                stream=True,
            )  # fmt: skip
        except httpx.TransportError as exc:
            slot.in_flight.pop(key, None)
            self._mark_down(slot, exc)
            raise ReplicaUnavailable(str(exc)) from None
        if upstream.status_code != 200:
            content = await upstream.aread()
            await upstream.aclose()
            slot.in_flight.pop(key, None)
            return Response(content, upstream.status_code, headers=_reply_headers(upstream, slot))
        events = _sse_events(upstream)
        try:
            first = await anext(events, None)
        except httpx.TransportError as exc:
            await upstream.aclose()
            slot.in_flight.pop(key, None)
            self._mark_down(slot, exc)
            raise ReplicaUnavailable(str(exc)) from None
        if first is None:
            await upstream.aclose()
            slot.in_flight.pop(key, None)
            raise ReplicaUnavailable("the replica closed the stream without an answer")
        if streams:
            return StreamingResponse(
                self._relay(first, events, upstream, slot, flight, key),
                media_type="text/event-stream",
                headers=_reply_headers(upstream, slot),
            )
        return await self._reassemble(first, events, upstream, slot, flight, key)

    async def _relay(
        self, first: bytes, events: AsyncIterator[bytes], upstream: httpx.Response, slot: Slot, flight: InFlight,
        key: str,
    ) -> AsyncIterator[bytes]:  # fmt: skip
        try:
            flight.output_tokens += 1
            yield first
            async for event in events:
                flight.output_tokens += 1
                yield event
        except httpx.TransportError as exc:
            self._mark_down(slot, exc)
            self.metrics.failed.inc()
            message = f"replica {slot.index} failed mid-answer ({exc}); the output above is incomplete"
            yield b"data: " + json.dumps({"error": {"message": message, "type": "ReplicaFailed", "code": 502}}).encode()
            yield b"\n\n"
        finally:
            slot.in_flight.pop(key, None)
            await upstream.aclose()

    async def _reassemble(
        self, first: bytes, events: AsyncIterator[bytes], upstream: httpx.Response, slot: Slot, flight: InFlight,
        key: str,
    ) -> Response:  # fmt: skip
        assembled = Reassembler()
        outcome: dict[str, Any] | None = None
        try:
            event: bytes | None = first
            while event is not None:
                chunk = _chunk(event)
                if chunk is not None:
                    assembled.add(chunk)
                    outcome = chunk.get("slo", outcome)
                    flight.output_tokens += 1
                event = await anext(events, None)
        except httpx.TransportError as exc:
            self._mark_down(slot, exc)
            self.metrics.failed.inc()
            return _error(502, f"replica {slot.index} failed mid-answer ({exc}); retry the request")
        finally:
            slot.in_flight.pop(key, None)
            await upstream.aclose()
        if assembled.error is not None:
            return _error(int(assembled.error.get("code") or 500), assembled.error.get("message", "engine error"))
        response = {**assembled.response(), "slo": outcome}
        return JSONResponse(response, headers=_reply_headers(upstream, slot))

    # ---- health ----

    def _mark_down(self, slot: Slot, reason: object) -> None:
        if slot.healthy:
            logger.warning("replica %d is down (%s); routing around it", slot.index, reason)
        slot.healthy = False

    async def _watch_health(self) -> None:
        while True:
            await asyncio.gather(*(self._check(slot) for slot in self.slots), return_exceptions=True)
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def _check(self, slot: Slot) -> None:
        if not slot.healthy and self.refresh is not None:
            info = await asyncio.to_thread(self.refresh, slot.index)
            if info is not None and info["started_at"] != slot.started_at:
                slot.url, slot.started_at = info["url"], info["started_at"]  # restarted by Ray
                slot.in_flight.clear()
        try:
            answered = (await self.client.get(f"{slot.root}/health", timeout=HEALTH_TIMEOUT_S)).status_code == 200
        except httpx.HTTPError:
            answered = False
        if answered and not slot.healthy:
            logger.info("replica %d answers again at %s", slot.index, slot.url)
        if not answered:
            self._mark_down(slot, "health check failed")
        slot.healthy = answered


async def _sse_events(upstream: httpx.Response) -> AsyncIterator[bytes]:
    """The stream's SSE events, each with its trailing blank line."""
    buffer = b""
    async for data in upstream.aiter_raw():
        buffer += data
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            if event.strip():
                yield event + b"\n\n"
    if buffer.strip():
        yield buffer + b"\n\n"


def _chunk(event: bytes) -> dict[str, Any] | None:
    data = sse_data(event)
    return None if data is None or data == b"[DONE]" else json.loads(data)


def _forward_headers(request: Request) -> dict[str, str]:
    return {key: value for key, value in request.headers.items() if key.lower() not in _HOP_HEADERS}


def _reply_headers(upstream: httpx.Response, slot: Slot) -> dict[str, str]:
    kept = {key: value for key, value in upstream.headers.items() if key.lower().startswith(("x-slo", "retry-after"))}
    return {**kept, HEADER_REPLICA: str(slot.index)}


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {400: "BadRequestError", 429: "RateLimitError", 503: "ServiceUnavailableError"}.get(status, "ServerError")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)
