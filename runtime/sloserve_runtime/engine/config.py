"""What our scheduler reads from vLLM's ``additional_config``: SLO defaults, profile, policy, step log."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sloserve.slo import SLO
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
