"""The vLLM adapter: a thin subclass of vLLM's v1 ``Scheduler`` driven by our policy and planner.

It maps each engine request onto an ``SLORequestState`` and a ``LiveRequest`` view (which import
no vLLM) and calls the policy the simulator runs too (``sloserve``: ``PlannerPolicy``):

* on arrival, admission: admitted, or best effort (served from leftover budget, preempted first);
  the decision goes to the HTTP front end as a ``Notice`` (``notices.py``), which reports it
  and, in ``reject`` mode, turns a refusal into HTTP 429;
* before every step, the step pipeline (``core.step.plan_step``, the same code the simulator
  runs) promotes best effort that fits now, reorders vLLM's own queues (waiting: admitted first,
  earliest first-token deadline first; running: admitted first, tightest next-token deadline
  first, so the last is preempted first when KV memory runs out), preempts best effort for
  admitted requests at the cap on running requests, demotes admitted decodes that no longer fit
  their TPOT, and plans who sits the step out and the step's token budget. ``_StepView`` is this
  engine as the pipeline sees it; the adapter applies the plan: holds as vLLM's own
  ``next_decode_eligible_step``, the budget as ``max_num_scheduled_tokens`` for that one step.

vLLM's ``schedule()`` then does the batching.

With speculative decoding on (vLLM's ``--speculative-config``, e.g. n-gram), the drafts of each
request are cut to its tier's speculation length, which the policy chooses as the simulator's
does (``speculation.py``): the shortest that keeps the tier's TPOT with room to spare at the
acceptance rate measured for that tier, raised to the length with the least marginal step time
per token where drafts are cheap beside a request's cost (so on a CPU loose tiers leave the
compute to tight ones, and on a GPU every tier drafts).

Server-wide defaults, the step-time profile and an optional step log (for ``sloserve profile``)
arrive as ``--additional-config '{"sloserve": {...}}'`` (see ``SLOConfig``). The step log is
written by ``RecordingScheduler``, the base of ``SLOScheduler``; on its own it is vLLM's stock
scheduler, deciding unchanged, with its steps timed (``sloserve serve --scheduler vllm --step-log``).

Where vLLM schedules asynchronously (its default on a GPU build; never on a CPU), each step is
scheduled while the one before it runs: vLLM names the same class, and its constructor builds the
variant on vLLM's ``AsyncScheduler`` (``AsyncSLOScheduler``, ``AsyncRecordingScheduler``). Ours
then decides as of the end of the step in flight, as the synchronous one does after its output:
its tokens (vLLM's output placeholders) count as come, at the time the step-time model predicts
for it, and the requests whose last token it brings are gone.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import FCFSRequestQueue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
from vllm.v1.request import Request, RequestStatus

from sloserve_runtime.core.planner import Decision, LiveRequest
from sloserve_runtime.core.policies import make_policy
from sloserve_runtime.core.programs import ProgramCall
from sloserve_runtime.core.slo_state import XARG_ADMISSION, XARG_ARRIVAL, SLORequestState, refusal, slo_from_xargs
from sloserve_runtime.core.step import plan_step
from sloserve_runtime.core.step_time import StepTimeModel
from sloserve_runtime.engine.config import SLOConfig
from sloserve_runtime.engine.lifecycle import die_with_server
from sloserve_runtime.engine.notices import ANSWERING, DEMOTED, PREEMPTED, PROMOTED, XARG_TAG, Notice, NoticePublisher
from sloserve_runtime.engine.reasoning import ThinkingEnd
from sloserve_runtime.engine.recorder import StepLog, StepRecorder, emitted_tokens, step_features

# Under vLLM's logger, so the engine's log shows our lines in its own format.
logger = init_logger(f"vllm.{__name__}")


class RecordingScheduler(Scheduler):
    """vLLM's v1 scheduler, deciding as vLLM does, that times each step into a step log.

    ``sloserve serve --scheduler vllm --step-log FILE`` runs this one, so stock vLLM's steps and
    token timeline can be laid beside ours; ``SLOScheduler`` builds on it. ``_schedule_step`` and
    ``_after_output`` are what a subclass changes; the timing wraps them both.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> RecordingScheduler:
        # vLLM decides whether its engine schedules asynchronously without looking at the class it
        # is given, then builds that class: with async scheduling on, the class built is the one
        # on vLLM's AsyncScheduler, which schedules a step while the one before it runs.
        if kwargs["vllm_config"].scheduler_config.async_scheduling and not issubclass(cls, AsyncScheduler):
            cls = ASYNC_VARIANTS[cls]
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        die_with_server()
        super().__init__(*args, **kwargs)
        self.slo_config = SLOConfig.from_additional_config(self.vllm_config.additional_config)
        sinks = self._step_sinks()
        self.step_recorder = StepRecorder(sinks) if sinks else None
        # The step log also lays out the engine's token timeline (calibration needs none of it).
        self.timeline = bool(self.slo_config.step_log)

    def _step_sinks(self) -> list[Callable[[dict[str, Any]], None]]:
        """Where each step's record goes."""
        return [StepLog(self.slo_config.step_log).write] if self.slo_config.step_log else []

    def add_request(self, request: Request) -> None:
        if self.timeline:
            self.step_recorder.arrived(request.request_id, request.arrival_time, time.time())
        super().add_request(request)

    def schedule(self, *args: Any, **kwargs: Any):  # noqa: ANN201 - vLLM's SchedulerOutput
        started = time.perf_counter()
        output = self._schedule_step(*args, **kwargs)
        if self.step_recorder is not None:
            self.step_recorder.scheduled(started, output, self.requests)
        return output

    def _schedule_step(self, *args: Any, **kwargs: Any):  # noqa: ANN202 - vLLM's SchedulerOutput
        return super().schedule(*args, **kwargs)

    def update_from_output(self, *args: Any, **kwargs: Any):  # noqa: ANN201 - vLLM's outputs
        executed_at = time.perf_counter()
        outputs = super().update_from_output(*args, **kwargs)
        now = time.time()
        self._after_output(now)
        if self.step_recorder is not None:
            emitted = emitted_tokens(outputs) if self.timeline else None
            self.step_recorder.executed(executed_at, self.has_unfinished_requests(), now, emitted)
        return outputs

    def _after_output(self, now: float) -> None:
        """A step's outputs are in, at wall-clock ``now``."""


