"""One completion on its way through the middleware: the body rewritten for the engine, the stream
watched for token times, and the SLO outcome and admission added to the response."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sloserve._reassemble import Reassembler
from sloserve.slo import SLO, ThinkingSpan, judge
from sloserve_runtime.core.programs import ProgramCall
from sloserve_runtime.core.slo_state import XARG_ADMISSION, slo_to_xargs
from sloserve_runtime.core.step_time import StepTimeModel
from sloserve_runtime.engine.notices import ANSWERING, XARG_TAG, Notice
from sloserve_runtime.serving import metrics as slo_metrics
from sloserve_runtime.serving.requests import HEADER_TPOT, HEADER_TTFT

Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]


class Exchange:
    """One completion request on its way through: rewrites the body, watches the stream."""

    def __init__(
        self,
        slo: SLO,
        arrival: float,
        body: dict[str, Any],
        step_time: StepTimeModel,
        tag: str | None = None,
        notice: asyncio.Future[Notice] | None = None,
        changes: list[Notice] | None = None,
        admission: str | None = None,
        program: ProgramCall | None = None,
    ) -> None:
        self.slo = slo
        self.program = program  # the program run it is a stage call of, if it says
        self.mode = admission  # the request's admission mode (None: the server's)
        self.tag = tag  # matches the scheduler's admission notice to this request
        self.notice = notice
        # What changed after the decision, as the notice board appends it (``NoticeBoard.changes``).
        self.changes = [] if changes is None else changes
        self.rejected = False
        self.arrival = arrival
        self.body = body
        self.step_time = step_time
        self.client_streams = bool(body.get("stream"))
        options = body.get("stream_options") or {}
        self.client_wants_usage = self.client_streams and bool(options.get("include_usage"))
        self.token_times: list[float] = []
        self.thinking = ThinkingSpan()  # where a reasoning generation ends its thinking, in its stream
        self.reassembler = Reassembler()
        self.status = 200
        self.buffer = b""
        self.held: dict[str, Any] | None = None  # the finishing chunk, held until usage arrives

    def engine_body(self) -> dict[str, Any]:
        body = {key: value for key, value in self.body.items() if key != "slo"}
        body["stream"] = True
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        xargs = {**(body.get("vllm_xargs") or {}), **slo_to_xargs(self.slo, self.arrival)}
        if self.tag is not None:
            xargs[XARG_TAG] = self.tag
        if self.mode is not None:
            xargs[XARG_ADMISSION] = self.mode
        if self.program is not None:
            xargs.update(self.program.to_xargs())
        body["vllm_xargs"] = xargs
        return body

    def decision(self) -> Notice | None:
        """The scheduler's admission notice, if it has come."""
        notice = self.notice
        if notice is None or not notice.done() or notice.cancelled():
            return None
        return notice.result()

    def admission(self) -> str:
        """The admission decision as the metrics label it."""
        if self.rejected:
            return slo_metrics.REJECTED
        decision = self.decision()
        if decision is None:
            return slo_metrics.UNKNOWN
        return slo_metrics.ADMITTED if decision.admitted else slo_metrics.BEST_EFFORT

    def admission_changes(self) -> list[Notice]:
        """What changed of its admission after arrival (a reasoning tier switch is not such a change)."""
        return [notice for notice in self.changes if notice.change != ANSWERING]

    def count(self) -> None:
        """Count this completion in the Prometheus metrics, once it has ended."""
        changes = [notice.change for notice in self.admission_changes()]
        if self.rejected or not self.token_times:
            slo_metrics.record(self.slo, self.admission(), None, None, changes)
            return
        met = bool(self.outcome()["met"])
        slo_metrics.record(self.slo, self.admission(), met, self.token_times[0] - self.arrival, changes)

    def wrap(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
                if self.status == 200 and not self.client_streams:
                    return  # sent once the whole response is reassembled
                headers = [*message.get("headers", []), *self.slo_headers()]
                await send({**message, "headers": headers})
            elif message["type"] == "http.response.body":
                if self.status != 200:
                    await send(message)
                    return
                await self._on_body(send, message.get("body", b""), message.get("more_body", False))
            else:
                await send(message)

        return wrapped

    def slo_headers(self) -> list[tuple[bytes, bytes]]:
        headers = []
        if self.slo.ttft_ms is not None:
            headers.append((HEADER_TTFT.encode(), f"{self.slo.ttft_ms:g}".encode()))
        if self.slo.ttft_slowdown is not None:
            headers.append((b"x-slo-ttft-slowdown", f"{self.slo.ttft_slowdown:g}".encode()))
        if self.slo.tpot_ms is not None:
            headers.append((HEADER_TPOT.encode(), f"{self.slo.tpot_ms:g}".encode()))
        return headers

    async def _on_body(self, send: Send, data: bytes, more: bool) -> None:
        self.buffer += data
        out: list[bytes] = []
        while b"\n\n" in self.buffer:
            event, self.buffer = self.buffer.split(b"\n\n", 1)
            out.extend(self._on_event(event))
        if not more and self.buffer.strip():
            out.extend(self._on_event(self.buffer))
            self.buffer = b""
        if self.client_streams:
            if out or not more:
                await send({"type": "http.response.body", "body": b"".join(out), "more_body": more})
        elif not more:
            await self._send_reassembled(send)

    def _on_event(self, event: bytes) -> list[bytes]:
        """Watch one SSE event; return the events to pass on to a streaming client."""
        data = sse_data(event)
        if data is None:
            return [event + b"\n\n"]
        if data == b"[DONE]":
            return [*self._release_held(None), event + b"\n\n"]
        chunk = json.loads(data)
        if _carries_output(chunk):
            self.token_times.append(time.time())
            self.thinking.add_chunk(chunk)
        self.reassembler.add(chunk)
        if not self.client_streams:
            return []
        if chunk.get("usage") and not chunk.get("choices"):
            return self._release_held(chunk)
        if any(choice.get("finish_reason") for choice in chunk.get("choices") or []):
            released = self._release_held(None) if self.held else []
            self.held = chunk
            return released
        return [event + b"\n\n"]

    def _release_held(self, usage_chunk: dict[str, Any] | None) -> list[bytes]:
        """Emit the held finishing chunk, with the outcome on the last chunk the client gets."""
        out = []
        if self.client_wants_usage and usage_chunk is not None:
            if self.held is not None:
                out.append(_sse(self.held))
            out.append(_sse({**usage_chunk, "slo": self.outcome()}))
        elif self.held is not None:
            out.append(_sse({**self.held, "slo": self.outcome()}))
        self.held = None
        return out

    def outcome(self) -> dict[str, Any]:
        prompt_tokens = self.reassembler.prompt_tokens
        ttft_target = self.slo.ttft_target_ms(self.step_time.prefill_seconds(prompt_tokens) * 1000.0)
        result = judge(
            self.arrival, self.token_times, ttft_target, self.slo.tpot_ms,
            thinking_tpot_ms=self.slo.thinking_tpot_ms, thinking_tokens=self.thinking.end,
        )  # fmt: skip
        decision = self.decision()
        outcome = {
            "ttft_target_ms": None if ttft_target is None else round(ttft_target, 3),
            "ttft_slowdown": self.slo.ttft_slowdown,
            "tpot_target_ms": self.slo.tpot_ms,
            **result.to_json(),
            "admission": None if decision is None else _ADMISSION_WORDS[decision.admitted],
            "admission_reason": None if decision is None else decision.reason,
            # After arrival, in the order they happened: promoted, demoted, preempted, and why.
            "admission_changes": [
                {"change": notice.change, "reason": notice.reason} for notice in self.admission_changes()
            ],
        }
        if result.thinking is not None:
            # When the engine moved it to its answer's tier, as the scheduler saw its tokens.
            switched = [notice.reason for notice in self.changes if notice.change == ANSWERING]
            outcome["thinking"]["engine"] = switched[0] if switched else None
        return outcome

    async def _send_reassembled(self, send: Send) -> None:
        if self.reassembler.error is not None:
            await send_error(send, self.reassembler.error.get("code", 500), self.reassembler.error["message"])
            return
        response = {**self.reassembler.response(), "slo": self.outcome()}
        payload = json.dumps(response).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            *self.slo_headers(),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _carries_output(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or delta.get("tool_calls"):
            return True
        if delta.get("reasoning_content") or delta.get("reasoning"):
            return True
    return False


_ADMISSION_WORDS = {True: "admitted", False: "best-effort"}


def sse_data(event: bytes) -> bytes | None:
    """The payload of an SSE ``data:`` event (``b"[DONE]"`` at the end), None for any other event."""
    payload = event.strip()
    if not payload.startswith(b"data:"):
        return None
    return payload[len(b"data:") :].strip()


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def send_error(send: Send, status: int, message: str, param: str | None = None) -> None:
    error = {"message": message, "type": "BadRequestError" if status == 400 else "InternalServerError"}
    payload = json.dumps({"error": {**error, "param": param, "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
