"""The vLLM adapter and the simulator decide alike: same admissions, same batches, step after step.

Both plan each step with the one pipeline (``core.step.plan_step``); what this checks is that
the two engines' views of their queues, and the way each applies a plan, agree with each other.

``SLOScheduler`` (our subclass of vLLM's v1 ``Scheduler``) is built in-process on the default
model's engine config, with a hand-made KV cache and no model: each "forward pass" samples one
fixed token for every request whose tokens are all computed. The simulator's ``Engine`` gets the
same requests (same SLOs, arrivals, prompt and output lengths), the same step-time profile and the
same limits (token budget, running requests, KV blocks). The two run in lockstep on one clock:
the simulator's, advanced by its predicted step times; the adapter reads ``time.time()``, so its
module's ``time`` is replaced by that clock. Nothing is started: no server, no engine process.
Where vLLM schedules asynchronously, the adapter is built on vLLM's ``AsyncScheduler`` and driven
as vLLM's engine core then drives it, each step scheduled while the one before it runs
(``AsyncLockstep``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import zmq
from vllm.engine.arg_utils import EngineArgs
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from sloserve.slo import SLO
from sloserve_runtime.core.policies import make_policy
from sloserve_runtime.core.programs import ProgramCall
from sloserve_runtime.core.slo_state import SLORequestState, slo_to_xargs
from sloserve_runtime.core.step_time import LinearPiece, StepTimeModel
from sloserve_runtime.engine import recorder as recorder_module
from sloserve_runtime.engine import scheduler as scheduler_module
from sloserve_runtime.engine.config import SLOConfig
from sloserve_runtime.engine.notices import PREEMPTED, PROMOTED, XARG_TAG, Notice, NoticePublisher
from sloserve_runtime.engine.recorder import StepRecorder
from sloserve_runtime.engine.scheduler import RecordingScheduler, SLOScheduler
from sloserve_runtime.serving import server
from sloserve_runtime.serving.model import ensure_default_model
from sloserve_runtime.sim.config import SimConfig
from sloserve_runtime.sim.engine import Batch, Engine
from sloserve_runtime.sim.request import SimRequest
from sloserve_runtime.workload.programs import StageResult

# 10 ms a step, 1 ms a token, 0.5 ms a request, 1 us a context token: a full 512-token step takes
# about 0.52 s, and ten short decodes already break a 25 ms TPOT.
MODEL = StepTimeModel(
    "parity-test",
    (LinearPiece(per_token=0.001, per_request=0.0005, per_context_token=1e-6, constant=0.010),),
    max_num_batched_tokens=512,
)
MAX_BATCHED_TOKENS = 512
MAX_MODEL_LEN = 2048
SAMPLED = 1000  # the token every forward pass samples (not SmolLM2's EOS; ignore_eos is set anyway)
NOW = 1_700_000_000.0  # wall-clock time of the first step


@dataclass(frozen=True)
class Spec:
    """One request, as both sides get it."""

    name: str
    prompt: int
    output: int
    ttft: str | None
    tpot: str | None
    at: float = 0.0  # arrival, in seconds after NOW (negative: it was sent before)

    @property
    def arrival(self) -> float:
        return NOW + self.at

    @property
    def slo(self) -> SLO:
        return SLO.parse(self.ttft, self.tpot)


# All present at the first step: loose and tight TPOT tiers, a slowdown TTFT, one without any SLO;
# two cannot get their first token in time behind the admitted prefills and go to best effort.
BURST = [
    Spec("a", 300, 12, "2s", "100ms", -0.30),
    Spec("b", 120, 12, "1500ms", "40ms", -0.25),
    Spec("c", 700, 12, "4s", "200ms", -0.20),
    Spec("d", 60, 12, "900ms", "40ms", -0.15),
    Spec("e", 900, 12, "2500ms", "100ms", -0.10),
    Spec("f", 200, 12, "3x", None, -0.09),  # TTFT: its earlier deadline would make c late
    Spec("g", 50, 12, "1s", "40ms", -0.08),  # TTFT: the same
    Spec("h", 400, 12, "3s", "40ms", -0.05),  # TTFT: four earlier deadlines ahead, 51 ms late
    Spec("i", 80, 12, None, None, -0.04),
    Spec("j", 150, 12, "5s", "25ms", -0.02),
]

# Arrivals while others prefill and decode: the 25 ms tier fills up ("decode capacity"), later
# arrivals go to best effort, and several are promoted once decodes finish.
STREAM = [
    *(Spec(f"t{k}", 100 + 37 * k, 20, "3s", "25ms", 0.05 * k) for k in range(10)),
    *(Spec(f"s{k}", 30, 30, "5s", "25ms", 0.01) for k in range(6)),
    Spec("nos", 600, 5, "2s", None, 0.30),
    Spec("late", 300, 10, "4s", "200ms", 0.52),
    Spec("x", 250, 6, "10x", "100ms", 0.60),
]

# Long outputs in a small KV cache: the running requests outgrow it and vLLM preempts the last
# running one (best effort first); preempted requests recompute from the start.
KV_TIGHT = [
    *(Spec(f"k{k}", 250 + 10 * k, 260, "8s", "200ms", 0.02 * k) for k in range(4)),
    Spec("kbe", 200, 200, "1ms", "200ms", 0.01),  # TTFT unattainable: best effort
    Spec("knone", 300, 150, None, None, 0.05),
]


# Long outputs whose growing contexts outgrow a 25 ms TPOT (a token of context costs 1 us a
# step): the planner gives up the decodes with the most context to best effort, one by one.
GROWTH = [Spec(f"g{k}", 200 + 20 * k, 1000, "20s", "25ms", 0.01 * k) for k in range(8)]


# Three places for running requests: two best-effort requests (their TTFT is unattainable) take two
# of them, and admitted arrivals take them back one by one (preempting the best effort); the
# admitted request that would make four is refused for want of a place, and promoted later.
CAPPED_SEQS = 3
SEQ_CAP = [
    Spec("be1", 300, 120, "1ms", None, 0.0),
    Spec("be2", 320, 120, "1ms", None, 0.0),
    Spec("a1", 100, 150, "5s", None, 0.0),
    Spec("a2", 50, 20, "3s", None, 0.2),
    Spec("a3", 60, 20, "3s", None, 0.25),
    Spec("a4", 70, 20, "3s", None, 0.3),
]


# A bound of two on the best-effort requests waiting to start: of five arrivals whose TTFT is out
# of reach, two wait as best effort and three are refused (an HTTP 429 from a server).
QUEUE_BOUND = 2
QUEUE = [
    Spec("q0", 400, 40, "5s", "200ms", 0.0),
    *(Spec(f"hopeless{k}", 200, 20, "1ms", None, 0.0) for k in range(5)),
    Spec("q1", 100, 20, "5s", "200ms", 0.1),
]


# Decodes without a TPOT target (a server's --slo-ttft-ms alone) and two prompts that arrive while
# they run: the short one's first token is on time beside them, and they keep decoding; the long
# one's, with a 500 ms TTFT, is not, and they sit its prefill step out.
YIELD = [
    *(Spec(f"d{k}", 100, 200, "2s", None, 0.0) for k in range(6)),
    Spec("short", 100, 5, "1s", None, 0.5),
    Spec("long", 400, 5, "500ms", None, 1.0),
]


@dataclass(frozen=True)
class Scenario:
    specs: list[Spec]
    num_blocks: int  # KV blocks of the hand-made cache (block size: the engine config's, 128 on CPU)


SCENARIOS = {
    "burst": Scenario(BURST, num_blocks=1024),
    "stream": Scenario(STREAM, num_blocks=1024),
    "kv-tight": Scenario(KV_TIGHT, num_blocks=14),
    "growth": Scenario(GROWTH, num_blocks=1024),
}


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("parity") / "profile.json"
    path.write_text(json.dumps(MODEL.to_json()))
    return path


def engine_config(
    profile: Path,
    prefix_caching: bool,
    step_log: Path | None = None,
    max_num_seqs: int | None = None,
    max_queued_best_effort: int | None = None,
    async_scheduling: bool = False,
):
    """The engine config ``sloserve serve`` gives vLLM, for the default model (loads its HF config: slow).

    ``async_scheduling``: as vLLM decides on a GPU build, where it schedules asynchronously by
    default (``VllmConfig.__post_init__``); on this CPU build the platform turns it off
    (``CpuPlatform.check_and_update_config``), so it is turned back on here.
    """
    args = EngineArgs(
        model=str(ensure_default_model()),
        max_model_len=MAX_MODEL_LEN,
        max_num_batched_tokens=MAX_BATCHED_TOKENS,
        max_num_seqs=max_num_seqs,
        enable_prefix_caching=prefix_caching,
        enforce_eager=True,
        scheduler_cls="sloserve_runtime.engine.scheduler.SLOScheduler",
        additional_config=SLOConfig(
            profile=str(profile),
            step_log=None if step_log is None else str(step_log),
            calibrate=False,
            max_queued_best_effort=max_queued_best_effort,
        ).to_additional_config(),
    )
    config = args.create_engine_config()
    config.scheduler_config.async_scheduling = async_scheduling
    return config


@pytest.fixture(scope="module")
def vllm_config(profile: Path):
    """Without prefix caching: a preempted request recomputes in full (the cached case is below)."""
    return engine_config(profile, prefix_caching=False)


@pytest.fixture(scope="module")
def vllm_config_cached(profile: Path):
    """With vLLM's automatic prefix caching, as ``sloserve serve`` runs by default."""
    return engine_config(profile, prefix_caching=True)


