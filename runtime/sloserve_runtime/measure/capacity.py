"""Capacity search: the highest rate at which at least 90 % of requests meet their SLOs."""

from __future__ import annotations

from collections.abc import Callable

CAPACITY_ATTAINMENT = 0.9


def find_capacity(
    attainment_at: Callable[[float], float],
    start_rate: float,
    rel_tolerance: float = 0.05,
    max_probes: int = 14,
) -> tuple[float, list[tuple[float, float]]]:
    """Double the rate until attainment drops below 90 %, then bisect; returns (capacity, probes).

    The capacity is the highest probed rate that held 90 %; 0.0 if even the lowest probe failed.
    """
    probes: list[tuple[float, float]] = []

    def probe(rate: float) -> bool:
        attainment = attainment_at(rate)
        probes.append((rate, attainment))
        return attainment >= CAPACITY_ATTAINMENT

    good, bad = 0.0, None
    rate = start_rate
    while len(probes) < max_probes and bad is None:
        if probe(rate):
            good, rate = rate, rate * 2
        else:
            bad = rate
    if good == 0.0 and bad is not None:  # the start was already too fast: walk down
        rate = bad / 2
        while len(probes) < max_probes and good == 0.0:
            if probe(rate):
                good = rate
            else:
                bad, rate = rate, rate / 2
    while bad is not None and good > 0 and len(probes) < max_probes and (bad - good) > rel_tolerance * good:
        middle = (good + bad) / 2
        if probe(middle):
            good = middle
        else:
            bad = middle
    return good, probes
