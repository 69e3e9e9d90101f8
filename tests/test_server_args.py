"""The vLLM command line ``sloserve serve`` builds: the dtype follows the CPU, a user's choice wins."""

from __future__ import annotations

from sloserve_runtime.server import ServerOptions, command, cpu_dtype, is_cpu_build


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