@pytest.fixture(scope="module")
def capped_config(profile: Path):
    """Room for only ``CAPPED_SEQS`` running requests (``--max-num-seqs``): the cap binds before memory."""
    return engine_config(profile, prefix_caching=True, max_num_seqs=CAPPED_SEQS)


@pytest.fixture(scope="module")
def queue_config(profile: Path):
    """At most ``QUEUE_BOUND`` best-effort requests waiting to start (``--max-queued-best-effort``)."""
    return engine_config(profile, prefix_caching=True, max_queued_best_effort=QUEUE_BOUND)


@pytest.fixture(scope="module")
def stock_config(profile: Path, tmp_path_factory: pytest.TempPathFactory):
    """For vLLM's stock scheduler with a step log, as ``sloserve serve --scheduler vllm --step-log``."""
    return engine_config(profile, prefix_caching=False, step_log=tmp_path_factory.mktemp("stock") / "steps.jsonl")


@pytest.fixture(scope="module")
def async_config(profile: Path):
    """``vllm_config`` as a GPU build runs it: vLLM schedules asynchronously."""
    return engine_config(profile, prefix_caching=False, async_scheduling=True)


@pytest.fixture(scope="module")
def async_stock_config(profile: Path, tmp_path_factory: pytest.TempPathFactory):
    """``stock_config`` as a GPU build runs it: vLLM schedules asynchronously."""
    step_log = tmp_path_factory.mktemp("async-stock") / "steps.jsonl"
    return engine_config(profile, prefix_caching=False, step_log=step_log, async_scheduling=True)


