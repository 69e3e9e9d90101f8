"""SLO targets: parsing user-facing values and judging a token timeline against them.

This module is the contract every part of sloserve shares (SDK, server, scheduler, bench);
it imports nothing from vLLM.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["SLO", "SLOError", "Outcome", "ThinkingSpan", "parse_ttft", "parse_tpot", "judge", "program_field"]

# SLOs-Serve judges decode speed over windows of this many output tokens.
ATTAINMENT_WINDOW = 10

_VALUE = re.compile(r"^\s*(?P<number>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?P<unit>[a-zA-Z]*)\s*$")
_MS_PER_UNIT = {"": 1.0, "ms": 1.0, "s": 1000.0}
# What ends a reasoning model's thinking in its text (DeepSeek-R1, Qwen3), where no reasoning
# parser splits the stream into reasoning and content.
THINKING_END = "</think>"


class SLOError(ValueError):
    """An SLO value that cannot be used; the message names the field and what is accepted."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        super().__init__(f"invalid SLO {field}={value!r}: {reason}")


@dataclass(frozen=True)
class SLO:
    """The latency objective of one request (or one stage).

    Exactly one of ``ttft_ms`` and ``ttft_slowdown`` may be set; ``None`` means no constraint.
    With ``thinking_tpot_ms``, a reasoning generation keeps that pace until it ends its thinking,
    and ``tpot_ms`` for its answer after.
    """

    ttft_ms: float | None = None  # first token within this many ms of arrival
    ttft_slowdown: float | None = None  # first token within N x the zero-load prefill time
    tpot_ms: float | None = None  # each later token within this many ms of the previous
    thinking_tpot_ms: float | None = None  # the same, while the model reasons (None: tpot_ms throughout)

    @classmethod
    def parse(cls, ttft: object = None, tpot: object = None, thinking_tpot: object = None) -> SLO:
        """Build an SLO from user values: ``SLO.parse(ttft="3x", tpot="50ms")``."""
        ttft_ms, ttft_slowdown = parse_ttft(ttft)
        return cls(
            ttft_ms=ttft_ms, ttft_slowdown=ttft_slowdown, tpot_ms=parse_tpot(tpot),
            thinking_tpot_ms=parse_tpot(thinking_tpot, "thinking_tpot"),
        )  # fmt: skip

    @property
    def is_constrained(self) -> bool:
        targets = (self.ttft_ms, self.ttft_slowdown, self.tpot_ms, self.thinking_tpot_ms)
        return any(target is not None for target in targets)

    def merged_over(self, default: SLO) -> SLO:
        """This SLO with each unset target taken from ``default`` (a server-wide default)."""
        has_ttft = self.ttft_ms is not None or self.ttft_slowdown is not None
        return SLO(
            ttft_ms=self.ttft_ms if has_ttft else default.ttft_ms,
            ttft_slowdown=self.ttft_slowdown if has_ttft else default.ttft_slowdown,
            tpot_ms=self.tpot_ms if self.tpot_ms is not None else default.tpot_ms,
            thinking_tpot_ms=self.thinking_tpot_ms,
        )

    def ttft_target_ms(self, zero_load_prefill_ms: float) -> float | None:
        """The TTFT target in ms, resolving a slowdown with the predicted zero-load prefill."""
        if self.ttft_slowdown is not None:
            return self.ttft_slowdown * zero_load_prefill_ms
        return self.ttft_ms

    def describe(self, compact: bool = False) -> str:
        ttft = f"{self.ttft_slowdown:g}x" if self.ttft_slowdown is not None else _fmt_ms(self.ttft_ms)
        if compact:
            thinking = "" if self.thinking_tpot_ms is None else f"{_fmt_ms(self.thinking_tpot_ms)}>"
            return f"{ttft}/{thinking}{_fmt_ms(self.tpot_ms)}"
        thinking = "" if self.thinking_tpot_ms is None else f" thinking_tpot={_fmt_ms(self.thinking_tpot_ms)}"
        return f"ttft={ttft}{thinking} tpot={_fmt_ms(self.tpot_ms)}"

    def to_json(self) -> dict[str, float | str | None]:
        ttft: float | str | None = f"{self.ttft_slowdown:g}x" if self.ttft_slowdown is not None else self.ttft_ms
        body: dict[str, float | str | None] = {"ttft_ms": ttft, "tpot_ms": self.tpot_ms}
        if self.thinking_tpot_ms is not None:
            body["thinking_tpot_ms"] = self.thinking_tpot_ms
        return body


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
    tpot_met: bool  # both phases', for a reasoning generation judged in two
    # A reasoning generation judged in two phases: its thinking (the first ``thinking_tokens``
    # tokens, against ``thinking_tpot_ms``), and its answer (the rest, against ``tpot_ms``).
    thinking: PhaseOutcome | None = None
    answer: PhaseOutcome | None = None

    @property
    def met(self) -> bool:
        return self.ttft_met and self.tpot_met

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {
            "ttft_ms": _round(self.ttft_ms),
            "tpot_ms": _round(self.tpot_ms),
            "worst_window_tpot_ms": _round(self.worst_window_tpot_ms),
            "ttft_met": self.ttft_met,
            "tpot_met": self.tpot_met,
            "met": self.met,
        }
        if self.thinking is not None:
            body["thinking"] = self.thinking.to_json()
            body["answer"] = None if self.answer is None else self.answer.to_json()
        return body


