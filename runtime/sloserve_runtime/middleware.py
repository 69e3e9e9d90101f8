"""ASGI middleware in front of vLLM's OpenAI server: SLOs in, SLO outcomes out.

In: the SLO of a request comes from the headers ``x-slo-ttft-ms`` / ``x-slo-tpot-ms`` or the body
field ``"slo": {"ttft_ms": ..., "tpot_ms": ...}`` (the body wins), over the server's defaults.
It is validated (HTTP 400 naming the field) and handed to the engine as ``vllm_xargs``.

Out: every completion reports the SLO it ran under and its measured outcome in a ``"slo"``
field: in the body when not streamed, and in the final streamed chunk. To measure TTFT of a
non-streamed request, the middleware streams it from vLLM and reassembles the response.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sloserve._reassemble import Reassembler
from sloserve.slo import SLO, SLOError, judge, parse_tpot, parse_ttft
from sloserve_runtime.slo_state import slo_to_xargs
from sloserve_runtime.step_time import DEFAULT_PROFILE, StepTimeModel

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")
HEADER_TTFT = "x-slo-ttft-ms"
HEADER_TPOT = "x-slo-tpot-ms"
# Server-wide defaults, set by `sloserve serve --slo-ttft-ms/--slo-tpot-ms` for this process.
ENV_DEFAULT_TTFT = "SLOSERVE_SLO_TTFT_MS"
ENV_DEFAULT_TPOT = "SLOSERVE_SLO_TPOT_MS"
ENV_PROFILE = "SLOSERVE_PROFILE"
_BODY_FIELDS = {"ttft_ms", "tpot_ms"}


def server_default_slo() -> SLO:
    return SLO.parse(os.environ.get(ENV_DEFAULT_TTFT), os.environ.get(ENV_DEFAULT_TPOT))


def request_slo(headers: dict[str, str], body: dict[str, Any]) -> SLO:
    """The SLO a request asks for (headers, then the body field); raises SLOError."""
    ttft_ms, ttft_slowdown = parse_ttft(headers.get(HEADER_TTFT), f"header {HEADER_TTFT}")
    tpot_ms = parse_tpot(headers.get(HEADER_TPOT), f"header {HEADER_TPOT}")
    field = body.get("slo")
    if field is not None:
        if not isinstance(field, dict):
            raise SLOError("slo", field, 'expected an object like {"ttft_ms": 300, "tpot_ms": 50}')
        unknown = sorted(set(field) - _BODY_FIELDS)
        if unknown:
            raise SLOError(f"slo.{unknown[0]}", field[unknown[0]], "unknown field; use ttft_ms and tpot_ms")
        if field.get("ttft_ms") is not None:
            ttft_ms, ttft_slowdown = parse_ttft(field["ttft_ms"], "slo.ttft_ms")
        if field.get("tpot_ms") is not None:
            tpot_ms = parse_tpot(field["tpot_ms"], "slo.tpot_ms")
    return SLO(ttft_ms=ttft_ms, ttft_slowdown=ttft_slowdown, tpot_ms=tpot_ms)


class SLOMiddleware:
    """Pure ASGI middleware; vLLM installs it with ``--middleware``."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.default_slo = server_default_slo()
        self.step_time = StepTimeModel.load(os.environ.get(ENV_PROFILE) or DEFAULT_PROFILE)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in COMPLETION_PATHS:
            await self.app(scope, receive, send)
            return
        arrival = time.time()
        raw = await _read_body(receive)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):  # vLLM answers malformed JSON itself
            await self.app(scope, _replay(raw, receive), send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            slo = request_slo(headers, body).merged_over(self.default_slo)
        except SLOError as exc:
            await _send_error(send, 400, str(exc), param=exc.field)
            return
        exchange = _Exchange(slo, arrival, body, self.step_time)
        new_raw = json.dumps(exchange.engine_body()).encode()
        new_headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        new_headers.append((b"content-length", str(len(new_raw)).encode()))
        await self.app({**scope, "headers": new_headers}, _replay(new_raw, receive), exchange.wrap(send))


class _Exchange:
    """One completion request on its way through: rewrites the body, watches the stream."""

    def __init__(self, slo: SLO, arrival: float, body: dict[str, Any], step_time: StepTimeModel) -> None:
        self.slo = slo
        self.arrival = arrival
        self.body = body
        self.step_time = step_time
        self.client_streams = bool(body.get("stream"))
        options = body.get("stream_options") or {}
        self.client_wants_usage = self.client_streams and bool(options.get("include_usage"))
        self.token_times: list[float] = []
        self.reassembler = Reassembler()
        self.status = 200
        self.buffer = b""
        self.held: dict[str, Any] | None = None  # the finishing chunk, held until usage arrives

    def engine_body(self) -> dict[str, Any]:
        body = {key: value for key, value in self.body.items() if key != "slo"}
        body["stream"] = True
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        body["vllm_xargs"] = {**(body.get("vllm_xargs") or {}), **slo_to_xargs(self.slo, self.arrival)}
        return body

    def wrap(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
                if self.status == 200 and not self.client_streams:
                    return  # sent once the whole response is reassembled
                headers = [*message.get("headers", []), *self._slo_headers()]
                await send({**message, "headers": headers})
            elif message["type"] == "http.response.body":
                if self.status != 200:
                    await send(message)
                    return
                await self._on_body(send, message.get("body", b""), message.get("more_body", False))
            else:
                await send(message)

        return wrapped

    def _slo_headers(self) -> list[tuple[bytes, bytes]]:
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
        payload = event.strip()
        if not payload.startswith(b"data:"):
            return [event + b"\n\n"]
        data = payload[len(b"data:") :].strip()
        if data == b"[DONE]":
            return [*self._release_held(None), event + b"\n\n"]
        chunk = json.loads(data)
        if _carries_output(chunk):
            self.token_times.append(time.time())
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
        result = judge(self.arrival, self.token_times, ttft_target, self.slo.tpot_ms)
        return {
            "ttft_target_ms": None if ttft_target is None else round(ttft_target, 3),
            "ttft_slowdown": self.slo.ttft_slowdown,
            "tpot_target_ms": self.slo.tpot_ms,
            **result.to_json(),
        }

    async def _send_reassembled(self, send: Send) -> None:
        if self.reassembler.error is not None:
            await _send_error(send, self.reassembler.error.get("code", 500), self.reassembler.error["message"])
            return
        response = {**self.reassembler.response(), "slo": self.outcome()}
        payload = json.dumps(response).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            *self._slo_headers(),
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


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(raw: bytes, receive: Receive) -> Receive:
    """Hand the (rewritten) body to the app once, then pass on the client's disconnect."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replay


async def _send_error(send: Send, status: int, message: str, param: str | None = None) -> None:
    error = {"message": message, "type": "BadRequestError" if status == 400 else "InternalServerError"}
    payload = json.dumps({"error": {**error, "param": param, "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
