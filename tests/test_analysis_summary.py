"""Summaries against a direct pandas computation; table markup; the plot."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from analysis import concat_results, plot_certified_accuracy, summarize, to_latex, to_markdown
from analysis.plot import certified_accuracy_curve, certified_accuracy_figure
from analysis.results import results_frame

RADII = (0.0, 0.25, 0.5, 1.0, 1.7)


def random_results(method: str, size: int, seed: int, clean_known: bool = True) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 4, size)
    pred = np.where(rng.random(size) < 0.3, -1, np.where(rng.random(size) < 0.7, label, rng.integers(0, 4, size)))
    radius = np.where(pred >= 0, np.round(rng.uniform(0, 2, size), 2), 0.0)  # radii hit the thresholds exactly
    radius[:3] = [0.25, 0.5, 1.0]
    pred[:3] = label[:3]
    clean = rng.integers(0, 4, size) if clean_known else None
    return results_frame(np.arange(size).astype(str), label, method, pred, radius, np.full(size, np.nan), clean)


@pytest.fixture(scope="module")
def results() -> pd.DataFrame:
    return concat_results([random_results("b", 300, 1), random_results("a", 120, 2),
                           random_results("legacy", 50, 3, clean_known=False)])


def test_summary_matches_direct_pandas(results):
    summary = summarize(results, RADII)
    assert summary["method"].tolist() == ["b", "a", "legacy"]
    for method, got in summary.set_index("method").iterrows():
        rows = results[results["method"] == method]
        hit = (rows["pred"] == rows["label"]) & (rows["pred"] != -1)
        assert got["n_images"] == len(rows)
        for r in RADII:
            assert got[f"r={r:g}"] == pytest.approx((hit & (rows["radius"] >= r)).sum() / len(rows))
        assert got["acr"] == pytest.approx((rows["radius"] * hit).sum() / len(rows))
        assert got["abstain_rate"] == pytest.approx((rows["pred"] == -1).mean())
        if method == "legacy":
            assert np.isnan(got["clean_accuracy"])
        else:
            assert got["clean_accuracy"] == pytest.approx((rows["pred_clean"] == rows["label"]).mean())


def test_markdown_and_latex_mark_the_best_per_column(results):
    summary = summarize(results, RADII)
    markdown = to_markdown(summary, RADII, skipped=7)
    lines = markdown.splitlines()
    assert lines[0].split(" | ")[3:5] == ["r=0", "r=0.25"] and "Skipped images" in markdown and "7" in lines[-1]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:5]]
    radius_cols = range(3, 3 + len(RADII) + 1)  # radii then ACR
    for j in radius_cols:
        values = [float(row[j].strip("*")) for row in cells]
        for row, value in zip(cells, values):
            assert row[j].startswith("**") == (value == max(values) and value > 0)
    assert sum(c.startswith("**") for row in cells for c in row) >= len(RADII) + 1
    assert cells[2][2] == "-"  # unknown clean accuracy
    latex = to_latex(summary, RADII)
    assert latex.count(r"\textbf{") == sum(c.startswith("**") for row in cells for c in row)
    assert r"\begin{tabular}{lrrrrrrrrr}" in latex and r"Clean (\%)" in latex
    escaped = to_latex(summary.assign(method=["a_b", "50%", "x&y"]), RADII)
    assert re.search(r"a\\_b & .*\n50\\% & .*\nx\\&y & ", escaped)
    assert "| a\\|b | 300 |" in to_markdown(summary.assign(method=["a|b", "a", "c"]), RADII)


def test_plot_curve_and_png(results):
    rows = results[results["method"] == "a"]
    radius, correct = rows["radius"].to_numpy(), rows["correct"].to_numpy()
    grid = np.array([0.0, 0.25, 0.5, 0.9, 5.0])
    expected = [((radius >= r) & correct).mean() for r in grid]
    np.testing.assert_allclose(certified_accuracy_curve(radius, correct, grid), expected)
    png = plot_certified_accuracy(results, max_radius=2.0)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_plot_names_its_unit_and_run_and_styles_differ(results):
    (ax,) = certified_accuracy_figure(results, max_radius=2.0, title="run r1").axes
    assert "pixel units in [0, 1]" in ax.get_xlabel() and ax.get_title() == "run r1"
    styles = [line.get_linestyle() for line in ax.get_lines()]
    assert len(styles) == results["method"].nunique() and len(set(styles)) == len(styles)
