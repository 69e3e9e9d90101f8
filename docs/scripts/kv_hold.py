"""The context hold in the simulator: a program's later calls with and without their run's KV held.

Simulates one scenario at one rate under the program-aware planner (``sloserve``, which holds a
run's context between its calls) and the same planner without the hold (``sloserve-nohold``),
and prints for each: program attainment, the share of the later calls' prompt tokens found in
the prefix cache, the later calls' TTFT P50 and P90, and the tokens computed in all. Writes the
figures to ``--out`` (JSON).

    python docs/scripts/kv_hold.py --scenario tool-calling --profile h200-opt13b-measured --rate 3.75 \
        --out docs/data/sim-h200-kv-hold.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from sloserve_runtime.core.step_time import resolve_profile
from sloserve_runtime.measure.summary import summarize
from sloserve_runtime.sim import SimConfig
from sloserve_runtime.sim.loop import Simulation
from sloserve_runtime.workload.scenarios import load_scenario


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="tool-calling")
    parser.add_argument("--profile", default="h200-opt13b-measured")
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--num-requests", type=int, default=300)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config = SimConfig.from_profile(resolve_profile(args.profile, "--profile"))
    trace = load_scenario(args.scenario).trace(args.rate, args.num_requests, seed=0)
    later_prompt = sum(stage.prompt_tokens for program in trace for stage in program.stages[1:])
    rows = []
    for policy in ("sloserve", "sloserve-nohold"):
        simulation = Simulation(trace, policy, config)
        results = simulation.run()
        end = max(t for result in results for t in result.token_times)
        summary = summarize(results, end)
        firsts = {result.program_id: result for result in reversed(results)}  # each program's first call
        later = [r for r in results if r.token_times and firsts[r.program_id] is not r]
        ttfts = [(r.token_times[0] - r.arrival) * 1000 for r in later]
        rows.append({
            "scheduler": policy,
            "program_attainment": summary.program_attainment,
            "later_prompt_cached": simulation.engine.kv.hit_tokens_total / later_prompt,
            "later_ttft_p50_ms": statistics.median(ttfts),
            "later_ttft_p90_ms": float(np.percentile(ttfts, 90)),
            "preemptions": simulation.engine.preemptions,
        })  # fmt: skip
        print(rows[-1])
    payload = {"scenario": args.scenario, "profile": args.profile, "rate": args.rate, "rows": rows}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
