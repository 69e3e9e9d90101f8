"""The middleware's SLO extraction and the stream reassembly, without the engine."""

from __future__ import annotations

import pytest

from sloserve._reassemble import Reassembler
from sloserve.slo import SLO, SLOError
from sloserve_runtime.serving.requests import request_slo


def test_headers_give_the_slo():
    slo = request_slo({"x-slo-ttft-ms": "400", "x-slo-tpot-ms": "60"}, {})
    assert slo == SLO(ttft_ms=400.0, tpot_ms=60.0)


def test_body_field_wins_over_headers():
    slo = request_slo({"x-slo-ttft-ms": "400"}, {"slo": {"ttft_ms": "3x", "tpot_ms": 25}})
    assert slo == SLO(ttft_slowdown=3.0, tpot_ms=25.0)


def test_llm_d_header_names_are_aliases():
    assert request_slo({"x-llm-d-slo-ttft-ms": "400", "x-llm-d-slo-tpot-ms": "60"}, {}) == SLO(ttft_ms=400, tpot_ms=60)
    # Both names with one value agree; with two values they conflict.
    assert request_slo({"x-slo-tpot-ms": "60", "x-llm-d-slo-tpot-ms": "60.0"}, {}) == SLO(tpot_ms=60)
    with pytest.raises(SLOError) as caught:
        request_slo({"x-slo-tpot-ms": "60", "x-llm-d-slo-tpot-ms": "80"}, {})
    assert caught.value.field == "headers x-slo-tpot-ms and x-llm-d-slo-tpot-ms"


@pytest.mark.parametrize(
    ("headers", "body", "field"),
    [
        ({"x-slo-ttft-ms": "-1"}, {}, "header x-slo-ttft-ms"),
        ({"x-slo-tpot-ms": "abc"}, {}, "header x-slo-tpot-ms"),
        ({}, {"slo": {"ttft_ms": 0}}, "slo.ttft_ms"),
        ({}, {"slo": {"tpot_ms": "10min"}}, "slo.tpot_ms"),
        ({}, {"slo": {"deadline": 5}}, "slo.deadline"),
        ({}, {"slo": "fast"}, "slo"),
    ],
)
def test_invalid_slo_names_the_field(headers, body, field):
    with pytest.raises(SLOError) as caught:
        request_slo(headers, body)
    assert caught.value.field == field


def test_reassembler_rebuilds_text_and_tool_calls():
    chunks = [
        {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"tool_calls": [
             {"index": 0, "id": "call_1", "function": {"name": "search", "arguments": '{"que'}}]}}]},
        {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"tool_calls": [
             {"index": 0, "function": {"arguments": 'ry": "moon"}'}}]}, "finish_reason": "tool_calls"}]},
        {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
         "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}},
    ]  # fmt: skip
    assembled = Reassembler()
    for chunk in chunks:
        assembled.add(chunk)
    response = assembled.response()
    assert response["object"] == "chat.completion"
    message = response["choices"][0]["message"]
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": '{"query": "moon"}'}}
    ]
    assert response["choices"][0]["finish_reason"] == "tool_calls"
    assert assembled.prompt_tokens == 12


def test_reassembler_rebuilds_text_completions():
    assembled = Reassembler()
    for text, finish in (("Par", None), ("is", "stop")):
        assembled.add({"id": "t", "object": "text_completion", "created": 1, "model": "m",
                       "choices": [{"index": 0, "text": text, "finish_reason": finish}]})  # fmt: skip
    response = assembled.response()
    assert response["object"] == "text_completion"
    assert response["choices"][0]["text"] == "Paris"
    assert response["choices"][0]["finish_reason"] == "stop"
