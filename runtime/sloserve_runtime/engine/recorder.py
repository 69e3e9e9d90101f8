"""The step log: each engine step's features and durations, for calibration and ``sloserve profile``."""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from sloserve_runtime.core.step_time import attended_pairs


def emitted_tokens(outputs: dict[int, Any]) -> dict[str, int]:
    """The output tokens a step sent to the front end, per request (vLLM's ``EngineCoreOutputs``
    by client): what the step log's timeline of the engine's tokens is made of."""
    return {
        output.request_id: len(output.new_token_ids)
        for client_outputs in outputs.values() for output in client_outputs.outputs if output.new_token_ids
    }  # fmt: skip


def step_features(output: Any, requests: dict[str, Any]) -> dict[str, int] | None:
    """What a step computes (vLLM's ``SchedulerOutput``, just scheduled, over ``requests``), as the
    step-time model takes it; None for a step that computes nothing."""
    scheduled = output.num_scheduled_tokens
    if not scheduled:
        return None
    # vLLM has already advanced num_computed_tokens by this step's tokens: that is the context.
    context = attended = 0
    for rid, tokens in scheduled.items():
        if rid in requests:
            context += requests[rid].num_computed_tokens
            attended += attended_pairs(tokens, requests[rid].num_computed_tokens)
    return {
        "tokens": output.total_num_scheduled_tokens,
        "requests": len(scheduled),
        "context_tokens": context,
        "attended": attended,
    }


class StepLog:
    """Appends step records to a file, one JSON line each (read by ``sloserve profile``)."""

    def __init__(self, path: str) -> None:
        self.sink = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the engine

    def write(self, record: dict[str, Any]) -> None:
        self.sink.write(json.dumps(record) + "\n")


class StepRecorder:
    """Times each engine step and hands its features and durations to ``sinks``, one record per step.

    ``seconds`` is the forward pass, from the end of ``schedule()`` to the start of
    ``update_from_output()``; ``cycle_seconds`` the whole engine cycle, from this step's
    ``schedule()`` to the first one after its output, logged only while the engine stayed busy in
    between (so no idle wait is counted). The cycle is what a client sees between tokens and what
    the simulator advances its clock by: it adds scheduling, output processing and the CPU the API
    server takes. With async scheduling vLLM schedules a step while the one before it runs, so a
    step's times start no earlier than that one's output.
    """

    def __init__(self, sinks: list[Callable[[dict[str, Any]], None]]) -> None:
        self.sinks = sinks
        self.pending: deque[tuple[float, float, dict[str, int]] | None] = deque()  # None: an empty step
        self.executed_steps: deque[tuple[float, dict[str, Any]]] = deque()  # awaiting their cycle
        self.last_executed = -math.inf  # when the output of the step before came
        self.arrivals: dict[str, list[float]] = {}  # since the last step that emitted tokens

    def arrived(self, request_id: str, created: float, added: float) -> None:
        """A request reached the engine at ``added``; vLLM's front end created it at ``created``
        (both wall clock). The next step that emits tokens carries it, as ``arrived``."""
        self.arrivals[request_id] = [created, added]

    def scheduled(self, started: float, output: Any, requests: dict[str, Any]) -> None:
        """A ``schedule()`` call that began at ``started`` produced ``output``."""
        self._close_cycles(started)
        # An empty step is queued too: with async scheduling its output may come after a later
        # step was scheduled, and outputs come in the order the steps were scheduled.
        features = step_features(output, requests)
        self.pending.append(None if features is None else (started, time.perf_counter(), features))

    def executed(
        self,
        executed_at: float,
        busy_after: bool,
        emitted_at: float | None = None,
        emitted: dict[str, int] | None = None,
    ) -> None:
        """The oldest pending step's forward pass ended at ``executed_at``; ``busy_after``: work remains.

        ``emitted``: the output tokens the step sent, per request id, at ``emitted_at`` (wall clock,
        ``time.time()``, which a client on the same machine shares): the record keeps them as
        ``emitted_at`` and ``emitted``, and the requests that arrived since (``arrived``: id to
        [created by the front end, added to the engine]), so a client's times can be laid beside
        the engine's.
        """
        step = self.pending.popleft()
        previous, self.last_executed = self.last_executed, executed_at
        if step is None:
            return
        started, executing, features = step
        started, executing = max(started, previous), max(executing, previous)
        record: dict[str, Any] = {**features, "seconds": executed_at - executing}
        if emitted:
            record |= {"emitted_at": emitted_at, "emitted": emitted}
            if self.arrivals:
                record["arrived"], self.arrivals = self.arrivals, {}
        if busy_after:
            self.executed_steps.append((started, record))
        else:
            self._emit(record)

    def _close_cycles(self, now: float) -> None:
        while self.executed_steps:
            started, record = self.executed_steps.popleft()
            self._emit({**record, "cycle_seconds": now - started})

    def _emit(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink(record)
