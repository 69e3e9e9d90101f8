"""The vLLM adapter and the simulator decide alike: same admissions, same batches, step after step.

``SLOScheduler`` (a subclass of vLLM's v1 ``Scheduler``) is built in-process on the default
model's config, with a hand-made KV cache and no model to run; the simulator's ``Engine`` gets the
same requests, profile and limits. Both are fed the same clock: the adapter reads ``time.time()``,
so its module's clock is frozen at the simulator's ``now`` and moved by each simulated step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

import time  # noqa: E402

import torch  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

from sloserve.slo import SLO  # noqa: E402
from sloserve_runtime import scheduler as scheduler_module  # noqa: E402
from sloserve_runtime.model import ensure_default_model  # noqa: E402
from sloserve_runtime.policies import make_policy  # noqa: E402
from sloserve_runtime.scheduler import SLOConfig, SLOScheduler  # noqa: E402
from sloserve_runtime.simulator.config import SimConfig  # noqa: E402
from sloserve_runtime.simulator.engine import Engine  # noqa: E402
from sloserve_runtime.simulator.request import SimRequest  # noqa: E402
from sloserve_runtime.slo_state import SLORequestState, slo_to_xargs  # noqa: E402
from sloserve_runtime.step_time import LinearPiece, StepTimeModel  # noqa: E402
from sloserve_runtime.workload import StageResult  # noqa: E402

# 10 ms a step, 1 ms a token, 0.5 ms a request, 1 us a context token: a full 512-token step takes
# about 0.52 s and a 40 ms TPOT leaves room for about 18 tokens beside a few decodes.
MODEL = StepTimeModel(
    "parity-test",
    (LinearPiece(per_token=0.001, per_request=0.0005, per_context_token=1e-6, constant=0.010),),
    max_num_batched_tokens=512,
)
MAX_BATCHED_TOKENS = 512
NUM_BLOCKS = 1024  # KV blocks of the hand-made cache: far more than the requests below need
SAMPLED = 1000  # the token every simulated forward pass samples (never SmolLM2's EOS)
NOW = 1_700_000_000.0  # the test's wall clock at the first admission


@dataclass(frozen=True)
class Spec:
    name: str
    prompt: int
    output: int
    ttft: str | None
    tpot: str | None
    age: float  # seconds before NOW that it arrived (the ``slo_arrival`` it carries)


# Loose and tight TPOT tiers, a slowdown TTFT, one without any SLO; two cannot be promised their
# first token in time behind the admitted ones and go to best effort.
SPECS = [
    Spec("a", 300, 12, "2s", "100ms", 0.30),
    Spec("b", 120, 12, "1500ms", "40ms", 0.25),
    Spec("c", 700, 12, "4s", "200ms", 0.20),
    Spec("d", 60, 12, "900ms", "40ms", 0.15),
    Spec("e", 900, 12, "2500ms", "100ms", 0.10),
    Spec("f", 200, 12, "3x", None, 0.09),
    Spec("g", 50, 12, "1s", "40ms", 0.08),
    Spec("h", 400, 12, "3s", "40ms", 0.05),
    Spec("i", 80, 12, None, None, 0.04),
    Spec("j", 150, 12, "5s", "25ms", 0.02),
]


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("parity") / "profile.json"
    path.write_text(json.dumps(MODEL.to_json()))
    return path


@pytest.fixture(scope="module")
def vllm_config(profile: Path):
    """The engine config ``sloserve serve`` would give vLLM, for the default model (slow: loads its config)."""
    args = EngineArgs(
        model=str(ensure_default_model()),
        max_model_len=2048,
        max_num_batched_tokens=MAX_BATCHED_TOKENS,
        enable_prefix_caching=False,  # the simulator has no prefix cache
        enforce_eager=True,
        scheduler_cls="sloserve_runtime.scheduler.SLOScheduler",
        additional_config=SLOConfig(profile=str(profile)).to_additional_config(),
    )
    config = args.create_engine_config()
    config.cache_config.num_gpu_blocks = NUM_BLOCKS
    return config


class Clock:
    """Stands in for the ``time`` module the adapter reads: ``time()`` is frozen at ``now``."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.perf_counter = time.perf_counter

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    frozen = Clock(NOW)
    monkeypatch.setattr(scheduler_module, "time", frozen)
    # Outside an engine-core process there is no API server to die with: leave pytest's parent alone.
    monkeypatch.setattr(scheduler_module, "die_with_server", lambda: None)
    return frozen


