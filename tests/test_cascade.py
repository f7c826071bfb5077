"""The multi-scale cascade against a brute-force transcription of its rules (plain loops, statsmodels)."""
from __future__ import annotations

import functools
import math
from collections import Counter

import numpy as np
import pytest
from scipy.stats import norm
from statsmodels.stats.proportion import multinomial_proportions_confint, proportion_confint

from pipeline.certification import (
    FALL_THROUGH,
    FIRE,
    UNDECIDED,
    SparseCounts,
    cascade_stage_outcome,
    certify,
    certify_cascade,
    certify_cascade_sparse,
)
from pipeline.certification import _paper_groups  # the merging alone, for a dense check
from pipeline.schedules import FALLTHROUGH, SCHEDULES

# ----------------------------------------------------------------------------- reference


@functools.lru_cache(maxsize=None)
def cp(k, n, two_sided_alpha):
    lo, hi = proportion_confint(int(k), int(n), alpha=two_sided_alpha, method="beta")
    return (0.0 if k == 0 else lo), (1.0 if k == n else hi)


def merged_groups(counts, c):
    """The paper's merging, transcribed from the issue: c's count first, the others descending..."""
    groups = [int(counts[c])]
    pool = 0
    for x in sorted((int(v) for i, v in enumerate(counts) if i != c), reverse=True):
        if x >= 5:
            groups.append(x)
        else:
            pool += x
            if pool >= 5:
                groups.append(pool)
                pool = 0
    if pool > 0:
        groups[-1] += pool
    return groups


def reference_cascade(levels, alpha, p0, schedule, stats=None):
    """Plain-Python cascade; ``stats`` (a Counter) records which branches ran."""
    stats = Counter() if stats is None else stats
    levels = sorted(levels, key=lambda lv: -lv[0])
    K = len(levels)
    seen = []  # (sigma, counts, chosen) of stages that fell through
    for s, (sigma, counts0, counts) in enumerate(levels):
        n = int(sum(counts))
        chosen = int(np.argmax(counts0)) if sum(counts0) > 0 else -1
        k = int(counts[chosen]) if chosen >= 0 else 0
        if schedule == "paper":
            a_s = alpha / (s + 1)
            lower, upper = cp(k, n, 2 * a_s) if n > 0 else (0.0, 1.0)
        else:
            tail_lower = alpha / K if s == K - 1 else alpha / (2 * K)
            tail_upper = alpha / (4 * K)
            lower = cp(k, n, 2 * tail_lower)[0] if n > 0 else 0.0
            upper = max(cp(x, n, 2 * tail_upper)[1] for x in counts) if n > 0 else 1.0
        if lower >= p0:
            stats["fire"] += 1
            radius = sigma * (norm.ppf(lower) - norm.ppf(p0))
            for sigma_j, counts_j, chosen_j in seen:
                n_j = int(sum(counts_j))
                if schedule == "paper":
                    groups = merged_groups(counts_j, chosen)
                    if len(groups) <= 2:
                        stats["paper<=2groups"] += 1
                        u = 1 - cp(counts_j[chosen_j], n_j, 2 * a_s)[0]
                    else:
                        stats["paper goodman"] += 1
                        u = multinomial_proportions_confint(groups, alpha=2 * a_s, method="goodman")[1:, 1].max()
                else:
                    u = max(cp(x, n_j, 2 * (alpha / (4 * K)))[1] for c, x in enumerate(counts_j) if c != chosen)
                radius = min(radius, sigma_j * (norm.ppf(p0) - norm.ppf(u)))
            if radius <= 0:
                stats["fired, non-positive radius"] += 1
                return -1, 0.0, sigma
            return chosen, radius, sigma
        if upper >= p0:
            stats["undecided"] += 1
            if schedule != FALLTHROUGH or s == K - 1:
                return -1, 0.0, math.nan
            stats["undecided, passed on"] += 1
        else:
            stats["fall through"] += 1
        seen.append((sigma, counts, chosen))
    stats["all fell through"] += 1
    return -1, 0.0, math.nan


# ----------------------------------------------------------------------------- random cases


