"""Certified accuracy against radius, one curve per method, as a PNG (matplotlib, Agg, no pyplot)."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def certified_accuracy_curve(radius: np.ndarray, correct: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Fraction of images with correct and radius >= r, for each r in ``grid``."""
    certified = np.sort(radius[correct])
    return (certified.size - np.searchsorted(certified, grid, side="left")) / max(radius.size, 1)


LINE_STYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))


def certified_accuracy_figure(results: pd.DataFrame, max_radius: float | None = None, points: int = 400,
                              title: str | None = None) -> Figure:
    """Certified accuracy (%) vs radius for every method in ``results``; curves differ by line
    style as well as colour (readable in greyscale); ``title`` names the run."""
    if max_radius is None:
        max_radius = max(float(results["radius"].max()) * 1.05, 0.5) if len(results) else 1.0
    grid = np.linspace(0.0, max_radius, points)
    figure = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for i, (method, group) in enumerate(results.groupby("method", sort=False, observed=True)):
        curve = certified_accuracy_curve(
            group["radius"].to_numpy(dtype=np.float64), group["correct"].to_numpy(dtype=bool), grid
        )
        ax.step(grid, 100 * curve, where="post", label=f"{method} (n={len(group)})",
                linestyle=LINE_STYLES[i % len(LINE_STYLES)])
    ax.set_xlabel(r"$\ell_2$ radius (pixel units in [0, 1] at the certification resolution)")
    if title:
        ax.set_title(title, fontsize="medium")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_xlim(0, max_radius)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    figure.tight_layout()
    return figure


def plot_certified_accuracy(results: pd.DataFrame, max_radius: float | None = None, points: int = 400,
                            title: str | None = None) -> bytes:
    """PNG bytes of :func:`certified_accuracy_figure`."""
    figure = certified_accuracy_figure(results, max_radius, points, title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
