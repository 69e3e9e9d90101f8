"""Simulator fidelity: the very traces an endpoint served, simulated, and each figure's relative error."""

from __future__ import annotations

from sloserve_runtime.measure.runs import Measurement, TraceOptions, simulator_runner
from sloserve_runtime.measure.summary import Summary, summarize
from sloserve_runtime.sim import SimConfig
from sloserve_runtime.workload.scenarios import Scenario

FIDELITY_METRICS = ("ttft_p50_ms", "ttft_p90_ms", "tpot_p90_ms", "attainment")


def fidelity_figures(summary: Summary) -> dict[str, float | None]:
    return {
        "ttft_p50_ms": summary.ttft_ms.p50,
        "ttft_p90_ms": summary.ttft_ms.p90,
        "tpot_p90_ms": summary.tpot_ms.p90,
        "attainment": summary.program_attainment,
    }


def fidelity(real: Measurement, policy: str, config: SimConfig, spec: Scenario, options: TraceOptions) -> dict:
    """Simulate the very traces the endpoint served; relative error of each figure, per rate."""
    runner = simulator_runner(policy, config)
    rows = []
    for rate, summary in real.probes:
        simulated = summarize(*runner(options.trace(spec, rate)))
        measured, predicted = fidelity_figures(summary), fidelity_figures(simulated)
        errors = {
            key: abs(predicted[key] - measured[key]) / measured[key] if measured[key] and predicted[key] is not None
            else None
            for key in FIDELITY_METRICS
        }  # fmt: skip
        rows.append({"rate": rate, "real": measured, "simulated": predicted, "relative_error": errors})
    return {"endpoint": real.label, "simulated_as": policy, "rates": rows, **engine_strays(config)}


def engine_strays(config: SimConfig) -> dict:
    """How the simulated engine strays from the profile, for the JSON: its step noise and front end."""
    frontend_ms = [round(1000.0 * config.frontend_in_seconds, 3), round(1000.0 * config.frontend_out_seconds, 3)]
    return {
        "step_noise": [config.step_noise, config.step_noise_correlation] if config.step_noise else None,
        "frontend_ms": frontend_ms if any(frontend_ms) else None,
    }
