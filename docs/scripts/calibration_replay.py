"""Replays a step log through online calibration: how well the model the scheduler plans with predicts each step.

Every step is predicted as the scheduler would have planned it, by the model as calibrated to
the steps before it, and then observed, as ``sloserve serve`` does. Three models: the shipped
profile, the calibration's line alone (``StepTimeCalibration.fitted``) and the line with its short
memory of the latest steps (``StepTimeCalibration.model``, what the scheduler plans with). Prints,
per kind of step (grouped as ``step_errors.py`` groups them), the median of measured / predicted,
and over all steps the median error of one step and the percentiles of measured / predicted over
10 steps in a row: a decode in all of them gets one attainment window's tokens from them. Last,
the spread and step-to-step correlation of the line's error in log terms: what ``sloserve
simulate --step-noise S --step-noise-correlation C`` gives the simulated engine's steps, and the
window margin the calibration handed the planner (``StepTimeCalibration.window_margin``).

    .venv/bin/python docs/scripts/calibration_replay.py STEPS.jsonl [profile]
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from records import read_text
from step_errors import BANDS, context_band

from sloserve_runtime.core.calibration import StepTimeCalibration
from sloserve_runtime.core.step_time import StepTimeModel, engine_profile, resolve_profile

FEATURES = ("tokens", "requests", "context_tokens", "attended")
MODELS = ("profile", "line", "line + short memory")
WINDOW = 10  # tokens per attainment window


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[round(q * 100) - 1]


def main(steps: Path, profile_path: Path) -> None:
    profile = StepTimeModel.load(profile_path)
    calibration = StepTimeCalibration(profile)
    groups: dict[tuple[str, int, int], list[tuple[float, ...]]] = defaultdict(list)
    rows: list[tuple[float, ...]] = []  # (measured, predicted by each model)
    margins: list[float] = []  # the window margin after each step
    for line in read_text(steps).splitlines():
        step = json.loads(line)
        if "cycle_seconds" not in step:  # the first step after idle: no whole cycle to calibrate with
            continue
        features = tuple(int(step[name]) for name in FEATURES)
        measured = step["cycle_seconds"]
        models = (profile, calibration.fitted, calibration.model)
        row = (measured, *(model.step_seconds(*features) for model in models))
        calibration.observe(*features, measured)
        margins.append(calibration.window_margin)
        tokens, requests = features[0], features[1]
        kind = "prefill" if tokens > requests else "decode"
        groups[(kind, min(requests, 8), context_band(features[2] // max(requests, 1)))].append(row)
        rows.append(row)
    print(f"{steps} against {profile.name}, calibrated online ({calibration.steps} steps)")
    print("| step | requests | context per request | steps | measured ms | " + " | ".join(MODELS) + " |")
    print("|---|---:|---|---:|---:|" + "---:|" * len(MODELS))
    for (kind, requests, band), group in sorted(groups.items()):
        measured = statistics.median(row[0] for row in group) * 1000
        ratios = [statistics.median(row[0] / row[i] for row in group) for i in range(1, len(MODELS) + 1)]
        label = f"{requests}+" if requests == 8 else str(requests)
        print(f"| {kind} | {label} | {BANDS[band]} | {len(group)} | {measured:.0f} | "
              + " | ".join(f"{ratio:.2f}" for ratio in ratios) + " |")  # fmt: skip
    print()
    print(f"| model | median error of a step | measured / predicted over {WINDOW} steps: median | P90 | P99 |")
    print("|---|---:|---:|---:|---:|")
    for index, name in enumerate(MODELS, start=1):
        error = statistics.median(abs(row[0] - row[index]) / row[0] for row in rows)
        windows = []
        for start in range(len(rows) - WINDOW + 1):
            stretch = rows[start : start + WINDOW]
            windows.append(sum(row[0] for row in stretch) / sum(row[index] for row in stretch))
        print(f"| {name} | {error:.1%} | {statistics.median(windows):.3f} | "
              f"{quantile(windows, 0.9):.3f} | {quantile(windows, 0.99):.3f} |")  # fmt: skip
    # The line's error once it has a fit (its first min_steps steps are the profile's).
    errors = [math.log(row[0] / row[2]) for row in rows[calibration.min_steps :]]
    spread = statistics.pstdev(errors)
    correlation = statistics.correlation(errors[:-1], errors[1:])
    print(f"\nthe line's error in log terms: --step-noise {spread:.2f} --step-noise-correlation {correlation:.2f}")
    print(f"the window margin the planner kept back, over the steps: P10 {quantile(margins, 0.1):.1%}, "
          f"P50 {quantile(margins, 0.5):.1%}, P90 {quantile(margins, 0.9):.1%}")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(Path(sys.argv[1]), resolve_profile(sys.argv[2]) if len(sys.argv) == 3 else engine_profile())
