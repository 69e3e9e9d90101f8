"""Lays a real run's per-tier attainment beside the simulator's on the same trace.

``sloserve bench`` and ``sloserve simulate`` judge their calls with the same code
(``measure/summary.py``: TTFT and every 10-token TPOT window), and given the same scenario, rates,
``--duration`` (or ``--num-requests``) and seed they send the same trace. Each writes every probe's
attainment per program kind (``by_kind``: a tier per kind in ``overload`` and ``two-tiers``), and
the attainment of the calls the scheduler admitted. This prints them side by side, per pair of
labels (a bench endpoint's label and the simulated scheduler it is compared with), and the
largest gap in points.

    .venv/bin/python docs/scripts/tier_fidelity.py REAL.json SIM.json \
        "http://127.0.0.1:8131/v1=sloserve" "http://127.0.0.1:8131/v1 [reject]=sloserve+reject" \
        "http://127.0.0.1:8132/v1=vllm"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from records import read_text


def probes(path: Path) -> dict[str, dict[float, dict]]:
    """Each label's probes by rate."""
    data = json.loads(read_text(path))
    return {entry["scheduler"]: {probe["rate"]: probe for probe in entry["probes"]} for entry in data["results"]}


def share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:5.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("real", type=Path, help="a `sloserve bench --json` file")
    parser.add_argument("sim", type=Path, help="a `sloserve simulate --json` file of the same trace")
    parser.add_argument("pairs", nargs="+", help="REAL_LABEL=SIM_LABEL, one per endpoint (and mode)")
    args = parser.parse_args()
    real, sim = probes(args.real), probes(args.sim)
    print(f"{'label':<28} {'rate':>5} {'tier':<12} {'calls':>5}  {'met: real':>9} {'sim':>6}  "
          f"{'admitted met: real':>18} {'sim':>6}")  # fmt: skip
    worst = 0.0
    for pair in args.pairs:
        real_label, sim_label = pair.split("=", 1)
        for rate, probe in sorted(real[real_label].items()):
            twin = sim[sim_label].get(rate)
            if twin is None:
                continue
            for kind, part in sorted(probe["by_kind"].items()):
                other = twin["by_kind"][kind]
                worst = max(worst, abs(part["attainment"] - other["attainment"]))
                print(
                    f"{sim_label:<28} {rate:>5g} {kind:<12} {part['requests']:>5}  {share(part['attainment']):>9} "
                    f"{share(other['attainment']):>6}  {share(part.get('admitted_attainment')):>18} "
                    f"{share(other.get('admitted_attainment')):>6}"
                )
    print(f"largest gap in attainment: {100 * worst:.1f} points")


if __name__ == "__main__":
    main()
