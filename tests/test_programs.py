"""Programs, not requests: runs admitted as a whole, their later stages kept, their context held."""

from __future__ import annotations

import math
import re

import pytest

from sloserve import App, stage
from sloserve.slo import SLO
from sloserve_runtime.cli.measure import resolve_profile
from sloserve_runtime.core.planner import LiveRequest
from sloserve_runtime.core.policies import make_policy
from sloserve_runtime.core.programs import (
    DEFAULT_HOLD_TIMEOUT_S,
    CallShape,
    ProgramBook,
    ProgramCall,
    call_due,
    expected_seconds,
)
from sloserve_runtime.core.slo_state import SLORequestState
from sloserve_runtime.core.step_time import LinearPiece, StepTimeModel
from sloserve_runtime.sim import SimConfig, simulate
from sloserve_runtime.sim.loop import Simulation
from sloserve_runtime.workload.scenarios import load_scenario

# 10 ms a step plus 0.1 ms a token, 512 tokens a step.
MODEL = StepTimeModel("programs-test", (LinearPiece(per_token=0.0001, constant=0.010),), max_num_batched_tokens=512)
LOOSE = SLO(ttft_ms=5000, tpot_ms=200)


def call(run: str, stage: str, prompt: int, now: float, remaining=None, deadline_s=None) -> LiveRequest:
    """A stage call of program "agent" arriving at ``now``, nothing of it computed."""
    program = ProgramCall(run, "agent", stage, arrival=None, deadline_s=deadline_s, remaining=remaining)
    state = SLORequestState.create(f"{run}/{stage}/{now}", LOOSE, now, prompt, MODEL, program)
    return LiveRequest(state, to_compute=prompt, context=0)


def test_an_admitted_runs_next_stage_keeps_the_place_a_new_run_would_take():
    """The KV an admitted run between stages will need stays its own: a new run's first stage
    that would take it is not admitted, and the run's next call is admitted by right."""
    policy = make_policy("sloserve", MODEL, 512, kv_capacity_tokens=1000)
    first = call("A", "act", 300, now=0.0, remaining=("act",))
    assert policy.admit(0.0, first, []).admitted
    first.state.output_tokens = 100
    assert policy.finished(first.state, 1.0)  # its context is held for its next call
    assert policy.programs.reserved_kv == 400  # the next call: its learnt prompt and output

    newcomer = call("B", "act", 700, now=1.1, remaining=("act",))
    decision = policy.admit(1.1, newcomer, [])
    assert not decision.admitted and decision.reason.startswith("KV:"), decision.reason
    assert newcomer.state.best_effort

    later = call("A", "act", 450, now=1.5, remaining=())
    decision = policy.admit(1.5, later, [newcomer])
    assert decision.admitted and "call 2 of program run A" in decision.reason
    assert later.state.continues_run

    # The same state under the stage-level planner: the newcomer takes the place.
    blind = make_policy("sloserve-stage", MODEL, 512, kv_capacity_tokens=1000)
    blind.admit(0.0, call("A", "act", 300, now=0.0, remaining=("act",)), [])
    assert blind.admit(1.1, call("B", "act", 700, now=1.1, remaining=("act",)), []).admitted


def test_a_later_stage_of_an_admitted_run_is_admitted_by_right():
    """Its run was promised at its first stage: a later call is admitted even where a call judged
    alone would not be (here its first token cannot come within 1 ms)."""
    policy = make_policy("sloserve", MODEL, 512)
    assert policy.admit(0.0, call("A", "act", 100, now=0.0), []).admitted
    policy.finished(call("A", "act", 100, now=0.0).state, 0.5)
    tight = SLO(ttft_ms=1, tpot_ms=200)
    program = ProgramCall("A", "agent", "act")
    later = LiveRequest(SLORequestState.create("A/act/2", tight, 0.6, 400, MODEL, program), 400, 0)
    assert policy.admit(0.6, later, []).admitted and later.state.continues_run
    alone = LiveRequest(SLORequestState.create("alone", tight, 0.6, 400, MODEL), 400, 0)
    assert not policy.admit(0.6, alone, []).admitted
    assert policy.midway(later.state) and not policy.midway(alone.state)  # never refused midway


