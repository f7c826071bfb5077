"""Per-image certification results: every single sigma (Cohen CERTIFY) and cascades over sigma subsets.

Output is one tidy DataFrame, one row per (image, method), with ``RESULT_COLUMNS``:
image_id, label, method ("sigma=0.25", "cascade(0.25,0.5,1.0)"), pred (-1 = abstain),
radius (0 when abstaining), correct (pred == label, never for an abstention), fired_sigma
(the sigma whose certificate is used; nan on abstention) and pred_clean (the classifier on
the clean image; <NA> when unknown, e.g. for legacy logs).

Cascade-mode runs hold a lower-sigma row only for images whose higher levels fell through.
A single sigma then covers only the images that have its row, and a cascade needs a level's
row only where the cascade reaches that level; a reached level without its row is an error
naming the image (typically the cascade was asked with other p0 / alpha / schedule / sigmas
than the run sampled with).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from analysis.counts import CountsError, CountsTable, validate_counts
from pipeline.certification import (
    SparseCounts,
    cascade_stage_outcome,
    certify_cascade_sparse,
    certify_sparse,
    walk_cascade,
)

RESULT_COLUMNS = ("image_id", "label", "method", "pred", "radius", "correct", "fired_sigma", "pred_clean")


def single_method(sigma: float) -> str:
    """Method name of Cohen CERTIFY at one sigma, e.g. ``sigma=0.25``."""
    return f"sigma={float(sigma)!r}"


def cascade_method(sigmas: Sequence[float]) -> str:
    """Method name of the cascade over ``sigmas``, e.g. ``cascade(0.25,0.5,1.0)``."""
    return "cascade(" + ",".join(repr(float(s)) for s in sorted(sigmas)) + ")"


def results_frame(
    image_id: np.ndarray,
    label: np.ndarray,
    method: str,
    pred: np.ndarray,
    radius: np.ndarray,
    fired_sigma: np.ndarray,
    pred_clean: np.ndarray | None,
) -> pd.DataFrame:
    """A tidy results frame with ``RESULT_COLUMNS`` and their dtypes; ``correct`` is derived."""
    label, pred = np.asarray(label, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    clean = pd.array(pred_clean, dtype="Int64") if pred_clean is not None else pd.array([pd.NA] * len(pred), "Int64")
    return pd.DataFrame(
        {
            "image_id": pd.array(np.asarray(image_id, dtype=object), dtype="string"),
            "label": label,
            "method": pd.Categorical([method] * len(pred)) if len(pred) else pd.Categorical([]),
            "pred": pred,
            "radius": np.asarray(radius, dtype=np.float64),
            "correct": (pred == label) & (pred >= 0),
            "fired_sigma": np.asarray(fired_sigma, dtype=np.float64),
            "pred_clean": clean,
        }
    )


def _match_sigmas(counts: CountsTable, sigmas: Sequence[float] | None) -> list[float]:
    present = counts.sigmas
    if sigmas is None:
        return present.tolist()
    matched = []
    for s in sigmas:
        hit = np.flatnonzero(np.isclose(present, float(s), rtol=1e-9, atol=1e-12))
        if not hit.size:
            raise ValueError(f"sigma={s} has no rows (the table has sigmas {present.tolist()})")
        matched.append(float(present[hit[0]]))
    return sorted(set(matched))


def _with_empty_row(counts: SparseCounts) -> SparseCounts:
    """``counts`` plus one empty row at index num_rows (stands in for rows that do not exist)."""
    offsets = np.append(counts.offsets, counts.offsets[-1])
    return SparseCounts(offsets=offsets, classes=counts.classes, values=counts.values)


def single_sigma_results(counts: CountsTable, sigma: float, alpha: float) -> pd.DataFrame:
    """Cohen CERTIFY at ``sigma`` for every image that has a row at ``sigma`` (sorted by image_id)."""
    rows = np.flatnonzero(counts.sigma == sigma)
    rows = rows[np.argsort(counts.image[rows])]
    pred, radius = certify_sparse(counts.counts0.take(rows), counts.counts.take(rows), sigma, alpha)
    fired = np.where(np.asarray(pred) >= 0, sigma, np.nan)
    return results_frame(
        counts.image_ids[counts.image[rows]], counts.label[rows], single_method(sigma), pred, radius, fired,
        counts.pred_clean[rows],
    )


def cascade_results(counts: CountsTable, sigmas: Sequence[float], alpha: float, p0: float, schedule: str) -> pd.DataFrame:
    """The cascade over ``sigmas`` for every image of the table, sorted by image_id (label and
    pred_clean from the top level's row)."""
    levels = sorted(sigmas, reverse=True)  # stage 0 = highest sigma
    method = cascade_method(levels)
    num_images = len(counts.image_ids)
    row = np.full((len(levels), num_images), -1, dtype=np.int64)
    for stage, sigma in enumerate(levels):
        rows = np.flatnonzero(counts.sigma == sigma)
        row[stage, counts.image[rows]] = rows
    if (row < 0).any():
        _check_reached_levels(counts, levels, row, alpha, p0, schedule, method)
    missing = counts.sigma.size  # index of the empty stand-in row
    counts0, counts1 = _with_empty_row(counts.counts0), _with_empty_row(counts.counts)
    stacked = [
        (sigma, counts0.take(np.where(r >= 0, r, missing)), counts1.take(np.where(r >= 0, r, missing)))
        for sigma, r in zip(levels, row)
    ]
    pred, radius, fired = certify_cascade_sparse(stacked, alpha, p0=p0, schedule=schedule)
    top = row[0]
    return results_frame(
        counts.image_ids, counts.label[top], method, pred, radius, fired, counts.pred_clean[top]
    )


def _check_reached_levels(
    counts: CountsTable, levels: list[float], row: np.ndarray, alpha: float, p0: float, schedule: str, method: str
) -> None:
    """CountsError naming an image if the cascade reaches a level for which it has no row."""

    def outcome(stage: int, reached: np.ndarray) -> np.ndarray:
        lacking = reached[row[stage, reached] < 0]
        if lacking.size:
            why = "it is the top level" if stage == 0 else "every higher level fell through"
            raise CountsError(
                f"{method}: image_id={counts.image_ids[lacking[0]]!r} has no row at sigma={levels[stage]!r}, which "
                f"the cascade needs ({why}; {lacking.size} image(s) affected). Cascade-mode runs only hold the "
                f"levels their own p0/alpha/schedule/sigmas reached."
            )
        rows = row[stage, reached]
        return cascade_stage_outcome(
            stage, len(levels), counts.counts0.take(rows), counts.counts.take(rows), alpha, p0, schedule
        )

    walk_cascade(row.shape[1], len(levels), outcome)


def certify_table(
    table: pa.Table | CountsTable,
    sigmas: Sequence[float] | None = None,
    cascades: Sequence[Sequence[float]] | None = None,
    p0: float = 0.5,
    alpha: float = 0.001,
    schedule: str = "bonferroni",
) -> pd.DataFrame:
    """Tidy per-image results (``RESULT_COLUMNS``) for each single sigma and each cascade.

    ``sigmas``: the single sigmas (default: all in the table). ``cascades``: sigma subsets to
    cascade over (default: one cascade over ``sigmas`` when there are at least two; pass
    ``[]`` for none). A counts ``pa.Table`` is validated first (``CountsError`` if bad).
    """
    counts = table if isinstance(table, CountsTable) else validate_counts(table)
    singles = _match_sigmas(counts, sigmas)
    if cascades is None:
        cascades = [singles] if len(singles) > 1 else []
    frames = [single_sigma_results(counts, s, alpha) for s in singles]
    subsets = dict.fromkeys(tuple(_match_sigmas(counts, c)) for c in cascades)
    frames += [cascade_results(counts, list(subset), alpha, p0, schedule) for subset in subsets]
    if not frames:
        raise ValueError("nothing to certify: no sigma and no cascade selected")
    return concat_results(frames)


def concat_results(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate results frames of distinct methods; ``method`` stays categorical, in frame order."""
    methods = [m for f in frames for m in f["method"].cat.categories]
    repeated = {m for m in methods if methods.count(m) > 1}
    if repeated:
        raise ValueError(f"method name(s) {sorted(repeated)} appear in more than one results frame")
    frames = [f.assign(method=f["method"].cat.set_categories(methods)) for f in frames]
    return pd.concat(frames, ignore_index=True)
