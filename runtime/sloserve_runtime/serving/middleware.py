"""ASGI middleware in front of vLLM's OpenAI server: SLOs in, SLO outcomes out.

In: the SLO of a request comes from the headers ``x-slo-ttft-ms`` / ``x-slo-tpot-ms`` or the body
field ``"slo": {"ttft_ms": ..., "tpot_ms": ...}`` (the body wins), over the server's defaults.
It is validated (HTTP 400 naming the field) and handed to the engine as ``vllm_xargs``.

Admission: the scheduler's decision on the request arrives as a notice (``admission.py``) and is
reported with the outcome. With the admission mode ``reject`` (``sloserve serve --admission
reject``, or per request the header ``x-slo-admission`` / the body field ``slo.admission``) a
request the planner cannot promise its SLO gets HTTP 429 with the reason and a ``Retry-After``,
and vLLM aborts it; in ``best-effort`` mode it is served from leftover budget.

Out: every completion reports the SLO it ran under, the admission decision and its measured
outcome in a ``"slo"`` field: in the body when not streamed, and in the final streamed chunk. To
measure TTFT of a non-streamed request, the middleware streams it from vLLM and reassembles the
response. Each completion is counted in the Prometheus metrics of ``slo_metrics.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sloserve._reassemble import Reassembler
from sloserve.slo import SLO, SLOError, judge, parse_tpot, parse_ttft
from sloserve_runtime.core.slo_state import slo_to_xargs
from sloserve_runtime.core.step_time import StepTimeModel, engine_profile
from sloserve_runtime.engine.notices import ADMISSION_MODES, BEST_EFFORT, REJECT, XARG_TAG, Notice, NoticeBoard
from sloserve_runtime.serving import metrics as slo_metrics

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

logger = logging.getLogger(__name__)

COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")
HEADER_TTFT = "x-slo-ttft-ms"
HEADER_TPOT = "x-slo-tpot-ms"
HEADER_ADMISSION = "x-slo-admission"
# Server-wide defaults, set by `sloserve serve --slo-ttft-ms/--slo-tpot-ms` for this process.
ENV_DEFAULT_TTFT = "SLOSERVE_SLO_TTFT_MS"
ENV_DEFAULT_TPOT = "SLOSERVE_SLO_TPOT_MS"
ENV_PROFILE = "SLOSERVE_PROFILE"
ENV_ADMISSION = "SLOSERVE_ADMISSION"  # `sloserve serve --admission`: best-effort or reject
ENV_NOTICES = "SLOSERVE_NOTICES"  # where the scheduler pushes admission notices (unset: none come)
_BODY_FIELDS = {"ttft_ms", "tpot_ms", "admission"}
# How long a request in reject mode waits for its admission notice before it is served anyway
# (the notice is pushed as the engine takes the request, so only a stuck engine gets near this).
NOTICE_TIMEOUT_S = 10.0


class BodyError(ValueError):
    """A request body we cannot read as JSON; the message says what was wrong and what to do."""


def parse_body(raw: bytes) -> Any:
    """The request body as JSON; None if it is not JSON at all (vLLM answers that itself).

    Raises ``BodyError`` for a body nested too deeply to parse: Python's parser gives up with
    ``RecursionError``, which unguarded became an HTTP 500 and a reset connection.
    """
    try:
        return json.loads(raw)
    except ValueError:
        return None
    except RecursionError:
        raise BodyError(
            "the request body is nested too deeply to parse as JSON; send a body whose objects and "
            "arrays nest at most a few hundred levels"
        ) from None


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


def request_admission(headers: dict[str, str], body: dict[str, Any], default: str) -> str:
    """The admission mode a request asks for (header, then ``slo.admission``) over ``default``."""
    mode = default
    field = body.get("slo") if isinstance(body.get("slo"), dict) else {}
    for value, where in (
        (headers.get(HEADER_ADMISSION), f"header {HEADER_ADMISSION}"),
        (field.get("admission"), "slo.admission"),
    ):
        if value is None:
            continue
        if not isinstance(value, str) or value.strip().lower() not in ADMISSION_MODES:
            raise SLOError(where, value, f"unknown admission mode; use one of {', '.join(ADMISSION_MODES)}")
        mode = value.strip().lower()
    return mode


def server_admission() -> str:
    mode = os.environ.get(ENV_ADMISSION) or BEST_EFFORT
    return mode if mode in ADMISSION_MODES else BEST_EFFORT


class SLOMiddleware:
    """Pure ASGI middleware; vLLM installs it with ``--middleware``."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.default_slo = server_default_slo()
        self.default_admission = server_admission()
        self.step_time = StepTimeModel.load(os.environ.get(ENV_PROFILE) or engine_profile())
        notices = os.environ.get(ENV_NOTICES)
        self.board = NoticeBoard.at(notices) if notices else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in COMPLETION_PATHS:
            await self.app(scope, receive, send)
            return
        arrival = time.time()
        raw = await _read_body(receive)
        try:
            body = parse_body(raw)
        except BodyError as exc:
            await _send_error(send, 400, str(exc))
            return
        if not isinstance(body, dict):  # vLLM answers malformed JSON itself
            await self.app(scope, _replay(raw, receive), send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            slo = request_slo(headers, body).merged_over(self.default_slo)
            mode = request_admission(headers, body, self.default_admission)
        except SLOError as exc:
            await _send_error(send, 400, str(exc), param=exc.field)
            return
        tag = uuid.uuid4().hex
        notice = self.board.expect(tag) if self.board is not None else None
        changes = self.board.changes(tag) if self.board is not None else []
        exchange = _Exchange(slo, arrival, body, self.step_time, tag if notice is not None else None, notice, changes)
        new_raw = json.dumps(exchange.engine_body()).encode()
        new_headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        new_headers.append((b"content-length", str(len(new_raw)).encode()))
        app_scope = {**scope, "headers": new_headers}
        try:
            if mode == REJECT and notice is not None:
                await self._admit_or_reject(app_scope, new_raw, receive, send, exchange)
            else:
                await self.app(app_scope, _replay(new_raw, receive), exchange.wrap(send))
        finally:
            if self.board is not None:
                self.board.forget(tag)
            exchange.count()

    async def _admit_or_reject(
        self, scope: Scope, raw: bytes, receive: Receive, send: Send, exchange: _Exchange
    ) -> None:
        """Hold the response until the admission notice comes: 429 if refused, else let it through.

        The engine runs the request meanwhile (its output is held). On a refusal the app sees the
        client disconnect, which makes vLLM abort the request.
        """
        assert exchange.notice is not None
        gone = asyncio.Event()
        held: list[Message] = []
        state = {"open": False, "rejected": False}
        inner = exchange.wrap(send)

        async def gated_send(message: Message) -> None:
            if state["rejected"]:
                raise OSError("the request was rejected; nothing more goes to the client")
            if state["open"]:
                await inner(message)
            else:
                held.append(message)

        app = asyncio.create_task(self.app(scope, _replay(raw, receive, gone), gated_send))
        await asyncio.wait({app, exchange.notice}, timeout=NOTICE_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        decision = exchange.decision()
        if decision is not None and not decision.admitted:
            state["rejected"] = True
            gone.set()
            await _send_rejection(send, decision, exchange)
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await app
            return
        if decision is None and not app.done():
            logger.warning("no admission notice within %.0fs; serving the request", NOTICE_TIMEOUT_S)
        state["open"] = True
        for message in held:
            await inner(message)
        await app


class _Exchange:
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
    ) -> None:
        self.slo = slo
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

    def count(self) -> None:
        """Count this completion in the Prometheus metrics, once it has ended."""
        changes = [notice.change for notice in self.changes]
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
        decision = self.decision()
        return {
            "ttft_target_ms": None if ttft_target is None else round(ttft_target, 3),
            "ttft_slowdown": self.slo.ttft_slowdown,
            "tpot_target_ms": self.slo.tpot_ms,
            **result.to_json(),
            "admission": None if decision is None else _ADMISSION_WORDS[decision.admitted],
            "admission_reason": None if decision is None else decision.reason,
            # After arrival, in the order they happened: promoted, demoted, preempted, and why.
            "admission_changes": [{"change": notice.change, "reason": notice.reason} for notice in self.changes],
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


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(raw: bytes, receive: Receive, gone: asyncio.Event | None = None) -> Receive:
    """Hand the (rewritten) body to the app once, then pass on the client's disconnect.

    ``gone``, once set, also reads as a disconnect: the middleware answered the client itself.
    """
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        if gone is None:
            return await receive()
        client = asyncio.ensure_future(receive())
        ours = asyncio.ensure_future(gone.wait())
        done, pending = await asyncio.wait({client, ours}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return client.result() if client in done else {"type": "http.disconnect"}

    return replay


async def _send_rejection(send: Send, decision: Notice, exchange: _Exchange) -> None:
    """HTTP 429 with the planner's reason, a ``Retry-After`` and the SLO it was asked for."""
    exchange.rejected = True
    message = f"not admitted: the server cannot meet this request's SLO now ({decision.reason}); retry later"
    error = {"message": message, "type": "RateLimitError", "param": "slo", "code": 429}
    payload = json.dumps({"error": error, "slo": {**exchange.slo.to_json(), "admission": "rejected"}}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"retry-after", decision.retry_after_header.encode()),
        (b"x-slo-admission", b"rejected"),
        *exchange.slo_headers(),
    ]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _send_error(send: Send, status: int, message: str, param: str | None = None) -> None:
    error = {"message": message, "type": "BadRequestError" if status == 400 else "InternalServerError"}
    payload = json.dumps({"error": {**error, "param": param, "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
