"""Scenario file schema: program classes, their stages' length distributions and SLOs, and trace sampling."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from sloserve.slo import SLO, parse_duration, parse_tpot, parse_ttft
from sloserve_runtime.workload.programs import ProgramSpec, StageSpec
from sloserve_runtime.workload.scenarios.arrivals import arrival_times


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LogNormal(_Spec):
    """A lognormal distribution given by its mean and standard deviation, clipped to [min, max]."""

    mean: PositiveFloat = Field(description="mean of the unclipped distribution")
    std: float = Field(ge=0, description="standard deviation of the unclipped distribution; 0 = constant")
    min: float = Field(0.0, ge=0, description="smallest value drawn")
    max: float = Field(math.inf, gt=0, description="largest value drawn")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> LogNormal:
        if self.min > self.max:
            raise ValueError(f"min {self.min} exceeds max {self.max}")
        return self

    def sample(self, rng: np.random.Generator) -> float:
        # Moment matching: the underlying normal's sigma² = ln(1 + CV²), mu = ln(mean) - sigma²/2.
        sigma2 = math.log1p((self.std / self.mean) ** 2)
        value = rng.lognormal(math.log(self.mean) - sigma2 / 2, math.sqrt(sigma2))
        return float(np.clip(value, self.min, self.max))

    def tokens(self, rng: np.random.Generator, length_scale: float) -> int:
        return max(1, round(self.sample(rng) * length_scale))


class StageClass(_Spec):
    """One stage of a program class: its lengths, its SLO, and how often it repeats."""

    name: str = Field(description="stage name recorded in each StageSpec, e.g. 'think'")
    prompt: LogNormal = Field(description="prompt tokens this call adds to the program's context")
    output: LogNormal = Field(description="tokens the call generates (a reasoning call: its answer's)")
    thinking: LogNormal | None = Field(
        None, description="a reasoning call: the tokens it thinks before its answer, in the same generation"
    )
    ttft: str | float = Field(description="TTFT target: a slowdown like '3x' or ms like '300ms'")
    tpot: str | float | None = Field(None, description="TPOT target in ms, e.g. '50ms'; unset: none")
    thinking_tpot: str | float | None = Field(
        None, description="a reasoning call's TPOT target while it thinks; the answer's is tpot"
    )
    delay_s: NonNegativeFloat | LogNormal = Field(
        0.0, description="wait before the call (a tool's run time); a program's first call never waits"
    )
    repeat: dict[PositiveInt, PositiveFloat] | None = Field(
        None, description="how many times the stage runs in a row: {count: weight}; unset = once"
    )
    fanout: dict[PositiveInt, PositiveFloat] | None = Field(
        None,
        description="how many calls of the stage go at once (a fan-out, each with its own new tokens), "
        "the next stage reading all their outputs: {count: weight}; unset = one",
    )

    @field_validator("ttft")
    @classmethod
    def _ttft_parses(cls, value: str | float) -> str | float:
        parse_ttft(value)
        return value

    @field_validator("tpot", "thinking_tpot")
    @classmethod
    def _tpot_parses(cls, value: str | float | None) -> str | float | None:
        parse_tpot(value)
        return value

    @model_validator(mode="after")
    def _thinking_has_its_tpot(self) -> StageClass:
        if (self.thinking is None) != (self.thinking_tpot is None):
            raise ValueError("a reasoning stage gives both thinking (its lengths) and thinking_tpot, or neither")
        return self

    def slo(self, slo_scale: float) -> SLO:
        """The stage's SLO with its targets in ms stretched by ``slo_scale``; a TTFT slowdown stays,
        since it is already relative to the profile's own prefill time."""
        slo = SLO.parse(self.ttft, self.tpot, self.thinking_tpot)
        scaled = {
            name: getattr(slo, name) * slo_scale
            for name in ("ttft_ms", "tpot_ms", "thinking_tpot_ms")
            if getattr(slo, name) is not None
        }
        return dataclasses.replace(slo, **scaled)

    def repeats(self, rng: np.random.Generator) -> int:
        return _draw(rng, self.repeat)

    def branches(self, rng: np.random.Generator) -> int:
        return _draw(rng, self.fanout)

    def delay(self, rng: np.random.Generator) -> float:
        return self.delay_s.sample(rng) if isinstance(self.delay_s, LogNormal) else self.delay_s


