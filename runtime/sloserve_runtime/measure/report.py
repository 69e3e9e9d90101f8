"""Per-stage SLO tables and program outcomes for `sloserve run`."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from rich.table import Table

from sloserve.session import RequestRecord


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def stage_table(records: Sequence[RequestRecord]) -> Table:
    """One row per stage: requests, TTFT and TPOT (measured vs target), and how many met the SLO."""
    table = Table(title="Per-stage SLOs (client-side, ms)")
    table.add_column("stage", no_wrap=True)
    table.add_column("SLO ttft/tpot", no_wrap=True)
    for column in ("reqs", "TTFT p50", "TTFT max", "TTFT target", "TPOT mean", "TPOT target", "met"):
        table.add_column(column, justify="right", no_wrap=True)
    by_stage: dict[str, list[RequestRecord]] = defaultdict(list)
    for record in records:
        by_stage[record.stage].append(record)
    for stage, rows in by_stage.items():
        ttfts = [row.outcome.ttft_ms for row in rows if row.outcome.ttft_ms is not None]
        tpots = [row.outcome.tpot_ms for row in rows if row.outcome.tpot_ms is not None]
        targets = [row.ttft_target_ms for row in rows if row.ttft_target_ms is not None]
        met = sum(row.outcome.met for row in rows)
        table.add_row(
            stage,
            rows[0].slo.describe(compact=True),
            str(len(rows)),
            _ms(statistics.median(ttfts) if ttfts else None),
            _ms(max(ttfts) if ttfts else None),
            _ms(statistics.median(targets) if targets else None),
            _ms(statistics.fmean(tpots) if tpots else None),
            _ms(rows[0].slo.tpot_ms),
            f"[{'green' if met == len(rows) else 'red'}]{met}/{len(rows)}[/]",
        )
    return table


@dataclass(frozen=True)
class RunOutcome:
    """How one program run fared: met, or where it first lost its objective."""

    run_id: int
    met: bool
    lost_at: str | None  # e.g. "act: TTFT", "respond: TPOT", "deadline", "error: RateLimitError"
    tokens: int  # prompt and completion tokens the server computed for it


def run_outcomes(records: Sequence[RequestRecord], errors: dict[int, str] | None = None) -> list[RunOutcome]:
    """Each run's outcome from its calls' records (``errors``: run id -> the error that ended it).

    A run met its objectives when every stage call met its SLO, it raised no error, and it ended
    within its program's deadline, if it has one.
    """
    errors = errors or {}
    by_run: dict[int, list[RequestRecord]] = defaultdict(list)
    for record in records:
        by_run[record.run_id].append(record)
    outcomes = []
    for run_id in sorted(set(by_run) | set(errors)):
        calls = sorted(by_run.get(run_id, []), key=lambda record: record.end)
        lost_at = next((f"{call.stage}: {_missed(call)}" for call in calls if not call.outcome.met), None)
        if lost_at is None and run_id in errors:
            lost_at = f"error: {errors[run_id]}"
        if lost_at is None and calls and calls[0].deadline_ms is not None:
            if (calls[-1].end - calls[0].run_arrival) * 1000 > calls[0].deadline_ms:
                lost_at = "deadline"
        tokens = sum(call.prompt_tokens + call.completion_tokens for call in calls)
        outcomes.append(RunOutcome(run_id, lost_at is None, lost_at, tokens))
    return outcomes


def _missed(record: RequestRecord) -> str:
    outcome = record.outcome
    if outcome.ttft_ms is None:
        return "no output"
    return "TTFT" if not outcome.ttft_met else "TPOT"


def program_attainment(records: Sequence[RequestRecord]) -> tuple[int, int]:
    """(programs whose every stage call met its SLO, and their deadline, programs run)."""
    outcomes = run_outcomes(records)
    return sum(outcome.met for outcome in outcomes), len(outcomes)


def wasted_tokens(outcomes: Sequence[RunOutcome]) -> tuple[int, int]:
    """(tokens computed for runs that missed anyway, tokens computed in all)."""
    return sum(outcome.tokens for outcome in outcomes if not outcome.met), sum(outcome.tokens for outcome in outcomes)


def losses_table(outcomes: Sequence[RunOutcome]) -> Table | None:
    """Where the runs that missed first lost their objective, most common first; None if none missed."""
    lost = Counter(outcome.lost_at for outcome in outcomes if not outcome.met)
    if not lost:
        return None
    table = Table(title="Where runs lost their objective (first miss of each run)")
    table.add_column("first miss", no_wrap=True)
    table.add_column("runs", justify="right")
    for where, count in lost.most_common():
        table.add_row(str(where), str(count))
    return table