class SLOScheduler(RecordingScheduler):
    """vLLM v1 scheduler that serves requests in SLO-deadline order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The profile as shipped resolves TTFT slowdowns (an SLO's meaning does not drift); the
        # policy plans with it as calibrated to the steps this engine takes.
        self.step_time = StepTimeModel.load(self.slo_config.profile)
        # With speculative decoding on, a step may verify 1 + num_spec_tokens tokens per request.
        max_spec_length = 1 + (self.num_spec_tokens or 0)
        self.slo_policy = make_policy(
            self.slo_config.policy, self.step_time, self.max_num_scheduled_tokens, max_spec_length,
            calibrate=self.slo_config.calibrate, max_yields=self.slo_config.max_yields,
            max_running=self.max_num_running_reqs,
            kv_capacity_tokens=self.kv_cache_config.num_blocks * self.block_size,
        )  # fmt: skip
        # Program runs whose context's KV blocks are held between their calls (a reference taken on
        # each, so that vLLM does not evict them), and the requests that will take them over.
        self.kv_holds: dict[str, list[Any]] = {}
        self.hold_takers: dict[str, str] = {}  # request id -> the run whose held blocks it starts from
        self.slo_states: dict[str, SLORequestState] = {}
        self._logged_fit: tuple[tuple[float, float], int] | None = None  # the calibration last logged
        self.notices = NoticePublisher(self.slo_config.notices) if self.slo_config.notices else None
        # Requests refused since the last step's outputs: the front end is told they ended.
        self.refused: list[Request] = []
        # The predicted seconds of each step scheduled whose output is not in yet (with async
        # scheduling, the one that runs while the next is planned), oldest first.
        self.in_flight_seconds: deque[float] = deque()
        self.step_view = _StepView(self)
        self.thinking_end = ThinkingEnd(self.structured_output_manager)

    def _step_sinks(self) -> list[Callable[[dict[str, Any]], None]]:
        return super()._step_sinks() + ([self._observe_step] if self.slo_config.calibrate else [])

    def add_request(self, request: Request) -> None:
        state = self._state(request)
        state.cached_tokens = self._cached_prefix(request)
        now = self._step_start()
        with self._outputs_in_flight(now):
            live = [self._live(other) for other in (*self._continuing(), *self.waiting)]
            decision = self.slo_policy.admit(now, self._live(request), live)
        if state.program is not None and state.program.run_id in self.kv_holds:
            self.hold_takers[request.request_id] = state.program.run_id
        refused = None if decision.admitted else self._refusal(request)
        super().add_request(request)
        if refused is not None:
            # Refused: the front end answers 429, and the request takes no step, KV block or place.
            self.finish_requests(request.request_id, RequestStatus.FINISHED_ABORTED)
            self.refused.append(request)
            decision = Decision(False, f"{refused}; {decision.reason}")
        self._notify(request, decision, live, refused is not None)

    def _free_request_blocks(self, request: Request) -> None:
        """vLLM frees a finished request's blocks: the policy learns it ended, and where its program
        run has calls to come, its blocks are held (a reference taken) until the run's next call
        has started from them, or the run ends or times out."""
        state = self.slo_states.get(request.request_id) if request.is_finished() else None  # not a preemption
        now = time.time()
        if state is not None:
            state.output_tokens = max(state.output_tokens, request.num_output_tokens)
        if state is not None and self.slo_policy.finished(state, now):
            self._hold(state.program.run_id, request)
        super()._free_request_blocks(request)
        for run_id in self.slo_policy.released_holds(now):
            self._unhold(run_id)

    def _hold(self, run_id: str, request: Request) -> None:
        pool = self.kv_cache_manager.block_pool
        blocks = [
            block for group in self.kv_cache_manager.get_blocks(request.request_id).blocks for block in group
            if not block.is_null and block.block_hash is not None and block.pool in (None, pool)
        ]  # fmt: skip
        self._unhold(run_id)
        if blocks:
            pool.touch(blocks)
            self.kv_holds[run_id] = blocks

    def _unhold(self, run_id: str) -> None:
        blocks = self.kv_holds.pop(run_id, None)
        if blocks:
            self.kv_cache_manager.block_pool.free_blocks(blocks)

    def _holds_give_way(self) -> None:
        """A held prefix never costs a running request its place, nor keeps an admitted request at
        the head of the queue from its KV, nor any request when nothing runs: the holds of runs
        that ended or timed out go first, then other runs' holds, oldest first, until the blocks
        are free. (vLLM would preempt a running request, or leave the head waiting, and with
        nothing running no request would end to release a hold.) A best-effort head waits for
        the running ones to end."""
        for run_id in self.slo_policy.released_holds(time.time()):
            self._unhold(run_id)
        head = next(iter(self.waiting), None)
        state = None if head is None else self.slo_states.get(head.request_id)
        own = None if state is None or state.program is None else state.program.run_id
        pool = self.kv_cache_manager.block_pool
        # A block for each running request (a decode may start one), so that none is preempted
        # for a hold; and the head's blocks, if it is admitted or nothing runs.
        needed = len(self.running)
        if head is not None and (not self.running or (state is not None and not state.best_effort)):
            needed += -(-(head.num_tokens + 1) // self.cache_config.block_size)  # at most: none of it cached
        for run_id in [run_id for run_id in self.kv_holds if run_id != own]:
            if pool.get_num_free_blocks() >= needed:
                return
            self._unhold(run_id)

    def _release_taken_holds(self) -> None:
        """A held prefix goes back to vLLM's cache once the call that starts from it holds its own
        reference (it is running), or that call ended first."""
        for request_id, run_id in list(self.hold_takers.items()):
            request = self.requests.get(request_id)
            if request is None or request.num_computed_tokens > 0 or request.is_finished():
                del self.hold_takers[request_id]
                self._unhold(run_id)

    def _refusal(self, request: Request) -> str | None:
        """Why a request the planner did not admit is refused (``slo_state.refusal``); None: it runs
        as best effort. Only a request whose front end waits for the notice can be refused: the
        middleware answers it, where a request without a tag would be left without an answer."""
        if self._tag(request) is None:
            return None
        xargs = request.sampling_params.extra_args if request.sampling_params else None
        mode = (xargs or {}).get(XARG_ADMISSION) or self.slo_config.admission
        bound = self.slo_config.max_queued_best_effort
        queued = 0 if bound is None else sum(1 for r in self.waiting if self._state(r).best_effort)
        return refusal(mode, queued, bound, midway=self.slo_policy.midway(self._state(request)))

    def _notify(self, request: Request, decision: Decision, live: list[LiveRequest], refused: bool = False) -> None:
        """Tell the front end what was decided (requests sent through our middleware carry a tag)."""
        tag = self._tag(request)
        if tag is None:
            return
        retry_after = 0.0
        if not decision.admitted:
            # Room returns once the admitted prefills ahead are done: the planner's own estimate.
            backlog = sum(r.to_compute for r in live if not r.state.best_effort and not r.decoding)
            retry_after = self.slo_policy.step_time.prefill_seconds(backlog)
        self.notices.publish(Notice(tag, decision.admitted, decision.reason, retry_after, refused=refused))

    def _notify_change(self, state: SLORequestState, change: str, reason: str) -> None:
        """Tell the front end what changed for a request after its admission (``admission.CHANGES``)."""
        request = self.requests.get(state.request_id)
        tag = None if request is None else self._tag(request)
        if tag is not None:
            self.notices.publish(Notice(tag, not state.best_effort, reason, change=change))

    def _end_thinking(self, state: SLORequestState, output_tokens: int) -> None:
        """A reasoning generation ended its thinking: it runs in its answer's tier from now on."""
        thinking_ms = state.tpot_seconds * 1000
        state.end_thinking(output_tokens)
        reason = (
            f"thinking ended after {output_tokens} tokens: TPOT {thinking_ms:g} ms, "
            f"then {state.tpot_seconds * 1000:g} ms for the answer"
        )
        self._notify_change(state, ANSWERING, reason)

    def _tag(self, request: Request) -> str | None:
        """The middleware's tag of the request, if notices go to a front end that waits for them."""
        xargs = request.sampling_params.extra_args if request.sampling_params else None
        tag = (xargs or {}).get(XARG_TAG)
        return str(tag) if self.notices is not None and tag else None

    def _observe_step(self, record: dict[str, Any]) -> None:
        """A step's features and times, from the recorder: its whole cycle calibrates the policy's model."""
        if "cycle_seconds" not in record:
            return
        refitted = self.slo_policy.observe_step(
            int(record["tokens"]), int(record["requests"]), int(record["context_tokens"]),
            int(record["attended"]), record["cycle_seconds"],
        )  # fmt: skip
        calibration = self.slo_policy.calibration
        if refitted and calibration is not None:
            fit = (round(calibration.scale, 2), round(calibration.offset * 1000, 1))
            margin = round(calibration.window_margin * 100)
            if (fit, margin) != self._logged_fit:  # a line when the fit moves, not one per refit
                self._logged_fit = (fit, margin)
                logger.info(
                    "sloserve: step-time profile %s calibrated to this engine's last %d steps: "
                    "scale %.2f, offset %+.1f ms (%d steps seen); windows planned %d %% short",
                    self.step_time.name, len(calibration.samples), *fit, calibration.steps, margin,
                )  # fmt: skip

    def _live(self, request: Request) -> LiveRequest:
        return LiveRequest.of(self._state(request), _num_tokens(request), request.num_computed_tokens)

    def _preempt_request(self, request: Request, *args: Any, **kwargs: Any) -> None:
        """vLLM sends a request back to recompute; its freed blocks keep their prefix cached."""
        super()._preempt_request(request, *args, **kwargs)
        state = self.slo_states.get(request.request_id)
        if state is not None:
            state.cached_tokens = self._cached_prefix(request)

    def _cached_prefix(self, request: Request) -> int:
        """Prompt tokens vLLM's prefix cache holds now for a request that has not started (a new
        one, or one sent back to recompute): the blocks ``schedule()`` will find when it starts,
        unless they are evicted first (read only; vLLM's own lookup happens then)."""
        manager = self.kv_cache_manager
        if not manager.prefix_cache_lookup_enabled(request) or not request.block_hashes:
            return 0
        # As vLLM's own lookup: the last token is always computed, for the logits of the next.
        _, hit, _ = manager.coordinator.find_longest_cache_hit(request.block_hashes, request.num_tokens - 1)
        return hit

    def _state(self, request: Request) -> SLORequestState:
        state = self.slo_states.get(request.request_id)
        if state is None:
            state = self.slo_states[request.request_id] = self._new_state(request)
        return state

    def _new_state(self, request: Request) -> SLORequestState:
        xargs = request.sampling_params.extra_args if request.sampling_params else None
        slo = slo_from_xargs(xargs).merged_over(self.slo_config.default_slo)
        arrival = (xargs or {}).get(XARG_ARRIVAL) or request.arrival_time or time.time()
        return SLORequestState.create(
            request.request_id, slo, float(arrival), request.num_prompt_tokens, self.step_time,
            ProgramCall.from_xargs(xargs),
        )  # fmt: skip

    def _step_start(self) -> float:
        """When the step scheduled next starts: now, or with async scheduling once the step in
        flight is done, as the policy's step-time model predicts it."""
        return time.time() + sum(self.in_flight_seconds)

    @contextmanager
    def _outputs_in_flight(self, at: float) -> Iterator[None]:
        """Decide as if the steps in flight had brought their tokens at ``at`` (vLLM's output
        placeholders, one per token it expects), as the decision would after their output with
        synchronous scheduling; their real times are recorded when they come."""
        saved = []
        for request in self.running:
            state = self.slo_states.get(request.request_id)
            if state is not None and request.num_output_placeholders:
                saved.append((state, state.output_tokens, state.token_times.copy()))
                state.record_output(at, _num_output_tokens(request))
        try:
            yield
        finally:
            for state, output_tokens, token_times in saved:
                state.output_tokens, state.token_times = output_tokens, token_times

    def _continuing(self) -> list[Request]:
        """The running requests a step may still schedule: all but those whose last token is in
        flight (with async scheduling), which vLLM schedules no more, as if they had finished."""
        return [request for request in self.running if not _ends_in_flight(request)]

    def _schedule_step(self, *args: Any, **kwargs: Any):  # noqa: ANN202 - vLLM's SchedulerOutput
        self._forget_finished()
        now = self._step_start()
        with self._outputs_in_flight(now):
            plan = plan_step(self.slo_policy, self.step_view, now)
        for request, hold in zip(self._continuing(), plan.held, strict=True):
            if hold:
                # schedule() advances current_step by one, then skips requests not yet eligible.
                request.next_decode_eligible_step = max(request.next_decode_eligible_step, self.current_step + 2)
        if self.kv_holds and (self.waiting or self.running):  # after the plan: it may reorder the queue
            self._holds_give_way()
        engine_budget = self.max_num_scheduled_tokens
        self.max_num_scheduled_tokens = plan.token_budget
        try:
            output = super()._schedule_step(*args, **kwargs)
        finally:
            self.max_num_scheduled_tokens = engine_budget
        features = step_features(output, self.requests)
        self.in_flight_seconds.append(0.0 if features is None else self.slo_policy.step_time.step_seconds(**features))
        return output

    def update_from_output(self, *args: Any, **kwargs: Any):  # noqa: ANN201 - vLLM's outputs
        """vLLM's outputs, and an aborted one for each request refused since the last step.

        A request vLLM's scheduler ends itself is otherwise never reported to the front end, which
        keeps counting it (in ``--max-num-queued-reqs`` too) until its HTTP handler is torn down; a
        refused streaming handler may wait for the garbage collector. A finished request always
        leaves one step to run (vLLM steps to clear it), so this output goes out at once.
        """
        outputs = super().update_from_output(*args, **kwargs)
        for request in self.refused:
            ended = EngineCoreOutput(request.request_id, new_token_ids=[], finish_reason=FinishReason.ABORT)
            outputs.setdefault(request.client_index, EngineCoreOutputs()).outputs.append(ended)
        self.refused.clear()
        return outputs

    def _after_output(self, now: float) -> None:
        """Note when each running request's new output tokens came: the planner's window slack."""
        self.in_flight_seconds.popleft()
        if self.hold_takers:
            self._release_taken_holds()
        for request in self.running:
            state = self.slo_states.get(request.request_id)
            if state is not None and request.num_output_tokens > state.output_tokens:
                state.record_output(now, request.num_output_tokens)
                if state.thinking and self.thinking_end.ended(request.output_token_ids):
                    self._end_thinking(state, request.num_output_tokens)

    # ---- speculative decoding per tier ----

    def update_draft_token_ids(self, draft_token_ids: Any) -> None:
        """vLLM hands over the next step's drafts; keep as many as each request's tier should verify."""
        super().update_draft_token_ids(draft_token_ids)
        for request_id in draft_token_ids.req_ids:
            request = self.requests.get(request_id)
            if request is None or not request.spec_token_ids:
                continue
            keep = self.slo_policy.spec_length(self._state(request)) - 1
            if len(request.spec_token_ids) > keep:
                request.spec_token_ids = request.spec_token_ids[:keep]

    def make_spec_decoding_stats(
        self, spec_decoding_stats: Any, num_draft_tokens: int, num_accepted_tokens: int,
        num_invalid_spec_tokens: dict[str, int] | None, request_id: str,
    ) -> Any:  # fmt: skip
        """vLLM counts one request's verified drafts: measure acceptance per tier, then count as vLLM does."""
        request = self.requests.get(request_id)
        if request is not None:
            invalid = (num_invalid_spec_tokens or {}).get(request_id, 0)
            self.slo_policy.record_acceptance(self._state(request), num_draft_tokens - invalid, num_accepted_tokens)
        return super().make_spec_decoding_stats(
            spec_decoding_stats, num_draft_tokens, num_accepted_tokens, num_invalid_spec_tokens, request_id
        )

    def _forget_finished(self) -> None:
        if len(self.slo_states) > len(self.requests):
            for request_id in [rid for rid in self.slo_states if rid not in self.requests]:
                del self.slo_states[request_id]


