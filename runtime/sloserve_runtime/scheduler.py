"""The vLLM adapter: a thin subclass of vLLM's v1 ``Scheduler`` that orders work by SLO deadlines.

It maps each engine request onto an ``SLORequestState`` (which imports no vLLM) and, before
every step, reorders vLLM's own queues; vLLM's ``schedule()`` then does the batching:

* waiting requests: earliest first-token deadline first;
* running requests: tightest next-token deadline first, so the loosest is preempted first
  when KV memory runs out.

Server-wide defaults and the step-time profile arrive as ``--additional-config
'{"sloserve": {...}}'`` (see ``SLOConfig``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from vllm.v1.core.sched.request_queue import FCFSRequestQueue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from sloserve.slo import SLO
from sloserve_runtime.slo_state import XARG_ARRIVAL, SLORequestState, slo_from_xargs
from sloserve_runtime.step_time import DEFAULT_PROFILE, StepTimeModel

CONFIG_KEY = "sloserve"


@dataclass(frozen=True)
class SLOConfig:
    """What the scheduler reads from vLLM's ``additional_config["sloserve"]``."""

    default_slo: SLO = SLO()  # applies to requests that carry no SLO of their own
    profile: str = str(DEFAULT_PROFILE)  # step-time profile used to resolve TTFT slowdowns

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> SLOConfig:
        section = (additional_config or {}).get(CONFIG_KEY, {}) if isinstance(additional_config, dict) else {}
        return cls(
            default_slo=SLO.parse(section.get("default_ttft"), section.get("default_tpot")),
            profile=section.get("profile") or str(DEFAULT_PROFILE),
        )

    def to_additional_config(self) -> dict[str, Any]:
        ttft = self.default_slo.to_json()["ttft_ms"]
        section = {"default_ttft": ttft, "default_tpot": self.default_slo.tpot_ms, "profile": self.profile}
        return {CONFIG_KEY: section}


class SLOScheduler(Scheduler):
    """vLLM v1 scheduler that serves requests in SLO-deadline order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slo_config = SLOConfig.from_additional_config(self.vllm_config.additional_config)
        self.step_time = StepTimeModel.load(self.slo_config.profile)
        self.slo_states: dict[str, SLORequestState] = {}

    def add_request(self, request: Request) -> None:
        self._state(request)
        super().add_request(request)

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

    def schedule(self, *args: Any, **kwargs: Any):  # noqa: ANN201 - vLLM's SchedulerOutput
        self._forget_finished()
        self._order_queues()
        return super().schedule(*args, **kwargs)

    def _order_queues(self) -> None:
        if isinstance(self.waiting, FCFSRequestQueue) and len(self.waiting) > 1:
            ordered = sorted(self.waiting, key=lambda request: self._state(request).waiting_key())
            self.waiting.clear()
            self.waiting.extend(ordered)
        if len(self.running) > 1:
            self.running.sort(key=lambda request: self._state(request).running_key(request.num_output_tokens))

    def _forget_finished(self) -> None:
        if len(self.slo_states) > len(self.requests):
            for request_id in [rid for rid in self.slo_states if rid not in self.requests]:
                del self.slo_states[request_id]
