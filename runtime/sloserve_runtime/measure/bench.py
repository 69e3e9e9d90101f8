"""`sloserve bench`: replay a scenario's trace against an OpenAI-compatible endpoint and measure SLOs.

Each stage call is a streamed ``/v1/completions`` request whose prompt is exactly
``prompt_tokens`` random token ids and whose output is exactly ``output_tokens`` tokens
(``ignore_eos``); the SLO travels in the body field ``slo``. Programs start at their trace arrival
times; a program's stages run one after another.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import httpx
import numpy as np

from sloserve_runtime.core.step_time import StepTimeModel
from sloserve_runtime.serving.requests import HEADER_ADMISSION
from sloserve_runtime.workload.programs import ProgramSpec, StageResult, StageSpec, call_groups, program_call

VOCAB_RANGE = (100, 20_000)  # token ids drawn for synthetic prompts


@dataclass(frozen=True)
class Endpoint:
    """Where to send the trace."""

    base_url: str  # e.g. http://127.0.0.1:8011/v1
    api_key: str | None = None
    # False: send no SLO with the requests, so the server's defaults (``--slo-ttft-ms``) apply;
    # the trace's SLOs still judge the results.
    send_slo: bool = True
    # The admission mode each request asks for (header ``x-slo-admission``); None: the server's.
    admission: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def label(self) -> str:
        """How tables name it: its URL, and the admission mode it asks for, if any."""
        return self.base_url if self.admission is None else f"{self.base_url} [{self.admission}]"

    def client(self) -> httpx.AsyncClient:
        headers = {**self.headers, **({HEADER_ADMISSION: self.admission} if self.admission else {})}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=900, limits=limits)

    def model_card(self) -> dict:
        """The first served model: its id and (for vLLM) its max_model_len."""
        response = httpx.get(f"{self.base_url}/models", headers=self.headers, timeout=30)
        response.raise_for_status()
        return response.json()["data"][0]


def synthetic_prompt(
    program_id: int, stage_index: int, length: int, salt: int, shared: Sequence[int] = ()
) -> list[int]:
    """``shared`` (what the program sent and got before, cut to the stage's shared prefix), then
    random token ids; ``salt`` differs per run so no run hits the prefix cache an earlier run filled."""
    rng = np.random.default_rng([salt, program_id, stage_index])
    shared = list(shared[:length])
    return shared + rng.integers(*VOCAB_RANGE, size=length - len(shared)).tolist()


@dataclass(frozen=True)
class _Run:
    """What every call of one replay shares."""

    client: httpx.AsyncClient
    model: str
    step_time: StepTimeModel
    salt: int
    start: float
    send_slo: bool = True


async def _stage_call(
    run: _Run, program: ProgramSpec, index: int, stage: StageSpec, prompt: list[int]
) -> tuple[StageResult, list[int]]:
    """Send one stage call and stream its tokens; returns its result and the output token ids."""
    output_ids: list[int] = []
    body = {
        "model": run.model,
        "prompt": prompt,
        "max_tokens": stage.output_tokens,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }
    if run.send_slo:
        body["slo"] = stage.slo.to_json()
        call = program_call(program, index, f"{run.salt:x}-{program.program_id}", run.start + program.arrival_s)
        if call is not None:
            body["slo"]["program"] = call.to_body()
    zero_load_ms = run.step_time.prefill_seconds(stage.prompt_tokens) * 1000.0
    result = StageResult(
        program_id=program.program_id,
        kind=program.kind,
        stage=stage.name,
        arrival=time.time(),
        token_times=[],
        prompt_tokens=stage.prompt_tokens,
        output_tokens=stage.output_tokens,
        ttft_target_ms=stage.slo.ttft_target_ms(zero_load_ms),
        tpot_target_ms=stage.slo.tpot_ms,
        thinking_tpot_ms=stage.slo.thinking_tpot_ms,
        program_due=None if program.deadline_s is None else run.start + program.arrival_s + program.deadline_s,
    )
    try:
        async with run.client.stream("POST", "/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                if response.status_code == 429:  # refused at admission (reject mode): not an admitted call
                    result.admission, result.best_effort = "rejected", True
                return result, output_ids
            async for line in _sse_lines(response):
                if not line.startswith("data:") or line.endswith("[DONE]"):
                    continue
                now = time.time()
                chunk = json.loads(line[5:])
                result.request_id = result.request_id or chunk.get("id")
                _note_admission(result, chunk.get("slo"))
                for choice in chunk.get("choices") or []:
                    token_ids = choice.get("token_ids") or []
                    output_ids.extend(token_ids)
                    count = len(token_ids) or (1 if choice.get("text") else 0)
                    result.token_times.extend([now] * count)
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result, output_ids


def _note_admission(result: StageResult, outcome: dict | None) -> None:
    """The scheduler's admission decision, from the ``slo`` outcome sloserve's last chunk carries
    (none from a server without our scheduler, or with no decision for the call).

    As the simulator records it, the call's last state counts: a call promoted later is admitted,
    one demoted (or, as best effort, preempted) is not, with the reason of its last change.
    """
    if not outcome or outcome.get("admission") is None:
        return
    result.admission = outcome.get("admission_reason") or outcome["admission"]
    result.best_effort = outcome["admission"] != "admitted"
    for change in outcome.get("admission_changes") or []:
        result.best_effort = change.get("change") != "promoted"
        result.admission = change.get("reason") or result.admission


async def _sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The stream's lines, split only at LF or CRLF as SSE says (httpx's ``aiter_lines`` also splits
    at U+2028, U+0085 and the like, which a model's text may hold inside an event's JSON)."""
    buffer = ""
    async for text in response.aiter_text():
        buffer += text
        *lines, buffer = buffer.split("\n")
        for line in lines:
            yield line.removesuffix("\r")
    if buffer:
        yield buffer.removesuffix("\r")


async def _program(run: _Run, program: ProgramSpec) -> list[StageResult]:
    await asyncio.sleep(max(0.0, run.start + program.arrival_s - time.time()))
    results: list[StageResult] = []
    sent_and_got: list[int] = []  # the previous calls' prompt and output: what later calls may lead with
    for group in call_groups(program.stages):  # a fan-out's calls go at once; the next waits for all
        delay = program.stages[group.start].delay_s
        if delay:
            await asyncio.sleep(delay)
        prompts = []
        for index in group:
            stage = program.stages[index]
            shared = sent_and_got[: stage.shared_prefix_tokens]
            prompts.append(synthetic_prompt(program.program_id, index, stage.prompt_tokens, run.salt, shared))
        calls = await asyncio.gather(
            *(
                _stage_call(run, program, index, program.stages[index], prompt)
                for index, prompt in zip(group, prompts, strict=True)
            )
        )
        results.extend(result for result, _ in calls)
        if any(result.error for result, _ in calls):
            break  # a later stage depends on this one's output
        # The next call reads the first call's prompt and every call's new tokens and output.
        sent_and_got = prompts[0] + calls[0][1]
        for index, prompt, (_, output_ids) in zip(group[1:], prompts[1:], calls[1:], strict=True):
            sent_and_got += prompt[program.stages[index].shared_prefix_tokens :] + output_ids
    return results


async def replay(
    trace: list[ProgramSpec],
    endpoint: Endpoint,
    model: str,
    step_time: StepTimeModel,
    on_program_done: Callable[[], None] = lambda: None,
) -> tuple[list[StageResult], float]:
    """Send every program at its arrival time; return all stage results and the run's duration."""

    async def tracked(run: _Run, program: ProgramSpec) -> list[StageResult]:
        try:
            return await _program(run, program)
        finally:
            on_program_done()

    async with endpoint.client() as client:
        run = _Run(client, model, step_time, salt=secrets.randbits(32), start=time.time(), send_slo=endpoint.send_slo)
        per_program = await asyncio.gather(*(tracked(run, program) for program in trace))
        duration = time.time() - run.start
    return [result for results in per_program for result in results], duration
