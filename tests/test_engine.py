"""End to end on the real engine: `sloserve serve`, the official openai client, SLOs in and out."""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time

import httpx
import openai
import pytest

from conftest import SERVER_DEFAULT_TPOT_MS
from sloserve.slo import SLO
from sloserve_runtime.core.step_time import StepTimeModel, attended_pairs, engine_profile
from sloserve_runtime.engine.notices import CHANGES

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
OUTCOME_KEYS = {"ttft_target_ms", "ttft_slowdown", "tpot_target_ms", "ttft_ms", "tpot_ms",
                "worst_window_tpot_ms", "ttft_met", "tpot_met", "met", "admission", "admission_reason",
                "admission_changes"}  # fmt: skip


@pytest.fixture(scope="module")
def client(engine) -> openai.OpenAI:
    return openai.OpenAI(base_url=engine.base_url, api_key="unused")


@pytest.fixture
def aclient(engine) -> openai.AsyncOpenAI:
    # One per test: its connections belong to the test's event loop.
    return openai.AsyncOpenAI(base_url=engine.base_url, api_key="unused")


def assert_consistent(outcome: dict) -> None:
    assert set(outcome) == OUTCOME_KEYS
    assert outcome["ttft_ms"] > 0
    if outcome["ttft_target_ms"] is not None:
        assert outcome["ttft_met"] == (outcome["ttft_ms"] <= outcome["ttft_target_ms"])
    assert outcome["met"] == (outcome["ttft_met"] and outcome["tpot_met"])
    assert outcome["admission"] in ("admitted", "best-effort")
    assert (outcome["admission_reason"] == "admitted") == (outcome["admission"] == "admitted")
    assert all(change["change"] in CHANGES and change["reason"] for change in outcome["admission_changes"])


def test_non_streamed_chat_reports_slo_from_headers(client, engine):
    raw = client.chat.completions.with_raw_response.create(
        model=engine.model, messages=QUESTION, max_tokens=16, temperature=0,
        extra_headers={"x-slo-ttft-ms": "30000", "x-slo-tpot-ms": "2000"},
    )  # fmt: skip
    assert raw.headers["x-slo-ttft-ms"] == "30000"
    assert raw.headers["x-slo-tpot-ms"] == "2000"
    response = raw.parse()
    # SmolLM2-135M's answer varies with the batch it runs in (bf16 on CPU): check there is one.
    assert response.choices[0].message.content.strip()
    assert response.choices[0].finish_reason in ("stop", "length")
    outcome = response.model_extra["slo"]
    assert_consistent(outcome)
    assert outcome["ttft_target_ms"] == 30000
    assert outcome["tpot_target_ms"] == 2000
    assert outcome["met"] is True
    assert response.usage.completion_tokens > 1


def test_impossible_target_is_reported_as_missed(client, engine):
    response = client.chat.completions.create(
        model=engine.model, messages=QUESTION, max_tokens=8, extra_body={"slo": {"ttft_ms": 0.001}}
    )
    outcome = response.model_extra["slo"]
    assert_consistent(outcome)
    assert outcome["ttft_met"] is False
    assert outcome["met"] is False
    # The planner saw it coming: served as best effort, and the response says why.
    assert outcome["admission"] == "best-effort"
    assert outcome["admission_reason"].startswith("TTFT: first token predicted at")


