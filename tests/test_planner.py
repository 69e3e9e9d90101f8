"""The planner on hand-built states: budget, admission, best effort; and in the simulator."""

from __future__ import annotations

import math

import pytest

from sloserve.slo import SLO, judge
from sloserve_runtime.core.planner import LiveRequest, Planner
from sloserve_runtime.core.policies import make_policy
from sloserve_runtime.core.slo_state import SLORequestState
from sloserve_runtime.core.step_time import LinearPiece, StepTimeModel, attended_pairs
from sloserve_runtime.sim import SimConfig, simulate
from sloserve_runtime.sim.engine import Engine
from sloserve_runtime.sim.request import SimRequest
from sloserve_runtime.workload.programs import ProgramSpec, StageResult, StageSpec

# 10 ms a step plus 1 ms a token: easy arithmetic.
MODEL = StepTimeModel("planner-test", (LinearPiece(per_token=0.001, constant=0.010),), max_num_batched_tokens=512)
TIGHT = SLO.parse("2000ms", "50ms")
LOOSE = SLO.parse("2000ms", "100ms")


def state(name: str, slo: SLO, arrival: float = 0.0, prompt: int = 100) -> SLORequestState:
    return SLORequestState.create(name, slo, arrival, prompt, MODEL)


def decoding(name: str, slo: SLO, context: int = 100) -> LiveRequest:
    return LiveRequest(state(name, slo), to_compute=1, context=context)


def arriving(name: str, slo: SLO, prompt: int, arrival: float = 0.0) -> LiveRequest:
    return LiveRequest(state(name, slo, arrival, prompt), to_compute=prompt, context=0)


def test_budget_shrinks_when_a_tighter_tpot_arrives():
    planner = Planner(MODEL, max_budget=512, headroom=1.0)
    loose = [decoding(f"l{i}", LOOSE) for i in range(4)]
    # Bound 100 ms: (100 - 10) / 1 = 90 tokens; bound 50 ms: 40 tokens.
    assert planner.token_budget(loose) == 90
    assert planner.token_budget([*loose, decoding("t", TIGHT)]) == 40
    # No target at all among the running requests: the engine's own budget.
    assert planner.token_budget([decoding("x", SLO())]) == 512


def test_without_a_tpot_a_step_keeps_to_a_share_of_the_tightest_ttft():
    """A prompt that arrives during a step waits it out: with no TPOT to bound it, the step is held
    to ``arrival_share`` (0.7) of the tightest TTFT among the admitted running requests instead of
    the whole token budget."""
    planner = Planner(MODEL, max_budget=512, headroom=1.0)
    ttft_only = [decoding("x", SLO.parse("1s", None)), decoding("y", SLO.parse("300ms", None))]
    # 210 ms: 10 ms fixed, 1 ms a token, so 200 tokens (two of them the decodes'), give or take
    # the rounding of the float arithmetic.
    assert planner.token_budget(ttft_only) == pytest.approx(200, abs=1)
    # The same decodes are not held back for best effort when it fits: two of 200 tokens.
    assert planner.held_back(ttft_only, admitted_waiting=False).held == [False, False]
    # A TPOT target among the decodes bounds the step as before (100 ms: 90 tokens).
    assert planner.token_budget([*ttft_only, decoding("z", LOOSE)]) == 90
    # Turned off, such a step fills the engine's budget.
    assert Planner(MODEL, max_budget=512, headroom=1.0, arrival_share=None).token_budget(ttft_only) == 512


def test_decodes_that_sit_out_leave_the_arrival_budget_to_the_prompt():
    # 10 ms a step, 1 ms a token, 5 ms a request. While an admitted prompt waits, the two decodes
    # without a TPOT sit the step out: the prompt alone gets 210 - 10 - 5 = 195 tokens, not what
    # is left after two decodes that do not run (183).
    planner = Planner(PER_REQUEST, max_budget=512, headroom=1.0)
    ttft_only = [decoding("x", SLO.parse("1s", None)), decoding("y", SLO.parse("300ms", None))]
    hold = planner.held_back(ttft_only, admitted_waiting=True)
    assert hold.held == [True, True]
    assert planner.token_budget(ttft_only, hold=hold) == pytest.approx(195, abs=1)
    # With nobody waiting they run, and each is charged its token and request.
    hold = planner.held_back(ttft_only, admitted_waiting=False)
    assert hold.held == [False, False]
    assert planner.token_budget(ttft_only, waiting=False, hold=hold) == pytest.approx(2 + 210 - 10 - 10 - 2, abs=1)


# 10 ms a step, 1 ms a token, 5 ms a request in the batch: the per-request term matters.
PER_REQUEST = StepTimeModel(
    "planner-test-per-request", (LinearPiece(per_token=0.001, per_request=0.005, constant=0.010),), 512
)


def best_effort(live: LiveRequest) -> LiveRequest:
    live.state.best_effort = True
    return live