def random_level(rng, num_classes, p0=0.5):
    kind = rng.integers(4)
    if kind == 0:  # confident
        p = np.full(num_classes, 0.02 / num_classes)
        p[rng.integers(num_classes)] += 0.98
    elif kind == 1:  # near a threshold
        top = min(p0 + rng.uniform(-0.2, 0.15), 0.99)
        p = (1 - top) * rng.dirichlet(np.ones(num_classes))
        p[rng.integers(num_classes)] += top
    elif kind == 2:  # spread out, many small cells
        p = rng.dirichlet(np.full(num_classes, rng.choice([0.3, 1.0, 5.0])))
    else:  # two classes share the mass (few merged groups)
        p = np.full(num_classes, 0.01 / num_classes)
        p[rng.choice(num_classes, 2, replace=False)] += [0.6, 0.39]
    n = int(rng.choice([8, 30, 100, 400]))
    return rng.multinomial(int(rng.integers(1, 60)), p), rng.multinomial(n, p)


def random_cases(rng, count, num_levels, num_classes, p0=0.5):
    sigmas = [0.12, 0.25, 0.5, 1.0][:num_levels]
    out = []
    for _ in range(count):
        order = rng.permutation(num_levels)
        out.append([(sigmas[i], *random_level(rng, num_classes, p0)) for i in order])
    return out


def stack_levels(cases):
    """The cases as one sparse batch per sigma, ascending sigma (the cascade must sort them)."""
    out = []
    for sigma in sorted(lv[0] for lv in cases[0]):
        per_case = [next(lv for lv in levels if lv[0] == sigma) for levels in cases]
        out.append((sigma, *(SparseCounts.from_dense(np.stack([lv[j] for lv in per_case])) for j in (1, 2))))
    return out


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("num_levels, p0", [(1, 0.5), (2, 0.5), (3, 0.5), (3, 0.6), (4, 0.75)])
def test_cascade_matches_reference(schedule, num_levels, p0):
    rng = np.random.default_rng(num_levels * 10 + int(100 * p0))
    num_classes, alpha = 12, 0.01
    cases = random_cases(rng, 300, num_levels, num_classes, p0)
    branches = Counter()
    expected = [reference_cascade(levels, alpha, p0, schedule, branches) for levels in cases]
    dense = [certify_cascade(levels, alpha, p0, schedule) for levels in cases]
    pred, radius, fired = certify_cascade_sparse(stack_levels(cases), alpha, p0, schedule)
    for i, ((ref_pred, ref_radius, ref_fired), got) in enumerate(zip(expected, dense)):
        assert got[0] == ref_pred, (i, got, expected[i])
        assert got[1] == pytest.approx(ref_radius, rel=1e-9, abs=1e-12), (i, got, expected[i])
        assert got[2] == ref_fired or (math.isnan(got[2]) and math.isnan(ref_fired))
        assert pred[i] == got[0] and radius[i] == pytest.approx(got[1], rel=1e-12)
        assert fired[i] == got[2] or (math.isnan(fired[i]) and math.isnan(got[2]))
    assert branches["fire"] > 20 and branches["undecided"] > 10
    if num_levels > 1:
        assert branches["fall through"] > 20
        if schedule == FALLTHROUGH:
            assert branches["undecided, passed on"] > 10, branches
        if schedule == "paper":
            assert branches["paper goodman"] >= 8, branches


def test_paper_two_group_fallback_matches_reference():
    """Higher level mostly on two classes (plus a stray few): the paper's <= 2 groups case."""
    rng = np.random.default_rng(11)
    branches = Counter()
    for _ in range(100):
        num_classes = int(rng.integers(2, 6))
        a, b = rng.choice(num_classes, 2, replace=False)
        counts = np.zeros(num_classes, int)
        counts[a], counts[b] = rng.integers(50, 400), rng.integers(0, 400)
        counts[rng.integers(num_classes)] += rng.integers(0, 4)  # a stray few, pooled into a group
        counts0 = np.zeros(num_classes, int)
        counts0[rng.choice([a, b])] = 10
        low0, low = np.zeros(num_classes, int), np.zeros(num_classes, int)
        low0[a], low[a], low[b] = 50, rng.integers(900, 1000), 5
        levels = [(1.0, counts0, counts), (0.5, low0, low)]
        p0 = float(rng.uniform(0.5, 0.9))
        expected = reference_cascade(levels, 0.01, p0, "paper", branches)
        got = certify_cascade(levels, 0.01, p0, "paper")
        assert got[0] == expected[0] and got[1] == pytest.approx(expected[1], rel=1e-9, abs=1e-12)
        branches["certified"] += got[0] >= 0
    assert branches["paper<=2groups"] > 20 and 5 < branches["certified"] < branches["fire"] - 5, branches


