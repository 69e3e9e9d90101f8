"""The window margin, on and off: `sloserve` in the simulator, calibrating to noisy steps, over seeds.

The margin (``StepTimeCalibration.window_margin``) only moves when the steps stray from the model,
so this runs the simulated engine with step noise and the scheduler calibrating to it, as
``sloserve serve`` does, once as shipped and once with the margin held at 0, on the same traces,
and prints the mean program attainment over the seeds with each seed's figure.

    .venv/bin/python docs/scripts/window_margin_ab.py --scenario reasoning --profile cpu-smollm2-135m-fp32 \
        --step-noise 0.15 --step-noise-correlation 0.79 --rates 0.0266,0.04 --num-requests 30 \
        --seeds 0-7 --slo-scale 5 --length-scale 0.25
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from unittest import mock

from sloserve_runtime.core.calibration import StepTimeCalibration
from sloserve_runtime.core.step_time import resolve_profile
from sloserve_runtime.measure.runs import TraceOptions, simulator_runner
from sloserve_runtime.measure.summary import summarize
from sloserve_runtime.sim import SimConfig
from sloserve_runtime.workload.scenarios import load_scenario


def attainments(config: SimConfig, args: argparse.Namespace, rate: float, seeds: range) -> list[float]:
    spec = load_scenario(args.scenario)
    figures = []
    for seed in seeds:
        options = TraceOptions(args.num_requests, seed, args.slo_scale, args.length_scale, args.max_model_len)
        results, duration = simulator_runner("sloserve", config)(options.trace(spec, rate))
        figures.append(summarize(results, duration).program_attainment)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--profile", required=True)
    parser.add_argument("--step-noise", type=float, required=True)
    parser.add_argument("--step-noise-correlation", type=float, required=True)
    parser.add_argument("--rates", required=True, help="comma-separated programs per second")
    parser.add_argument("--num-requests", type=int, required=True)
    parser.add_argument("--seeds", default="0-3", help="FIRST-LAST, both included")
    parser.add_argument("--slo-scale", type=float, default=1.0)
    parser.add_argument("--length-scale", type=float, default=1.0)
    parser.add_argument("--max-model-len", type=int, default=2048)
    args = parser.parse_args()
    first, last = (int(part) for part in args.seeds.split("-"))
    seeds = range(first, last + 1)
    config = dataclasses.replace(
        SimConfig.from_profile(resolve_profile(args.profile)),
        step_noise=args.step_noise, step_noise_correlation=args.step_noise_correlation, calibrate=True,
    )  # fmt: skip
    print(f"{args.scenario} on {config.step_time.name}, noise {args.step_noise} correlated "
          f"{args.step_noise_correlation}, {args.num_requests} programs, seeds {args.seeds}")  # fmt: skip
    print("| rate | with the margin | margin held at 0 |")
    print("|---:|---:|---:|")
    for rate in (float(part) for part in args.rates.split(",")):
        shipped = attainments(config, args, rate, seeds)
        with mock.patch.object(StepTimeCalibration, "_margin", lambda self: 0.0):
            without = attainments(config, args, rate, seeds)
        cells = [f"{statistics.fmean(f):.1%} ({', '.join(f'{x:.0%}' for x in f)})" for f in (shipped, without)]
        print(f"| {rate:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
