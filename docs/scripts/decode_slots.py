"""How much capacity any scheduler can reach without speculation: an Erlang-B estimate.

Under a step-time model with a large per-request term, a TPOT target caps how many requests can
decode at once (``slots``: the most decodes whose step stays within the TPOT). A request holds a
slot for its whole output, and its TTFT target is far shorter than that, so a request that finds
every slot busy misses. That is Erlang's loss system: with Poisson arrivals, the share that finds
all ``slots`` busy at offered load A is Erlang B(slots, A). Capacity at 90 % attainment is then
about the rate whose offered load gives B = 0.1. It ignores prefill time and treats every step as
full, so it is an estimate, not a bound; it shows where a scenario's ceiling is.

    .venv/bin/python docs/scripts/decode_slots.py [profile] [capacity JSON]
"""

from __future__ import annotations

import json
import sys

import numpy as np

from sloserve_runtime.core.step_time import PROFILES_DIR, StepTimeModel
from sloserve_runtime.workload.scenarios import load_scenario


def erlang_b(slots: int, load: float) -> float:
    blocked = 1.0
    for k in range(1, slots + 1):
        blocked = load * blocked / (k + load * blocked)
    return blocked


def load_at(slots: int, loss: float = 0.1) -> float:
    low, high = 0.0, 10.0 * slots + 10
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if erlang_b(slots, mid) < loss else (low, mid)
    return low


def main() -> None:
    profile = sys.argv[1] if len(sys.argv) > 1 else "a100-opt13b-slos-serve"
    model = StepTimeModel.load(PROFILES_DIR / f"{profile}.json")
    measured = {}
    if len(sys.argv) > 2:
        for row in json.load(open(sys.argv[2]))["results"]:
            measured[(row["scenario"], row["scheduler"])] = row.get("capacity_rps")
    print(f"{'scenario':10s} {'TPOT':>6s} {'slots':>5s} {'step ms':>7s} {'output':>6s} {'estimate/s':>10s}  measured")
    for name in ("chatbot", "coding"):
        trace = load_scenario(name).trace(1.0, 5000, seed=0)
        stage = trace[0].stages[0]
        tpot = stage.slo.tpot_ms / 1000
        output = float(np.mean([program.stages[0].output_tokens for program in trace]))
        slots = max(n for n in range(1, 1000) if model.step_seconds(n, n, 0, 0) <= tpot)
        step = model.step_seconds(slots, slots, 0, 0)
        rate = load_at(slots) / (output * step)
        found = ", ".join(f"{k[1]} {v:.3g}" for k, v in measured.items() if k[0] == name and v)
        print(f"{name:10s} {tpot * 1000:5.0f}ms {slots:5d} {step * 1000:7.1f} {output:6.0f} {rate:10.3f}  {found}")


if __name__ == "__main__":
    main()