@pytest.fixture(scope="module")
def h200() -> SimConfig:
    return SimConfig.from_profile(resolve_profile("h200-opt13b-measured", "--profile"))


def _runs(results):
    runs: dict[int, list] = {}
    for result in results:
        runs.setdefault(result.program_id, []).append(result)
    return runs


def test_an_admitted_run_is_never_made_best_effort_midway(h200):
    """Past capacity, a run admitted at its first stage keeps every later stage admitted; the
    stage-level planner, deciding each call alone, gives some of them up."""
    trace = load_scenario("tool-calling").trace(rate=3.0, num_programs=150, seed=3)

    def midway(policy: str) -> int:
        runs = _runs(simulate(trace, policy, h200.step_time, h200))
        return sum(result.best_effort for calls in runs.values() if not calls[0].best_effort for result in calls[1:])

    assert midway("sloserve") == 0
    assert midway("sloserve-stage") > 0


def test_graph_gives_the_stages_to_come_and_the_book_their_expected_work():
    @stage(ttft="3x", tpot="50ms")
    async def plan(llm, task: str) -> str: ...

    @stage(ttft="3x", tpot="50ms")
    async def act(llm, task: str) -> str: ...

    @stage(ttft="3x", tpot="100ms")
    async def respond(llm, task: str) -> str: ...

    app = App("graph-test")

    @app.program(graph={plan: [], act: [plan], respond: [act]}, deadline="20s")
    async def agent(task: str) -> str: ...

    assert agent.deadline_ms == 20_000
    assert agent.remaining_after("plan") == ("act", "respond")
    assert agent.remaining_after("respond") == ()

    book = ProgramBook()
    lengths = {"plan": (200, 50, 0.05), "act": (400, 30, 0.05), "respond": (600, 120, 0.1)}
    now = 0.0
    for name, (prompt, output, tpot) in lengths.items():  # an earlier run teaches the lengths
        remaining = agent.remaining_after(name)
        program = ProgramCall("earlier", "graph-test", name, remaining=remaining)
        book.arrive(program, now, CallShape(prompt, prompt, 0.5, tpot))
        if name == "plan":
            book.decided(program, True, now, ())
        book.finish(program, now + 1.0, output, arrival=now)  # each call took 1 s
        now += 1.5
    first = ProgramCall("next", "graph-test", "plan", remaining=agent.remaining_after("plan"))
    expected = book.expected(first, CallShape(200, 200, 0.5, 0.05), {})
    assert [(s.name, s.prompt_tokens, s.output_tokens, s.tpot_seconds) for s in expected] == [
        ("act", 400, 30, 0.05), ("respond", 600, 120, 0.1),
    ]  # fmt: skip
    assert all(s.seen == 1 and s.gap_seconds == pytest.approx(0.5) and s.seconds == 1.0 for s in expected)
    assert expected_seconds(expected) == pytest.approx(2 * (0.5 + 1.0))
    assert expected_seconds(book.expected(ProgramCall("x", "graph-test", "plan", remaining=("unseen",)),
                                          CallShape(200, 200, 0.5, 0.05), {})) is None  # fmt: skip


def test_a_run_that_cannot_end_by_its_deadline_is_refused_at_its_first_stage():
    policy = make_policy("sloserve", MODEL, 512)
    # Before any call of the stage has ended, the deadline is not judged on a guess.
    assert policy.admit(0.0, call("A", "act", 100, now=0.0, remaining=("act", "act"), deadline_s=0.5), []).admitted
    done = call("A", "act", 100, now=0.0, remaining=("act", "act")).state
    done.output_tokens = 100
    policy.finished(done, 1.0)  # an act call takes 1 s: two more take 2 s
    late = policy.admit(2.0, call("B", "act", 100, now=2.0, remaining=("act", "act"), deadline_s=1.5), [])
    assert not late.admitted and late.reason.startswith("program deadline"), late.reason
    assert policy.admit(2.0, call("C", "act", 100, now=2.0, remaining=("act", "act"), deadline_s=60.0), []).admitted
    # The two after it would end in time (2 s of 2.5 s), but the call itself takes its second too.
    tight = policy.admit(2.0, call("D", "act", 100, now=2.0, remaining=("act", "act"), deadline_s=2.5), [])
    assert not tight.admitted, tight.reason
    assert "this call and the 2.0 expected after it end 0.5 s after" in tight.reason, tight.reason


