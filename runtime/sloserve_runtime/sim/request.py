"""One simulated stage call: its SLO state, its progress through the engine and its result."""

from __future__ import annotations

from dataclasses import dataclass

from sloserve_runtime.core.planner import LiveRequest
from sloserve_runtime.core.slo_state import SLORequestState
from sloserve_runtime.workload.programs import StageResult


@dataclass(slots=True, eq=False)
class SimRequest:
    """A request inside the simulated engine, in vLLM's terms: computed tokens chasing a target.

    Like vLLM v1 there are no phases: the request needs ``num_tokens`` (prompt plus the output so
    far) computed; a step that completes them samples the next output token.
    """

    program_index: int  # position of its program in the trace
    stage_index: int  # position of this stage call in its program
    state: SLORequestState  # deadlines, as the policies see them
    output_tokens: int  # output tokens asked for
    result: StageResult  # filled in as tokens come out (its token_times list is appended to)
    num_tokens: int  # prompt plus output tokens so far: what a (re)computation must cover
    computed_tokens: int = 0  # tokens whose KV exists; reset to 0 by a preemption (recompute)
    # Leading tokens its program computed before (an earlier call, or this request before it was
    # preempted): what the prefix cache may hold for it.
    shared_prefix_tokens: int = 0
    frontend_out: float = 0.0  # seconds from the engine emitting a token to the client reading it
    thinking_tokens: int = 0  # a reasoning generation ends its thinking with this output token (0: none)

    def live(self) -> LiveRequest:
        """The planner's view of this request."""
        return LiveRequest.of(self.state, self.num_tokens, self.computed_tokens)

    @property
    def cache_limit(self) -> int:
        """The most tokens it may take from the prefix cache: the shared prefix, and never its last
        token, which must be computed for the logits of the next one (as in vLLM)."""
        return min(self.shared_prefix_tokens, self.num_tokens - 1)

    @property
    def decoding(self) -> bool:
        """All but the last sampled token computed: the next step decodes (and may verify drafts)."""
        return self.output_count > 0 and self.num_tokens - self.computed_tokens == 1

    @property
    def output_left(self) -> int:
        return self.output_tokens - self.output_count

    @property
    def output_count(self) -> int:
        return len(self.result.token_times)

    @property
    def finished(self) -> bool:
        return len(self.result.token_times) >= self.output_tokens

    def emit_token(self, now: float) -> None:
        """The step that computed all its tokens ends at ``now`` and samples the next one; the
        client reads it ``frontend_out`` later (the planner's windows count the engine's time)."""
        self.result.token_times.append(now + self.frontend_out)
        self.num_tokens += 1
        count = len(self.result.token_times)
        self.state.record_output(now, count)
        if self.thinking_tokens and count == self.thinking_tokens:
            self.state.end_thinking(count)  # as the engine's scheduler sees the end of the thinking
