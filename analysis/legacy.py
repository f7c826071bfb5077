"""Per-image certification logs of the reference implementations, as tidy results.

Cohen et al. (locuslab/smoothing), Carlini et al. and Jeong & Shin write one tab-separated
line per image under the header ``idx label predict radius correct time`` (predict -1 =
abstain; radius printed to 3 significant digits). ``read_legacy_log`` turns such a file
into the ``RESULT_COLUMNS`` frame under a method name of the caller's choice (fired_sigma
nan, pred_clean <NA>: the logs do not hold them); ``write_legacy_log`` writes the format.
"""
from __future__ import annotations

import fsspec
import numpy as np
import pandas as pd

from analysis.results import results_frame
from pipeline.errors import MsdsmoothError

LEGACY_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")


class LegacyLogError(MsdsmoothError, ValueError):
    """A legacy log is malformed; the message names the file, the column and an example idx."""


def read_legacy_log(uri: str, method: str) -> pd.DataFrame:
    """The log at ``uri`` (any fsspec URI) as tidy results named ``method``.

    Checks that the needed columns exist, hold integers / numbers, and that ``correct``
    agrees with ``predict == label`` (abstentions are never correct).
    """
    with fsspec.open(uri, "rt") as f:
        log = pd.read_csv(f, sep="\t", dtype={"idx": str}, keep_default_na=False)
    for column in LEGACY_COLUMNS[:-1]:
        if column not in log.columns:
            raise LegacyLogError(f"{uri}: column '{column}' missing (header: {list(log.columns)})")
    values = {}
    for column, kind in (("label", "i"), ("predict", "i"), ("correct", "i"), ("radius", "f")):
        parsed = pd.to_numeric(log[column], errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(np.isnan(parsed) | ((parsed != np.round(parsed)) if kind == "i" else False))
        if bad.size:
            raise LegacyLogError(f"{uri}: column '{column}': bad value {log[column][bad[0]]!r} (idx={log['idx'][bad[0]]})")
        values[column] = parsed.astype(np.int64) if kind == "i" else parsed
    pred, label = values["predict"], values["label"]
    bad = np.flatnonzero(values["correct"].astype(bool) != ((pred == label) & (pred >= 0)))
    if bad.size:
        raise LegacyLogError(f"{uri}: column 'correct' disagrees with predict == label (idx={log['idx'][bad[0]]})")
    radius = np.where(pred >= 0, values["radius"], 0.0)
    return results_frame(log["idx"].to_numpy(), label, method, pred, radius, np.full(len(log), np.nan), None)


def write_legacy_log(results: pd.DataFrame, uri: str) -> None:
    """Write one method's results in the legacy format (full-precision radius, time column 0)."""
    if results["method"].nunique() > 1:
        raise ValueError("write_legacy_log takes the results of one method")
    log = pd.DataFrame(
        {
            "idx": results["image_id"].astype(str).to_numpy(),
            "label": results["label"].to_numpy(),
            "predict": results["pred"].to_numpy(),
            "radius": results["radius"].to_numpy(),
            "correct": results["correct"].to_numpy().astype(np.int64),
            "time": "0:00:00",
        }
    )
    with fsspec.open(uri, "wt") as f:
        log.to_csv(f, sep="\t", index=False, float_format="%.17g")
