"""A replicated deployment: N engine replicas on Ray behind one gateway endpoint.

``sloserve serve --replicas N`` runs ``serve_forever``; ``sloserve run app.py --replicas N`` and
the tests use ``replicated`` (a context manager that yields the endpoint and stops everything).
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn

from sloserve_runtime.cluster.gateway import Gateway
from sloserve_runtime.cluster.replicas import ReplicaSet
from sloserve_runtime.core.step_time import StepTimeModel
from sloserve_runtime.serving import server


@dataclass
class Deployment:
    """What ``replicated`` yields: the endpoint, the replicas behind it and the gateway."""

    url: str  # the gateway's OpenAI base URL, .../v1
    replicas: ReplicaSet
    gateway: Gateway
    served_model: str


def token_counter(model: str | None) -> Callable[[dict[str, Any]], int]:
    """Counts a request's prompt tokens with the model's tokenizer (the chat template for messages)."""
    from transformers import AutoTokenizer

    path, _ = server.resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)

    def count(body: dict[str, Any]) -> int:
        try:
            if "messages" in body:
                ids = tokenizer.apply_chat_template(body["messages"], tokenize=True, add_generation_prompt=True)
                return len(ids)
            prompt = body.get("prompt", "")
            if isinstance(prompt, list) and all(isinstance(token, int) for token in prompt):
                return len(prompt)  # already token ids
            if isinstance(prompt, list):
                prompt = " ".join(str(part) for part in prompt)
            return len(tokenizer.encode(str(prompt)))
        except Exception:  # noqa: BLE001 - a template the tokenizer cannot apply: estimate instead
            return max(1, len(json.dumps(body.get("messages") or body.get("prompt") or "")) // 4)

    return count


def build_gateway(
    replicas: ReplicaSet, infos: list[dict[str, Any]], options: server.ServerOptions, router: str
) -> Gateway:
    step_time = StepTimeModel.load(options.profile_path)
    return Gateway(
        infos,
        router,
        step_time,
        options.max_num_batched_tokens,
        token_counter(options.model),
        default_slo=options.default_slo,
        default_admission=options.admission,
        refresh=replicas.info_nowait,
    )


def _uvicorn_config(gateway: Gateway, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(gateway.app(), host=host, port=port, log_level="warning", access_log=False)


def serve_forever(options: server.ServerOptions, count: int, router: str, ray_address: str | None) -> None:
    """Start the replicas and serve the gateway on ``options.host:options.port`` until interrupted."""
    replicas = ReplicaSet(count, options, ray_address, log_dir=tempfile.mkdtemp(prefix="sloserve-replicas-"))
    try:
        infos = replicas.start()
        gateway = build_gateway(replicas, infos, options, router)
        uvicorn.Server(_uvicorn_config(gateway, options.host, options.port)).run()
    finally:
        replicas.stop()


@contextmanager
def replicated(
    options: server.ServerOptions, count: int, router: str = "slo", ray_address: str | None = None
) -> Iterator[Deployment]:
    """Run ``count`` replicas and a gateway on a free port for the duration of a block."""
    replicas = ReplicaSet(count, options, ray_address, log_dir=tempfile.mkdtemp(prefix="sloserve-replicas-"))
    try:
        infos = replicas.start()
        gateway = build_gateway(replicas, infos, options, router)
        port = server.free_port(options.host)
        front = uvicorn.Server(_uvicorn_config(gateway, options.host, port))
        thread = threading.Thread(target=front.run, name="sloserve-gateway", daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not front.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise server.ServerError(f"the gateway did not start on {options.host}:{port}")
            time.sleep(0.05)
        try:
            yield Deployment(
                f"http://{options.host}:{port}/v1", replicas, gateway, server.resolve_model(options.model)[1]
            )
        finally:
            front.should_exit = True
            thread.join(timeout=10)
    finally:
        replicas.stop()