class Clock:
    """Stands in for the ``time`` module inside ``sloserve_runtime.engine.scheduler``: ``time()`` reads ``now``."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.perf_counter = time.perf_counter  # the step recorder's timer (unused here)
        self.monotonic = time.monotonic  # vLLM's event timestamps (a preemption's)

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    shared = Clock(NOW)
    monkeypatch.setattr(scheduler_module, "time", shared)
    # In vLLM's engine-core process this ties the process to the API server (and exits if the
    # server is gone); in pytest it would tie pytest to its parent: not here.
    monkeypatch.setattr(scheduler_module, "die_with_server", lambda: None)
    return shared


def make_scheduler(vllm_config, num_blocks: int, scheduler_cls: type[RecordingScheduler] = SLOScheduler):
    vllm_config.cache_config.num_gpu_blocks = num_blocks  # what vLLM sets once it has sized the cache
    block_size = vllm_config.cache_config.block_size
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=1, dtype=torch.float32)
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)]
    )
    return scheduler_cls(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size,
    )


def make_engine(vllm_config, num_blocks: int, policy: str = "sloserve") -> Engine:
    block_size = vllm_config.cache_config.block_size
    config = SimConfig(
        MODEL,
        kv_capacity_tokens=(num_blocks - 1) * block_size,  # vLLM's block pool keeps one block (its null block)
        max_num_seqs=vllm_config.scheduler_config.max_num_seqs,
        max_num_batched_tokens=MAX_BATCHED_TOKENS,
        block_size=block_size,
        enable_prefix_caching=vllm_config.cache_config.enable_prefix_caching,
        # The bound the adapter reads from its config (the fixtures' ``None``: none, as before it).
        max_queued_best_effort=SLOConfig.from_additional_config(vllm_config.additional_config).max_queued_best_effort,
    )
    # The adapter tells its policy vLLM's cap on running requests; so does the simulator's cluster.
    return Engine(make_policy(policy, MODEL, MAX_BATCHED_TOKENS, max_running=config.max_num_seqs), config)


def vllm_request(index: int, spec: Spec, block_hasher=None, tagged: bool = False) -> Request:
    """``tagged``: as the middleware sends it, with a tag for its admission notices (its name)."""
    xargs = slo_to_xargs(spec.slo, spec.arrival) | ({XARG_TAG: spec.name} if tagged else {})
    params = SamplingParams(max_tokens=spec.output, ignore_eos=True, extra_args=xargs)
    prompt = [100 + 1000 * index + k % 1000 for k in range(spec.prompt)]  # no prefix shared with another
    return Request(spec.name, prompt, params, None, arrival_time=spec.arrival, block_hasher=block_hasher)


def block_hasher(vllm_config):
    """What vLLM's engine core hashes each request's full blocks with, when prefix caching is on."""
    if not vllm_config.cache_config.enable_prefix_caching:
        return None
    hash_fn = get_hash_fn_by_name(vllm_config.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    return get_request_block_hasher(vllm_config.cache_config.block_size, hash_fn)


def sim_request(index: int, spec: Spec) -> SimRequest:
    state = SLORequestState.create(spec.name, spec.slo, spec.arrival, spec.prompt, MODEL)
    result = StageResult(index, "chatbot", "chat", spec.arrival, [], spec.prompt, spec.output, None, None)
    return SimRequest(index, 0, state, spec.output, result, spec.prompt)


Scheduled = list[tuple[str, int]]  # (request id, tokens) in scheduling order


def forward_pass(requests: dict[str, Request], ids: list[str]) -> ModelRunnerOutput:
    """What the model runner would return: one token for each request whose tokens are all computed."""
    # schedule() has advanced num_computed_tokens already; a partial prefill chunk samples nothing.
    sampled = [[SAMPLED] if requests[name].num_computed_tokens >= requests[name].num_tokens else [] for name in ids]
    index = {name: i for i, name in enumerate(ids)}
    return ModelRunnerOutput(req_ids=ids, req_id_to_index=index, sampled_token_ids=sampled)


class Lockstep:
    """The adapter and the simulator on one clock, fed the same arrivals, stepped together."""

    def __init__(
        self, vllm_config, clock: Clock, scenario: Scenario, stock: bool = False, notices: str | None = None
    ) -> None:
        """``stock``: vLLM's own scheduler (``RecordingScheduler`` decides as vLLM does) against the
        simulator's ``vllm``; otherwise ours against the simulator's ``sloserve``. ``notices``:
        where our scheduler pushes its admission notices, the requests tagged with their names."""
        self.clock = clock
        self.stock = stock
        self.tagged = notices is not None
        scheduler_cls = RecordingScheduler if stock else SLOScheduler
        self.scheduler = make_scheduler(vllm_config, scenario.num_blocks, scheduler_cls)
        self.engine = make_engine(vllm_config, scenario.num_blocks, "vllm" if stock else "sloserve")
        if notices is not None:
            self.scheduler.notices = NoticePublisher(notices)
        self.block_hasher = block_hasher(vllm_config)
        self.pending = sorted(enumerate(scenario.specs), key=lambda item: item[1].at)
        self.now = NOW
        # Each request's SLO state on either side (the adapter drops its own once a request finishes).
        self.vllm_states: dict[str, SLORequestState] = {}
        self.sim_states: dict[str, SLORequestState] = {}
        self.sims: dict[str, SimRequest] = {}
        self.steps = 0
        # What the adapter told the front end of each request that ended: vLLM's finish reason.
        self.finished: dict[str, list[str]] = {}

    def took(self, outputs: dict) -> None:
        """Note the requests a step's outputs (vLLM's ``EngineCoreOutputs`` by client) ended."""
        for client_outputs in outputs.values():
            for output in client_outputs.outputs:
                if output.finish_reason is not None:
                    self.finished.setdefault(output.request_id, []).append(str(output.finish_reason))

    @property
    def busy(self) -> bool:
        return bool(self.pending) or self.engine.has_work

    @property
    def deciding_at(self) -> float:
        """When the adapter takes its arrivals and schedules the step that starts at ``now``."""
        return self.now

    def arrive(self) -> None:
        """Add the requests that have arrived by ``now``; both sides decide on admission for ``now``."""
        if not self.engine.has_work and self.pending:
            self.now = max(self.now, self.pending[0][1].arrival)  # idle: the next arrival wakes the engine
        self.clock.now = self.deciding_at
        while self.pending and self.pending[0][1].arrival <= self.now:
            index, spec = self.pending.pop(0)
            self.scheduler.add_request(vllm_request(index, spec, self.block_hasher, self.tagged))
            sim = sim_request(index, spec)
            self.engine.add(sim, self.now)
            if not self.stock:  # vLLM's scheduler admits everything and keeps no SLO state
                self.vllm_states[spec.name] = self.scheduler.slo_states[spec.name]
                self.sim_states[spec.name] = sim.state
            self.sims[spec.name] = sim

    def decisions(self) -> tuple[dict[str, tuple[bool, str]], dict[str, tuple[bool, str]]]:
        """Each request's admission on either side: (best effort, the planner's reason)."""

        def of(states: dict[str, SLORequestState]) -> dict[str, tuple[bool, str]]:
            return {name: (state.best_effort, state.admission) for name, state in states.items()}

        return of(self.vllm_states), of(self.sim_states)

    def step(self) -> tuple[Scheduled, Scheduled, int, int]:
        """One step on each side at ``now``: what each scheduled, and how many requests each preempted."""
        self.clock.now = self.now
        preemptions = self.engine.preemptions
        batch, sim = self.simulated_step()
        output = self.scheduler.schedule()
        vllm = list(output.num_scheduled_tokens.items())
        self.now += batch.seconds
        self.clock.now = self.now
        self.engine.complete(batch, self.now)
        self.took(self.scheduler.update_from_output(output, self.forward_pass(vllm)))
        self.steps += 1
        return vllm, sim, len(output.preempted_req_ids or ()), self.engine.preemptions - preemptions

    def simulated_step(self) -> tuple[Batch, Scheduled]:
        """The simulator's batch at ``now``, and what it scheduled."""
        batch = self.engine.schedule(self.now)
        assert batch is not None, f"step {self.steps}: the simulator scheduled nothing"
        return batch, [(r.state.request_id, tokens) for r, tokens in zip(batch.requests, batch.tokens, strict=True)]

    def forward_pass(self, scheduled: Scheduled) -> ModelRunnerOutput:
        return forward_pass(self.scheduler.requests, [name for name, _ in scheduled])

    def queues(self) -> tuple[tuple[list[str], set[str]], tuple[list[str], set[str]]]:
        """(running in order, the other unfinished requests) on either side."""
        vllm_running = [request.request_id for request in self.scheduler.running]
        vllm_waiting = set(self.scheduler.requests) - set(vllm_running)
        sim_running = [request.state.request_id for request in self.engine.running]
        # A request refused at arrival never entered the engine (nor, on vLLM's side, stayed in it).
        unfinished = {name for name, sim in self.sims.items() if not sim.finished and sim.result.error is None}
        sim_waiting = unfinished - set(sim_running)
        return (vllm_running, vllm_waiting), (sim_running, sim_waiting)