def make_scheduler(vllm_config) -> SLOScheduler:
    block_size = vllm_config.cache_config.block_size
    kv_cache_config = KVCacheConfig(
        num_blocks=NUM_BLOCKS,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["layer"], FullAttentionSpec(block_size, 1, 1, torch.float32))],
    )
    return SLOScheduler(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size,
    )


def make_engine(vllm_config) -> Engine:
    block_size = vllm_config.cache_config.block_size
    config = SimConfig(
        MODEL,
        kv_capacity_tokens=(NUM_BLOCKS - 1) * block_size,  # vLLM keeps one block back (its null block)
        max_num_seqs=vllm_config.scheduler_config.max_num_seqs,
        max_num_batched_tokens=MAX_BATCHED_TOKENS,
        block_size=block_size,
    )
    return Engine(make_policy("sloserve", MODEL, MAX_BATCHED_TOKENS), config)


def vllm_request(index: int, spec: Spec) -> Request:
    xargs = slo_to_xargs(SLO.parse(spec.ttft, spec.tpot), NOW - spec.age)
    params = SamplingParams(max_tokens=spec.output, ignore_eos=True, extra_args=xargs)
    # Distinct tokens per request: no prefix is shared (prefix caching is off anyway).
    prompt = [100 + index * 1000 + k % 1000 for k in range(spec.prompt)]
    return Request(spec.name, prompt, params, None, arrival_time=NOW - spec.age)


def sim_request(index: int, spec: Spec) -> SimRequest:
    arrival = NOW - spec.age
    slo = SLO.parse(spec.ttft, spec.tpot)
    state = SLORequestState.create(spec.name, slo, arrival, spec.prompt, MODEL)
    result = StageResult(index, "chatbot", "chat", arrival, [], spec.prompt, spec.output, None, None)
    return SimRequest(index, 0, state, spec.output, result, spec.prompt)


def admissions(states: dict[str, SLORequestState]) -> dict[str, tuple[bool, str]]:
    return {name: (state.best_effort, state.admission) for name, state in states.items()}


def run_vllm_step(scheduler: SLOScheduler) -> list[tuple[str, int]]:
    """One engine step on the adapter: schedule, then a forward pass that samples ``SAMPLED`` where due."""
    output = scheduler.schedule()
    scheduled = list(output.num_scheduled_tokens.items())
    req_ids = [name for name, _ in scheduled]
    # vLLM has advanced num_computed_tokens already: a request with all its tokens computed samples one.
    sampled = [
        [SAMPLED] if scheduler.requests[name].num_computed_tokens >= scheduler.requests[name].num_tokens else []
        for name in req_ids
    ]
    runner_output = ModelRunnerOutput(
        req_ids=req_ids, req_id_to_index={name: i for i, name in enumerate(req_ids)}, sampled_token_ids=sampled
    )
    scheduler.update_from_output(output, runner_output)
    return scheduled


def test_admission_and_batches_match_the_simulator(vllm_config, clock):
    scheduler = make_scheduler(vllm_config)
    engine = make_engine(vllm_config)
    sims = {}
    for index, spec in enumerate(SPECS):
        scheduler.add_request(vllm_request(index, spec))
        sims[spec.name] = sim = sim_request(index, spec)
        engine.add(sim, NOW)
    sim_states = {name: sim.state for name, sim in sims.items()}
    assert admissions(scheduler.slo_states) == admissions(sim_states)

    now, steps = NOW, 0
    while engine.has_work:
        clock.now = now
        batch = engine.schedule(now)
        expected = [(request.state.request_id, tokens) for request, tokens in zip(batch.requests, batch.tokens)]
        scheduled = run_vllm_step(scheduler)
        print(steps, expected, scheduled)
        assert dict(scheduled) == dict(expected), f"step {steps}"
        now += batch.seconds
        engine.complete(batch, now)
        steps += 1
        live = {name: s for name, s in scheduler.slo_states.items()}
        assert admissions(live) == {n: v for n, v in admissions(sim_states).items() if n in live}
    assert not scheduler.has_unfinished_requests()
