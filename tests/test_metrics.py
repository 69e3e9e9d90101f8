"""Run metrics on hand-made token timelines whose answers can be worked out by hand."""

from __future__ import annotations

import json

import httpx
import pytest

from sloserve_runtime.measure.bench import _sse_lines
from sloserve_runtime.measure.summary import Latency, compare, summarize
from sloserve_runtime.workload.programs import StageResult


def call(
    program_id: int,
    arrival: float,
    ttft_ms: float,
    gaps_ms: list[float],
    kind: str = "chat",
    stage: str = "chat",
    error: str | None = None,
    ttft_target_ms: float | None = 200.0,
    tpot_target_ms: float | None = 50.0,
) -> StageResult:
    """A stage call whose first token comes ``ttft_ms`` after ``arrival`` (s), then one token per gap."""
    times = [arrival + ttft_ms / 1000]
    for gap in gaps_ms:
        times.append(times[-1] + gap / 1000)
    return StageResult(program_id, kind, stage, arrival, times, 100, len(times), ttft_target_ms, tpot_target_ms, error)


def run() -> list[StageResult]:
    return [
        # Mean TPOT 45 ms passes, but its first 10-token window averages 80 ms: good for goodput, missed for
        # attainment. 21 tokens.
        call(0, 0.0, 100, [80] * 10 + [10] * 10),
        call(1, 1.0, 50, [40] * 4),  # meets everything; 5 tokens
        call(2, 2.0, 300, [20] * 2, kind="code", stage="complete"),  # TTFT over its 200 ms target; 3 tokens
        call(3, 3.0, 50, [10], kind="code", stage="complete", error="connection reset"),  # 2 tokens, then failed
    ]


def test_windowed_attainment_misses_what_mean_goodput_accepts():
    summary = summarize(run(), duration_s=10.0)
    assert (summary.requests, summary.completed, summary.failed, summary.programs) == (4, 3, 1, 4)
    assert summary.attainment == pytest.approx(1 / 4)  # only program 1's call
    assert summary.program_attainment == pytest.approx(1 / 4)
    assert summary.goodput_rps == pytest.approx(2 / 10)  # programs 0 and 1


def test_throughput_counts_every_token_received():
    assert summarize(run(), duration_s=10.0).output_throughput_tps == pytest.approx((21 + 5 + 3 + 2) / 10)


def test_latency_percentiles_over_completed_calls():
    summary = summarize(run(), duration_s=10.0)
    # TTFTs 100, 50, 300 ms; the failed call's 50 ms is left out.
    assert summary.ttft_ms.mean == pytest.approx(150.0)
    assert (summary.ttft_ms.p50, summary.ttft_ms.p90, summary.ttft_ms.p99) == pytest.approx((100.0, 260.0, 296.0))
    # Mean TPOTs 45, 40, 20 ms: sorted 20, 40, 45; p90 sits at rank 1.8 -> 40 + 0.8 * 5.
    assert summary.tpot_ms.mean == pytest.approx(35.0)
    assert (summary.tpot_ms.p50, summary.tpot_ms.p90, summary.tpot_ms.p99) == pytest.approx((40.0, 44.0, 44.9))


def test_percentiles_interpolate_linearly():
    latency = Latency.of([50.0, 10.0, 40.0, 20.0, 30.0])
    assert (latency.mean, latency.p50, latency.p90, latency.p99) == pytest.approx((30.0, 30.0, 46.0, 49.6))
    assert Latency.of([]) == Latency(None, None, None, None)


def test_attainment_per_kind():
    by_kind = summarize(run(), duration_s=10.0).by_kind
    assert list(by_kind) == ["chat", "code"]
    assert (by_kind["chat"].requests, by_kind["chat"].attainment, by_kind["chat"].program_attainment) == (2, 0.5, 0.5)
    assert (by_kind["code"].requests, by_kind["code"].attainment, by_kind["code"].programs) == (2, 0.0, 2)


