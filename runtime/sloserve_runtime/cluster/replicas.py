"""Engine replicas on Ray: each replica is a Ray actor that runs one `sloserve serve` engine.

The actor owns the engine process (vLLM's OpenAI server with our scheduler and middleware), and
the two live and die together: a watchdog ends the actor when the engine exits, and the engine's
processes end when the actor does (parent-death signals down the chain: actor, server, engine
core, worker). Ray then restarts the actor (``max_restarts=-1``) and with it a fresh engine, on
a new port. The gateway (``gateway.py``) asks each actor for its current URL and routes requests
to the engines directly over HTTP.

Ray runs locally by default (``ray.init()`` starts an instance for this process) or joins an
existing cluster (``--ray-address``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sloserve_runtime.engine.lifecycle import parent_death_signal
from sloserve_runtime.serving import server

logger = logging.getLogger(__name__)

RAY_NAMESPACE = "sloserve"


class ReplicaError(RuntimeError):
    """A replica could not be started; the message says why and where its log is."""


def _die_with_actor() -> None:
    """In the engine's server process, before vLLM starts: SIGTERM when the actor that started it dies.

    The engine core below it dies with the server in turn (``scheduler.die_with_server``).
    """
    parent_death_signal(signal.SIGTERM)


class EngineReplica:
    """One engine; used as a Ray actor (``ReplicaSet`` wraps it with ``ray.remote``)."""

    def __init__(self, index: int, options: server.ServerOptions, log_dir: str) -> None:
        self.index = index
        host = "127.0.0.1" if options.host in ("127.0.0.1", "localhost") else _node_ip()
        self.options = replace(options, host=host, port=server.free_port(host), notices=server.notices_address())
        self.log_path = f"{log_dir}/replica-{index}-{os.getpid()}.log"
        self.running = server.start(self.options, Path(self.log_path), preexec=_die_with_actor)
        self.started_at = time.time()
        threading.Thread(target=self._watch, name="engine-watchdog", daemon=True).start()

    def _watch(self) -> None:
        """End this actor when the engine exits, so Ray restarts both."""
        self.running.process.wait()
        logger.error("replica %d: engine exited with %s; restarting", self.index, self.running.process.returncode)
        # Its engine-core child may outlive it (a killed server cannot stop it): end the whole group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.running.process.pid, signal.SIGKILL)
        os._exit(1)

    def info(self) -> dict[str, Any]:
        """Where the engine answers, its process id, and when it started (a new value after a restart)."""
        return {
            "index": self.index,
            "url": self.running.url,
            "engine_pid": self.running.process.pid,
            "actor_pid": os.getpid(),
            "started_at": self.started_at,
            "log": self.log_path,
        }


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


@dataclass
class ReplicaSet:
    """N engine replicas as Ray actors; ``start`` waits until every engine answers."""

    count: int
    options: server.ServerOptions
    ray_address: str | None = None
    log_dir: str = "/tmp"

    def start(self, timeout: float = 600.0) -> list[dict[str, Any]]:
        import ray

        if self.count < 1:
            raise ReplicaError(f"--replicas must be at least 1, got {self.count}")
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            try:
                ray.init(
                    address=self.ray_address,
                    namespace=RAY_NAMESPACE,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = self.ray_address or "a local Ray instance"
                raise ReplicaError(f"cannot start or reach {where}: {exc}") from None
            # Ray's core replaces the process's SIGINT/SIGTERM handling; put Python's back, so
            # Ctrl-C (or a TERM) while the engines start ends with ``stop()`` like any exit.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        # The engine's own threads are outside Ray's CPU accounting; a GPU build takes a GPU each.
        resources = {"num_cpus": 0, "num_gpus": 0 if server.is_cpu_build() else 1}
        actor = ray.remote(max_restarts=-1, max_task_retries=0, **resources)(EngineReplica)
        self.actors = [actor.remote(index, self._options_of(index), self.log_dir) for index in range(self.count)]
        return self.infos(timeout)

    def _options_of(self, index: int) -> server.ServerOptions:
        """Replica ``index``'s options: on the CPU build of a local instance, its own share of the cores."""
        if self.ray_address is not None or not server.is_cpu_build():
            return self.options
        cores = sorted(os.sched_getaffinity(0))
        share = [core for position, core in enumerate(cores) if position % self.count == index % len(cores)]
        if len(cores) < self.count:
            share = [cores[index % len(cores)]]
        bind = ",".join(str(core) for core in share)
        return replace(self.options, env={**self.options.env, "VLLM_CPU_OMP_THREADS_BIND": bind})

    def infos(self, timeout: float) -> list[dict[str, Any]]:
        """Each replica's ``EngineReplica.info()``; raises ReplicaError if one does not come up in time."""
        import ray

        refs = [actor.info.remote() for actor in self.actors]
        deadline = time.monotonic() + timeout
        pending = list(refs)
        # Short waits, so Ctrl-C (KeyboardInterrupt) gets through while the engines start.
        while pending and time.monotonic() < deadline:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
        if pending:
            raise ReplicaError(f"the replicas did not start within {timeout:.0f}s; see {self.log_dir}")
        try:
            return ray.get(refs)
        except ray.exceptions.RayActorError as exc:
            raise ReplicaError(f"a replica failed to start: {_first_line(exc)}; logs in {self.log_dir}") from None

    def info_nowait(self, index: int) -> dict[str, Any] | None:
        """The replica's info if it answers at once (None while it is restarting or dead)."""
        import ray

        ref = self.actors[index].info.remote()
        ready, _ = ray.wait([ref], timeout=0.5)
        if not ready:
            ray.cancel(ref, force=False)
            return None
        try:
            return ray.get(ready[0])
        except ray.exceptions.RayError:
            return None

    def stop(self) -> None:
        import ray

        # Killing the actor is enough, even while it is still starting: its engine dies with it.
        for actor in getattr(self, "actors", []):
            ray.kill(actor, no_restart=True)
        self.actors = []
        if getattr(self, "_owns_ray", False) and ray.is_initialized():
            ray.shutdown()  # the local instance we started goes too, before any exception reaches Ray's hooks


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _first_line(exc: BaseException) -> str:
    """The line of a Ray error that names what failed in the actor (its traceback is long)."""
    lines = str(exc).strip().splitlines()
    for line in lines:
        if "Error: " in line and not line.lstrip().startswith("File "):
            return line.strip()
    return lines[-1].strip() if lines else type(exc).__name__
