"""The simulator tables of the results page (``make bench``): capacities of ours and stock vLLM,
with and without speculation, on the A100 and H200 profiles, written into ``docs/benchmarks.md``
between its marker comments, with their data files and a plot.

Each table is a set of capacity searches, one per scenario, scheduler and speculation length;
they run in parallel processes, since each is deterministic and independent of the others.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import statistics
import subprocess
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sloserve_runtime.core.step_time import StepTimeModel, resolve_profile
from sloserve_runtime.measure.ceiling import work_ceiling
from sloserve_runtime.measure.plots import capacity_bars
from sloserve_runtime.measure.runs import TraceOptions, measure, run_label, simulator_runner
from sloserve_runtime.measure.tables import json_entry
from sloserve_runtime.sim import SimConfig
from sloserve_runtime.workload.scenarios import ALL_SCENARIOS, load_scenario

OURS, STOCK = "sloserve", "vllm"
SIX = ("chatbot", "coding", "summarization", "mixed", "tool-calling", "reasoning")  # SLOs-Serve's scenarios
SHOWN = (*SIX, *(scenario for scenario in ALL_SCENARIOS if scenario not in SIX))  # the six, then burst
CAPACITY_START = 0.5  # programs/s where every search starts, as `sloserve simulate --capacity` does


@dataclass(frozen=True)
class CapacityTable:
    """One generated table: every scenario's capacity under ours and stock vLLM on one profile."""

    marker: str  # the page's marker comments are ``bench:<marker>`` and ``/bench:<marker>``
    profile: str  # a bundled step-time profile
    num_programs: int  # programs a probe: enough that a probe is not a transient at the profile's rates
    speculative_tokens: tuple[int, ...] = (0, 4)
    spec_acceptance: float = 0.6  # an assumption, not a measurement: stated beside the table

    @property
    def data_file(self) -> str:
        return f"sim-{self.marker}-capacity.json"

    def command(self) -> str:
        """The `sloserve simulate` command that runs this table alone."""
        drafts = ",".join(map(str, self.speculative_tokens))
        return (
            f".venv/bin/sloserve simulate --scenario all --profile {self.profile} --scheduler {OURS},{STOCK} \\\n"
            f"    --speculative-tokens {drafts} --spec-acceptance {self.spec_acceptance} --capacity "
            f"--num-requests {self.num_programs} \\\n    --json docs/data/{self.data_file}"
        )


TABLES = (
    CapacityTable("a100", "a100-opt13b-slos-serve", 200),
    # At 20-60 chat requests/s, 200 programs arrive in less time than one answer takes.
    CapacityTable("h200", "h200-opt13b-measured", 600),
)


@dataclass(frozen=True)
class Job:
    """One capacity search: a scenario under one scheduler and speculation length."""

    table: CapacityTable
    scenario: str
    scheduler: str
    drafts: int

    @property
    def label(self) -> str:
        return run_label(self.scheduler, self.drafts)


def jobs(tables: Iterable[CapacityTable] = TABLES) -> list[Job]:
    return [
        Job(table, scenario, scheduler, drafts)
        for table in tables
        for scenario in ALL_SCENARIOS
        for scheduler in (OURS, STOCK)
        for drafts in table.speculative_tokens
    ]


def run_job(job: Job) -> dict[str, Any]:
    """The capacity search of one job, as an entry of ``sloserve simulate --json``'s results."""
    config = SimConfig.from_profile(resolve_profile(job.table.profile))
    config = replace(config, num_speculative_tokens=job.drafts, spec_acceptance=job.table.spec_acceptance)
    options = TraceOptions(num_programs=job.table.num_programs)
    runner = simulator_runner(job.scheduler, config)
    measurement = measure(job.label, runner, load_scenario(job.scenario), options, None, CAPACITY_START)
    return json_entry(job.scenario, job.label, measurement)


def run_all(all_jobs: list[Job], processes: int, advance: Callable[[Job], None]) -> dict[Job, dict[str, Any]]:
    """Every job's entry; ``advance`` is told of each as it ends. The longest (ours, speculating, the
    profile with the most programs a probe) start first, so the processes end close together."""
    ordered = sorted(all_jobs, key=lambda job: (-job.table.num_programs, job.scheduler != OURS, -job.drafts))
    entries: dict[Job, dict[str, Any]] = {}
    with ProcessPoolExecutor(max_workers=processes) as pool:
        futures = {pool.submit(run_job, job): job for job in ordered}
        for future in as_completed(futures):
            job = futures[future]
            entries[job] = future.result()
            advance(job)
    return entries


def _capacity(value: float | None) -> str:
    return "-" if not value else f"{value:.3g}"


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours and theirs else None


def _shown(ratio: float | None, bold: bool = False) -> str:
    if ratio is None:
        return "-"
    return f"**{ratio:.2f}x**" if bold else f"{ratio:.2f}x"


