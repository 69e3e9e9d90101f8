"""A discrete-event simulator of a vLLM engine under sloserve's scheduling policies.

It batches like vLLM v1's scheduler, predicts step times with the same ``StepTimeModel`` and
orders queues with the same ``SchedulingPolicy`` objects as the real engine, so policies can be
compared on traces far larger than the engine can serve here::

    from sloserve_runtime.sim import SimConfig, simulate
    from sloserve_runtime.core.step_time import PROFILES_DIR

    config = SimConfig.from_profile(PROFILES_DIR / "a100-opt13b-slos-serve.json")
    results = simulate(trace, "sloserve", config.step_time, config)  # list[StageResult]
"""

from __future__ import annotations

from sloserve_runtime.sim.config import SimConfig
from sloserve_runtime.sim.loop import simulate

__all__ = ["SimConfig", "simulate"]
