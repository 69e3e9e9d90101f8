"""The vLLM adapter: a thin subclass of vLLM's v1 ``Scheduler`` driven by our policy and planner.

It maps each engine request onto an ``SLORequestState`` and a ``LiveRequest`` view (which import
no vLLM) and calls the policy the simulator runs too (``sloserve``: ``PlannerPolicy``):

* on arrival, admission: admitted, or best effort (served from leftover budget, preempted first);
  the decision goes to the HTTP front end as a ``Notice`` (``admission.py``), which reports it
  and, in ``reject`` mode, turns a refusal into HTTP 429;
* before every step, vLLM's own queues are reordered (waiting: admitted first, earliest
  first-token deadline first; running: admitted first, tightest next-token deadline first, so the
  last is preempted first when KV memory runs out) and the step's token budget is narrowed to the
  planner's (``max_num_scheduled_tokens`` for that one step);
* before every step, too, admitted decodes that together no longer fit their TPOT (their
  contexts grew, or calibration found the engine slower) are demoted to best effort, those with
  the most context first, until the others fit (``Planner.overrun``); each demotion is logged;

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
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.sched.request_queue import FCFSRequestQueue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from sloserve.slo import SLO
from sloserve_runtime.admission import DEMOTED, PREEMPTED, PROMOTED, XARG_TAG, Notice, NoticePublisher
from sloserve_runtime.planner import Decision, LiveRequest
from sloserve_runtime.policies import make_policy
from sloserve_runtime.server import parent_death_signal
from sloserve_runtime.slo_state import XARG_ARRIVAL, SLORequestState, slo_from_xargs
from sloserve_runtime.step_time import StepTimeModel, attended_pairs, engine_profile

CONFIG_KEY = "sloserve"
# Under vLLM's logger, so the engine's log shows our lines in its own format.
logger = init_logger(f"vllm.{__name__}")


@dataclass(frozen=True)
class SLOConfig:
    """What the scheduler reads from vLLM's ``additional_config["sloserve"]``."""

    default_slo: SLO = SLO()  # applies to requests that carry no SLO of their own
    profile: str = field(default_factory=lambda: str(engine_profile()))  # step-time profile (TTFT slowdowns)
    step_log: str | None = None  # if set, append one JSON line per engine step (features, seconds)
    policy: str = "sloserve"  # a name from ``policies.POLICIES``
    notices: str | None = None  # ZeroMQ address the front end reads admission notices from
    calibrate: bool = True  # refit the profile to the steps this engine takes (``calibration.py``)
    max_yields: int | None = None  # the planner's ``max_yields`` (None: its default)

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> SLOConfig:
        section = (additional_config or {}).get(CONFIG_KEY, {}) if isinstance(additional_config, dict) else {}
        return cls(
            default_slo=SLO.parse(section.get("default_ttft"), section.get("default_tpot")),
            profile=section.get("profile") or str(engine_profile()),
            step_log=section.get("step_log"),
            policy=section.get("policy") or "sloserve",
            notices=section.get("notices"),
            calibrate=bool(section.get("calibrate", True)),
            max_yields=section.get("max_yields"),
        )

    def to_additional_config(self) -> dict[str, Any]:
        section = {
            "default_ttft": self.default_slo.to_json()["ttft_ms"],
            "default_tpot": self.default_slo.tpot_ms,
            "profile": self.profile,
            "step_log": self.step_log,
            "policy": self.policy,
            "notices": self.notices,
            "calibrate": self.calibrate,
            "max_yields": self.max_yields,
        }
        return {CONFIG_KEY: section}


def die_with_server() -> None:
    """In vLLM's engine-core process: end it when the process that started it (the API server) dies.

    vLLM does not watch for that, so a killed server would leave its engine core, and the KV cache
    it holds, behind. If the server is already gone (the core was handed to init), exit now.
    """
    parent_death_signal(signal.SIGKILL)
    if sys.platform.startswith("linux") and os.getppid() == 1:
        os._exit(1)