def test_a_run_ends_when_its_client_says_so_or_when_its_hold_times_out():
    book = ProgramBook(hold_timeout=5.0)
    ended = ProgramCall("done", "agent", "act", remaining=())
    book.arrive(ended, 0.0, CallShape(100, 100, 1.0, 0.05))
    book.decided(ended, True, 0.0, ())
    assert not book.finish(ended, 1.0, 10)  # nothing to hold: the run is over
    assert "done" not in book.runs

    going = ProgramCall("going", "agent", "act", remaining=("act",))
    expected = book.arrive(going, 0.0, CallShape(100, 100, 1.0, 0.05))
    book.decided(going, True, 0.0, expected)
    assert book.finish(going, 1.0, 10)  # held for its next call
    assert book.released(5.9) == [] and book.reserved_kv > 0
    assert book.released(6.1) == ["going"] and book.reserved_kv == 0 and not book.runs


def test_held_context_is_released_after_a_thousand_programs(h200):
    """Every held prefix goes back to the cache once its run ends or times out: no KV, run or
    reservation is left behind."""
    trace = load_scenario("tool-calling").trace(rate=2.0, num_programs=1000, seed=5)
    simulation = Simulation(trace, "sloserve", h200)
    results = simulation.run()
    engine, book = simulation.engine, simulation.engine.policy.programs
    assert engine.kv.hit_tokens_total > 0 and len(results) > 3000
    end = max(t for result in results for t in result.token_times)
    # Only the runs that ended in the last hold timeout are still kept.
    recent = {r.program_id for r in results if r.token_times and r.token_times[-1] > end - DEFAULT_HOLD_TIMEOUT_S - 1}
    assert len(book.runs) <= len(recent)
    engine.release_holds(end + DEFAULT_HOLD_TIMEOUT_S + 1)
    assert not book.runs and book.reserved_kv == 0
    assert not engine.holds and not engine.kv.pinned
    assert not engine.kv.shared and not engine.kv.held
    assert engine.kv.free_blocks == engine.kv.capacity_blocks


def test_a_held_context_gives_way_to_a_request_that_cannot_start_without_its_blocks():
    """A run's context is held while its next call is away (a tool, or another replica), but never
    against the head of the queue: with the KV short, the hold is freed and the request starts
    (before, the simulated engine stalled with nothing running, waiting for a hold to time out)."""
    from dataclasses import replace as replaced

    from sloserve_runtime.workload.programs import ProgramSpec, StageSpec

    config = replaced(SimConfig.for_step_time(MODEL), kv_capacity_tokens=1024, block_size=16)

    def agent(index: int, arrival: float, tool_seconds: float) -> ProgramSpec:
        first, later = StageSpec("act", 600, 8, LOOSE), StageSpec("act", 650, 8, LOOSE, delay_s=tool_seconds)
        return ProgramSpec(index, arrival, "agent", (first, replaced(later, shared_prefix_tokens=608)))

    # The first run teaches the server that an act call follows; the second's context is held
    # through its 20 s tool call, over most of the 64 blocks, when a 45-block request comes.
    trace = [agent(0, 0.0, 0.1), agent(1, 2.0, 20.0), ProgramSpec(2, 3.0, "other", (StageSpec("ask", 700, 8, LOOSE),))]
    simulation = Simulation(trace, "sloserve", config)
    results = simulation.run()
    ask = next(r for r in results if r.stage == "ask")
    assert ask.token_times and ask.token_times[0] < 5.0  # it did not wait out the hold's 30 s
    assert len(results) == 5 and all(len(r.token_times) == 8 for r in results)


def test_a_fan_out_sends_its_calls_together_and_the_join_after_the_last(h200):
    trace = load_scenario("agentic").trace(rate=0.2, num_programs=20, seed=2)
    results = simulate(trace, "sloserve", h200.step_time, h200)
    for program in trace:
        calls = [r for r in results if r.program_id == program.program_id]
        research = [r for r in calls if r.stage == "research"]
        answer = next(r for r in calls if r.stage == "answer")
        assert 2 <= len(research) <= 4
        assert len({r.arrival for r in research}) == 1  # sent at once
        assert answer.arrival >= max(r.token_times[-1] for r in research)
    assert math.isfinite(sum(len(r.token_times) for r in results))