def test_streamed_chat_carries_the_outcome_in_the_final_chunk(client, engine):
    stream = client.chat.completions.create(
        model=engine.model, messages=QUESTION, max_tokens=16, temperature=0, stream=True,
        extra_body={"slo": {"ttft_ms": "20s", "tpot_ms": 1500}},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    carrying = [c for c in chunks if (c.model_extra or {}).get("slo")]
    assert carrying == [chunks[-1]], "exactly the final chunk carries the outcome"
    assert chunks[-1].choices[0].finish_reason is not None
    assert all(c.usage is None for c in chunks), "no usage chunk unless the client asked for one"
    outcome = chunks[-1].model_extra["slo"]
    assert_consistent(outcome)
    assert outcome["ttft_target_ms"] == 20000
    assert outcome["tpot_target_ms"] == 1500


def test_streamed_usage_chunk_is_last_and_carries_the_outcome(client, engine):
    stream = client.chat.completions.create(
        model=engine.model, messages=QUESTION, max_tokens=8, stream=True,
        stream_options={"include_usage": True}, extra_headers={"x-slo-ttft-ms": "20000"},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert chunks[-1].model_extra["slo"]["ttft_target_ms"] == 20000
    assert chunks[-2].choices[0].finish_reason is not None


def test_text_completions_report_slo_too(client, engine):
    response = client.completions.create(
        model=engine.model, prompt="The capital of France is", max_tokens=8,
        extra_headers={"x-slo-ttft-ms": "10s"},
    )  # fmt: skip
    assert response.choices[0].text
    assert_consistent(response.model_extra["slo"])
    assert response.model_extra["slo"]["ttft_target_ms"] == 10000


def test_server_default_applies_when_the_request_names_no_slo(client, engine):
    response = client.chat.completions.create(model=engine.model, messages=QUESTION, max_tokens=4)
    outcome = response.model_extra["slo"]
    assert outcome["tpot_target_ms"] == SERVER_DEFAULT_TPOT_MS
    assert outcome["ttft_target_ms"] is None
    assert outcome["ttft_met"] is True


def test_slowdown_target_resolves_with_the_profile(client, engine):
    response = client.chat.completions.create(
        model=engine.model, messages=QUESTION, max_tokens=4, extra_body={"slo": {"ttft_ms": "3x"}}
    )
    outcome = response.model_extra["slo"]
    prefill_ms = StepTimeModel.load(engine_profile()).prefill_seconds(response.usage.prompt_tokens) * 1000
    assert outcome["ttft_slowdown"] == 3.0
    assert outcome["ttft_target_ms"] == pytest.approx(3 * prefill_ms, rel=1e-3)


@pytest.mark.parametrize(
    ("headers", "body", "field"),
    [
        ({"x-slo-ttft-ms": "-20"}, {}, "header x-slo-ttft-ms"),
        ({"x-slo-tpot-ms": "fast"}, {}, "header x-slo-tpot-ms"),
        ({}, {"slo": {"ttft_ms": 0}}, "slo.ttft_ms"),
        ({}, {"slo": {"tpot_ms": "3 fortnights"}}, "slo.tpot_ms"),
        ({}, {"slo": {"ttft_ms": "5min"}}, "slo.ttft_ms"),
        ({}, {"slo": {"latency": 100}}, "slo.latency"),
    ],
)
def test_invalid_slo_gets_400_naming_the_field(client, engine, headers, body, field):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=engine.model, messages=QUESTION, max_tokens=4, extra_headers=headers, extra_body=body
        )
    assert caught.value.status_code == 400
    assert field in caught.value.message


def test_llm_d_header_names_give_the_same_slo(client, engine):
    raw = client.chat.completions.with_raw_response.create(
        model=engine.model, messages=QUESTION, max_tokens=4, temperature=0,
        extra_headers={"x-llm-d-slo-ttft-ms": "30000", "x-llm-d-slo-tpot-ms": "2000", "x-slo-tpot-ms": "2000"},
    )  # fmt: skip
    outcome = raw.parse().model_extra["slo"]
    assert (outcome["ttft_target_ms"], outcome["tpot_target_ms"]) == (30000, 2000)


def test_two_header_names_that_disagree_get_400_naming_both(client, engine):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=engine.model, messages=QUESTION, max_tokens=4,
            extra_headers={"x-slo-ttft-ms": "300", "x-llm-d-slo-ttft-ms": "500"},
        )  # fmt: skip
    assert caught.value.status_code == 400
    assert "x-slo-ttft-ms" in caught.value.message and "x-llm-d-slo-ttft-ms" in caught.value.message


