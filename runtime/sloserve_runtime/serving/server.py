"""Launching vLLM's own OpenAI-compatible server with our scheduler and middleware."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from sloserve.slo import SLO
from sloserve_runtime.core.hardware import cpu_dtype
from sloserve_runtime.core.policies import POLICIES, scheduler_name
from sloserve_runtime.core.slo_state import ADMISSION_MODES, BEST_EFFORT, DEFAULT_MAX_QUEUED_BEST_EFFORT
from sloserve_runtime.core.step_time import DEFAULT_PROFILE, engine_profile, resolve_profile
from sloserve_runtime.engine.config import SLOConfig
from sloserve_runtime.serving import settings
from sloserve_runtime.serving.model import DEFAULT_MODEL_NAME, ensure_default_model
from sloserve_runtime.serving.requests import (
    ENV_ADMISSION,
    ENV_DEFAULT_TPOT,
    ENV_DEFAULT_TTFT,
    ENV_NOTICES,
    ENV_PROFILE,
)

# Our vLLM scheduler, running any policy of ``policies.POLICIES`` but stock vLLM's own.
SLO_SCHEDULER = "sloserve_runtime.engine.scheduler.SLOScheduler"


def scheduler_cls(scheduler: str) -> str | None:
    """The ``--scheduler-cls`` that runs the registered scheduler ``scheduler``; None: vLLM's own."""
    return None if POLICIES[scheduler_name(scheduler)].stock else SLO_SCHEDULER


# vLLM's stock scheduler, deciding as vLLM does, with a step log (``--scheduler vllm --step-log``).
STOCK_WITH_STEP_LOG = "sloserve_runtime.engine.scheduler.RecordingScheduler"


class ServerError(RuntimeError):
    """The engine did not come up; the message says why and where its log is."""


@dataclass
class ServerOptions:
    """How to launch one engine; mirrors the flags of ``sloserve serve``."""

    model: str | None = None  # a vLLM model name or path; None: the embedded default model
    host: str = "127.0.0.1"
    port: int = 8011
    default_slo: SLO = SLO()  # server-wide SLO defaults
    api_key: str | None = None
    scheduler: str = "sloserve"  # a name of ``policies.POLICIES``
    profile: str | None = None  # step-time profile (path or bundled name); None: the engine's own (``profile_path``)
    max_model_len: int = 2048
    max_num_batched_tokens: int = 512  # the chunked-prefill chunk size
    step_log: str | None = None  # if set, the scheduler logs each step's features and time here
    calibrate: bool = True  # our scheduler refits the profile to the steps this engine takes
    # Steps in a row a decode without a TPOT target may sit out for a waiting admitted prompt
    # (the planner's ``max_yields``); None: the planner's default.
    max_yields: int | None = None
    admission: str = BEST_EFFORT  # what a request the planner cannot promise gets: best effort or HTTP 429
    # Best-effort requests that may wait to start at once; past it, HTTP 429 as in reject mode. None: no bound.
    max_queued_best_effort: int | None = DEFAULT_MAX_QUEUED_BEST_EFFORT
    extra_args: list[str] = field(default_factory=list)  # passed to vLLM unchanged
    env: dict[str, str] = field(default_factory=dict)  # extra environment of the engine (e.g. its CPU cores)
    # Where the scheduler pushes admission notices to the middleware: a Linux abstract socket,
    # so nothing is left on disk however the server ends.
    notices: str = field(default_factory=lambda: notices_address())

    def __post_init__(self) -> None:
        if self.admission not in ADMISSION_MODES:
            raise ValueError(f"admission {self.admission!r}: use one of {', '.join(ADMISSION_MODES)}")

    @property
    def profile_path(self) -> str:
        """The profile named, else the bundled one of the default model in the dtype the engine runs in."""
        if self.profile is not None:
            return str(resolve_profile(self.profile))
        return str(engine_profile(self.dtype) if self.dtype is not None else DEFAULT_PROFILE)

    @property
    def dtype(self) -> str | None:
        """The dtype the engine loads the model in: the user's ``--dtype``, else the CPU's; None on a GPU build."""
        return _named_dtype(self.extra_args) or (cpu_dtype() if is_cpu_build() else None)

    @property
    def reports_admission(self) -> bool:
        """Our scheduler runs, so admission decisions reach the middleware."""
        return scheduler_cls(self.scheduler) is not None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"


def notices_address() -> str:
    """A fresh address for one engine's admission notices (each engine needs its own)."""
    return f"ipc://@sloserve-notices-{uuid.uuid4().hex}"


def resolve_model(model: str | None) -> tuple[str, str]:
    """Return (path or name to load, name to serve it under)."""
    if model is None:
        return str(ensure_default_model()), DEFAULT_MODEL_NAME
    return model, model


