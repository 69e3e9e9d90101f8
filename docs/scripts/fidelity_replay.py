"""Simulates again the traces of a recorded `sloserve bench --simulate-as` run, with or without step noise.

A bench JSON keeps each endpoint's real figures beside the simulator's. This re-simulates the
same traces (give the bench's trace options again) as the same schedulers, once with steps at
the profile's times and once with the step noise given, and prints real against both, so a
change to the simulator is judged against a real run without running the engine again.

    .venv/bin/python docs/scripts/fidelity_replay.py BENCH.json --scenario reasoning --num-requests 30 \
        --length-scale 0.25 --slo-scale 5 --profile cpu-smollm2-135m-fp32 \
        --step-noise 0.15 --step-noise-correlation 0.79 [--frontend-in-ms 60 --frontend-out-ms 8]

With ``--frontend-in-ms``/``--frontend-out-ms`` (``docs/scripts/frontend_delay.py`` measures
them) a third column adds the front end to the noisy simulation.

With ``--steps STEPS.jsonl`` (the server's ``--step-log`` of the same run, and a bench JSON
written with ``--save-detailed``, whose calls say when each probe ran) a last column runs the
simulated engine at each probe's own step times: the line that online calibration would fit
through that probe's steps (``observed = scale * profile + offset``), with the noise and front
end given. The scheduler still plans with the profile and calibrates, and TTFT slowdowns still
resolve with it, as on the server. That column tells the simulator's own error from the
profile's error on the run's steps (the machine's drift, steps the profile's grid did not
cover): steps a few percent off the profile move attainment near capacity by tens of points.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from records import read_text

from sloserve_runtime.core.calibration import StepTimeCalibration
from sloserve_runtime.core.step_time import StepTimeModel, resolve_profile
from sloserve_runtime.measure.fidelity import FIDELITY_METRICS, fidelity_figures
from sloserve_runtime.measure.runs import TraceOptions, simulator_runner
from sloserve_runtime.measure.summary import summarize
from sloserve_runtime.sim import SimConfig
from sloserve_runtime.workload.scenarios import load_scenario


def shown(metric: str, value: float) -> str:
    return f"{value:.1%}" if metric == "attainment" else f"{value:,.0f}"


def cell(metric: str, real: float | None, simulated: float | None) -> str:
    if real is None or simulated is None:
        return "-"
    error = abs(simulated - real) / real if real else float("nan")
    return f"{shown(metric, simulated)} ({error:.0%})"


def probe_windows(recorded: dict) -> dict[tuple[str, float], tuple[float, float]]:
    """(endpoint, rate) to when that probe ran, wall clock: its first send to its last token."""
    windows = {}
    for result in recorded["results"]:
        for probe in result.get("probes", []):
            calls = probe.get("calls")
            if not calls:
                raise SystemExit("--steps needs a bench JSON written with --save-detailed (its probes' calls)")
            last = max(max(call["token_times"], default=call["arrival"]) for call in calls)
            windows[(result["scheduler"], probe["rate"])] = (min(call["arrival"] for call in calls), last)
    return windows


def step_line(records: list[dict], window: tuple[float, float], profile: StepTimeModel) -> tuple[float, float, int]:
    """(scale, offset, steps): online calibration's line through the busy steps that ran in ``window``.

    A step's time is its record's ``emitted_at``, or the last one before it (a chunk emits nothing).
    """
    start, end = window
    steps, at = [], None
    for record in records:
        at = record.get("emitted_at", at)
        if at is not None and start <= at <= end and "cycle_seconds" in record:
            steps.append(record)
    if not steps:
        raise SystemExit(f"no busy step of the step log ran between {start:.0f} and {end:.0f}: another run's log?")
    calibration = StepTimeCalibration(profile, window=len(steps), refit_every=len(steps), min_steps=1)
    for step in steps:
        calibration.observe(
            step["tokens"], step["requests"], step["context_tokens"], step["attended"], step["cycle_seconds"]
        )
    return calibration.scale, calibration.offset, len(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_json", type=Path)
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--num-requests", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slo-scale", type=float, default=1.0)
    parser.add_argument("--length-scale", type=float, default=1.0)
    parser.add_argument("--max-model-len", type=int, default=2048, help="the served model's, as the bench read it")
    parser.add_argument("--profile", required=True)
    parser.add_argument("--step-noise", type=float, required=True)
    parser.add_argument("--step-noise-correlation", type=float, required=True)
    parser.add_argument("--frontend-in-ms", type=float, default=0.0, help="a third column: noise and this front end")
    parser.add_argument("--frontend-out-ms", type=float, default=0.0)
    parser.add_argument("--steps", type=Path, help="the run's step log: a last column at each probe's own step times")
    args = parser.parse_args()
    recorded = json.loads(read_text(args.bench_json))
    spec = load_scenario(args.scenario)
    options = TraceOptions(args.num_requests, args.seed, args.slo_scale, args.length_scale, args.max_model_len)
    exact = SimConfig.from_profile(resolve_profile(args.profile))
    noisy = dataclasses.replace(
        exact, step_noise=args.step_noise, step_noise_correlation=args.step_noise_correlation, calibrate=True
    )
    print(f"{args.bench_json}: simulated (relative error), exact steps / steps with noise "
          f"{args.step_noise} correlated {args.step_noise_correlation}")  # fmt: skip
    configs = {"exact": exact, "with noise": noisy}
    if args.frontend_in_ms or args.frontend_out_ms:
        configs[f"with noise, front end {args.frontend_in_ms:g} / {args.frontend_out_ms:g} ms"] = dataclasses.replace(
            noisy, frontend_in_seconds=args.frontend_in_ms / 1000, frontend_out_seconds=args.frontend_out_ms / 1000
        )
    last = list(configs.values())[-1]
    columns = [*configs, "at the probe's own steps (scale, offset ms)"] if args.steps else list(configs)
    windows = probe_windows(recorded) if args.steps else {}
    records = [json.loads(line) for line in read_text(args.steps).splitlines()] if args.steps else []
    print("| simulated as | rate | figure | real | " + " | ".join(columns) + " |")
    print("|---|---:|---|---:|" + "---:|" * len(columns))
    for entry in recorded["fidelity"]:
        policy = entry["simulated_as"]
        for row in entry["rates"]:
            trace = options.trace(spec, row["rate"])
            runs = list(configs.values())
            if args.steps:
                scale, offset, _ = step_line(records, windows[(entry["endpoint"], row["rate"])], exact.step_time)
                at_steps = dataclasses.replace(
                    last, step_time=exact.step_time.calibrated(scale, offset), planner_step_time=exact.step_time
                )
                runs.append(at_steps)
            figures = [fidelity_figures(summarize(*simulator_runner(policy, c)(trace))) for c in runs]
            for metric in FIDELITY_METRICS:
                real = row["real"][metric]
                measured = "-" if real is None else shown(metric, real)
                cells = " | ".join(cell(metric, real, simulated[metric]) for simulated in figures)
                if args.steps and metric == FIDELITY_METRICS[0]:
                    cells += f" [{scale:.3f}, {offset * 1000:+.1f}]"
                print(f"| {policy} | {row['rate']} | {metric} | {measured} | {cells} |")


if __name__ == "__main__":
    main()