class AsyncLockstep(Lockstep):
    """``Lockstep`` with the adapter built on an engine config that schedules asynchronously, and
    driven as vLLM's engine core then drives it (``EngineCore.step_with_batch_queue``, two batches
    at once): the arrivals and the ``schedule()`` of a step come while the step before it runs, from
    that step's start, before its output, which comes at its end. Each batch's forward pass samples
    what the model runner would for it as scheduled. The simulator steps as before."""

    def __init__(self, vllm_config, clock: Clock, scenario: Scenario, stock: bool = False) -> None:
        assert vllm_config.scheduler_config.async_scheduling
        super().__init__(vllm_config, clock, scenario, stock)
        self.in_flight: tuple[SchedulerOutput, ModelRunnerOutput] | None = None
        self.started = NOW  # when the step in flight started

    @property
    def deciding_at(self) -> float:
        return self.now if self.in_flight is None else self.started

    def step(self) -> tuple[Scheduled, Scheduled, int, int]:
        self.clock.now = self.deciding_at
        preemptions = self.engine.preemptions
        batch, sim = self.simulated_step()
        output = self.scheduler.schedule()
        vllm = list(output.num_scheduled_tokens.items())
        # Sampled as scheduled, as the model runner does: the next schedule() moves its requests on.
        scheduled = (output, self.forward_pass(vllm))
        self.started, self.now = self.now, self.now + batch.seconds
        self.engine.complete(batch, self.now)
        self.output_in(self.started)  # the step before ends as this one starts
        self.in_flight = scheduled
        if not self.engine.has_work:
            # vLLM schedules once more while the step runs (its requests are not finished yet), but
            # nothing: the step brings their last tokens. Then it waits for both outputs.
            self.clock.now = self.started
            empty = self.scheduler.schedule()
            assert not empty.num_scheduled_tokens, f"step {self.steps}: vLLM scheduled more than the simulator"
            self.output_in(self.now)
            self.in_flight = (empty, self.forward_pass([]))
            self.output_in(self.now)
        self.steps += 1
        return vllm, sim, len(output.preempted_req_ids or ()), self.engine.preemptions - preemptions

    def output_in(self, at: float) -> None:
        """The output of the step in flight comes, at ``at``."""
        if self.in_flight is not None:
            self.clock.now = at
            self.took(self.scheduler.update_from_output(*self.in_flight))
            self.in_flight = None

    def queues(self) -> tuple[tuple[list[str], set[str]], tuple[list[str], set[str]]]:
        """The adapter's as they will be once the step in flight has ended (the simulator's has):
        those whose last token it brings are done."""
        (vllm_running, vllm_waiting), sim = super().queues()
        requests = self.scheduler.requests.values()
        done = {r.request_id for r in requests if r.num_output_tokens + r.num_output_placeholders >= r.max_tokens}
        return ([name for name in vllm_running if name not in done], vllm_waiting - done), sim


