"""Admission notices: the scheduler's decision on each request, carried to the HTTP front end.

The planner decides in vLLM's engine-core process (``SLOScheduler.add_request``); the client
talks to the API-server process. The scheduler pushes one small JSON notice per request over a
ZeroMQ socket (vLLM's own transport between those processes); the middleware pulls them and
matches each to its request by a tag it put into the request's ``vllm_xargs``. It reports the
decision in the response, counts it in the Prometheus metrics and, in ``reject`` mode, answers
a request that was not admitted with HTTP 429 and a ``Retry-After``. Later notices of the same
request carry what changed after arrival (promoted, demoted, preempted: ``CHANGES``), reported
and counted the same way.

Imports no vLLM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import zmq
import zmq.asyncio

logger = logging.getLogger(__name__)

XARG_TAG = "slo_tag"  # the key of the request's tag in ``vllm_xargs``


# What can happen to a request after its admission (``Notice.change``): promoted to the admitted
# requests once its SLO fits, demoted to best effort when its decode outgrows its TPOT, preempted
# so that an admitted request gets its place at the engine's cap on running requests.
PROMOTED, DEMOTED, PREEMPTED = CHANGES = ("promoted", "demoted", "preempted")
# Not a change of admission: a reasoning generation ended its thinking and runs in its answer's
# tier from then on (``Notice.change``; reported beside the admission changes, not among them).
ANSWERING = "answering"


@dataclass(frozen=True)
class Notice:
    """The scheduler's decision on one request: at arrival, or a change to it later (``change``)."""

    tag: str
    admitted: bool  # after a change: whether the request is admitted now
    reason: str
    retry_after_s: float = 0.0  # when the engine expects room again (meaningful when not admitted)
    change: str = ""  # one of CHANGES, or ANSWERING; "": the decision at arrival
    # Refused at arrival (reject mode, or the best-effort queue full): the engine dropped it before
    # any step, and the front end answers HTTP 429.
    refused: bool = False

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Notice:
        data = json.loads(raw)
        return cls(
            str(data["tag"]), bool(data["admitted"]), str(data["reason"]), float(data["retry_after_s"]),
            str(data.get("change", "")), bool(data.get("refused", False)),
        )  # fmt: skip

    @property
    def retry_after_header(self) -> str:
        """``Retry-After`` in whole seconds, at least one."""
        return str(max(1, math.ceil(self.retry_after_s)))


class NoticePublisher:
    """The engine's end: pushes notices, never blocks the scheduler (drops them if no one reads)."""

    def __init__(self, address: str) -> None:
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, 10_000)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(address)

    def publish(self, notice: Notice) -> None:
        try:
            self._socket.send(notice.to_bytes(), zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("admission notice for %s dropped: the front end is not reading", notice.tag)

    def close(self) -> None:
        self._socket.close(linger=0)


class NoticeBoard:
    """The front end's end: receives notices and hands each to the request that waits for it;
    the changes that follow the decision go to the request's list of them (``changes``).

    One board per address and process (``NoticeBoard.at``); its reader runs in the event loop of
    the first request that asks.
    """

    _boards: ClassVar[dict[str, NoticeBoard]] = {}

    def __init__(self, address: str) -> None:
        self.address = address
        self._socket = zmq.asyncio.Context.instance().socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(address)
        self._waiting: dict[str, asyncio.Future[Notice]] = {}
        self._changes: dict[str, list[Notice]] = {}  # per request in flight, in the order they came
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    def at(cls, address: str) -> NoticeBoard:
        board = cls._boards.get(address)
        if board is None:
            board = cls._boards[address] = cls(address)
        return board

    def expect(self, tag: str) -> asyncio.Future[Notice]:
        """A future that the notice for ``tag`` resolves; call before the request reaches the engine."""
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read(), name="sloserve-notices")
        future = self._waiting[tag] = asyncio.get_running_loop().create_future()
        self._changes[tag] = []
        return future

    def changes(self, tag: str) -> list[Notice]:
        """The changes to ``tag``'s admission so far: the board appends to this list as they come."""
        return self._changes.get(tag, [])

    def forget(self, tag: str) -> None:
        future = self._waiting.pop(tag, None)
        self._changes.pop(tag, None)
        if future is not None and not future.done():
            future.cancel()

    async def _read(self) -> None:
        while True:
            raw = await self._socket.recv()
            try:
                notice = Notice.from_bytes(raw)
            except (ValueError, KeyError, TypeError):
                logger.warning("ignoring a malformed admission notice: %r", raw[:200])
                continue
            if notice.change:  # after the decision (the engine pushes that first, on the same socket)
                changes = self._changes.get(notice.tag)
                if changes is not None:
                    changes.append(notice)
                continue
            future = self._waiting.pop(notice.tag, None)
            if future is not None and not future.done():
                future.set_result(notice)