def test_budget_counts_every_request_of_the_step():
    planner = Planner(PER_REQUEST, max_budget=512, headroom=1.0)
    decodes = [decoding(f"l{i}", LOOSE) for i in range(2)]
    # Two decodes and the chunk that takes the rest: 100 ms - 10 - 3 x 5 = 75 tokens.
    assert planner.token_budget(decodes) == 75
    # A running chunk is one more request, and a waiting request may take what it leaves.
    chunk = LiveRequest(state("c", LOOSE), to_compute=300, context=100)
    assert planner.token_budget([*decodes, chunk]) == 70


def test_best_effort_joins_only_within_the_bound():
    planner = Planner(PER_REQUEST, max_budget=512, headroom=1.0)
    admitted = [decoding(f"l{i}", LOOSE) for i in range(2)]
    extra = [best_effort(decoding(f"b{i}", LOOSE)) for i in range(20)]
    running = [*admitted, *extra]
    hold = planner.held_back(running, admitted_waiting=False)
    held = hold.held
    joined = len(running) - sum(held)
    budget = planner.token_budget(running, hold=hold)
    # Every joiner is planned for: the step that uses the whole budget, with the joiners and a
    # waiting request taking the rest, stays within the 100 ms bound.
    assert PER_REQUEST.step_seconds(budget, joined + 1) <= 0.100 + 1e-9
    assert 2 < joined < len(running) and held[-1]


# PER_REQUEST's, plus causal attention: 1 µs per query-key pair.
ATTENTION = StepTimeModel(
    "planner-test-attention",
    (LinearPiece(per_token=0.001, per_request=0.005, constant=0.010, per_attended_pair=1e-6),),
    4096,
)


def test_a_best_effort_chunk_deep_in_its_prompt_keeps_the_step_within_the_bound():
    """The leftover of a step goes to a best-effort chunk where no admitted one runs; its tokens
    attend to all its prompt computed so far (a request recomputed after preemption can be
    thousands of tokens in), and the budget counts that, or every decode's window breaks."""
    planner = Planner(ATTENTION, max_budget=4096, headroom=1.0)
    admitted = [decoding(f"l{i}", LOOSE, context=10) for i in range(2)]
    deep = best_effort(LiveRequest(state("deep", LOOSE, prompt=6000), to_compute=2000, context=4000))
    running = [*admitted, deep]
    hold = planner.held_back(running, admitted_waiting=False)
    assert hold.held == [False, False, False]  # it joins
    budget = planner.token_budget(running, waiting=False, hold=hold)
    chunk = budget - len(admitted)  # vLLM gives the decodes their token, the chunk the rest
    context = sum(r.context + 1 for r in admitted) + deep.context + chunk
    attended = sum(r.context + 1 for r in admitted) + attended_pairs(chunk, deep.context + chunk)
    assert 0 < chunk and ATTENTION.step_seconds(budget, 3, context, attended) <= 0.100 + 1e-9
    # Taken for a fresh prompt, the same chunk would have been about twice as long and the step
    # twice the bound.
    fresh = best_effort(LiveRequest(state("fresh", LOOSE, prompt=2000), to_compute=2000, context=0))
    assert planner.token_budget([*admitted, fresh], waiting=False) > 1.5 * budget


def test_the_window_margin_holds_every_step_short_not_only_the_decode_check():
    # Best-effort decodes and a prompt's chunk fill what the admitted decodes leave; with a window
    # margin the step they fill stays that much short of the TPOT (100 ms / 1.05), so ten steps in
    # a row that run 5 % slower than planned still keep the admitted windows.
    planner = Planner(PER_REQUEST, max_budget=512, headroom=1.0, window_margin=0.05)
    admitted = [decoding(f"l{i}", LOOSE) for i in range(2)]
    running = [*admitted, *(best_effort(decoding(f"b{i}", LOOSE)) for i in range(20))]
    hold = planner.held_back(running, admitted_waiting=False)
    joined = len(running) - sum(hold.held)
    budget = planner.token_budget(running, hold=hold)
    assert PER_REQUEST.step_seconds(budget, joined + 1) <= 0.100 / 1.05 + 1e-9
    # Without the margin one more best-effort decode fits.
    unmargined = Planner(PER_REQUEST, max_budget=512, headroom=1.0)
    assert len(running) - sum(unmargined.held_back(running, admitted_waiting=False).held) == joined + 1
    # A chunk gets the same shorter step: (95.2 - 10 - 3 x 5) ms = 70 tokens, not 75.
    assert planner.token_budget(admitted) == 70
    assert unmargined.token_budget(admitted) == 75


def test_best_effort_yields_the_budget_to_an_admitted_request_that_waits():
    planner = Planner(PER_REQUEST, max_budget=512, headroom=1.0)
    running = [
        *(decoding(f"l{i}", LOOSE) for i in range(2)),
        *(best_effort(decoding(f"b{i}", LOOSE)) for i in range(4)),
    ]
    shared = planner.token_budget(running, hold=planner.held_back(running, admitted_waiting=False))
    assert planner.admit(0.0, arriving("new", LOOSE, 50), running[:2]).admitted
    # The newcomer waits: best effort sits out and its per-request time goes back to the prefill.
    hold = planner.held_back(running, admitted_waiting=True)
    assert hold.held == [False, False, True, True, True, True]
    assert planner.token_budget(running, hold=hold) == 75 > shared