def run_to_completion(
    lockstep: Lockstep, max_steps: int = 2000, batches: list[dict[str, int]] | None = None
) -> dict[str, int]:
    """Step both sides until all is served, asserting they agree at every step; returns what
    happened (``batches``: gets each step's tokens per request)."""
    seen = {"steps": 0, "preemptions": 0, "promotions": 0, "best_effort": 0}
    while lockstep.busy:
        lockstep.arrive()
        step = lockstep.steps
        vllm_decisions, sim_decisions = lockstep.decisions()
        assert vllm_decisions == sim_decisions, f"admission differs before step {step}"
        vllm, sim, vllm_preempted, sim_preempted = lockstep.step()
        assert dict(vllm) == dict(sim), f"step {step}: vLLM scheduled {vllm}, the simulator {sim}"
        assert vllm == sim, f"step {step}: same batch in another order: vLLM {vllm}, the simulator {sim}"
        assert vllm_preempted == sim_preempted, f"step {step}: preemptions differ"
        if batches is not None:
            batches.append(dict(sim))
        (vllm_running, vllm_waiting), (sim_running, sim_waiting) = lockstep.queues()
        assert sorted(vllm_running) == sorted(sim_running), f"after step {step}: running requests differ"
        assert vllm_waiting == sim_waiting, f"after step {step}: waiting requests differ"
        seen["preemptions"] += sim_preempted
        assert lockstep.steps < max_steps, "no end in sight"
    vllm_decisions, sim_decisions = lockstep.decisions()
    assert vllm_decisions == sim_decisions
    assert not lockstep.scheduler.has_unfinished_requests()
    seen["steps"] = lockstep.steps
    seen["promotions"] = sum("promoted" in reason for _, reason in sim_decisions.values())
    seen["best_effort"] = sum(best_effort for best_effort, _ in sim_decisions.values())
    seen["demotions"] = sum(reason.startswith("demoted") for _, reason in sim_decisions.values())
    return seen


def test_admission_decisions_match(vllm_config, clock):
    lockstep = Lockstep(vllm_config, clock, SCENARIOS["burst"])
    lockstep.arrive()
    vllm, sim = lockstep.decisions()
    assert len(vllm) == len(BURST)
    assert vllm == sim
    refused = {name for name, (best_effort, _) in sim.items() if best_effort}
    assert refused == {"f", "g", "h"}
    assert all(reason.startswith("TTFT") for name, (_, reason) in sim.items() if name in refused)


def test_first_step_schedules_the_same_tokens(vllm_config, clock):
    lockstep = Lockstep(vllm_config, clock, SCENARIOS["burst"])
    lockstep.arrive()
    vllm, sim, _, _ = lockstep.step()
    # Admitted prefills by first-token deadline until the 512-token budget runs out (the last one chunked).
    assert dict(vllm) == dict(sim) == {"d": 60, "b": 120, "a": 300, "e": 32}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_step_matches(vllm_config, clock, name):
    seen = run_to_completion(Lockstep(vllm_config, clock, SCENARIOS[name]))
    # The scenario exercised what it is there for.
    assert seen["best_effort"] + seen["promotions"] > 0
    if name == "stream":
        assert seen["promotions"] >= 3 and seen["best_effort"] >= 3
    if name == "kv-tight":
        assert seen["preemptions"] > 0
    if name == "growth":
        assert seen["demotions"] > 0


def test_preempted_requests_recompute_from_the_prefix_cache_alike(vllm_config, vllm_config_cached, clock):
    """With prefix caching on both sides, a preempted request's freed blocks keep its prefix: both
    restart it from the same cached tokens, step for step."""
    lockstep = Lockstep(vllm_config_cached, clock, SCENARIOS["kv-tight"])
    cached_batches: list[dict[str, int]] = []
    seen = run_to_completion(lockstep, batches=cached_batches)
    assert seen["preemptions"] > 0
    assert lockstep.engine.kv.hit_tokens_total > 0  # a recomputation started from cached blocks
    # The same trace without the cache computes more tokens: the hits spared real work.
    uncached_batches: list[dict[str, int]] = []
    run_to_completion(Lockstep(vllm_config, clock, SCENARIOS["kv-tight"]), batches=uncached_batches)
    computed = sum(sum(batch.values()) for batch in cached_batches)
    assert computed < sum(sum(batch.values()) for batch in uncached_batches)


def run_with_notices(
    vllm_config, clock: Clock, scenario: Scenario, batches: list[dict[str, int]] | None = None
) -> tuple[Lockstep, dict[str, int], list[Notice]]:
    """``run_to_completion`` with tagged requests, and the notices a front end would have read."""
    address = f"ipc://@sloserve-test-{uuid.uuid4().hex}"
    front_end = zmq.Context.instance().socket(zmq.PULL)  # where the middleware would read the notices
    front_end.bind(address)
    lockstep = Lockstep(vllm_config, clock, scenario, notices=address)
    try:
        seen = run_to_completion(lockstep, batches=batches)
        notices = []
        while front_end.poll(500):
            notices.append(Notice.from_bytes(front_end.recv()))
    finally:
        lockstep.scheduler.notices.close()
        front_end.close(linger=0)
    return lockstep, seen, notices


def test_best_effort_gives_its_place_to_admitted_requests_alike(capped_config, clock):
    """At vLLM's cap on running requests both sides preempt the same best-effort requests for the
    same admitted arrivals, and refuse the same one for want of a place, step for step."""
    lockstep, seen, notices = run_with_notices(capped_config, clock, Scenario(SEQ_CAP, num_blocks=1024))
    assert seen["preemptions"] == 2  # be2 for a2, then be1 for a3
    _, decisions = lockstep.decisions()
    assert decisions["a4"][1].startswith("admitted: promoted from best effort (running requests: 4 admitted")
    assert decisions["be1"][0] and decisions["be2"][0]
    assert lockstep.engine.kv.hit_tokens_total > 0  # the preempted resumed from their cached blocks
    # The front end hears of each decision at arrival, then of what changed: the two preemptions
    # and the promotion, in the order they happened, with their reasons.
    assert [notice.tag for notice in notices if not notice.change] == [spec.name for spec in SEQ_CAP]
    changes = [(notice.tag, notice.change, notice.admitted) for notice in notices if notice.change]
    assert changes == [("be2", PREEMPTED, False), ("be1", PREEMPTED, False), ("a4", PROMOTED, True)]
    assert all("max_num_seqs" in notice.reason for notice in notices if notice.change == PREEMPTED)
    assert [notice.reason for notice in notices if notice.change == PROMOTED] == [decisions["a4"][1]]