def test_body_nested_too_deep_gets_400_in_the_openai_format(engine):
    nested = "[" * 5000 + "]" * 5000
    body = f'{{"model": "{engine.model}", "messages": [], "x": {nested}}}'
    reply = httpx.post(
        f"{engine.base_url}/chat/completions", content=body,
        headers={"content-type": "application/json"}, timeout=30,
    )  # fmt: skip
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400
    assert "nested too deeply" in error["message"]


def test_other_routes_pass_through(engine):
    models = httpx.get(f"{engine.base_url}/models", timeout=10).json()
    assert models["data"][0]["id"] == engine.model


async def test_tight_request_jumps_a_queue_of_loose_ones(aclient, engine):
    """Earliest first-token deadline first: a tight request overtakes queued long prefills."""
    finished: list[str] = []
    outcomes: dict[str, dict] = {}

    async def send(name: str, prompt: str, slo: dict) -> None:
        response = await aclient.completions.create(
            model=engine.model, prompt=prompt, max_tokens=1, extra_body={"slo": slo}
        )
        finished.append(name)
        outcomes[name] = response.model_extra["slo"]

    loose = [
        send(f"loose-{i}", f"Document {i}. " + " ".join(f"w{i}x{j}" for j in range(350)), {"ttft_ms": "120s"})
        for i in range(6)
    ]
    tasks = [asyncio.create_task(job) for job in loose]
    await asyncio.sleep(0.5)  # the long prompts are queued in the engine by now
    # Tight, yet attainable on a slow machine: the planner would send a hopeless request to best
    # effort. On an AVX2-only CPU (float32 profile) a 512-token chunk takes about 2 s, and the
    # prefills already under way (which go first) take several of them.
    tasks.append(asyncio.create_task(send("tight", "Say hi.", {"ttft_ms": 20_000})))
    await asyncio.gather(*tasks)
    # FCFS would finish it last; deadline order lets at most the in-flight prefills go first
    assert finished.index("tight") <= 2, (finished, outcomes["tight"])


async def test_sdk_session_runs_the_agent_tool_loop(engine):
    from sloserve.session import Session
    from sloserve_runtime.cli.app_loader import load_app

    app = load_app("examples/agents/app.py")
    async with Session(engine.base_url, tools=app.tools) as session:
        answer = await session.run(app.programs["agent"], "How tall is the Eiffel Tower?")
    assert isinstance(answer, str) and answer
    act = [r for r in session.records if r.stage == "act"]
    respond = [r for r in session.records if r.stage == "respond"]
    assert len(act) == 2 and len(respond) == 1
    assert all(r.tool_calls and set(r.tool_calls) <= {"calculate", "search"} for r in act)
    assert act[0].slo == SLO(ttft_ms=1000.0, tpot_ms=150.0)
    assert all(r.server_outcome is not None and r.server_outcome["tpot_target_ms"] == 150 for r in act)
    assert respond[0].server_outcome["ttft_slowdown"] == 5.0


def test_request_ids_stay_distinct_under_concurrency(engine):
    async def many() -> list[str]:
        client = openai.AsyncOpenAI(base_url=engine.base_url, api_key="unused")
        replies = await asyncio.gather(*(
            client.chat.completions.create(model=engine.model, messages=QUESTION, max_tokens=4,
                                           extra_headers={"x-slo-ttft-ms": "60000"})
            for _ in range(8)
        ))  # fmt: skip
        return [reply.id for reply in replies]

    started = time.monotonic()
    ids = asyncio.run(many())
    assert len(set(ids)) == 8
    assert time.monotonic() - started < 120