def test_paper_merging_matches_transcription():
    rng = np.random.default_rng(12)
    dense = rng.integers(0, 13, size=(2000, 30)) * (rng.random((2000, 30)) < rng.random((2000, 1)))
    cls = rng.integers(0, 30, size=2000)
    num_groups, largest_other = _paper_groups(SparseCounts.from_dense(dense), cls)
    for row, c, k, largest in zip(dense, cls, num_groups, largest_other):
        groups = merged_groups(row, c)
        assert (k, largest) == (len(groups), max(groups[1:], default=0)), (row.tolist(), c)


def test_stage_outcome_is_the_cascade_decision():
    rng = np.random.default_rng(7)
    cases = random_cases(rng, 300, 3, 9)
    for schedule in SCHEDULES:
        passes = [FALL_THROUGH, UNDECIDED] if schedule == FALLTHROUGH else [FALL_THROUGH]
        levels = stack_levels(cases)[::-1]
        _, _, fired = certify_cascade_sparse(levels, 0.01, 0.5, schedule)
        active = np.ones(len(cases), bool)
        expected_fired = np.full(len(cases), np.nan)
        for s, (sigma, counts0, counts) in enumerate(levels):
            outcome = cascade_stage_outcome(s, 3, counts0, counts, 0.01, 0.5, schedule)
            assert set(np.unique(outcome)) <= {FIRE, UNDECIDED, FALL_THROUGH}
            expected_fired[active & (outcome == FIRE)] = sigma
            active &= np.isin(outcome, passes)
        np.testing.assert_array_equal(fired, expected_fired)


# ----------------------------------------------------------------------------- edge cases


def test_one_level_is_certify_at_half():
    rng = np.random.default_rng(8)
    for _ in range(200):
        counts0, counts = random_level(rng, 5)
        for schedule in ("bonferroni", "paper"):
            pred, radius, fired = certify_cascade([(0.5, counts0, counts)], 0.001, 0.5, schedule)
            assert (pred, radius) == pytest.approx(certify(counts0, counts, 0.5, 0.001), rel=1e-12)
            if pred >= 0:
                assert fired == 0.5


def test_unsorted_sigmas_and_p0_above_half():
    confident = (np.array([0, 95, 5]), np.array([2, 960, 38]))
    unsure = (np.array([40, 35, 25]), np.array([400, 350, 250]))
    high, low = (1.0, *unsure), (0.25, *confident)
    for schedule in ("bonferroni", "paper"):
        a = certify_cascade([high, low], 0.01, 0.5, schedule)
        b = certify_cascade([low, high], 0.01, 0.5, schedule)
        assert a == b and a[0] == 1 and a[2] == 0.25
        # p0 = 0.97: 960/1000 is not confidently above it, but not confidently below either
        assert certify_cascade([high, low], 0.01, 0.97, schedule) == (-1, 0.0, pytest.approx(math.nan, nan_ok=True))
        pred, radius, _ = certify_cascade([high, low], 0.01, 0.9, schedule)
        assert pred == 1 and 0 < radius < a[1]  # the offset Phi^-1(p0) shrinks the radius