class _StepView:
    """``SLOScheduler``'s engine as the step pipeline sees it (``core.step.StepEngine``): views of
    vLLM's own queues, and the changes a plan makes to them, told to the front end as notices."""

    def __init__(self, scheduler: SLOScheduler) -> None:
        self.scheduler = scheduler

    def promotion_candidates(self, now: float) -> list[LiveRequest]:
        s = self.scheduler
        candidates = [
            s._live(request) for request in (*s.running, *s.waiting)
            if s._state(request).best_effort and _num_output_tokens(request) == 0
            and s._state(request).first_token_deadline > now
        ]  # fmt: skip
        candidates.sort(key=lambda live: live.state.first_token_deadline)
        return candidates

    def admitted_requests(self) -> list[LiveRequest]:
        s = self.scheduler
        return [s._live(request) for request in (*s._continuing(), *s.waiting) if not s._state(request).best_effort]

    def promoted(self, requests: list[LiveRequest]) -> None:
        # The front end keeps the decision it reported at arrival and learns of the change.
        for view in requests:
            self.scheduler._notify_change(view.state, PROMOTED, view.state.admission)

    def order_queues(self) -> None:
        s, policy = self.scheduler, self.scheduler.slo_policy
        if isinstance(s.waiting, FCFSRequestQueue) and len(s.waiting) > 1:
            ordered = sorted(s.waiting, key=lambda request: policy.waiting_key(s._state(request)))
            s.waiting.clear()
            s.waiting.extend(ordered)
        if len(s.running) > 1:
            s.running.sort(key=lambda request: policy.running_key(s._state(request), _num_output_tokens(request)))

    def running_requests(self) -> list[LiveRequest]:
        s = self.scheduler
        return [s._live(request) for request in s._continuing()]

    def admitted_waiting_at_cap(self) -> int:
        s = self.scheduler
        if not s.waiting or len(s.running) < s.max_num_running_reqs:
            return 0
        return sum(1 for request in s.waiting if not s._state(request).best_effort)

    def kv_room(self) -> int | None:
        s = self.scheduler
        return max(0, s.kv_cache_manager.block_pool.get_num_free_blocks() - 1) * s.block_size

    def admitted_kv_short(self) -> int:
        s = self.scheduler
        if not s.waiting:
            return 0
        head = next(iter(s.waiting))  # admitted requests sort first
        if s._state(head).best_effort:
            return 0
        # As vLLM's full-sequence check: the blocks its prefix cache holds are among the free ones.
        free_tokens = s.kv_cache_manager.block_pool.get_num_free_blocks() * s.block_size
        return max(0, head.num_tokens - free_tokens)

    def preempt(self, requests: list[LiveRequest]) -> None:
        """Preempted as vLLM preempts for memory, their blocks kept cached for when they resume."""
        s = self.scheduler
        victims = {id(view.state) for view in requests}
        timestamp = time.monotonic()
        reason = f"preempted: its place went to an admitted request ({s.max_num_running_reqs} at once, max_num_seqs)"
        for request in [request for request in s.running if id(s._state(request)) in victims]:
            s.running.remove(request)
            s._preempt_request(request, timestamp)
            # As vLLM's reset_prefix_cache does: should it resume this step, the model runner gets
            # its tokens afresh.
            s.prev_step_scheduled_req_ids.discard(request.request_id)
            s._notify_change(s._state(request), PREEMPTED, reason)
        self.order_queues()  # vLLM put them at the front of the waiting queue: admitted requests go first

    def demoted(self, requests: list[LiveRequest]) -> None:
        for view in requests:
            logger.info("Request %s %s", view.state.request_id, view.state.admission)
            self.scheduler._notify_change(view.state, DEMOTED, view.state.admission)

    def admitted_can_start(self) -> list[LiveRequest] | None:
        s = self.scheduler
        head = next(iter(s.waiting))  # admitted requests sort first
        if s._state(head).best_effort:
            return None
        free_tokens = s.kv_cache_manager.block_pool.get_num_free_blocks() * s.block_size
        if free_tokens < head.num_tokens - head.num_computed_tokens:
            return None
        return [s._live(request) for request in s.waiting if not s._state(request).best_effort]

    def start_prefix(self) -> int | None:
        s = self.scheduler
        if not s.waiting or len(s.running) >= s.max_num_running_reqs:
            return None
        return s._state(next(iter(s.waiting))).cached_tokens  # the head of the ordered queue