def test_best_effort_queue_refuses_the_same_requests_alike(queue_config, clock):
    """With the best-effort queue full, both sides refuse the same arrivals and never schedule them;
    the front end hears of each refusal, and the two that wait are served."""
    batches: list[dict[str, int]] = []
    lockstep, _, notices = run_with_notices(queue_config, clock, Scenario(QUEUE, num_blocks=1024), batches)
    refused = {notice.tag for notice in notices if notice.refused}
    assert refused == {"hopeless2", "hopeless3", "hopeless4"}
    assert all("best-effort queue full (2 waiting to start, at most 2)" in n.reason for n in notices if n.refused)
    assert all(lockstep.sims[name].result.error.startswith("rejected (HTTP 429)") for name in refused)
    scheduled = set().union(*batches)
    assert not refused & scheduled  # no step ever ran them, on either side
    # The front end hears once that each refused request ended, with no token: its count of
    # requests in flight (vLLM's --max-num-queued-reqs) drops at once, as for every other one.
    assert {name: lockstep.finished[name] for name in refused} == {name: ["abort"] for name in refused}
    assert all(lockstep.finished[name] == ["length"] for name in scheduled)
    assert {"hopeless0", "hopeless1", "q0", "q1"} <= scheduled


def test_decodes_without_tpot_yield_only_to_a_prompt_that_needs_it_alike(vllm_config, clock):
    """Both sides hold the decodes without a TPOT target back for the same prompt's prefill, and
    only for the one whose first token would be late beside them, step for step."""
    batches: list[dict[str, int]] = []
    lockstep = Lockstep(vllm_config, clock, Scenario(YIELD, num_blocks=1024))
    run_to_completion(lockstep, batches=batches)
    _, decisions = lockstep.decisions()
    assert not any(best_effort for best_effort, _ in decisions.values())  # every request was admitted
    decodes = {f"d{k}" for k in range(6)}
    (short,) = [batch for batch in batches if batch.get("short") == 100]
    (long,) = [batch for batch in batches if batch.get("long") == 400]
    assert decodes <= set(short)  # the decodes ran beside the short prompt's prefill
    assert not decodes & set(long)  # and sat the long one's out


# With async scheduling vLLM's own scheduler frees a finished request's KV blocks and place one step
# later, after the step that brings its last token (kv-tight: vLLM's AsyncScheduler and Scheduler
# batch differently); where none waits for them, both decide alike.
ASYNC_SCENARIOS = {
    **{name: SCENARIOS[name] for name in ("burst", "stream", "growth")},
    "yield": Scenario(YIELD, num_blocks=1024),
}


@pytest.mark.parametrize("name", list(ASYNC_SCENARIOS))
def test_async_scheduling_decides_as_the_synchronous_scheduler(vllm_config, async_config, clock, name):
    """Where vLLM schedules asynchronously (a GPU build's default), our scheduler is built on vLLM's
    ``AsyncScheduler`` and, each step scheduled while the one before it runs, before its output,
    makes the synchronous scheduler's decisions: the same admissions, batches in the same order,
    preemptions, step after step (both as the simulator)."""
    lockstep = AsyncLockstep(async_config, clock, ASYNC_SCENARIOS[name])
    assert isinstance(lockstep.scheduler, AsyncScheduler) and isinstance(lockstep.scheduler, SLOScheduler)
    overlapped: list[dict[str, int]] = []
    seen = run_to_completion(lockstep, batches=overlapped)
    reference = Lockstep(vllm_config, clock, ASYNC_SCENARIOS[name])
    assert not isinstance(reference.scheduler, AsyncScheduler)
    synchronous: list[dict[str, int]] = []
    assert run_to_completion(reference, batches=synchronous) == seen
    assert overlapped == synchronous
    assert lockstep.decisions()[0] == reference.decisions()[0]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_the_simulated_stock_scheduler_batches_as_vllms_own(stock_config, clock, name):
    """The simulator's ``vllm`` baseline against vLLM's own v1 scheduler, deciding unchanged
    inside ``RecordingScheduler`` (what ``--scheduler vllm --step-log`` runs): the same batches in
    the same order, the same preemptions, step after step; and the step log has every step."""
    step_log = Path(stock_config.additional_config["sloserve"]["step_log"])
    before = step_log.read_text().count("\n") if step_log.exists() else 0
    lockstep = Lockstep(stock_config, clock, SCENARIOS[name], stock=True)
    seen = run_to_completion(lockstep)
    assert seen["best_effort"] == 0  # vLLM admits everything
    if name == "kv-tight":
        assert seen["preemptions"] > 0
    records = [json.loads(line) for line in step_log.read_text().splitlines()[before:]]
    assert len(records) == seen["steps"]
    assert all(record["tokens"] > 0 and record["requests"] > 0 for record in records)
    # Every request's output tokens reached the front end, one emission per sampled token.
    emitted: dict[str, int] = {}
    for record in records:
        for request_id, tokens in record.get("emitted", {}).items():
            emitted[request_id] = emitted.get(request_id, 0) + tokens
    assert emitted == {spec.name: spec.output for spec in SCENARIOS[name].specs}


