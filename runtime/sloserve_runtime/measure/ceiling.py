"""The work ceiling: how many programs a second any scheduler could keep on a step-time profile.

Every program met needs its work done: its prompts' new tokens computed (as if the prefix cache
held all the rest) and its output decoded, each decode token reading its whole context. A
step-time profile prices that work per token, per request in a step and per token of context,
and charges each step a fixed cost. While a call with a TPOT target of ``t`` decodes, a step
must come every ``t`` at least; near capacity such a call is always decoding, so at least
``1 / t`` steps a second (``t`` the tightest TPOT of the scenario) pay the fixed cost. What is
left of each second bounds the work done: with a share ``attainment`` of the programs met (the
rest refused before any of their work, the cheapest way to miss them),

    rate <= (1 - steps_per_second x fixed cost) / (attainment x work per program).

It leaves out queueing (a burst of arrivals must still meet its TTFT), the KV cache and the
prefill that a short step cannot hold, so under a steady load a scheduler stays below it; where a capacity is close to
it, no planner can add much. With a profile of several linear pieces (a step takes the longest),
each piece gives such a bound, and the lowest holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sloserve_runtime.core.step_time import LinearPiece, StepTimeModel, attended_pairs
from sloserve_runtime.workload.programs import ProgramSpec, StageSpec
from sloserve_runtime.workload.scenarios.spec import Scenario

SAMPLED_PROGRAMS = 2000  # programs drawn to average a scenario's work over


@dataclass(frozen=True)
class Ceiling:
    """A scenario's work ceiling on one profile."""

    work_s: float  # step time one program needs beyond the steps' fixed cost (mean over the sample)
    steps_per_s: float  # the fewest steps a second its tightest TPOT allows
    fixed_share: float  # the share of each second those steps' fixed cost takes
    rate: float  # programs/s above which the share ``attainment`` of them cannot all be met


def call_work(piece: LinearPiece, stage: StageSpec) -> float:
    """Seconds of ``piece``'s variable cost that one call needs at the least: its new prompt
    tokens in one chunk, then one token a step, each attending to its whole context."""
    new = stage.prompt_tokens - stage.shared_prefix_tokens
    prefill = (
        piece.per_token * new + piece.per_request + piece.per_context_token * stage.prompt_tokens
        + piece.per_attended_pair * attended_pairs(new, stage.prompt_tokens)
    )  # fmt: skip
    outputs = stage.output_tokens
    # Decode i (from 0) reads a context of prompt + i tokens and attends to one more.
    contexts = outputs * stage.prompt_tokens + outputs * (outputs - 1) // 2
    per_decode = piece.per_token + piece.per_request
    return (
        prefill
        + outputs * per_decode
        + piece.per_context_token * contexts
        + piece.per_attended_pair * (contexts + outputs)
    )


def tightest_tpot_s(programs: list[ProgramSpec]) -> float | None:
    """The tightest TPOT (a thinking phase's included) of any call, in seconds; None: no call has one."""
    targets = [
        target
        for program in programs
        for stage in program.stages
        for target in (stage.slo.tpot_ms, stage.slo.thinking_tpot_ms)
        if target is not None
    ]
    return min(targets) / 1000.0 if targets else None


def work_ceiling(
    scenario: Scenario, model: StepTimeModel, attainment: float = 0.9, samples: int = SAMPLED_PROGRAMS, seed: int = 0
) -> Ceiling:
    """The work ceiling of ``scenario`` on ``model``, its work the mean of ``samples`` programs.

    >>> from sloserve.slo import SLO
    >>> from sloserve_runtime.workload.scenarios.spec import Scenario
    >>> piece = LinearPiece(per_token=0.001, constant=0.01)
    >>> model = StepTimeModel("toy", (piece,))
    >>> chat = Scenario.model_validate({
    ...     "name": "chat", "description": "", "lengths_source": "",
    ...     "classes": [{"name": "chat", "stages": [{"name": "chat", "prompt": {"mean": 100, "std": 0},
    ...                                             "output": {"mean": 50, "std": 0}, "ttft": "3x", "tpot": "50ms"}]}],
    ... })
    >>> ceiling = work_ceiling(chat, model, attainment=1.0, samples=10)
    >>> round(ceiling.work_s, 3), ceiling.steps_per_s, round(ceiling.fixed_share, 2), round(ceiling.rate, 2)
    (0.15, 20.0, 0.2, 5.33)
    """
    if not 0.0 < attainment <= 1.0:
        raise ValueError(f"attainment {attainment}: give a share in (0, 1]")
    programs = scenario.trace(1.0, samples, seed=seed)
    tpot = tightest_tpot_s(programs)
    steps = 0.0 if tpot is None else 1.0 / tpot
    bounds = []
    for piece in model.pieces:
        work = sum(call_work(piece, stage) for program in programs for stage in program.stages) / len(programs)
        fixed = steps * piece.constant
        rate = max(0.0, 1.0 - fixed) / (attainment * work) if work > 0 else math.inf
        bounds.append(Ceiling(work_s=work, steps_per_s=steps, fixed_share=fixed, rate=rate))
    return min(bounds, key=lambda ceiling: ceiling.rate)
