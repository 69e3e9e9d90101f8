"""Stage calls of the trace's programs: turns each into a request and collects its result."""

from __future__ import annotations

from sloserve_runtime.core.slo_state import SLORequestState
from sloserve_runtime.sim.config import SimConfig
from sloserve_runtime.sim.request import SimRequest
from sloserve_runtime.workload.programs import ProgramSpec, StageResult, call_groups, program_call


class StageCalls:
    """Creates the request of each stage call when it arrives and records its ``StageResult``.

    Stages of a program are dependent: stage i+1 is sent ``delay_s`` after stage i's last token
    reached the client. Parallel stages (a fan-out) are sent together, and the stage after them
    once the last of them has ended; a program whose call was refused sends nothing more.
    """

    def __init__(self, trace: list[ProgramSpec], config: SimConfig) -> None:
        self.trace = trace
        self.config = config
        self._results: list[list[StageResult]] = [[] for _ in trace]
        self._open: dict[int, int] = {}  # calls of each program's current group still to end
        self._refused: set[int] = set()  # programs with a refused call: they stop there

    def group_of(self, program_index: int, stage_index: int) -> range:
        """The calls sent together with this one (itself alone unless it starts a fan-out)."""
        return next(group for group in call_groups(self.trace[program_index].stages) if stage_index in group)

    def start(self, program_index: int, stage_index: int, arrival: float) -> SimRequest | None:
        """The request for a stage call arriving now; None if the engine would reject it."""
        program = self.trace[program_index]
        stage = program.stages[stage_index]
        step_time = self.config.scheduler_step_time  # the server's profile states what an SLO means
        zero_load_ms = step_time.prefill_seconds(stage.prompt_tokens) * 1000.0
        result = StageResult(
            program_id=program.program_id,
            kind=program.kind,
            stage=stage.name,
            arrival=arrival,
            token_times=[],
            prompt_tokens=stage.prompt_tokens,
            output_tokens=stage.output_tokens,
            ttft_target_ms=stage.slo.ttft_target_ms(zero_load_ms),
            tpot_target_ms=stage.slo.tpot_ms,
            error=self._rejection(stage.prompt_tokens, stage.output_tokens),
            thinking_tpot_ms=stage.slo.thinking_tpot_ms,
            thinking_tokens=stage.thinking_tokens or None,
            program_due=None if program.deadline_s is None else program.arrival_s + program.deadline_s,
        )
        self._results[program_index].append(result)
        if result.error is not None:
            self._refused.add(program_index)
            return None
        self._open[program_index] = self._open.get(program_index, 0) + 1
        state = SLORequestState.create(
            f"{program_index}/{stage_index}", stage.slo, arrival, stage.prompt_tokens, step_time,
            program_call(program, stage_index, str(program.program_id), program.arrival_s),
        )  # fmt: skip
        return SimRequest(
            program_index, stage_index, state, stage.output_tokens, result, stage.prompt_tokens,
            shared_prefix_tokens=stage.shared_prefix_tokens, frontend_out=self.config.frontend_out_seconds,
            thinking_tokens=stage.thinking_tokens,
        )  # fmt: skip

    def next_stage(self, request: SimRequest, finished_at: float) -> tuple[float, int] | None:
        """(send time, stage index) of the program's next stage call, or None after the last: the
        client sends it once it has read the last token (``finished_at`` is the engine's time)."""
        index = request.program_index
        self._open[index] -= 1
        if self._open[index] > 0 or index in self._refused:
            return None  # the join waits for the rest of the group; a refused call ends the program
        del self._open[index]
        stages = self.trace[index].stages
        following = self.group_of(index, request.stage_index).stop
        if following >= len(stages):
            return None
        return finished_at + request.frontend_out + stages[following].delay_s, following

    def results(self) -> list[StageResult]:
        """All results, program by program in trace order, stages in program order."""
        return [result for program_results in self._results for result in program_results]

    def _rejection(self, prompt_tokens: int, output_tokens: int) -> str | None:
        # vLLM rejects a request that cannot fit its max_model_len, which is at most the KV capacity.
        if prompt_tokens < 1 or output_tokens < 1:
            return f"needs at least one prompt and one output token (got {prompt_tokens}, {output_tokens})"
        if prompt_tokens + output_tokens > self.config.kv_capacity_blocks * self.config.block_size:
            return f"prompt + output tokens ({prompt_tokens + output_tokens}) exceed the KV capacity"
        return None
