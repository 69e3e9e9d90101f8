"""Online calibration: the step-time model, corrected by the steps the engine actually takes.

A profile is measured once, on one machine, under one load; the engine that serves drifts from it
(another machine, a busier front end, a warmer cache). A planner whose model says steps take 48 ms
when they take 32 ms cuts prompts into needlessly small chunks and refuses requests it could serve;
one whose model is too fast makes promises it breaks. So the engine reports each step it runs
(features and the seconds its whole cycle took) and the model is refitted, every ``refit_every``
steps, as ``observed = scale * predicted + offset`` over the last ``window`` steps.

Because the model is a max of linear pieces, the corrected model is again one (every piece scaled
and shifted alike): ``StepTimeModel.calibrated``. The fit is a least-squares line pulled gently
towards no correction (``prior_weight``), so steps of one size fix the offset and leave the scale
at 1; the scale is clamped to ``[min_scale, max_scale]`` and a step never comes out cheaper than
``min_fraction`` of the profile's. Steps far off the line (a pause of the whole process) are left
out of the fit. Imports no vLLM.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from sloserve_runtime.step_time import StepTimeModel


@dataclass
class StepTimeCalibration:
    """Fits a profile to the step times one engine observes; ``model`` is the corrected profile."""

    profile: StepTimeModel
    window: int = 256  # the most recent steps the fit weighs
    refit_every: int = 32  # steps between fits
    min_steps: int = 32  # steps seen before the first fit
    prior_weight: float = 0.02  # pull of the scale towards 1, relative to the data's own weight
    min_scale: float = 0.5
    max_scale: float = 2.0
    min_fraction: float = 0.25  # no corrected step is cheaper than this share of the profile's
    outlier_ratio: float = 4.0  # steps off the prediction by more than this factor are left out
    scale: float = 1.0
    offset: float = 0.0
    steps: int = 0  # steps observed in all
    model: StepTimeModel = field(init=False)  # the profile as last fitted
    _samples: deque[tuple[float, float]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._samples = deque(maxlen=self.window)
        self.model = self.profile

    def observe(self, tokens: int, requests: int, context_tokens: int, attended: int, seconds: float) -> bool:
        """One step with these features took ``seconds``; True when the model was refitted just now."""
        predicted = self.profile.step_seconds(tokens, requests, context_tokens, attended)
        self.steps += 1
        if predicted > 0 and 1 / self.outlier_ratio <= seconds / predicted <= self.outlier_ratio:
            self._samples.append((predicted, seconds))
        if self.steps % self.refit_every or len(self._samples) < self.min_steps:
            return False
        self.scale, self.offset = self._fit()
        self.model = self.profile.calibrated(self.scale, self.offset)
        return True

    def _fit(self) -> tuple[float, float]:
        """The least-squares line through the samples, with the scale pulled towards 1 and clamped."""
        n = len(self._samples)
        mean_x = sum(x for x, _ in self._samples) / n
        mean_y = sum(y for _, y in self._samples) / n
        sxx = sum((x - mean_x) ** 2 for x, _ in self._samples)
        sxy = sum((x - mean_x) * (y - mean_y) for x, y in self._samples)
        prior = self.prior_weight * n * mean_x**2  # as if a few steps said "scale 1" at the mean
        scale = (sxy + prior) / (sxx + prior)
        scale = min(self.max_scale, max(self.min_scale, scale))
        offset = mean_y - scale * mean_x
        # The cheapest step the profile knows (one token, no context) keeps a floor share of its cost.
        cheapest = self.profile.step_seconds(1, 1)
        offset = max(offset, (self.min_fraction - scale) * cheapest)
        return scale, offset
