"""The benchmark scenarios of SLOs-Serve as data files, and loading them by name.

>>> trace = load_scenario("reasoning").trace(rate=2.0, num_programs=100, seed=0)
>>> [(stage.name, stage.thinking_tokens > 0) for stage in trace[0].stages]
[('reason', True)]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, PositiveFloat

from sloserve_runtime.workload.scenarios.spec import Arrival, Burst, LogNormal, ProgramClass, Scenario, StageClass

__all__ = [
    "ALL_SCENARIOS",
    "SCENARIO_NAMES",
    "SCENARIOS_DIR",
    "Arrival",
    "Burst",
    "LogNormal",
    "ProgramClass",
    "Scenario",
    "StageClass",
    "load_scenario",
]

SCENARIOS_DIR = Path(__file__).parent
# What `--scenario all` runs: the six of SLOs-Serve and the burst.
ALL_SCENARIOS = ("chatbot", "coding", "summarization", "mixed", "tool-calling", "reasoning", "burst")
# Every scenario that can be named: also `chat-ttft`, for the server-default TTFT promise.
SCENARIO_NAMES = (*ALL_SCENARIOS, "agentic", "chat-ttft", "overload", "two-tiers")


class _Include(BaseModel):
    """A class entry that takes another scenario's classes, their weights rescaled to ``weight`` in all."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    include: str
    weight: PositiveFloat = 1.0


def load_scenario(name: str) -> Scenario:
    """The scenario ``name`` (one of ``SCENARIO_NAMES``, or the path of a scenario file of the
    same schema: an app's own workload), validated, with included classes resolved."""
    return Scenario.model_validate(_resolved(name, ()))


def _resolved(name: str, including: tuple[str, ...]) -> dict[str, Any]:
    if name in including:
        raise ValueError(f"scenario {name!r} includes itself via {' -> '.join(including)}")
    if name in SCENARIO_NAMES:
        data = yaml.safe_load((SCENARIOS_DIR / f"{name}.yaml").read_text())
        if data.get("name") != name:
            raise ValueError(f"{name}.yaml names itself {data.get('name')!r}")
    elif Path(name).suffix in (".yaml", ".yml") or Path(name).is_file():
        try:
            data = yaml.safe_load(Path(name).read_text())
        except OSError as exc:
            raise ValueError(f"scenario file {name}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"scenario file {name} is not YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"scenario file {name}: expected a mapping with name, description, classes")
    else:
        raise ValueError(
            f"unknown scenario {name!r}; available: {', '.join(SCENARIO_NAMES)}, or the path of a .yaml scenario file"
        )
    classes: list[Any] = []
    if not isinstance(data.get("classes", []), list):
        raise ValueError(f"scenario {name}: classes must be a list of program classes")
    for entry in data.get("classes", []):
        if "include" not in entry:
            classes.append(entry)
            continue
        ref = _Include.model_validate(entry)
        included = Scenario.model_validate(_resolved(ref.include, (*including, name))).classes
        total = sum(program.weight for program in included)
        classes.extend(
            program.model_copy(update={"weight": ref.weight * program.weight / total}) for program in included
        )
    return {**data, "classes": classes}
