"""Fitting the step-time model (a max of linear pieces) to measured engine steps. Imports no vLLM."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls

from sloserve_runtime.core.step_time import LinearPiece, StepTimeModel

FEATURES = ("tokens", "requests", "context_tokens", "attended")


@dataclass(frozen=True)
class StepSample:
    """One measured engine step."""

    tokens: int  # scheduled tokens
    requests: int  # requests in the batch
    context_tokens: int  # KV context of the batch after the step
    seconds: float  # measured duration of the model's forward pass (execution)
    attended: int = 0  # attention pairs of the step (``step_time.attended_pairs`` summed over requests)
    cycle_seconds: float | None = None  # schedule() to next schedule() while the engine stayed busy

    @classmethod
    def from_record(cls, record: dict) -> StepSample:
        """A step log's record (``--step-log``): its features and times; the timeline of the tokens
        the step emitted (``emitted_at``, ``emitted``) is not a sample's."""
        return cls(**{name: record[name] for name in cls.__dataclass_fields__ if name in record})

    @property
    def duration(self) -> float:
        """What the simulator advances its clock by: the whole engine cycle where it was measured."""
        return self.seconds if self.cycle_seconds is None else self.cycle_seconds


@dataclass(frozen=True)
class FitResult:
    """A fitted model and how well it predicts steps it was not fitted on."""

    model: StepTimeModel
    r2_heldout: float  # R² on the held-out steps
    train_points: int
    test_points: int


def _matrix(samples: Sequence[StepSample]) -> np.ndarray:
    rows = [[s.tokens, s.requests, s.context_tokens, s.attended, 1.0] for s in samples]
    return np.asarray(rows, dtype=float)


def _piece(coefficients: np.ndarray) -> LinearPiece:
    per_token, per_request, per_context, per_attended, constant = (float(c) for c in coefficients)
    return LinearPiece(per_token, per_request, per_context, constant, per_attended)


def _predict(pieces: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (x @ pieces.T).max(axis=1)


def _fit_pieces(x: np.ndarray, y: np.ndarray, count: int, iterations: int = 20) -> np.ndarray:
    """Non-negative least squares per piece; points are reassigned to the piece that predicts max."""
    # Start by splitting on batch size (columns are scaled): small batches are compute-light.
    order = np.argsort(x[:, 0] + x[:, 1])
    groups = np.array_split(order, count)
    pieces = np.vstack([nnls(x[g], y[g])[0] if len(g) else np.zeros(x.shape[1]) for g in groups])
    for _ in range(iterations):
        owner = np.argmax(x @ pieces.T, axis=1)
        refit = []
        for index in range(count):
            members = owner == index
            refit.append(nnls(x[members], y[members])[0] if members.sum() >= x.shape[1] else pieces[index])
        refit = np.vstack(refit)
        if np.allclose(refit, pieces):
            break
        pieces = refit
    return pieces


def r_squared(actual: np.ndarray, predicted: np.ndarray) -> float:
    residual = float(((actual - predicted) ** 2).sum())
    total = float(((actual - actual.mean()) ** 2).sum())
    return 1.0 - residual / total if total > 0 else 0.0


def fit_step_time(
    samples: Sequence[StepSample],
    name: str,
    source: str,
    max_num_batched_tokens: int,
    max_pieces: int = 2,
    holdout: float = 0.2,
    seed: int = 0,
) -> FitResult:
    """Fit 1..max_pieces linear pieces; keep the count with the best R² on held-out steps."""
    if len(samples) < 10:
        raise ValueError(f"need at least 10 measured steps to fit a step-time model, got {len(samples)}")
    x, y = _matrix(samples), np.asarray([s.duration for s in samples], dtype=float)
    # Features span ten orders of magnitude (attended pairs vs the constant): fit on columns scaled
    # to [0, 1] and scale the coefficients back, so NNLS is well conditioned.
    scale = np.where(x.max(axis=0) > 0, x.max(axis=0), 1.0)
    x = x / scale
    shuffled = np.random.default_rng(seed).permutation(len(samples))
    cut = max(1, int(len(samples) * holdout))
    test, train = shuffled[:cut], shuffled[cut:]
    best: tuple[float, np.ndarray] | None = None
    for count in range(1, max_pieces + 1):
        pieces = _fit_pieces(x[train], y[train], count)
        score = r_squared(y[test], _predict(pieces, x[test]))
        # A second piece must earn its place: keep it only for a clear gain.
        if best is None or score > best[0] + 0.01:
            best = (score, pieces)
    score, pieces = best
    pieces = pieces / scale
    model = StepTimeModel(
        name=name,
        pieces=tuple(_piece(row) for row in pieces),
        max_num_batched_tokens=max_num_batched_tokens,
        source=source,
    )
    return FitResult(model, score, len(train), len(test))