def table_markdown(table: CapacityTable, capacities: dict[tuple[str, str], float | None], provenance: str) -> str:
    """The page's block for one table: provenance, the command, the table and its data file."""
    spec = max(table.speculative_tokens)
    ours_spec, stock_spec = run_label(OURS, spec), run_label(STOCK, spec)
    series = [OURS, STOCK, *((ours_spec, stock_spec) if spec else ())]
    pairs = [(OURS, STOCK), *(((ours_spec, STOCK), (ours_spec, stock_spec)) if spec else ())]

    # The work ceiling counts one token a decode a step: it bounds the runs without speculation.
    model = StepTimeModel.load(resolve_profile(table.profile))
    ceilings = {scenario: work_ceiling(load_scenario(scenario), model).rate for scenario in SHOWN}

    def steady(scenario: str, label: str) -> bool:
        """Not above the work ceiling, which no steady load passes: a capacity above it is the
        probe's programs ending before the load they bring has built up."""
        capacity = capacities[scenario, label]
        return label not in (OURS, STOCK) or not capacity or capacity <= ceilings[scenario]

    def ratios(scenario: str) -> list[float | None]:
        return [
            _ratio(capacities[scenario, a], capacities[scenario, b])
            if steady(scenario, a) and steady(scenario, b) else None
            for a, b in pairs
        ]  # fmt: skip

    def row(scenario: str) -> str:
        cells = [_capacity(capacities[scenario, label]) + ("" if steady(scenario, label) else " †") for label in series]
        cells += [_shown(r) for r in ratios(scenario)]
        ceiling, ours = ceilings[scenario], capacities[scenario, OURS]
        cells += [_capacity(ceiling), "-" if not ours else f"{ours / ceiling:.0%}"]
        return f"| {scenario} | " + " | ".join(cells) + " |"

    def geo_mean(column: tuple[float | None, ...]) -> str:
        shown = [r for r in column if r]
        if not shown:
            return "-"
        mean = _shown(statistics.geometric_mean(shown), bold=True)
        return mean if len(shown) == len(column) else f"{mean} ({len(shown)} of {len(column)})"

    by_pair = list(zip(*(ratios(scenario) for scenario in SIX), strict=True))
    geo = [geo_mean(column) for column in by_pair]
    lines = [
        "| scenario | "
        + " | ".join([*series, *(f"{a} / {b}" for a, b in pairs), "work ceiling", f"{OURS} / ceiling"])
        + " |",
        "|---|" + "---:|" * (len(series) + len(pairs) + 2),
        *(row(scenario) for scenario in SIX),
        "| **geo mean (six)** | " + " | ".join([""] * len(series) + geo + ["", ""]) + " |",
        *(row(scenario) for scenario in SHOWN if scenario not in SIX),
    ]
    speculation = (
        f", and with speculation ({spec} drafted tokens a step, each accepted with probability "
        f"{table.spec_acceptance}: an assumption, not a measurement)"
        if spec
        else ""
    )
    heading = (
        f"Capacity in programs/s at 90 % program attainment, {table.num_programs} programs a probe, "
        f"seed 0, without speculation{speculation}. The work ceiling is the rate whose work would fill "
        f"the engine without speculation (`measure/ceiling.py`): no scheduler passes it on a steady load. "
        f"A capacity marked † is above it: the probe's programs end before the load they bring has built "
        f"up, so it is no steady capacity, and the ratios with it are left out (and out of the geo mean). "
        f"{provenance}"
    )
    return "\n".join([heading, "", "```bash", table.command(), "```", "", *lines, "", f"Data: `{table.data_file}`."])


def capacities_of(entries: dict[Job, dict[str, Any]], table: CapacityTable) -> dict[tuple[str, str], float | None]:
    return {(job.scenario, job.label): entry["capacity_rps"] for job, entry in entries.items() if job.table is table}


def provenance() -> str:
    """Date, commit and where it ran, for the line above each table."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = " with uncommitted changes" if _git("status", "--porcelain", "--untracked-files=no") else ""
    today = datetime.date.today().isoformat()
    return (
        f"Regenerated on {today} at commit `{commit}`{dirty} by `make bench` (the simulator is "
        "deterministic: the machine it runs on changes nothing but the time it takes)."
    )


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def replace_block(page: str, marker: str, content: str) -> str:
    """``page`` with what lies between ``<!-- bench:marker -->`` and ``<!-- /bench:marker -->`` replaced."""
    pattern = re.compile(rf"(<!-- bench:{re.escape(marker)} -->\n).*?(<!-- /bench:{re.escape(marker)} -->)", re.S)
    if not pattern.search(page):
        raise ValueError(f"the page has no `<!-- bench:{marker} -->` ... `<!-- /bench:{marker} -->` block")
    return pattern.sub(lambda match: match.group(1) + content.rstrip("\n") + "\n" + match.group(2), page, count=1)


def write_results(
    entries: dict[Job, dict[str, Any]], page: Path, data_dir: Path, tables: Iterable[CapacityTable] = TABLES
) -> list[Path]:
    """Write each table's data file, its block on ``page`` and the plot; returns the files written."""
    written = []
    text = page.read_text()
    line = provenance()
    plots = []
    for table in tables:
        results = [entries[job] for job in jobs([table])]
        payload = {
            "profile": table.profile, "num_requests": table.num_programs, "seed": 0,
            "spec_acceptance": table.spec_acceptance, "generated_by": "make bench", "results": results,
        }  # fmt: skip
        data = data_dir / table.data_file
        data.write_text(json.dumps(payload, indent=2) + "\n")
        capacities = capacities_of(entries, table)
        text = replace_block(text, table.marker, table_markdown(table, capacities, line))
        plot = data_dir / f"sim-{table.marker}-capacity.png"
        title = f"Simulated capacity at 90 % attainment, {table.profile}"
        capacity_bars(plot, title, SHOWN, _series(capacities, table))
        plots.append(plot)
        written += [data, plot]
    images = "\n\n".join(f"![{p.stem}]({Path(os.path.relpath(p, page.parent)).as_posix()})" for p in plots)
    page.write_text(replace_block(text, "plots", images))
    return [page, *written]


def _series(capacities: dict[tuple[str, str], float | None], table: CapacityTable) -> dict[str, list[float]]:
    """Each scheduler's capacities in ``SHOWN`` order (nan where a search found none)."""
    labels = [run_label(name, drafts) for drafts in table.speculative_tokens for name in (OURS, STOCK)]
    return {label: [capacities.get((scenario, label)) or math.nan for scenario in SHOWN] for label in labels}