def test_the_stock_scheduler_with_a_step_log_decides_as_vllm_does(stock_config, clock):
    """``RecordingScheduler`` only times: beside a plain vLLM ``Scheduler`` fed the same requests and
    the same forward passes, every step's batch is the same."""
    from vllm.v1.core.sched.scheduler import Scheduler

    specs, num_blocks = SCENARIOS["kv-tight"].specs, SCENARIOS["kv-tight"].num_blocks
    recording = make_scheduler(stock_config, num_blocks, RecordingScheduler)
    plain = make_scheduler(stock_config, num_blocks, Scheduler)
    for index, spec in enumerate(specs):
        recording.add_request(vllm_request(index, spec))
        plain.add_request(vllm_request(index, spec))
    steps = 0
    while plain.has_unfinished_requests():
        ours, theirs = recording.schedule(), plain.schedule()
        assert list(ours.num_scheduled_tokens.items()) == list(theirs.num_scheduled_tokens.items()), f"step {steps}"
        assert ours.preempted_req_ids == theirs.preempted_req_ids, f"step {steps}"
        for scheduler, output in ((recording, ours), (plain, theirs)):
            scheduler.update_from_output(output, forward_pass(scheduler.requests, list(output.num_scheduled_tokens)))
        steps += 1
        assert steps < 2000
    assert not recording.has_unfinished_requests()
    assert steps > len(specs)


def run_overlapped(scheduler, specs: list[Spec]) -> list[Scheduled]:
    """Serve ``specs``, all there at the start, as vLLM's engine core does with async scheduling
    (``EngineCore.step_with_batch_queue``, two batches at once); every step's batch, in order."""
    for index, spec in enumerate(specs):
        scheduler.add_request(vllm_request(index, spec))
    batches: list[Scheduled] = []
    in_flight: deque[tuple[SchedulerOutput, ModelRunnerOutput]] = deque()
    while scheduler.has_requests() or in_flight:
        if scheduler.has_requests():
            output = scheduler.schedule()
            batches.append(list(output.num_scheduled_tokens.items()))
            in_flight.appendleft((output, forward_pass(scheduler.requests, list(output.num_scheduled_tokens))))
            # Schedule the next step before this one's output unless two are in flight already.
            if len(in_flight) < 2 and (output.total_num_scheduled_tokens > 0 or scheduler.has_requests()):
                continue
        scheduler.update_from_output(*in_flight.pop())
        assert len(batches) < 3000, "no end in sight"
    return batches


def test_the_stock_scheduler_with_a_step_log_decides_as_vllms_async_scheduler(async_stock_config, clock):
    """Where vLLM schedules asynchronously, ``RecordingScheduler`` is built on vLLM's ``AsyncScheduler``
    and only times: beside a plain ``AsyncScheduler`` fed the same requests and forward passes, every
    step's batch is the same, and the step log has every step that computed."""
    specs, num_blocks = SCENARIOS["kv-tight"].specs, SCENARIOS["kv-tight"].num_blocks
    step_log = Path(async_stock_config.additional_config["sloserve"]["step_log"])
    recording = make_scheduler(async_stock_config, num_blocks, RecordingScheduler)
    assert isinstance(recording, AsyncScheduler)
    batches = run_overlapped(recording, specs)
    assert batches == run_overlapped(make_scheduler(async_stock_config, num_blocks, AsyncScheduler), specs)
    assert not recording.has_unfinished_requests()
    records = [json.loads(line) for line in step_log.read_text().splitlines()]
    assert [record["tokens"] for record in records] == [sum(dict(b).values()) for b in batches if b]
    emitted: dict[str, int] = {}
    for record in records:
        for request_id, tokens in record.get("emitted", {}).items():
            emitted[request_id] = emitted.get(request_id, 0) + tokens
    assert emitted == {spec.name: spec.output for spec in specs}


def test_the_step_log_times_a_step_from_the_output_before_it_with_async_scheduling(monkeypatch):
    """With async scheduling a step is scheduled while the one before it runs: its forward pass and
    its cycle start when that one's output is in, not when it was scheduled."""
    timer = SimpleNamespace(now=0.0)
    monkeypatch.setattr(recorder_module, "time", SimpleNamespace(perf_counter=lambda: timer.now))
    records: list[dict] = []
    recorder = StepRecorder([records.append])
    requests = {"r": SimpleNamespace(num_computed_tokens=10)}
    output = SimpleNamespace(num_scheduled_tokens={"r": 1}, total_num_scheduled_tokens=1)

    def scheduled(at: float) -> None:
        timer.now = at
        recorder.scheduled(at, output, requests)

    # Steps of 1 s each, as vLLM's engine core runs them: step 2 is scheduled (at 0.1 s) while step 1
    # runs, step 3 just after step 1's output (at 1 s), while step 2 runs.
    scheduled(0.0)
    scheduled(0.1)
    recorder.executed(1.0, busy_after=True)
    scheduled(1.1)
    recorder.executed(2.0, busy_after=True)
    scheduled(2.1)
    assert [record["seconds"] for record in records] == pytest.approx([1.0, 1.0])
    assert [record["cycle_seconds"] for record in records] == pytest.approx([1.1, 1.1])