class RecordingScheduler(Scheduler):
    """vLLM's v1 scheduler, deciding as vLLM does, that times each step into a step log.

    ``sloserve serve --scheduler vllm --step-log FILE`` runs this one, so stock vLLM's steps and
    token timeline can be laid beside ours; ``SLOScheduler`` builds on it. ``_schedule_step`` and
    ``_after_output`` are what a subclass changes; the timing wraps them both.
    """

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
            emitted = _emitted(outputs) if self.timeline else None
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
        )  # fmt: skip
        self.slo_states: dict[str, SLORequestState] = {}
        self._logged_fit: tuple[tuple[float, float], int] | None = None  # the calibration last logged
        self.notices = NoticePublisher(self.slo_config.notices) if self.slo_config.notices else None

    def _step_sinks(self) -> list[Callable[[dict[str, Any]], None]]:
        return super()._step_sinks() + ([self._observe_step] if self.slo_config.calibrate else [])

    def add_request(self, request: Request) -> None:
        state = self._state(request)
        state.cached_tokens = self._cached_prefix(request)
        live = [self._live(other) for other in (*self.running, *self.waiting)]
        decision = self.slo_policy.admit(time.time(), self._live(request), live)
        super().add_request(request)
        self._notify(request, decision, live)

    def _notify(self, request: Request, decision: Decision, live: list[LiveRequest]) -> None:
        """Tell the front end what was decided (requests sent through our middleware carry a tag)."""
        tag = self._tag(request)
        if tag is None:
            return
        retry_after = 0.0
        if not decision.admitted:
            # Room returns once the admitted prefills ahead are done: the planner's own estimate.
            backlog = sum(r.to_compute for r in live if not r.state.best_effort and not r.decoding)
            retry_after = self.slo_policy.step_time.prefill_seconds(backlog)
        self.notices.publish(Notice(tag, decision.admitted, decision.reason, retry_after))

    def _notify_change(self, state: SLORequestState, change: str, reason: str) -> None:
        """Tell the front end what changed for a request after its admission (``admission.CHANGES``)."""
        request = self.requests.get(state.request_id)
        tag = None if request is None else self._tag(request)
        if tag is not None:
            self.notices.publish(Notice(tag, not state.best_effort, reason, change=change))

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
        return LiveRequest.of(self._state(request), request.num_tokens, request.num_computed_tokens)

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
            request.request_id, slo, float(arrival), request.num_prompt_tokens, self.step_time
        )

    def _schedule_step(self, *args: Any, **kwargs: Any):  # noqa: ANN202 - vLLM's SchedulerOutput
        now = time.time()
        self._forget_finished()
        self._promote(now)
        self._order_queues()
        live = [self._live(request) for request in self.running]  # in running order, as the simulator gives it
        live = self._make_room(live)
        for given_up in self.slo_policy.demote(live):
            logger.info("Request %s %s", given_up.state.request_id, given_up.state.admission)
            self._notify_change(given_up.state, DEMOTED, given_up.state.admission)
        self._defer_running(live, now)  # before the budget: the policy plans the step with what it holds back
        engine_budget = self.max_num_scheduled_tokens
        can_start = bool(self.waiting) and len(self.running) < self.max_num_running_reqs
        # The request that would start: the head of the ordered queue, and what the cache holds for it.
        start_prefix = self._state(next(iter(self.waiting))).cached_tokens if can_start else 0
        self.max_num_scheduled_tokens = self.slo_policy.token_budget(live, can_start, now, start_prefix)
        try:
            return super()._schedule_step(*args, **kwargs)
        finally:
            self.max_num_scheduled_tokens = engine_budget

    def _promote(self, now: float) -> None:
        """Best-effort requests that still wait for their first token join the admitted ones if the
        planner can now promise them their SLO.

        The front end keeps the decision it reported at arrival; a promotion shows in the order of
        vLLM's queues and in the planner's budget.
        """
        queued = (*self.running, *self.waiting)
        candidates = [
            self._live(request) for request in queued
            if self._state(request).best_effort and request.num_output_tokens == 0
            and self._state(request).first_token_deadline > now
        ]  # fmt: skip
        if not candidates:
            return
        candidates.sort(key=lambda live: live.state.first_token_deadline)
        admitted = [self._live(request) for request in queued if not self._state(request).best_effort]
        for promoted in self.slo_policy.promote(now, candidates, admitted):
            self._notify_change(promoted.state, PROMOTED, promoted.state.admission)

    def _make_room(self, live: list[LiveRequest]) -> list[LiveRequest]:
        """Best-effort running requests the policy names give their places up to admitted requests
        that wait at the cap on running requests (``max_num_seqs``): preempted as vLLM preempts for
        memory, their blocks kept cached for when they resume. ``live``: the running requests'
        views, in running order; returns those of the requests that still run."""
        if not self.waiting or len(self.running) < self.max_num_running_reqs:
            return live
        waiting = sum(1 for request in self.waiting if not self._state(request).best_effort)
        if not waiting:
            return live
        victims = {id(view.state) for view in self.slo_policy.make_room(live, waiting)}
        if not victims:
            return live
        timestamp = time.monotonic()
        reason = f"preempted: its place went to an admitted request ({self.max_num_running_reqs} at once, max_num_seqs)"
        for request in [request for request in self.running if id(self._state(request)) in victims]:
            self.running.remove(request)
            self._preempt_request(request, timestamp)
            # As vLLM's reset_prefix_cache does: should it resume this step, the model runner gets
            # its tokens afresh.
            self.prev_step_scheduled_req_ids.discard(request.request_id)
            self._notify_change(self._state(request), PREEMPTED, reason)
        self._order_queues()  # vLLM put them at the front of the waiting queue: admitted requests go first
        return [view for view in live if id(view.state) not in victims]

    def _after_output(self, now: float) -> None:
        """Note when each running request's new output tokens came: the planner's window slack."""
        for request in self.running:
            state = self.slo_states.get(request.request_id)
            if state is not None and request.num_output_tokens > state.output_tokens:
                state.record_output(now, request.num_output_tokens)

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

    def _order_queues(self) -> None:
        policy = self.slo_policy
        if isinstance(self.waiting, FCFSRequestQueue) and len(self.waiting) > 1:
            ordered = sorted(self.waiting, key=lambda request: policy.waiting_key(self._state(request)))
            self.waiting.clear()
            self.waiting.extend(ordered)
        if len(self.running) > 1:
            self.running.sort(key=lambda request: policy.running_key(self._state(request), request.num_output_tokens))

    def _defer_running(self, live: list[LiveRequest], now: float) -> None:
        """Running requests the policy holds back this step are skipped by vLLM's own rule."""
        can_start = self._admitted_can_start()
        # The admitted requests that wait, for the policy to see whether their first tokens need the step.
        waiting = [self._live(r) for r in self.waiting if not self._state(r).best_effort] if can_start else None
        held = self.slo_policy.held_back(live, can_start, now, waiting)
        for request, hold in zip(self.running, held, strict=True):
            if hold:
                # schedule() advances current_step by one, then skips requests not yet eligible.
                request.next_decode_eligible_step = max(request.next_decode_eligible_step, self.current_step + 2)

    def _admitted_can_start(self) -> bool:
        """An admitted request heads the (ordered) waiting queue and has room to start."""
        if not self.waiting or len(self.running) >= self.max_num_running_reqs:
            return False
        head = next(iter(self.waiting))  # admitted requests sort first
        if self._state(head).best_effort:
            return False
        free_tokens = self.kv_cache_manager.block_pool.get_num_free_blocks() * self.block_size
        return free_tokens >= head.num_tokens - head.num_computed_tokens

    def _forget_finished(self) -> None:
        if len(self.slo_states) > len(self.requests):
            for request_id in [rid for rid in self.slo_states if rid not in self.requests]:
                del self.slo_states[request_id]