async def test_step_log_records_features_and_busy_cycles(engine):
    """`--step-log`: every step's features, its forward pass and, while busy, its whole cycle."""
    aclient = openai.AsyncOpenAI(base_url=engine.base_url, api_key="unused")
    before = engine.step_log.read_text().count("\n") if engine.step_log.exists() else 0
    prompt = list(range(1000, 1700))  # 700 token ids: two chunks of the 512-token budget
    exact = {"ignore_eos": True}
    lone = await aclient.completions.create(model=engine.model, prompt=prompt, max_tokens=4, extra_body=exact)
    assert lone.usage.prompt_tokens == 700
    await asyncio.gather(*(
        aclient.completions.create(model=engine.model, prompt=[100 + i] * 8, max_tokens=16, extra_body=exact)
        for i in range(4)
    ))  # fmt: skip
    steps = [json.loads(line) for line in engine.step_log.read_text().splitlines()[before:]]
    assert all({"tokens", "requests", "context_tokens", "attended", "seconds"} <= set(step) for step in steps)
    # The lone prompt's prefill: 512 tokens, then 188 ending at 700, attention counted causally.
    chunks = [step for step in steps if step["requests"] == 1 and step["tokens"] in (512, 188)]
    assert [(step["tokens"], step["context_tokens"]) for step in chunks[:2]] == [(512, 512), (188, 700)]
    assert [step["attended"] for step in chunks[:2]] == [attended_pairs(512, 512), attended_pairs(188, 700)]
    cycles = [step for step in steps if "cycle_seconds" in step]
    assert len(cycles) >= 10
    assert all(step["cycle_seconds"] >= step["seconds"] > 0 for step in cycles)


def test_step_log_lays_the_engines_tokens_beside_the_clients(engine):
    """`--step-log` records when the engine emitted each request's tokens and when the request came
    in, on the wall clock a client shares: a streamed call's tokens reach the client after the
    engine emitted them, one emitted token per streamed token, and the request reaches the engine
    after it was sent."""
    before = engine.step_log.read_text().count("\n") if engine.step_log.exists() else 0
    sent = time.time()
    stream_id, received = None, []
    with httpx.stream(
        "POST", f"{engine.base_url}/completions", timeout=60,
        json={"model": engine.model, "prompt": [200] * 40, "max_tokens": 12, "ignore_eos": True, "stream": True},
    ) as response:  # fmt: skip
        for line in response.iter_lines():
            if line.startswith("data:") and not line.endswith("[DONE]"):
                stream_id = stream_id or json.loads(line[5:])["id"]
                received.append(time.time())
    steps = [json.loads(line) for line in engine.step_log.read_text().splitlines()[before:]]
    # vLLM's engine id for the call: the stream's id, the prompt's index and a suffix.
    ours = [rid for step in steps for rid in step.get("emitted", {}) if rid.startswith(f"{stream_id}-")]
    assert ours, f"no step of the log emitted tokens for {stream_id}"
    rid = ours[0]
    emitted = [step["emitted_at"] for step in steps for _ in range(step.get("emitted", {}).get(rid, 0))]
    assert len(emitted) == len(received) == 12
    assert all(client >= engine_time for client, engine_time in zip(received, emitted, strict=True))
    assert emitted == sorted(emitted)
    created, added = next(step["arrived"][rid] for step in steps if rid in step.get("arrived", {}))
    assert sent <= created <= added <= emitted[0]


CALIBRATED = re.compile(r"calibrated to this engine's last (\d+) steps: scale ([\d.]+), offset ([+-][\d.]+) ms")