def test_admitted_decodes_always_fit_the_budget():
    planner = Planner(MODEL, max_budget=512, headroom=1.0)
    crowd = [decoding(f"t{i}", TIGHT) for i in range(60)]  # 60 decodes: 70 ms, over the 50 ms bound
    assert planner.token_budget(crowd) == 60


def test_decode_capacity_refuses_the_request_that_would_break_the_tightest_tpot():
    planner = Planner(MODEL, max_budget=512, headroom=1.0)
    running = [decoding(f"t{i}", TIGHT) for i in range(39)]  # 39 decodes + 1 = 50 ms: just fits
    assert planner.admit(0.0, arriving("ok", LOOSE, 10), running).admitted
    decision = planner.admit(0.0, arriving("late", LOOSE, 10), [*running, decoding("t39", TIGHT)])
    assert not decision.admitted
    assert decision.reason.startswith("decode capacity")


# 10 ms a step, 1 ms a token, 0.5 ms a request, 10 us a context token: a decode's cost grows as
# its output does (at 1,000 tokens of context it costs 11.5 ms a step instead of 1.5).
GROW = StepTimeModel(
    "planner-test-growth",
    (LinearPiece(per_token=0.001, per_request=0.0005, per_context_token=1e-5, constant=0.010),),
    max_num_batched_tokens=512,
)


def test_decodes_that_outgrow_their_tpot_give_up_the_most_context_first():
    planner = Planner(GROW, max_budget=512, headroom=1.0)
    young = [decoding(f"y{i}", TIGHT, context=100) for i in range(3)]
    # Four decodes at 100 tokens of context: 10 + 4 x 1.5 + 4 ms = 20 ms, within 50 ms.
    given_up, overrun = planner.overrun([*young, decoding("old", TIGHT, context=100)])
    assert given_up == [] and overrun.admitted
    # The oldest has grown to 2,500 tokens: 10 + 6 + (300 + 2,500 + 4) x 0.01 = 44 ms; with a loose
    # decode of 1,000 more, 10 + 7.5 + 38.1 = 55.6 ms, over the tight tier's 50 ms.
    old, loose = decoding("old", TIGHT, context=2500), decoding("loose", LOOSE, context=1000)
    given_up, overrun = planner.overrun([*young, old, loose])
    assert given_up == [old]  # the most context: without it 10 + 6 + 13.04 = 29 ms
    assert overrun.reason.startswith("decode capacity: 5 decodes")
    # A crowded engine gives up as many as it takes: 60 decodes of 10 ms + 1 ms each, 40 fit 50 ms.
    crowd = [decoding(f"t{i}", TIGHT) for i in range(60)]
    assert len(Planner(MODEL, max_budget=512, headroom=1.0).overrun(crowd)[0]) == 20
    # Best effort is not counted, nor given up: it runs only on leftover time.
    old.state.best_effort = True
    assert planner.overrun([*young, old, loose])[0] == []


def test_a_tight_tier_that_no_longer_fits_is_given_up_before_a_looser_one():
    """A loose decode with a long context and a tight decode overrun the tight TPOT together: the
    tight one goes, since without it the loose one keeps its own TPOT with room to spare; the loose
    one, given up instead, would sit out whole steps and break the TPOT it was promised."""
    planner = Planner(GROW, max_budget=512, headroom=1.0)
    tight, loose = decoding("tight", TIGHT, context=100), decoding("loose", LOOSE, context=4000)
    # 10 + 2 + 1 + 41.02 = 54 ms, over 50 ms; the loose one alone takes 51.5 ms, within its 100 ms.
    given_up, overrun = planner.overrun([tight, loose])
    assert given_up == [tight]
    assert not overrun.admitted


def test_demotion_marks_the_decodes_best_effort_with_the_reason():
    running = [decoding(f"d{i}", TIGHT, context=1200) for i in range(4)]  # 10 + 6 + 48 = 64 ms
    assert make_policy("sloserve-keep", GROW, 512).demote(running) == []
    assert not any(r.state.best_effort for r in running)
    policy = make_policy("sloserve", GROW, 512)
    given_up = policy.demote(running)
    assert len(given_up) == 2  # three take 50.5 ms, two 37 ms
    for r in running:
        demoted = any(r is g for g in given_up)
        assert r.state.best_effort == demoted
        assert r.state.admission.startswith("demoted to best effort: decode capacity") == demoted


def test_demotion_keeps_the_other_decodes_promises():
    """Eight long decodes admitted together outgrow a 50 ms TPOT as their contexts grow: given up
    one at a time, the ones with the most context go to best effort and every other keeps its
    SLO; never giving up any (and vLLM's scheduler) breaks them all."""
    slo = SLO.parse("5s", "50ms")
    trace = [ProgramSpec(k, 0.01 * k, "reasoning", (StageSpec("think", 100, 600, slo),)) for k in range(8)]
    results = simulate(trace, "sloserve", GROW)
    assert all(not r.best_effort or r.admission.startswith("demoted to best effort") for r in results)
    kept = [r for r in results if not r.best_effort]
    assert 0 < len(kept) < len(results) and all(map(met, kept))
    for policy in ("sloserve-keep", "vllm"):
        assert not any(map(met, simulate(trace, policy, GROW)))


