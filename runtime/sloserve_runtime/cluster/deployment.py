"""Replicas as a Ray Serve application: N engine replicas behind an OpenAI-compatible ingress.

``build_app`` binds the two deployments: ``Ingress`` (``ingress.py``, Ray Serve's HTTP proxy hands
it every request) and ``EngineReplica`` (``replica.py``, one engine each), whose calls our request
router places (``routing.py``). Ray Serve does the rest: replica health checks and restarts,
failover, the proxy, and autoscaling between ``min_replicas`` and ``max_replicas`` on SLO
attainment (``autoscaling.py``).

``sloserve serve --replicas N`` runs ``serve_forever``; ``sloserve run app.py --replicas N`` and the
tests use ``replicated`` (a context manager that yields the endpoint and stops everything).
"""

from __future__ import annotations

import contextlib
import json
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sloserve_runtime.serving import server

APP_NAME = "sloserve"
RAY_NAMESPACE = "sloserve"
# Routers a replicated endpoint takes: ours (``core/router.py``, through ``SLORequestRouter``) and
# Ray Serve's own default, power of two choices on queue length.
SERVE_ROUTERS = ("slo", "power-of-two", "round-robin", "least-loaded")
HEALTH_CHECK_PERIOD_S = 1.0
ROUTING_STATS_PERIOD_S = 0.5  # how often a replica reports its requests in flight to the routers
START_TIMEOUT_S = 600.0


class ReplicaError(RuntimeError):
    """The replicated deployment could not start; the message says why and where the logs are."""


@dataclass
class Deployment:
    """What ``replicated`` yields: the endpoint and where the replicas write their info and logs."""

    url: str  # the OpenAI base URL of Ray Serve's proxy, .../v1
    served_model: str
    info_dir: Path

    def replica_infos(self) -> dict[int, dict[str, Any]]:
        """Each running replica's ``EngineReplica.info()`` by rank (a restarted one writes anew)."""
        infos = (json.loads(path.read_text()) for path in sorted(self.info_dir.glob("replica-*.json")))
        return {info["rank"]: info for info in infos}


@dataclass(frozen=True)
class Scaling:
    """How many engine replicas: fixed (``min_replicas == max_replicas``) or autoscaled between."""

    min_replicas: int
    max_replicas: int
    initial_replicas: int

    @classmethod
    def of(cls, replicas: int, min_replicas: int | None = None, max_replicas: int | None = None) -> Scaling:
        low = replicas if min_replicas is None else min_replicas
        high = replicas if max_replicas is None else max_replicas
        if low < 1 or high < low:
            raise ReplicaError(f"replicas must satisfy 1 <= --min-replicas <= --max-replicas (got {low} and {high})")
        return cls(low, high, min(max(replicas, low), high))

    @property
    def autoscaled(self) -> bool:
        return self.max_replicas > self.min_replicas


def build_app(options: server.ServerOptions, scaling: Scaling, router: str, info_dir: str) -> Any:
    """The Ray Serve application: the ingress bound to the engine deployment's handle."""
    from ray import serve
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

    from sloserve_runtime.cluster.ingress import Ingress
    from sloserve_runtime.cluster.replica import EngineReplica

    if router not in SERVE_ROUTERS:
        raise ReplicaError(f"--router {router!r} is not one of {', '.join(SERVE_ROUTERS)}")
    engine_options: dict[str, Any] = {
        "name": "EngineReplica",
        # The engine's own threads are outside Ray's CPU accounting; a GPU build takes a GPU each.
        "ray_actor_options": {"num_cpus": 0, "num_gpus": 0 if server.is_cpu_build() else 1},
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": 10.0,
        "max_ongoing_requests": 1000,  # admission is the engine's: Serve only routes
        "graceful_shutdown_timeout_s": 5.0,
    }
    if scaling.autoscaled:
        engine_options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=scaling.min_replicas,
            max_replicas=scaling.max_replicas,
            initial_replicas=scaling.initial_replicas,
            policy=AutoscalingPolicy(policy_function="sloserve_runtime.cluster.autoscaling:slo_attainment_policy"),
        )
    else:
        engine_options["num_replicas"] = scaling.min_replicas
    if router != "power-of-two":  # Ray Serve's default router
        engine_options["request_router_config"] = RequestRouterConfig(
            request_router_class="sloserve_runtime.cluster.routing:SLORequestRouter",
            request_router_kwargs={
                "router": router,
                "profile": options.profile_path,
                "max_num_batched_tokens": options.max_num_batched_tokens,
            },
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
            request_routing_stats_timeout_s=5.0,
        )
    engines = serve.deployment(EngineReplica).options(**engine_options).bind(options, scaling.max_replicas, info_dir)
    ingress = serve.deployment(Ingress).options(
        name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000
    )
    return ingress.bind(engines, options.model, options.default_slo, options.admission)


@contextlib.contextmanager
def replicated(
    options: server.ServerOptions,
    replicas: int,
    router: str = "slo",
    ray_address: str | None = None,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
) -> Iterator[Deployment]:
    """Run the application on Ray Serve, its proxy on ``options.host``:``options.port`` (a free
    port if that one is taken), for the duration of a block; everything stops after it."""
    import ray
    from ray import serve

    scaling = Scaling.of(replicas, min_replicas, max_replicas)
    info_dir = Path(tempfile.mkdtemp(prefix="sloserve-replicas-"))
    port = options.port if server.port_is_free(options.host, options.port) else server.free_port(options.host)
    owns_ray = not ray.is_initialized()
    try:
        if owns_ray:
            _init_ray(ray_address)
        serve.start(http_options={"host": options.host, "port": port}, logging_config={"log_level": "WARNING"})
        app = build_app(options, scaling, router, str(info_dir))
        _run(app, scaling, info_dir)
        yield Deployment(f"http://{options.host}:{port}/v1", server.resolve_model(options.model)[1], info_dir)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        if owns_ray and ray.is_initialized():
            ray.shutdown()  # the local instance we started goes too, and the engines with its actors


def serve_forever(
    options: server.ServerOptions,
    replicas: int,
    router: str,
    ray_address: str | None,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
) -> None:
    """``sloserve serve --replicas N``: serve until interrupted."""
    with replicated(options, replicas, router, ray_address, min_replicas, max_replicas):
        while True:
            time.sleep(3600)


def _init_ray(ray_address: str | None) -> None:
    import ray

    try:
        ray.init(
            address=ray_address, namespace=RAY_NAMESPACE, include_dashboard=False, log_to_driver=False,
            configure_logging=False,
        )  # fmt: skip
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ReplicaError(f"cannot start or reach {ray_address or 'a local Ray instance'}: {exc}") from None
    # Ray's core replaces the process's SIGINT/SIGTERM handling; put Python's back, so Ctrl-C (or
    # a TERM) while the engines start ends like any exit, with everything stopped.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


def _run(app: Any, scaling: Scaling, info_dir: Path) -> None:
    """Deploy ``app`` and wait until its engines answer; raises ReplicaError if one cannot start."""
    from ray import serve

    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP_NAME)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise ReplicaError(f"the replicas failed to start: {_first_line(status.message)}; logs in {info_dir}")
        time.sleep(1.0)
    raise ReplicaError(f"the replicas did not start within {START_TIMEOUT_S:.0f}s; see {info_dir}")


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _first_line(message: str) -> str:
    """The line of a Serve status message that names what failed (its traceback is long)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    for line in lines:
        if "Error: " in line and not line.startswith("File "):
            return line
    return lines[-1] if lines else "no reason given"