def command(options: ServerOptions) -> list[str]:
    model_path, served_name = resolve_model(options.model)
    args = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_path,
        "--served-model-name", served_name,
        "--host", options.host,
        "--port", str(options.port),
        "--middleware", "sloserve_runtime.serving.middleware.SLOMiddleware",
        "--max-model-len", str(options.max_model_len),
        "--max-num-batched-tokens", str(options.max_num_batched_tokens),
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    ours = scheduler_cls(options.scheduler)
    if ours is not None:
        config = SLOConfig(
            options.default_slo, options.profile_path, options.step_log, policy=scheduler_name(options.scheduler),
            notices=options.notices, calibrate=options.calibrate, max_yields=options.max_yields,
            admission=options.admission, max_queued_best_effort=options.max_queued_best_effort,
        )  # fmt: skip
        args += ["--scheduler-cls", ours, "--additional-config", json.dumps(config.to_additional_config())]
    elif options.step_log:
        config = SLOConfig(step_log=options.step_log, calibrate=False).to_additional_config()
        args += ["--scheduler-cls", STOCK_WITH_STEP_LOG, "--additional-config", json.dumps(config)]
    if options.model is None:
        # tool_choice="required" needs a tool parser; SmolLM2's chat format is Hermes-like (ChatML).
        args += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    if is_cpu_build():
        args += ["--enforce-eager"]
        if _named_dtype(options.extra_args) is None:
            args += ["--dtype", cpu_dtype()]
    if options.api_key:
        args += ["--api-key", options.api_key]
    return args + list(options.extra_args)


def environment(options: ServerOptions) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", settings.kv_cache_gib())
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(options.env)
    env[ENV_PROFILE] = options.profile_path
    env[ENV_ADMISSION] = options.admission
    if options.reports_admission:
        env[ENV_NOTICES] = options.notices
    else:
        env.pop(ENV_NOTICES, None)
    slo = options.default_slo.to_json()
    for key, value in ((ENV_DEFAULT_TTFT, slo["ttft_ms"]), (ENV_DEFAULT_TPOT, slo["tpot_ms"])):
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def is_cpu_build() -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm-cpu")
    except PackageNotFoundError:
        return False
    return True


def _named_dtype(extra_args: Sequence[str]) -> str | None:
    """The ``--dtype`` among the arguments passed through to vLLM ("" if it has no value); None if none."""
    for index, arg in enumerate(extra_args):
        if arg == "--dtype":
            return extra_args[index + 1] if index + 1 < len(extra_args) else ""
        if arg.startswith("--dtype="):
            return arg.split("=", 1)[1]
    return None


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass
class RunningServer:
    """A started engine process and where to reach it."""

    process: subprocess.Popen
    options: ServerOptions
    log_path: Path
    served_model: str

    @property
    def url(self) -> str:
        return self.options.url

    def warm_up(self) -> None:
        """Run a few untimed requests first, so that what is timed next does not pay the engine's
        one-off costs (the first chat template, detokenizer and forward pass of each shape)."""
        warm_up(self.url, self.served_model)

    def stop(self, timeout: float = 20.0) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


# Prompts of a short and a long shape, streamed and not: the paths a first stage call takes.
_WARM_UP_PROMPTS = ("Hi", "Warm up: " + "the quick brown fox jumps over the lazy dog. " * 24)


def warm_up(url: str, model: str, api_key: str | None = None, timeout: float = 60.0) -> None:
    """Send untimed chat requests to an engine at ``url`` (an OpenAI base URL), each alone."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:
        for prompt in _WARM_UP_PROMPTS:
            for stream in (False, True):
                body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8}
                response = client.post("/chat/completions", json={**body, "stream": stream})
                response.raise_for_status()


def start(
    options: ServerOptions,
    log_path: Path | None = None,
    timeout: float = 300.0,
    preexec: Callable[[], None] | None = None,
) -> RunningServer:
    """Start vLLM's server in its own process group and wait until it answers.

    ``preexec`` runs in the child before vLLM starts (a replica ties the engine's life to its own).
    """
    if not port_is_free(options.host, options.port):
        raise ServerError(f"port {options.port} on {options.host} is in use; pick another with --port")
    args = command(options)
    if log_path is None:
        log_path = Path(tempfile.mkstemp(prefix="sloserve-engine-", suffix=".log")[1])
    log = log_path.open("wb")
    process = subprocess.Popen(
        args,
        env=environment(options),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=preexec,  # a prctl call: no locks or threads involved
    )
    server = RunningServer(process, options, log_path, served_model=resolve_model(options.model)[1])
    try:
        _wait_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: RunningServer, timeout: float) -> None:
    health = f"http://{server.options.host}:{server.options.port}/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerError(
                f"the engine exited with code {server.process.returncode} while starting; "
                f"last lines of {server.log_path}:\n{tail(server.log_path)}"
            )
        try:
            if httpx.get(health, timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise ServerError(f"the engine did not answer {health} within {timeout:.0f}s; see {server.log_path}")


def tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def embedded_server(options: ServerOptions, log_path: Path | None = None) -> Iterator[RunningServer]:
    """Run an engine for the duration of a block; it is always stopped afterwards."""
    server = start(options, log_path)
    try:
        yield server
    finally:
        server.stop()
