"""Simulator configuration: the engine's limits and the step-time model it runs on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sloserve_runtime.core.slo_state import ADMISSION_MODES, BEST_EFFORT, DEFAULT_MAX_QUEUED_BEST_EFFORT
from sloserve_runtime.core.step_time import PROFILES_DIR, StepTimeModel

# Used when the profile does not state its KV capacity; large enough that KV memory never binds
# for the traces the bench replays, so such a profile simulates a compute-bound engine.
DEFAULT_KV_CAPACITY_TOKENS = 1 << 20


@dataclass(frozen=True)
class SimConfig:
    """The simulated engine: vLLM's scheduler limits plus the predictor of its step time."""

    step_time: StepTimeModel  # predicts each step's duration and resolves TTFT slowdowns
    kv_capacity_tokens: int = DEFAULT_KV_CAPACITY_TOKENS  # KV cache size (rounded down to whole blocks)
    max_num_seqs: int = 256  # vLLM's cap on running requests
    max_num_batched_tokens: int | None = None  # tokens per step; None: the profile's own chunk size
    block_size: int = 16  # tokens per KV block
    # vLLM's automatic prefix caching (on by default in vLLM v1): a program's later call, or a
    # preempted request, starts from the blocks its program left cached, if they were not evicted.
    enable_prefix_caching: bool = True
    # Speculative decoding, as vLLM's ``--speculative-config``: drafts a decode may verify per step
    # (0: off), and the chance that each draft is accepted (after all drafts before it were).
    num_speculative_tokens: int = 0
    spec_acceptance: float = 0.0
    # The profile the scheduler is given, when it is not the engine's true one (a profile measured
    # on another machine, or before the machine changed); it also resolves TTFT slowdowns, as the
    # profile a server is given does. None: the scheduler knows the true step times.
    planner_step_time: StepTimeModel | None = None
    # Whether the scheduler refits its profile to the steps the engine takes (as ``sloserve serve``
    # does by default); off, the simulated engine's figures are those of the planner's model alone.
    calibrate: bool = False
    # A real engine's steps stray from any profile, and stray together: on the CPU engine a step's
    # error is correlated 0.5-0.8 with the step before's (``docs/scripts/calibration_replay.py``).
    # The simulated engine can do the same: each step takes the profile's time times exp(x), where
    # x follows an AR(1) process with this standard deviation and this correlation from one step to
    # the next. 0: every step takes the profile's time.
    step_noise: float = 0.0
    step_noise_correlation: float = 0.0
    # The front end between a client and the engine (vLLM's API server, the HTTP stream): a call
    # reaches the engine this long after the client sent it, and each token reaches the client
    # this long after the engine emitted it (``docs/scripts/frontend_delay.py`` measures both from
    # a bench run and the server's step log). The SLO's clock starts at the send, as the server's
    # middleware stamps it; 0: the client sits at the engine.
    frontend_in_seconds: float = 0.0
    frontend_out_seconds: float = 0.0
    # What happens to a request admission refuses (``sloserve serve --admission``): served as best
    # effort, or refused at once ("reject": the HTTP 429 of a server), taking no engine step.
    admission: str = BEST_EFFORT
    # Best-effort requests that may wait to start at once; past it, a refused request is refused
    # as in reject mode (``slo_state.refusal``, the server's ``--max-queued-best-effort``). None: no bound.
    max_queued_best_effort: int | None = DEFAULT_MAX_QUEUED_BEST_EFFORT

    def __post_init__(self) -> None:
        if self.admission not in ADMISSION_MODES:
            raise ValueError(f"admission {self.admission!r}: use one of {', '.join(ADMISSION_MODES)}")
        if self.max_queued_best_effort is not None and self.max_queued_best_effort < 0:
            raise ValueError(
                f"max_queued_best_effort must be 0 or more (None: no bound); got {self.max_queued_best_effort}"
            )
        if self.kv_capacity_blocks < 1 or self.max_num_seqs < 1 or self.batched_tokens < 1:
            raise ValueError(f"simulator limits must be positive: {self}")
        if self.num_speculative_tokens < 0 or not 0.0 <= self.spec_acceptance <= 1.0:
            raise ValueError(
                f"speculation needs 0 or more draft tokens and an acceptance rate in [0, 1]; got "
                f"{self.num_speculative_tokens} and {self.spec_acceptance}"
            )
        if self.step_noise < 0 or not 0.0 <= self.step_noise_correlation < 1.0:
            raise ValueError(
                f"step noise needs a spread of 0 or more and a correlation in [0, 1); got "
                f"{self.step_noise} and {self.step_noise_correlation}"
            )
        if self.frontend_in_seconds < 0 or self.frontend_out_seconds < 0:
            raise ValueError(
                f"the front end's delays must be 0 or more; got {self.frontend_in_seconds} s in and "
                f"{self.frontend_out_seconds} s out"
            )

    @property
    def max_spec_length(self) -> int:
        """Tokens a decode may verify per step: its own plus the drafts."""
        return 1 + self.num_speculative_tokens

    @property
    def scheduler_step_time(self) -> StepTimeModel:
        """The step-time model the scheduler starts from (and TTFT slowdowns are resolved with)."""
        return self.planner_step_time or self.step_time

    @property
    def batched_tokens(self) -> int:
        """The engine's own per-step token budget, before the policy narrows it."""
        return self.max_num_batched_tokens or self.step_time.max_num_batched_tokens

    @property
    def kv_capacity_blocks(self) -> int:
        return self.kv_capacity_tokens // self.block_size

    @classmethod
    def from_profile(cls, path: str | Path) -> SimConfig:
        """The config of a profile JSON, with the engine limits it states (see ``_engine_limits``)."""
        return cls(step_time=StepTimeModel.load(path), **_engine_limits(json.loads(Path(path).read_text())))

    @classmethod
    def for_step_time(cls, step_time: StepTimeModel) -> SimConfig:
        """Defaults for ``step_time``; engine limits come from the bundled profile of that name."""
        profile = PROFILES_DIR / f"{step_time.name}.json"
        if not profile.is_file():
            return cls(step_time=step_time)
        return cls(step_time=step_time, **_engine_limits(json.loads(profile.read_text())))


def _engine_limits(profile: dict) -> dict[str, int]:
    """The engine limits a profile states: KV capacity in tokens, block size, cap on running requests."""
    limits = {"kv_capacity_tokens": profile.get("kv_capacity_tokens", DEFAULT_KV_CAPACITY_TOKENS)}
    for key in ("block_size", "max_num_seqs"):
        if key in profile:
            limits[key] = profile[key]
    return limits
