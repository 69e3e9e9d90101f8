"""Prefix caching: the simulator's model of vLLM's automatic prefix caching, the traces' shared
prefixes, and the bench's chained prompts hitting the real engine's cache."""

from __future__ import annotations

import re

import httpx
import pytest

from conftest import run_cli
from sloserve.slo import SLO
from sloserve_runtime.core.planner import LiveRequest, Planner
from sloserve_runtime.core.slo_state import SLORequestState
from sloserve_runtime.core.step_time import LinearPiece, StepTimeModel, attended_pairs
from sloserve_runtime.sim import SimConfig, simulate
from sloserve_runtime.sim.kv_cache import KVCache
from sloserve_runtime.workload.programs import ProgramSpec, StageSpec
from sloserve_runtime.workload.scenarios import load_scenario

MODEL = StepTimeModel("test-prefix", (LinearPiece(per_token=0.001, constant=0.01),), max_num_batched_tokens=512)
LOOSE = SLO.parse("10x", "100ms")


def test_released_blocks_keep_their_full_blocks_until_claimed():
    kv = KVCache(capacity_blocks=10, block_size=16, prefix_caching=True)
    assert kv.allocate("a", 70)  # 5 blocks, the last one partly filled
    kv.release("a", key="program", computed_tokens=70)
    assert kv.free_blocks == 10  # cached blocks count as free
    assert kv.cached_blocks == 4  # only the full ones
    assert kv.hit_tokens("program", limit=1000) == 64
    assert kv.hit_tokens("program", limit=40) == 32  # whole blocks within the limit
    assert kv.hit_tokens("other", limit=1000) == 0
    assert kv.claim("b", "program", limit=40) == 32
    assert kv.blocks_of("b") == 2 and kv.free_blocks == 8
    assert kv.cached_blocks == 0  # the rest of the entry is gone with the claim
    assert kv.hit_tokens_total == 32


def test_allocations_evict_the_oldest_cached_prefix_first():
    kv = KVCache(capacity_blocks=10, block_size=16, prefix_caching=True)
    for name in ("old", "new"):
        assert kv.allocate(name, 64)
        kv.release(name, key=name, computed_tokens=64)
    assert kv.cached_blocks == 8
    assert kv.allocate("c", 16 * 5)  # 2 blocks are unused: 3 more must come from a cached prefix
    assert "old" not in kv.cached and kv.cached["new"] == 4
    assert kv.cached_blocks <= kv.free_blocks == 5
    assert not kv.allocate("d", 16 * 6)  # more than the free blocks, cached ones included
    assert kv.cached["new"] == 4  # a refused allocation evicts nothing


def test_without_prefix_caching_nothing_is_kept():
    kv = KVCache(capacity_blocks=10, block_size=16)
    assert kv.allocate("a", 64)
    kv.release("a", key="program", computed_tokens=64)
    assert kv.cached_blocks == 0 and kv.claim("b", "program", 64) == 0


def two_calls(shared: int) -> list[ProgramSpec]:
    """A call of 600 prompt tokens, then one 1 s later whose prompt carries the first's 600 + 40 tokens."""
    first = StageSpec("think", prompt_tokens=600, output_tokens=40, slo=LOOSE)
    second = StageSpec("answer", 700, 5, LOOSE, delay_s=1.0, shared_prefix_tokens=shared)
    return [ProgramSpec(0, 0.0, "reasoning", (first, second))]


@pytest.mark.parametrize("policy", ["sloserve", "vllm"])
def test_a_later_call_computes_only_what_its_program_has_not_cached(policy):
    config = SimConfig(MODEL, block_size=16)
    cached = simulate(two_calls(shared=640), policy, MODEL, config)[1]
    no_cache = SimConfig(MODEL, block_size=16, enable_prefix_caching=False)
    uncached = simulate(two_calls(shared=640), policy, MODEL, no_cache)[1]
    unshared = simulate(two_calls(shared=0), policy, MODEL, config)[1]
    # 639 computed tokens stay cached (the last output token was never computed): 39 whole blocks,
    # so the answer computes 700 - 624 = 76 tokens in one step.
    assert cached.token_times[0] - cached.arrival == pytest.approx(0.01 + 76 * 0.001)
    # Without the cache, or without a shared prefix, it computes all 700: two chunks of 512 and 188.
    for result in (uncached, unshared):
        assert result.token_times[0] - result.arrival == pytest.approx(2 * 0.01 + 700 * 0.001)


def test_scenarios_mark_what_each_call_shares_with_its_program():
    tool_calling = load_scenario("tool-calling").trace(1.0, 30, seed=3)
    for program in tool_calling:
        previous = None
        for call in program.stages:
            if previous is None:
                assert call.shared_prefix_tokens < call.prompt_tokens  # its tool docs, then the query
            else:  # the context so far, then its own new tokens
                assert call.shared_prefix_tokens == previous.prompt_tokens + previous.output_tokens
            previous = call
    for program in load_scenario("chatbot").trace(1.0, 30, seed=3):
        assert all(call.shared_prefix_tokens == 0 for call in program.stages)


def prefix_cache_hits(port: int) -> float:
    """vLLM's counter of prompt tokens served from its prefix cache, from the server's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return sum(float(value) for value in re.findall(r"^vllm:prefix_cache_hits_total\{[^}]*\} (\S+)$", text, re.M))


def test_bench_chains_a_programs_calls_so_the_real_engine_reuses_their_prefix(engine, tmp_path):
    before = prefix_cache_hits(engine.port)
    result = run_cli(
        "bench", "--scenario", "tool-calling", "--rate", "1", "--num-requests", "1", "--length-scale", "0.1",
        "--endpoint", engine.base_url, "--json", str(tmp_path / "bench.json"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # Each later call leads with the previous call's prompt and output: vLLM finds them cached
    # (without the chaining every prompt is fresh random tokens and nothing hits).
    assert prefix_cache_hits(engine.port) - before > 0


def test_the_budget_of_a_starting_prompt_counts_the_prefix_its_chunk_attends_to():
    # A CPU-like profile: a chunk's tokens attend to the cached prefix before them.
    model = StepTimeModel(
        "test-attention",
        (LinearPiece(0.0005, per_request=0.0005, per_context_token=2e-6, constant=0.017, per_attended_pair=4e-7),),
        max_num_batched_tokens=2048,
    )
    planner = Planner(model, max_budget=2048, headroom=1.0)
    decodes = [LiveRequest(SLORequestState.create(f"d{k}", LOOSE, 0.0, 100, model), 1, 300) for k in range(2)]
    fresh = planner.token_budget(decodes, waiting=True)
    cached = planner.token_budget(decodes, waiting=True, start_prefix=1500)
    assert cached < fresh
    # The step with that chunk, after its 1,500 cached tokens, stays within the 100 ms TPOT.
    chunk = cached - 2
    context = 2 * 301 + 1500 + chunk
    attended = 2 * 301 + attended_pairs(chunk, 1500 + chunk)
    assert model.step_seconds(cached, 3, context, attended) <= 0.1
    # Ignoring the prefix would plan a step past it.
    chunk = fresh - 2
    attended = 2 * 301 + attended_pairs(chunk, 1500 + chunk)
    assert model.step_seconds(fresh, 3, 2 * 301 + 1500 + chunk, attended) > 0.1
