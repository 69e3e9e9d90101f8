"""Capacity search on a known attainment curve."""

from __future__ import annotations

import pytest

from sloserve_runtime.measure.capacity import find_capacity


def curve(knee: float):
    return lambda rate: 1.0 if rate <= knee else 0.5


@pytest.mark.parametrize("start", [0.1, 1.0, 50.0])
def test_search_finds_the_knee_within_tolerance(start):
    capacity, probes = find_capacity(curve(7.3), start_rate=start)
    assert 7.3 * 0.95 <= capacity <= 7.3
    assert all(attainment >= 0.9 for rate, attainment in probes if rate <= capacity)


def test_no_rate_holds_gives_zero():
    capacity, probes = find_capacity(lambda rate: 0.0, start_rate=1.0, max_probes=6)
    assert capacity == 0.0
    assert len(probes) == 6
