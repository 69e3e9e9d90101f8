"""ASGI middleware in front of vLLM's OpenAI server: SLOs in, SLO outcomes out.

In: the SLO of a request comes from the headers ``x-slo-ttft-ms`` / ``x-slo-tpot-ms`` or the body
field ``"slo": {"ttft_ms": ..., "tpot_ms": ...}`` (the body wins), over the server's defaults;
the program run a stage call belongs to from ``x-slo-program*`` headers or ``slo.program``
(``requests.request_program``). They are validated (HTTP 400 naming the field) and handed to the
engine as ``vllm_xargs``.

Admission: the scheduler's decision on the request arrives as a notice (``engine/notices.py``) and is
reported with the outcome. With the admission mode ``reject`` (``sloserve serve --admission
reject``, or per request the header ``x-slo-admission`` / the body field ``slo.admission``) a
request the planner cannot promise its SLO gets HTTP 429 with the reason and a ``Retry-After``,
and the engine drops it before any step; in ``best-effort`` mode it is served from leftover
budget, unless the best-effort queue is full (``--max-queued-best-effort``): then it gets the 429.

Out: every completion reports the SLO it ran under, the admission decision and its measured
outcome in a ``"slo"`` field: in the body when not streamed, and in the final streamed chunk. To
measure TTFT of a non-streamed request, the middleware streams it from vLLM and reassembles the
response. Each completion is counted in the Prometheus metrics of ``serving/metrics.py``.
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

from sloserve.slo import SLOError
from sloserve_runtime.core.step_time import StepTimeModel, engine_profile
from sloserve_runtime.engine.notices import Notice, NoticeBoard
from sloserve_runtime.serving.exchange import Exchange, send_error
from sloserve_runtime.serving.requests import (
    COMPLETION_PATHS,
    ENV_NOTICES,
    ENV_PROFILE,
    BodyError,
    parse_body,
    request_admission,
    request_program,
    request_slo,
    server_admission,
    server_default_slo,
)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

logger = logging.getLogger(__name__)
# How long a request waits for its admission notice before it is served anyway
# (the notice is pushed as the engine takes the request, so only a stuck engine gets near this).
NOTICE_TIMEOUT_S = 10.0


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
            await send_error(send, 400, str(exc))
            return
        if not isinstance(body, dict):  # vLLM answers malformed JSON itself
            await self.app(scope, _replay(raw, receive), send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            slo = request_slo(headers, body).merged_over(self.default_slo)
            mode = request_admission(headers, body, self.default_admission)
            program = request_program(headers, body)
        except SLOError as exc:
            await send_error(send, 400, str(exc), param=exc.field)
            return
        tag = uuid.uuid4().hex
        notice = self.board.expect(tag) if self.board is not None else None
        changes = self.board.changes(tag) if self.board is not None else []
        exchange = Exchange(
            slo, arrival, body, self.step_time, tag if notice is not None else None, notice, changes, mode, program
        )
        new_raw = json.dumps(exchange.engine_body()).encode()
        new_headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        new_headers.append((b"content-length", str(len(new_raw)).encode()))
        app_scope = {**scope, "headers": new_headers}
        try:
            if notice is not None:
                await self._admit_or_reject(app_scope, new_raw, receive, send, exchange)
            else:
                await self.app(app_scope, _replay(new_raw, receive), exchange.wrap(send))
        finally:
            if self.board is not None:
                self.board.forget(tag)
            exchange.count()

    async def _admit_or_reject(
        self, scope: Scope, raw: bytes, receive: Receive, send: Send, exchange: Exchange
    ) -> None:
        """Hold the response until the admission notice comes: 429 if refused, else let it through.

        The engine refuses a request in reject mode, or in best-effort mode with its best-effort
        queue full (``slo_state.refusal``), and drops it before any step; the notice comes when the
        engine adds the request, before its first token, so holding costs an admitted request no
        time. On a refusal the app sees the client disconnect, which ends vLLM's side of it.
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
        if decision is not None and decision.refused:
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


async def _send_rejection(send: Send, decision: Notice, exchange: Exchange) -> None:
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
