"""Planning overhead: one planning call (admission; promotion, demotion, budget, hold-back) at N live requests.

Imports no vLLM: it times the planner exactly as the adapter and the simulator call it, on
synthetic live states of a chosen size.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

from sloserve.slo import SLO
from sloserve_runtime.core.planner import LiveRequest
from sloserve_runtime.core.policies import make_policy
from sloserve_runtime.core.slo_state import SLORequestState
from sloserve_runtime.core.step_time import StepTimeModel

TIERS = (SLO.parse("5x", "100ms"), SLO.parse("5x", "50ms"), SLO.parse("3x", "100ms"))
# The same requests with a TTFT target only: no TPOT bounds a step, every first token is
# reachable, and the forward simulation walks every prefill chunk by chunk (its longest path).
# With the tiers above, many decodes overrun the 50 ms TPOT, no prefill fits, and it stops at once.
TTFT_ONLY = SLO.parse("5x", None)


@dataclass(frozen=True)
class Overhead:
    """Timings of one planning call, in milliseconds, at ``live`` requests in the engine."""

    live: int
    admit_ms: float  # median of admitting one new request, as the engine calls it
    full_check_ms: float  # median of both admission checks run to the end (no early refusal)
    step_ms: float  # median of one step's promotion of best-effort requests, budget and hold-back
    p99_ms: float  # 99th percentile of full check plus step
    walk_ms: float = 0.0  # median of the forward simulation walking every prefill (``TTFT_ONLY``)
    # Median of one step's hold-back while an admitted prompt waits beside ``TTFT_ONLY`` decodes:
    # whether they sit out is a forward simulation of the prefills with them in every step.
    yield_ms: float = 0.0

    @property
    def total_ms(self) -> float:
        """The worst path of one planning call: a full admission check plus a step."""
        return self.full_check_ms + self.step_ms


def _live_states(
    count: int, step_time: StepTimeModel, rng: random.Random, tiers: tuple[SLO, ...] = TIERS
) -> list[LiveRequest]:
    """``count`` admitted requests: three quarters decoding, the rest waiting to prefill."""
    live = []
    for index in range(count):
        prompt = rng.randint(64, 2048)
        state = SLORequestState.create(str(index), rng.choice(tiers), rng.uniform(0, 1), prompt, step_time)
        if index % 4:
            output = rng.randint(1, 256)
            for token in range(1, min(output, 12) + 1):  # its last tokens, for the window slack
                state.record_output(0.5 + 0.04 * token, output - min(output, 12) + token)
            live.append(LiveRequest(state, 1, prompt + output))
        else:
            live.append(LiveRequest(state, prompt, 0))
    return live


PROMOTION_CANDIDATES = 8  # best-effort requests waiting for a first token, weighed each step


def _best_effort_waiting(count: int, step_time: StepTimeModel, rng: random.Random, prefix: str) -> list[LiveRequest]:
    """``count`` best-effort requests that have not started, in first-token-deadline order."""
    waiting = []
    for index in range(count):
        prompt = rng.randint(64, 2048)
        state = SLORequestState.create(f"{prefix}{index}", rng.choice(TIERS), 1.0, prompt, step_time)
        state.best_effort = True
        waiting.append(LiveRequest(state, prompt, 0))
    return sorted(waiting, key=lambda r: r.state.first_token_deadline)


def measure_overhead(step_time: StepTimeModel, live: int, repeats: int = 200, seed: int = 0) -> Overhead:
    """Time the ``sloserve`` policy's planning calls with ``live`` requests in the engine."""
    rng = random.Random(seed)
    policy = make_policy("sloserve", step_time, step_time.max_num_batched_tokens)
    states = _live_states(live, step_time, rng)
    running = [r for r in states if r.decoding]
    planner = policy.planner
    walk_states = _live_states(live, step_time, random.Random(seed), (TTFT_ONLY,))
    walk_queue = [r for r in walk_states if not r.decoding]
    walk_running = [r for r in walk_states if r.decoding]
    admits, full_checks, steps, walks, yields = [], [], [], [], []
    for repeat in range(repeats):
        prompt = rng.randint(64, 2048)
        new = LiveRequest(SLORequestState.create(f"new{repeat}", rng.choice(TIERS), 1.0, prompt, step_time), prompt, 0)
        walk_new = LiveRequest(SLORequestState.create(f"walk{repeat}", TTFT_ONLY, 1.0, prompt, step_time), prompt, 0)
        # The engine's waiting requests exist before it plans: their states are not timed.
        candidates = _best_effort_waiting(PROMOTION_CANDIDATES, step_time, rng, f"be{repeat}-")
        started = time.perf_counter()
        policy.admit(1.0, new, states)
        admitted = time.perf_counter()
        # A crowded engine usually refuses at the cheap decode check; time the forward
        # simulation of the prefill queue too, as if that check had passed.
        planner._decode_fits(new, states)
        planner._prefills_fit(1.0, new, states)
        checked = time.perf_counter()
        for promoted in policy.promote(1.0, candidates, states):
            promoted.state.best_effort = True  # keep the engine's state the same for the next repeat
        planner.overrun(running)  # what ``demote`` weighs (timed without giving anything up)
        hold = policy.held_back(running, admitted_waiting=False, now=1.0)
        policy.token_budget(running, now=1.0, hold=hold)
        stepped = time.perf_counter()
        steps.append(stepped - checked)
        planner._first_tokens(1.0, [*walk_queue, walk_new], walk_states)
        walked = time.perf_counter()
        walks.append(walked - stepped)
        policy.held_back(walk_running, admitted_waiting=True, now=1.0, waiting=[*walk_queue, walk_new])
        yields.append(time.perf_counter() - walked)
        full_checks.append(checked - admitted)
        admits.append(admitted - started)
    totals = sorted(f + s for f, s in zip(full_checks, steps, strict=True))
    return Overhead(
        live=live,
        admit_ms=statistics.median(admits) * 1000,
        full_check_ms=statistics.median(full_checks) * 1000,
        step_ms=statistics.median(steps) * 1000,
        p99_ms=totals[min(len(totals) - 1, int(len(totals) * 0.99))] * 1000,
        walk_ms=statistics.median(walks) * 1000,
        yield_ms=statistics.median(yields) * 1000,
    )