def test_an_admitted_request_is_never_made_late_by_a_later_one():
    planner = Planner(MODEL, max_budget=512, headroom=1.0)
    # Alone, 1,000 prompt tokens take a step of 512 (0.522 s) and one of 488 (0.498 s) from the
    # next step on (admission runs between steps): 1.02 s, due by 1.2 s, it fits.
    first = arriving("first", SLO.parse("1200ms", "100ms"), 1000)
    assert planner.admit(0.0, first, []).admitted
    # A later request with an earlier deadline would go first and push `first` past 1.2 s.
    urgent = arriving("urgent", SLO.parse("1100ms", "100ms"), 400)
    decision = planner.admit(0.0, urgent, [first])
    assert not decision.admitted
    assert "first" in decision.reason
    # One that fits behind it is admitted.
    assert planner.admit(0.0, arriving("after", SLO.parse("3s", "100ms"), 400), [first]).admitted


def test_an_unattainable_ttft_goes_to_best_effort_with_its_reason():
    policy = make_policy("sloserve", MODEL, 512)
    hopeless = arriving("hopeless", SLO.parse("100ms", "100ms"), 2000)
    decision = policy.admit(0.0, hopeless, [])
    assert not decision.admitted and decision.reason.startswith("TTFT")
    assert hopeless.state.best_effort and hopeless.state.admission == decision.reason
    # Best effort sorts after every admitted request, waiting or running.
    fine = state("fine", LOOSE, arrival=5.0)
    assert policy.waiting_key(fine) < policy.waiting_key(hopeless.state)
    assert policy.running_key(fine, 3) < policy.running_key(hopeless.state, 0)


def _sim_request(index: int, slo: SLO, prompt: int, output: int) -> SimRequest:
    result = StageResult(index, "chatbot", "chat", 0.0, [], prompt, output, None, None)
    return SimRequest(index, 0, state(str(index), slo, 0.0, prompt), output, result, prompt)


def test_best_effort_work_is_preempted_first():
    config = SimConfig(MODEL, kv_capacity_tokens=64 * 16, max_num_seqs=8)  # 64 blocks of 16 tokens
    engine = Engine(make_policy("sloserve", MODEL, 512), config)
    admitted = _sim_request(0, LOOSE, prompt=300, output=400)
    best_effort = _sim_request(1, SLO.parse("1ms", "100ms"), prompt=300, output=400)  # TTFT unattainable
    engine.add(admitted, 0.0)
    engine.add(best_effort, 0.0)
    assert best_effort.state.best_effort and not admitted.state.best_effort
    now = 0.0
    while engine.preemptions == 0:
        batch = engine.schedule(now)
        now += batch.seconds
        engine.complete(batch, now)
    # KV ran out as both grew: the best-effort request went back to waiting, the admitted one runs on.
    assert engine.running == [admitted]
    assert best_effort.computed_tokens == 0


def test_admission_keeps_the_admitted_requests_within_the_engine_cap():
    """vLLM runs at most ``max_num_seqs`` requests at once: an admitted request past the cap would
    wait for one to finish, however short its prefill."""
    ttft_only = SLO.parse("2000ms", None)
    two = [decoding("a", ttft_only), decoding("b", ttft_only)]
    newcomer = arriving("c", ttft_only, 50)
    decision = Planner(MODEL, max_budget=512, max_running=2).admit(0.0, newcomer, two)
    assert not decision.admitted
    assert decision.reason == "running requests: 3 admitted requests, over the engine's 2 at once (max_num_seqs)"
    # Best effort holds no promise and gives its place up (``make_room``): it does not count.
    with_best_effort = [two[0], best_effort(decoding("b2", ttft_only))]
    capped = Planner(MODEL, max_budget=512, max_running=2)
    assert capped.admit(0.0, arriving("d", ttft_only, 50), with_best_effort).admitted
    assert Planner(MODEL, max_budget=512).admit(0.0, arriving("e", ttft_only, 50), two).admitted  # no cap


def test_best_effort_gives_its_place_up_to_an_admitted_request_at_the_cap():
    planner = Planner(MODEL, max_budget=512, max_running=3)
    admitted = decoding("a", LOOSE)
    late, later = best_effort(decoding("be0", LOOSE)), best_effort(decoding("be1", LOOSE))
    running = [admitted, late, later]  # running order: best effort last
    assert planner.make_room(running, admitted_waiting=1) == [later]  # the last in running order first
    assert planner.make_room(running, admitted_waiting=2) == [later, late]
    assert planner.make_room(running, admitted_waiting=3) == [later, late]  # admitted requests keep theirs
    assert planner.make_room(running, admitted_waiting=0) == []
    assert planner.make_room(running[:2], admitted_waiting=1) == []  # a place is free
    assert Planner(MODEL, max_budget=512).make_room(running, admitted_waiting=1) == []  # no cap