def test_a_fan_outs_branches_take_one_calls_time_and_are_due_when_their_join_must_start():
    """Branches sent at once (``asyncio.gather``) are learnt as one group: the run's expected time
    counts them side by side, and a branch is due when the join must start to end by the deadline."""
    book = ProgramBook()
    shape = CallShape(300, 300, 1.0, 0.1)
    plan = ProgramCall("earlier", "research", "plan", remaining=("search", "join"))
    book.arrive(plan, 0.0, shape)
    book.decided(plan, True, 0.0, ())
    book.finish(plan, 1.0, 50, arrival=0.0)
    branches = [ProgramCall("earlier", "research", "search", remaining=("join",)) for _ in range(3)]
    for branch in branches:  # all three in the engine at once
        book.arrive(branch, 1.0, shape)
    for branch in branches:
        book.finish(branch, 3.0, 100, arrival=1.0)  # each took 2 s
    join = ProgramCall("earlier", "research", "join", remaining=())
    book.arrive(join, 3.0, shape)
    book.finish(join, 4.0, 80, arrival=3.0)  # 1 s
    search = book.stats[("research", "search")]
    assert (search.calls, search.waves, search.width) == (3, 1, 3.0)

    first = ProgramCall("next", "research", "plan", remaining=("search", "search", "search", "join"))
    expected = book.expected(first, shape, {})
    assert [(s.name, s.calls, s.width) for s in expected] == [("search", 3, 3.0), ("join", 1, 1.0)]
    assert expected_seconds(expected) == pytest.approx(2.0 + 1.0)  # not 3 x 2 s + 1 s
    branch = ProgramCall("next", "research", "search", remaining=("join",))
    assert call_due(10.0, book.expected(branch, shape, {})) == pytest.approx(10.0 - 1.0)
    assert call_due(None, expected) is None

    # A 5 s deadline fits three branches side by side, not one after another.
    policy = make_policy("sloserve", MODEL, 512)
    policy.programs = book
    admitted = policy.admit(0.0, call_in("new", "research", "plan", ("search",) * 3 + ("join",), 5.0), [])
    assert admitted.admitted, admitted.reason


def call_in(run: str, program: str, stage: str, remaining, deadline_s: float) -> LiveRequest:
    call = ProgramCall(run, program, stage, arrival=0.0, deadline_s=deadline_s, remaining=remaining)
    return LiveRequest(SLORequestState.create(run, LOOSE, 0.0, 300, MODEL, call), to_compute=300, context=0)


# ---- on the real engine: program fields from any client ----


def test_program_fields_from_a_plain_openai_client(engine):
    """The body field and the headers both name the run: its second call is admitted as a later
    stage of the run admitted at its first."""
    import openai

    client = openai.OpenAI(base_url=engine.base_url, api_key="unused")
    question = [{"role": "user", "content": "Name a colour."}]
    first = client.chat.completions.create(
        model=engine.model, messages=question, max_tokens=4,
        extra_body={"slo": {"ttft_ms": "30s", "program": {"id": "plain-1", "name": "quiz", "stage": "ask",
                                                           "remaining": ["ask"]}}},
    )  # fmt: skip
    assert first.model_extra["slo"]["admission"] == "admitted"
    second = client.chat.completions.create(
        model=engine.model, messages=question, max_tokens=4,
        extra_headers={"x-slo-program": "plain-1", "x-slo-program-name": "quiz", "x-slo-stage": "ask",
                       "x-slo-program-remaining": "", "x-slo-ttft-ms": "30000"},
    )  # fmt: skip
    reason = second.model_extra["slo"]["admission_reason"]
    assert "call 2 of program run plain-1" in reason, reason