def test_a_gpu_build_keeps_async_scheduling_and_runs_our_scheduler_on_vllms_async_one(monkeypatch, profile, clock):
    """The arguments ``sloserve serve`` gives a GPU build's vLLM keep async scheduling on, and the
    class they name is then built on vLLM's ``AsyncScheduler``; where it is off, on ``Scheduler``.

    In vLLM 0.32 the decision ignores ``--scheduler-cls``: ``VllmConfig.__post_init__`` turns it on
    unless an option rules it out (config/vllm.py:1585-1644), then the platform's hook has the last
    word (config/vllm.py:1991), which the CPU's turns off (platforms/cpu.py:331) and CUDA's leaves.
    The engine core then builds whatever class is named, with that config (config/scheduler.py:228,
    v1/engine/core.py:161-182). This CPU build runs vLLM's own rule here; the hook is watched to
    read the decision as a GPU build keeps it.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.platforms import current_platform
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    decided: list[bool] = []  # vLLM's decision, before the platform's hook

    def platform_hook(vllm_config) -> None:
        decided.append(vllm_config.scheduler_config.async_scheduling)
        type(current_platform).check_and_update_config(vllm_config)

    monkeypatch.setattr(current_platform, "check_and_update_config", platform_hook)
    monkeypatch.setattr(server, "is_cpu_build", lambda: False)
    for options, ours in (
        (server.ServerOptions(profile=str(profile)), SLOScheduler),
        (server.ServerOptions(profile=str(profile), scheduler="vllm", step_log=str(profile.parent / "s.jsonl")),
         RecordingScheduler),
    ):  # fmt: skip
        decided.clear()
        arguments = make_arg_parser(FlexibleArgumentParser()).parse_args(server.command(options)[3:])
        config = AsyncEngineArgs.from_cli_args(arguments).create_engine_config()
        assert decided == [True]
        assert config.scheduler_config.async_scheduling is False  # this CPU platform's hook
        for async_scheduling in (True, False):
            config.scheduler_config.async_scheduling = async_scheduling
            built = make_scheduler(config, 64, config.scheduler_config.get_scheduler_cls())
            assert isinstance(built, ours)
            assert isinstance(built, AsyncScheduler) == async_scheduling


def test_a_program_runs_context_is_held_between_its_calls_and_released(vllm_config_cached, clock):
    """vLLM's blocks of a finished call whose program run has calls to come are held (a reference
    taken, out of the free queue) until the run's next call has started from them; a call that
    says no call follows leaves nothing held."""
    scheduler = make_scheduler(vllm_config_cached, num_blocks=64)
    hasher = block_hasher(vllm_config_cached)
    pool = scheduler.kv_cache_manager.block_pool
    block_size = scheduler.block_size
    prompt = [100 + k % 900 for k in range(3 * block_size)]  # 3 full blocks, then 4 output tokens

    def program_request(name: str, tokens: list[int], remaining: tuple[str, ...]) -> Request:
        call = ProgramCall("run-1", "agent", "act", arrival=NOW, remaining=remaining)
        xargs = slo_to_xargs(SLO.parse("60s", None), clock.now) | call.to_xargs()
        params = SamplingParams(max_tokens=4, ignore_eos=True, extra_args=xargs)
        return Request(name, tokens, params, None, arrival_time=clock.now, block_hasher=hasher)

    def serve(request: Request) -> int:
        """Run the request to its end; the tokens its first step computed."""
        scheduler.add_request(request)
        first = None
        while request.request_id in scheduler.requests:
            output = scheduler.schedule()
            ids = list(output.num_scheduled_tokens)
            first = first or output.num_scheduled_tokens.get(request.request_id)
            scheduler.update_from_output(output, forward_pass(scheduler.requests, ids))
            clock.now += 0.05
        return first

    first = program_request("first", prompt, remaining=("act",))
    serve(first)
    held = scheduler.kv_holds["run-1"]
    assert len(held) == 3  # every full block it computed
    assert all(block.ref_cnt == 1 for block in held)  # ours alone: vLLM cannot evict them
    # Other requests cycle through every free block meanwhile: held blocks are not among them.
    for index in range(4):
        other = [5000 + 1000 * index + k % 997 for k in range(MAX_MODEL_LEN - 200)]
        params = SamplingParams(max_tokens=2, ignore_eos=True, extra_args=slo_to_xargs(SLO.parse("60s", None)))
        serve(Request(f"other-{index}", other, params, None, arrival_time=clock.now, block_hasher=hasher))
    assert all(block.ref_cnt == 1 and block.block_hash is not None for block in held)
    free_before = pool.get_num_free_blocks()

    follow_up = program_request("second", prompt + [SAMPLED] * 4 + [7, 8, 9], remaining=())
    assert serve(follow_up) == 7  # it started from the held blocks: only its new tokens computed
    assert "run-1" not in scheduler.kv_holds and not scheduler.hold_takers
    assert pool.get_num_free_blocks() > free_before  # released back to vLLM's cache
    assert not scheduler.slo_policy.programs.runs  # the run said it was over


def test_a_held_context_gives_way_to_a_request_that_cannot_start_without_its_blocks(vllm_config_cached, clock):
    """A hold never keeps the head of the queue from the blocks it needs: vLLM would leave it
    waiting, and with nothing running no call would end to release the hold."""
    scheduler = make_scheduler(vllm_config_cached, num_blocks=20)
    hasher = block_hasher(vllm_config_cached)
    block_size = scheduler.block_size
    call = ProgramCall("run-1", "agent", "act", arrival=NOW, remaining=("act",))
    xargs = slo_to_xargs(SLO.parse("60s", None), clock.now) | call.to_xargs()
    held = Request("held", [100 + k % 900 for k in range(8 * block_size)], SamplingParams(max_tokens=4, ignore_eos=True,
                   extra_args=xargs), None, arrival_time=clock.now, block_hasher=hasher)  # fmt: skip
    scheduler.add_request(held)
    while held.request_id in scheduler.requests:
        output = scheduler.schedule()
        scheduler.update_from_output(output, forward_pass(scheduler.requests, list(output.num_scheduled_tokens)))
        clock.now += 0.05
    assert len(scheduler.kv_holds["run-1"]) == 8
    # 19 usable blocks (one is vLLM's null block), 8 held: a request of 12 blocks cannot run beside them.
    big = [5000 + k % 997 for k in range(12 * block_size - 8)]
    params = SamplingParams(max_tokens=4, ignore_eos=True, extra_args=slo_to_xargs(SLO.parse("60s", None)))
    scheduler.add_request(Request("big", big, params, None, arrival_time=clock.now, block_hasher=hasher))
    output = scheduler.schedule()
    for _ in range(200):
        scheduler.update_from_output(output, forward_pass(scheduler.requests, list(output.num_scheduled_tokens)))
        clock.now += 0.05
        if "big" not in scheduler.requests:
            break
        output = scheduler.schedule()
    assert "big" not in scheduler.requests, "the request never ended beside the held context"
    assert "run-1" not in scheduler.kv_holds
