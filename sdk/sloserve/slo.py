"""SLO targets: parsing user-facing values and judging a token timeline against them.

This module is the contract every part of sloserve shares (SDK, server, scheduler, bench);
it imports nothing from vLLM.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["SLO", "SLOError", "Outcome", "parse_ttft", "parse_tpot", "judge"]

# SLOs-Serve judges decode speed over windows of this many output tokens.
ATTAINMENT_WINDOW = 10

_VALUE = re.compile(r"^\s*(?P<number>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?P<unit>[a-zA-Z]*)\s*$")
_MS_PER_UNIT = {"": 1.0, "ms": 1.0, "s": 1000.0}


class SLOError(ValueError):
    """An SLO value that cannot be used; the message names the field and what is accepted."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        super().__init__(f"invalid SLO {field}={value!r}: {reason}")


@dataclass(frozen=True)
class SLO:
    """The latency objective of one request (or one stage).

    Exactly one of ``ttft_ms`` and ``ttft_slowdown`` may be set; ``None`` means no constraint.
    """

    ttft_ms: float | None = None  # first token within this many ms of arrival
    ttft_slowdown: float | None = None  # first token within N x the zero-load prefill time
    tpot_ms: float | None = None  # each later token within this many ms of the previous

    @classmethod
    def parse(cls, ttft: object = None, tpot: object = None) -> SLO:
        """Build an SLO from user values: ``SLO.parse(ttft="3x", tpot="50ms")``."""
        ttft_ms, ttft_slowdown = parse_ttft(ttft)
        return cls(ttft_ms=ttft_ms, ttft_slowdown=ttft_slowdown, tpot_ms=parse_tpot(tpot))

    @property
    def is_constrained(self) -> bool:
        return self.ttft_ms is not None or self.ttft_slowdown is not None or self.tpot_ms is not None

    def merged_over(self, default: SLO) -> SLO:
        """This SLO with each unset target taken from ``default`` (a server-wide default)."""
        has_ttft = self.ttft_ms is not None or self.ttft_slowdown is not None
        return SLO(
            ttft_ms=self.ttft_ms if has_ttft else default.ttft_ms,
            ttft_slowdown=self.ttft_slowdown if has_ttft else default.ttft_slowdown,
            tpot_ms=self.tpot_ms if self.tpot_ms is not None else default.tpot_ms,
        )

    def ttft_target_ms(self, zero_load_prefill_ms: float) -> float | None:
        """The TTFT target in ms, resolving a slowdown with the predicted zero-load prefill."""
        if self.ttft_slowdown is not None:
            return self.ttft_slowdown * zero_load_prefill_ms
        return self.ttft_ms

    def describe(self, compact: bool = False) -> str:
        ttft = f"{self.ttft_slowdown:g}x" if self.ttft_slowdown is not None else _fmt_ms(self.ttft_ms)
        return f"{ttft}/{_fmt_ms(self.tpot_ms)}" if compact else f"ttft={ttft} tpot={_fmt_ms(self.tpot_ms)}"

    def to_json(self) -> dict[str, float | str | None]:
        ttft: float | str | None = f"{self.ttft_slowdown:g}x" if self.ttft_slowdown is not None else self.ttft_ms
        return {"ttft_ms": ttft, "tpot_ms": self.tpot_ms}


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:g}ms"


def _split(field: str, value: object) -> tuple[float, str]:
    if isinstance(value, bool):
        raise SLOError(field, value, "expected a number of milliseconds or a string like '300ms'")
    if isinstance(value, int | float):
        number, unit = float(value), ""
    elif isinstance(value, str):
        match = _VALUE.match(value)
        if match is None:
            raise SLOError(field, value, "not a number; write e.g. 300, '300ms', '2s' or '3x'")
        number, unit = float(match["number"]), match["unit"].lower()
    else:
        raise SLOError(field, value, f"expected a number or a string, got {type(value).__name__}")
    if not math.isfinite(number) or number <= 0:
        raise SLOError(field, value, "must be a positive number")
    return number, unit


def parse_ttft(value: object, field: str = "ttft") -> tuple[float | None, float | None]:
    """Parse a TTFT target into ``(ms, slowdown)``; accepts 300, '300ms', '2s' or '3x'."""
    if value is None:
        return None, None
    number, unit = _split(field, value)
    if unit == "x":
        return None, number
    if unit not in _MS_PER_UNIT:
        raise SLOError(field, value, f"unknown unit {unit!r}; use ms, s, or x (slowdown)")
    return number * _MS_PER_UNIT[unit], None


def parse_tpot(value: object, field: str = "tpot") -> float | None:
    """Parse a TPOT target in ms; accepts 50, '50ms' or '0.05s'."""
    return parse_duration(value, field)


def parse_duration(value: object, field: str) -> float | None:
    """Parse a duration in ms (a TPOT, a program's deadline); accepts 50, '50ms', '20s'."""
    if value is None:
        return None
    number, unit = _split(field, value)
    if unit not in _MS_PER_UNIT:
        raise SLOError(field, value, f"unknown unit {unit!r}; use ms or s")
    return number * _MS_PER_UNIT[unit]


@dataclass(frozen=True)
class Outcome:
    """How one request fared against its SLO, measured from a token timeline."""

    ttft_ms: float | None  # arrival to first token; None if no token came
    tpot_ms: float | None  # mean gap between output tokens after the first
    worst_window_tpot_ms: float | None  # slowest mean gap over any ATTAINMENT_WINDOW tokens
    ttft_met: bool
    tpot_met: bool

    @property
    def met(self) -> bool:
        return self.ttft_met and self.tpot_met

    def to_json(self) -> dict[str, float | bool | None]:
        return {
            "ttft_ms": _round(self.ttft_ms),
            "tpot_ms": _round(self.tpot_ms),
            "worst_window_tpot_ms": _round(self.worst_window_tpot_ms),
            "ttft_met": self.ttft_met,
            "tpot_met": self.tpot_met,
            "met": self.met,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def judge(
    arrival: float,
    token_times: Sequence[float],
    ttft_target_ms: float | None,
    tpot_target_ms: float | None,
    window: int = ATTAINMENT_WINDOW,
) -> Outcome:
    """Judge a token timeline (seconds) against targets, with SLOs-Serve's attainment rule.

    The request meets its SLO iff TTFT <= target and, over every window of ``window`` output
    tokens, the mean gap between tokens <= the TPOT target (the whole tail if shorter).
    """
    if not token_times:
        return Outcome(None, None, None, ttft_target_ms is None, True)
    ttft_ms = (token_times[0] - arrival) * 1000.0
    gaps = [(b - a) * 1000.0 for a, b in zip(token_times, token_times[1:], strict=False)]
    tpot_ms = sum(gaps) / len(gaps) if gaps else None
    worst = _worst_window_mean(gaps, window)
    return Outcome(
        ttft_ms=ttft_ms,
        tpot_ms=tpot_ms,
        worst_window_tpot_ms=worst,
        ttft_met=ttft_target_ms is None or ttft_ms <= ttft_target_ms,
        tpot_met=tpot_target_ms is None or worst is None or worst <= tpot_target_ms,
    )


def _worst_window_mean(gaps: Sequence[float], window: int) -> float | None:
    if not gaps:
        return None
    width = min(window, len(gaps))
    running = sum(gaps[:width])
    worst = running
    for i in range(width, len(gaps)):
        running += gaps[i] - gaps[i - width]
        worst = max(worst, running)
    return worst / width
