"""Program runs as the planner sees them: which run a stage call belongs to, what the server has
learnt of each program's stages, and the work an admitted run is still expected to bring.

A program run is admitted or not as a whole, at its first stage (``PlannerPolicy.admit``): its later
stages are then admitted by right, and while it waits between stages (a tool runs, the client
reads) its context's KV is held and the KV its next stage needs is reserved
(``ProgramBook.reserved_kv``), so that a new run's first stage does not take it. Imports no vLLM.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from sloserve.slo import program_field

# Keys of the flat ``extra_args`` entries (``vllm_xargs`` over HTTP) that carry a call's program.
XARG_PROGRAM_RUN = "slo_program_run"
XARG_PROGRAM_NAME = "slo_program_name"
XARG_PROGRAM_STAGE = "slo_program_stage"
XARG_PROGRAM_ARRIVAL = "slo_program_arrival"
XARG_PROGRAM_DEADLINE = "slo_program_deadline_s"
XARG_PROGRAM_REMAINING = "slo_program_remaining"
# A stage's calls take as long as the engine's load makes them, so a run's deadline is weighed
# with how its stages' calls were served lately: a mean over all of them since the server started
# lags a rising load by as many calls as it has seen, and admits runs that end past their
# deadline (an exponential mean that weighs the last this many calls most).
RECENT_CALLS = 16
# A run that brings no call for this long after its last one ended is over: its reservation and
# any KV held for it are released (a client that stopped, or a tool that hangs).
DEFAULT_HOLD_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ProgramCall:
    """What a stage call says of the program run it belongs to (the wire's program fields)."""

    run_id: str  # the run, unique per client (the SDK sends ``<session>-<n>``)
    name: str | None = None  # the program: what the server learns its stages' lengths under
    stage: str | None = None  # this call's stage
    arrival: float | None = None  # when the run arrived (wall-clock seconds; None: its first call's arrival)
    deadline_s: float | None = None  # the whole run is due this long after its arrival (None: no deadline)
    # Stage names still expected after this call, one per call (a stage called twice more is named
    # twice); None: unknown, the server uses what it has learnt of the program's earlier runs.
    remaining: tuple[str, ...] | None = None

    def deadline(self, first_arrival: float) -> float | None:
        """When the whole run is due (wall-clock seconds), given when its first call arrived."""
        if self.deadline_s is None:
            return None
        return (first_arrival if self.arrival is None else self.arrival) + self.deadline_s

    def to_body(self) -> dict[str, object]:
        """The call's ``slo.program`` body field, as any client sends it."""
        deadline_ms = None if self.deadline_s is None else self.deadline_s * 1000.0
        return program_field(self.run_id, self.name, self.stage, self.arrival, deadline_ms, self.remaining)

    def to_xargs(self) -> dict[str, str | float | list[str]]:
        xargs: dict[str, str | float | list[str]] = {XARG_PROGRAM_RUN: self.run_id}
        for key, value in (
            (XARG_PROGRAM_NAME, self.name),
            (XARG_PROGRAM_STAGE, self.stage),
            (XARG_PROGRAM_ARRIVAL, self.arrival),
            (XARG_PROGRAM_DEADLINE, self.deadline_s),
        ):
            if value is not None:
                xargs[key] = value
        if self.remaining is not None:
            xargs[XARG_PROGRAM_REMAINING] = list(self.remaining)  # empty: none left; absent: unknown
        return xargs

    @classmethod
    def from_xargs(cls, xargs: dict | None) -> ProgramCall | None:
        xargs = xargs or {}
        run_id = xargs.get(XARG_PROGRAM_RUN)
        if not run_id:
            return None
        remaining = xargs.get(XARG_PROGRAM_REMAINING)
        if remaining is not None:
            remaining = tuple(str(name) for name in remaining)
        deadline, arrival = xargs.get(XARG_PROGRAM_DEADLINE), xargs.get(XARG_PROGRAM_ARRIVAL)
        return cls(
            run_id=str(run_id),
            name=xargs.get(XARG_PROGRAM_NAME),
            stage=xargs.get(XARG_PROGRAM_STAGE),
            arrival=None if arrival is None else float(arrival),
            deadline_s=None if deadline is None else float(deadline),
            remaining=remaining,
        )


class CallShape(NamedTuple):
    """What the engine knows of a stage call as it arrives."""

    prompt_tokens: int
    new_tokens: int  # those its prefill computes: the rest its program left in the prefix cache
    ttft_seconds: float  # its first token is due this long after it arrives (inf: no target)
    tpot_seconds: float  # inf: no target


@dataclass
class StageStats:
    """What the server has seen of one stage of one program: running means over its calls."""

    calls: int = 0
    runs: int = 0  # runs that called it at least once (its loop turns: calls / runs)
    # Groups of its calls a run had in the engine at once (a fan-out's branches are one group):
    # calls / waves is how many run side by side, and take one call's time together.
    waves: int = 0
    prompt_tokens: float = 0.0
    new_tokens: float = 0.0
    ttft_seconds: float = math.inf
    tpot_seconds: float = math.inf
    output_tokens: float = 0.0
    outputs_seen: int = 0
    # Time from a call's arrival to its end, as its last ``RECENT_CALLS`` calls or so were served
    # (0: none ended yet). It grows with the load where the lengths do not.
    seconds: float = 0.0
    gap_seconds: float = 0.0  # mean wait before a call, after the run's previous call ended
    gaps_seen: int = 0
    order: float = 0.0  # mean position of its first call in a run: the stages' learnt order

    @property
    def turns(self) -> float:
        return self.calls / self.runs if self.runs else 1.0

    @property
    def width(self) -> float:
        return self.calls / self.waves if self.waves else 1.0

    def add_call(self, shape: CallShape) -> None:
        self.calls += 1
        self.prompt_tokens += (shape.prompt_tokens - self.prompt_tokens) / self.calls
        self.new_tokens += (shape.new_tokens - self.new_tokens) / self.calls
        self.ttft_seconds, self.tpot_seconds = shape.ttft_seconds, shape.tpot_seconds

    def forecast(self, name: str, calls: float) -> ExpectedStage:
        """``calls`` more calls of this stage (``name``), as its calls so far have been."""
        return ExpectedStage(
            name, calls, round(self.prompt_tokens), round(self.new_tokens), round(self.output_tokens),
            self.ttft_seconds, self.tpot_seconds, self.gap_seconds, self.seconds, self.calls, self.width,
        )  # fmt: skip

    def add_gap(self, seconds: float) -> None:
        self.gaps_seen += 1
        self.gap_seconds += (seconds - self.gap_seconds) / self.gaps_seen

    def add_output(self, output_tokens: int, seconds: float) -> None:
        self.outputs_seen += 1
        self.output_tokens += (output_tokens - self.output_tokens) / self.outputs_seen
        self.seconds += (seconds - self.seconds) / min(self.outputs_seen, RECENT_CALLS)


class ExpectedStage(NamedTuple):
    """A stage call a run is still expected to make, as the server forecasts it."""

    name: str
    calls: float  # how many such calls (a loop's remaining turns may be fractional on average)
    prompt_tokens: int
    new_tokens: int  # of which its prefill computes these
    output_tokens: int  # 0: not yet seen
    ttft_seconds: float
    tpot_seconds: float
    gap_seconds: float  # the wait before each call (a tool's run time)
    seconds: float  # how long each call took, arrival to end, as its stage's calls were served (0: unknown)
    seen: int  # the earlier calls the forecast rests on (0: a guess from the current call)
    # How many of its calls run side by side (a fan-out's branches), on average; inf: they run
    # beside the current call (its fan-out's other branches) and add no time of their own.
    width: float = 1.0

    @property
    def context(self) -> int:
        """The KV it holds by its last token."""
        return self.prompt_tokens + self.output_tokens


@dataclass
class RunState:
    """One program run, as the book keeps it."""

    call: ProgramCall
    admitted: bool  # decided at its first stage (a promotion or a later call that fits admits it too)
    calls: int = 0  # stage calls so far
    stage_calls: dict[str, int] = field(default_factory=dict)
    live: int = 0  # its calls in the engine now
    live_stages: Counter[str] = field(default_factory=Counter)  # of which, per stage
    last_end: float | None = None  # when its last call ended (None: one is in the engine)
    last_active: float = 0.0
    first_arrival: float = 0.0  # when its first call arrived
    # Its calls still to come, as forecast at its last call. A run whose forecast is empty is
    # kept until it times out all the same: a later call of it is still a later stage.
    expected: tuple[ExpectedStage, ...] = ()
    reserved_tokens: int = 0  # KV kept for its next call while it waits between stages (``reserved_kv``)
    reserved_tpot: float | None = None  # the tightest TPOT of its calls to come, while it waits
    held: bool = False  # its context's KV was held between calls: the engine frees what is left at its end


class ProgramBook:
    """The runs in flight on one engine, and what it has learnt of each program's stages.

    Fed by the engine (``arrive`` for each tagged call, ``finish`` when it ends) and read by the
    planner (``run_of``, ``reserved_kv``). A run ends when its call that says no call follows
    ends, or ``hold_timeout`` after its last call with none since; ``released`` hands the engine
    the runs whose held KV it may free.
    """

    def __init__(self, hold_timeout: float = DEFAULT_HOLD_TIMEOUT_S) -> None:
        self.hold_timeout = hold_timeout
        # Least recently active first, so that expiry looks at the front only.
        self.runs: OrderedDict[str, RunState] = OrderedDict()
        self.stats: dict[tuple[str, str], StageStats] = {}
        self.reserved_kv = 0  # KV tokens the admitted runs between stages will need for their next call
        # Their next calls' TPOTs (seconds), as a multiset: the decodes they will bring back.
        self.reserved_tiers: Counter[float] = Counter()
        self._ended_holds: list[str] = []  # runs whose hold ended, for the engine to free

    def __len__(self) -> int:
        return len(self.runs)

    def run_of(self, call: ProgramCall | None) -> RunState | None:
        return None if call is None else self.runs.get(call.run_id)

    def expected(
        self, call: ProgramCall, shape: CallShape, calls_so_far: dict[str, int], beside: int = 0
    ) -> tuple[ExpectedStage, ...]:
        """The calls expected after this one, each with the lengths learnt for its stage (a stage
        never seen is forecast from this call, ``seen`` 0): the stages the call names, or else
        the program's stages after this one in their learnt order; and, unless named, this
        stage's loop turns left by the mean its earlier runs made, of which the branches of a
        fan-out still to join the ``beside`` calls of its stage already in the engine."""
        learnt = {stage: stats for (program, stage), stats in self.stats.items() if program == call.name}

        def forecast(name: str, calls: float) -> ExpectedStage:
            stats = learnt.get(name)
            if stats is None or not stats.calls:
                return ExpectedStage(name, calls, shape.prompt_tokens, shape.new_tokens, 0, shape.ttft_seconds,
                                     shape.tpot_seconds, 0.0, 0.0, 0)  # fmt: skip
            return stats.forecast(name, calls)

        ahead: list[ExpectedStage] = []
        current = learnt.get(call.stage) if call.stage is not None else None
        if current is not None and (call.remaining is None or call.stage not in call.remaining):
            loop_left = current.turns - calls_so_far.get(call.stage, 0) - 1
            # A fan-out's other branches go beside this call: they take no time of their own.
            siblings = min(loop_left, max(0, round(current.width) - 1 - beside))
            if siblings >= 0.5:
                ahead.append(forecast(call.stage, siblings)._replace(width=math.inf))
            if loop_left - siblings >= 0.5:
                ahead.append(forecast(call.stage, loop_left - siblings))
        if call.remaining is not None:
            counts: dict[str, int] = {}
            for name in call.remaining:
                counts[name] = counts.get(name, 0) + 1
            return (*ahead, *(forecast(name, count) for name, count in counts.items()))
        if current is not None:
            for name, stats in sorted(learnt.items(), key=lambda item: item[1].order):
                if stats.order > current.order and name != call.stage:
                    ahead.append(forecast(name, stats.turns))
        return tuple(ahead)

    def output_of(self, call: ProgramCall) -> float:
        """The mean output learnt for the call's stage (0: none seen)."""
        stats = self._stats_of(call)
        return 0.0 if stats is None else stats.output_tokens

    def _stats_of(self, call: ProgramCall) -> StageStats | None:
        return self.stats.get((call.name, call.stage)) if call.name is not None and call.stage is not None else None

    def served_seconds(self, call: ProgramCall) -> float:
        """How long the call's stage's calls have lately taken, arrival to end (0: none ended yet)."""
        stats = self._stats_of(call)
        return 0.0 if stats is None else stats.seconds

    def arrive(self, call: ProgramCall, now: float, shape: CallShape) -> tuple[ExpectedStage, ...]:
        """A call of ``call``'s run arrived: learn its lengths; the calls its run still expects."""
        self.expire(now)
        run = self.runs.get(call.run_id)
        calls_so_far = {} if run is None else run.stage_calls
        if call.name is not None and call.stage is not None:
            stats = self.stats.setdefault((call.name, call.stage), StageStats())
            if call.stage not in calls_so_far:
                stats.runs += 1
                position = 0 if run is None else run.calls
                stats.order += (position - stats.order) / stats.runs
            stats.add_call(shape)
            if run is None or not run.live_stages[call.stage]:  # else a branch beside one in the engine
                stats.waves += 1
            if run is not None and run.last_end is not None:
                stats.add_gap(now - run.last_end)
        beside = 0 if run is None else run.live_stages[call.stage or ""]
        expected = self.expected(call, shape, calls_so_far, beside)
        if run is not None:
            self._unreserve(run)
            run.calls += 1
            run.stage_calls[call.stage or ""] = run.stage_calls.get(call.stage or "", 0) + 1
            run.live += 1
            run.live_stages[call.stage or ""] += 1
            run.last_end, run.last_active, run.expected = None, now, expected
            self.runs.move_to_end(call.run_id)
        return expected

    def decided(self, call: ProgramCall, admitted: bool, now: float, expected: tuple[ExpectedStage, ...]) -> None:
        """The first call of a run was decided: the run is admitted (or not) as a whole."""
        self.runs[call.run_id] = RunState(
            call, admitted, calls=1, stage_calls={call.stage or "": 1}, live=1,
            live_stages=Counter({call.stage or "": 1}), last_active=now, first_arrival=now, expected=expected,
        )  # fmt: skip

    def promoted(self, call: ProgramCall | None) -> None:
        """A call of a run left best effort was admitted (promoted, or a later call that fits): the
        run is kept from here on."""
        run = self.run_of(call)
        if run is not None:
            run.admitted = True

    def finish(self, call: ProgramCall, now: float, output_tokens: int, arrival: float | None = None) -> bool:
        """A call of the run ended at ``now`` with ``output_tokens`` tokens: learn its output.

        True: the engine should hold the call's prefix for the run's next call (an admitted run
        with calls still expected; the run is over if the call said no call follows).
        """
        if call.name is not None and call.stage is not None:
            stats = self.stats.get((call.name, call.stage))
            if stats is not None and output_tokens > 0:
                stats.add_output(output_tokens, 0.0 if arrival is None else now - arrival)
        run = self.runs.get(call.run_id)
        if run is None:
            return False
        run.live = max(0, run.live - 1)
        run.live_stages[call.stage or ""] -= 1
        run.last_active = now
        self.runs.move_to_end(call.run_id)
        if run.live:
            return False
        run.last_end = now
        if call.remaining == ():  # the client says no call follows: the run is over
            self._end(call.run_id)
            return False
        if not run.admitted or not run.expected:
            return False
        self._unreserve(run)
        run.expected = tuple(self._refreshed(call.name, stage) for stage in run.expected)
        upcoming = max(run.expected, key=lambda stage: stage.context)
        run.reserved_tokens = upcoming.context
        run.reserved_tpot = min(stage.tpot_seconds for stage in run.expected)
        self.reserved_kv += run.reserved_tokens
        self.reserved_tiers[run.reserved_tpot] += 1
        run.held = True
        return True

    def _refreshed(self, program: str | None, stage: ExpectedStage) -> ExpectedStage:
        """``stage`` forecast again with what its stage's calls have taught since (its output, say)."""
        stats = self.stats.get((program, stage.name)) if program is not None else None
        if stats is None or not stats.calls:
            return stage
        return stats.forecast(stage.name, stage.calls)

    def expire(self, now: float) -> None:
        """End the runs whose hold timed out (``hold_timeout`` with none of their calls in the engine)."""
        while self.runs:
            run_id, run = next(iter(self.runs.items()))
            if run.live or now - run.last_active <= self.hold_timeout:
                break
            self._end(run_id)

    def released(self, now: float) -> list[str]:
        """The runs whose held KV the engine may free now (ended or timed out since last asked)."""
        self.expire(now)
        ended, self._ended_holds = self._ended_holds, []
        return ended

    def _end(self, run_id: str) -> None:
        run = self.runs.pop(run_id)
        self._unreserve(run)
        if run.held:
            self._ended_holds.append(run_id)

    def _unreserve(self, run: RunState) -> None:
        if run.reserved_tpot is not None:
            self.reserved_tiers[run.reserved_tpot] -= 1
            if not self.reserved_tiers[run.reserved_tpot]:
                del self.reserved_tiers[run.reserved_tpot]
        self.reserved_kv -= run.reserved_tokens
        run.reserved_tokens, run.reserved_tpot = 0, None

    @property
    def reserved_calls(self) -> int:
        """The admitted runs between stages: each will bring a call back."""
        return sum(self.reserved_tiers.values())


def tightest(stages: Sequence[ExpectedStage]) -> tuple[float, int]:
    """The tightest TPOT and the most context among ``stages`` (the one place they take in turn)."""
    return min(stage.tpot_seconds for stage in stages), max(stage.context for stage in stages)


def expected_seconds(stages: Sequence[ExpectedStage]) -> float | None:
    """How long ``stages`` take, each call its wait and its duration as its stage's calls were
    served, a fan-out's branches side by side (the join waits for one call's time, not their
    sum); None if a stage has none ended yet: a deadline is not judged on a guess."""
    if any(stage.seconds <= 0 for stage in stages):
        return None
    return sum(stage.calls / stage.width * (stage.gap_seconds + stage.seconds) for stage in stages)


def call_due(deadline: float | None, after: Sequence[ExpectedStage]) -> float | None:
    """When a call must end for the calls ``after`` it to end by the run's ``deadline``: for a
    fan-out's branch, the latest its join may start (None: no deadline, or no learnt durations)."""
    rest = expected_seconds(after) if deadline is not None else None
    return None if rest is None else deadline - rest
