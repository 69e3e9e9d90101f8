"""Run metrics: SLO attainment, goodput, latency percentiles and throughput from a run's stage results.

Percentiles are numpy's default ``linear`` method: the q-th percentile of n sorted values sits at
rank q/100·(n-1), interpolated between the two nearest values (as vLLM's bench computes them).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sloserve.slo import Outcome, judge
from sloserve_runtime.workload.programs import StageResult


@dataclass(frozen=True)
class Latency:
    """Mean and percentiles of one latency, in ms; None when no request had it."""

    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values_ms: Sequence[float]) -> Latency:
        if not values_ms:
            return cls(None, None, None, None)
        p50, p90, p99 = np.percentile(values_ms, [50, 90, 99], method="linear")
        return cls(float(np.mean(values_ms)), float(p50), float(p90), float(p99))


@dataclass(frozen=True)
class KindSummary:
    """Attainment of one kind of program (a scenario class, e.g. "coding" in "mixed")."""

    requests: int  # stage calls of this kind
    attainment: float  # fraction of those calls that met their SLO
    programs: int
    program_attainment: float  # fraction of those programs whose every call met its SLO
    # Where the scheduler reports its admission: how many of these calls it admitted (promised
    # their SLO at arrival or later), and the fraction of those that met it (None: none admitted,
    # or no admission reported). The promise is kept per tier, so it is judged per tier too.
    admitted: int | None = None
    admitted_attainment: float | None = None


@dataclass(frozen=True)
class StageSummary:
    """Which half of their SLO the calls of one stage (``kind/stage``) kept; a failed call kept neither."""

    requests: int
    attainment: float  # fraction that met their whole SLO
    ttft_met: float  # fraction whose first token came within the TTFT target
    tpot_met: float  # fraction whose every 10-token window kept the TPOT target
    # As ``KindSummary``: the calls the scheduler admitted, and the fraction of those that met their SLO.
    admitted: int | None = None
    admitted_attainment: float | None = None


@dataclass(frozen=True)
class Summary:
    """What a run achieved; fractions are 0 when there was nothing to count."""

    duration_s: float  # the run's wall duration, the denominator of every rate
    requests: int  # stage calls sent
    completed: int  # calls that ended without error and with at least one token
    failed: int  # the others; they count as missing their SLO
    programs: int
    attainment: float  # fraction of calls meeting their SLO (TTFT and every 10-token TPOT window)
    program_attainment: float  # fraction of programs whose every call met its SLO
    goodput_rps: float  # calls/s with TTFT <= target and mean TPOT <= target (vLLM bench's goodput)
    output_throughput_tps: float  # output tokens received per second, failed calls' tokens included
    ttft_ms: Latency  # over completed calls
    tpot_ms: Latency  # per-call mean gap between tokens, over completed calls with >= 2 tokens
    by_kind: dict[str, KindSummary]
    # The scheduler's admission, where it reports one (the simulator does): the attainment of the
    # calls it admitted, and how many it served as best effort and how many of those finished.
    admitted_attainment: float | None = None
    best_effort: int = 0
    best_effort_completed: int = 0
    by_stage: dict[str, StageSummary] = field(default_factory=dict)  # keyed "kind/stage"
    # Wasted work: the share of the tokens sent and generated (prompts and outputs) that belonged
    # to programs that missed anyway.
    wasted_work: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(results: Sequence[StageResult], duration_s: float) -> Summary:
    """Summarize a run's stage calls; ``duration_s`` is its wall duration."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    # None for a failed call: it has no timeline to judge and misses its SLO.
    outcomes = [_judged(result) if _completed(result) else None for result in results]
    judged = [outcome for outcome in outcomes if outcome is not None]
    met = [outcome is not None and outcome.met for outcome in outcomes]
    good = sum(
        outcome is not None and _good_for_goodput(result, outcome)
        for result, outcome in zip(results, outcomes, strict=True)
    )
    return Summary(
        duration_s=duration_s,
        requests=len(results),
        completed=len(judged),
        failed=len(results) - len(judged),
        programs=len({result.program_id for result in results}),
        attainment=_fraction(sum(met), len(results)),
        program_attainment=_program_attainment(results, met),
        goodput_rps=good / duration_s,
        output_throughput_tps=sum(len(result.token_times) for result in results) / duration_s,
        ttft_ms=Latency.of([outcome.ttft_ms for outcome in judged if outcome.ttft_ms is not None]),
        tpot_ms=Latency.of([outcome.tpot_ms for outcome in judged if outcome.tpot_ms is not None]),
        by_kind=_by_kind(results, met),
        admitted_attainment=_admitted_attainment(results, met),
        best_effort=sum(result.best_effort for result in results),
        best_effort_completed=sum(result.best_effort and _completed(result) for result in results),
        by_stage=_by_stage(results, outcomes),
        wasted_work=_wasted_work(results, met),
    )


def _admitted_attainment(results: Sequence[StageResult], met: Sequence[bool]) -> float | None:
    """Attainment among the calls the scheduler admitted (None: it reported no admission)."""
    if all(result.admission is None for result in results):
        return None
    admitted = [call_met for result, call_met in zip(results, met, strict=True) if not result.best_effort]
    return _fraction(sum(admitted), len(admitted))