class AsyncRecordingScheduler(RecordingScheduler, AsyncScheduler):
    """``RecordingScheduler`` on vLLM's ``AsyncScheduler``: what runs where vLLM schedules asynchronously."""


class AsyncSLOScheduler(SLOScheduler, AsyncScheduler):
    """``SLOScheduler`` on vLLM's ``AsyncScheduler``: what runs where vLLM schedules asynchronously."""


# The class built for each class vLLM may be named, when its engine schedules asynchronously.
ASYNC_VARIANTS: dict[type[RecordingScheduler], type[RecordingScheduler]] = {
    RecordingScheduler: AsyncRecordingScheduler,
    SLOScheduler: AsyncSLOScheduler,
}


# With async scheduling, vLLM counts the tokens a step in flight will bring as output placeholders
# (none with synchronous scheduling): the views below count them as come.


def _num_tokens(request: Request) -> int:
    return request.num_tokens + request.num_output_placeholders


def _num_output_tokens(request: Request) -> int:
    return request.num_output_tokens + request.num_output_placeholders


def _ends_in_flight(request: Request) -> bool:
    """The step in flight brings the request's last token (max_tokens): vLLM's own test in
    ``Scheduler.schedule``, which then schedules it no more, even if all its drafts are rejected."""
    placeholders = request.num_output_placeholders
    return (
        placeholders > 0
        and request.num_computed_tokens + 2 - placeholders >= request.num_prompt_tokens + request.max_tokens
    )
