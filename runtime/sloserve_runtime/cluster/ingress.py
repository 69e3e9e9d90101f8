"""The OpenAI-compatible front of the Ray Serve application: read a request, hand it to a replica.

Ray Serve's HTTP proxy passes each request to an ``Ingress`` replica, which

* reads its SLO, admission mode and program run the way the engine's middleware does (a bad one
  gets the same HTTP 400) and counts its prompt with the model's tokenizer,
* calls the engine deployment through its handle with a ``RoutedCall``: the request router
  (``routing.py``) picks the replica, with program affinity from ``x-slo-program`` or
  ``slo.program.id``,
* streams the replica's answer back, or reassembles it for a client that did not ask for a stream;
  the replica's middleware still reports the SLO outcome and admission.

Faults: a call whose replica fails before any output is sent again (Serve routes it to a live
replica); one that fails mid-answer ends with an error the client can read (HTTP 502, or a final
``error`` event when streamed). Ray Serve checks the replicas' health and replaces dead ones.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray.exceptions import RayError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from sloserve._reassemble import Reassembler
from sloserve.slo import SLO, SLOError
from sloserve_runtime.cluster.replica import EngineFailed, RoutedCall
from sloserve_runtime.serving.exchange import sse_data
from sloserve_runtime.serving.requests import (
    COMPLETION_PATHS,
    HEADER_ADMISSION,
    BodyError,
    parse_body,
    request_admission,
    request_program,
    request_slo,
)

logger = logging.getLogger(__name__)

ATTEMPTS = 3  # tries of a call whose replica fails before any output
# Headers that belong to one hop and are not forwarded.
_HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "accept-encoding"}


class Ingress:
    """Deployed with ``serve.deployment`` by ``deployment.build_app``; ``engines`` is the engine
    deployment's handle."""

    def __init__(self, engines: Any, model: str | None, default_slo: SLO, default_admission: str) -> None:
        self.engines = engines
        self.count_tokens = token_counter(model)
        self.default_slo = default_slo
        self.default_admission = default_admission
        self._ids = itertools.count()

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if request.method == "POST" and path in COMPLETION_PATHS:
            return await self.completion(request)
        if request.method == "GET" and path == "/v1/models":
            return Response(await self.engines.models.remote(), media_type="application/json")
        if request.method == "GET" and path == "/health":
            return JSONResponse({"status": "ok"})
        return _error(404, f"{request.method} {path} is not served here; use {' or '.join(COMPLETION_PATHS)}")

    async def completion(self, request: Request) -> Response:
        arrival = time.time()
        try:
            body = parse_body(await request.body())
        except BodyError as exc:
            return _error(400, str(exc))
        if body is None:
            return _error(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        headers = {key.lower(): value for key, value in request.headers.items()}
        try:
            slo = request_slo(headers, body).merged_over(self.default_slo)
            admission = request_admission(headers, body, self.default_admission)
            program = request_program(headers, body)
        except SLOError as exc:
            return _error(400, str(exc), exc.field)
        forward = {key: value for key, value in headers.items() if key not in _HOP_HEADERS}
        forward[HEADER_ADMISSION] = admission
        streams = bool(body.get("stream"))
        call = RoutedCall(
            request_id=f"ingress-{os.getpid()}-{next(self._ids)}",
            path=request.url.path,
            body=body if streams else {**body, "stream": True, "stream_options": {"include_usage": True}},
            headers=forward,
            arrival=arrival,
            prompt_tokens=max(1, self.count_tokens(body)),
            slo=slo,
            program=None if program is None else program.run_id,
        )
        for attempt in range(1, ATTEMPTS + 1):
            answer = self.engines.generate.options(stream=True).remote(call)
            try:
                head = await anext(answer)
            except (RayError, EngineFailed) as exc:
                logger.warning("call %s failed before any output (%s); try %d of %d", call.request_id,
                               exc, attempt, ATTEMPTS)  # fmt: skip
                continue
            if head["status"] != 200:
                content = await anext(answer, b"")
                return Response(content, head["status"], headers=head["headers"], media_type="application/json")
            if streams:
                return StreamingResponse(_relay(answer, head), media_type="text/event-stream", headers=head["headers"])
            return await _reassemble(answer, head)
        return _error(503, f"no replica could take the call in {ATTEMPTS} tries; they are restarting, retry shortly")


async def _relay(answer: Any, head: dict[str, Any]) -> AsyncIterator[bytes]:
    ended = False
    try:
        async for event in answer:
            yield event
        ended = True
    except (RayError, EngineFailed) as exc:
        message = f"replica {head['headers'].get('x-sloserve-replica')} failed mid-answer ({_short(exc)}); " \
                  "the output above is incomplete"  # fmt: skip
        yield b"data: " + json.dumps({"error": {"message": message, "type": "ReplicaFailed", "code": 502}}).encode()
        yield b"\n\n"
        ended = True
    finally:
        if not ended:  # the client went away: the replica stops, and vLLM aborts the request
            answer.cancel()


async def _reassemble(answer: AsyncIterator[bytes], head: dict[str, Any]) -> Response:
    assembled = Reassembler()
    outcome: dict[str, Any] | None = None
    try:
        async for event in answer:
            data = sse_data(event)
            if data is None or data == b"[DONE]":
                continue
            chunk = json.loads(data)
            assembled.add(chunk)
            outcome = chunk.get("slo", outcome)
    except (RayError, EngineFailed) as exc:
        replica = head["headers"].get("x-sloserve-replica")
        return _error(502, f"replica {replica} failed mid-answer ({_short(exc)}); retry the request")
    if assembled.error is not None:
        return _error(int(assembled.error.get("code") or 500), assembled.error.get("message", "engine error"))
    return JSONResponse({**assembled.response(), "slo": outcome}, headers=head["headers"])


def _short(exc: BaseException) -> str:
    """What failed, in a few words: a Ray error's text is a colored traceback of the replica."""
    cause = getattr(exc, "cause", None) or exc  # a Ray task error wraps what the replica raised
    if isinstance(cause, RayError):
        return f"{type(cause).__name__}: the replica's process ended"
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {400: "BadRequestError", 404: "NotFoundError", 429: "RateLimitError", 503: "ServiceUnavailableError"}
    body = {"error": {"message": message, "type": kind.get(status, "ServerError"), "param": param, "code": status}}
    return JSONResponse(body, status)


def token_counter(model: str | None) -> Callable[[dict[str, Any]], int]:
    """Counts a request's prompt tokens with the model's tokenizer (the chat template for messages)."""
    from transformers import AutoTokenizer

    from sloserve_runtime.serving import server

    path, _ = server.resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)

    def count(body: dict[str, Any]) -> int:
        try:
            if "messages" in body:
                ids = tokenizer.apply_chat_template(body["messages"], tokenize=True, add_generation_prompt=True)
                return len(ids)
            prompt = body.get("prompt", "")
            if isinstance(prompt, list) and all(isinstance(token, int) for token in prompt):
                return len(prompt)  # already token ids
            if isinstance(prompt, list):
                prompt = " ".join(str(part) for part in prompt)
            return len(tokenizer.encode(str(prompt)))
        except Exception:  # noqa: BLE001 - a template the tokenizer cannot apply: estimate instead
            return max(1, len(json.dumps(body.get("messages") or body.get("prompt") or "")) // 4)

    return count