def compare(ours: Summary, theirs: Summary) -> dict[str, float | None]:
    """Ratios ours/theirs: above 1 is better for all but ``ttft_p90`` (lower latency is better there).

    A ratio is None where theirs is 0 or missing.
    """
    pairs = {
        "attainment": (ours.attainment, theirs.attainment),
        "program_attainment": (ours.program_attainment, theirs.program_attainment),
        "goodput": (ours.goodput_rps, theirs.goodput_rps),
        "output_throughput": (ours.output_throughput_tps, theirs.output_throughput_tps),
        "ttft_p90": (ours.ttft_ms.p90, theirs.ttft_ms.p90),
    }
    return {name: _ratio(a, b) for name, (a, b) in pairs.items()}


def _completed(result: StageResult) -> bool:
    return result.error is None and bool(result.token_times)


def _judged(result: StageResult) -> Outcome:
    return judge(
        result.arrival, result.token_times, result.ttft_target_ms, result.tpot_target_ms,
        thinking_tpot_ms=result.thinking_tpot_ms, thinking_tokens=result.thinking_tokens,
    )  # fmt: skip


def _good_for_goodput(result: StageResult, outcome: Outcome) -> bool:
    # vLLM bench judges the mean TPOT over the whole call, not SLOs-Serve's 10-token windows.
    mean_tpot_ok = result.tpot_target_ms is None or outcome.tpot_ms is None or outcome.tpot_ms <= result.tpot_target_ms
    return outcome.ttft_met and mean_tpot_ok


def _program_outcomes(results: Sequence[StageResult], met: Sequence[bool]) -> dict[int, bool]:
    """Per program: every call met its SLO and, with a deadline, all of them ended by it."""
    programs: dict[int, bool] = {}
    for result, call_met in zip(results, met, strict=True):
        on_time = result.program_due is None or (
            bool(result.token_times) and result.token_times[-1] <= result.program_due
        )
        programs[result.program_id] = programs.get(result.program_id, True) and call_met and on_time
    return programs


def _program_attainment(results: Sequence[StageResult], met: Sequence[bool]) -> float:
    programs = _program_outcomes(results, met)
    return _fraction(sum(programs.values()), len(programs))


def _wasted_work(results: Sequence[StageResult], met: Sequence[bool]) -> float:
    """The share of prompt and output tokens that went to programs that missed their objectives."""
    kept = _program_outcomes(results, met)
    tokens = [result.prompt_tokens + len(result.token_times) for result in results]
    return _fraction(sum(t for t, r in zip(tokens, results, strict=True) if not kept[r.program_id]), sum(tokens))


def _by_kind(results: Sequence[StageResult], met: Sequence[bool]) -> dict[str, KindSummary]:
    calls: dict[str, list[int]] = defaultdict(list)
    for index, result in enumerate(results):
        calls[result.kind].append(index)
    summaries = {}
    for kind, indices in sorted(calls.items()):
        kind_results, kind_met = [results[i] for i in indices], [met[i] for i in indices]
        admitted, admitted_met = _admitted_of(kind_results, kind_met)
        summaries[kind] = KindSummary(
            requests=len(indices),
            attainment=_fraction(sum(kind_met), len(indices)),
            programs=len({result.program_id for result in kind_results}),
            program_attainment=_program_attainment(kind_results, kind_met),
            admitted=admitted,
            admitted_attainment=admitted_met,
        )
    return summaries


def _by_stage(results: Sequence[StageResult], outcomes: Sequence[Outcome | None]) -> dict[str, StageSummary]:
    """Per stage of each kind of program: how many calls met their SLO, their TTFT, their TPOT."""
    calls: dict[str, list[tuple[StageResult, Outcome | None]]] = defaultdict(list)
    for result, outcome in zip(results, outcomes, strict=True):
        calls[f"{result.kind}/{result.stage}"].append((result, outcome))
    summaries = {}
    for name, stage in sorted(calls.items()):
        met = [o is not None and o.met for _, o in stage]
        admitted, admitted_met = _admitted_of([r for r, _ in stage], met)
        summaries[name] = StageSummary(
            requests=len(stage),
            attainment=_fraction(sum(met), len(stage)),
            ttft_met=_fraction(sum(o is not None and o.ttft_met for _, o in stage), len(stage)),
            tpot_met=_fraction(sum(o is not None and o.tpot_met for _, o in stage), len(stage)),
            admitted=admitted,
            admitted_attainment=admitted_met,
        )
    return summaries


def _admitted_of(results: Sequence[StageResult], met: Sequence[bool]) -> tuple[int | None, float | None]:
    """How many of these calls the scheduler admitted, and the fraction of those that met their SLO
    ((None, None): it reported no admission; the fraction is None when it admitted none)."""
    if all(result.admission is None for result in results):
        return None, None
    admitted = [call_met for result, call_met in zip(results, met, strict=True) if not result.best_effort]
    return len(admitted), (_fraction(sum(admitted), len(admitted)) if admitted else None)


def _fraction(count: int, total: int) -> float:
    return count / total if total else 0.0


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return None if ours is None or not theirs else ours / theirs