def test_each_stage_says_which_half_of_its_slo_it_missed():
    by_stage = summarize(run(), duration_s=10.0).by_stage
    assert list(by_stage) == ["chat/chat", "code/complete"]
    chat, code = by_stage["chat/chat"], by_stage["code/complete"]
    # Program 0 missed a TPOT window only; program 1 met everything.
    assert (chat.requests, chat.attainment, chat.ttft_met, chat.tpot_met) == (2, 0.5, 1.0, 0.5)
    # Program 2 missed its TTFT only; program 3's call failed, which keeps neither half.
    assert (code.requests, code.attainment, code.ttft_met, code.tpot_met) == (2, 0.0, 0.0, 0.5)


def test_one_failed_stage_fails_its_program():
    results = [
        call(7, 0.0, 100, [30] * 12, kind="reasoning", stage="think"),
        call(7, 1.0, 100, [], kind="reasoning", stage="answer", error="HTTP 500"),
        call(8, 0.5, 100, [30] * 12, kind="reasoning", stage="think"),
    ]
    summary = summarize(results, duration_s=4.0)
    assert summary.attainment == pytest.approx(2 / 3)
    assert (summary.programs, summary.program_attainment) == (2, 0.5)
    assert summary.by_kind["reasoning"].program_attainment == 0.5


def test_a_call_without_tokens_or_targets_still_fails():
    silent = StageResult(0, "chat", "chat", 0.0, [], 100, 8, ttft_target_ms=None, tpot_target_ms=None)
    single = call(1, 0.0, 10, [], ttft_target_ms=None, tpot_target_ms=None)  # one token, no TPOT to measure
    summary = summarize([silent, single], duration_s=1.0)
    assert (summary.completed, summary.failed, summary.attainment, summary.goodput_rps) == (1, 1, 0.5, 1.0)
    assert summary.tpot_ms == Latency(None, None, None, None)


def test_summary_serializes_to_json():
    data = json.loads(json.dumps(summarize(run(), duration_s=10.0).to_json()))
    assert data["attainment"] == 0.25
    assert data["ttft_ms"]["p90"] == pytest.approx(260.0)
    assert data["by_kind"]["chat"]["requests"] == 2
    assert data["by_stage"]["code/complete"]["ttft_met"] == 0.0


def test_compare_gives_ours_over_theirs():
    ours = summarize(run(), duration_s=10.0)
    theirs = summarize(run()[:1] + run()[2:], duration_s=20.0)  # without program 1, over twice the time
    ratios = compare(ours, theirs)
    assert theirs.attainment == 0.0 and ratios["attainment"] is None
    assert ratios["goodput"] == pytest.approx((2 / 10) / (1 / 20))
    assert ratios["output_throughput"] == pytest.approx((31 / 10) / (26 / 20))
    # Their TTFTs are 100 and 300 ms: p90 = 280 ms; ours 260 ms.
    assert ratios["ttft_p90"] == pytest.approx(260 / 280)


def test_duration_must_be_positive():
    with pytest.raises(ValueError, match="duration_s must be positive"):
        summarize(run(), duration_s=0.0)


async def test_bench_splits_the_stream_only_at_line_ends():
    """A model's text may hold U+2028 or U+0085 inside an event's JSON; httpx's aiter_lines splits there."""
    event = json.dumps({"choices": [{"text": "a\u2028b\x85c\x1cd"}]}, ensure_ascii=False)
    payload = f"data: {event}\r\n\r\ndata: [DONE]\n\n".encode()
    response = httpx.Response(200, stream=httpx.ByteStream(payload))
    lines = [line async for line in _sse_lines(response)]
    assert lines[0] == f"data: {event}"
    assert json.loads(lines[0][5:])["choices"][0]["text"] == "a\u2028b\x85c\x1cd"
    assert [line for line in lines if line] == [f"data: {event}", "data: [DONE]"]
