"""Lays a bench run's token times beside the engine's: what the front end adds, and what it costs.

A server started with ``--step-log`` records, per step, when the engine emitted which requests'
tokens and when each request reached the engine; ``sloserve bench --json F --save-detailed``
records when each call was sent and when each of its tokens reached the client. Both use the
wall clock, so on one machine the difference is the front end's: the API server, the HTTP
stream and the client. This prints, per run in the bench JSON:

* inbound: send to vLLM's front end creating the request, and that to the engine adding it;
* outbound: the engine emitting a token to the client reading it (first tokens and the rest);
* TTFT at the client against TTFT at the engine (added to first token);
* the calls that met their TPOT windows on the engine's timeline but not on the client's;
* for the calls whose windows the engine itself broke, how far its worst window ran over
  the TPOT's: a few percent is the step-time model's error, more a stretch of slow steps.

    .venv/bin/python docs/scripts/frontend_delay.py BENCH.json STEPS.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from records import read_text

from sloserve.slo import judge


def quantiles(values: list[float]) -> str:
    """P50 / P90 / P99 in ms."""
    if len(values) < 2:
        return "-"
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return " / ".join(f"{cuts[q - 1] * 1000:,.1f}" for q in (50, 90, 99))


def engine_timeline(steps: Path) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per engine request id: when each of its tokens was emitted, and [created, added]."""
    emitted: dict[str, list[float]] = defaultdict(list)
    arrived: dict[str, list[float]] = {}
    for line in read_text(steps).splitlines():
        step = json.loads(line)
        for rid, count in (step.get("emitted") or {}).items():
            emitted[rid].extend([step["emitted_at"]] * count)
        arrived.update(step.get("arrived") or {})
    return emitted, arrived


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_json", type=Path, help="from sloserve bench --json F --save-detailed")
    parser.add_argument("step_log", type=Path, help="the server's --step-log for the same run")
    args = parser.parse_args()
    emitted, arrived = engine_timeline(args.step_log)
    # vLLM's engine id for a call is the stream's id, its prompt's index and a suffix: cmpl-X-0-abcd.
    by_stream_id = {rid.split("-0-")[0]: rid for rid in emitted}
    recorded = json.loads(read_text(args.bench_json))
    print(f"{args.bench_json} beside {args.step_log}: ms, P50 / P90 / P99")
    print()
    print(
        "| run | rate | calls | send to created | created to engine | outbound, first token | outbound, "
        "later tokens | TTFT at the client | TTFT at the engine | TPOT kept at the engine, lost at the client | "
        "TPOT broken at the engine, worst window over by <= 2 / 5 / 10 / more % |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for result in recorded["results"]:
        for probe in result["probes"]:
            calls = probe.get("calls")
            if calls is None:
                raise SystemExit(f"{args.bench_json}: no calls saved; run the bench with --save-detailed")
            row = delays(calls, emitted, arrived, by_stream_id)
            if row is None:
                continue
            print(f"| {result['scheduler']} | {probe['rate']:g} | " + " | ".join(row) + " |")


def delays(
    calls: list[dict], emitted: dict[str, list[float]], arrived: dict[str, list[float]], by_stream_id: dict[str, str]
) -> list[str] | None:
    """One run's row of the table, or None if none of its calls is in the step log."""
    sent_to_created, created_to_added, first_out, later_out, ttft_client, ttft_engine = [], [], [], [], [], []
    lost = kept = 0
    matched = 0
    overruns = []  # worst engine window over the target's, for calls that broke one at the engine
    for call in calls:
        rid = by_stream_id.get(call.get("request_id") or "")
        if rid is None or not call["token_times"]:
            continue
        matched += 1
        engine_times = emitted[rid]
        client_times = call["token_times"][: len(engine_times)]
        gaps = [client - engine for client, engine in zip(client_times, engine_times, strict=False)]
        first_out.append(gaps[0])
        later_out.extend(gaps[1:])
        ttft_client.append(call["token_times"][0] - call["arrival"])
        if rid in arrived:
            created, added = arrived[rid]
            sent_to_created.append(created - call["arrival"])
            created_to_added.append(added - created)
            ttft_engine.append(engine_times[0] - added)
        if call["tpot_target_ms"] is None or len(engine_times) < len(call["token_times"]):
            continue
        engine = judge(engine_times[0], engine_times, None, call["tpot_target_ms"])
        at_client = judge(call["arrival"], call["token_times"], None, call["tpot_target_ms"]).tpot_met
        kept += engine.tpot_met
        lost += engine.tpot_met and not at_client
        if not engine.tpot_met:
            overruns.append(engine.worst_window_tpot_ms / call["tpot_target_ms"] - 1)
    if not matched:
        return None
    bands = [sum(low < over <= high for over in overruns) for low, high in OVERRUN_BANDS]
    return [
        str(matched),
        quantiles(sent_to_created),
        quantiles(created_to_added),
        quantiles(first_out),
        quantiles(later_out),
        quantiles(ttft_client),
        quantiles(ttft_engine),
        f"{lost} of {kept}",
        " / ".join(map(str, bands)),
    ]


OVERRUN_BANDS = ((0.0, 0.02), (0.02, 0.05), (0.05, 0.1), (0.1, float("inf")))


if __name__ == "__main__":
    main()
