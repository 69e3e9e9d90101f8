"""The vLLM command line ``sloserve serve`` builds: the dtype follows the CPU, a user's choice wins,
and the planner's profile is the one measured in that dtype unless the user names another."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sloserve_runtime.core.hardware import cpu_dtype
from sloserve_runtime.core.policies import POLICIES, scheduler_name
from sloserve_runtime.core.step_time import (
    DEFAULT_PROFILE,
    FLOAT32_PROFILE,
    PROFILES_DIR,
    StepTimeModel,
    engine_profile,
    resolve_profile,
)
from sloserve_runtime.serving.server import ServerOptions, command, is_cpu_build


def test_cpu_dtype_follows_what_the_cpu_computes_natively(tmp_path):
    bf16 = tmp_path / "bf16"
    bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    amx = tmp_path / "amx"
    amx.write_text("flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n")
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    assert cpu_dtype(bf16) == "bfloat16"
    assert cpu_dtype(amx) == "bfloat16"
    # Emulated bfloat16 is several times slower than float32 on an AVX2-only CPU.
    assert cpu_dtype(avx2) == "float32"
    # Nothing to read (not Linux): vLLM's CPU default.
    assert cpu_dtype(tmp_path / "missing") == "bfloat16"


def test_the_command_names_one_dtype_and_the_users_wins():
    args = command(ServerOptions(model="/models/any", extra_args=["--dtype", "float16"]))
    assert args.count("--dtype") == 1
    assert args[args.index("--dtype") + 1] == "float16"
    chosen = command(ServerOptions(model="/models/any"))
    if is_cpu_build():
        assert chosen[chosen.index("--dtype") + 1] == cpu_dtype()
        assert "--enforce-eager" in chosen
    else:
        assert "--dtype" not in chosen


def test_each_dtype_has_its_own_measured_profile():
    assert engine_profile("float32") == FLOAT32_PROFILE
    assert engine_profile("bfloat16") == DEFAULT_PROFILE
    assert engine_profile() == engine_profile(cpu_dtype())
    bf16, fp32 = StepTimeModel.load(DEFAULT_PROFILE), StepTimeModel.load(FLOAT32_PROFILE)
    assert "float32" in json.loads(FLOAT32_PROFILE.read_text())["model"]
    # Both describe the same engine limits; float32 without AVX512-BF16 is the slower machine.
    assert fp32.max_num_batched_tokens == bf16.max_num_batched_tokens == 512
    assert fp32.prefill_seconds(512) > bf16.prefill_seconds(512)


def _additional_config(args: list[str]) -> dict:
    return json.loads(args[args.index("--additional-config") + 1])["sloserve"]


@pytest.mark.parametrize(
    ("extra_args", "expected"),
    [(["--dtype", "float32"], FLOAT32_PROFILE), (["--dtype=bfloat16"], DEFAULT_PROFILE)],
)
def test_the_planner_gets_the_profile_of_the_dtype_the_engine_runs(extra_args, expected):
    options = ServerOptions(model="/models/any", extra_args=extra_args)
    assert Path(options.profile_path) == expected
    assert Path(_additional_config(command(options))["profile"]) == expected


def test_a_named_profile_wins_and_a_wrong_name_says_what_there_is():
    options = ServerOptions(model="/models/any", profile="a100-opt13b-slos-serve", extra_args=["--dtype", "float32"])
    assert Path(_additional_config(command(options))["profile"]) == PROFILES_DIR / "a100-opt13b-slos-serve.json"
    assert resolve_profile(str(FLOAT32_PROFILE)) == FLOAT32_PROFILE
    with pytest.raises(ValueError, match="no such file or bundled profile; bundled: .*cpu-smollm2-135m-fp32"):
        resolve_profile("h100-nope")


def test_max_yields_reaches_the_planner_inside_the_engine():
    """``sloserve serve --max-yields N`` travels in the scheduler's additional config to the planner."""
    from sloserve_runtime.core.policies import make_policy
    from sloserve_runtime.engine.config import SLOConfig

    args = command(ServerOptions(model="/models/any", max_yields=0))
    config = SLOConfig.from_additional_config(json.loads(args[args.index("--additional-config") + 1]))
    assert config.max_yields == 0
    model = StepTimeModel.load(DEFAULT_PROFILE)
    assert make_policy("sloserve", model, 512, max_yields=config.max_yields).planner.max_yields == 0
    # Not given: the planner keeps its default, and the config says so.
    default = SLOConfig.from_additional_config(SLOConfig().to_additional_config())
    assert default.max_yields is None
    assert make_policy("sloserve-dp", model, 512, max_yields=default.max_yields).planner.max_yields == 4
    with pytest.raises(ValueError, match="'vllm' has none"):
        make_policy("vllm", model, 512, max_yields=1)
    with pytest.raises(ValueError, match="0 or more"):
        make_policy("sloserve", model, 512, max_yields=-1)


def test_stock_scheduler_runs_unchanged_and_with_a_step_log_only_times_its_steps(tmp_path):
    """``--scheduler vllm`` gives vLLM no scheduler class of ours; with ``--step-log`` it gets the
    recording one (vLLM's scheduler, timed), with the log and nothing of the planner's."""
    from sloserve_runtime.engine.config import SLOConfig

    stock = command(ServerOptions(model="/models/any", scheduler="vllm"))
    assert "--scheduler-cls" not in stock and "--additional-config" not in stock
    log = str(tmp_path / "steps.jsonl")
    logged = command(ServerOptions(model="/models/any", scheduler="vllm", step_log=log))
    assert logged[logged.index("--scheduler-cls") + 1] == "sloserve_runtime.engine.scheduler.RecordingScheduler"
    config = SLOConfig.from_additional_config(json.loads(logged[logged.index("--additional-config") + 1]))
    assert config.step_log == log
    assert config.calibrate is False
    ours = command(ServerOptions(model="/models/any", step_log=log))
    assert ours[ours.index("--scheduler-cls") + 1] == "sloserve_runtime.engine.scheduler.SLOScheduler"


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_simulated_scheduler_can_be_served(name):
    """``serve --scheduler`` and ``simulate --scheduler`` take one list: each name runs our scheduler
    class with that policy, except stock vLLM, which runs vLLM's own."""
    args = command(ServerOptions(model="/models/any", scheduler=name))
    if POLICIES[name].stock:
        assert "--scheduler-cls" not in args
        return
    assert args[args.index("--scheduler-cls") + 1] == "sloserve_runtime.engine.scheduler.SLOScheduler"
    config = json.loads(args[args.index("--additional-config") + 1])
    assert config["sloserve"]["policy"] == name


def test_old_scheduler_name_still_means_stock_vllm():
    assert scheduler_name("vllm-fcfs") == "vllm"
    assert command(ServerOptions(model="/models/any", scheduler="vllm-fcfs")) == command(
        ServerOptions(model="/models/any", scheduler="vllm")
    )
    with pytest.raises(ValueError, match="choose from sloserve"):
        scheduler_name("fifo")
