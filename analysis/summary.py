"""Per-method summaries of tidy results, and the paper-style tables (markdown, LaTeX, CSV).

For each method, over the images that method has a result for (``n_images``):
certified accuracy at radius r = mean(correct and radius >= r); ACR = mean(radius * correct);
abstain rate = mean(pred == -1); clean accuracy = mean(pred_clean == label) over the images
whose clean prediction is known (nan for none, e.g. legacy logs).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

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
    clean_hit = (results["pred_clean"].astype("Float64") == results["label"]).astype("Float64")
    per_row = pd.DataFrame(
        {
            "method": results["method"].astype(str).to_numpy(),
            "n_images": 1,
            "clean_accuracy": clean_hit.to_numpy(dtype=np.float64, na_value=np.nan),
            **{radius_column(r): (correct & (radius >= r)).astype(np.float64) for r in radii},
            "acr": radius * correct,
            "abstain_rate": (results["pred"].to_numpy() < 0).astype(np.float64),
        }
    )
    how = {c: "mean" for c in per_row.columns[2:]} | {"n_images": "sum"}
    return per_row.groupby("method", sort=False).agg(how)[list(per_row.columns[1:])].reset_index()


def _cells(summary: pd.DataFrame, radii: Sequence[float]) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """Header, formatted cells, and which cells hold their column's best (nonzero) certified accuracy or ACR."""
    # (column, header, scale, decimals, mark the best)
    spec = [
        ("clean_accuracy", "Clean (%)", 100, 1, False),
        *((radius_column(r), radius_column(r), 100, 1, True) for r in radii),
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


def _notes(summary: pd.DataFrame, skipped: int | None) -> list[str]:
    notes = []
    if summary["n_images"].nunique() > 1:
        notes.append("n = images the method has a result for; it differs between methods (e.g. a cascade-mode run "
                     "holds a lower sigma only for images whose higher sigmas fell through).")
    if skipped is not None:
        notes.append(f"Skipped images (error records, no counts): {skipped}.")
    return notes


def to_markdown(summary: pd.DataFrame, radii: Sequence[float] = DEFAULT_RADII, skipped: int | None = None) -> str:
    """Markdown table: certified accuracy (%) at each radius ``r=``, ACR; best per column in bold."""
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


def to_latex(summary: pd.DataFrame, radii: Sequence[float] = DEFAULT_RADII, skipped: int | None = None) -> str:
    """LaTeX (booktabs) tabular of the same table, best per column in \\textbf."""
    header, rows, bold = _cells(summary, radii)
    header = [_latex_escape(h) for h in header]
    lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule", " & ".join(header) + r" \\", r"\midrule"]
    for row, marks in zip(rows, bold):
        cells = [_latex_escape(c) for c in row]
        lines.append(" & ".join(rf"\textbf{{{c}}}" if b else c for c, b in zip(cells, marks)) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines + [f"% {note}" for note in _notes(summary, skipped)]) + "\n"
