"""Workload traces: programs of dependent stage calls, as the bench and the simulator replay them.

A flat request is a program of one stage. Imports no vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

from sloserve.slo import SLO
from sloserve_runtime.core.programs import ProgramCall


@dataclass(frozen=True)
class StageSpec:
    """One stage call of a program in a trace."""

    name: str  # stage name, e.g. "chat", "think", "answer", "tool-loop"
    prompt_tokens: int  # tokens of the prompt this call sends
    output_tokens: int  # tokens it generates (the bench forces this with ignore_eos)
    slo: SLO  # its objective (TTFT usually a slowdown, TPOT in ms)
    delay_s: float = 0.0  # wait after the previous stage ends (e.g. a tool's run time)
    # Leading prompt tokens the call shares with what its program sent or got before: the previous
    # call's prompt and output (a program that carries its context), or a fixed prefix every call of
    # the program starts with. A prefix cache may skip computing them.
    shared_prefix_tokens: int = 0
    # Sent together with the call before it (a fan-out, as ``asyncio.gather`` sends its calls): the
    # next call that is not waits until every call of the group has ended (the join).
    parallel: bool = False
    # Of its output, the tokens it thinks before it answers (a reasoning generation whose SLO has
    # a thinking TPOT); 0: none.
    thinking_tokens: int = 0


def call_groups(stages: tuple[StageSpec, ...]) -> list[range]:
    """The program's calls in the groups it sends at once: a call and the parallel ones after it."""
    groups: list[range] = []
    start = 0
    for index in range(1, len(stages) + 1):
        if index == len(stages) or not stages[index].parallel:
            groups.append(range(start, index))
            start = index
    return groups


@dataclass(frozen=True)
class ProgramSpec:
    """One program in a trace: when it arrives and the stages it runs one after another."""

    program_id: int
    arrival_s: float  # seconds from the start of the trace
    kind: str  # which class of the scenario it belongs to, e.g. "chatbot" in "mixed"
    stages: tuple[StageSpec, ...]
    deadline_s: float | None = None  # the whole program is due this long after it arrives (None: no deadline)


@dataclass
class StageResult:
    """What happened to one stage call: measured on the real engine or in the simulator."""

    program_id: int
    kind: str
    stage: str
    arrival: float  # when the stage call was sent (seconds, same clock as token_times)
    token_times: list[float]  # when each output token arrived
    prompt_tokens: int
    output_tokens: int  # tokens asked for
    ttft_target_ms: float | None  # resolved target (slowdowns resolved with the profile)
    tpot_target_ms: float | None
    error: str | None = None  # why the call failed, if it did
    admission: str | None = None  # the scheduler's admission decision, where it reports one
    best_effort: bool = False  # not admitted: served from leftover budget
    request_id: str | None = None  # the server's id for the call (the stream's "id"), where there is one
    thinking_tpot_ms: float | None = None  # a reasoning generation's TPOT while it thinks
    thinking_tokens: int | None = None  # its tokens through the end of its thinking, where known
    program_due: float | None = None  # when its whole program is due (same clock as token_times)


def program_call(program: ProgramSpec, stage_index: int, run_id: str, arrival: float) -> ProgramCall | None:
    """What a stage call of ``program`` tells the server of its run (``arrival``: the run's, on the
    server's clock), as the SDK does: its run, program and stage, the run's arrival and deadline.
    Which stages come next the server learns from earlier runs, as it must for a loop's turns.
    A flat request (one stage, no deadline) tells nothing."""
    if len(program.stages) == 1 and program.deadline_s is None:
        return None
    return ProgramCall(
        run_id=run_id,
        name=program.kind,
        stage=program.stages[stage_index].name,
        arrival=arrival,
        deadline_s=program.deadline_s,
    )
