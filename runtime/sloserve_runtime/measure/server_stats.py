"""What a server went through during a bench run, from its Prometheus ``/metrics``: its memory and
the lengths of vLLM's queues, sampled while the trace plays."""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

# vLLM's gauges of its scheduler's queues, and ours of the server's memory (``serving/metrics.py``).
WAITING, RUNNING = "vllm:num_requests_waiting", "vllm:num_requests_running"
RSS = "sloserve_server_resident_memory_bytes"
# vLLM's counters of its prefix cache: prompt tokens looked up, and those found cached.
PREFIX_QUERIES, PREFIX_HITS = "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"
SAMPLE_EVERY_S = 0.5


@dataclass(frozen=True)
class ServerStats:
    """One run's samples, summed over the engines the server reports."""

    samples: int
    waiting_max: float  # requests in vLLM's waiting queue
    waiting_mean: float
    running_max: float  # requests in its running batch
    rss_start_mb: float | None  # the server's resident memory (API server and engine core)
    rss_peak_mb: float | None
    rss_end_mb: float | None


def parse(text: str) -> dict[str, float]:
    """The gauges and counters this module reads, from one ``/metrics`` text, each summed over its label sets."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (WAITING, RUNNING, RSS, PREFIX_QUERIES, PREFIX_HITS):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def summarize_samples(samples: list[dict[str, float]]) -> ServerStats | None:
    """None if no sample reached the server (or it exports none of these gauges)."""
    samples = [sample for sample in samples if sample]
    if not samples:
        return None
    waiting = [sample.get(WAITING, 0.0) for sample in samples]
    rss = [sample[RSS] / 2**20 for sample in samples if RSS in sample]
    return ServerStats(
        samples=len(samples),
        waiting_max=max(waiting),
        waiting_mean=statistics.fmean(waiting),
        running_max=max(sample.get(RUNNING, 0.0) for sample in samples),
        rss_start_mb=rss[0] if rss else None,
        rss_peak_mb=max(rss) if rss else None,
        rss_end_mb=rss[-1] if rss else None,
    )


def scrape(base_url: str) -> dict[str, float]:
    """The server's values of this module's metrics now (``parse`` of its ``/metrics``)."""
    response = httpx.get(metrics_url(base_url), timeout=5)
    response.raise_for_status()
    return parse(response.text)


def metrics_url(base_url: str) -> str:
    """``/metrics`` beside an OpenAI base URL (``http://host:port/v1``)."""
    return base_url.rstrip("/").removesuffix("/v1") + "/metrics"


async def sample_while(work: asyncio.Future, base_url: str, headers: dict[str, str]) -> list[dict[str, float]]:
    """Sample the server's gauges every ``SAMPLE_EVERY_S`` until ``work`` is done (and once after)."""
    samples: list[dict[str, float]] = []
    async with httpx.AsyncClient(headers=headers, timeout=5) as client:
        while True:
            try:
                response = await client.get(metrics_url(base_url))
                samples.append(parse(response.text) if response.status_code == 200 else {})
            except httpx.HTTPError:
                samples.append({})  # a busy or restarting server: a gap, not a failed run
            if work.done():
                return samples
            await asyncio.wait({work}, timeout=SAMPLE_EVERY_S)