@pytest.mark.parametrize(
    ("program", "param"),
    [({"id": "x", "deadline_ms": "soon"}, "slo.program.deadline_ms"),
     ({"stage": "act"}, "slo.program.stage"),
     ({"id": "x", "remaining": "act"}, "slo.program.remaining"),
     ({"id": "x", "turns": 3}, "slo.program.turns")],
)  # fmt: skip
def test_a_malformed_program_field_gets_400_naming_it(engine, program, param):
    import openai

    client = openai.OpenAI(base_url=engine.base_url, api_key="unused")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=engine.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
            extra_body={"slo": {"program": program}},
        )  # fmt: skip
    assert caught.value.body["param"] == param, caught.value.body
    assert param in caught.value.body["message"]


def test_a_reasoning_generation_moves_to_its_answer_tier_when_its_thinking_ends(h200):
    """In the simulator, one generation: planned at the thinking TPOT until its thinking tokens,
    at the answer's after, and judged on both."""
    from sloserve_runtime.sim.engine import Engine
    from sloserve_runtime.workload.programs import ProgramSpec, StageSpec

    slo = SLO.parse("3x", "100ms", thinking_tpot="50ms")
    trace = [ProgramSpec(0, 0.0, "reasoning", (StageSpec("reason", 100, 40, slo, thinking_tokens=30),))]
    simulation = Simulation(trace, "sloserve", h200)
    tiers = []
    original = Engine.complete

    def watch(self, batch, now):  # the tier each step planned the request in
        tiers.extend(request.state.tpot_seconds for request in batch.requests)
        return original(self, batch, now)

    Engine.complete = watch
    try:
        (result,) = simulation.run()
    finally:
        Engine.complete = original
    assert tiers[0] == 0.05 and tiers[-1] == 0.1
    assert tiers.index(0.1) == 30  # the step after the 30th token: its prefill step and 29 decodes before
    assert result.thinking_tokens == 30
    from sloserve_runtime.measure.summary import summarize

    summary = summarize([result], max(result.token_times))
    assert summary.attainment == 1.0


def test_the_engine_switches_a_reasoning_generation_to_its_answer_tier(engine):
    """On the real engine: the default model held to a thinking span in tags; the scheduler moves
    the generation to its answer's tier where the stream shows the thinking ended, and the
    response judges both phases."""
    import openai

    client = openai.OpenAI(base_url=engine.base_url, api_key="unused")
    response = client.chat.completions.create(
        model=engine.model, messages=[{"role": "user", "content": "Why is the sky blue?"}], max_tokens=100,
        temperature=0,
        extra_body={"slo": {"ttft_ms": "30s", "thinking_tpot_ms": 900, "tpot_ms": 1500},
                    "structured_outputs": {"regex": r"<think>[a-z ,.]{20,120}</think>[A-Za-z ,.]{8,80}"}},
    )  # fmt: skip
    outcome = response.model_extra["slo"]
    thinking, answer = outcome["thinking"], outcome["answer"]
    assert "</think>" in response.choices[0].message.content
    assert thinking["tokens"] > 0 and answer["tokens"] > 0
    assert (thinking["tpot_target_ms"], answer["tpot_target_ms"]) == (900, 1500)
    switched = re.match(r"thinking ended after (\d+) tokens: TPOT 900 ms, then 1500 ms", thinking["engine"])
    assert switched, thinking["engine"]
    # The engine saw the end one step after the stream did at most (the marker's last token).
    assert abs(int(switched[1]) - thinking["tokens"]) <= 1
    assert outcome["met"] == (outcome["ttft_met"] and thinking["tpot_met"] and answer["tpot_met"])
    assert outcome["admission_changes"] == []  # a tier switch is not a change of admission


def test_wasted_work_counts_the_tokens_of_programs_that_missed():
    from sloserve_runtime.measure.summary import summarize
    from sloserve_runtime.workload.programs import StageResult

    def call(program: int, first_token: float) -> StageResult:
        times = [first_token + 0.01 * k for k in range(10)]
        return StageResult(program, "agent", "act", 0.0, times, 90, 10, ttft_target_ms=500, tpot_target_ms=50)

    met, missed = [call(0, 0.1), call(0, 0.2)], [call(1, 0.1), call(1, 0.9)]  # 0.9 s: its TTFT missed
    summary = summarize([*met, *missed], 2.0)
    assert summary.program_attainment == 0.5
    assert summary.wasted_work == pytest.approx(0.5)  # both of program 1's calls: half of all tokens


