"""What our scheduler reads from vLLM's ``additional_config``: SLO defaults, profile, policy, step log."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sloserve.slo import SLO
from sloserve_runtime.core.slo_state import BEST_EFFORT, DEFAULT_MAX_QUEUED_BEST_EFFORT
from sloserve_runtime.core.step_time import engine_profile

CONFIG_KEY = "sloserve"


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
    admission: str = BEST_EFFORT  # the server's admission mode, for requests that do not say theirs
    # Best-effort requests that may wait to start at once (``slo_state.refusal``); None: no bound.
    max_queued_best_effort: int | None = DEFAULT_MAX_QUEUED_BEST_EFFORT

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
            admission=section.get("admission") or BEST_EFFORT,
            max_queued_best_effort=section.get("max_queued_best_effort", DEFAULT_MAX_QUEUED_BEST_EFFORT),
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
            "admission": self.admission,
            "max_queued_best_effort": self.max_queued_best_effort,
        }
        return {CONFIG_KEY: section}