def _emitted(outputs: dict[int, Any]) -> dict[str, int]:
    """The output tokens a step sent to the front end, per request (vLLM's ``EngineCoreOutputs``
    by client): what the step log's timeline of the engine's tokens is made of."""
    return {
        output.request_id: len(output.new_token_ids)
        for client_outputs in outputs.values() for output in client_outputs.outputs if output.new_token_ids
    }  # fmt: skip


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
    ``schedule()`` to the next one's, logged only while the engine stayed busy in between (so no
    idle wait is counted). The cycle is what a client sees between tokens and what the simulator
    advances its clock by: it adds scheduling, output processing and the CPU the API server takes.
    """

    def __init__(self, sinks: list[Callable[[dict[str, Any]], None]]) -> None:
        self.sinks = sinks
        self.pending: deque[tuple[float, float, dict[str, int]]] = deque()
        self.executed_steps: deque[tuple[float, dict[str, Any]]] = deque()  # awaiting their cycle
        self.arrivals: dict[str, list[float]] = {}  # since the last step that emitted tokens

    def arrived(self, request_id: str, created: float, added: float) -> None:
        """A request reached the engine at ``added``; vLLM's front end created it at ``created``
        (both wall clock). The next step that emits tokens carries it, as ``arrived``."""
        self.arrivals[request_id] = [created, added]

    def scheduled(self, started: float, output: Any, requests: dict[str, Request]) -> None:
        """A ``schedule()`` call that began at ``started`` produced ``output``."""
        self._close_cycles(started)
        scheduled = output.num_scheduled_tokens
        if not scheduled:
            return
        # vLLM has already advanced num_computed_tokens by this step's tokens: that is the context.
        context = attended = 0
        for rid, tokens in scheduled.items():
            if rid in requests:
                context += requests[rid].num_computed_tokens
                attended += attended_pairs(tokens, requests[rid].num_computed_tokens)
        features = {
            "tokens": output.total_num_scheduled_tokens,
            "requests": len(scheduled),
            "context_tokens": context,
            "attended": attended,
        }
        self.pending.append((started, time.perf_counter(), features))

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
        if not self.pending:
            return
        started, executing, features = self.pending.popleft()
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
