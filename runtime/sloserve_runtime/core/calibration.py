"""Online calibration: the step-time model, corrected by the steps the engine actually takes.

A profile is measured once, on one machine, under one load; the engine that serves drifts from it
(another machine, a busier front end, a warmer cache). A planner whose model says steps take half again
as long as they do cuts prompts into needlessly small chunks and refuses requests it could serve;
one whose model is too fast makes promises it breaks. So the engine reports each step it runs
(features and the seconds its whole cycle took) and the model is refitted, every ``refit_every``
steps, as ``observed = scale * predicted + offset`` over the last ``window`` steps.

Because the model is a max of linear pieces, the corrected model is again one (every piece scaled
and shifted alike): ``StepTimeModel.calibrated``. The fit is a least-squares line; steps of about
one size (``min_spread``) fix the offset alone and leave the scale at 1. The scale is clamped to
``[min_scale, max_scale]``, and a step never comes out cheaper than ``min_fraction`` of the
profile's. Steps far off the line (a pause of the whole process) are left out of the fit: the
line is fitted twice, the second time without them.

The line over a window of 256 steps follows how the machine differs from the profile; it is too
slow for how the engine's steps drift from one to the next. Measured on the real CPU engine, the
error of the line's prediction for a step is strongly correlated with the error of the step before
(0.5–0.8, and still 0.3–0.5 ten steps on: the steps of a crowded long-context batch run slow
together, whatever their features say), so the mean of 10 tokens' gaps, which attainment judges,
errs almost as much as one step. So every step also updates a short memory of how far the line was
off, in log terms: a moving average that weighs the latest step ``recent_weight``. The model the
policy plans the next step with is the line's times that correction (``model``); on the CPU
engine's step logs it halves the error of a step's prediction (``docs/scripts/calibration_replay.py``).

What the short memory leaves is still error, and attainment judges it ten steps at a time: a
planner that spends a window's slack to the edge loses the window whenever ten steps in a row run
a little slower than planned. So the calibration also keeps, over the last ``window`` stretches of
ten steps, how much slower than ``model`` planned each stretch ran, and at every refit states the
``margin_quantile`` of that as ``window_margin`` (at most ``max_margin``): the planner plans windows
that much short. On a simulated engine whose steps take the profile's time it stays 0.
Imports no vLLM.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from sloserve.slo import ATTAINMENT_WINDOW
from sloserve_runtime.core.step_time import StepTimeModel


@dataclass
class StepTimeCalibration:
    """Fits a profile to the step times one engine observes; ``model`` is the corrected profile."""

    profile: StepTimeModel
    window: int = 256  # the most recent steps the fit weighs
    refit_every: int = 32  # steps between fits
    min_steps: int = 32  # steps seen before the first fit
    min_spread: float = 0.1  # predictions that vary less than this (std over mean) keep the scale at 1
    min_scale: float = 0.5
    max_scale: float = 2.0
    min_fraction: float = 0.25  # no corrected step is cheaper than this share of the profile's
    outlier_ratio: float = 4.0  # steps off the profile by more than this factor are never weighed
    outlier_mads: float = 6.0  # nor steps this many median absolute residuals off the first fit
    # The latest step's weight in the short memory of the line's error (0: no short memory), and
    # the most one step may move it, in log terms (a step 35 % off counts as that, not more).
    recent_weight: float = 0.3
    recent_limit: float = 0.3
    # The share of 10-step stretches the window margin covers, and the most it may be.
    margin_quantile: float = 0.95
    max_margin: float = 0.1
    scale: float = 1.0
    offset: float = 0.0
    recent: float = 0.0  # the short memory: how far, in log terms, the line has lately been off
    steps: int = 0  # steps observed in all
    fitted: StepTimeModel = field(init=False)  # the profile as the line last fitted it
    model: StepTimeModel = field(init=False)  # what the next step is planned with: the line, corrected by ``recent``
    samples: deque[tuple[float, float]] = field(init=False, repr=False)  # (predicted, observed) seconds
    # How much slower than planned 10 steps in a row lately ran (``margin_quantile`` of the stretches):
    # the share the planner keeps back from each attainment window.
    window_margin: float = 0.0
    planned: deque[tuple[float, float]] = field(init=False, repr=False)  # the last steps: (model's, observed)
    stretches: deque[float] = field(init=False, repr=False)  # observed / planned over each 10 steps in a row

    def __post_init__(self) -> None:
        self.samples = deque(maxlen=self.window)
        self.planned = deque(maxlen=ATTAINMENT_WINDOW)
        self.stretches = deque(maxlen=self.window)
        self.fitted = self.model = self.profile
        self._model_line = (1.0, 0.0)  # ``model`` as scale and offset of the profile's prediction

    def observe(self, tokens: int, requests: int, context_tokens: int, attended: int, seconds: float) -> bool:
        """One step with these features took ``seconds``; True when ``model`` changed just now."""
        predicted = self.profile.step_seconds(tokens, requests, context_tokens, attended)
        self.steps += 1
        # Far off the profile: a pause of the whole process, not a step; neither memory weighs it.
        in_line = predicted > 0 and 1 / self.outlier_ratio <= seconds / predicted <= self.outlier_ratio
        if in_line:
            self.samples.append((predicted, seconds))
            model_scale, model_offset = self._model_line
            self.planned.append((model_scale * predicted + model_offset, seconds))
            if len(self.planned) == ATTAINMENT_WINDOW:
                self.stretches.append(sum(y for _, y in self.planned) / sum(x for x, _ in self.planned))
        refit = not self.steps % self.refit_every and len(self.samples) >= self.min_steps
        if refit:
            self.scale, self.offset = self._fit()
            self.fitted = self.profile.calibrated(self.scale, self.offset)
            self.window_margin = self._margin()
        remember = in_line and self.recent_weight > 0
        if remember:
            # ``fitted`` maps every profile prediction to this line (``StepTimeModel.calibrated``).
            off = math.log(seconds / (self.scale * predicted + self.offset))
            off = min(self.recent_limit, max(-self.recent_limit, off))
            self.recent += self.recent_weight * (off - self.recent)
        if not (refit or remember):
            return False
        # The correction multiplies every piece, offset included (again a max of linear pieces),
        # and the cheapest step keeps its floor.
        scale = self.scale * math.exp(self.recent)
        offset = max(self.offset * math.exp(self.recent), self._floor_offset(scale))
        self.model = self.profile.calibrated(scale, offset)
        self._model_line = (scale, offset)
        return True

    def _margin(self) -> float:
        """The ``margin_quantile`` of how much slower than planned the recent 10-step stretches ran."""
        if len(self.stretches) < self.min_steps:
            return 0.0
        ranked = sorted(self.stretches)
        slowest = ranked[min(len(ranked) - 1, int(self.margin_quantile * len(ranked)))]
        return min(self.max_margin, max(0.0, slowest - 1.0))

    def _fit(self) -> tuple[float, float]:
        """The least-squares line through the samples, refitted without the steps far off it (more than
        ``outlier_mads`` median absolute residuals); the offset keeps the floor of ``min_fraction``.
        """
        samples = list(self.samples)
        scale, offset = self._line(samples)
        residuals = [abs(y - scale * x - offset) for x, y in samples]
        spread = statistics.median(residuals)
        limit = max(self.outlier_mads * spread, 1e-3 * statistics.fmean(y for _, y in samples))
        kept = [sample for sample, residual in zip(samples, residuals, strict=True) if residual <= limit]
        if len(kept) >= self.min_steps // 2:
            scale, offset = self._line(kept)
        return scale, max(offset, self._floor_offset(scale))

    def _floor_offset(self, scale: float) -> float:
        """The least offset at ``scale`` that leaves the cheapest step the profile knows (one token,
        no context) its floor share of the profile's cost."""
        return (self.min_fraction - scale) * self.profile.step_seconds(1, 1)

    def _line(self, samples: list[tuple[float, float]]) -> tuple[float, float]:
        n = len(samples)
        mean_x = sum(x for x, _ in samples) / n
        mean_y = sum(y for _, y in samples) / n
        sxx = sum((x - mean_x) ** 2 for x, _ in samples)
        sxy = sum((x - mean_x) * (y - mean_y) for x, y in samples)
        # Steps of about one size say nothing of the scale: they fix the offset alone.
        scale = sxy / sxx if sxx > (self.min_spread * mean_x) ** 2 * n else 1.0
        scale = min(self.max_scale, max(self.min_scale, scale))
        return scale, mean_y - scale * mean_x