async def test_scheduler_calibrates_its_profile_to_the_engine(engine):
    """Online calibration: the scheduler refits the shipped profile to the steps it sees, logs the fit,
    and the fit predicts this engine's step cycles (from ``--step-log``) at least as well as the profile.
    """
    aclient = openai.AsyncOpenAI(base_url=engine.base_url, api_key="unused")
    exact = {"ignore_eos": True}
    for _ in range(2):  # about 100 busy steps of mixed sizes: prefill chunks beside decodes
        await asyncio.gather(*(
            aclient.completions.create(
                model=engine.model, prompt=[300 + i] * (20 + 150 * i), max_tokens=48, extra_body=exact
            )
            for i in range(5)
        ))  # fmt: skip
    fits = CALIBRATED.findall(engine.log.read_text())
    assert fits, "no calibration line in the engine's log"
    window, scale, offset_ms = int(fits[-1][0]), float(fits[-1][1]), float(fits[-1][2])
    assert 0.5 <= scale <= 2.0
    profile = StepTimeModel.load(engine_profile())
    calibrated = profile.calibrated(scale, offset_ms / 1000)
    steps = [json.loads(line) for line in engine.step_log.read_text().splitlines()]
    cycles = [step for step in steps if "cycle_seconds" in step][-window:]

    def error(model: StepTimeModel) -> float:
        features = ("tokens", "requests", "context_tokens", "attended")
        return statistics.median(
            abs(model.step_seconds(*(step[name] for name in features)) - step["cycle_seconds"]) for step in cycles
        )

    # Rounded in the log, and the last refit may be a few steps older than the log's last steps.
    assert error(calibrated) <= 1.1 * error(profile) + 0.002


LONG_PROMPT = "Report. " + " ".join(f"item{j}" for j in range(300))