def test_admitted_requests_keep_their_ttft_at_the_cap_on_running_requests():
    """Long best-effort decodes fill every place; each admitted arrival takes one back at once, and
    the best effort resumes and finishes once places return."""
    hopeless, ttft_only = SLO.parse("1ms", None), SLO.parse("800ms", None)
    trace = [ProgramSpec(i, 0.0, "chatbot", (StageSpec("chat", 200, 300, hopeless),)) for i in range(4)]
    trace += [ProgramSpec(4 + i, 0.5 + 0.2 * i, "chat-ttft", (StageSpec("chat", 50, 10, ttft_only),)) for i in range(6)]
    config = SimConfig(MODEL, max_num_seqs=4)
    results = simulate(trace, "sloserve", MODEL, config)
    admitted = [result for result in results if result.kind == "chat-ttft"]
    assert not any(result.best_effort for result in admitted) and all(met(result) for result in admitted)
    assert all(len(result.token_times) == result.output_tokens for result in results)  # nothing lost
    # Stock vLLM keeps the places in arrival order: the same arrivals wait for a long decode to end.
    stock = [result for result in simulate(trace, "vllm", MODEL, config) if result.kind == "chat-ttft"]
    assert not any(map(met, stock))


def met(result: StageResult) -> bool:
    return judge(result.arrival, result.token_times, result.ttft_target_ms, result.tpot_target_ms).met


def flood() -> list[ProgramSpec]:
    """50 requests/s, one in ten of the tight tier: far over what these engines serve."""
    trace = []
    for index in range(400):
        tight = index % 10 == 0
        slo, prompt = (TIGHT, 200) if tight else (LOOSE, 400)
        stage = StageSpec("chat", prompt_tokens=prompt, output_tokens=40, slo=slo)
        trace.append(ProgramSpec(index, index * 0.02, "coding" if tight else "chatbot", (stage,)))
    return trace


def test_a_tight_tier_is_not_starved_by_a_flood_of_loose_requests():
    trace = flood()
    results = simulate(trace, "sloserve", MODEL)
    admitted = [result for result in results if not result.best_effort]
    assert admitted and all(met(result) for result in admitted)  # every promise kept
    tight = [result for result in results if result.kind == "coding"]
    assert sum(not result.best_effort for result in tight) >= len(tight) / 2
    fcfs_tight = [result for result in simulate(trace, "vllm", MODEL) if result.kind == "coding"]
    assert sum(map(met, tight)) > 2 * sum(map(met, fcfs_tight))


@pytest.mark.parametrize("policy", ["sloserve", "sloserve-edf", "vllm"])
def test_every_request_finishes_under_every_policy(policy):
    trace = [
        ProgramSpec(i, i * 0.05, "chatbot", (StageSpec("chat", 300, 20, TIGHT if i % 2 else LOOSE),))
        for i in range(200)
    ]
    # Far over capacity: every best-effort request is kept to be served (no bound on their queue).
    results = simulate(trace, policy, MODEL, SimConfig(MODEL, max_queued_best_effort=None))
    assert all(len(r.token_times) == r.output_tokens for r in results)
    assert all(math.isfinite(r.token_times[-1]) for r in results)


def test_decode_without_tpot_yields_to_a_waiting_prefill_but_is_not_starved():
    planner = Planner(MODEL, max_budget=512, max_yields=2)
    free = decoding("no-tpot", SLO.parse("1s", None))
    paced = decoding("paced", LOOSE)
    running = [paced, free]
    # While an admitted request waits, the decode with no deadline sits out; the paced one never.
    assert planner.held_back(running, admitted_waiting=True).held == [False, True]
    assert planner.held_back(running, admitted_waiting=True).held == [False, True]
    # Two steps in a row given up: it runs the third even though prefills still wait.
    assert planner.held_back(running, admitted_waiting=True).held == [False, False]
    assert planner.held_back(running, admitted_waiting=True).held == [False, True]
    # Nothing waits: it runs, and its count starts over.
    assert planner.held_back(running, admitted_waiting=False).held == [False, False]
    assert free.state.yielded_steps == 0


