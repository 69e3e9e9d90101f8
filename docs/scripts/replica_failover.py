"""Failover on Ray Serve, timed: two replicas of the default model, one engine killed mid-stream.

Starts the replicated deployment on a local Ray Serve (`--replicas 2`, the `slo` router), streams
a long answer with the official `openai` client, kills that replica's engine (SIGKILL) after a
few tokens, then times: what the client got, how long until new calls went only to the survivor
(probed with short calls back to back), and how long until Ray Serve had a new replica serving.
Prints the figures and writes them to ``--out`` (JSON).

    python docs/scripts/replica_failover.py --out docs/data/cpu-replicas2-failover.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from pathlib import Path

import openai

from sloserve_runtime.cluster.deployment import replicated
from sloserve_runtime.serving import server


async def measure(url: str, model: str, infos) -> dict:  # noqa: ANN001
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)

    async def ask() -> str:
        raw = await client.completions.with_raw_response.create(
            model=model, prompt="Hello", max_tokens=2, extra_body={"slo": {"ttft_ms": "20s"}}
        )
        return raw.headers["x-sloserve-replica"]

    stream = await client.completions.create(
        model=model, prompt="Write a long story about a lighthouse.", max_tokens=1500, stream=True,
        extra_body={"slo": {"ttft_ms": "20s"}, "ignore_eos": True},
    )  # fmt: skip
    rank = int(stream.response.headers["x-sloserve-replica"])
    victim = infos()[rank]
    received, client_saw = 0, "the stream ended normally"
    try:
        async for _ in stream:
            received += 1
            if received == 3:
                os.kill(victim["engine_pid"], signal.SIGKILL)
                killed = time.monotonic()
    except openai.APIError as exc:
        client_saw = f"{type(exc).__name__}: {exc.message}"
    error_after = time.monotonic() - killed
    # New calls: the time after the kill from which 10 calls in a row went to the survivor.
    streak, avoided_at, probes, failed = 0, None, 0, 0
    while streak < 10 and time.monotonic() - killed < 60:
        probes += 1
        try:
            replica = await ask()
        except openai.APIError:
            failed += 1
            streak, avoided_at = 0, None
            continue
        if replica == str(1 - rank):
            avoided_at = avoided_at or time.monotonic()
            streak += 1
        else:
            streak, avoided_at = 0, None
    back = None
    while time.monotonic() - killed < 600:
        info = infos().get(rank)
        if info is not None and info["engine_pid"] != victim["engine_pid"]:
            if rank in {int(await ask()) for _ in range(8)}:
                back = time.monotonic() - killed
                break
        await asyncio.sleep(1)
    return {
        "killed_replica": rank, "tokens_before_kill": received, "client_saw": client_saw,
        "client_error_after_s": round(error_after, 2),
        "new_calls_avoid_it_after_s": None if avoided_at is None else round(avoided_at - killed, 2),
        "probes": probes, "probes_failed": failed,
        "replaced_and_serving_after_s": None if back is None else round(back, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.monotonic()
    with replicated(server.ServerOptions(port=server.free_port()), 2, router="slo") as deployment:
        up = time.monotonic() - started
        server.warm_up(deployment.url, deployment.served_model)
        figures = asyncio.run(measure(deployment.url, deployment.served_model, deployment.replica_infos))
    figures["deployment_up_s"] = round(up, 1)
    print(json.dumps(figures, indent=2))
    args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
