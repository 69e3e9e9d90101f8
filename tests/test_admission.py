"""Admission notices and modes without the engine: the channel, the request fields, the flags."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from prometheus_client import REGISTRY

from conftest import run_cli
from sloserve.slo import SLO, SLOError
from sloserve_runtime.engine.config import SLOConfig
from sloserve_runtime.engine.notices import DEMOTED, PROMOTED, Notice, NoticeBoard, NoticePublisher
from sloserve_runtime.serving import metrics as slo_metrics
from sloserve_runtime.serving import server
from sloserve_runtime.serving.requests import ENV_ADMISSION, ENV_NOTICES, request_admission, server_admission


def test_notice_round_trips_and_rounds_retry_after_up():
    notice = Notice("t1", False, "TTFT: too late", 2.2)
    assert Notice.from_bytes(notice.to_bytes()) == notice
    assert notice.retry_after_header == "3"
    assert Notice("t2", False, "x", 0.0).retry_after_header == "1"  # never "retry now"


async def test_notices_reach_the_request_that_waits_for_them():
    address = f"ipc://@sloserve-test-{uuid.uuid4().hex}"
    board = NoticeBoard.at(address)
    assert NoticeBoard.at(address) is board  # one board per address and process
    first, second = board.expect("a"), board.expect("b")
    publisher = NoticePublisher(address)
    try:
        publisher.publish(Notice("nobody-waits", True, "admitted"))  # ignored
        publisher.publish(Notice("b", False, "decode capacity: full", 4.0))
        publisher.publish(Notice("a", True, "admitted"))
        got_a, got_b = await asyncio.wait_for(asyncio.gather(first, second), timeout=5)
    finally:
        publisher.close()
    assert got_a == Notice("a", True, "admitted")
    assert got_b == Notice("b", False, "decode capacity: full", 4.0)
    board.forget("a")  # forgetting a resolved or unknown tag is harmless
    late = board.expect("c")
    board.forget("c")
    assert late.cancelled()


async def test_changes_after_the_decision_reach_the_request_in_order():
    """Promotions, demotions and preemptions come after the decision, on the same channel: the board
    keeps them in the request's list and never takes one for the decision itself."""
    address = f"ipc://@sloserve-test-{uuid.uuid4().hex}"
    board = NoticeBoard.at(address)
    decision = board.expect("r")
    changes = board.changes("r")
    publisher = NoticePublisher(address)
    promoted = Notice("r", True, "admitted: promoted from best effort (TTFT: late)", change=PROMOTED)
    demoted = Notice("r", False, "demoted to best effort: decode capacity: over", change=DEMOTED)
    try:
        publisher.publish(Notice("r", False, "TTFT: first token predicted at 900 ms, target 500 ms"))
        publisher.publish(promoted)
        publisher.publish(demoted)
        publisher.publish(Notice("gone", True, "admitted", change=PROMOTED))  # nobody waits: dropped
        got = await asyncio.wait_for(decision, timeout=5)
        for _ in range(50):
            if len(changes) == 2:
                break
            await asyncio.sleep(0.05)
    finally:
        publisher.close()
    assert not got.admitted and got.change == ""
    assert changes == [promoted, demoted]
    assert Notice.from_bytes(demoted.to_bytes()) == demoted
    assert board.changes("gone") == []
    board.forget("r")
    assert board.changes("r") == []  # forgotten with the request


@pytest.mark.parametrize(
    ("headers", "body", "expected"),
    [
        ({}, {}, "best-effort"),
        ({"x-slo-admission": "reject"}, {}, "reject"),
        ({"x-slo-admission": "reject"}, {"slo": {"admission": "best-effort"}}, "best-effort"),
        ({}, {"slo": {"admission": " Reject "}}, "reject"),
    ],
)
def test_request_chooses_its_admission_mode(headers, body, expected):
    assert request_admission(headers, body, "best-effort") == expected


@pytest.mark.parametrize(
    ("headers", "body", "field"),
    [({"x-slo-admission": "maybe"}, {}, "header x-slo-admission"), ({}, {"slo": {"admission": 1}}, "slo.admission")],
)
def test_unknown_admission_mode_names_the_field(headers, body, field):
    with pytest.raises(SLOError) as caught:
        request_admission(headers, body, "best-effort")
    assert caught.value.field == field


def test_server_flag_reaches_the_middleware_and_the_scheduler(monkeypatch):
    options = server.ServerOptions(admission="reject")
    env = server.environment(options)
    assert env[ENV_ADMISSION] == "reject"
    assert env[ENV_NOTICES] == options.notices
    args = server.command(options)
    config = SLOConfig.from_additional_config(json.loads(args[args.index("--additional-config") + 1]))
    assert config.notices == options.notices  # the scheduler pushes where the middleware reads
    monkeypatch.setenv(ENV_ADMISSION, env[ENV_ADMISSION])
    assert server_admission() == "reject"
    stock = server.ServerOptions(scheduler="vllm")
    assert ENV_NOTICES not in server.environment(stock)  # vLLM's scheduler sends no notices
    with pytest.raises(ValueError, match="admission 'sometimes'"):
        server.ServerOptions(admission="sometimes")


def test_metrics_count_per_tier_and_admission():
    slo = SLO.parse("3x", "47ms")
    tier = slo_metrics.tier(slo)
    assert tier == "ttft=3x,tpot=47ms"
    assert slo_metrics.tier(SLO()) == "ttft=none,tpot=none"

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, {"tier": tier, **labels}) or 0.0

    before = value("sloserve_requests_total", admission="admitted")
    slo_metrics.record(slo, slo_metrics.ADMITTED, True, 0.2)
    slo_metrics.record(slo, slo_metrics.ADMITTED, False, 0.9)
    slo_metrics.record(slo, slo_metrics.REJECTED, None, None)
    assert value("sloserve_requests_total", admission="admitted") == before + 2
    assert value("sloserve_requests_total", admission="rejected") >= 1
    assert value("sloserve_requests_finished_total", admission="admitted", slo_met="false") >= 1
    assert 0.0 < value("sloserve_slo_attainment") < 1.0
    # What changed after arrival is counted per tier and change, once the completion ends.
    promoted = value("sloserve_admission_changes_total", change="promoted")
    slo_metrics.record(slo, slo_metrics.BEST_EFFORT, True, 0.3, ["promoted", "demoted"])
    assert value("sloserve_admission_changes_total", change="promoted") == promoted + 1
    assert value("sloserve_admission_changes_total", change="demoted") >= 1


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--admission", "maybe"], "--admission 'maybe' is not one of best-effort, reject"),
        (["--admission", "reject", "--scheduler", "vllm"], "--admission reject needs our scheduler"),
    ],
)
def test_serve_refuses_a_bad_admission_flag(args, expected):
    result = run_cli("serve", "--port", "1", *args, timeout=60)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
