"""Arrival processes: when each program of a trace arrives."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Burst(Protocol):
    """A stretch of the trace whose programs arrive faster (``spec.Burst``): fractions of the count."""

    start: float
    end: float
    factor: float


def arrival_times(
    rng: np.random.Generator, count: int, rate: float, burstiness: float = 1.0, burst: Burst | None = None
) -> np.ndarray:
    """Arrival times (s) of ``count`` programs at ``rate`` per second; the first arrives at 0.

    Inter-arrivals are gamma with shape ``burstiness`` and mean 1/rate, as vLLM's bench draws them:
    shape 1 is a Poisson process, below 1 burstier (CV² = 1/burstiness). Programs whose index lies
    in the burst's [start, end) fraction of ``count`` arrive ``burst.factor`` times faster.
    """
    if count == 0:
        return np.zeros(0)
    gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), size=count - 1)  # gaps[i] precedes program i + 1
    if burst is not None:
        following = np.arange(1, count)
        gaps[(following >= burst.start * count) & (following < burst.end * count)] /= burst.factor
    return np.concatenate(([0.0], np.cumsum(gaps)))
