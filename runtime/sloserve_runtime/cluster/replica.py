"""An engine replica of the Ray Serve application: one `sloserve serve` engine and its proxy.

Each replica of the ``EngineReplica`` deployment starts vLLM's OpenAI server with our scheduler
and middleware in a child process and proxies the calls the ingress hands it (``generate``), so
it knows every request in flight on its engine. What it knows is its routing stats
(``record_routing_stats``): the planner's view the request router weighs (``routing.py``).

The replica and its engine live and die together: the engine gets SIGTERM when the replica's
process dies (a parent-death signal), and a watchdog ends the replica when its engine exits, so
that Ray Serve sees a dead replica at once, stops routing to it and starts a new one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from sloserve.slo import SLO
from sloserve_runtime.engine.lifecycle import parent_death_signal
from sloserve_runtime.serving import server
from sloserve_runtime.serving.exchange import sse_data

logger = logging.getLogger(__name__)

HEADER_REPLICA = "x-sloserve-replica"  # which replica served the response (its rank)
ATTAINMENT_WINDOW_S = 30.0  # the requests that ended this recently make a replica's attainment


@dataclass
class RoutedCall:
    """A completion request as the ingress hands it to a replica (and the router sees it)."""

    request_id: str
    path: str  # /v1/chat/completions or /v1/completions
    body: dict[str, Any]  # streamed with usage, whatever the client asked (the ingress reassembles)
    headers: dict[str, str]
    arrival: float  # Unix seconds, when the ingress received it
    prompt_tokens: int
    slo: SLO
    program: str | None = None  # the program run it belongs to: a later call goes where its prefix is

    def stats_entry(self, output_tokens: int) -> dict[str, Any]:
        """What the replica's routing stats say of it (plain values: they cross processes)."""
        return {
            "id": self.request_id, "arrival": self.arrival, "prompt_tokens": self.prompt_tokens,
            "output_tokens": output_tokens, "slo": self.slo.to_json(), "program": self.program,
        }  # fmt: skip


class EngineFailed(RuntimeError):
    """The replica's engine is gone or refused the connection before any output."""


def _die_with_replica() -> None:
    """In the engine's server process, before vLLM starts: SIGTERM when the replica that started it dies."""
    parent_death_signal(signal.SIGTERM)


def cores_of(rank: int, count: int) -> str | None:
    """The CPU cores replica ``rank`` of ``count`` runs its engine on, where replicas share one
    machine's cores (the CPU build): its own share, so that engines do not thrash each other."""
    if not server.is_cpu_build():
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < count:
        return str(cores[rank % len(cores)])
    return ",".join(str(core) for position, core in enumerate(cores) if position % count == rank % len(cores))


