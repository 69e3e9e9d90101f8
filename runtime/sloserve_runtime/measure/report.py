"""Per-stage SLO tables for `sloserve run`."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence

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


def program_attainment(records: Sequence[RequestRecord]) -> tuple[int, int]:
    """(programs whose every stage call met its SLO, programs run)."""
    runs: dict[int, bool] = {}
    for record in records:
        runs[record.run_id] = runs.get(record.run_id, True) and record.outcome.met
    return sum(runs.values()), len(runs)
