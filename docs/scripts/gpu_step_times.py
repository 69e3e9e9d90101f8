"""Measure a GPU step-time profile for the simulator: OPT-13B's layer shapes, timed on a real GPU.

vLLM does not run on the lent GPU machine (it has PyTorch but no package registry), so this script
runs the forward pass of one engine step the way vLLM's GPU model runner lays it out, in plain
PyTorch with random fp16 weights of OPT-13B's shapes (40 layers, hidden 5,120, 40 heads, FFN
20,480, vocabulary 50,272): the step's tokens go through the linear layers as one flat batch,
decodes attend their own KV context, the prefill chunk attends its computed prefix and itself
(causal, lower-right aligned), and logits are taken for one position per request. What it leaves
out, and the profile says so: CUDA graphs (vLLM captures decode batches; eager launches cost a few
ms more here) and vLLM's own CPU work per step (scheduling, input preparation, detokenizing).

Two modes:

    python docs/scripts/gpu_step_times.py measure OUT_DIR     # on the GPU machine: torch only
    .venv/bin/python docs/scripts/gpu_step_times.py fit OUT_DIR PROFILE.json   # here: fit and write

``measure`` writes ``steps.jsonl`` (one measured step per line, the fields of
``profile_fit.StepSample``) and ``device.json`` (the GPU, its memory, torch's version); ``fit``
fits the step-time model of DESIGN.md to them and writes a profile the simulator reads.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import time
from pathlib import Path

LAYERS, HIDDEN, HEADS, FFN, VOCAB = 40, 5120, 40, 20480, 50272
HEAD_DIM = HIDDEN // HEADS
KV_BYTES_PER_TOKEN = 2 * LAYERS * HIDDEN * 2  # K and V, every layer, fp16
WARMUP, REPEATS = 2, 5

DECODES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTEXTS = (128, 512, 1024, 2048, 4096)
CHUNKS = (64, 256, 512, 1024, 2048, 4096, 8192)
PREFIXES = (0, 1024, 4096)
MIXED = list(itertools.product((4, 16, 64, 128), (512, 2048), (256, 1024, 2048), (0, 2048)))


def attended_pairs(tokens: int, context_after: int) -> int:
    """As ``step_time.attended_pairs`` (repeated here: this side runs without the project)."""
    return tokens * context_after - tokens * (tokens - 1) // 2


def cells() -> list[tuple[int, int, int, int]]:
    """(decodes, their context, prefill chunk, its computed prefix) for every step to time."""
    decode_only = [(d, n, 0, 0) for d, n in itertools.product(DECODES, CONTEXTS)]
    prefill_only = [(0, 0, c, p) for c, p in itertools.product(CHUNKS, PREFIXES)]
    return decode_only + prefill_only + [(d, n, c, p) for d, n, c, p in MIXED]


def measure(out: Path) -> None:
    import torch
    import torch.nn.functional as F

    try:  # a causal mask aligned to the chunk's end, on the flash / memory-efficient kernels
        from torch.nn.attention.bias import causal_lower_right
    except ImportError:  # older torch: an explicit boolean mask
        causal_lower_right = None

    torch.manual_seed(0)
    device = torch.device("cuda")
    half = torch.float16

    def weight(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, dtype=half, device=device).normal_(0.0, 0.02)

    layers = [
        {
            "ln1": (weight(HIDDEN) + 1, weight(HIDDEN)),
            "qkv": (weight(3 * HIDDEN, HIDDEN), weight(3 * HIDDEN)),
            "out": (weight(HIDDEN, HIDDEN), weight(HIDDEN)),
            "ln2": (weight(HIDDEN) + 1, weight(HIDDEN)),
            "fc1": (weight(FFN, HIDDEN), weight(FFN)),
            "fc2": (weight(HIDDEN, FFN), weight(HIDDEN)),
        }
        for _ in range(LAYERS)
    ]
    embedding = weight(VOCAB, HIDDEN)
    final_ln = (weight(HIDDEN) + 1, weight(HIDDEN))
    torch.cuda.synchronize()
    weights_bytes = torch.cuda.memory_allocated()

    # One KV buffer serves every layer: each layer still reads its decodes' whole context from
    # memory (the largest is 10 GiB, far past the L2 cache), as vLLM's paged KV does.
    decode_elems = max(DECODES) * HEADS * (max(CONTEXTS) + 1) * HEAD_DIM
    decode_k, decode_v = (torch.empty(decode_elems, dtype=half, device=device).normal_() for _ in range(2))
    prefill_elems = HEADS * (max(PREFIXES) + max(CHUNKS)) * HEAD_DIM
    prefill_k, prefill_v = (torch.empty(prefill_elems, dtype=half, device=device).normal_() for _ in range(2))

    def step(x: torch.Tensor, decodes: int, context: int, chunk: int, prefix: int) -> torch.Tensor:
        kd = decode_k[: decodes * HEADS * (context + 1) * HEAD_DIM].view(decodes, HEADS, context + 1, HEAD_DIM)
        vd = decode_v[: decodes * HEADS * (context + 1) * HEAD_DIM].view(decodes, HEADS, context + 1, HEAD_DIM)
        kp = prefill_k[: HEADS * (prefix + chunk) * HEAD_DIM].view(1, HEADS, prefix + chunk, HEAD_DIM)
        vp = prefill_v[: HEADS * (prefix + chunk) * HEAD_DIM].view(1, HEADS, prefix + chunk, HEAD_DIM)
        if chunk and prefix:
            mask = (
                causal_lower_right(chunk, prefix + chunk)
                if causal_lower_right is not None
                else torch.ones(chunk, prefix + chunk, dtype=torch.bool, device=device).tril(prefix)
            )
        for layer in layers:
            h = F.layer_norm(x, (HIDDEN,), *layer["ln1"])
            q, k, v = F.linear(h, *layer["qkv"]).split(HIDDEN, dim=-1)
            parts = []
            if decodes:
                kd[:, :, context] = k[:decodes].view(decodes, HEADS, HEAD_DIM)
                vd[:, :, context] = v[:decodes].view(decodes, HEADS, HEAD_DIM)
                qd = q[:decodes].view(decodes, HEADS, 1, HEAD_DIM)
                parts.append(F.scaled_dot_product_attention(qd, kd, vd).reshape(decodes, HIDDEN))
            if chunk:
                kp[0, :, prefix:] = k[decodes:].view(chunk, HEADS, HEAD_DIM).transpose(0, 1)
                vp[0, :, prefix:] = v[decodes:].view(chunk, HEADS, HEAD_DIM).transpose(0, 1)
                qp = q[decodes:].view(1, chunk, HEADS, HEAD_DIM).transpose(1, 2)
                if prefix:
                    attn = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)
                else:
                    attn = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
                parts.append(attn.transpose(1, 2).reshape(chunk, HIDDEN))
            x = x + F.linear(torch.cat(parts) if len(parts) > 1 else parts[0], *layer["out"])
            h = F.layer_norm(x, (HIDDEN,), *layer["ln2"])
            x = x + F.linear(F.relu(F.linear(h, *layer["fc1"])), *layer["fc2"])
        # Logits and a greedy sample for one position per request: each decode, the chunk's last.
        rows = torch.cat([x[:decodes], x[-1:]]) if chunk else x[:decodes]
        return F.linear(F.layer_norm(rows, (HIDDEN,), *final_ln), embedding).argmax(dim=-1)

    todo = cells()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    peak_activation = 0
    with torch.inference_mode(), (out / "steps.jsonl").open("w") as steps:
        for index, (decodes, context, chunk, prefix) in enumerate(todo):
            tokens = decodes + chunk
            x = torch.empty(tokens, HIDDEN, dtype=half, device=device).normal_()
            torch.cuda.reset_peak_memory_stats()
            times = []
            for repeat in range(WARMUP + REPEATS):
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                step(x, decodes, context, chunk, prefix)
                end.record()
                end.synchronize()
                if repeat >= WARMUP:
                    times.append(begin.elapsed_time(end) / 1000.0)
            peak_activation = max(peak_activation, torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated())
            requests = decodes + (1 if chunk else 0)
            context_after = decodes * (context + 1) + (prefix + chunk if chunk else 0)
            attended = decodes * attended_pairs(1, context + 1)
            attended += attended_pairs(chunk, prefix + chunk) if chunk else 0
            for seconds in times:
                row = {"tokens": tokens, "requests": requests, "context_tokens": context_after}
                steps.write(json.dumps({**row, "attended": attended, "seconds": seconds}) + "\n")
            print(
                f"[{index + 1}/{len(todo)}] decodes={decodes} context={context} chunk={chunk} prefix={prefix}: "
                f"median {statistics.median(times) * 1000:.2f} ms",
                flush=True,
            )
    _, total = torch.cuda.mem_get_info()
    properties = torch.cuda.get_device_properties(0)
    info = {
        "gpu": properties.name,
        "total_memory_bytes": total,
        "weights_bytes": weights_bytes,
        "peak_activation_bytes": int(peak_activation),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lower_right_causal_bias": causal_lower_right is not None,
        "cells": len(todo),
        "warmup": WARMUP,
        "repeats": REPEATS,
        "seconds": round(time.monotonic() - started, 1),
    }
    (out / "device.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


def fit(measured: Path, profile_path: Path) -> None:
    from sloserve_runtime.core.profile_fit import StepSample, fit_step_time

    info = json.loads((measured / "device.json").read_text())
    samples = [StepSample.from_record(json.loads(line)) for line in (measured / "steps.jsonl").read_text().splitlines()]
    gpu = info["gpu"]
    slug = "h200" if "H200" in gpu else "h100" if "H100" in gpu else gpu.split()[-1].lower()
    # vLLM keeps gpu_memory_utilization (0.9) of the GPU, less the weights and the activation peak.
    kv_bytes = 0.9 * info["total_memory_bytes"] - info["weights_bytes"] - info["peak_activation_bytes"]
    kv_tokens = int(kv_bytes // KV_BYTES_PER_TOKEN) // 1000 * 1000
    source = (
        f"measured on one {gpu} (torch {info['torch']}, CUDA {info['cuda']}) by `docs/scripts/gpu_step_times.py "
        f"measure`: {len(samples)} steps ({info['cells']} cells x {info['repeats']} repeats after {info['warmup']} "
        f"warm-up) of a plain-PyTorch forward pass with OPT-13B's shapes and random fp16 weights, decodes "
        f"{list(DECODES)} x contexts {list(CONTEXTS)}, prefill chunks {list(CHUNKS)} x prefixes {list(PREFIXES)}, "
        "and mixed steps; CUDA-event time of the forward pass and sampling only: no CUDA graphs, no vLLM CPU work "
        "per step, so real vLLM steps differ by a few ms either way"
    )
    result = fit_step_time(samples, f"{slug}-opt13b-measured", source, max_num_batched_tokens=8192)
    profile = result.model.to_json(
        model="OPT-13B shapes (fp16, random weights)",
        hardware=f"1x {gpu}, PyTorch eager, scaled_dot_product_attention",
    )
    profile["source"] += f"; R² {result.r2_heldout:.3f} on {result.test_points} held-out steps"
    profile["kv_capacity_tokens"] = kv_tokens
    profile["kv_capacity_source"] = (
        f"estimate: 0.9 (vLLM's gpu_memory_utilization) x {info['total_memory_bytes'] / 2**30:.1f} GiB, less "
        f"{info['weights_bytes'] / 2**30:.1f} GiB of weights and the {info['peak_activation_bytes'] / 2**30:.1f} GiB "
        f"activation peak measured, at {KV_BYTES_PER_TOKEN:,} bytes of KV per token"
    )
    profile["block_size"] = 16
    profile["block_size_source"] = "vLLM's GPU default block size"
    # vLLM's OpenAI server defaults on an H100/H200 (70 GiB or more, not an A100): 8,192 batched
    # tokens a step (the profile's chunk size above) and 1,024 running requests.
    profile["max_num_seqs"] = 1024
    profile_path.write_text(json.dumps(profile, indent=2) + "\n")
    print(json.dumps(profile, indent=2))


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("measure", "fit") or (sys.argv[1] == "fit" and len(sys.argv) < 4):
        sys.exit(__doc__)
    if sys.argv[1] == "measure":
        measure(Path(sys.argv[2]))
    else:
        fit(Path(sys.argv[2]), Path(sys.argv[3]))
