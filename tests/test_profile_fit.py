"""Step-time fitting recovers known coefficients from synthetic points."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sloserve_runtime.profile_fit import StepSample, fit_step_time
from sloserve_runtime.step_time import LinearPiece, StepTimeModel, attended_pairs


def synthetic(model: StepTimeModel, count: int, noise: float, seed: int = 1) -> list[StepSample]:
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        requests = int(rng.integers(1, 64))
        tokens = requests + int(rng.integers(0, 512))
        context = requests * int(rng.integers(16, 1024))
        seconds = model.step_seconds(tokens, requests, context) * (1 + noise * rng.standard_normal())
        samples.append(StepSample(tokens, requests, context, seconds))
    return samples


def test_single_piece_coefficients_are_recovered():
    truth = StepTimeModel("truth", (LinearPiece(7.2e-5, 3.3e-3, 1e-7, 0.0317),))
    fit = fit_step_time(synthetic(truth, 400, noise=0.01), "fit", "synthetic", 512)
    piece = fit.model.pieces[0]
    assert len(fit.model.pieces) == 1
    assert piece.per_token == pytest.approx(7.2e-5, rel=0.05)
    assert piece.per_request == pytest.approx(3.3e-3, rel=0.05)
    assert piece.constant == pytest.approx(0.0317, rel=0.05)
    assert fit.r2_heldout > 0.99


def test_max_of_two_pieces_is_found():
    truth = StepTimeModel(
        "truth", (LinearPiece(per_token=4e-4, constant=0.01), LinearPiece(per_request=2e-3, constant=0.002))
    )
    samples = synthetic(truth, 600, noise=0.0)
    one_piece = fit_step_time(samples, "fit", "synthetic", 512, max_pieces=1)
    two_pieces = fit_step_time(samples, "fit", "synthetic", 512, max_pieces=2)
    assert len(two_pieces.model.pieces) == 2
    assert two_pieces.r2_heldout > 0.99
    assert two_pieces.r2_heldout > one_piece.r2_heldout


def test_too_few_points_is_an_error():
    with pytest.raises(ValueError, match="at least 10"):
        fit_step_time([StepSample(1, 1, 1, 0.01)] * 3, "fit", "synthetic", 512)


def test_profile_json_round_trips(tmp_path):
    model = StepTimeModel("m", (LinearPiece(1e-4, 1e-3, 0.0, 0.02),), 512, "test")
    path = tmp_path / "p.json"
    path.write_text(json.dumps(model.to_json(hardware="test box")))
    assert StepTimeModel.load(path) == model


def test_attention_term_is_recovered_from_long_prompt_chunks():
    """Chunks late in a long prompt cost more: the fit finds the per-pair attention coefficient."""
    truth = StepTimeModel("truth", (LinearPiece(per_token=7e-4, constant=0.016, per_attended_pair=2e-8),))
    rng = np.random.default_rng(3)
    samples = []
    for _ in range(300):
        chunk, done = int(rng.integers(16, 512)), int(rng.integers(0, 1500))
        decodes = int(rng.integers(0, 16))
        contexts = rng.integers(16, 2048, size=decodes)
        attended = attended_pairs(chunk, done + chunk) + int(contexts.sum())
        context = done + chunk + int(contexts.sum())
        seconds = truth.step_seconds(chunk + decodes, 1 + decodes, context, attended)
        samples.append(StepSample(chunk + decodes, 1 + decodes, context, seconds, attended))
    piece = fit_step_time(samples, "fit", "synthetic", 512, max_pieces=1).model.pieces[0]
    assert piece.per_attended_pair == pytest.approx(2e-8, rel=0.02)
    assert piece.per_token == pytest.approx(7e-4, rel=0.02)


def test_attended_pairs_counts_causal_attention():
    assert attended_pairs(1, 100) == 100  # a decode attends to its whole context
    assert attended_pairs(3, 3) == 1 + 2 + 3  # a first chunk: token i attends to i keys
    assert attended_pairs(2, 10) == 9 + 10  # a later chunk ending at 10


def test_fit_uses_the_engine_cycle_where_it_was_measured():
    sample = StepSample(10, 1, 10, seconds=0.010, cycle_seconds=0.013)
    assert sample.duration == 0.013
    assert StepSample(10, 1, 10, seconds=0.010).duration == 0.010
