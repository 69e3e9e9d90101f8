"""Plots of benchmark results: attainment against rate, and the TTFT distribution."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window

import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402


def attainment_and_ttft(
    path: Path,
    title: str,
    attainment: Mapping[str, Sequence[tuple[float, float]]],
    ttfts_ms: Mapping[str, Sequence[float]],
    goodput: Mapping[str, Sequence[tuple[float, float]]] | None = None,
) -> Path:
    """Attainment vs rate per series (the 90 % line marks capacity); with ``goodput``, goodput vs
    offered load; then the TTFT CDF per series."""
    panels = 3 if goodput else 2
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    left, right = axes[0], axes[-1]
    for label, points in attainment.items():
        rates, values = zip(*sorted(points), strict=True) if points else ((), ())
        left.plot(rates, [100 * v for v in values], marker="o", label=label)
    left.axhline(90, color="grey", linestyle="--", linewidth=1)
    left.set(xlabel="rate (programs/s)", ylabel="SLO attainment (%)", ylim=(0, 102), title="Attainment vs rate")
    left.legend()
    if goodput:
        middle = axes[1]
        for label, points in goodput.items():
            rates, values = zip(*sorted(points), strict=True) if points else ((), ())
            middle.plot(rates, values, marker="o", label=label)
        middle.set(xlabel="offered load (programs/s)", ylabel="goodput (requests/s)", title="Goodput vs offered load")
        middle.legend()
    for label, values in ttfts_ms.items():
        ordered = np.sort(np.asarray(values, dtype=float))
        if len(ordered):
            right.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered), label=label)
    right.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title="TTFT CDF", xscale="log")
    right.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def capacity_bars(path: Path, title: str, scenarios: Sequence[str], capacities: Mapping[str, Sequence[float]]) -> Path:
    """Grouped bars: each series' capacity per scenario, on a log scale (they span orders of magnitude)."""
    figure, axes = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / max(len(capacities), 1)
    positions = np.arange(len(scenarios))
    for index, (label, values) in enumerate(capacities.items()):
        axes.bar(positions + (index - (len(capacities) - 1) / 2) * width, values, width, label=label)
    axes.set_xticks(positions, scenarios)
    axes.set(ylabel="capacity (programs/s)", yscale="log", title=title)
    figure.legend(*axes.get_legend_handles_labels(), loc="lower center", ncols=len(capacities), frameon=False)
    figure.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below, clear of the bars
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
