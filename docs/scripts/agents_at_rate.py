"""`examples/agents` driven at a rate on the real CPU engine, under each scheduler in turn.

For each scheduler (default: the program-aware planner ``sloserve``, the stage-level one
``sloserve-stage`` and stock vLLM ``vllm``), starts the embedded engine as ``sloserve run``
does (calibration on, the default model), warms it up, and drives the app's program at
``--rate`` runs per second for ``--duration`` seconds, as ``sloserve run app.py --rate R
--duration S`` does. Reports per scheduler: program attainment, runs met per second, where
runs lost their objective, the tokens computed for runs that missed anyway, and the TTFT of
the tool loop's later turns (P50). Writes every run's records to ``--out`` (JSON).

    python docs/scripts/agents_at_rate.py --rate 1.5 --duration 60 --out docs/data/cpu-agents/agents-rate.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sloserve_runtime.cli.app_loader import load_app, pick_program
from sloserve_runtime.cli.runner import program_inputs, run_program, runs_at_rate
from sloserve_runtime.measure.report import run_outcomes, wasted_tokens
from sloserve_runtime.serving import server

console = Console()


def later_turns_ttft(records) -> float | None:
    """P50 TTFT (ms) of the calls of the app's first stage after each run's first: the loop's later turns."""
    by_run: dict[int, list] = {}
    for record in sorted(records, key=lambda r: r.end):
        by_run.setdefault(record.run_id, []).append(record)
    first_stage = records[0].stage if records else None
    ttfts = [
        r.outcome.ttft_ms for calls in by_run.values() for r in calls[1:]
        if r.stage == first_stage and r.outcome.ttft_ms is not None
    ]  # fmt: skip
    return statistics.median(ttfts) if ttfts else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", default="examples/agents/app.py")
    parser.add_argument("--schedulers", default="sloserve,sloserve-stage,vllm")
    parser.add_argument("--rate", type=float, default=1.5)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    app = load_app(args.app)
    program = pick_program(app, None, args.app)
    inputs = program_inputs(program, [], runs_at_rate(args.rate, args.duration))
    summary, dump = [], {}
    for name in args.schedulers.split(","):
        started = time.monotonic()
        with console.status(f"{name}: starting the engine..."):
            running = server.start(server.ServerOptions(scheduler=name, port=server.free_port()))
        try:
            running.warm_up()
            runs = asyncio.run(
                run_program(app, program, inputs, running.url, None, model=running.served_model, console=console,
                            rate=args.rate)  # fmt: skip
            )
        finally:
            running.stop()
        outcomes = run_outcomes(runs.records, runs.failures)
        wasted, computed = wasted_tokens(outcomes)
        met = sum(outcome.met for outcome in outcomes)
        lost = Counter(outcome.lost_at for outcome in outcomes if not outcome.met)
        row = {
            "scheduler": name, "runs": len(outcomes), "met": met, "program_attainment": met / len(outcomes),
            "met_per_s": met / runs.seconds, "seconds": runs.seconds, "wasted_tokens": wasted,
            "computed_tokens": computed, "later_turns_ttft_p50_ms": later_turns_ttft(runs.records),
            "lost_at": dict(lost.most_common()), "wall_s": time.monotonic() - started,
        }  # fmt: skip
        summary.append(row)
        dump[name] = {"summary": row, "records": [asdict(record) for record in runs.records]}
        console.print(row)
    table = Table(title=f"{args.app} at {args.rate:g} runs/s for {args.duration:g} s (real CPU engine)")
    for column in ("scheduler", "programs met", "met/s", "wasted tokens", "later turns TTFT p50", "first losses"):
        table.add_column(column)
    for row in summary:
        ttft = row["later_turns_ttft_p50_ms"]
        table.add_row(
            row["scheduler"], f"{row['met']}/{row['runs']} ({row['program_attainment']:.0%})",
            f"{row['met_per_s']:.2f}",
            f"{row['wasted_tokens']} of {row['computed_tokens']}", "-" if ttft is None else f"{ttft:.0f} ms",
            ", ".join(f"{where} x{count}" for where, count in list(row["lost_at"].items())[:3]),
        )  # fmt: skip
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"app": args.app, "rate": args.rate, "duration_s": args.duration, "summary": summary, "runs": dump}
    args.out.write_text(json.dumps(payload, default=str) + "\n")
    console.print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
