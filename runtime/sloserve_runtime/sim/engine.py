"""The simulated engine: forms each step's batch the way vLLM v1's ``Scheduler.schedule()`` does.

Each step is planned by the step pipeline the vLLM adapter runs too (``core.step.plan_step``, on
this engine as a ``StepEngine``): it orders the queues, moves requests between the classes, and
says who sits the step out and the token budget. The batching rules below are vLLM's: running
requests first, then waiting ones, chunked prefill capped by the remaining budget, and
preemption of the last running request when KV runs out.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple

from sloserve_runtime.core.planner import LiveRequest
from sloserve_runtime.core.policies import SchedulingPolicy
from sloserve_runtime.core.slo_state import REJECT, refusal
from sloserve_runtime.core.step import plan_step
from sloserve_runtime.core.step_time import attended_pairs
from sloserve_runtime.sim.config import SimConfig
from sloserve_runtime.sim.kv_cache import KVCache
from sloserve_runtime.sim.request import SimRequest
from sloserve_runtime.sim.waiting_queue import WaitingQueue


class Batch(NamedTuple):
    """One engine step: who runs, how many tokens each computes, and how long it takes."""

    requests: list[SimRequest]  # scheduled requests, in scheduling order
    tokens: list[int]  # tokens computed for each (a decode: 1 plus its drafts; a prefill: its chunk)
    drafts: list[int]  # drafted tokens each verifies (0 unless it decodes with speculation)
    seconds: float  # duration of the step: the profile's, with the config's step noise


class Engine:
    """Waiting queue, running list and KV cache of one simulated vLLM engine."""

    def __init__(self, policy: SchedulingPolicy, config: SimConfig, seed: int = 0) -> None:
        self.policy = policy
        self.config = config
        self.kv = KVCache(config.kv_capacity_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting = WaitingQueue(policy)
        self.running: list[SimRequest] = []
        # Unfinished requests the policy admitted (not best effort): all the planner weighs a new
        # arrival against, so admission under a long best-effort backlog stays cheap.
        self.admitted: dict[int, SimRequest] = {}
        # Best-effort requests that may yet be promoted (``policy.promote``): those with no output
        # whose first-token deadline has not passed; pruned each step.
        self.unpromised: list[SimRequest] = []
        self.preemptions = 0  # requests sent back to recompute, over the whole run
        # Program runs whose context's KV is held between their calls, and their cache key.
        self.holds: dict[str, int] = {}
        self.rng = random.Random(seed)  # draws which drafts are accepted: a seed gives the same run
        # Draws the step noise (``SimConfig.step_noise``), apart from the drafts' draws, so a run
        # without noise is the run it was; ``noise`` is the last step's log error (None: no step yet).
        self.noise_rng = random.Random(f"step-noise-{seed}")
        self.noise: float | None = None

    @property
    def has_work(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    def add(self, request: SimRequest, now: float) -> None:
        """A request arrives at ``now``: the policy decides on its admission, then it waits (or, refused
        in reject mode or with the best-effort queue full, it ends there with an error, as a server
        answers HTTP 429)."""
        # The planner weighs the prefill left after the prefix its program left cached, as vLLM's
        # scheduler will find it (unless it is evicted first).
        request.state.cached_tokens = self.kv.hit_tokens(request.program_index, request.cache_limit)
        decision = self.policy.admit(now, request.live(), self.admitted_requests())
        request.result.admission, request.result.best_effort = decision.reason, not decision.admitted
        if decision.admitted:
            self.admitted[id(request)] = request
        else:
            refused = refusal(
                self.config.admission, self._queued_best_effort(), self.config.max_queued_best_effort,
                midway=self.policy.midway(request.state),
            )  # fmt: skip
            if refused is not None:
                request.result.error = f"rejected (HTTP 429): {refused}; {decision.reason}"
                self._finished(request, now)
                return
            self.unpromised.append(request)
        self.waiting.push_back(request)

    def _queued_best_effort(self) -> int:
        """Best-effort requests waiting to start (0 without a bound on them: nobody asks)."""
        if self.config.max_queued_best_effort is None or self.config.admission == REJECT:
            return 0
        return sum(1 for request in self.waiting if request.state.best_effort)

    def schedule(self, now: float) -> Batch | None:
        """Form the batch of the step starting at ``now``; advance its requests' computed tokens. None: nothing runs."""
        requests: list[SimRequest] = []
        tokens: list[int] = []
        drafts: list[int] = []
        plan = plan_step(self.policy, self, now)
        budget, preempted = self._schedule_running(plan.token_budget, plan.held, requests, tokens)
        # vLLM admits no waiting request in a step that had to preempt: memory is short.
        if not preempted:
            self._schedule_waiting(budget, requests, tokens)
        if not requests:
            return None
        context_tokens = attended = 0
        for request, count in zip(requests, tokens, strict=True):
            # A decode's drafts are verified, not yet computed: only accepted ones keep their KV.
            drafted = count - 1 if request.decoding else 0
            drafts.append(drafted)
            request.computed_tokens += count - drafted
            context_tokens += request.computed_tokens
            attended += attended_pairs(count, request.computed_tokens + drafted)
        scheduled = sum(tokens)
        seconds = self.config.step_time.step_seconds(scheduled, len(requests), context_tokens, attended)
        if self.config.step_noise:
            seconds *= self._noise_factor()
        self.policy.observe_step(scheduled, len(requests), context_tokens, attended, seconds)
        return Batch(requests, tokens, drafts, seconds)

    def _noise_factor(self) -> float:
        """The next step's time over the profile's: exp of an AR(1) process of the configured spread."""
        spread, correlation = self.config.step_noise, self.config.step_noise_correlation
        if self.noise is None:  # the first step draws from the process's own spread, as every later one does
            self.noise = self.noise_rng.gauss(0.0, spread)
        else:
            fresh = self.noise_rng.gauss(0.0, spread * math.sqrt(1.0 - correlation * correlation))
            self.noise = correlation * self.noise + fresh
        return math.exp(self.noise)

    def complete(self, batch: Batch, now: float) -> list[SimRequest]:
        """End the step at ``now``: requests whose tokens are all computed sample one token each.

        Returns the requests that produced their last token; their KV blocks are freed.
        """
        finished = []
        for request, drafted in zip(batch.requests, batch.drafts, strict=True):
            if request.computed_tokens == request.num_tokens:
                if drafted:
                    accepted = self._accepted(drafted)
                    self.policy.record_acceptance(request.state, drafted, accepted)
                    for _ in range(accepted):  # each accepted draft is an output token of this step
                        request.emit_token(now)
                        request.computed_tokens += 1
                request.emit_token(now)
                if request.finished:
                    self.admitted.pop(id(request), None)
                    self._finished(request, now)
                    finished.append(request)
        if finished:
            self.running = [request for request in self.running if not request.finished]
        return finished

    def _finished(self, request: SimRequest, now: float) -> None:
        """The request ended: its blocks go back, its prefix held for its program run's next call
        if the policy holds it, and the holds of runs that ended are freed to the cache."""
        hold = self.policy.finished(request.state, now)
        self.kv.release(request, request.program_index, request.computed_tokens, hold=hold)
        if hold:
            self.holds[request.state.program.run_id] = request.program_index
        self.release_holds(now)

    def release_holds(self, now: float) -> None:
        """Free to the cache the held prefixes of the runs that ended or timed out by ``now``."""
        for run_id in self.policy.released_holds(now):
            key = self.holds.pop(run_id, None)
            if key is not None:
                self.kv.unhold(key)

    def _fits_after_holds(self, request: SimRequest) -> bool:
        """Whether ``request``, at the head of the queue, fits, once the holds of other runs have
        given way (oldest first) if it is admitted or nothing runs. A hold spares a run's next call
        its prefill; kept against a request that cannot start with nothing running, it would stall
        the engine (a run whose next call went to another replica leaves its hold until it times
        out). A best-effort request waits for the running ones to end, as for their blocks. Asked
        as the step starts the request, after the planner has made room (best effort preempted)."""
        fits = self.kv.fits(request.num_tokens, request.program_index)
        if fits or (request.state.best_effort and self.running):
            return fits
        while self._release_a_hold(request.program_index):
            if self.kv.fits(request.num_tokens, request.program_index):
                return True
        return False

    def _release_a_hold(self, keep: int) -> bool:
        """Free the oldest hold of a run other than ``keep``'s to the cache; False if there is none."""
        for run_id, key in self.holds.items():
            if key != keep:
                del self.holds[run_id]
                self.kv.unhold(key)
                return True
        return False

    # ---- the step pipeline's view of this engine (``core.step.StepEngine``) ----

    def promotion_candidates(self, now: float) -> list[LiveRequest]:
        self.unpromised = [
            request for request in self.unpromised
            if request.output_count == 0 and request.state.best_effort and request.state.first_token_deadline > now
        ]  # fmt: skip
        self.unpromised.sort(key=lambda request: request.state.first_token_deadline)
        return [request.live() for request in self.unpromised]

    def admitted_requests(self) -> list[LiveRequest]:
        return [admitted.live() for admitted in self.admitted.values()]

    def promoted(self, requests: list[LiveRequest]) -> None:
        by_state = {id(request.state): request for request in self.unpromised}
        for view in requests:
            request = by_state[id(view.state)]
            request.result.admission, request.result.best_effort = view.state.admission, False
            self.admitted[id(request)] = request
        self.waiting.rekey()  # promoted requests now sort among the admitted

    def order_queues(self) -> None:
        # The waiting queue keeps itself in the policy's order (``WaitingQueue``).
        if len(self.running) > 1:
            policy = self.policy
            self.running.sort(key=lambda request: policy.running_key(request.state, request.output_count))

    def running_requests(self) -> list[LiveRequest]:
        return [request.live() for request in self.running]

    def admitted_waiting_at_cap(self) -> int:
        if not self.admitted or not len(self.waiting) or len(self.running) < self.config.max_num_seqs:
            return 0
        return len(self.admitted) - sum(1 for request in self.running if not request.state.best_effort)

    def kv_room(self) -> int | None:
        return max(0, self.kv.free_blocks - 1) * self.kv.block_size

    def admitted_kv_short(self) -> int:
        if not self.admitted or not len(self.waiting):
            return 0
        head = self.waiting.peek()
        if head.state.best_effort or self.kv.fits(head.num_tokens, head.program_index):
            return 0
        kv = self.kv
        return (kv.blocks_for(head.num_tokens) - kv.free_blocks - kv.pinned.get(head.program_index, 0)) * kv.block_size

    def preempt(self, requests: list[LiveRequest]) -> None:
        victims = {id(view.state) for view in requests}
        for request in [request for request in self.running if id(request.state) in victims]:
            self.running.remove(request)
            self._preempt(request)  # to the front, among the best effort: admitted requests sort first

    def demoted(self, requests: list[LiveRequest]) -> None:
        demoted = {id(view.state) for view in requests}
        for request in self.running:
            if id(request.state) in demoted:
                request.result.admission, request.result.best_effort = request.state.admission, True
                self.admitted.pop(id(request), None)

    def admitted_can_start(self) -> list[LiveRequest] | None:
        head = self.waiting.peek()  # admitted requests sort first
        if head.state.best_effort or not self.kv.fits(head.num_tokens, head.program_index):
            return None
        running = {id(request) for request in self.running}
        return [request.live() for key, request in self.admitted.items() if key not in running]

    def start_prefix(self) -> int | None:
        if not len(self.waiting) or len(self.running) >= self.config.max_num_seqs:
            return None
        return self.waiting.peek().state.cached_tokens

    # ---- vLLM's batching ----

    def _accepted(self, drafted: int) -> int:
        """How many of ``drafted`` drafts verification keeps: the longest prefix that passes."""
        accepted, alpha = 0, self.config.spec_acceptance
        while accepted < drafted and self.rng.random() < alpha:
            accepted += 1
        return accepted

    def _schedule_running(
        self, budget: int, held: list[bool], requests: list[SimRequest], tokens: list[int]
    ) -> tuple[int, bool]:
        running, kv = self.running, self.kv
        preempted = False
        index = 0
        while index < len(running) and budget > 0:
            request = running[index]
            if held[index]:
                index += 1
                continue
            count = min(request.num_tokens - request.computed_tokens, budget)
            if request.decoding and self.config.num_speculative_tokens:
                # Drafts never run past the output asked for: the last token is the sampled one.
                count = min(self.policy.spec_length(request.state), budget, request.output_left)
            while not kv.allocate(request, request.computed_tokens + count):
                # A hold gives way before an admitted request, or the last one running, is preempted.
                if (not request.state.best_effort or len(running) == 1) and self._release_a_hold(request.program_index):
                    continue
                victim = running.pop()
                self._preempt(victim)
                preempted = True
                if victim is request:
                    return budget, preempted
            requests.append(request)
            tokens.append(count)
            budget -= count
            index += 1
        return budget, preempted

    def _schedule_waiting(self, budget: int, requests: list[SimRequest], tokens: list[int]) -> None:
        while budget > 0 and len(self.waiting) > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.peek()
            # vLLM's scheduler_reserve_full_isl (on by default): admit only if the whole sequence
            # to compute fits in free blocks, not just its first chunk.
            if not self._fits_after_holds(request):
                return
            if request.computed_tokens == 0:  # vLLM looks up the prefix cache as a request starts
                request.computed_tokens = self.kv.claim(request, request.program_index, request.cache_limit)
            count = min(request.num_tokens - request.computed_tokens, budget)
            admitted = self.kv.allocate(request, request.computed_tokens + count)
            assert admitted, "a chunk of a sequence that fits must fit"
            self.running.append(self.waiting.pop())
            requests.append(request)
            tokens.append(count)
            budget -= count

    def _preempt(self, request: SimRequest) -> None:
        """Free the request's KV and send it to the front of the waiting queue to recompute.

        As in vLLM, its freed blocks keep their prefix: the recomputation may start from them.
        """
        self.kv.release(request, request.program_index, request.computed_tokens)
        request.shared_prefix_tokens = request.computed_tokens
        request.computed_tokens = 0
        request.state.cached_tokens = self.kv.hit_tokens(request.program_index, request.cache_limit)
        self.preemptions += 1
        self.waiting.push_front(request)