class EngineReplica:
    """One engine; deployed with ``serve.deployment`` by ``deployment.build_app``."""

    def __init__(self, options: server.ServerOptions, count: int, info_dir: str) -> None:
        from ray import serve

        context = serve.get_replica_context()
        self.rank = context.rank.local_rank if context.rank is not None else 0
        host = "127.0.0.1" if options.host in ("127.0.0.1", "localhost") else _node_ip()
        bind = cores_of(self.rank, count) if options.env.get("VLLM_CPU_OMP_THREADS_BIND") is None else None
        env = options.env if bind is None else {**options.env, "VLLM_CPU_OMP_THREADS_BIND": bind}
        self.options = replace(
            options, host=host, port=server.free_port(host), env=env, notices=server.notices_address()
        )
        self.info_path = Path(info_dir) / f"replica-{self.rank}.json"
        log_path = Path(info_dir) / f"replica-{self.rank}-{os.getpid()}.log"
        self.running = server.start(self.options, log_path, preexec=_die_with_replica)
        self.client = httpx.AsyncClient(base_url=self.running.url, timeout=httpx.Timeout(None, connect=5.0))
        self.in_flight: dict[str, tuple[RoutedCall, list[int]]] = {}  # id -> (call, [output events])
        self.ended: list[tuple[float, bool]] = []  # (when, met) of the requests that ended lately
        self.started_at = time.time()
        self.info_path.write_text(json.dumps(self.info()))
        threading.Thread(target=self._watch, name="engine-watchdog", daemon=True).start()

    def _watch(self) -> None:
        """End this replica when its engine exits, so Ray Serve replaces both."""
        self.running.process.wait()
        logger.error("replica %d: engine exited with %s", self.rank, self.running.process.returncode)
        with contextlib.suppress(ProcessLookupError):  # its engine core may outlive it: end the group
            os.killpg(self.running.process.pid, signal.SIGKILL)
        os._exit(1)

    def info(self) -> dict[str, Any]:
        """Where its engine answers, the processes, and when it started (new after a restart)."""
        return {
            "rank": self.rank, "url": self.running.url, "engine_pid": self.running.process.pid,
            "replica_pid": os.getpid(), "started_at": self.started_at, "log": str(self.running.log_path),
        }  # fmt: skip

    # ---- Ray Serve's hooks ----

    def check_health(self) -> None:
        if self.running.process.poll() is not None:
            raise RuntimeError(f"the engine exited with {self.running.process.returncode}")

    def record_routing_stats(self) -> dict[str, Any]:
        """The planner's view of this replica, for the request router: its requests in flight
        (each with its SLO, prompt and output so far), and its rank."""
        return {
            "rank": self.rank,
            "in_flight": [call.stats_entry(events[0]) for call, events in self.in_flight.values()],
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        """For the autoscaling policy (``autoscaling.py``): the share of its recent requests that met
        their SLO, and how many are in flight."""
        now = time.time()
        self.ended = [(when, met) for when, met in self.ended if now - when <= ATTAINMENT_WINDOW_S]
        met = [met for _, met in self.ended]
        return {"slo_attainment": sum(met) / len(met) if met else 1.0, "in_flight": float(len(self.in_flight))}

    # ---- requests ----

    async def models(self) -> bytes:
        return (await self.client.get("/models")).content

    async def generate(self, call: RoutedCall) -> AsyncIterator[Any]:
        """Proxy one call to the engine: first ``{"status", "headers"}``, then the body's SSE events
        (or, for an answer that is not 200, its whole body). Raises ``EngineFailed`` if the engine
        cannot be reached before any output, so the ingress may send the call elsewhere."""
        events = [0]
        self.in_flight[call.request_id] = (call, events)
        met: bool | None = None
        try:
            request = self.client.build_request("POST", call.path.removeprefix("/v1"), json=call.body,
                                                headers=call.headers)  # fmt: skip
            try:
                upstream = await self.client.send(request, stream=True)
            except httpx.TransportError as exc:
                raise EngineFailed(f"replica {self.rank}: {exc}") from None
            try:
                kept = {k: v for k, v in upstream.headers.items() if k.lower().startswith(("x-slo", "retry-after"))}
                yield {"status": upstream.status_code, "headers": {**kept, HEADER_REPLICA: str(self.rank)}}
                if upstream.status_code != 200:
                    yield await upstream.aread()
                    return
                async for event in sse_events(upstream):
                    events[0] += 1
                    met = _met(event, met)
                    yield event
            finally:
                await upstream.aclose()
        finally:
            self.in_flight.pop(call.request_id, None)
            if met is not None:
                self.ended.append((time.time(), met))


def _met(event: bytes, met: bool | None) -> bool | None:
    """The SLO outcome an event carries (the middleware puts it in the last chunk), else ``met``."""
    if b'"slo"' not in event:
        return met
    data = sse_data(event)
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        outcome = json.loads(data).get("slo") if data and data != b"[DONE]" else None
        if isinstance(outcome, dict) and "met" in outcome:
            return bool(outcome["met"])
    return met


async def sse_events(upstream: httpx.Response) -> AsyncIterator[bytes]:
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


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()
