"""Learning-curve PNGs (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on clusters or CI
import matplotlib.pyplot as plt  # noqa: E402

Series = Sequence[tuple[float, float]]


def plot_curves(
    series: Mapping[str, Series],
    path: str | Path,
    *,
    title: str,
    xlabel: str = "step",
    ylabel: str = "",
    smooth: int = 1,
    events: Mapping[str, Sequence[float]] | None = None,
) -> Path | None:
    """One line per named series; ``smooth`` > 1 adds a running mean (raw line faded);
    ``events``: a dashed vertical line at each x of each named kind (e.g. the collapse guard's
    rollbacks), in the colour of the series of the same name when there is one.

    Returns the PNG path, or None when there is nothing to draw.
    """
    series = {k: list(v) for k, v in series.items() if len(v) > 0}
    if not series:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    colours = {}
    for label, points in series.items():
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        if smooth > 1 and len(ys) > smooth:
            (line,) = ax.plot(xs, ys, alpha=0.25, linewidth=1)
            means = [
                sum(ys[max(0, i - smooth + 1) : i + 1]) / len(ys[max(0, i - smooth + 1) : i + 1])
                for i in range(len(ys))
            ]
            ax.plot(xs, means, color=line.get_color(), label=label, linewidth=2)
        else:
            (line,) = ax.plot(xs, ys, label=label, linewidth=2, marker="o" if len(xs) < 30 else None, markersize=3)
        colours[label] = line.get_color()
    for name, xs in (events or {}).items():
        for i, x in enumerate(xs):
            ax.axvline(
                x,
                color=colours.get(name.split(" ")[0], "black"),
                linestyle="--",
                linewidth=1,
                label=name if i == 0 else None,
            )
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