class ProgramClass(_Spec):
    """A kind of program in a scenario: stages run in order, each a call to the model."""

    name: str = Field(description="the programs' kind, e.g. 'chatbot'")
    weight: PositiveFloat = Field(1.0, description="relative share of the scenario's programs")
    prefix: LogNormal | None = Field(None, description="tokens every call starts with (system prompt, tool docs)")
    accumulate: bool = Field(False, description="each call also carries the previous call's prompt and output")
    stages: tuple[StageClass, ...] = Field(min_length=1)
    deadline: str | float | None = Field(
        None, description="the whole program is due this long after it arrives, e.g. '15s' (a number: ms)"
    )

    @field_validator("deadline")
    @classmethod
    def _duration(cls, value: str | float | None) -> str | float | None:
        parse_duration(value, "deadline")  # a malformed one fails here, naming the field
        return value

    @property
    def deadline_s(self) -> float | None:
        ms = parse_duration(self.deadline, "deadline")
        return None if ms is None else ms / 1000.0

    def sample(
        self, rng: np.random.Generator, slo_scale: float, length_scale: float, max_model_len: int | None
    ) -> tuple[StageSpec, ...]:
        prefix = self.prefix.tokens(rng, length_scale) if self.prefix is not None else 0
        context = prefix  # tokens the next call carries before its own
        calls: list[StageSpec] = []
        for stage in self.stages:
            for _ in range(stage.repeats(rng)):
                read = 0  # what the calls of this group add to the context
                for branch in range(stage.branches(rng)):
                    prompt = context + stage.prompt.tokens(rng, length_scale)
                    output = stage.output.tokens(rng, length_scale)
                    thinking = 0 if stage.thinking is None else stage.thinking.tokens(rng, length_scale)
                    if max_model_len is not None:
                        answer = output
                        prompt, output = _fit(prompt, thinking + answer, max_model_len)
                        thinking = min(thinking * output // (thinking + answer), output - 1) if thinking else 0
                        output = output if thinking else min(output, answer)
                    else:
                        output += thinking
                    if branch == 0:  # the first call starts when the program arrives; a group's calls go at once
                        delay = stage.delay(rng) if calls else 0.0
                    # The context leads the prompt; a fitted prompt may keep only part of it.
                    shared = min(context, prompt)
                    calls.append(
                        StageSpec(
                            stage.name,
                            prompt,
                            output,
                            stage.slo(slo_scale),
                            delay,
                            shared,
                            parallel=branch > 0,
                            thinking_tokens=thinking,
                        )  # fmt: skip
                    )
                    read += prompt - shared + output
                # The next call reads them all (one call: its prompt and output, as they were fitted).
                joined = prompt + output if read == prompt - shared + output else context + read
                context = joined if self.accumulate else prefix
        return tuple(calls)


def _draw(rng: np.random.Generator, counts: dict[int, float] | None) -> int:
    """A count drawn from ``{count: weight}`` (1 when unset)."""
    if counts is None:
        return 1
    values = list(counts)
    weights = np.array([counts[value] for value in values])
    return values[rng.choice(len(values), p=weights / weights.sum())]


def _fit(prompt: int, output: int, max_model_len: int) -> tuple[int, int]:
    """Shrink prompt and output in proportion so that both fit the context, keeping the stage's shape."""
    if prompt + output <= max_model_len:
        return prompt, output
    share = max_model_len / (prompt + output)
    return max(1, math.floor(prompt * share)), max(1, math.floor(output * share))


class Burst(_Spec):
    """A stretch of the trace whose programs arrive faster; bounds are fractions of the program count."""

    start: float = Field(ge=0, le=1, description="fraction of the trace's programs before the burst")
    end: float = Field(ge=0, le=1, description="fraction of the trace's programs by the burst's end")
    factor: PositiveFloat = Field(description="arrival-rate multiplier inside the burst")

    @model_validator(mode="after")
    def _ordered(self) -> Burst:
        if self.start >= self.end:
            raise ValueError(f"burst start {self.start} must come before its end {self.end}")
        return self


class Arrival(_Spec):
    """When programs arrive: Poisson, or gamma inter-arrivals with a burstiness knob (as vLLM bench)."""

    process: Literal["poisson", "gamma"] = "poisson"
    burstiness: PositiveFloat = Field(1.0, description="gamma shape = 1/CV² of inter-arrivals; 1 is Poisson")
    burst: Burst | None = None

    @model_validator(mode="after")
    def _poisson_has_no_burstiness(self) -> Arrival:
        if self.process == "poisson" and self.burstiness != 1.0:
            raise ValueError("burstiness applies to process 'gamma'; Poisson is burstiness 1")
        return self


class Scenario(_Spec):
    """A workload: program classes with weights and an arrival process; ``trace()`` samples programs."""

    name: str
    description: str
    lengths_source: str = Field(description="which public dataset's statistics the lengths follow")
    arrival: Arrival = Arrival()
    classes: tuple[ProgramClass, ...] = Field(min_length=1)

    @field_validator("classes")
    @classmethod
    def _unique_kinds(cls, classes: tuple[ProgramClass, ...]) -> tuple[ProgramClass, ...]:
        names = [program.name for program in classes]
        if len(set(names)) != len(names):
            raise ValueError(f"program class names repeat: {names}")
        return classes

    def with_burstiness(self, burstiness: float) -> Scenario:
        """This scenario with gamma inter-arrivals of the given burstiness (its burst stretch kept)."""
        arrival = Arrival(process="gamma", burstiness=burstiness, burst=self.arrival.burst)
        return self.model_copy(update={"arrival": arrival})

    def trace(
        self,
        rate: float,
        num_programs: int,
        seed: int = 0,
        slo_scale: float = 1.0,
        length_scale: float = 1.0,
        max_model_len: int | None = None,
    ) -> list[ProgramSpec]:
        """Sample ``num_programs`` programs arriving at ``rate`` programs/s (the base rate outside a burst).

        ``slo_scale`` multiplies every target in ms (TPOT, an absolute TTFT; slowdowns stay); ``length_scale``
        multiplies every sampled length; ``max_model_len`` shrinks each call to fit that context.
        The same seed gives the same trace.
        """
        if rate <= 0 or num_programs < 0 or slo_scale <= 0 or length_scale <= 0:
            raise ValueError("rate, slo_scale and length_scale must be positive and num_programs not negative")
        if max_model_len is not None and max_model_len < 2:
            raise ValueError(f"max_model_len={max_model_len} leaves no room for a prompt and an output")
        rng = np.random.default_rng(seed)
        arrivals = arrival_times(rng, num_programs, rate, self.arrival.burstiness, self.arrival.burst)
        weights = np.array([program.weight for program in self.classes])
        kinds = rng.choice(len(self.classes), size=num_programs, p=weights / weights.sum())
        return [
            ProgramSpec(
                program_id=program_id,
                arrival_s=float(arrivals[program_id]),
                kind=self.classes[kind].name,
                stages=self.classes[kind].sample(rng, slo_scale, length_scale, max_model_len),
                deadline_s=self.classes[kind].deadline_s,
            )
            for program_id, kind in enumerate(kinds)
        ]
