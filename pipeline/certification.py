"""Certification math: exact binomial / multinomial bounds, Cohen's CERTIFY and the multi-scale cascade.

Pure numpy/scipy, vectorised over rows (one row = one image at one sigma). Class counts are held
as :class:`SparseCounts` (CSR); the dense functions (:func:`certify`, :func:`certify_cascade`) are
thin wrappers that build a one-row ``SparseCounts`` and call the sparse ones.

Conventions: classes are ``0..C-1``; ``-1`` (``ABSTAIN``) means abstain, with radius ``0.0``.
Every bound here is a Clopper-Pearson (exact) or Goodman bound; the docstrings say which level.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

import numpy as np
from scipy import special, stats

from pipeline.schedules import FALLTHROUGH, SCHEDULES

if TYPE_CHECKING:
    import pyarrow as pa

ABSTAIN = -1
FIRE, UNDECIDED, FALL_THROUGH = 1, 0, -1
_POOL_SIZE = 5  # the paper's Goodman merging: cells with fewer counts are pooled up to this size


def _row_reduce(ufunc: np.ufunc, x: np.ndarray, offsets: np.ndarray, empty) -> np.ndarray:
    """``ufunc.reduce`` of ``x`` over each CSR row; ``empty`` for rows without entries."""
    out = np.full(len(offsets) - 1, empty, dtype=np.result_type(x, np.asarray(empty)))
    nonempty = np.diff(offsets) > 0
    if nonempty.any():
        out[nonempty] = ufunc.reduceat(x, offsets[:-1][nonempty])
    return out


def _concat(rows: Sequence[Sequence[int]]) -> np.ndarray:
    return np.concatenate([np.asarray(r, dtype=np.int64) for r in rows] + [np.zeros(0, dtype=np.int64)])


@dataclass(frozen=True, eq=False)
class SparseCounts:
    """Per-row class counts in CSR form: row ``i`` holds ``classes[offsets[i]:offsets[i+1]]``
    (strictly ascending) with counts ``values[...]``. Zero values are allowed and mean "absent"."""

    offsets: np.ndarray  # int64 [N+1]
    classes: np.ndarray  # int64 [nnz]
    values: np.ndarray  # int64 [nnz]

    def __post_init__(self) -> None:
        for name in ("offsets", "classes", "values"):
            object.__setattr__(self, name, np.ascontiguousarray(getattr(self, name), dtype=np.int64))
        offsets, classes, values = self.offsets, self.classes, self.values
        if offsets.ndim != 1 or offsets.size == 0 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
            raise ValueError("offsets must be a non-decreasing 1-D array starting at 0")
        if classes.shape != values.shape or classes.ndim != 1 or offsets[-1] != classes.size:
            raise ValueError("classes and values must be 1-D with offsets[-1] entries")
        if np.any(values < 0) or np.any(classes < 0):
            raise ValueError("classes and counts must be non-negative")
        same_row = self._row_ids[1:] == self._row_ids[:-1]
        if np.any(np.diff(classes)[same_row] <= 0):
            raise ValueError("classes must be strictly ascending within a row")

    @classmethod
    def from_dense(cls, dense: np.ndarray) -> "SparseCounts":
        """From an ``[N, C]`` array of non-negative counts: the one dense -> CSR conversion
        (keeps the nonzero counts only, classes ascending)."""
        dense = np.asarray(dense)
        if dense.ndim != 2:
            raise ValueError(f"dense counts must be [N, C], got shape {dense.shape}")
        rows, cols = np.nonzero(dense)
        offsets = np.zeros(dense.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.count_nonzero(dense, axis=1), out=offsets[1:])
        return cls(offsets, cols, dense[rows, cols])

    @classmethod
    def from_lists(cls, classes: Sequence[Sequence[int]], values: Sequence[Sequence[int]]) -> "SparseCounts":
        """From per-row lists of classes (ascending) and their counts."""
        lengths = [len(c) for c in classes]
        if lengths != [len(v) for v in values]:
            raise ValueError("classes and values must have the same row lengths")
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(offsets, _concat(classes), _concat(values))

    def to_arrow_lists(self) -> tuple["pa.ListArray", "pa.ListArray"]:
        """(classes ``list<int32>``, values ``list<int64>``), one list per row: the sparse count
        columns of the counts table (DESIGN.md section 4), entries as held here."""
        import pyarrow as pa

        offsets = pa.array(self.offsets.astype(np.int32))
        return (pa.ListArray.from_arrays(offsets, pa.array(self.classes.astype(np.int32))),
                pa.ListArray.from_arrays(offsets, pa.array(self.values, pa.int64())))

    @property
    def num_rows(self) -> int:
        return self.offsets.size - 1

    @cached_property
    def _row_ids(self) -> np.ndarray:
        return np.repeat(np.arange(self.num_rows, dtype=np.int64), np.diff(self.offsets))

    @cached_property
    def _top(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(top class, its count, largest count among the other entries) per row."""
        top_count = _row_reduce(np.maximum, self.values, self.offsets, 0)
        idx = np.flatnonzero((self.values == top_count[self._row_ids]) & (self.values > 0))
        rows = self._row_ids[idx]
        first = idx[np.diff(rows, prepend=-1) != 0]  # classes ascend, so the first hit is the smallest
        top = np.full(self.num_rows, ABSTAIN, dtype=np.int64)
        top[self._row_ids[first]] = self.classes[first]
        rest = self.values.copy()
        rest[first] = 0
        return top, top_count, _row_reduce(np.maximum, rest, self.offsets, 0)

    def totals(self) -> np.ndarray:
        """Sum of counts per row (int64 [N])."""
        return _row_reduce(np.add, self.values, self.offsets, 0)

    def top_class(self) -> np.ndarray:
        """Argmax class per row, ties to the smallest class; -1 for a row without counts."""
        return self._top[0]

    def count_of(self, cls: np.ndarray) -> np.ndarray:
        """Count of ``cls[i]`` in row ``i`` (0 when absent, and for ``cls[i] == -1``)."""
        cls = np.broadcast_to(np.asarray(cls, dtype=np.int64), (self.num_rows,))
        hit = self.classes == cls[self._row_ids]
        out = np.zeros(self.num_rows, dtype=np.int64)
        out[self._row_ids[hit]] = self.values[hit]
        return out

    def max_count_excluding(self, cls: np.ndarray) -> np.ndarray:
        """Largest count per row over the classes other than ``cls[i]`` (0 when there is none)."""
        top, top_count, second = self._top
        return np.where(top == np.asarray(cls, dtype=np.int64), second, top_count)

    def take(self, rows: np.ndarray) -> "SparseCounts":
        """The given rows (indices, or a boolean mask), in that order."""
        rows = np.asarray(rows)
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
        lengths = np.diff(self.offsets)[rows]
        offsets = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        idx = np.repeat(self.offsets[:-1][rows] - offsets[:-1], lengths) + np.arange(offsets[-1])
        return SparseCounts(offsets, self.classes[idx], self.values[idx])