def test_edge_cases():
    alpha = 0.001
    empty = (np.zeros(3, int), np.zeros(3, int))
    one_class = (np.array([0, 100, 0]), np.array([0, 10_000, 0]))
    for schedule in ("bonferroni", "paper"):
        # n = 0 at the first level reached: undecided, abstain
        assert certify_cascade([(1.0, *empty), (0.5, *one_class)], alpha, 0.5, schedule)[0] == -1
        # all mass in one class at the lowest level, higher level confidently elsewhere-spread
        spread = (np.array([30, 35, 35]), np.array([3000, 3500, 3500]))
        pred, radius, fired = certify_cascade([(1.0, *spread), (0.5, *one_class)], alpha, 0.5, schedule)
        assert (pred, fired) == (1, 0.5) and radius > 0
        # the higher level's other classes (0.35 each) cap the radius: sigma_j (Phi^-1(.5) - Phi^-1(U)) ~ 1.0 * 0.36
        assert radius < 1.0 * (norm.ppf(0.5) - norm.ppf(0.33))
        # ties in counts0 pick the smallest class
        tie = (np.array([50, 50, 0]), np.array([9000, 500, 500]))
        assert certify_cascade([(0.5, *tie)], alpha, 0.5, schedule)[0] == 0
        tie_wrong = (np.array([50, 50, 0]), np.array([500, 9000, 500]))
        assert certify_cascade([(0.5, *tie_wrong)], alpha, 0.5, schedule)[0] == -1
        # C = 2: with p0 = 0.7 both classes can be confidently below p0 at the higher sigma
        high = (1.0, np.array([45, 55]), np.array([400, 600]))
        low = (0.25, np.array([1, 99]), np.array([10, 990]))
        pred, radius, fired = certify_cascade([high, low], alpha, 0.7, schedule)
        assert (pred, fired) == (1, 0.25) and 0 < radius < 0.25 * (norm.ppf(0.99) - norm.ppf(0.7))
    # C = 2, selection error at the higher sigma: the paper falls through (then abstains on the
    # non-positive radius), bonferroni stops there as undecided
    high = (0.5, np.array([60, 40]), np.array([300, 700]))
    low = (0.25, np.array([10, 90]), np.array([100, 900]))
    assert certify_cascade([high, low], alpha, 0.5, "paper") == (-1, 0.0, 0.25)
    pred, radius, fired = certify_cascade([high, low], alpha, 0.5, "bonferroni")
    assert (pred, radius) == (-1, 0.0) and math.isnan(fired)
    # empty rows in a sparse batch abstain; other rows unaffected
    c0 = SparseCounts.from_lists([[], [1]], [[], [100]])
    c = SparseCounts.from_lists([[], [1]], [[], [1000]])
    pred, radius, fired = certify_cascade_sparse([(0.5, c0, c)], alpha)
    assert pred.tolist() == [-1, 1] and radius[0] == 0 and math.isnan(fired[0])


def test_fall_through_needs_every_class_below_p0_under_bonferroni():
    # The selection at sigma=1 picks class 1, whose upper bound is below p0, while class 0 is not:
    # the paper falls through, bonferroni stops (undecided) because class 0 may be above p0.
    top = (np.array([40, 60]), np.array([640, 360]))
    low = (np.array([0, 100]), np.array([0, 1000]))
    assert certify_cascade([(1.0, *top), (0.5, *low)], 0.01, 0.6, "paper")[2] == 0.5
    pred, _, fired = certify_cascade([(1.0, *top), (0.5, *low)], 0.01, 0.6, "bonferroni")
    assert pred == -1 and math.isnan(fired)
    # bonferroni-fallthrough passes the undecided level on; sigma = 0.5 fires class 1, but class 0's
    # upper bound at sigma = 1 (above p0) caps the radius below zero: abstain
    pred, radius, fired = certify_cascade([(1.0, *top), (0.5, *low)], 0.01, 0.6, FALLTHROUGH)
    assert (pred, radius, fired) == (-1, 0.0, 0.5)


def test_undecided_level_passes_on_and_caps_the_radius():
    """The undecided top level's top class is the one that fires below:
    bonferroni abstains; bonferroni-fallthrough certifies it, its radius capped by the other class's
    upper bound at the top level (and no more than the lower level's own)."""
    alpha, p0 = 0.001, 0.5
    top = (1.5, np.array([0, 17, 10, 5]), np.array([0, 141, 90, 25]))  # class 1: 0.55, between its bounds
    low = (0.5, np.array([0, 32, 0, 0]), np.array([0, 256, 0, 0]))
    assert certify_cascade([top, low], alpha, p0, "bonferroni")[0] == -1
    pred, radius, fired = certify_cascade([top, low], alpha, p0, FALLTHROUGH)
    k = cp(90, 256, 2 * alpha / 8)[1]  # class 2's upper bound at the top level (alpha/(4K), K = 2)
    own = 0.5 * norm.ppf(cp(256, 256, 2 * alpha / 2)[0])
    assert (pred, fired) == (1, 0.5) and radius == pytest.approx(min(own, 1.5 * (norm.ppf(p0) - norm.ppf(k))))
    assert 0 < radius < own


@pytest.mark.parametrize("kwargs", [dict(p0=0.4), dict(p0=1.0), dict(schedule="holm"), dict(alpha=0.6)])
def test_bad_arguments(kwargs):
    args = dict(alpha=0.01, p0=0.5, schedule="bonferroni") | kwargs
    with pytest.raises(ValueError):
        certify_cascade([(0.5, np.array([1, 2]), np.array([3, 4]))], **args)