def test_decodes_without_tpot_yield_only_when_a_prompt_would_be_late():
    """They sit a step out for a waiting prompt only if its first token, predicted with them in
    every step and ``yield_margin`` (1.0) slower, would miss its deadline."""
    planner = Planner(MODEL, max_budget=512)
    free = [decoding(f"free{i}", SLO.parse("2s", None)) for i in range(10)]
    # A 100-token prompt beside the ten decodes: one step of 10 + 110 ms; twice that is well within 1 s.
    short = arriving("short", SLO.parse("1s", None), 100)
    assert planner.held_back(free, True, 0.0, [short]).held == [False] * 10
    assert all(r.state.yielded_steps == 0 for r in free)
    # A 300-token prompt with a 500 ms TTFT: 320 ms beside them, 640 ms with the margin. They sit out,
    # and its step is 310 ms.
    long = arriving("long", SLO.parse("500ms", None), 300)
    assert planner.held_back(free, True, 0.0, [long]).held == [True] * 10
    # Several wait: one that would be late is enough (this one has waited 100 ms already, and the
    # short prompt's deadline comes after its own).
    waited = arriving("waited", SLO.parse("500ms", None), 300, arrival=-0.1)
    assert planner.held_back(free, True, 0.0, [short, waited]).held == [True] * 10
    # Only the first ``yield_lookahead`` prompts in prefill order are weighed: a 500-token prompt
    # with a 1,200 ms TTFT, behind the short one, comes late at twice its predicted time (after
    # the short prompt's 120 ms step, 10 + 11 + 500 ms: 2 x 641 ms), but with a lookahead of one
    # the check stops at the short prompt (and runs again next step).
    behind = arriving("behind", SLO.parse("1200ms", None), 500)
    assert planner.held_back(free, True, 0.0, [short, behind]).held == [True] * 10
    planner.yield_lookahead = 1
    assert planner.held_back(free, True, 0.0, [short, behind]).held == [False] * 10
    planner.yield_lookahead = 8
    # Without the waiting requests, or with the margin off, they sit out whenever one waits, as
    # admission assumes they may (still within ``max_yields`` in a row).
    assert planner.held_back(free, True, 0.0).held == [True] * 10
    planner.yield_margin = None
    assert planner.held_back(free, True, 0.0, [short]).held == [True] * 10
    assert all(r.state.yielded_steps == 2 for r in free)  # two in a row since they last ran
    # A paced decode never yields, and with no decode to yield nothing is predicted.
    planner.yield_margin = 1.0
    paced = [decoding("paced", LOOSE)]
    assert planner.held_back(paced, True, 0.0, [long]).held == [False]


def test_prefill_chunks_go_before_decodes_without_tpot():
    policy = make_policy("sloserve", MODEL, 512)
    paced, free, chunk = state("paced", LOOSE), state("free", SLO.parse("1s", None)), state("chunk", TIGHT)
    keys = {
        "paced decode": policy.running_key(paced, 5),
        "chunk": policy.running_key(chunk, 0),
        "free decode": policy.running_key(free, 5),
    }
    assert sorted(keys, key=keys.get) == ["paced decode", "chunk", "free decode"]


def test_budget_reserves_a_waiting_request_only_when_one_waits():
    planner = Planner(PER_REQUEST, max_budget=512, headroom=1.0)
    decodes = [decoding(f"l{i}", LOOSE) for i in range(2)]
    chunk = LiveRequest(state("c", LOOSE), to_compute=300, context=100)
    # Two decodes and the running chunk: 100 ms - 10 - 3 x 5 = 75 tokens when nobody waits;
    # one request's 5 ms (5 tokens) fewer when a waiting request may start beside them.
    assert planner.token_budget([*decodes, chunk], waiting=False) == 75
    assert planner.token_budget([*decodes, chunk], waiting=True) == 70


def speculating_planner(alpha: float) -> Planner:
    policy = make_policy("sloserve", PER_REQUEST, 512, max_spec_length=4)
    policy.speculation.acceptance.prior = alpha
    return policy.planner


def test_speculation_lets_a_tight_tier_decode_more_requests():
    # 50 ms TPOT, 10 ms a step and 5 ms a request: 7 decodes (46 ms) fit a step, 8 (51 ms) do not.
    crowd = [decoding(f"t{i}", TIGHT) for i in range(7)]
    newcomer = arriving("n", TIGHT, prompt=10)
    assert not Planner(PER_REQUEST, max_budget=512).admit(0.0, newcomer, crowd).admitted
    # Drafts accepted 90 % of the time: a step yields several tokens, so it may take several TPOTs.
    assert speculating_planner(0.9).admit(0.0, newcomer, crowd).admitted
    # Drafts never accepted: speculation buys nothing, and the answer stays no.
    assert not speculating_planner(0.0).admit(0.0, newcomer, crowd).admitted


def test_speculating_tier_gets_a_budget_for_its_drafts_and_a_longer_step():
    planner = speculating_planner(0.9)
    decodes = [decoding(f"t{i}", TIGHT) for i in range(7)]
    budget = planner.token_budget(decodes, waiting=False)
    length = planner.speculation.length(TIGHT.tpot_ms / 1000)
    assert length > 1
    assert budget >= 7 * length  # every decode verifies its drafts
    bound = 0.050 * planner.speculation.window_tokens_per_step(0.050)
    assert PER_REQUEST.step_seconds(budget, 7) <= bound * planner.headroom + 1e-9  # nobody waits: 7 requests


def test_admission_predicts_that_decodes_without_tpot_yield_to_a_prompt():
    # 100 decodes without a TPOT target run; a 100-token prompt with a 400 ms TTFT arrives. They
    # sit out its prefill step (``held_back``), so it waits for their step under way (110 ms) and
    # then takes its own (110 ms); counting them in its prefill step would predict a full 512-token
    # step first (522 ms) and refuse it.
    planner = Planner(MODEL, max_budget=512)
    free = [decoding(f"free{i}", SLO.parse("1s", None)) for i in range(100)]
    prompt = arriving("prompt", SLO.parse("400ms", None), 100)
    assert planner.first_token_time(0.0, prompt, free) == pytest.approx(0.220)
    assert planner.admit(0.0, prompt, free).admitted


