"""Sequential certification: decide each (image, sigma), or each cascade stage, from as few samples as
the radius grid needs, with the fixed protocol's guarantee.

Pure numpy/scipy, no torch. A :class:`SequentialPlan` is declared before any data: ``n_max``,
``alpha``, the radius grid (in [0,1]-pixel units), the *looks* (estimation sample counts
n_1 < ... < n_J = n_max at which a pair may stop) and the *spend* w_1..w_J (sum <= 1): the
share of a bound's error budget spent at each look. After selection (n0 samples, as now) the
sampler draws estimation samples for a pair up to the next look and calls :meth:`SequentialPlan.decide`
(or :meth:`SequentialPlan.decide_stage` for a cascade stage) with the selected class's count; a
pair that stops records its estimation counts, n = n_j and the look index j. The certificates are
functions of (counts, look, plan) alone: :func:`certify_sequential_sparse` and
:func:`certify_cascade_sequential_sparse` recompute them from a counts table.

The bound. At look j the selected class's count k out of n_j gets the one-sided Clopper-Pearson
lower bound at level alpha * w_j (the project's one CP implementation, in
:mod:`pipeline.certification`). A pair *certifies grid radius r_g* iff
sigma * Phi^-1(p_lower) >= r_g, i.e. p_lower >= q_g = Phi(r_g / sigma); its *bin* is the largest
such g (-1: abstain, as CERTIFY's p_lower < 0.5). Every decision is a comparison of k with
integer thresholds precomputed per (sigma, look, bin) (:class:`LookTable`), so a sampler can
evaluate it anywhere, on a device too.

Why looks with alpha spending, not a confidence sequence: at the protocol's alpha = 0.001 the
union bound over ~20 looks costs the final bound little (75% of alpha stays on the last look,
and Clopper-Pearson is exact at each look), while an anytime-valid beta-binomial mixture
confidence sequence pays for its validity at every n with a wider bound at n_max. Simulated on
the ImageNet protocol (``jobs.bench_sequential --compare-methods``), the mixture stops earlier
(5.6x fewer samples than fixed at the same looks) but certifies up to 3.9 points less than the
fixed protocol at the top reachable radii, past the 1-point bar; this plan: 4.4x, within 0.5
points (4.2x with 80% on the last look and no top looks, :meth:`SequentialPlan.geometric`).
See ``analysis/sequential_sim.py``.

Stopping (single sigma). At look j with bin g the pair stops when

* the bin cannot rise within n_max even if every remaining sample agreed: for no later look j'
  does k + (n_j' - n_j) reach the count that certifies bin g + 1 at j'; or
* futility: the one-sided (1 - ``futility``) Clopper-Pearson *upper* bound of k / n_j is below
  the smallest count fraction that certifies bin g + 1 at any later look (the data show the next
  bin will not be reached); or
* j = J.

It then reports bin g of look j (the bound at the look where it stopped; not a maximum over
looks, so the table alone recomputes it). Futility only costs: it can stop a pair before a higher
bin, never certify one.

Guarantee (single sigma, per pair as CERTIFY's): with probability >= 1 - sum_j alpha w_j >=
1 - alpha over the estimation samples, whatever the data-dependent stopping, a non-abstaining
pair's class c is the smoothed classifier's prediction with p(c) >= Phi(r / sigma) for the
reported grid radius r, so the prediction is constant on the l2 ball of radius r. Proof sketch:
the selected class is fixed by the selection samples, independent of the estimation samples, so
k_j ~ Bin(n_j, p(c)) at each pre-declared n_j; the CP bound at look j exceeds p(c) with
probability <= alpha w_j; by the union bound all J bounds hold together with probability
>= 1 - alpha, and on that event the bound at *any* look, in particular the (random) look where
the pair stopped, is <= p(c). The stopping rule only chooses which look is reported.

Prediction (``mode`` = ``predict``, Cohen et al.'s PREDICT, per sigma). The top two classes'
counts k1 >= k2 of the estimation samples (no selection samples: PREDICT draws one sample set)
give the two-sided binomial test of k1 vs k1 + k2 at p = 1/2 (:func:`predict_pvalue`); the pair
predicts its top class iff the p-value is <= alpha (fixed, :func:`predict_sparse`) or <= alpha w_j
at look j (sequential, :meth:`SequentialPlan.decide_predict`), else abstains. A sequential pair
stops at the first look that predicts, when no later look could predict even if every remaining
sample went to one of the two top classes, or at the last look. Guarantee: with probability
>= 1 - alpha the prediction, if any, is the smoothed classifier's; per look, Cohen et al.'s
Theorem 2 bounds a wrong prediction by alpha w_j, and the union bound over the looks covers the
data-dependent stopping. (Jeong & Shin's ``predict_mdds.py`` is not a test at level alpha: a stage
fires when its plug-in top share reaches p0, and the output is the clean classifier's logits
re-weighted by the smoothed counts; it is not reproduced.)

Re-analysis (:meth:`SequentialPlan.uncovered`): the stored certificates also hold at any larger
alpha; a subset of the radius grid is decided too (a bin of a coarser grid rises only if the
fine bin does, and futility of the next fine bin implies it for the next coarse one); a smaller
alpha, a radius off the grid, another p0, cascade sigma set or cascade walk were not decided by the
samples drawn and are refused.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from functools import cached_property
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
from scipy import special, stats

from pipeline.certification import (
    ABSTAIN,
    FALL_THROUGH,
    FIRE,
    UNDECIDED,
    SparseCounts,
    cp_lower,
    cp_upper,
    stage_tails,
    walk_cascade,
)
from pipeline.errors import MsdsmoothError
from pipeline.schedules import CASCADE_SCHEDULES

MODES = ("full", "cascade", "predict")
RADIUS_STEP = 0.25  # spacing of the default radius grid (:func:`default_radii`)
# The counts-table column recording the look index at which a sequential row stopped (its n is
# that look's sample count); null for rows of fixed sampling.
LOOK_FIELD = pa.field("look", pa.int64())
_NEVER = np.iinfo(np.int64).max // 4  # a count threshold no pair reaches


class SequentialError(MsdsmoothError, ValueError):
    """A sequential plan or a sequential counts row is inconsistent; the message says which."""


# ----------------------------------------------------------------------------- count thresholds


def _min_count(n: np.ndarray, holds) -> np.ndarray:
    """Smallest k in [0, n] with ``holds(k)`` for a predicate monotone (False..True) in k, per
    entry of ``n``; n + 1 where it never holds. Vectorised bisection."""
    n = np.asarray(n, dtype=np.int64)
    lo, hi = np.zeros_like(n), n + 1  # holds(hi) is treated as True
    while np.any(lo < hi):
        mid = (lo + hi) // 2
        ok = holds(np.minimum(mid, n)) & (mid <= n)
        active = lo < hi
        hi, lo = np.where(active & ok, mid, hi), np.where(active & ~ok, mid + 1, lo)
    return lo


def lower_bound_counts(n, tail, q, strict) -> np.ndarray:
    """Smallest count k with the one-sided (1 - tail) Clopper-Pearson lower bound of k/n >= q
    (> q where ``strict``); n + 1 when no k <= n reaches it. All arguments broadcast."""
    n, tail, q, strict = np.broadcast_arrays(np.asarray(n, np.int64), np.asarray(tail, float),
                                             np.asarray(q, float), np.asarray(strict, bool))

    def holds(k):
        lower = cp_lower(k, n, tail)
        return np.where(strict, lower > q, lower >= q)

    return _min_count(n, holds)


def upper_bound_counts(n, tail, fraction) -> np.ndarray:
    """Largest count k with the one-sided (1 - tail) Clopper-Pearson upper bound of k/n below
    ``fraction``; -1 when none. All arguments broadcast."""
    n, tail, fraction = np.broadcast_arrays(np.asarray(n, np.int64), np.asarray(tail, float),
                                            np.asarray(fraction, float))
    return _min_count(n, lambda k: cp_upper(k, n, tail) >= fraction) - 1


@dataclass(frozen=True, eq=False)
class LookTable:
    """Integer decision thresholds for one (sigma, bound budget), looks j = 0..J-1, bins g = 0..G-1.

    ``certify[j, g]``: smallest count that certifies bin g at look j (n_j + 1: never).
    ``go[j, g]``: a pair at look j whose next bin is g continues iff its count >= go[j, g]
    (bin g reachable by a later look with every remaining sample agreeing, and not futile);
    ``_NEVER`` at the last look. The decision at a look is ``bin = #(certify[j] <= k) - 1``,
    ``continue = k >= go[j, bin + 1]`` (never past the last bin).
    """

    looks: np.ndarray  # int64 [J]
    certify: np.ndarray  # int64 [J, G]
    go: np.ndarray  # int64 [J, G]

    @classmethod
    def build(cls, looks: np.ndarray, certify: np.ndarray, futility: float) -> "LookTable":
        """The table for count thresholds ``certify`` [J, G] at ``looks``, with futility on the
        one-sided (1 - futility) Clopper-Pearson upper bound (``futility`` = 0: none)."""
        looks = np.asarray(looks, dtype=np.int64)
        num_looks, num_bins = certify.shape
        go = np.full((num_looks, num_bins), _NEVER, dtype=np.int64)
        for j in range(num_looks - 1):
            later = looks[j + 1:, None]
            reach = looks[j] + (certify[j + 1:] - later).min(axis=0)  # k needed so all-agree reaches
            need = (certify[j + 1:] / later).min(axis=0)  # smallest fraction certifying later
            unreachable = reach > looks[j]
            if futility > 0:
                futile = upper_bound_counts(looks[j], futility, np.minimum(need, 1.0))
                reach = np.maximum(reach, futile + 1)
            go[j] = np.where(unreachable, _NEVER, reach)
        return cls(looks, np.asarray(certify, dtype=np.int64), go)

    def decide(self, k, look) -> tuple[np.ndarray, np.ndarray]:
        """(stop bool, bin int64) for counts ``k`` at look indices ``look`` (broadcast)."""
        k, look = np.broadcast_arrays(np.asarray(k, np.int64), np.asarray(look, np.int64))
        g = (self.certify[look] <= k[..., None]).sum(axis=-1) - 1
        return ~self.can_rise(k, look, g), g

    def can_rise(self, k, look, g) -> np.ndarray:
        """Whether a pair with count ``k`` at ``look``, holding bin ``g`` (its own bin, or one
        capped below it), continues: bin g + 1 is reachable and not futile."""
        nxt = np.asarray(g) + 1
        top = self.certify.shape[1]
        return k >= np.where(nxt < top, self.go[look, np.minimum(nxt, top - 1)], _NEVER)


def top_looks(n_max: int, alpha: float, radii: Sequence[float], sigmas: Sequence[float],
              share: float) -> dict[int, float]:
    """{look: spend} where a pair whose samples all agree first certifies its sigma's *top
    reachable bin* (the largest grid radius that n_max agreeing samples certify at ``alpha``):
    per distinct probability threshold q = Phi(r / sigma) of those bins, the smallest n with
    (alpha * share / m)^(1 / n) >= q (the one-sided Clopper-Pearson lower bound of n agreeing
    samples), ``share`` split evenly over the m thresholds whose n is below n_max (the others,
    decided only at n_max, get none). An empty dict when ``share`` = 0 or no threshold has a look."""
    if share <= 0:
        return {}
    radii, reach = np.asarray(radii, dtype=float), alpha ** (1.0 / n_max)
    thresholds = {float(q[q <= reach].max()) for q in (special.ndtr(radii / sigma) for sigma in sigmas)
                  if np.any(q <= reach)}
    while thresholds:
        each = share / len(thresholds)
        looks = [_agreeing_samples(alpha * each, q) for q in thresholds]
        kept = {q for q, n in zip(thresholds, looks) if n < n_max}
        if kept == thresholds:
            return {n: each * looks.count(n) for n in looks}
        thresholds = kept
    return {}


def _agreeing_samples(tail: float, q: float) -> int:
    """The smallest n whose n agreeing samples out of n have a one-sided (1 - tail) Clopper-Pearson
    lower bound >= q: ceil(log(tail) / log(q)), checked against the bound itself."""
    n = max(int(np.ceil(np.log(tail) / np.log(q))), 1)
    while lower_bound_counts(n, tail, q, False) > n:  # float rounding of the closed form
        n += 1
    return n


# ----------------------------------------------------------------------------- the plan


def _tuple(values, kind) -> tuple:
    return tuple(kind(v) for v in values)


@dataclass(frozen=True)
class SequentialPlan:
    """A sequential sampling plan, declared before any data (see the module docstring).

    ``looks``: ascending estimation sample counts, the last = ``n_max``. ``spend``: the share of
    each bound's budget spent at each look (>= 0, sum <= 1). ``radii``: the ascending grid
    (>= 0) of radii that can be reported. ``futility``: level of the futility upper bound (it only
    decides when to stop, never what is certified; 0 disables it). ``mode``: ``full`` (each
    sigma certified alone, CERTIFY) or ``cascade`` (stages by ``sigmas`` descending, threshold
    ``p0``, the ``bonferroni`` schedule's budgets, and the walk of ``schedule``: ``bonferroni``
    stops at an UNDECIDED stage, ``bonferroni-fallthrough`` passes it on) or ``predict`` (each
    sigma's PREDICT; the radius grid is not used).
    """

    n_max: int
    alpha: float
    radii: tuple[float, ...]
    sigmas: tuple[float, ...]
    looks: tuple[int, ...]
    spend: tuple[float, ...]
    futility: float = 0.1
    mode: str = "full"
    p0: float = 0.5
    schedule: str = "bonferroni"
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name, kind in (("radii", float), ("sigmas", float), ("looks", int), ("spend", float)):
            object.__setattr__(self, name, _tuple(getattr(self, name), kind))
        looks, spend, radii = np.array(self.looks), np.array(self.spend), np.array(self.radii)
        problems = []
        if not 0 < self.alpha < 0.5:
            problems.append(f"alpha must lie in (0, 0.5), got {self.alpha}")
        if self.n_max < 1 or not looks.size or looks[-1] != self.n_max or np.any(np.diff(looks) <= 0) or looks[0] < 1:
            problems.append(f"looks must ascend from >= 1 to n_max = {self.n_max}, got {self.looks}")
        if spend.shape != looks.shape or np.any(spend < 0) or spend.sum() > 1 + 1e-12 or spend[-1] <= 0:
            problems.append(f"spend needs one share >= 0 per look, the last > 0, summing to <= 1, got {self.spend}")
        if not radii.size or np.any(np.diff(radii) <= 0) or radii[0] < 0 or not np.all(np.isfinite(radii)):
            problems.append(f"radii must be finite, >= 0 and ascending, got {self.radii}")
        if not self.sigmas or not all(np.isfinite(s) and s > 0 for s in self.sigmas):
            problems.append(f"sigmas must be positive, got {self.sigmas}")
        if len(set(self.sigmas)) != len(self.sigmas):
            problems.append(f"sigmas must be distinct, got {self.sigmas}")
        if not 0 <= self.futility < 0.5:
            problems.append(f"futility must lie in [0, 0.5), got {self.futility}")
        if self.mode not in MODES:
            problems.append(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0.5 <= self.p0 < 1:
            problems.append(f"p0 must lie in [0.5, 1), got {self.p0}")
        if self.schedule not in CASCADE_SCHEDULES:
            problems.append(f"schedule must be one of {CASCADE_SCHEDULES}, got {self.schedule!r}")
        if problems:
            raise SequentialError("sequential plan: " + "; ".join(problems))

    # -- construction and the manifest

    @classmethod
    def geometric(cls, n_max: int, alpha: float, radii: Sequence[float], sigmas: Sequence[float], *,
                  first: int = 100, ratio: float = 1.25, final_share: float = 0.75, top_share: float = 0.2,
                  **kwargs) -> "SequentialPlan":
        """Looks at ``first * ratio**i`` (rounded, distinct) up to ``n_max``, plus the *top looks*
        (:func:`top_looks`); the last look spends ``final_share`` of the budget, the top looks
        ``top_share`` (split evenly; what no top look can use goes to the last look), the other
        looks the rest (evenly). A top look that falls on a geometric look adds its share to it.
        Everything depends on the plan's declared parameters, never on data.

        The defaults (with ``futility`` = 0.1) were chosen by simulation (``jobs.bench_sequential``;
        the ImageNet protocol and the demo digits' per-row probabilities): most of alpha stays on
        the last look, where the pairs at the top reachable bins are decided (half of it there cost
        up to 2 points of certified accuracy at ImageNet); a top look stops the pairs whose samples
        all agree as soon as they certify their sigma's top reachable bin (at n_max = 10,000 and
        alpha = 0.001: after 6,300-6,800 samples instead of 8,674; 1.60x -> 1.79x fewer samples
        on the digits, 4.20x -> 4.42x at ImageNet, within 0.5 points); looks 25% apart cut the
        overshoot past the look where a pair is decided."""
        count = int(np.floor(np.log(n_max / first) / np.log(ratio))) + 1 if first < n_max else 0
        regular = {n for n in (int(round(first * ratio**i)) for i in range(count)) if n < n_max}
        top = top_looks(n_max, alpha, radii, sigmas, top_share) if regular else {}  # one look: n_max alone
        looks = sorted(regular | set(top)) + [n_max]
        rest = (1 - final_share - top_share) / max(len(regular), 1)
        spend = [(rest if n in regular else 0.0) + top.get(n, 0.0) for n in looks[:-1]]
        spend.append(final_share + top_share - sum(top.values()) if len(looks) > 1 else 1.0)
        return cls(n_max=n_max, alpha=alpha, radii=tuple(radii), sigmas=tuple(sigmas), looks=tuple(looks),
                   spend=tuple(spend), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the run manifest."""
        return {"n_max": self.n_max, "alpha": self.alpha, "radii": list(self.radii), "sigmas": list(self.sigmas),
                "looks": list(self.looks), "spend": list(self.spend), "futility": self.futility,
                "mode": self.mode, "p0": self.p0, "schedule": self.schedule}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SequentialPlan":
        """The plan of :meth:`to_dict`; a key with a default may be absent (a plan written before
        that key existed means the default)."""
        expected = {f.name for f in fields(cls) if f.init}
        required = {f.name for f in fields(cls) if f.init and f.default is MISSING and f.default_factory is MISSING}
        if not required <= set(data) <= expected:
            raise SequentialError(f"sequential plan: keys {sorted(data)} differ from {sorted(expected)}")
        return cls(**data)

    # -- re-analysis

    def uncovered(self, *, alpha: float | None = None, radii: Sequence[float] | None = None,
                  p0: float | None = None, sigmas: Sequence[float] | None = None,
                  mode: str | None = None, schedule: str | None = None) -> list[str]:
        """Why a re-analysis at these settings (None: the plan's) is not covered by a run made
        under this plan; empty when it is.

        Covered: alpha >= the plan's (the certificates, computed at the plan's alpha, hold with
        the stronger probability); radii a subset of the grid (decided, see the module doc); in
        ``full`` and ``predict`` mode any subset of the sigmas (each sigma stands alone). Not covered: a smaller
        alpha or a radius off the grid (sampling stopped before those were decided), another
        mode, and in ``cascade`` mode another p0, sigma set or schedule (the walk through the
        stages, and so which stages were sampled, depends on all three).
        """
        reasons = []
        if alpha is not None and alpha < self.alpha:
            reasons.append(f"alpha = {alpha} is smaller than the sequential plan's {self.alpha}; "
                           "sampling stopped when the plan's alpha was decided")
        if radii is not None:
            off = [r for r in radii if not np.any(np.isclose(r, self.radii, rtol=0, atol=1e-9))]
            if off:
                reasons.append(f"radii {off} are not on the sequential plan's grid {list(self.radii)}; "
                               "only a subset of it was decided")
        if mode is not None and mode != self.mode:
            reasons.append(f"mode {mode!r} differs from the sequential plan's {self.mode!r}")
        elif self.mode == "cascade":
            if p0 is not None and p0 != self.p0:
                reasons.append(f"p0 = {p0} differs from the cascade plan's {self.p0}; the stages sampled depend on it")
            if sigmas is not None and sorted(sigmas) != sorted(self.sigmas):
                reasons.append(f"sigmas {sorted(sigmas)} differ from the cascade plan's {sorted(self.sigmas)}; "
                               "the stages sampled depend on them")
            if schedule is not None and schedule != self.schedule:
                reasons.append(f"schedule {schedule!r} differs from the cascade plan's {self.schedule!r}; the stages "
                               "sampled depend on it")
        if self.mode != "cascade" and sigmas is not None:
            extra = sorted(set(sigmas) - set(self.sigmas))
            if extra:
                reasons.append(f"sigmas {extra} are not in the plan's {sorted(self.sigmas)}")
        return reasons

    def covers(self, **settings) -> bool:
        """True iff :meth:`uncovered` finds nothing to refuse."""
        return not self.uncovered(**settings)

    # -- tables

    @cached_property
    def _look_array(self) -> np.ndarray:
        return np.asarray(self.looks, dtype=np.int64)

    def _bin_thresholds(self, sigma: float, p0: float) -> tuple[np.ndarray, np.ndarray]:
        """(q_g, strict_g): bin g needs p_lower >= q_g (> where strict) at ``sigma`` with threshold p0."""
        q = special.ndtr(np.asarray(self.radii) / sigma + special.ndtri(p0))
        # CERTIFY (full mode) certifies radius sigma Phi^-1(p_lower) >= 0 at p_lower >= 0.5; the
        # cascade abstains on a non-positive radius, so its radius-0 bin needs p_lower > p0.
        strict = (np.asarray(self.radii) == 0) & (self.mode == "cascade")
        return q, strict

    def _table(self, sigma: float, tail: float) -> LookTable:
        key = ("bins", float(sigma), float(tail))
        if key not in self._tables:
            q, strict = self._bin_thresholds(sigma, self.p0 if self.mode == "cascade" else 0.5)
            levels = tail * np.asarray(self.spend)
            certify = lower_bound_counts(self._look_array[:, None], levels[:, None], q[None], strict[None])
            self._tables[key] = LookTable.build(self._look_array, certify, self.futility)
        return self._tables[key]

    def _check_sigma(self, sigma: float) -> None:
        if sigma not in self.sigmas:
            raise SequentialError(f"sigma {sigma} is not in the sequential plan's {list(self.sigmas)}")

    def look_of(self, n) -> np.ndarray:
        """The look index of each estimation sample count ``n`` (a row's n is the look where it
        stopped); :class:`SequentialError` naming the first row whose n is no look of the plan."""
        n = np.asarray(n, dtype=np.int64)
        look = np.minimum(np.searchsorted(self._look_array, n), len(self.looks) - 1)
        bad = np.flatnonzero(self._look_array[look] != n)
        if bad.size:
            raise SequentialError(f"row {int(bad[0])}: n = {int(n.flat[bad[0]])} is not one of the sequential plan's "
                                  f"looks {list(self.looks)}: these counts do not come from this plan")
        return look

    def _check_looks(self, n, look) -> tuple[np.ndarray, np.ndarray]:
        n, look = np.broadcast_arrays(np.asarray(n, np.int64), np.asarray(look, np.int64))
        if np.any((look < 0) | (look >= len(self.looks))):
            raise SequentialError(f"look index outside 0..{len(self.looks) - 1}")
        bad = np.flatnonzero(n != self._look_array[look])
        if bad.size:
            i = int(bad[0])
            raise SequentialError(f"row {i}: n = {n.flat[i]} is not the plan's look {look.flat[i]} "
                                  f"(= {self._look_array[look.flat[i]]} samples)")
        return n, look

    # -- single sigma

    def table(self, sigma: float) -> LookTable:
        """The decision thresholds of ``full`` mode at ``sigma`` (cached)."""
        self._check_sigma(sigma)
        return self._table(sigma, self.alpha)

    def decide(self, sigma: float, k, look) -> tuple[np.ndarray, np.ndarray]:
        """Single sigma, vectorised over pairs: (stop bool, bin int64) for the selected class's
        count ``k`` after ``looks[look]`` estimation samples. ``bin`` is the certified grid bin at
        this look (-1: abstain; radius ``radii[bin]``); a pair that stops reports it. Always stops
        at the last look."""
        if self.mode != "full":
            raise SequentialError("decide is the full-mode rule; a cascade plan decides per stage (decide_stage)")
        return self.table(sigma).decide(k, look)

    def radius_of(self, bins) -> np.ndarray:
        """Grid radius of each bin; 0.0 for an abstention (bin -1)."""
        bins = np.asarray(bins)
        return np.where(bins >= 0, np.asarray(self.radii)[np.maximum(bins, 0)], 0.0)

    # -- prediction

    def decide_predict(self, k_top, k_second, look) -> tuple[np.ndarray, np.ndarray]:
        """Sequential PREDICT, vectorised over pairs: (stop bool, predicts bool) for the top two
        classes' counts k_top >= k_second after ``looks[look]`` estimation samples. ``predicts``:
        the top class is predicted at this look (p-value <= alpha w_look); a pair that stops
        without it abstains. Stops when it predicts, when no later look could predict even if
        every remaining sample went to one of the two classes, or at the last look."""
        if self.mode != "predict":
            raise SequentialError("decide_predict is the predict-mode rule; this plan's mode is " + repr(self.mode))
        k_top, k_second, look = np.broadcast_arrays(np.asarray(k_top, np.int64), np.asarray(k_second, np.int64),
                                                    np.asarray(look, np.int64))
        levels = self.alpha * np.asarray(self.spend)
        predicts = predict_pvalue(k_top, k_second) <= levels[look]
        later = look[..., None] < np.arange(len(self.looks))  # [..., J]
        extra = np.maximum(self._look_array - self._look_array[look][..., None], 0)
        best = np.minimum(predict_pvalue(k_top[..., None] + extra, k_second[..., None]),
                          predict_pvalue(k_top[..., None], k_second[..., None] + extra))
        reachable = (later & (best <= levels)).any(axis=-1)
        return predicts | ~reachable, predicts

    # -- cascade stages

    def stage_sigmas(self) -> tuple[float, ...]:
        """The cascade's stage order: sigmas descending (stage 0 = highest)."""
        return tuple(sorted(self.sigmas, reverse=True))

    def _stage(self, stage: int) -> "_StageTables":
        key = ("stage", stage)
        if key not in self._tables:
            if self.mode != "cascade":
                raise SequentialError("cascade stages need a plan with mode 'cascade'")
            sigmas = self.stage_sigmas()
            if not 0 <= stage < len(sigmas):
                raise SequentialError(f"stage {stage} out of range for {len(sigmas)} stages")
            tail_lower, tail_upper = stage_tails(stage, len(sigmas), self.alpha, "bonferroni")
            spend = np.asarray(self.spend)
            fire = lower_bound_counts(self._look_array, tail_lower * spend, self.p0, False)
            fall = upper_bound_counts(self._look_array, tail_upper * spend, self.p0)
            bins = self._table(sigmas[stage], tail_lower)
            self._tables[key] = _StageTables(sigmas[stage], tail_upper, fire, fall, bins, self.futility)
        return self._tables[key]

    def stage_cap(self, stage: int, k_other, look) -> np.ndarray:
        """Radius cap that stage ``stage``, which fell through at look ``look``, puts on a later
        stage's radius: sigma_stage (Phi^-1(p0) - Phi^-1(U)), U the one-sided upper bound (at
        this stage's per-class budget and that look's spend) of ``k_other``, the largest count
        at this stage among the classes other than the later stage's selected class."""
        tables = self._stage(stage)
        look = np.asarray(look, np.int64)
        n = self._look_array[look]
        upper = cp_upper(k_other, n, tables.tail_upper * np.asarray(self.spend)[look])
        with np.errstate(divide="ignore"):
            return tables.sigma * (special.ndtri(self.p0) - special.ndtri(upper))

    def cap_bin(self, cap) -> np.ndarray:
        """Largest bin a radius cap allows: #(radii <= cap) - 1, and -1 when cap <= 0 (a
        non-positive cascade radius abstains); ``len(radii) - 1`` for no cap (inf)."""
        cap = np.asarray(cap, dtype=float)
        g = (np.asarray(self.radii) <= cap[..., None]).sum(axis=-1) - 1
        return np.where(cap > 0, g, -1)

    def decide_stage(self, stage: int, k_selected, k_top, look, cap_bin=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cascade stage ``stage`` (0 = highest sigma), vectorised over pairs: (stop bool,
        outcome int8, bin int64) after ``looks[look]`` estimation samples.

        ``k_selected``: count of the stage's selected class; ``k_top``: the largest count of
        any class; ``cap_bin``: :meth:`cap_bin` of the radius cap from the stages above
        (:meth:`stage_cap`, minimum over them; None = no cap, stage 0). ``outcome`` is FIRE /
        UNDECIDED / FALL_THROUGH at this look, by the bonferroni rule with this look's levels
        (see :func:`certify_cascade_sequential_sparse`); ``bin`` is the certified grid bin if
        FIRE (-1 otherwise, and when the radius is not positive). Stops when the outcome is
        decided: FALL_THROUGH at once; FIRE when its bin cannot rise (by the single-sigma rule,
        capped); otherwise UNDECIDED once neither FIRE nor FALL_THROUGH is reachable within
        n_max or the futility bounds rule both out. Always stops at the last look.
        """
        tables = self._stage(stage)
        k_selected, k_top, look = np.broadcast_arrays(np.asarray(k_selected, np.int64),
                                                      np.asarray(k_top, np.int64), np.asarray(look, np.int64))
        top_bin = len(self.radii) - 1
        cap_bin = np.broadcast_to(top_bin if cap_bin is None else np.asarray(cap_bin, np.int64), look.shape)
        fires = k_selected >= tables.fire[look]
        falls = ~fires & (k_top <= tables.fall[look])
        outcome = np.where(fires, FIRE, np.where(falls, FALL_THROUGH, UNDECIDED)).astype(np.int8)
        g = np.where(fires, np.minimum(tables.bins.decide(k_selected, look)[1], cap_bin), ABSTAIN)
        rising = fires & (g < cap_bin) & tables.bins.can_rise(k_selected, look, g)
        open_ = ~fires & ~falls & ((k_selected >= tables.fire_go[look]) | (k_top <= tables.fall_go[look]))
        stop = ~(rising | open_)
        return stop, outcome, g.astype(np.int64)


@dataclass(frozen=True, eq=False)
class _StageTables:
    """Count thresholds of one cascade stage: ``fire[j]`` (smallest selected count that fires),
    ``fall[j]`` (largest top count that falls through), the radius ``bins`` and, for stopping,
    ``fire_go[j]`` / ``fall_go[j]``: FIRE (FALL_THROUGH) stays possible and not futile iff
    k_selected >= fire_go[j] (k_top <= fall_go[j])."""

    sigma: float
    tail_upper: float
    fire: np.ndarray
    fall: np.ndarray
    bins: LookTable
    futility: float

    @cached_property
    def fire_go(self) -> np.ndarray:
        return LookTable.build(self.bins.looks, self.fire[:, None], self.futility).go[:, 0]

    @cached_property
    def fall_go(self) -> np.ndarray:
        """Mirror of ``fire_go`` on the failures n - k_top: falling through needs few top counts."""
        looks = self.bins.looks
        failures_needed = looks - self.fall  # FALL_THROUGH at look j iff n_j - k_top >= this
        mirrored = LookTable.build(looks, failures_needed[:, None], self.futility).go[:, 0]
        # k_top <= fall_go  <=>  n_j - k_top >= mirrored
        return np.where(mirrored >= _NEVER, -1, looks - mirrored)


# ----------------------------------------------------------------------------- certificates from the table


def certify_sequential_sparse(plan: SequentialPlan, sigma: float, counts0: SparseCounts, counts: SparseCounts,
                              look) -> tuple[np.ndarray, np.ndarray]:
    """Full-mode certificate per row from (selection counts, estimation counts, look stopped at):
    (pred int64, grid radius float64). Raises :class:`SequentialError` when a row's n is not
    its look's sample count or the plan would not have stopped it there (the table does not
    come from this plan). Guarantee: see the module docstring."""
    if counts0.num_rows != counts.num_rows:
        raise SequentialError("counts0 and counts must have the same rows")
    chosen = counts0.top_class()
    _, look = plan._check_looks(counts.totals(), look)
    stop, bins = plan.decide(sigma, counts.count_of(chosen), look)
    _refuse_unstopped(stop)
    bins = np.where(chosen >= 0, bins, ABSTAIN)
    return np.where(bins >= 0, chosen, ABSTAIN), plan.radius_of(bins)


def _refuse_unstopped(stop: np.ndarray) -> None:
    bad = np.flatnonzero(~stop)
    if bad.size:
        raise SequentialError(f"{bad.size} rows (first: row {int(bad[0])}) stopped where the sequential plan "
                              "continues: these counts do not come from this plan")


def certify_cascade_sequential_sparse(
    plan: SequentialPlan, levels: Sequence[tuple[float, SparseCounts, SparseCounts, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sequential multi-scale cascade per row from the table: (pred int64, grid radius float64,
    fired_sigma float64), as :func:`pipeline.certification.certify_cascade_sparse` returns.

    ``levels``: ``(sigma, counts0, counts, look)`` for each of the plan's sigmas, any order, all
    with the same rows; ``look`` is the look index where that stage stopped (read only for rows
    that reached the stage; their n must equal it and the plan must stop there).

    The rule is the ``bonferroni`` schedule's with each bound at its look's share: stage s (of K)
    spends alpha/K, split into the selected class's lower bound (alpha/(2K); alpha/K at the last
    stage) and two per-class upper bounds (alpha/(4K) each), and each of those budgets is split
    over the looks by ``plan.spend``. At the stopping look j with n_j samples: FIRE iff
    p_lower >= p0; else FALL_THROUGH iff the upper bound of the largest count < p0; else
    UNDECIDED. The walk is ``plan.schedule``'s (an UNDECIDED stage stops it under ``bonferroni``
    and passes it on under ``bonferroni-fallthrough``). A FIRE's radius min(sigma_s (Phi^-1(p_lower)
    - Phi^-1(p0)), min over higher stages i of sigma_i (Phi^-1(p0) - Phi^-1(U_i))), U_i the upper
    bound of the largest other count at stage i's stopping look, is resolved down to the grid; a
    non-positive radius abstains.

    Guarantee (at least the fixed schedule's of the same name): with probability >= 1 - alpha, jointly over
    stages, looks and whatever the data-dependent stopping, a non-abstaining row names the class
    of the population cascade with a grid radius no larger than the population radius. Proof
    sketch: let E be the event that at every stage and *every* look, the selected class's lower
    bound and the per-class upper bounds of the population's top two classes at that stage hold.
    Each is an exact one-sided CP bound at a pre-declared n_j (the selection is independent of
    the estimation samples), so P(not E) <= sum_s sum_j (alpha/(2K) + 2 alpha/(4K)) w_j <= alpha
    (the last stage: alpha/K w_j). On E, the bounds at the looks where stages stopped hold, and
    the fixed schedule's argument applies unchanged: a FALL_THROUGH means the population falls
    through, a FIRE that the population fires with that class, and each radius term is no
    larger than the population's; under ``bonferroni-fallthrough``, the ball argument of
    :func:`pipeline.certification.certify_cascade_sparse` applies unchanged (the population cascade
    outputs the certified class within the radius). Stopping rules only choose the looks.
    """
    if plan.mode != "cascade":
        raise SequentialError("the sequential cascade needs a plan with mode 'cascade'")
    by_sigma = {float(sigma): (c0, c, np.asarray(look, np.int64)) for sigma, c0, c, look in levels}
    if sorted(by_sigma) != sorted(plan.sigmas):
        raise SequentialError(f"levels {sorted(by_sigma)} differ from the cascade plan's sigmas {sorted(plan.sigmas)}")
    stages = [by_sigma[s] for s in plan.stage_sigmas()]
    num_rows = stages[0][1].num_rows
    for c0, c, look in stages:
        if c0.num_rows != num_rows or c.num_rows != num_rows:
            raise SequentialError("all levels must have the same rows")
    looks = [np.broadcast_to(look, (num_rows,)) for _, _, look in stages]
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def outcome_of(s: int, rows: np.ndarray) -> np.ndarray:
        counts0, counts, look = stages[s][0].take(rows), stages[s][1].take(rows), looks[s][rows]
        plan._check_looks(counts.totals(), look)
        chosen = counts0.top_class()
        cap = np.full(rows.size, np.inf)
        for i in range(s):
            other = stages[i][1].take(rows).max_count_excluding(chosen)
            cap = np.minimum(cap, plan.stage_cap(i, other, looks[i][rows]))
        stop, outcome, bins = plan.decide_stage(s, counts.count_of(chosen), counts.count_of(counts.top_class()), look,
                                                plan.cap_bin(cap))
        _refuse_unstopped(stop)
        outcome = np.where(chosen >= 0, outcome, UNDECIDED).astype(np.int8)
        results[s] = (chosen, np.where(chosen >= 0, bins, ABSTAIN))
        return outcome

    walk = walk_cascade(num_rows, len(stages), outcome_of, plan.schedule)
    pred = np.full(num_rows, ABSTAIN, dtype=np.int64)
    bins = np.full(num_rows, ABSTAIN, dtype=np.int64)
    fired_sigma = np.full(num_rows, np.nan)
    sigmas = plan.stage_sigmas()
    for s, (chosen, stage_bins) in results.items():
        rows = np.flatnonzero((walk.stage == s) & (walk.outcome == FIRE))
        order = np.flatnonzero(walk.stage >= s)  # the rows outcome_of saw at stage s, ascending
        at = np.searchsorted(order, rows)
        bins[rows] = stage_bins[at]
        pred[rows] = np.where(stage_bins[at] >= 0, chosen[at], ABSTAIN)
        fired_sigma[rows] = sigmas[s]
    return pred, plan.radius_of(bins), fired_sigma


def sequential_stage_outcome(plan: SequentialPlan, stage: int, counts0: SparseCounts, counts: SparseCounts) -> np.ndarray:
    """Cascade stage ``stage``'s outcome (FIRE, UNDECIDED or FALL_THROUGH; UNDECIDED without a
    selected class) for rows that stopped sampling, at the look their n names: what decides
    whether the walk goes on to the next stage (the radius cap does not change the outcome)."""
    chosen = counts0.top_class()
    k_top = counts.count_of(counts.top_class())
    outcome = plan.decide_stage(stage, counts.count_of(chosen), k_top, plan.look_of(counts.totals()))[1]
    return np.where(chosen >= 0, outcome, UNDECIDED).astype(np.int8)


class PairStopRule:
    """The ``stop`` callback of ``MonteCarloSampler.sample_sequential`` under ``plan``, for the
    P pairs of one call, pair p at sigma ``pair_sigma[p]`` (the sampler's order: image-major,
    then its sigmas); the plan's rule per mode (full: :meth:`SequentialPlan.decide`; predict:
    :meth:`SequentialPlan.decide_predict`; cascade: :meth:`SequentialPlan.decide_stage` of the
    one stage every pair is at).

    ``earlier`` (cascade only): for each higher stage, (estimation counts [P, C], look index
    [P]) of the same pairs, where that stage fell through; they cap the radius. The sampler
    passes the counts of the pairs still sampling, in order, and drops those the rule stops;
    the rule follows which pairs those are, so it is valid for one call only. Selection
    follows :meth:`SparseCounts.top_class` (argmax, ties to the smallest class)."""

    def __init__(self, plan: SequentialPlan, pair_sigma, earlier: Sequence[tuple[np.ndarray, np.ndarray]] = ()):
        self.plan, self.pair_sigma = plan, np.asarray(pair_sigma, dtype=float)
        self.earlier = [(np.asarray(c, np.int64), np.asarray(look, np.int64)) for c, look in earlier]
        self.active = np.arange(self.pair_sigma.size)
        self.stage = None
        if plan.mode == "cascade":
            sigmas = np.unique(self.pair_sigma)
            if sigmas.size != 1 or float(sigmas[0]) not in plan.stage_sigmas():
                raise SequentialError(f"a cascade stop rule is for pairs at one of the plan's sigmas, got {sigmas.tolist()}")
            self.stage = plan.stage_sigmas().index(float(sigmas[0]))
            if len(self.earlier) != self.stage:
                raise SequentialError(f"stage {self.stage} needs the {self.stage} higher stages' counts, got {len(self.earlier)}")
        elif self.earlier:
            raise SequentialError("earlier stages' counts are for a cascade plan only")

    def __call__(self, look: int, counts0: np.ndarray, counts: np.ndarray, n: np.ndarray) -> np.ndarray:
        active, plan = self.active, self.plan
        if counts.shape[0] != active.size or np.any(np.asarray(n) != plan.looks[look]):
            raise SequentialError(f"look {look}: got {counts.shape[0]} pairs with n = {np.unique(n).tolist()}, expected "
                                  f"{active.size} at {plan.looks[look]}: the sampler and the stop rule disagree")
        rows = np.arange(active.size)
        counts = np.asarray(counts, np.int64)
        if plan.mode == "predict":
            top = counts.argmax(axis=1)
            stop = plan.decide_predict(counts[rows, top], _max_excluding(counts, top), look)[0]
        elif plan.mode == "full":
            chosen = np.asarray(counts0).argmax(axis=1)
            stop = np.empty(active.size, dtype=bool)
            for sigma in np.unique(self.pair_sigma[active]):
                at = self.pair_sigma[active] == sigma
                stop[at] = plan.decide(float(sigma), counts[rows[at], chosen[at]], look)[0]
        else:
            chosen = np.asarray(counts0).argmax(axis=1)
            cap = np.full(active.size, np.inf)
            for i, (stored, stored_look) in enumerate(self.earlier):
                cap = np.minimum(cap, plan.stage_cap(i, _max_excluding(stored[active], chosen), stored_look[active]))
            stop = plan.decide_stage(self.stage, counts[rows, chosen], counts.max(axis=1), look, plan.cap_bin(cap))[0]
        self.active = active[~stop]
        return stop


def _max_excluding(counts: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """Largest count per row of dense ``counts`` [P, C] among the classes other than ``cls[p]`` (0 if none)."""
    others = counts.copy()
    others[np.arange(counts.shape[0]), cls] = 0
    return others.max(axis=1)


# ----------------------------------------------------------------------------- prediction (PREDICT)


def predict_pvalue(k_top, k_second) -> np.ndarray:
    """Two-sided binomial test p-value of ``k_top`` successes in ``k_top + k_second`` trials at
    p = 1/2 (``scipy.stats.binomtest``'s, by symmetry 2 P(X >= max) capped at 1; 1 for a tie)."""
    k_top, k_second = np.broadcast_arrays(np.asarray(k_top, np.int64), np.asarray(k_second, np.int64))
    high = np.maximum(k_top, k_second)
    return np.where(k_top == k_second, 1.0, np.minimum(1.0, 2 * stats.binom.sf(high - 1, k_top + k_second, 0.5)))


def _top_two(counts: SparseCounts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    top = counts.top_class()
    return top, counts.count_of(top), counts.max_count_excluding(top)


def predict_sparse(counts: SparseCounts, alpha: float) -> np.ndarray:
    """Cohen et al.'s PREDICT per row from its estimation counts: the top class when the
    two-sided binomial test of the top two counts has p-value <= ``alpha``, else -1 (abstain).
    With probability >= 1 - alpha a prediction is the smoothed classifier's class."""
    top, k_top, k_second = _top_two(counts)
    return np.where((top >= 0) & (predict_pvalue(k_top, k_second) <= alpha), top, ABSTAIN)


def predict_sequential_sparse(plan: SequentialPlan, counts: SparseCounts, look) -> np.ndarray:
    """Sequential PREDICT per row from (estimation counts, look stopped at): the class, or -1.
    Raises :class:`SequentialError` when a row's n is not its look's sample count or the plan
    would not have stopped it there. Guarantee: see the module docstring."""
    _, look = plan._check_looks(counts.totals(), look)
    top, k_top, k_second = _top_two(counts)
    stop, predicts = plan.decide_predict(k_top, k_second, look)
    _refuse_unstopped(stop)
    return np.where((top >= 0) & predicts, top, ABSTAIN)


# ----------------------------------------------------------------------------- the plan of a run's config


def default_radii(n_max: int, alpha: float, sigmas: Sequence[float], step: float = RADIUS_STEP) -> tuple[float, ...]:
    """The default radius grid: multiples of ``step`` from 0 up to the largest radius any pair
    can reach at ``n_max``, max(sigmas) Phi^-1 of the Clopper-Pearson lower bound of n_max
    agreeing samples out of n_max at level alpha (alpha^(1 / n_max))."""
    reach = max(sigmas) * special.ndtri(alpha ** (1.0 / n_max))
    return tuple(step * i for i in range(int(np.floor(max(reach, 0.0) / step + 1e-9)) + 1))


def sequential_plan(smoothing: Mapping[str, Any]) -> SequentialPlan | None:
    """The sequential plan of a validated ``smoothing`` config section; None for fixed sampling.

    ``n`` is n_max; ``radii`` null means :func:`default_radii`; looks, spend and futility come from
    ``smoothing.sequential`` (:meth:`SequentialPlan.geometric`); mode, alpha and p0 as configured."""
    if smoothing["sampling"] != "sequential":
        return None
    n_max, alpha, sigmas = smoothing["n"], smoothing["alpha"], tuple(smoothing["sigmas"])
    radii = smoothing["radii"] if smoothing["radii"] is not None else default_radii(n_max, alpha, sigmas)
    looks = smoothing["sequential"]
    return SequentialPlan.geometric(n_max, alpha, radii, sigmas, first=looks["first_look"], ratio=looks["look_ratio"],
                                    final_share=looks["final_share"], top_share=looks["top_share"],
                                    futility=looks["futility"],
                                    mode=smoothing["mode"], p0=smoothing["p0"],
                                    schedule=smoothing["schedule"] if smoothing["mode"] == "cascade" else "bonferroni")
