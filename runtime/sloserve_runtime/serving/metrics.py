"""Prometheus metrics of SLO serving, per tier, on vLLM's own ``/metrics`` endpoint.

The middleware counts each completion once it ends: its tier (the SLO it ran under), the
admission decision (admitted, best effort, rejected) and whether its SLO was met. vLLM serves the
default ``prometheus_client`` registry at ``/metrics``, so these appear beside vLLM's own::

    sloserve_requests_total{tier="ttft=3x,tpot=50ms",admission="admitted"} 12
    sloserve_requests_finished_total{tier="ttft=3x,tpot=50ms",admission="admitted",slo_met="true"} 11
    sloserve_slo_attainment{tier="ttft=3x,tpot=50ms"} 0.917
    sloserve_admission_changes_total{tier="ttft=3x,tpot=50ms",change="promoted"} 2
    sloserve_server_resident_memory_bytes 1.9e+09

The last is the whole server's memory: vLLM's own process metrics cover the API server process
only, and the engine core, with the model and the KV cache, runs in a process of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import psutil
from prometheus_client import Counter, Gauge, Histogram

from sloserve.slo import SLO

ADMITTED, BEST_EFFORT, REJECTED, UNKNOWN = "admitted", "best_effort", "rejected", "unknown"

REQUESTS = Counter(
    "sloserve_requests",
    "Completion requests by SLO tier and admission decision (unknown: the scheduler reports none).",
    ["tier", "admission"],
)
FINISHED = Counter(
    "sloserve_requests_finished",
    "Completions that ended with output, by SLO tier, admission decision and whether the SLO was met.",
    ["tier", "admission", "slo_met"],
)
ATTAINMENT = Gauge(
    "sloserve_slo_attainment",
    "Share of finished completions of the tier that met their SLO, since the server started.",
    ["tier"],
)
CHANGES = Counter(
    "sloserve_admission_changes",
    "Changes to a completion's admission after arrival, by SLO tier: promoted to admitted, demoted "
    "to best effort, preempted to give its place to an admitted request (counted when it ends).",
    ["tier", "change"],
)
TTFT = Histogram(
    "sloserve_time_to_first_token_seconds",
    "Time to first token as the client sees it, from the request's arrival, by SLO tier.",
    ["tier"],
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)

SERVER_MEMORY = Gauge(
    "sloserve_server_resident_memory_bytes",
    "Resident memory of the server: the API server process and every process it started (the engine core).",
)


def _server_resident_bytes() -> float:
    """This process's resident memory and that of every process under it, read at scrape time."""
    server = psutil.Process()
    total = 0
    for process in (server, *server.children(recursive=True)):
        with contextlib.suppress(psutil.Error):  # a process that ended between the listing and the read
            total += process.memory_info().rss
    return float(total)


SERVER_MEMORY.set_function(_server_resident_bytes)

_met: dict[str, list[int]] = {}  # tier -> [met, finished], for the attainment gauge


def tier(slo: SLO) -> str:
    """The tier label of an SLO: its TTFT and TPOT targets, e.g. ``ttft=3x,tpot=50ms``."""
    targets = slo.to_json()
    ttft, tpot = targets["ttft_ms"], targets["tpot_ms"]
    ttft_text = "none" if ttft is None else ttft if isinstance(ttft, str) else f"{ttft:g}ms"
    tpot_text = "none" if tpot is None else f"{tpot:g}ms"
    return f"ttft={ttft_text},tpot={tpot_text}"


def record(slo: SLO, admission: str, met: bool | None, ttft_s: float | None, changes: Sequence[str] = ()) -> None:
    """Count one completion: ``met`` None when it produced no output (rejected, failed);
    ``changes``: what happened to its admission after arrival (``admission.CHANGES``)."""
    label = tier(slo)
    REQUESTS.labels(label, admission).inc()
    for change in changes:
        CHANGES.labels(label, change).inc()
    if met is None:
        return
    FINISHED.labels(label, admission, str(met).lower()).inc()
    counts = _met.setdefault(label, [0, 0])
    counts[0] += met
    counts[1] += 1
    ATTAINMENT.labels(label).set(counts[0] / counts[1])
    if ttft_s is not None:
        TTFT.labels(label).observe(ttft_s)