def test_a_program_call_survives_the_wire_as_body_field_and_as_xargs():
    from sloserve_runtime.serving.requests import request_program

    sent = ProgramCall("run-3", "agent", "act", arrival=1_765_000_000.5, deadline_s=20.0, remaining=("act", "respond"))
    assert request_program({}, {"slo": {"program": sent.to_body()}}) == sent
    assert ProgramCall.from_xargs(sent.to_xargs()) == sent
    last = ProgramCall("run-3", remaining=())
    assert request_program({}, {"slo": {"program": last.to_body()}}) == last == ProgramCall.from_xargs(last.to_xargs())


def test_best_effort_prompts_wait_while_admission_turns_runs_away():
    """A run left best effort keeps calling: while admission turns runs away, its prompts take
    none of what the admitted decodes leave of a step (its decodes still join); once admission
    has turned nobody away for ``best_effort_calm_s`` they take it, as before."""
    policy = make_policy("sloserve", MODEL, 512)
    planner = policy.planner
    admitted = [LiveRequest(SLORequestState.create(f"d{i}", LOOSE, 0.0, 100, MODEL), 1, 100) for i in range(2)]
    for decode in admitted:
        decode.state.record_output(0.5, 1)
    lost = call("lost", "act", 300, now=0.0, remaining=("act",))
    lost.state.best_effort = True
    streaming = call("other", "act", 1, now=0.0)
    streaming.state.best_effort = True
    streaming = LiveRequest(streaming.state, to_compute=1, context=200)  # a best-effort decode
    running = [*admitted, lost, streaming]

    def step(now: float) -> tuple[list[bool], int]:
        hold = planner.held_back(running, admitted_waiting=False, now=now)
        return hold.held, planner.token_budget(running, waiting=False, now=now, hold=hold)

    held, budget = step(1.0)
    assert held == [False, False, False, False] and budget > 3  # nobody turned away yet

    # A run's first stage that cannot be kept is turned away at 5 s: the engine is at its limit.
    hopeless = call("late", "act", 500, now=5.0, remaining=("act",))
    hopeless.state.first_token_deadline = 5.0001
    assert not policy.admit(5.0, hopeless, admitted).admitted
    assert planner.last_refusal == 5.0
    held, budget = step(6.0)
    assert held == [False, False, True, False] and budget == 3  # the two decodes and the best-effort one
    held, budget = step(5.0 + planner.best_effort_calm_s)
    assert held == [False, False, False, False] and budget > 3

    # A flat request turned away says nothing of program runs: the leftover stays as it was.
    flat = LiveRequest(SLORequestState.create("flat", SLO(ttft_ms=0.1, tpot_ms=200), 50.0, 500, MODEL), 500, 0)
    assert not policy.admit(50.0, flat, admitted).admitted
    assert planner.last_refusal == 5.0 and step(50.0)[0] == [False, False, False, False]


def test_best_effort_runs_still_end_once_the_load_passes(h200):
    """Past capacity the runs left best effort wait while admission turns runs away, then run:
    every call of every run ends with all its tokens, or is refused with an HTTP 429 (the
    best-effort queue's bound), none left hanging."""
    trace = load_scenario("tool-calling").trace(rate=3.5, num_programs=150, seed=3)
    calm = simulate(trace, "sloserve", h200.step_time, h200)
    assert all(result.error or len(result.token_times) == result.output_tokens for result in calm)
    assert any(calls[0].best_effort and not calls[0].error for calls in _runs(calm).values())


def test_a_stages_served_time_follows_the_load_not_the_whole_history():
    """A run's deadline is weighed with how long its stages' calls take now: after a hundred calls
    served in 1 s, thirty-two in 3 s move the learnt time most of the way to 3 s (a mean over all
    of them would still say 1.48 s and admit runs that end past their deadline)."""
    book = ProgramBook()
    shape = CallShape(prompt_tokens=100, new_tokens=100, ttft_seconds=1.0, tpot_seconds=0.1)
    for index, seconds in enumerate([1.0] * 100 + [3.0] * 32):
        program = ProgramCall(f"run{index}", "agent", "act")
        book.arrive(program, 0.0, shape)
        book.finish(program, seconds, output_tokens=50, arrival=0.0)
    assert 2.7 < book.stats[("agent", "act")].seconds < 3.0
