#!/usr/bin/env bash
# The simulator's program figures of the results page ("Programs: whole runs kept"): for each
# profile and program scenario, the capacity (rate at 90 % program attainment) of the
# program-aware planner, the stage-level one, the program-aware one without the context hold, the
# program-aware one without a prompt's own step, the program-aware one whose best effort takes
# the leftover while runs are turned away, and stock vLLM; then all six at 1.5x the stage-level
# planner's capacity (program attainment and wasted work past capacity). Deterministic (seed 0);
# about 40 minutes on 2 cores.
#
#   bash docs/scripts/program_figures.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
SIM=".venv/bin/sloserve simulate"
SCHEDULERS="sloserve,sloserve-stage,sloserve-nohold,sloserve-nosolo,sloserve-nocalm,vllm"
for profile in h200-opt13b-measured a100-opt13b-slos-serve; do
  short=${profile%%-*}
  for scenario in tool-calling agentic reasoning; do
    out="docs/data/sim-${short}-programs-${scenario}"
    $SIM --scenario "$scenario" --profile "$profile" --scheduler "$SCHEDULERS" --capacity \
      --num-requests 300 --json "${out}-capacity.json" > /dev/null
    rate=$(.venv/bin/python -c "
import json, sys
entries = json.load(open(sys.argv[1]))['results']
print(round(1.5 * next(e['capacity_rps'] for e in entries if e['scheduler'] == 'sloserve-stage'), 4))" "${out}-capacity.json")
    $SIM --scenario "$scenario" --profile "$profile" --scheduler "$SCHEDULERS" --rate "$rate" \
      --num-requests 300 --json "${out}-overload.json" > /dev/null
    echo "$profile $scenario: 1.5x the stage-level capacity = $rate/s"
  done
done
