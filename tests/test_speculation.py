"""Speculation length per tier from (1 - α^s) / (1 - α); then on the real engine with n-gram drafts."""

from __future__ import annotations

import math

import httpx
import pytest

from sloserve_runtime.core.speculation import AcceptanceRates, choose_length, expected_tokens, steps_for_tokens


def test_expected_tokens_follows_the_formula():
    assert expected_tokens(0.7, 1) == 1.0  # no speculation: the one sampled token
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(1.0, 4) == 4.0
    assert expected_tokens(0.0, 5) == 1.0
    with pytest.raises(ValueError):
        expected_tokens(0.5, 0)


def step(length: int) -> float:
    """A memory-bound small batch: a fixed 40 ms, plus 2 ms per verified token."""
    return 0.040 + 0.002 * length


def test_loose_tier_does_not_speculate_and_tight_tier_does():
    assert choose_length(math.inf, 0.8, step, 5) == 1
    assert choose_length(0.100, 0.8, step, 5) == 1  # 42 ms a token already keeps 100 ms
    tight = choose_length(0.030, 0.8, step, 5)
    assert tight > 1
    # The shortest length that keeps 30 ms * 0.9 per token: the one before it does not.
    assert step(tight) / expected_tokens(0.8, tight) <= 0.027
    assert step(tight - 1) / expected_tokens(0.8, tight - 1) > 0.027


def test_tier_no_length_can_keep_gets_the_fastest_per_token():
    chosen = choose_length(0.001, 0.6, step, 6)
    per_token = {s: step(s) / expected_tokens(0.6, s) for s in range(1, 7)}
    assert per_token[chosen] == min(per_token.values())


def test_low_acceptance_makes_speculation_pointless():
    assert choose_length(0.030, 0.0, step, 5) == 1  # nothing is accepted: every length is slower


def test_acceptance_moves_from_the_prior_to_what_is_measured():
    rates = AcceptanceRates(prior=0.5, prior_weight=10)
    assert rates.alpha(0.05) == 0.5
    for _ in range(200):
        rates.record(0.05, drafted=4, accepted=4)  # every draft kept: 4 passes, no failure
    assert rates.alpha(0.05) > 0.95
    for _ in range(200):
        rates.record(0.2, drafted=4, accepted=0)  # the first draft fails: 1 trial, 0 passes
    assert rates.alpha(0.2) < 0.05
    rates.record(0.05, drafted=0, accepted=0)  # no drafts: nothing learnt
    assert rates.alpha(0.3) == 0.5  # an unseen tier starts at the prior


def test_window_steps_cover_the_window_at_its_quantile():
    assert steps_for_tokens(1.0, 4, 10, 0.9) == 3  # every draft kept: 4 tokens a step
    assert steps_for_tokens(0.0, 4, 10, 0.9) == 10  # none kept: one token a step
    # Somewhere between, and more steps the surer the window must be.
    assert 3 < steps_for_tokens(0.6, 4, 10, 0.5) <= steps_for_tokens(0.6, 4, 10, 0.99) < 10


# ---- on the real engine, with vLLM's n-gram speculation ----

NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'
REPETITIVE = " ".join(["alpha beta gamma delta epsilon"] * 40)  # n-gram lookup finds drafts in it


@pytest.fixture(scope="module")
def speculating_engine():
    from sloserve_runtime.serving import server

    options = server.ServerOptions(port=server.free_port(), extra_args=["--speculative-config", NGRAM])
    with server.embedded_server(options) as running:
        yield running


def _drafts(running) -> tuple[float, float]:
    text = httpx.get(running.url.removesuffix("/v1") + "/metrics", timeout=10).text
    totals = []
    for name in ("vllm:spec_decode_num_draft_tokens_total", "vllm:spec_decode_num_accepted_tokens_total"):
        totals.append(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")))
    return totals[0], totals[1]


def _complete(running, slo: dict | None) -> dict:
    body = {"model": running.served_model, "prompt": REPETITIVE, "max_tokens": 48, "temperature": 0}
    if slo is not None:
        body["slo"] = slo
    response = httpx.post(f"{running.url}/completions", json=body, timeout=300)
    response.raise_for_status()
    return response.json()


def test_only_a_tight_tier_speculates(speculating_engine):
    """Loose tiers verify one token a step (their drafts are cut); a tight TPOT gets drafts verified."""
    loose = [_complete(speculating_engine, slo) for slo in (None, {"tpot_ms": 2000})]
    assert _drafts(speculating_engine) == (0.0, 0.0)
    assert all(response["choices"][0]["text"] for response in loose)
    tight = _complete(speculating_engine, {"tpot_ms": 5})
    assert tight["choices"][0]["text"]
    drafted, accepted = _drafts(speculating_engine)
    assert drafted > 0 and accepted > 0