async def _engine_queue(engine) -> float:
    """Requests vLLM still holds (running plus waiting), from its own /metrics."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{engine.port}/metrics", timeout=10)).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{"))
    )


async def test_admission_reject_answers_429_with_retry_after_and_aborts(aclient, engine):
    """In reject mode a request the planner cannot promise gets 429 at once; vLLM drops it."""
    busy = [
        asyncio.create_task(
            aclient.completions.create(
                model=engine.model, prompt=LONG_PROMPT, max_tokens=24, extra_body={"slo": {"ttft_ms": "120s"}}
            )
        )
        for _ in range(4)
    ]
    await asyncio.sleep(0.3)
    started = time.monotonic()
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{engine.base_url}/completions",
            json={"model": engine.model, "prompt": "Say hi.", "max_tokens": 64, "stream": True, "slo": {"ttft_ms": 5}},
            headers={"x-slo-admission": "reject"},
            timeout=60,
        )
    answered_in = time.monotonic() - started
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-slo-admission"] == "rejected"
    error = response.json()["error"]
    assert error["code"] == 429 and error["param"] == "slo"
    assert "TTFT: first token predicted" in error["message"]
    # Refused before the busy requests finish, not after being served.
    assert not all(task.done() for task in busy), answered_in
    # The openai client sees a RateLimitError and its message.
    with pytest.raises(openai.RateLimitError) as caught:
        await aclient.completions.create(
            model=engine.model,
            prompt="Say hi.",
            max_tokens=4,
            extra_body={"slo": {"ttft_ms": 1, "admission": "reject"}},
        )
    assert "not admitted" in caught.value.message
    for task in busy:
        assert (await task).model_extra["slo"]["admission"] == "admitted"
    # Nothing is left in the engine: the rejected requests were aborted, not served later.
    deadline = time.monotonic() + 10
    while await _engine_queue(engine) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert await _engine_queue(engine) == 0


async def test_vllms_queue_cap_answers_503_before_our_admission(engine):
    """``--max-num-queued-reqs`` (vLLM's, passed through) refuses in the API server, before the
    request reaches our scheduler: a full queue is a 503 whatever the SLO; below it, our planner
    decides (best effort, or a 429 in reject mode)."""
    from conftest import MAX_NUM_QUEUED_REQS

    async with httpx.AsyncClient(base_url=engine.base_url, timeout=120) as http:

        async def hold() -> str:
            body = {"model": engine.model, "prompt": "Tell a story.", "max_tokens": 400, "ignore_eos": True,
                    "stream": True, "slo": {"ttft_ms": "120s"}}  # fmt: skip
            async with http.stream("POST", "/completions", json=body) as response:
                chunks = [chunk async for chunk in response.aiter_raw()]
            return f"{response.status_code} {b''.join(chunks)[-300:]!r}"

        holders = [asyncio.create_task(hold()) for _ in range(MAX_NUM_QUEUED_REQS)]
        try:
            deadline = time.monotonic() + 60
            while await _engine_queue(engine) < MAX_NUM_QUEUED_REQS and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            queued = await _engine_queue(engine)
            # A holder that ended already says why (an error body, or a 503 from requests vLLM still counts).
            ended = [repr(task.exception() or task.result()) for task in holders if task.done()]
            assert queued == MAX_NUM_QUEUED_REQS, (queued, ended, engine.log.read_text()[-3000:])
            response = await http.post(
                "/completions", json={"model": engine.model, "prompt": "Hi", "max_tokens": 4},
                headers={"x-slo-ttft-ms": "60000", "x-slo-admission": "reject"},
            )  # fmt: skip
            assert response.status_code == 503, response.text
            assert "x-slo-admission" not in response.headers  # our scheduler never saw it
        finally:
            for task in holders:
                task.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
    deadline = time.monotonic() + 30
    while await _engine_queue(engine) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert await _engine_queue(engine) == 0


async def _token_counters(engine) -> tuple[float, float]:
    """vLLM's own counts of prompt tokens computed and tokens generated, from /metrics."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{engine.port}/metrics", timeout=10)).text
    totals = {"vllm:prompt_tokens_total": 0.0, "vllm:generation_tokens_total": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals["vllm:prompt_tokens_total"], totals["vllm:generation_tokens_total"]


async def test_a_refused_request_takes_no_engine_step(engine):
    """The engine drops a request it refuses as it adds it: on an idle engine, which would run it
    in the very next step, vLLM computes none of its prompt and generates none of its tokens."""
    deadline = time.monotonic() + 30
    while await _engine_queue(engine) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    before = await _token_counters(engine)
    async with httpx.AsyncClient() as http:
        for i in range(3):
            response = await http.post(
                f"{engine.base_url}/completions",
                json={"model": engine.model, "prompt": f"Refused {i}: {LONG_PROMPT}", "max_tokens": 8,
                      "slo": {"ttft_ms": 1, "admission": "reject"}},
                timeout=60,
            )  # fmt: skip
            assert response.status_code == 429, response.text
            assert "reject mode" in response.json()["error"]["message"]
    await asyncio.sleep(1.0)  # a step that ran them would be counted by now
    assert await _token_counters(engine) == before
    assert await _engine_queue(engine) == 0


def test_reject_mode_serves_what_it_admits(client, engine):
    response = client.completions.create(
        model=engine.model,
        prompt="Say hi.",
        max_tokens=4,
        extra_body={"slo": {"ttft_ms": "60s", "admission": "reject"}},
    )
    assert response.choices[0].text
    assert response.model_extra["slo"]["admission"] == "admitted"


def test_prometheus_metrics_count_admission_per_tier(client, engine):
    for ttft in ("45s", 0.001):
        client.completions.create(
            model=engine.model, prompt="Hello", max_tokens=2, extra_body={"slo": {"ttft_ms": ttft}}
        )
    text = httpx.get(f"http://127.0.0.1:{engine.port}/metrics", timeout=10).text
    lines = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("sloserve_")
    }
    tier = f"ttft=45000ms,tpot={SERVER_DEFAULT_TPOT_MS}ms"
    assert lines[f'sloserve_requests_total{{admission="admitted",tier="{tier}"}}'] >= 1
    assert lines[f'sloserve_requests_finished_total{{admission="admitted",slo_met="true",tier="{tier}"}}'] >= 1
    assert lines[f'sloserve_slo_attainment{{tier="{tier}"}}'] == 1.0
    hopeless = f"ttft=0.001ms,tpot={SERVER_DEFAULT_TPOT_MS}ms"
    assert lines[f'sloserve_requests_total{{admission="best_effort",tier="{hopeless}"}}'] >= 1
    assert lines[f'sloserve_slo_attainment{{tier="{hopeless}"}}'] == 0.0
