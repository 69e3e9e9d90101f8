"""`examples/agents` driven at a rate on the real CPU engine, under each scheduler in turn.

For each scheduler (default: the program-aware planner ``sloserve``, the stage-level one
``sloserve-stage`` and stock vLLM ``vllm``), starts the embedded engine as ``sloserve run``
does (calibration on, the default model), warms it up, and drives the app's program at
``--rate`` runs per second for ``--duration`` seconds, as ``sloserve run app.py --rate R
--duration S`` does. Reports per scheduler: program attainment, runs met per second, where
runs lost their objective, the tokens computed for runs that missed anyway, and the TTFT of
the tool loop's later turns (P50), and the share of prompt tokens vLLM's prefix cache held.
Writes every run's records to ``--out`` (JSON).

``--kv-blocks N --block-size B`` give the engine a KV cache of N blocks of B tokens (vLLM's
``--num-gpu-blocks-override`` and ``--block-size``; the CPU build's blocks are 128 tokens, more
than this app's prompts, and vLLM caches whole blocks only), so that runs in flight contend for
it as they would on a GPU serving long contexts: with ``--schedulers sloserve,sloserve-nohold``
that shows what holding a run's context between its calls does. ``--tool-seconds S`` makes
each tool call take S seconds more (as a web search would), so a run's context waits that long
between its turns.

    python docs/scripts/agents_at_rate.py --rate 1.5 --duration 60 --out docs/data/cpu-agents/agents-rate.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
import json
import statistics
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sloserve.tools import Tool
from sloserve_runtime.cli.app_loader import load_app, pick_program
from sloserve_runtime.cli.runner import program_inputs, run_program, runs_at_rate
from sloserve_runtime.measure.report import run_outcomes, wasted_tokens
from sloserve_runtime.measure.server_stats import PREFIX_HITS, PREFIX_QUERIES, scrape
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


def engine_options(scheduler: str, kv_blocks: int | None, block_size: int) -> server.ServerOptions:
    """The embedded engine as ``sloserve run`` starts it; with ``kv_blocks``, its KV cache that
    many blocks of ``block_size`` tokens (and no request longer than it holds, or vLLM would
    refuse to start)."""
    options = server.ServerOptions(scheduler=scheduler, port=server.free_port())
    if kv_blocks is None:
        return options
    # vLLM keeps one block aside (its null block): a request may use the others.
    max_model_len = min(options.max_model_len, (kv_blocks - 1) * block_size)
    extra = ["--num-gpu-blocks-override", str(kv_blocks), "--block-size", str(block_size)]
    return dataclasses.replace(options, max_model_len=max_model_len, extra_args=extra)


def slowed(tool: Tool, seconds: float) -> Tool:
    """``tool``, taking ``seconds`` longer on every call (without holding the event loop)."""

    async def fn(**arguments):
        await asyncio.sleep(seconds)
        result = tool.fn(**arguments)
        return await result if inspect.isawaitable(result) else result  # an app's tool may be async

    return dataclasses.replace(tool, fn=fn)


def hit_rate(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Of the prompt tokens vLLM looked up in its prefix cache between two scrapes, the share it found."""
    queries = after.get(PREFIX_QUERIES, 0.0) - before.get(PREFIX_QUERIES, 0.0)
    hits = after.get(PREFIX_HITS, 0.0) - before.get(PREFIX_HITS, 0.0)
    return hits / queries if queries > 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", default="examples/agents/app.py")
    parser.add_argument("--schedulers", default="sloserve,sloserve-stage,vllm")
    parser.add_argument("--rate", type=float, default=1.5)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--kv-blocks", type=int, default=None, help="KV cache blocks (default: vLLM's sizing)")
    parser.add_argument("--block-size", type=int, default=32, help="tokens per KV block, with --kv-blocks")
    parser.add_argument("--tool-seconds", type=float, default=0.0, help="added to each tool call's time")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    app = load_app(args.app)
    if args.tool_seconds > 0:
        app.tools = {name: slowed(tool, args.tool_seconds) for name, tool in app.tools.items()}
    program = pick_program(app, None, args.app)
    inputs = program_inputs(program, [], runs_at_rate(args.rate, args.duration))
    summary, dump = [], {}
    for name in args.schedulers.split(","):
        started = time.monotonic()
        with console.status(f"{name}: starting the engine..."):
            running = server.start(engine_options(name, args.kv_blocks, args.block_size))
        try:
            running.warm_up()
            before = scrape(running.url)
            runs = asyncio.run(
                run_program(
                    app, program, inputs, running.url, None, model=running.served_model, console=console, rate=args.rate
                )  # fmt: skip
            )
            after = scrape(running.url)
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
            "prefix_cache_hit_rate": hit_rate(before, after), "kv_blocks": args.kv_blocks,
            "block_size": args.block_size if args.kv_blocks else None, "tool_seconds": args.tool_seconds,
        }  # fmt: skip
        summary.append(row)
        dump[name] = {"summary": row, "records": [asdict(record) for record in runs.records]}
        console.print(row)
    table = Table(title=f"{args.app} at {args.rate:g} runs/s for {args.duration:g} s (real CPU engine)")
    columns = ("scheduler", "programs met", "met/s", "wasted tokens", "later turns TTFT p50", "prefix hits")
    for column in (*columns, "first losses"):
        table.add_column(column)
    for row in summary:
        ttft = row["later_turns_ttft_p50_ms"]
        table.add_row(
            row["scheduler"], f"{row['met']}/{row['runs']} ({row['program_attainment']:.0%})",
            f"{row['met_per_s']:.2f}",
            f"{row['wasted_tokens']} of {row['computed_tokens']}", "-" if ttft is None else f"{ttft:.0f} ms",
            "-" if row["prefix_cache_hit_rate"] is None else f"{row['prefix_cache_hit_rate']:.0%}",
            ", ".join(f"{where} x{count}" for where, count in list(row["lost_at"].items())[:3]),
        )  # fmt: skip
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"app": args.app, "rate": args.rate, "duration_s": args.duration, "summary": summary, "runs": dump}
    args.out.write_text(json.dumps(payload, default=str) + "\n")
    console.print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