@dataclass(frozen=True)
class PhaseOutcome:
    """One phase of a reasoning generation, judged on its own TPOT target."""

    tokens: int
    tpot_ms: float | None  # mean gap between its tokens (from the token before it)
    worst_window_tpot_ms: float | None
    tpot_target_ms: float | None
    tpot_met: bool

    def to_json(self) -> dict[str, object]:
        return {
            "tokens": self.tokens, "tpot_ms": _round(self.tpot_ms),
            "worst_window_tpot_ms": _round(self.worst_window_tpot_ms), "tpot_target_ms": self.tpot_target_ms,
            "tpot_met": self.tpot_met,
        }  # fmt: skip


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def judge(
    arrival: float,
    token_times: Sequence[float],
    ttft_target_ms: float | None,
    tpot_target_ms: float | None,
    window: int = ATTAINMENT_WINDOW,
    thinking_tpot_ms: float | None = None,
    thinking_tokens: int | None = None,
) -> Outcome:
    """Judge a token timeline (seconds) against targets, with SLOs-Serve's attainment rule.

    The request meets its SLO iff TTFT <= target and, over every window of ``window`` output
    tokens, the mean gap between tokens <= the TPOT target (the whole tail if shorter). With
    ``thinking_tpot_ms``, the first ``thinking_tokens`` tokens (all of them if None: the thinking
    never ended) are judged against it and the rest against ``tpot_target_ms``, each phase on
    its own windows.
    """
    if not token_times:
        return Outcome(None, None, None, ttft_target_ms is None, True)
    ttft_ms = (token_times[0] - arrival) * 1000.0
    gaps = [(b - a) * 1000.0 for a, b in zip(token_times, token_times[1:], strict=False)]
    tpot_ms = sum(gaps) / len(gaps) if gaps else None
    ttft_met = ttft_target_ms is None or ttft_ms <= ttft_target_ms
    if thinking_tpot_ms is not None:
        split = len(token_times) if thinking_tokens is None else max(1, min(thinking_tokens, len(token_times)))
        thinking = _phase(gaps[: split - 1], split, thinking_tpot_ms, window)
        answer = _phase(gaps[split - 1 :], len(token_times) - split, tpot_target_ms, window)
        windows = [phase.worst_window_tpot_ms for phase in (thinking, answer) if phase.worst_window_tpot_ms]
        met = thinking.tpot_met and answer.tpot_met
        return Outcome(ttft_ms, tpot_ms, max(windows, default=None), ttft_met, met, thinking, answer)
    worst = _worst_window_mean(gaps, window)
    return Outcome(
        ttft_ms=ttft_ms,
        tpot_ms=tpot_ms,
        worst_window_tpot_ms=worst,
        ttft_met=ttft_met,
        tpot_met=tpot_target_ms is None or worst is None or worst <= tpot_target_ms,
    )


def _phase(gaps: Sequence[float], tokens: int, target_ms: float | None, window: int) -> PhaseOutcome:
    worst = _worst_window_mean(gaps, window)
    mean = sum(gaps) / len(gaps) if gaps else None
    return PhaseOutcome(tokens, mean, worst, target_ms, target_ms is None or worst is None or worst <= target_ms)


def program_field(
    run_id: str,
    name: str | None = None,
    stage: str | None = None,
    arrival: float | None = None,
    deadline_ms: float | None = None,
    remaining: Sequence[str] | None = None,
) -> dict[str, object]:
    """The ``slo.program`` body field of a stage call: its run, program and stage, the run's arrival
    (Unix seconds) and deadline, and the stage names still expected after it (unset: unknown)."""
    field: dict[str, object] = {"id": run_id}
    for key, value in (("name", name), ("stage", stage), ("arrival", arrival), ("deadline_ms", deadline_ms)):
        if value is not None:
            field[key] = value
    if remaining is not None:
        field["remaining"] = list(remaining)
    return field


class ThinkingSpan:
    """Where a streamed reasoning generation ends its thinking, from its deltas: the output chunks
    (a token each, as vLLM streams) through the one that closes ``THINKING_END``, or through the
    last reasoning delta where a reasoning parser splits the stream."""

    def __init__(self) -> None:
        self.chunks = 0
        self.end: int | None = None  # thinking tokens, once the thinking ended
        self._tail = ""
        self._reasoned = False

    def add_chunk(self, chunk: dict) -> None:
        """A streamed chunk (as a dict) that carries output: its first choice's answer text (content,
        a completion's text, a tool call's delta) and its reasoning text."""
        choice = (chunk.get("choices") or [{}])[0]
        delta = choice.get("delta") or {}
        content = choice.get("text") or delta.get("content") or str(delta.get("tool_calls") or "")
        self.add(content, delta.get("reasoning_content") or delta.get("reasoning"))

    def add(self, content: str | None, reasoning: str | None = None) -> None:
        if not content and not reasoning:
            return
        self.chunks += 1
        if self.end is not None:
            return
        if reasoning:
            self._reasoned = True
            return
        if self._reasoned:  # the parser's first content after its reasoning
            self.end = self.chunks - 1
            return
        self._tail = (self._tail + (content or ""))[-4 * len(THINKING_END) :]
        if THINKING_END in self._tail:
            self.end = self.chunks


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
