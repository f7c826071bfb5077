"""Per-method summaries of tidy results, and the paper-style tables (markdown, LaTeX, CSV).

For each method, over the images that method has a result for (``n_images``):
certified accuracy at radius r = mean(correct and radius >= r); ACR = mean(radius * correct);
abstain rate = mean(pred == -1); clean accuracy = mean(pred_clean == label) over the images
whose clean prediction is known (nan for none, e.g. legacy logs). A method whose radii are a
sequential plan's grid radii (name ending in ``GRID_LABEL``) gets a note: its ACR is grid-resolved.

Predictions (``analysis.results.predict_table``) have their own summary, :func:`summarize_predict`
(accuracy and abstain rate per method), reported beside the certified table.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.results import GRID_LABEL

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def radius_column(r: float) -> str:
    """Summary column of certified accuracy at radius ``r``, e.g. ``r=0.25``."""
    return f"r={float(r):g}"


def summarize(results: pd.DataFrame, radii: Sequence[float] = DEFAULT_RADII) -> pd.DataFrame:
    """One row per method, in order of first appearance in ``results``.

    Columns: method, n_images, clean_accuracy, ``r=<radius>`` for each radius, acr,
    abstain_rate; accuracies and rates are fractions in [0, 1].
    """
    radius = results["radius"].to_numpy(dtype=np.float64)
    correct = results["correct"].to_numpy(dtype=bool)
    per_row = pd.DataFrame(
        {
            "method": results["method"].astype(str).to_numpy(),
            "n_images": 1,
            "clean_accuracy": _clean_hit(results),
            **{radius_column(r): (correct & (radius >= r)).astype(np.float64) for r in radii},
            "acr": radius * correct,
            "abstain_rate": (results["pred"].to_numpy() < 0).astype(np.float64),
        }
    )
    how = {c: "mean" for c in per_row.columns[2:]} | {"n_images": "sum"}
    return per_row.groupby("method", sort=False).agg(how)[list(per_row.columns[1:])].reset_index()


def _radius_columns(summary: pd.DataFrame) -> list[str]:
    """The ``r=<radius>`` columns of a :func:`summarize` frame, in its order."""
    return [c for c in summary.columns if str(c).startswith("r=")]


def _cells(summary: pd.DataFrame, radii: Sequence[float] | None) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """Header, formatted cells, and which cells hold their column's best (nonzero) certified accuracy or ACR.

    ``radii``: the radii to show, each a column of ``summary``; None: all of its ``r=`` columns."""
    columns = _radius_columns(summary) if radii is None else [radius_column(r) for r in radii]
    missing = [c for c in columns if c not in summary.columns]
    if missing:
        raise ValueError(f"radii {missing} are not in the summary (it has {_radius_columns(summary)}); "
                         "summarize with those radii, or leave radii out to show the summary's own")
    # (column, header, scale, decimals, mark the best)
    spec = [
        ("clean_accuracy", "Clean (%)", 100, 1, False),
        *((column, column, 100, 1, True) for column in columns),
        ("acr", "ACR", 1, 3, True),
        ("abstain_rate", "Abstain (%)", 100, 1, False),
    ]
    header = ["Method", "n"] + [title for _, title, *_ in spec]
    rows = [[str(m), str(n)] for m, n in zip(summary["method"], summary["n_images"])]
    bold = [[False, False] for _ in rows]
    for column, _, scale, decimals, mark in spec:
        values = np.round(summary[column].to_numpy(dtype=np.float64) * scale, decimals)
        best = np.nanmax(values) if mark and (values > 0).any() else np.nan  # a column of zeros has no best
        for i, v in enumerate(values):
            rows[i].append("-" if np.isnan(v) else f"{v:.{decimals}f}")
            bold[i].append(bool(v == best))
    return header, rows, bold


def _clean_hit(results: pd.DataFrame) -> np.ndarray:
    """Per row: 1.0 if the clean prediction is the label, 0.0 if not, nan if unknown."""
    hit = (results["pred_clean"].astype("Float64") == results["label"]).astype("Float64")
    return hit.to_numpy(dtype=np.float64, na_value=np.nan)


def summarize_predict(results: pd.DataFrame) -> pd.DataFrame:
    """One row per method of a predictions frame (``PREDICT_COLUMNS``), in order of appearance.

    Columns: method, n_images, clean_accuracy, accuracy (mean of correct: a prediction equal to
    the label; an abstention is never correct), abstain_rate; fractions in [0, 1]."""
    per_row = pd.DataFrame(
        {
            "method": results["method"].astype(str).to_numpy(),
            "n_images": 1,
            "clean_accuracy": _clean_hit(results),
            "accuracy": results["correct"].to_numpy(dtype=np.float64),
            "abstain_rate": (results["pred"].to_numpy() < 0).astype(np.float64),
        }
    )
    how = {c: "mean" for c in per_row.columns[2:]} | {"n_images": "sum"}
    return per_row.groupby("method", sort=False).agg(how)[list(per_row.columns[1:])].reset_index()


def predict_markdown(summary: pd.DataFrame) -> str:
    """Markdown table of :func:`summarize_predict`: accuracy and abstain rate (%) per method."""
    lines = ["| Method | n | Clean (%) | Accuracy (%) | Abstain (%) |", "|---|---:|---:|---:|---:|"]
    for row in summary.itertuples(index=False):
        cells = [f"{100 * v:.1f}" if not np.isnan(v) else "-" for v in (row.clean_accuracy, row.accuracy,
                                                                          row.abstain_rate)]
        lines.append("| " + " | ".join([str(row.method).replace("|", "\\|"), str(row.n_images), *cells]) + " |")
    return "\n".join(lines) + "\n"


def _notes(summary: pd.DataFrame, skipped: int | None) -> list[str]:
    notes = []
    if summary["method"].astype(str).str.endswith(GRID_LABEL).any():
        notes.append(f"Methods marked{GRID_LABEL} were sampled sequentially: their radii are resolved down to the "
                     "plan's radius grid, so certified accuracy is exact at grid radii and their ACR is a "
                     "grid-resolved ACR (below the ACR the same bounds give with exact radii).")
    if summary["n_images"].nunique() > 1:
        notes.append("n = images the method has a result for; it differs between methods (e.g. a cascade-mode run "
                     "holds a lower sigma only for images whose higher sigmas passed the walk on).")
    if skipped is not None:
        notes.append(f"Skipped images (error records, no counts): {skipped}.")
    return notes


def to_markdown(summary: pd.DataFrame, radii: Sequence[float] | None = None, skipped: int | None = None) -> str:
    """Markdown table: certified accuracy (%) at each radius ``r=`` (``radii``, default: every radius
    the summary has), ACR; best per column in bold."""
    header, rows, bold = _cells(summary, radii)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row, marks in zip(rows, bold):
        cells = [c.replace("|", "\\|") for c in row]
        lines.append("| " + " | ".join(f"**{c}**" if b else c for c, b in zip(cells, marks)) + " |")
    return "\n".join(lines) + "".join(f"\n\n{note}" for note in _notes(summary, skipped)) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(summary: pd.DataFrame, radii: Sequence[float] | None = None, skipped: int | None = None) -> str:
    """LaTeX (booktabs) tabular of the same table (``radii`` as :func:`to_markdown`), best per column in \\textbf."""
    header, rows, bold = _cells(summary, radii)
    header = [_latex_escape(h) for h in header]
    lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule", " & ".join(header) + r" \\", r"\midrule"]
    for row, marks in zip(rows, bold):
        cells = [_latex_escape(c) for c in row]
        lines.append(" & ".join(rf"\textbf{{{c}}}" if b else c for c, b in zip(cells, marks)) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines + [f"% {note}" for note in _notes(summary, skipped)]) + "\n"
