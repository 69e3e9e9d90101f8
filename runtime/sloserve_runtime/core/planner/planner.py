"""The SLO planner of one engine: its settings, and the budget, admission and forecast it combines.

Both the vLLM adapter and the simulator call it through a policy (``policies.PlannerPolicy``) on
``LiveRequest`` views of their own request objects; the step pipeline (``core.step``) sets the
order of those calls. Why each setting has its default, with the figures behind it, is in
``docs/architecture.md`` (the planner's settings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sloserve_runtime.core.planner.admission import Admission
from sloserve_runtime.core.planner.budget import Budget
from sloserve_runtime.core.speculation import TierSpeculation
from sloserve_runtime.core.step_time import StepTimeModel


@dataclass
class Planner(Budget, Admission):
    """Budget and admission for one engine, from its step-time model.

    It keeps nothing from one call to the next but when its policy last turned a run away: a
    step's decisions pass from ``held_back`` to ``token_budget`` as a ``Hold``, and a feasibility
    query leaves the planner as it found it.
    """

    step_time: StepTimeModel
    max_budget: int  # the engine's own per-step token limit
    # Speculation lengths per tier; None (or a max length of 1): every decode verifies one token.
    speculation: TierSpeculation | None = None
    # Plan steps this much shorter than the tightest TPOT. Only a hair: attainment is judged on
    # windows of 10 tokens, over which an unbiased error of the step-time model averages out,
    # while every share kept back costs decode slots and prefill budget. A step planned at
    # exactly the bound would break it on clock rounding alone.
    headroom: float = 0.99
    # Window slack (``_window_bound``): the share of the TPOT each later token is planned to take
    # after a step that spends its window's slack. None: every step is bounded by one TPOT.
    window_reserve: float | None = None
    # The share of each attainment window every step keeps back (``_share``: the per-step bound,
    # window slack, the decode check of admission and ``overrun``, the forward simulation): how
    # much slower than the model ten steps in a row have lately run (online calibration's
    # ``window_margin``; 0 without).
    window_margin: float = 0.0
    # Steps in a row a decode without a TPOT target may give up to waiting prefills (``_yields``).
    max_yields: int = 4
    # Such decodes give a step up only when the admitted prompts would otherwise be late
    # (``_yield_needed``): when their first tokens, predicted with those decodes in every step
    # and this much slower than the model, would miss a deadline. None: whenever an admitted
    # prompt waits. A yield is not free: vLLM's model runner drops the decodes that sit out from
    # its persistent batch and adds them back, which slows the next step, and every step they
    # sit out is output they do not produce.
    yield_margin: float | None = 1.0
    # A prompt that would otherwise miss its first-token deadline gets a step of its own: every
    # admitted decode sits that step out (``Forecast._solo_deadline``), as long as each one's
    # attainment windows leave room for the step and its own next one. Beside many long decodes a
    # step costs far more than a short prompt does alone, and those decodes, judged over windows
    # of ten tokens, mostly run ahead of their TPOT. False: decodes with a TPOT never sit out.
    solo_prompts: bool = True
    # The prompts that check weighs: the first this many in prefill order (the rest start later,
    # and the check runs again every step, so a yield they come to need is still there for them).
    yield_lookahead: int = 8
    # With no TPOT target among the admitted decodes, a step may take this share of the tightest
    # TTFT target among the admitted running requests (``_arrival_bound``): a prompt that arrives
    # during a step waits for it. None: such steps fill the whole token budget. Every step also
    # pays the engine's fixed time, so a shorter bound costs output throughput.
    arrival_share: float | None = 0.7
    # How best-effort requests that still wait for their first token are promised their SLO once
    # room returns (``promote``): "none", "edf" (the arrival check, in deadline order) or "dp"
    # (SLOs-Serve's dynamic programme: the most requests that fit together).
    promotion: str = "edf"
    # The earliest-deadline best-effort requests weighed for promotion each step.
    promotion_candidates: int = 8
    # The engine's cap on running requests (vLLM's ``max_num_seqs``). An admitted request that
    # finds every place taken waits for one to finish, whatever the budget, so admission keeps
    # the admitted requests within it, and best-effort requests give their places up to admitted
    # ones (``make_room``). None: no cap.
    max_running: int | None = None
    # The engine's KV cache in tokens: a program run is admitted only if the KV that the admitted
    # runs will hold at once fits it (``PlannerPolicy._kv_fits``). None: not checked.
    kv_capacity_tokens: int | None = None
    # Best-effort prompts take what the admitted decodes with a TPOT leave of a step only once
    # admission has turned no program run away for this long (``Budget._best_effort_prompts``).
    # While it does, that time is not to spare: a run left best effort keeps calling, each call a
    # prompt whose chunk fills the step to its bound; the admitted decodes then get their tokens
    # half as often and stay the longer, every admitted prompt shares the steps after them with
    # more of them, admission turns more runs away, and the best-effort work grows. (Flat requests
    # bring no such calls: a refusal of one leaves the leftover as it was.) None: always, as
    # SLOs-Serve does.
    best_effort_calm_s: float | None = 30.0  # (``sloserve-nocalm``: None)
    # When the policy last turned a program run away at one of its calls (-inf: never).
    last_refusal: float = -math.inf
