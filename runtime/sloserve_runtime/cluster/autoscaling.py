"""Autoscaling the engine replicas on SLO attainment: a Ray Serve custom autoscaling policy.

Each replica reports, with ``record_autoscaling_stats``, the share of its recent requests that met
their SLO and its requests in flight. Ray Serve calls ``slo_attainment_policy`` every control
period with those metrics (averaged over its look-back window) and keeps the number it returns
within ``--min-replicas`` / ``--max-replicas``:

* one more replica while any replica's attainment is under the target (its engine cannot keep
  what it admits), so a burst that misses objectives brings capacity;
* one fewer when every replica meets the target and the requests in flight would fit the
  remaining replicas at ``SCALE_DOWN_IN_FLIGHT`` each or fewer;
* otherwise as many as now. Ray Serve's ``upscale_delay_s`` / ``downscale_delay_s`` are not
  applied to a custom policy, so the policy keeps its own: a change needs the same wish for
  ``CONSECUTIVE`` periods in a row (its state is Serve's ``policy_state``).
"""

from __future__ import annotations

from typing import Any

ATTAINMENT_TARGET = 0.9
SCALE_DOWN_IN_FLIGHT = 2.0  # requests in flight per remaining replica that still allow scaling down
CONSECUTIVE = 3  # periods in a row that must want the same change


def decide(current: int, attainment: list[float], in_flight: list[float], low: int, high: int) -> int:
    """The replica count the metrics ask for (one step at a time), within [low, high]."""
    wanted = current
    if attainment and min(attainment) < ATTAINMENT_TARGET:
        wanted = current + 1
    elif current > 1 and sum(in_flight) <= SCALE_DOWN_IN_FLIGHT * (current - 1):
        wanted = current - 1
    return max(low, min(high, wanted))


def slo_attainment_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    """Ray Serve's policy hook (``AutoscalingPolicy(policy_function=...)``): ``ctx`` is its
    ``AutoscalingContext``."""
    metrics = ctx.aggregated_metrics or {}
    attainment = list(metrics.get("slo_attainment", {}).values())
    in_flight = list(metrics.get("in_flight", {}).values())
    current = ctx.current_num_replicas
    wanted = decide(
        current, attainment, in_flight, ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    )
    state = dict(ctx.policy_state or {})
    streak = state.get("streak", 0) + 1 if state.get("wanted") == wanted else 1
    state.update(wanted=wanted, streak=streak)
    if wanted != current and streak < CONSECUTIVE:
        return current, state
    return wanted, state
