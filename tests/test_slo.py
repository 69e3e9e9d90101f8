"""SLO parsing and the attainment rule, without the engine."""

from __future__ import annotations

import pytest

from sloserve.slo import SLO, SLOError, ThinkingSpan, judge, parse_tpot, parse_ttft


@pytest.mark.parametrize(
    ("value", "expected"),
    [(300, (300.0, None)), ("300ms", (300.0, None)), ("2s", (2000.0, None)), ("3x", (None, 3.0)),
     ("1.5X", (None, 1.5)), (" 250 ", (250.0, None)), (None, (None, None))],
)  # fmt: skip
def test_ttft_accepts_ms_seconds_and_slowdown(value, expected):
    assert parse_ttft(value) == expected


@pytest.mark.parametrize("value", [0, -5, "-3x", "0ms", "fast", "", "3 apples", True, [1], float("nan")])
def test_invalid_ttft_names_the_field(value):
    with pytest.raises(SLOError) as caught:
        parse_ttft(value, "slo.ttft_ms")
    assert caught.value.field == "slo.ttft_ms"
    assert "slo.ttft_ms" in str(caught.value)


def test_unknown_unit_is_reported_as_such():
    with pytest.raises(SLOError, match="unknown unit 'min'"):
        parse_tpot("5min")
    with pytest.raises(SLOError, match="unknown unit 'x'"):
        parse_tpot("3x")  # a slowdown only makes sense for TTFT


def test_tpot_in_seconds_converts_to_ms():
    assert parse_tpot("0.05s") == pytest.approx(50.0)


def test_request_slo_overrides_server_default_field_by_field():
    default = SLO.parse("2s", "100ms")
    assert SLO.parse(None, "40ms").merged_over(default) == SLO(ttft_ms=2000.0, tpot_ms=40.0)
    assert SLO.parse("3x", None).merged_over(default) == SLO(ttft_slowdown=3.0, tpot_ms=100.0)
    assert SLO().merged_over(SLO()).is_constrained is False


def test_slowdown_resolves_against_zero_load_prefill():
    assert SLO.parse("3x").ttft_target_ms(zero_load_prefill_ms=40.0) == pytest.approx(120.0)
    assert SLO.parse("250ms").ttft_target_ms(zero_load_prefill_ms=40.0) == 250.0


def test_judge_on_a_hand_made_timeline():
    # arrival at 0; first token at 0.2 s, then 20 tokens 50 ms apart
    times = [0.2 + 0.05 * i for i in range(21)]
    outcome = judge(0.0, times, ttft_target_ms=250, tpot_target_ms=60)
    assert outcome.ttft_ms == pytest.approx(200.0)
    assert outcome.tpot_ms == pytest.approx(50.0)
    assert outcome.met
    assert not judge(0.0, times, ttft_target_ms=150, tpot_target_ms=60).ttft_met


def test_one_slow_window_fails_tpot_even_if_the_mean_passes():
    # 30 gaps of 10 ms, then 10 gaps of 100 ms: mean 32.5 ms, but the last window averages 100 ms
    gaps = [0.01] * 30 + [0.1] * 10
    times = [0.1]
    for gap in gaps:
        times.append(times[-1] + gap)
    outcome = judge(0.0, times, ttft_target_ms=None, tpot_target_ms=50)
    assert outcome.tpot_ms == pytest.approx(32.5)
    assert outcome.worst_window_tpot_ms == pytest.approx(100.0)
    assert not outcome.tpot_met


def test_short_outputs_judge_the_whole_tail():
    outcome = judge(0.0, [0.1, 0.2, 0.26], ttft_target_ms=None, tpot_target_ms=70)
    assert outcome.worst_window_tpot_ms == pytest.approx(80.0)
    assert not outcome.tpot_met


def test_no_tokens_fails_a_ttft_target():
    assert not judge(0.0, [], ttft_target_ms=100, tpot_target_ms=None).met
    assert judge(0.0, [], ttft_target_ms=None, tpot_target_ms=None).met


def test_a_reasoning_generation_is_judged_in_two_phases():
    # 4 thinking tokens 20 ms apart, then 3 answer tokens 90 ms apart.
    times = [0.1, 0.12, 0.14, 0.16, 0.25, 0.34, 0.43]
    outcome = judge(0.0, times, 200, 100, thinking_tpot_ms=25, thinking_tokens=4)
    assert outcome.met and outcome.thinking.tokens == 4 and outcome.answer.tokens == 3
    assert outcome.thinking.tpot_ms == pytest.approx(20) and outcome.answer.tpot_ms == pytest.approx(90)
    # Judged on one TPOT, the answer's pace breaks the thinking's 25 ms...
    assert not judge(0.0, times, 200, 25).met
    # ...and a thinking that never ended is judged on the thinking TPOT throughout.
    assert not judge(0.0, times, 200, 100, thinking_tpot_ms=25).tpot_met
    assert judge(0.0, times, 200, 100, thinking_tpot_ms=25, thinking_tokens=4).to_json()["thinking"]["tokens"] == 4


def test_thinking_span_finds_the_end_of_the_thinking_in_a_stream():
    span = ThinkingSpan()
    for text in ["<think>", "sky", " scatters", "</", "think>", "Blue", "."]:
        span.add(text)
    assert span.end == 5 and span.chunks == 7
    parsed = ThinkingSpan()  # a reasoning parser splits the stream: the end is its last reasoning delta
    for content, reasoning in [(None, "sky"), (None, " scatters"), ("Blue", None), (".", None)]:
        parsed.add(content, reasoning)
    assert parsed.end == 2


def test_thinking_span_reads_the_chunks_of_a_stream():
    span = ThinkingSpan()
    for text in ["<think>", "hm", "</think>", "Blue"]:
        span.add_chunk({"choices": [{"delta": {"content": text}}]})
    completion = ThinkingSpan()  # a text completion's chunks carry "text"
    for text in ["<think>", "</think>", "x"]:
        completion.add_chunk({"choices": [{"text": text}]})
    assert (span.end, span.chunks, completion.end) == (3, 4, 2)
