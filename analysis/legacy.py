"""Per-image certification logs of the reference implementations, as tidy results.

Two formats, told apart by their header (tab-separated, one line per image):

* Cohen et al. (locuslab/smoothing) and Carlini et al.: ``idx label predict radius correct
  time`` (predict -1 = abstain; radius printed to 3 significant digits).
* Jeong & Shin's multi-scale code: ``idx label predict radius r_neg correct pred_uc corr_uc
  stage time`` (predict -1 = abstain, -2 = the cascade stopped without a prediction; both
  become the abstain code -1 here; ``r_neg``, ``pred_uc``, ``corr_uc`` and ``stage`` are
  not part of the certificate and are not read).

``read_legacy_log`` turns such a file into the ``RESULT_COLUMNS`` frame under a method name
of the caller's choice (fired_sigma nan, pred_clean <NA>: the logs do not hold them);
``write_legacy_log`` writes the first format.
"""
from __future__ import annotations

import fsspec
import numpy as np
import pandas as pd

from analysis.results import results_frame
from pipeline.errors import MsdsmoothError

LEGACY_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
MULTISCALE_COLUMNS = ("idx", "label", "predict", "radius", "r_neg", "correct", "pred_uc", "corr_uc", "stage", "time")
MULTISCALE_STOP = -2  # Jeong & Shin: the cascade stopped (abstained) without a prediction


class LegacyLogError(MsdsmoothError, ValueError):
    """A legacy log is malformed; the message names the file, the column and an example idx."""


def read_legacy_log(uri: str, method: str) -> pd.DataFrame:
    """The log at ``uri`` (any fsspec URI) as tidy results named ``method``.

    Checks that the file has a header and at least one row, that the needed columns exist and
    hold integers / finite numbers (radius >= 0), that predict is a class or an abstain code,
    and that ``correct`` agrees with ``predict == label`` (abstentions are never correct).
    """
    try:
        with fsspec.open(uri, "rt") as f:
            log = pd.read_csv(f, sep="\t", dtype={"idx": str}, keep_default_na=False)
    except pd.errors.EmptyDataError as exc:
        raise LegacyLogError(f"{uri}: empty file (expected the header {' '.join(LEGACY_COLUMNS)})") from exc
    except FileNotFoundError as exc:
        raise LegacyLogError(f"{uri}: no such file") from exc
    if log.empty:
        raise LegacyLogError(f"{uri}: no rows under the header {list(log.columns)}")
    for column in LEGACY_COLUMNS[:-1]:
        if column not in log.columns:
            raise LegacyLogError(f"{uri}: column '{column}' missing (header: {list(log.columns)})")
    values = {}
    for column, kind in (("label", "i"), ("predict", "i"), ("correct", "i"), ("radius", "f")):
        parsed = pd.to_numeric(log[column], errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(parsed) | ((parsed != np.round(parsed)) if kind == "i" else (parsed < 0)))
        if bad.size:
            raise LegacyLogError(f"{uri}: column '{column}': bad value {log[column][bad[0]]!r} (idx={log['idx'][bad[0]]})")
        values[column] = parsed.astype(np.int64) if kind == "i" else parsed
    pred, label = values["predict"], values["label"]
    stop = MULTISCALE_STOP if "stage" in log.columns else -1
    bad = np.flatnonzero(pred < stop)
    if bad.size:
        raise LegacyLogError(f"{uri}: column 'predict': bad value {pred[bad[0]]} (idx={log['idx'][bad[0]]})")
    pred = np.where(pred < 0, -1, pred)
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