# ----------------------------------------------------------------------------- bounds


def _check_alpha(alpha) -> np.ndarray:
    alpha = np.asarray(alpha, dtype=np.float64)
    if np.any(~(alpha > 0)) or np.any(~(alpha < 1)):
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    return alpha


def _beta_quantile(fn, q: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``fn(q, a, b)`` for one level ``q`` and integer shapes ``a, b``, evaluated once per distinct
    (a, b) pair (counts repeat a lot across rows)."""
    q, a, b = np.broadcast_arrays(q, a, b)
    if q.size < 64 or q.min() != q.max():
        return fn(q, a, b)
    a, b = a.astype(np.int64), b.astype(np.int64)
    span = b.max() + 1
    keys, inverse = np.unique(a * span + b, return_inverse=True)
    return fn(q.flat[0], keys // span, keys % span)[inverse].reshape(q.shape)


def _cp_args(k, n) -> tuple[np.ndarray, np.ndarray]:
    k, n = np.broadcast_arrays(np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64))
    if np.any(k < 0) or np.any(k > n) or np.any(k != np.round(k)) or np.any(n != np.round(n)):
        raise ValueError("need integer counts 0 <= k <= n")
    return k, n


def cp_lower(k, n, tail) -> np.ndarray:
    """One-sided (1 - tail) Clopper-Pearson lower bound of k/n: P[p < bound] <= tail; 0 when k = 0."""
    k, n = _cp_args(k, n)
    q = np.broadcast_to(_check_alpha(tail), k.shape)
    bound = _beta_quantile(stats.beta.ppf, q, np.maximum(k, 1), n - k + 1)
    return np.where(k > 0, bound, 0.0)


def cp_upper(k, n, tail) -> np.ndarray:
    """One-sided (1 - tail) Clopper-Pearson upper bound of k/n: P[p > bound] <= tail; 1 when k = n."""
    k, n = _cp_args(k, n)
    q = np.broadcast_to(_check_alpha(tail), k.shape)
    bound = _beta_quantile(stats.beta.isf, q, k + 1, np.maximum(n - k, 1))
    return np.where(k < n, bound, 1.0)


def clopper_pearson(k, n, alpha) -> tuple[np.ndarray, np.ndarray]:
    """Exact two-sided (1 - alpha) Clopper-Pearson interval for a binomial proportion k/n.

    Guarantee: for every true p, P[lo <= p <= hi] >= 1 - alpha, each side failing with
    probability <= alpha/2. ``lo = 0`` when k = 0, ``hi = 1`` when k = n; n = 0 gives (0, 1).
    Vectorised: ``k``, ``n`` and ``alpha`` broadcast. Same values as statsmodels'
    ``proportion_confint(k, n, alpha, method="beta")``.
    """
    half = _check_alpha(alpha) / 2
    return cp_lower(k, n, half), cp_upper(k, n, half)


def _goodman(x, n, k, alpha) -> tuple[np.ndarray, np.ndarray]:
    """Goodman's interval for cell counts ``x`` out of ``n`` among ``k`` cells (all broadcast)."""
    x, n = np.asarray(x, dtype=np.float64), np.asarray(n, dtype=np.float64)
    chi2 = stats.chi2.ppf(1 - alpha / np.asarray(k, dtype=np.float64), 1)
    spread = np.sqrt(chi2**2 + 4 * chi2 * x * (n - x) / np.maximum(n, 1))
    denom = 2 * (chi2 + n)
    return (2 * x + chi2 - spread) / denom, (2 * x + chi2 + spread) / denom


def goodman_intervals(counts: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Goodman's (1965) simultaneous (1 - alpha) intervals for the k cell probabilities of a multinomial.

    ``counts`` is ``[..., k]`` (rows vectorised). Uses the chi-square(1) quantile at 1 - alpha/k
    (Bonferroni over the k cells), so all k intervals hold together with asymptotic probability
    >= 1 - alpha (large-sample, not exact). A row without counts gives (0, 1) for every cell.
    Same values as statsmodels' ``multinomial_proportions_confint(counts, alpha, method="goodman")``.
    """
    counts = np.asarray(counts)
    if np.any(counts < 0):
        raise ValueError("counts must be non-negative")
    return _goodman(counts, counts.sum(axis=-1, keepdims=True), counts.shape[-1], float(_check_alpha(alpha)))


# ----------------------------------------------------------------------------- CERTIFY


def _check_pair(counts0: SparseCounts, counts: SparseCounts) -> None:
    if counts0.num_rows != counts.num_rows:
        raise ValueError(f"counts0 has {counts0.num_rows} rows but counts has {counts.num_rows}")


def _check_level_alpha(alpha: float) -> None:
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must lie in (0, 0.5), got {alpha}")


def _check_sigma(sigma: float) -> None:
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be positive and finite, got {sigma}")


def certify_sparse(
    counts0: SparseCounts, counts: SparseCounts, sigma: float, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """Cohen et al.'s CERTIFY per row: (pred int64 [N], radius float64 [N]).

    c = argmax counts0 (ties to the smallest class); p_lower = one-sided (1 - alpha)
    Clopper-Pearson lower bound of counts[c] / sum(counts). Abstain (-1, 0.0) if p_lower < 0.5,
    else (c, sigma * Phi^-1(p_lower)). Guarantee (per row): with probability >= 1 - alpha over the
    estimation counts, a non-abstaining c is the smoothed classifier's prediction, constant on the
    l2 ball of that radius. A row with no selection or no estimation counts abstains.
    """
    _check_pair(counts0, counts)
    _check_level_alpha(alpha)
    _check_sigma(sigma)
    chosen = counts0.top_class()
    lower = cp_lower(counts.count_of(chosen), counts.totals(), alpha)
    ok = lower >= 0.5
    return np.where(ok, chosen, ABSTAIN), np.where(ok, sigma * special.ndtri(np.where(ok, lower, 0.5)), 0.0)


def _one_row(vector: np.ndarray) -> SparseCounts:
    vector = np.asarray(vector)
    if vector.ndim != 1:
        raise ValueError(f"expected a 1-D count vector, got shape {vector.shape}")
    return SparseCounts.from_dense(vector[None])


def certify(counts0: np.ndarray, counts: np.ndarray, sigma: float, alpha: float) -> tuple[int, float]:
    """CERTIFY on dense count vectors; see :func:`certify_sparse`."""
    pred, radius = certify_sparse(_one_row(counts0), _one_row(counts), sigma, alpha)
    return int(pred[0]), float(radius[0])


# ----------------------------------------------------------------------------- cascade


def stage_tails(stage: int, num_stages: int, alpha: float, schedule: str) -> tuple[float, float]:
    """One-sided error levels (selected-class lower bound, per-class upper bound) of a stage."""
    if schedule == "paper":
        return alpha / (stage + 1), alpha / (stage + 1)
    if stage == num_stages - 1:
        # The lowest sigma never falls through into anything: its upper bound only labels a row that
        # does not fire UNDECIDED or FALL_THROUGH (both abstain: nothing lies below), so it costs no alpha.
        return alpha / num_stages, alpha / (4 * num_stages)
    return alpha / (2 * num_stages), alpha / (4 * num_stages)


def _check_cascade_args(alpha: float, p0: float, schedule: str) -> None:
    _check_level_alpha(alpha)
    if not 0.5 <= p0 < 1:
        raise ValueError(f"p0 must lie in [0.5, 1), got {p0}")
    _check_schedule(schedule)


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


class CascadeWalk(NamedTuple):
    """Where each row's cascade stopped (see :func:`walk_cascade`)."""

    stage: np.ndarray  # int64 [N]: stage where the row stopped; num_stages if it passed every stage
    outcome: np.ndarray  # int8 [N]: FIRE or UNDECIDED at that stage; FALL_THROUGH if it never stopped


def walk_cascade(
    num_rows: int, num_stages: int, outcome_of: Callable[[int, np.ndarray], np.ndarray], schedule: str
) -> CascadeWalk:
    """The cascade's walk down the stages, from stage 0 (the highest sigma), under ``schedule``.

    ``outcome_of(stage, rows)`` returns FIRE / UNDECIDED / FALL_THROUGH for ``rows`` (ascending
    indices): exactly the rows that passed every earlier stage, never an empty set. A row stops at
    its first FIRE, and under ``bonferroni`` and ``paper`` at its first UNDECIDED too; under
    ``bonferroni-fallthrough`` an UNDECIDED row goes on to the next stage as a FALL_THROUGH one
    does. A row reaches stage s iff ``walk.stage >= s``. The one walk shared by the certificate,
    the pipeline's cascade sampling and the analysis's check of which levels a cascade-mode run
    must hold.
    """
    _check_schedule(schedule)
    passes = [FALL_THROUGH, UNDECIDED] if schedule == FALLTHROUGH else [FALL_THROUGH]
    stopped = np.full(num_rows, num_stages, dtype=np.int64)
    outcome = np.full(num_rows, FALL_THROUGH, dtype=np.int8)
    active = np.arange(num_rows)
    for stage in range(num_stages):
        if active.size == 0:
            break
        result = np.asarray(outcome_of(stage, active))
        stop = ~np.isin(result, passes)
        stopped[active[stop]] = stage
        outcome[active[stop]] = result[stop]
        active = active[~stop]
    return CascadeWalk(stopped, outcome)


@dataclass(frozen=True, eq=False)
class _Stage:
    sigma: float
    counts: SparseCounts
    chosen: np.ndarray  # selected class per row (-1: no selection counts)
    lower: np.ndarray  # lower bound of the chosen class's probability
    outcome: np.ndarray  # FIRE / UNDECIDED / FALL_THROUGH


def _evaluate_stage(stage, num_stages, sigma, counts0, counts, alpha, p0, schedule) -> _Stage:
    _check_pair(counts0, counts)
    tail_lower, tail_upper = stage_tails(stage, num_stages, alpha, schedule)
    chosen = counts0.top_class()
    n = counts.totals()
    lower = cp_lower(counts.count_of(chosen), n, tail_lower)
    # paper: the chosen class's upper bound; bonferroni: every class's (i.e. the largest count's)
    tested = chosen if schedule == "paper" else counts.top_class()
    upper = cp_upper(counts.count_of(tested), n, tail_upper)
    outcome = np.where(lower >= p0, FIRE, np.where(upper >= p0, UNDECIDED, FALL_THROUGH)).astype(np.int8)
    return _Stage(sigma, counts, chosen, lower, outcome)


def cascade_stage_outcome(
    stage: int, num_stages: int, counts0: SparseCounts, counts: SparseCounts, alpha: float, p0: float, schedule: str
) -> np.ndarray:
    """FIRE / UNDECIDED / FALL_THROUGH (int8 [N]) of cascade stage ``stage`` (0 = highest sigma).

    Exactly the decision :func:`certify_cascade_sparse` makes at that stage, so a pipeline can sample
    one sigma at a time and stop a row where :func:`walk_cascade` does. The bounds are those of
    ``schedule`` (see :func:`certify_cascade_sparse`).
    """
    _check_cascade_args(alpha, p0, schedule)
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} out of range for {num_stages} stages")
    return _evaluate_stage(stage, num_stages, 1.0, counts0, counts, alpha, p0, schedule).outcome


def _paper_groups(counts: SparseCounts, cls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The paper's merged cells, per row, for the chosen class ``cls``: (number of groups, largest
    count among the groups other than ``cls``'s; 0 if none).

    Groups: ``cls``'s count first; the other classes by count, descending; a class with >= 5
    counts is a group; smaller ones pool (in that order) until the pool reaches 5 and becomes a
    group; a leftover pool is added to the last group. Computed in closed form per run of equal
    small counts (4, 3, 2, 1), so the loop is over those four values, not over classes.
    """
    rows, num = counts._row_ids, counts.num_rows
    other = np.where(counts.classes != cls[rows], counts.values, 0)
    large = other >= _POOL_SIZE
    num_large = np.bincount(rows[large], minlength=num)
    largest = _row_reduce(np.maximum, np.where(large, other, 0), counts.offsets, 0)
    smallest_large = _row_reduce(np.minimum, np.where(large, other, np.iinfo(np.int64).max), counts.offsets, 0)
    pool = np.zeros(num, dtype=np.int64)  # the open pool's count
    pools = np.zeros(num, dtype=np.int64)
    pool_max = np.zeros(num, dtype=np.int64)
    pool_last = np.zeros(num, dtype=np.int64)
    for value in range(_POOL_SIZE - 1, 0, -1):
        items = np.bincount(rows[other == value], minlength=num)
        per_pool = -(-_POOL_SIZE // value)  # items that make a fresh pool
        to_close = -(-(_POOL_SIZE - pool) // value)  # items that close the open pool
        closes = items >= to_close
        full, rem = np.divmod(np.where(closes, items - to_close, 0), per_pool)
        first_sum = pool + to_close * value
        last_sum = np.where(full > 0, per_pool * value, first_sum)
        pools += closes + full
        pool_max = np.where(closes, np.maximum.reduce([pool_max, first_sum, last_sum]), pool_max)
        pool_last = np.where(closes, last_sum, pool_last)
        pool = np.where(closes, rem * value, pool + items * value)
    has_large, has_pool = num_large > 0, pools > 0
    last_other = np.where(has_pool, pool_last, np.where(has_large, smallest_large, 0)) + pool
    largest_other = np.maximum.reduce(
        [np.where(has_large, largest, 0), np.where(has_pool, pool_max, 0), np.where(has_large | has_pool, last_other, 0)]
    )
    return 1 + num_large + pools, largest_other


def _off_class_upper(
    stages: Sequence[_Stage], higher: int, fired: int, rows: np.ndarray, cls: np.ndarray, alpha: float, schedule: str
) -> np.ndarray:
    """Upper bound of max_{c != cls} p(c) at stage ``higher``, which the ``rows`` passed (fell
    through, or undecided under ``bonferroni-fallthrough``), for the ``rows`` that fired at stage
    ``fired`` with classes ``cls``."""
    level = stages[higher]
    counts = level.counts.take(rows)
    n = counts.totals()
    if schedule != "paper":
        return cp_upper(counts.max_count_excluding(cls), n, stage_tails(higher, len(stages), alpha, schedule)[1])
    tail = alpha / (fired + 1)
    num_groups, largest_other = _paper_groups(counts, cls)
    goodman_upper = _goodman(largest_other, n, num_groups, 2 * tail)[1]
    own_lower = cp_lower(counts.count_of(level.chosen[rows]), n, tail)
    return np.where(num_groups <= 2, 1 - own_lower, goodman_upper)


def certify_cascade_sparse(
    levels: Sequence[tuple[float, SparseCounts, SparseCounts]],
    alpha: float,
    p0: float = 0.5,
    schedule: str = "bonferroni",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multi-scale cascade certificate per row: (pred int64, radius float64, fired_sigma float64).

    ``levels`` are ``(sigma, counts0, counts)`` in any order (all with the same rows); stage 0 is
    the highest sigma. At stage s, c_s = argmax counts0 (ties to the smallest class) and
    p_lower_s is the lower bound of counts[c_s] / n. The stage FIRES when p_lower_s >= p0; else it
    is UNDECIDED when its upper bound >= p0 (abstain, stop; under ``bonferroni-fallthrough`` it
    passes on to the next lower sigma); else it FALLS THROUGH to the next lower sigma. If stage s
    fires, with U_j an upper bound on max_{c != c_s} p_j(c) at every higher stage j < s::

        radius = min(sigma_s (Phi^-1(p_lower_s) - Phi^-1(p0)),  min_j sigma_j (Phi^-1(p0) - Phi^-1(U_j)))

    and a non-positive radius is an abstention (-1, 0.0). ``fired_sigma`` is the sigma of the
    stage that fired (also when its radius then was non-positive), nan when none did. A stage
    reached with no estimation counts is undecided. A row's counts at levels below the one where
    it stopped are never read, so they may be empty (the pipeline's cascade mode samples them
    only for rows the walk passes on).

    ``schedule="bonferroni"`` (default, rigorous). K stages each get alpha/K. Stages 0..K-2 spend
    alpha/(2K) on the one-sided Clopper-Pearson lower bound of c_s and alpha/(4K) on each of two
    one-sided per-class Clopper-Pearson upper bounds; the lowest sigma spends its whole alpha/K on
    the lower bound (it never falls through into anything). The upper bound tested for falling
    through is every class's, i.e. that of the largest count (the chosen class's alone is not
    enough: a wrong selection at a higher level would let the cascade skip a level where the
    population fires). U_j = max_{c != c_s} of the per-class upper bounds = the bound of the
    largest count other than c_s. Guarantee: with probability >= 1 - alpha, jointly over all
    levels and whatever the data-dependent stopping, a non-abstaining row names the class of the
    population cascade (the same rule on the true probabilities) with a radius no larger than the
    population radius. Proof sketch: only the population's top two classes a_j, b_j at level j can
    attain max_{c != c_s} p_j(c) or exceed p0, so the per-class upper bounds need to hold for those
    two only (2 x alpha/(4K) per level, not a union over C classes); plus the K lower bounds of the
    selected classes, each chosen independently of the estimation counts.

    ``schedule="bonferroni-fallthrough"``: the same bounds and radius rule, and the same alpha;
    only the walk differs: an UNDECIDED stage (not the lowest) passes on like a FALL_THROUGH one,
    so a lower stage may still fire, with its radius capped by the undecided stage's U_j as by any
    stage above it. Guarantee: with probability >= 1 - alpha, jointly over all levels, every
    non-abstaining row's class c_s is the population cascade's output at every point within its
    radius. Proof sketch: on the event E of the bonferroni schedule (every lower bound of a
    selected class and the upper bounds of each level's population top two classes hold), for x'
    within r of x: at each stage j above s, every class c != c_s has p_j(c, x') <= p0, since
    Phi^-1(p_j(c, .)) is sigma_j^-1-Lipschitz (as in CERTIFY) and p_j(c, x) <= U_j; so stage j
    fires c_s or nothing. At stage s, p_s(c_s, x') >= p0 by the same argument. So the population
    cascade outputs c_s at x', whether an undecided stage above truly fires (with c_s) or not. The
    population's own formula radius may be smaller (it fires higher up, with c_s): the claim is
    the certified one, robustness on the ball, not that radius. Not the paper's walk.

    ``schedule="paper"`` reproduces Jeong & Shin's official code: stage s uses alpha_s =
    alpha/(s+1) and the chosen class's two-sided Clopper-Pearson interval at level 1 - 2 alpha_s
    (so each end is one-sided at alpha_s). U_j, when stage s fires, is the largest upper end over
    the groups other than c_s's of Goodman's intervals at level 1 - 2 alpha_s on stage j's
    estimation counts merged as in :func:`_paper_groups`; with <= 2 groups, U_j = 1 - (stage j's
    own chosen class's Clopper-Pearson lower end at level 1 - 2 alpha_s). Its errors sum to more
    than alpha over stages and Goodman's intervals are asymptotic: no joint guarantee.
    (The official code also caps the radius at 100 noise units, never reached, and keeps a radius
    of exactly 0; here that is an abstention, as for any non-positive radius.)

    One level only vs CERTIFY: both schedules use the one-sided (1 - alpha) lower bound, as
    CERTIFY does, but certify p_lower >= p0 with radius sigma (Phi^-1(p_lower) - Phi^-1(p0)) instead
    of p_lower >= 0.5 with sigma Phi^-1(p_lower). With p0 = 0.5 the results agree except when
    p_lower is exactly 0.5, where CERTIFY returns the class with radius 0 and the cascade abstains.
    """
    _check_cascade_args(alpha, p0, schedule)
    if not levels:
        raise ValueError("need at least one level")
    for sigma, _, _ in levels:
        _check_sigma(sigma)
    ordered = sorted(levels, key=lambda level: -level[0])
    num_stages, num_rows = len(ordered), ordered[0][2].num_rows
    stages = []
    for s, (sigma, counts0, counts) in enumerate(ordered):
        if counts.num_rows != num_rows:
            raise ValueError("all levels must have the same rows")
        stages.append(_evaluate_stage(s, num_stages, sigma, counts0, counts, alpha, p0, schedule))
    pred = np.full(num_rows, ABSTAIN, dtype=np.int64)
    radius = np.zeros(num_rows)
    fired_sigma = np.full(num_rows, np.nan)
    walk = walk_cascade(num_rows, num_stages, lambda s, rows: stages[s].outcome[rows], schedule)
    threshold = special.ndtri(p0)
    for s, stage in enumerate(stages):
        rows = np.flatnonzero((walk.stage == s) & (walk.outcome == FIRE))
        if rows.size == 0:
            continue
        cls = stage.chosen[rows]
        with np.errstate(divide="ignore", invalid="ignore"):
            r = stage.sigma * (special.ndtri(stage.lower[rows]) - threshold)
            for j in range(s):
                upper = _off_class_upper(stages, j, s, rows, cls, alpha, schedule)
                r = np.minimum(r, stages[j].sigma * (threshold - special.ndtri(upper)))
        ok = r > 0
        pred[rows[ok]] = cls[ok]
        radius[rows[ok]] = r[ok]
        fired_sigma[rows] = stage.sigma
    return pred, radius, fired_sigma


def certify_cascade(
    levels: Sequence[tuple[float, np.ndarray, np.ndarray]],
    alpha: float,
    p0: float = 0.5,
    schedule: str = "bonferroni",
) -> tuple[int, float, float]:
    """The cascade on dense count vectors ``(sigma, counts0, counts)``; see :func:`certify_cascade_sparse`."""
    sparse = [(sigma, _one_row(counts0), _one_row(counts)) for sigma, counts0, counts in levels]
    pred, radius, fired_sigma = certify_cascade_sparse(sparse, alpha, p0, schedule)
    return int(pred[0]), float(radius[0]), float(fired_sigma[0])