@pytest.mark.parametrize("speculate", [False, True])
def test_decode_load_in_one_pass_is_the_decodes_added_one_by_one(speculate):
    """Admission's hot path counts the decodes per tier; it must say what adding them one by one says."""
    from sloserve_runtime.core.planner.forecast import DecodeLoad
    from sloserve_runtime.core.speculation import TierSpeculation

    speculation = TierSpeculation(MODEL, max_length=4, prior=0.6) if speculate else None
    planner = Planner(MODEL, max_budget=512, speculation=speculation)
    free = SLO.parse("2000ms", None)
    decodes = [decoding(f"d{i}", (TIGHT, LOOSE, free)[i % 3], context=50 + 7 * i) for i in range(20)]
    folded = DecodeLoad(math.inf, 0, 0, 0)
    for r in decodes:
        folded = planner._with_decode(folded, r.state.tpot_seconds, r.context + 1)
    assert planner._decode_load(decodes) == folded
    assert folded.free == 6 and folded.requests == 14  # every tier was counted


@pytest.mark.parametrize("decodes", [2, 60])
def test_forward_simulation_gives_each_prefill_its_fold_of_the_ones_before(decodes):
    """First-token times are the prefills run one after another; with the decodes alone over their
    TPOT (60 of them at 1 ms a token and 10 ms a step, against 50 ms) every one of them is never."""
    planner = Planner(MODEL, max_budget=512, headroom=1.0)
    running = [decoding(f"d{i}", TIGHT) for i in range(decodes)]
    pending = [arriving(f"p{i}", LOOSE, prompt=40 + 30 * i, arrival=0.001 * i) for i in range(5)]
    times = planner._first_tokens(0.0, pending, running)
    clock, load = planner._forward_start(0.0, running, len(pending), step_under_way=False)
    for request in pending:
        clock, load = planner._prefill(clock, load, request)
        assert times[request.state.request_id] == clock
    assert all(math.isinf(t) for t in times.values()) == (decodes == 60)


def test_overhead_bench_walks_every_prefill_of_its_ttft_only_state():
    """The overhead bench's longest path: with TTFT targets only, every first token is reachable,
    so the forward simulation walks each prefill chunk by chunk instead of stopping at the first."""
    import random

    from sloserve_runtime.measure.overhead import TTFT_ONLY, _live_states

    live = _live_states(64, MODEL, random.Random(0), (TTFT_ONLY,))
    queue = [r for r in live if not r.decoding]
    times = Planner(MODEL, max_budget=512)._first_tokens(0.0, queue, live)
    assert len(times) == 16 and all(math.isfinite(t) for t in times.values())


@pytest.mark.parametrize("admitted_waiting", [False, True])
def test_budget_after_held_back_is_the_budget_of_a_fresh_look(admitted_waiting):
    """``held_back`` sorts the running requests once for the step and ``token_budget`` reuses that
    through the ``Hold``; the budget must be what a look of its own finds, and a hold made for
    another list is sorted anew. The planner keeps nothing between the calls."""
    running = [
        *(decoding(f"t{i}", TIGHT, context=40 + i) for i in range(2)),
        *(decoding(f"l{i}", LOOSE, context=60 + i) for i in range(2)),
        decoding("free", SLO.parse("2000ms", None)),
        *(best_effort(decoding(f"b{i}", LOOSE)) for i in range(4)),
    ]
    planner = Planner(PER_REQUEST, max_budget=512, headroom=1.0)
    hold = planner.held_back(running, admitted_waiting, now=1.0)
    assert hold.held == planner.held_back(list(running), admitted_waiting, now=1.0).held
    fresh = hold._replace(running=None)
    assert planner.token_budget(running, now=1.0, hold=hold) == planner.token_budget(running, now=1.0, hold=fresh)
    # A list ``held_back`` did not see: the tight tier has left, so the step may run longer.
    loose_only = [r for r in running if r.state.tpot_seconds != TIGHT.tpot_ms / 1000]
    loose_hold = hold._replace(held=[False] * len(loose_only))
    assert planner.token_budget(loose_only, now=1.0, hold=loose_hold) == planner.token_budget(
        loose_only, now=1.0, hold=loose_hold._replace(running=None)
    )
    assert planner.token_budget(loose_only, now=1.0) > planner.token_budget(running, now=1.0)


def test_a_feasibility_query_leaves_the_planner_as_it_found_it():
    """Admission and the router's forecast change no state: the same step planned before and after
    them gets the same budget and speculation lengths, whatever they decided."""
    planner = speculating_planner(0.9)
    running = [decoding(f"l{i}", LOOSE, context=60 + i) for i in range(3)]
    hold = planner.held_back(running, admitted_waiting=False, now=1.0)
    before = planner.token_budget(running, now=1.0, hold=hold)
    tiers = (TIGHT.tpot_ms / 1000, LOOSE.tpot_ms / 1000)
    lengths = [planner.speculation.length(tpot) for tpot in tiers]
    crowd = [decoding(f"c{i}", TIGHT, context=500) for i in range(30)]
    planner.admit(1.0, arriving("new", TIGHT, 50), crowd)
    planner.first_token_time(1.0, arriving("routed", LOOSE, 50), crowd)
    assert [planner.speculation.length(tpot) for tpot in tiers] == lengths
    assert planner.token_budget(running, now=1.0, hold=hold) == before


