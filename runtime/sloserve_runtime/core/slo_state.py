"""Per-request SLO state and deadline arithmetic, shared by the scheduler, planner and simulator.

Imports no vLLM: the vLLM adapter maps engine requests onto this state.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from sloserve.slo import ATTAINMENT_WINDOW, SLO
from sloserve_runtime.core.programs import ProgramCall
from sloserve_runtime.core.step_time import StepTimeModel

# Keys of the per-request dict that carries an SLO into the engine (vLLM's ``extra_args``,
# the ``vllm_xargs`` body field over HTTP).
XARG_TTFT_MS = "slo_ttft_ms"
XARG_TTFT_SLOWDOWN = "slo_ttft_slowdown"
XARG_TPOT_MS = "slo_tpot_ms"
XARG_THINKING_TPOT_MS = "slo_thinking_tpot_ms"
XARG_ARRIVAL = "slo_arrival"
XARG_ADMISSION = "slo_admission"  # the request's admission mode, as the front end resolved it
# What happens to a request the planner cannot promise its SLO: served from leftover budget
# ("best-effort", SLOs-Serve's choice), or refused ("reject": HTTP 429 from a server).
ADMISSION_MODES = ("best-effort", "reject")
BEST_EFFORT, REJECT = ADMISSION_MODES
# Best-effort requests that may wait to start at once (``sloserve serve --max-queued-best-effort``).
# Under sustained overload an unbounded best-effort queue only grows: each request in it waits
# longer than the last, the server's memory grows with it, and all of it is answered, late, after
# the load passes. Past this many, a request the planner cannot promise is refused as in reject
# mode, with a Retry-After, as vLLM's ``--max-num-queued-reqs`` and Ray Serve's
# ``max_queued_requests`` bound their queues. None: no bound.
DEFAULT_MAX_QUEUED_BEST_EFFORT = 16


def refusal(mode: str, queued_best_effort: int, max_queued_best_effort: int | None, midway: bool = False) -> str | None:
    """Why a request the planner did not admit is refused (HTTP 429 from a server, no engine step);
    None: it is served as best effort.

    ``mode``: the request's admission mode; ``queued_best_effort``: the best-effort requests already
    waiting to start; ``midway``: a later stage of a program run that went on at its first: a run
    is refused at its first stage, as a whole, never midway.
    """
    if midway:
        return None
    if mode == REJECT:
        return "reject mode"
    if max_queued_best_effort is not None and queued_best_effort >= max_queued_best_effort:
        return f"best-effort queue full ({queued_best_effort} waiting to start, at most {max_queued_best_effort})"
    return None


def slo_to_xargs(slo: SLO, arrival: float | None = None) -> dict[str, float]:
    """The flat ``extra_args`` entries that carry ``slo`` (and its arrival time) to the engine."""
    xargs = {
        XARG_TTFT_MS: slo.ttft_ms,
        XARG_TTFT_SLOWDOWN: slo.ttft_slowdown,
        XARG_TPOT_MS: slo.tpot_ms,
        XARG_THINKING_TPOT_MS: slo.thinking_tpot_ms,
        XARG_ARRIVAL: arrival,
    }
    return {key: value for key, value in xargs.items() if value is not None}


def slo_from_xargs(xargs: dict | None) -> SLO:
    xargs = xargs or {}
    return SLO(
        ttft_ms=xargs.get(XARG_TTFT_MS),
        ttft_slowdown=xargs.get(XARG_TTFT_SLOWDOWN),
        tpot_ms=xargs.get(XARG_TPOT_MS),
        thinking_tpot_ms=xargs.get(XARG_THINKING_TPOT_MS),
    )


@dataclass
class SLORequestState:
    """The deadlines of one request, in seconds on the wall clock (``time.time()``)."""

    request_id: str
    arrival: float  # when the request arrived
    prompt_tokens: int  # length of the prompt
    first_token_deadline: float  # first output token due by this time (inf: no TTFT target)
    tpot_seconds: float  # each later output token due this long after the previous (inf: none)
    best_effort: bool = False  # not admitted: served from leftover budget, preempted first
    yielded_steps: int = 0  # steps in a row this decode (no TPOT target) gave up to a waiting prefill
    admission: str = "admitted"  # the planner's decision and its reason
    output_tokens: int = 0  # output tokens so far, as last recorded (``record_output``)
    # Until it starts: the prompt tokens the engine's prefix cache is expected to hold for it (an
    # earlier call of its program left them), which its prefill will not compute.
    cached_tokens: int = 0
    program: ProgramCall | None = None  # the program run it is a stage call of, if it says
    # A later stage of a program run admitted at its first stage: the run's promise rests on it.
    continues_run: bool = False
    # A reasoning generation: it runs at the thinking TPOT (``tpot_seconds``) until it ends its
    # thinking (``end_thinking``), then at this one. None: one tier throughout.
    answer_tpot_seconds: float | None = None
    # When its last output tokens came (up to one attainment window): the planner's window slack.
    token_times: deque[float] = field(default_factory=lambda: deque(maxlen=ATTAINMENT_WINDOW), repr=False)

    @classmethod
    def create(
        cls,
        request_id: str,
        slo: SLO,
        arrival: float,
        prompt_tokens: int,
        step_time: StepTimeModel,
        program: ProgramCall | None = None,
    ) -> SLORequestState:
        zero_load_ms = step_time.prefill_seconds(prompt_tokens) * 1000.0
        ttft_ms = slo.ttft_target_ms(zero_load_ms)
        tpot_seconds = math.inf if slo.tpot_ms is None else slo.tpot_ms / 1000.0
        thinking = slo.thinking_tpot_ms is not None
        return cls(
            request_id=request_id,
            arrival=arrival,
            prompt_tokens=prompt_tokens,
            first_token_deadline=math.inf if ttft_ms is None else arrival + ttft_ms / 1000.0,
            tpot_seconds=slo.thinking_tpot_ms / 1000.0 if thinking else tpot_seconds,
            program=program,
            answer_tpot_seconds=tpot_seconds if thinking else None,
        )

    @property
    def thinking(self) -> bool:
        """A reasoning generation still in its thinking tier."""
        return self.answer_tpot_seconds is not None

    def end_thinking(self, output_tokens: int) -> None:
        """The generation ended its thinking with its ``output_tokens``-th token: its later tokens
        are due at the answer's TPOT after that token's deadline, and its windows start afresh."""
        answer = self.answer_tpot_seconds
        if answer is None:
            return
        due = self.token_deadline(output_tokens)
        self.answer_tpot_seconds = None
        self.tpot_seconds = answer
        if math.isfinite(due) and math.isfinite(answer):
            self.first_token_deadline = due - output_tokens * answer
        self.token_times.clear()

    def token_deadline(self, index: int) -> float:
        """Deadline of output token ``index`` (0 is the first token): d0 + index * TPOT."""
        if index == 0:
            return self.first_token_deadline
        if math.isinf(self.tpot_seconds):
            return math.inf
        return self.first_token_deadline + index * self.tpot_seconds

    def record_output(self, now: float, output_tokens: int) -> None:
        """The request has ``output_tokens`` output tokens as of ``now``: note when the new ones came."""
        for _ in range(min(output_tokens - self.output_tokens, ATTAINMENT_WINDOW)):
            self.token_times.append(now)
        self.output_tokens = max(self.output_tokens, output_tokens)

    def window_bound(self, now: float, tpot: float, gap: float) -> float:
        """Seconds a step that starts at ``now`` may take and still bring this request's next token
        in time for every attainment window the token falls in, if each later token comes ``gap``
        after the one before (``tpot``: the TPOT to plan for). inf: no output yet, or no TPOT target.

        Attainment judges the mean gap over every window of ``ATTAINMENT_WINDOW`` gaps, so the next
        token, ``j`` tokens after an earlier one at ``t``, may come as late as ``t + W·tpot``, less
        the ``W - j`` gaps that follow it in that window. The window that starts at the first
        token is held to ``j·tpot`` instead: a request that ends before it fills is judged on that
        window alone. Tokens that came faster than ``tpot`` leave slack a step may spend; tokens
        that came late leave less than one TPOT.
        """
        if math.isinf(self.tpot_seconds) or not self.token_times:
            return math.inf
        times = self.token_times
        span = ATTAINMENT_WINDOW * tpot
        latest = math.inf
        for back, at in zip(range(len(times), 0, -1), times, strict=True):  # oldest first
            if back == self.output_tokens:
                latest = min(latest, at + back * tpot)
            else:
                latest = min(latest, at + span - (ATTAINMENT_WINDOW - back) * gap)
        return latest - now

    def next_deadline(self, output_tokens: int) -> float:
        """Deadline of the next token, given how many output tokens exist already."""
        return self.token_deadline(output_tokens)

    def waiting_key(self) -> tuple[bool, float, float]:
        """Sort key among waiting requests: admitted first, earliest first-token deadline, then arrival."""
        return (self.best_effort, self.first_token_deadline, self.arrival)

    def running_key(self, output_tokens: int) -> tuple[bool, float, float, float]:
        """Sort key among running requests: admitted first, tightest next deadline, tightest TPOT."""
        return (self.best_effort, self.next_deadline(output_tokens), self.tpot_seconds, self.arrival)
