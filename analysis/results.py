"""Per-image certification results: every single sigma (Cohen CERTIFY) and cascades over sigma subsets.

Output is one tidy DataFrame, one row per (image, method), with ``RESULT_COLUMNS``:
image_id, label, method ("sigma=0.25", "cascade(0.25,0.5,1.0)"), pred (-1 = abstain),
radius (0 when abstaining), correct (pred == label, never for an abstention), fired_sigma
(the sigma whose certificate is used; nan on abstention) and pred_clean (the classifier on
the clean image; <NA> when unknown, e.g. for legacy logs).

A run made with sequential sampling (pipeline/sequential.py) is certified from its table and
its plan (``plan=``, the manifest's ``sequential_plan``): each row's n names the look where it
stopped, every certificate is recomputed with the plan's rule (rows the plan would not have
stopped are refused), radii are grid radii (the method name ends in ``GRID_LABEL``, so its ACR
reads as a grid-resolved one), and a re-analysis the plan does not cover (smaller alpha, radii
off the grid, another mode, and for a cascade another p0, sigma set or schedule) is refused
naming the setting.

Predict-mode runs (Cohen's PREDICT) have no radius: :func:`predict_table` gives one row per
(image, method) with ``PREDICT_COLUMNS``.

Cascade-mode runs hold a lower-sigma row only for images whose higher levels did not stop the
walk (fell through; or were undecided, under ``bonferroni-fallthrough``).
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
from pipeline.sequential import (
    LOOK_FIELD,
    SequentialError,
    SequentialPlan,
    certify_cascade_sequential_sparse,
    certify_sequential_sparse,
    predict_sequential_sparse,
    predict_sparse,
    sequential_stage_outcome,
)

RESULT_COLUMNS = ("image_id", "label", "method", "pred", "radius", "correct", "fired_sigma", "pred_clean")
PREDICT_COLUMNS = ("image_id", "label", "method", "pred", "correct", "pred_clean")
GRID_LABEL = " [grid radii]"  # ends the method name of certificates resolved to a sequential plan's grid


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


def _match_sigmas(counts: CountsTable, sigmas: Sequence[float] | None, allow_absent: bool = False) -> list[float]:
    """The table's sigmas matching ``sigmas`` (None: all present). ``allow_absent``: a sigma with
    no rows is kept (a cascade level that no image reached; the cascade checks none needed it)."""
    present = counts.sigmas
    if sigmas is None:
        return present.tolist()
    matched = []
    for s in sigmas:
        hit = np.flatnonzero(np.isclose(present, float(s), rtol=1e-9, atol=1e-12))
        if hit.size:
            matched.append(float(present[hit[0]]))
        elif allow_absent:
            matched.append(float(s))
        else:
            raise ValueError(f"sigma={s} has no rows (the table has sigmas {present.tolist()})")
    return sorted(set(matched))


def _with_empty_row(counts: SparseCounts) -> SparseCounts:
    """``counts`` plus one empty row at index num_rows (stands in for rows that do not exist)."""
    offsets = np.append(counts.offsets, counts.offsets[-1])
    return SparseCounts(offsets=offsets, classes=counts.classes, values=counts.values)


def _sigma_rows(counts: CountsTable, sigma: float) -> np.ndarray:
    """The rows at ``sigma``, sorted by image_id."""
    rows = np.flatnonzero(counts.sigma == sigma)
    return rows[np.argsort(counts.image[rows])]


def single_sigma_results(counts: CountsTable, sigma: float, alpha: float,
                         plan: SequentialPlan | None = None) -> pd.DataFrame:
    """Cohen CERTIFY at ``sigma`` for every image that has a row at ``sigma`` (sorted by image_id);
    with a sequential ``plan``, the plan's certificate (grid radii) from each row's look."""
    rows = _sigma_rows(counts, sigma)
    counts0, counts1 = counts.counts0.take(rows), counts.counts.take(rows)
    if plan is None:
        pred, radius = certify_sparse(counts0, counts1, sigma, alpha)
        method = single_method(sigma)
    else:
        pred, radius = certify_sequential_sparse(plan, sigma, counts0, counts1, plan.look_of(counts1.totals()))
        method = single_method(sigma) + GRID_LABEL
    fired = np.where(np.asarray(pred) >= 0, sigma, np.nan)
    return results_frame(
        counts.image_ids[counts.image[rows]], counts.label[rows], method, pred, radius, fired,
        counts.pred_clean[rows],
    )


def cascade_results(counts: CountsTable, sigmas: Sequence[float], alpha: float, p0: float, schedule: str,
                    plan: SequentialPlan | None = None) -> pd.DataFrame:
    """The cascade over ``sigmas`` for every image of the table, sorted by image_id (label and
    pred_clean from the top level's row); with a sequential ``plan``, the plan's cascade (grid
    radii) from each row's look."""
    levels = sorted(sigmas, reverse=True)  # stage 0 = highest sigma
    method = cascade_method(levels) + (GRID_LABEL if plan is not None else "")
    num_images = len(counts.image_ids)
    row = np.full((len(levels), num_images), -1, dtype=np.int64)
    for stage, sigma in enumerate(levels):
        rows = np.flatnonzero(counts.sigma == sigma)
        row[stage, counts.image[rows]] = rows
    missing = counts.sigma.size  # index of the empty stand-in row
    counts0, counts1 = _with_empty_row(counts.counts0), _with_empty_row(counts.counts)
    stacked = [
        (sigma, counts0.take(np.where(r >= 0, r, missing)), counts1.take(np.where(r >= 0, r, missing)))
        for sigma, r in zip(levels, row)
    ]
    if plan is None:
        if (row < 0).any():
            _check_reached_levels(counts, levels, row, method, schedule, lambda stage, rows: cascade_stage_outcome(
                stage, len(levels), counts.counts0.take(rows), counts.counts.take(rows), alpha, p0, schedule))
        pred, radius, fired = certify_cascade_sparse(stacked, alpha, p0=p0, schedule=schedule)
    else:
        # a row's look comes from its n; rows a stage never reached are not read (look 0 stands in)
        looks = [np.where(r >= 0, plan.look_of(np.where(r >= 0, c.totals(), plan.looks[0])), 0)
                 for r, (_, _, c) in zip(row, stacked)]
        if (row < 0).any():
            _check_reached_levels(counts, levels, row, method, plan.schedule, lambda stage, rows: sequential_stage_outcome(
                plan, stage, counts.counts0.take(rows), counts.counts.take(rows)))
        pred, radius, fired = certify_cascade_sequential_sparse(
            plan, [(sigma, c0, c, look) for (sigma, c0, c), look in zip(stacked, looks)])
    top = row[0]
    return results_frame(
        counts.image_ids, counts.label[top], method, pred, radius, fired, counts.pred_clean[top]
    )


def _check_reached_levels(counts: CountsTable, levels: list[float], row: np.ndarray, method: str, schedule: str,
                          stage_outcome) -> None:
    """CountsError naming an image if the cascade (its walk under ``schedule``) reaches a level for
    which it has no row; ``stage_outcome(stage, rows)`` is the stage's outcome on those table rows."""

    def outcome(stage: int, reached: np.ndarray) -> np.ndarray:
        lacking = reached[row[stage, reached] < 0]
        if lacking.size:
            why = "it is the top level" if stage == 0 else "no higher level stopped it"
            raise CountsError(
                f"{method}: image_id={counts.image_ids[lacking[0]]!r} has no row at sigma={levels[stage]!r}, which "
                f"the cascade needs ({why}; {lacking.size} image(s) affected). Cascade-mode runs only hold the "
                f"levels their own p0/alpha/schedule/sigmas reached."
            )
        return stage_outcome(stage, row[stage, reached])

    walk_cascade(row.shape[1], len(levels), outcome, schedule)


def certify_table(
    table: pa.Table | CountsTable,
    sigmas: Sequence[float] | None = None,
    cascades: Sequence[Sequence[float]] | None = None,
    p0: float | None = None,
    alpha: float | None = None,
    schedule: str | None = None,
    plan: SequentialPlan | None = None,
    radii: Sequence[float] | None = None,
) -> pd.DataFrame:
    """Tidy per-image results (``RESULT_COLUMNS``) for each single sigma and each cascade.

    ``sigmas``: the single sigmas (default: all in the table). ``cascades``: sigma subsets to
    cascade over (default: one cascade over ``sigmas`` when there are at least two; pass
    ``[]`` for none). A counts ``pa.Table`` is validated first (``CountsError`` if bad).

    ``plan``: the run's sequential plan (None: fixed sampling). Every certificate is then the
    plan's, recomputed from the rows (see the module doc); the defaults follow the plan's mode
    (``full``: every single sigma, no cascade; ``cascade``: no single sigma, one cascade over
    the plan's sigmas), and ``alpha``, ``p0``, ``schedule``, the sigmas asked and ``radii`` (the
    radii the results will be read at) must be covered by the plan: :class:`SequentialError`
    naming the setting otherwise. Certificates stay at the plan's alpha (they hold at any
    larger one). ``p0`` / ``alpha`` / ``schedule`` None: the plan's, else 0.5 / 0.001 /
    ``bonferroni``.
    """
    p0 = p0 if p0 is not None else plan.p0 if plan is not None else 0.5
    alpha = alpha if alpha is not None else plan.alpha if plan is not None else 0.001
    schedule = schedule if schedule is not None else plan.schedule if plan is not None else "bonferroni"
    if plan is not None and plan.mode == "predict":
        raise SequentialError("the run predicted (smoothing.mode: predict): it has no certificates; use predict_table")
    if plan is not None and isinstance(table, pa.Table):
        check_look_column(table, plan)
    counts = table if isinstance(table, CountsTable) else validate_counts(table)
    if plan is not None and sigmas is None:
        sigmas = counts.sigmas.tolist() if plan.mode == "full" else []
    singles = _match_sigmas(counts, sigmas)
    if cascades is None:
        if plan is not None:
            cascades = [plan.sigmas] if plan.mode == "cascade" else []
        else:
            cascades = [singles] if len(singles) > 1 else []
    subsets = dict.fromkeys(tuple(_match_sigmas(counts, c, allow_absent=True)) for c in cascades)
    if plan is not None:
        _refuse_uncovered(plan, singles, list(subsets), p0, alpha, schedule, radii)
    frames = [single_sigma_results(counts, s, alpha, plan) for s in singles]
    frames += [cascade_results(counts, list(subset), alpha, p0, schedule, plan) for subset in subsets]
    if not frames:
        raise ValueError("nothing to certify: no sigma and no cascade selected")
    return concat_results(frames)


def _refuse_uncovered(plan: SequentialPlan, singles: Sequence[float], cascades: Sequence[Sequence[float]], p0: float,
                      alpha: float, schedule: str, radii: Sequence[float] | None) -> None:
    """SequentialError naming each setting of this analysis that ``plan`` does not cover."""
    problems = [f"alpha={alpha}: {why}" for why in plan.uncovered(alpha=alpha)]
    if radii is not None:
        problems += [f"radii={list(radii)}: {why}" for why in plan.uncovered(radii=radii)]
    if singles:
        problems += [f"sigmas={list(singles)}: {why}" for why in plan.uncovered(mode="full", sigmas=singles)]
    for subset in cascades:
        problems += [f"{cascade_method(subset)} at p0={p0}, schedule={schedule!r}: {why}"
                     for why in plan.uncovered(mode="cascade", p0=p0, sigmas=subset, schedule=schedule)]
    if problems:
        raise SequentialError("not covered by the run's sequential plan: " + "; ".join(problems))


def check_look_column(table: pa.Table, plan: SequentialPlan) -> None:
    """SequentialError naming the first row whose recorded ``look`` (``LOOK_FIELD``) is null or
    disagrees with its n (a row's n is its look's sample count); nothing when the column is absent."""
    if LOOK_FIELD.name not in table.column_names:
        return
    recorded = table[LOOK_FIELD.name].to_numpy(zero_copy_only=False).astype(float)  # null -> nan
    expected = plan.look_of(table["n"].to_numpy())
    bad = np.flatnonzero(~(recorded == expected))
    if bad.size:
        row = int(bad[0])
        raise SequentialError(f"column '{LOOK_FIELD.name}': row {row} (image_id={table['image_id'][row].as_py()!r}, "
                              f"sigma={table['sigma'][row].as_py()!r}) records look {recorded[row]}, but its "
                              f"n = {table['n'][row].as_py()} is look {int(expected[row])} of the sequential plan")


def predict_table(table: pa.Table | CountsTable, sigmas: Sequence[float] | None = None, alpha: float | None = None,
                  plan: SequentialPlan | None = None) -> pd.DataFrame:
    """Cohen's PREDICT per (image, sigma) with ``PREDICT_COLUMNS`` (method ``predict sigma=S``;
    pred -1 = abstain; correct never for an abstention), from each row's estimation counts (its
    selection counts are not used). ``plan``: the run's sequential plan in ``predict`` mode
    (each row decided at its look; alpha must be covered); None: fixed sampling at ``alpha``.
    ``alpha`` None: the plan's, else 0.001."""
    alpha = alpha if alpha is not None else plan.alpha if plan is not None else 0.001
    if plan is not None and plan.mode != "predict":
        raise SequentialError(f"the run's sequential plan certifies (mode {plan.mode!r}); it holds no predictions")
    if plan is not None and isinstance(table, pa.Table):
        check_look_column(table, plan)
    counts = table if isinstance(table, CountsTable) else validate_counts(table)
    singles = _match_sigmas(counts, sigmas)
    if plan is not None:
        problems = [f"alpha={alpha}: {why}" for why in plan.uncovered(alpha=alpha, sigmas=singles)]
        if problems:
            raise SequentialError("not covered by the run's sequential plan: " + "; ".join(problems))
    frames = []
    for sigma in singles:
        rows = _sigma_rows(counts, sigma)
        estimation = counts.counts.take(rows)
        pred = (predict_sparse(estimation, alpha) if plan is None
                else predict_sequential_sparse(plan, estimation, plan.look_of(estimation.totals())))
        frame = results_frame(counts.image_ids[counts.image[rows]], counts.label[rows], predict_method(sigma), pred,
                              np.zeros(rows.size), np.full(rows.size, np.nan), counts.pred_clean[rows])
        frames.append(frame[list(PREDICT_COLUMNS)])
    if not frames:
        raise ValueError("nothing to predict: no sigma selected")
    return concat_results(frames)


def predict_method(sigma: float) -> str:
    """Method name of Cohen's PREDICT at one sigma, e.g. ``predict sigma=0.25``."""
    return "predict " + single_method(sigma)


def concat_results(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate results frames of distinct methods; ``method`` stays categorical, in frame order."""
    methods = [m for f in frames for m in f["method"].cat.categories]
    repeated = {m for m in methods if methods.count(m) > 1}
    if repeated:
        raise ValueError(f"method name(s) {sorted(repeated)} appear in more than one results frame")
    frames = [f.assign(method=f["method"].cat.set_categories(methods)) for f in frames]
    return pd.concat(frames, ignore_index=True)
