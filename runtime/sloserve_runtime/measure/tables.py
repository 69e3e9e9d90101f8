"""Results of simulator and bench runs as tables (rich, for the terminal) and JSON (for docs/data)."""

from __future__ import annotations

import dataclasses
import statistics

from rich.table import Table

from sloserve_runtime.measure.runs import Measurement
from sloserve_runtime.measure.server_stats import ServerStats
from sloserve_runtime.measure.summary import Summary

# Columns that name things: left-aligned, and never cut (an endpoint's label is a URL and a mode).
_NAMES = ("scenario", "scheduler", "router", "stage", "endpoint")


def _layout(column: str) -> dict[str, str]:
    return {"justify": "left", "overflow": "fold"} if column in _NAMES else {"justify": "right"}


def _summary_row(summary: Summary) -> list[str]:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    return [
        f"{100 * summary.program_attainment:.1f}%", f"{100 * summary.wasted_work:.0f}%",
        f"{100 * summary.attainment:.1f}%",
        f"{summary.goodput_rps:.2f}", ms(summary.ttft_ms.p50), ms(summary.ttft_ms.p90), ms(summary.ttft_ms.p99),
        ms(summary.tpot_ms.p50), ms(summary.tpot_ms.p90), f"{summary.output_throughput_tps:.0f}",
        "-" if summary.admitted_attainment is None else f"{100 * summary.admitted_attainment:.1f}%",
        f"{summary.best_effort_completed}/{summary.best_effort}" if summary.best_effort else "-",
    ]  # fmt: skip


SUMMARY_COLUMNS = (
    "attain", "wasted", "req attain", "goodput/s", "TTFT p50", "TTFT p90", "TTFT p99", "TPOT p50", "TPOT p90", "tok/s",
    "admitted attain", "best effort done",
)  # fmt: skip


def results_table(title: str, rows: list[tuple[str, str, Measurement]]) -> Table:
    """One row per rate run (or the capacity probe); replica columns when any target has several."""
    clustered = any(measurement.replicas > 1 for _, _, measurement in rows)
    columns = ("scenario", "scheduler", *(("replicas", "router") if clustered else ()), "rate", "capacity")
    table = Table(title=title)
    for column in (*columns, *(("per replica",) if clustered else ()), *SUMMARY_COLUMNS):
        table.add_column(column, **_layout(column))
    for scenario, label, measurement in rows:
        cluster = (str(measurement.replicas), measurement.router or "-") if clustered else ()
        per_replica = (_rate(measurement.capacity_per_replica_rps),) if clustered else ()
        for rate, summary in measurement.probes if measurement.capacity_rps is None else [measurement.headline]:
            capacity = _rate(measurement.capacity_rps)
            table.add_row(scenario, label, *cluster, f"{rate:.3g}", capacity, *per_replica, *_summary_row(summary))
    return table


def stage_table(title: str, rows: list[tuple[str, str, Measurement]]) -> Table:
    """Per stage and rate run: how many calls met their SLO, which half the others missed, and, where
    the scheduler reports its admission, how many it admitted and how many of those met their SLO."""
    table = Table(title=title)
    columns = ("scheduler", "rate", "stage", "calls", "met", "TTFT met", "TPOT met", "admitted", "admitted met")
    for column in columns:
        table.add_column(column, **_layout(column))
    for _, label, measurement in rows:
        for rate, summary in measurement.probes:
            for stage, part in summary.by_stage.items():
                shares = (f"{share:.1%}" for share in (part.attainment, part.ttft_met, part.tpot_met))
                admitted = "-" if part.admitted is None else str(part.admitted)
                kept = "-" if part.admitted_attainment is None else f"{part.admitted_attainment:.1%}"
                table.add_row(label, f"{rate:.3g}", stage, str(part.requests), *shares, admitted, kept)
    return table


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def json_entry(scenario: str, label: str, measurement: Measurement, detailed: bool = False) -> dict:
    """One scenario x scheduler (or endpoint) of the JSON; ``detailed``: each probe also lists its
    calls, every token's time among them (``bench --save-detailed``)."""
    rate, summary = measurement.headline
    return {
        "scenario": scenario,
        "scheduler": label,
        "rate": rate,
        "attainment": summary.program_attainment,
        "request_attainment": summary.attainment,
        "wasted_work": summary.wasted_work,
        "capacity_rps": measurement.capacity_rps,
        "replicas": measurement.replicas,
        "router": measurement.router,
        "capacity_per_replica_rps": measurement.capacity_per_replica_rps,
        "ttft_p90_ms": summary.ttft_ms.p90,
        "tpot_p90_ms": summary.tpot_ms.p90,
        "goodput_rps": summary.goodput_rps,
        "output_throughput_tps": summary.output_throughput_tps,
        "admitted_attainment": summary.admitted_attainment,
        "best_effort": summary.best_effort,
        "best_effort_completed": summary.best_effort_completed,
        "probes": [
            {
                "rate": r,
                **s.to_json(),
                **({"calls": _calls(measurement, r)} if detailed else {}),
                **({"server": dataclasses.asdict(stats)} if stats is not None else {}),
            }
            for (r, s), stats in zip(measurement.probes, _server_stats(measurement), strict=True)
        ],
    }


