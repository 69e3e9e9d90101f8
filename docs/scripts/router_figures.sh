#!/usr/bin/env bash
# The simulator's router figures of the results page ("Routers: Ray Serve's baselines"): for the
# burst and tool-calling scenarios on the H200 profile, the capacity per replica (rate at 90 %
# program attainment, over K) of our `slo` router against Ray Serve's default router
# (`power-of-two`), Ray Serve LLM's `prefix-affinity`, `round-robin` and `least-loaded`, at K = 4
# and 8 replicas (and one replica, without a router, for reference). Every router at one K gets
# the same trace (seed 0, 300 programs per replica per probe); every replica runs `sloserve`.
# Deterministic; one process, about 20 minutes on a 2-core machine.
#
#   bash docs/scripts/router_figures.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
SIM=".venv/bin/sloserve simulate"
ROUTERS="slo,power-of-two,prefix-affinity,round-robin,least-loaded"
for run in burst:sloserve tool-calling:sloserve; do
  scenario=${run%%:*} scheduler=${run##*:}
  start=$(date +%s)
  $SIM --scenario "$scenario" --profile h200-opt13b-measured --scheduler "$scheduler" \
    --replicas 1,4,8 --router "$ROUTERS" --capacity --num-requests 300 \
    --json "docs/data/sim-h200-routers-${scenario}.json" > /dev/null
  echo "$scenario ($scheduler): $(( $(date +%s) - start )) s"
done
