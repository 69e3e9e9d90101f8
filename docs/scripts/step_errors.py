"""How far a step log's measured steps are from a profile's prediction, by kind of step.

``sloserve serve --step-log FILE`` writes one JSON line per engine step: its features (scheduled
tokens, requests, KV context, attended pairs) and how long it took. This groups the steps by
kind (a step with prefill tokens or decodes only), by requests (8 stands for 8 or more) and by the
mean context per request, and prints the median measured time, the median prediction and the
median of their ratio per group: where the step-time model errs, and which way.

    .venv/bin/python docs/scripts/step_errors.py STEPS.jsonl [profile]
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from sloserve_runtime.core.step_time import StepTimeModel, engine_profile, resolve_profile

BANDS = ("< 300", "300-800", ">= 800")  # mean KV context per request, tokens


def context_band(per_request: int) -> int:
    return 0 if per_request < 300 else 1 if per_request < 800 else 2


def main(steps: Path, profile: Path) -> None:
    model = StepTimeModel.load(profile)
    groups: dict[tuple[str, int, int], list[tuple[float, float]]] = defaultdict(list)
    for line in steps.read_text().splitlines():
        step = json.loads(line)
        tokens, requests = step["tokens"], step["requests"]
        predicted = model.step_seconds(tokens, requests, step["context_tokens"], step["attended"])
        kind = "prefill" if tokens > requests else "decode"
        band = context_band(step["context_tokens"] // max(requests, 1))
        groups[(kind, min(requests, 8), band)].append((step["seconds"], predicted))
    print(f"{steps} against {model.name}")
    print("| step | requests | context per request | steps | measured ms | predicted ms | measured / predicted |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for (kind, requests, band), rows in sorted(groups.items()):
        measured = statistics.median(m for m, _ in rows) * 1000
        predicted = statistics.median(p for _, p in rows) * 1000
        ratio = statistics.median(m / p for m, p in rows)
        label = f"{requests}+" if requests == 8 else str(requests)
        print(f"| {kind} | {label} | {BANDS[band]} | {len(rows)} | {measured:.0f} | {predicted:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(Path(sys.argv[1]), resolve_profile(sys.argv[2]) if len(sys.argv) == 3 else engine_profile())