def _server_stats(measurement: Measurement) -> list[ServerStats | None]:
    """Each probe's server stats (None where none were sampled: the simulator, a server without /metrics)."""
    stats = measurement.server_stats
    return stats if len(stats) == len(measurement.probes) else [None] * len(measurement.probes)


def server_table(title: str, rows: list[tuple[str, str, Measurement]]) -> Table | None:
    """Per endpoint and rate: the server's memory and vLLM's queues during the run (None: no samples)."""
    table = Table(title=title)
    columns = ("endpoint", "rate", "RSS start MB", "RSS peak MB", "RSS end MB", "waiting max", "waiting mean",
               "running max")  # fmt: skip
    for column in columns:
        table.add_column(column, **_layout(column))
    for _, label, measurement in rows:
        for (rate, _), stats in zip(measurement.probes, _server_stats(measurement), strict=True):
            if stats is None:
                continue
            memory = [_megabytes(value) for value in (stats.rss_start_mb, stats.rss_peak_mb, stats.rss_end_mb)]
            queues = (f"{stats.waiting_max:.0f}", f"{stats.waiting_mean:.1f}", f"{stats.running_max:.0f}")
            table.add_row(label, f"{rate:.3g}", *memory, *queues)
    return table if table.row_count else None


def _megabytes(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _calls(measurement: Measurement, rate: float) -> list[dict]:
    """The calls of the run at ``rate`` (the last, if a search ran it twice), as vLLM's benchmark
    saves them with --save-detailed: when each was sent and when each of its tokens came."""
    return [dataclasses.asdict(result) for result in measurement.results_at.get(rate, [])]


def _target(label: str, measurement: Measurement) -> str:
    """A scheduler's name, with its cluster (``sloserve 4x slo``) when it has several replicas."""
    return label if measurement.replicas == 1 else f"{label} {measurement.replicas}x {measurement.router}"


def capacity_ratio_table(rows: list[tuple[str, str, Measurement]], baseline: str) -> Table:
    """Each scheduler's capacity over ``baseline``'s on the same scenario and cluster."""
    table = Table(title=f"Capacity ratio over {baseline}")
    table.add_column("scheduler")
    table.add_column("per scenario")
    table.add_column("geometric mean", justify="right")
    base = {(scenario, m.replicas, m.router): m.capacity_rps for scenario, label, m in rows if label == baseline}
    for target in dict.fromkeys(_target(label, m) for _, label, m in rows if label != baseline):
        ratios = {
            name: m.capacity_rps / base[name, m.replicas, m.router]
            for name, label, m in rows
            if _target(label, m) == target and base.get((name, m.replicas, m.router))
        }
        geo = statistics.geometric_mean(ratios.values()) if ratios and all(ratios.values()) else 0.0
        table.add_row(target, ", ".join(f"{s} {r:.2f}x" for s, r in ratios.items()), f"{geo:.2f}x")
    return table


def ceiling_table(rows: list[tuple[str, str, Measurement]], ceilings: dict[str, float]) -> Table:
    """Each scenario's work ceiling (``measure/ceiling.py``) and each scheduler's capacity as a share
    of it: the most any scheduler could add is the ceiling over its capacity."""
    table = Table(title="Work ceiling (an estimate): programs/s whose work would fill the engine")
    for column in ("scenario", "ceiling", "scheduler", "capacity", "of the ceiling"):
        table.add_column(column, **_layout(column))
    for scenario, label, m in rows:
        ceiling = ceilings.get(scenario)
        if ceiling is None or m.capacity_rps is None or m.replicas > 1:
            continue
        table.add_row(scenario, f"{ceiling:.3g}", label, f"{m.capacity_rps:.3g}", f"{m.capacity_rps / ceiling:.0%}")
    return table


def routing_table(rows: list[tuple[str, str, Measurement]]) -> Table:
    """Capacity per replica against one replica's, and each router's against round-robin's at the same K."""
    table = Table(title="Routing: capacity per replica")
    for column in ("scenario", "scheduler", "replicas", "router", "cluster", "per replica", "vs 1 replica",
                   "vs round-robin"):  # fmt: skip
        table.add_column(column, **_layout(column))
    capacity = {(scenario, label, m.replicas, m.router): m.capacity_rps or 0.0 for scenario, label, m in rows}
    for scenario, label, m in rows:
        single = capacity.get((scenario, label, 1, None))
        round_robin = capacity.get((scenario, label, m.replicas, "round-robin"))
        per_replica = m.capacity_per_replica_rps or 0.0
        table.add_row(
            scenario, label, str(m.replicas), m.router or "-", f"{m.capacity_rps or 0.0:.3g}", f"{per_replica:.3g}",
            f"{per_replica / single:.2f}x" if single else "-",
            f"{m.capacity_rps / round_robin:.2f}x" if round_robin and m.capacity_rps else "-",
        )  # fmt: skip
    return table
