"""The plot of ``python -m bench.worker_slots --plot``: DAG wall time and speed-up vs number of LLM tasks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only: no display on benchmark machines
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    from bench.worker_slots.__main__ import Result

# mode: (legend, colour, marker)
STYLE = {
    "sync": ("sync (deferrable=False)", "tab:red", "o"),
    "deferrable": ("deferrable (default)", "tab:blue", "s"),
    "worker_free": ("worker-free (start_from_trigger=True)", "tab:green", "^"),
}
TARGET_SPEEDUP = 10


def plot(
    results: dict[int, dict[str, Result]], path: Path, *, slots: int, latency_s: float, setup: str
) -> None:
    """Left: wall time of the DAG run per mode; right: speed-up over sync at the same N."""
    sizes = sorted(results)
    fig, (wall_ax, ratio_ax) = plt.subplots(1, 2, figsize=(11, 4.8), width_ratios=(3, 2))
    # What sync could do at best: N calls, `slots` at a time, no Airflow overhead at all.
    floor = [n / slots * latency_s for n in sizes]
    floor_label = f"sync floor: N / {slots} slots x {latency_s:g} s"
    wall_ax.plot(sizes, floor, color="gray", linestyle=":", label=floor_label)
    for mode, (label, color, marker) in STYLE.items():
        walls = [results[n][mode].wall_s for n in sizes]
        wall_ax.plot(sizes, walls, marker=marker, color=color, label=label)
        speedups = [results[n]["sync"].wall_s / results[n][mode].wall_s for n in sizes]
        ratio_ax.plot(sizes, speedups, marker=marker, color=color, label=label)
    annotate_walls(wall_ax, results, sizes)
    wall_ax.set(xlabel="LLM tasks in the DAG (N)", ylabel="DAG run wall time (s)", xticks=sizes)
    wall_ax.set_title(f"DAG run wall time, {slots} worker slots, {latency_s:g} s per LLM call")
    wall_ax.legend(loc="upper left", fontsize=9)
    ratio_ax.axhline(TARGET_SPEEDUP, color="gray", linestyle="--", linewidth=1)
    ratio_ax.annotate(
        f"target {TARGET_SPEEDUP}x",
        (sizes[0], TARGET_SPEEDUP),
        textcoords="offset points",
        xytext=(0, 4),
        fontsize=8,
    )
    ratio_ax.set(xlabel="LLM tasks in the DAG (N)", ylabel="speed-up vs sync (x)", xticks=sizes)
    ratio_ax.set_title("Speed-up over sync (sync wall / mode wall)")
    for ax in (wall_ax, ratio_ax):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.text(0.5, 0.01, setup, ha="center", fontsize=8, color="dimgray")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def annotate_walls(ax: plt.Axes, results: dict[int, dict[str, Result]], sizes: list[int]) -> None:
    """Each point's wall time right of it, in its mode's colour; labels of close values spread apart."""
    min_gap = 0.05 * max(r.wall_s for per_n in results.values() for r in per_n.values())
    for n in sizes:
        walls = [results[n][mode].wall_s for mode in STYLE]
        for mode, wall, height in zip(STYLE, walls, label_heights(walls, min_gap), strict=True):
            ax.annotate(
                f"{wall:.0f} s",
                (n, height),
                textcoords="offset points",
                xytext=(7, 0),
                va="center",
                fontsize=8,
                color=STYLE[mode][1],
                bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
            )


def label_heights(values: list[float], min_gap: float) -> list[float]:
    """Heights of the labels of one N: each at its value, pushed up clear of the label below it."""
    heights = list(values)
    below = float("-inf")
    for i in sorted(range(len(values)), key=values.__getitem__):
        heights[i] = max(values[i], below + min_gap)
        below = heights[i]
    return heights