def test_a_tight_request_that_would_make_admitted_loose_prompts_late_is_not_admitted():
    """Once a tight request decodes, every step is held to its TPOT, and the prompts after it crawl
    in small chunks: admission weighs that for the admitted prompts that wait, not only its own fit."""
    planner = Planner(MODEL, max_budget=512)
    loose_decode = decoding("l0", LOOSE)
    # Beside the loose decode alone, 1,000 prompt tokens take 12 steps of about 99 ms: 1.13 s.
    waiting = arriving("l1", SLO.parse("1300ms", "100ms"), 1000)
    assert planner._first_tokens(0.0, [waiting], [loose_decode, waiting])["l1"] == pytest.approx(1.13, abs=0.01)
    # A tight request (50 ms TPOT) prefills first (earlier deadline), then halves every step's bound.
    tight = arriving("t", SLO.parse("600ms", "50ms"), 20)
    decision = planner.admit(0.0, tight, [loose_decode, waiting])
    assert not decision.admitted
    assert decision.reason == "TTFT: would make admitted request l1 late"
    # The same request in the loose tier costs the waiting prompt nothing it cannot spare.
    assert planner.admit(0.0, arriving("l2", SLO.parse("600ms", "100ms"), 20), [loose_decode, waiting]).admitted
    # With seconds of slack, the loose prompt can afford the tight tier's small steps.
    relaxed = arriving("l1", SLO.parse("3s", "100ms"), 1000)
    assert planner.admit(0.0, tight, [loose_decode, relaxed]).admitted


def test_on_two_tiers_no_tier_pays_for_the_other():
    """The two-tiers scenario on the CPU profile, at half and about once our capacity: ours meets at
    least as many calls of each tier as stock vLLM, and keeps its promise in each tier."""
    from sloserve_runtime.core.step_time import resolve_profile
    from sloserve_runtime.measure.runs import TraceOptions
    from sloserve_runtime.workload.scenarios import load_scenario

    config = SimConfig.from_profile(resolve_profile("cpu-smollm2-135m"))
    for rate in (0.3, 0.6):
        trace = TraceOptions(num_programs=80).trace(load_scenario("two-tiers"), rate)
        ours = simulate(trace, "sloserve", config.step_time, config)
        stock = simulate(trace, "vllm", config.step_time, config)
        for tier in ("interactive", "batch"):
            mine = [result for result in ours if result.kind == tier]
            theirs = [result for result in stock if result.kind == tier]
            assert sum(map(met, mine)) >= sum(map(met, theirs)), (rate, tier)
            admitted = [result for result in mine if not result.best_effort]
            assert admitted and sum(map(met, admitted)) >= 0.9 * len(admitted), (rate, tier)
        assert sum(map(met, ours)) > sum(map(met, stock)), rate


def test_first_tokens_are_judged_with_the_calibrated_margin():
    """Online calibration plans each step ``window_margin`` short; admission stretches each predicted
    wait for a first token as much, so a prompt predicted just in time on the model is refused once
    the engine's steps have lately run that much slower."""
    prompt = arriving("p", SLO.parse("1s", None), 400)
    # 400 tokens beside nothing: the engine's own budget, one step of 10 + 400 ms.
    assert Planner(MODEL, max_budget=512)._first_tokens(0.0, [prompt], [])["p"] == pytest.approx(0.41)
    tight = arriving("q", SLO.parse("430ms", None), 400)
    assert Planner(MODEL, max_budget=512).admit(0.0, tight, []).admitted
    late = Planner(MODEL, max_budget=512, window_margin=0.1).admit(0.0, tight, [])
    assert not late.admitted
    assert late.reason.startswith("TTFT: first token predicted at 451 ms, target 430 ms")


def test_a_step_planned_for_admitted_prompts_leaves_no_budget_to_start_best_effort():
    """Whatever the admitted prompts leave of a step's budget would start a waiting best-effort
    prompt in vLLM, and the step would outrun the bound their first tokens were promised on."""
    planner = Planner(MODEL, max_budget=512, headroom=1.0)
    loose, chunk = decoding("l", LOOSE), LiveRequest(state("p", LOOSE), to_compute=50, context=20)
    # Bound 100 ms: 90 tokens would fit, but the decode and the prompt's last 50 need only 51.
    assert planner.token_budget([loose, chunk]) == 51
    # An admitted prompt that waits to start takes its share too: 1 + 50 + 30.
    hold = planner.held_back([loose, chunk], admitted_waiting=True, waiting=[arriving("w", LOOSE, 30)])
    assert planner.token_budget([loose, chunk], hold=hold) == 81
    # With only decodes running, the leftover is best effort's, as before.
    assert planner.token_budget([loose]) == 90
