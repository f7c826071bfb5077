"""SparseCounts, Clopper-Pearson, Goodman and CERTIFY against independent computations."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.proportion import multinomial_proportions_confint, proportion_confint

from pipeline.certification import (
    SparseCounts,
    certify,
    certify_sparse,
    clopper_pearson,
    goodman_intervals,
)


def random_dense(rng, rows=200, num_classes=7):
    dense = rng.integers(0, 6, size=(rows, num_classes)) * (rng.random((rows, num_classes)) < 0.5)
    dense[rng.random(rows) < 0.1] = 0  # empty rows
    return dense


# ----------------------------------------------------------------------------- SparseCounts


def test_sparse_counts_matches_dense():
    rng = np.random.default_rng(0)
    dense = random_dense(rng)
    sc = SparseCounts.from_dense(dense)
    assert sc.num_rows == len(dense)
    np.testing.assert_array_equal(sc.totals(), dense.sum(1))
    expected_top = [int(np.argmax(r)) if r.any() else -1 for r in dense]  # argmax: first (smallest) on ties
    np.testing.assert_array_equal(sc.top_class(), expected_top)
    cls = rng.integers(-1, dense.shape[1], size=len(dense))
    np.testing.assert_array_equal(sc.count_of(cls), [r[c] if c >= 0 else 0 for r, c in zip(dense, cls)])
    expected_other = [max([v for j, v in enumerate(r) if j != c], default=0) for r, c in zip(dense, cls)]
    np.testing.assert_array_equal(sc.max_count_excluding(cls), expected_other)
    rows = rng.permutation(len(dense))[:50]
    taken = sc.take(rows)
    np.testing.assert_array_equal(taken.totals(), dense[rows].sum(1))
    np.testing.assert_array_equal(taken.top_class(), np.asarray(expected_top)[rows])
    np.testing.assert_array_equal(sc.take(dense.sum(1) > 10).totals(), dense.sum(1)[dense.sum(1) > 10])
    as_lists = SparseCounts.from_lists(
        [np.flatnonzero(r).tolist() for r in dense], [r[r > 0].tolist() for r in dense]
    )
    for a, b in [(as_lists.offsets, sc.offsets), (as_lists.classes, sc.classes), (as_lists.values, sc.values)]:
        np.testing.assert_array_equal(a, b)


def test_sparse_counts_zero_values_mean_absent():
    sc = SparseCounts.from_lists([[2, 5], [1]], [[0, 0], [3]])
    np.testing.assert_array_equal(sc.top_class(), [-1, 1])
    np.testing.assert_array_equal(sc.totals(), [0, 3])


@pytest.mark.parametrize(
    "classes, values",
    [([[3, 1]], [[1, 1]]), ([[1, 1]], [[1, 1]]), ([[1]], [[-2]]), ([[1, 2]], [[1]])],
)
def test_sparse_counts_rejects_bad_rows(classes, values):
    with pytest.raises(ValueError):
        SparseCounts.from_lists(classes, values)


def test_empty_sparse_counts():
    sc = SparseCounts.from_lists([], [])
    assert sc.num_rows == 0 and sc.top_class().shape == (0,)
    sc = SparseCounts.from_dense(np.zeros((3, 4), dtype=int))
    np.testing.assert_array_equal(sc.top_class(), [-1, -1, -1])


# ----------------------------------------------------------------------------- bounds


def test_clopper_pearson_matches_statsmodels():
    rng = np.random.default_rng(1)
    n = np.concatenate([rng.integers(1, 50, 300), rng.integers(50, 200_000, 300)])
    k = np.floor(rng.random(n.size) * (n + 1)).astype(int)
    k[:20], k[20:40] = 0, n[20:40]  # both ends
    for alpha in (0.5, 0.05, 1e-3, 1e-6):
        lo, hi = clopper_pearson(k, n, alpha)
        ref_lo, ref_hi = proportion_confint(k, n, alpha=alpha, method="beta")
        np.testing.assert_allclose(lo, ref_lo, rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(hi, ref_hi, rtol=1e-9, atol=1e-14)
    assert (lo[:20] == 0).all() and (hi[20:40] == 1).all()


def test_clopper_pearson_definition_and_edges():
    # exact tails: P[Bin(n, lo) >= k] = alpha/2 and P[Bin(n, hi) <= k] = alpha/2
    k, n, alpha = np.array([1, 7, 40]), np.array([10, 20, 41]), 0.02
    lo, hi = clopper_pearson(k, n, alpha)
    np.testing.assert_allclose(stats.binom.sf(k - 1, n, lo), alpha / 2, rtol=1e-8)
    np.testing.assert_allclose(stats.binom.cdf(k, n, hi), alpha / 2, rtol=1e-8)
    assert tuple(map(float, clopper_pearson(0, 0, 0.05))) == (0.0, 1.0)
    with pytest.raises(ValueError):
        clopper_pearson(5, 4, 0.05)
    with pytest.raises(ValueError):
        clopper_pearson(1, 4, 0.0)


def test_goodman_matches_statsmodels():
    rng = np.random.default_rng(2)
    for _ in range(300):
        k = int(rng.integers(2, 30))
        counts = rng.integers(0, rng.choice([3, 30, 3000]), size=k)
        counts[rng.integers(k)] += 1  # n > 0
        alpha = float(rng.choice([0.2, 0.05, 2e-3, 1e-5]))
        lo, hi = goodman_intervals(counts, alpha)
        ref = multinomial_proportions_confint(counts, alpha=alpha, method="goodman")
        np.testing.assert_allclose(lo, ref[:, 0], rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(hi, ref[:, 1], rtol=1e-10, atol=1e-13)


def test_goodman_vectorised_rows():
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 40, size=(25, 6))
    lo, hi = goodman_intervals(counts, 0.01)
    for row, l, h in zip(counts, lo, hi):
        ref = multinomial_proportions_confint(row, alpha=0.01, method="goodman")
        np.testing.assert_allclose(np.stack([l, h], 1), ref, rtol=1e-10)


# ----------------------------------------------------------------------------- CERTIFY


def certify_reference(counts0, counts, sigma, alpha):
    """CERTIFY as Cohen et al. define it, with binomtest's exact (Clopper-Pearson) interval."""
    c = int(np.argmax(counts0))
    n = int(counts.sum())
    if n == 0:
        return -1, 0.0
    p_lower = stats.binomtest(int(counts[c]), n).proportion_ci(1 - 2 * alpha, method="exact").low
    return (-1, 0.0) if p_lower < 0.5 else (c, sigma * stats.norm.ppf(p_lower))


def test_certify_matches_reference_and_sparse():
    rng = np.random.default_rng(4)
    cases = []
    for _ in range(300):
        num_classes = int(rng.integers(2, 12))
        p = rng.dirichlet(np.full(num_classes, rng.choice([0.1, 1.0])))
        cases.append((rng.multinomial(int(rng.integers(1, 100)), p), rng.multinomial(int(rng.integers(1, 3000)), p)))
    sigma, alpha = 0.5, 0.01
    outputs = []
    for counts0, counts in cases:
        pred, radius = certify(counts0, counts, sigma, alpha)
        ref_pred, ref_radius = certify_reference(counts0, counts, sigma, alpha)
        assert pred == ref_pred
        assert radius == pytest.approx(ref_radius, rel=1e-9, abs=1e-12)
        outputs.append((pred, radius))
    assert 30 < sum(p >= 0 for p, _ in outputs) < 270  # both branches exercised
    padded = [[np.pad(v, (0, 12 - len(v))) for v in case] for case in cases]
    pred, radius = certify_sparse(
        SparseCounts.from_dense(np.stack([c0 for c0, _ in padded])),
        SparseCounts.from_dense(np.stack([c for _, c in padded])),
        sigma,
        alpha,
    )
    np.testing.assert_array_equal(pred, [p for p, _ in outputs])
    np.testing.assert_allclose(radius, [r for _, r in outputs], rtol=1e-12)


def test_certify_edge_cases():
    alpha, sigma = 0.001, 0.25
    assert certify(np.array([0, 0, 0]), np.array([0, 0, 0]), sigma, alpha) == (-1, 0.0)  # n = 0
    assert certify(np.array([0, 10, 0]), np.array([0, 0, 0]), sigma, alpha) == (-1, 0.0)
    assert certify(np.array([0, 0, 0]), np.array([0, 50, 0]), sigma, alpha) == (-1, 0.0)  # no selection
    pred, radius = certify(np.array([0, 100, 0]), np.array([0, 1000, 0]), sigma, alpha)  # all mass in one class
    assert pred == 1 and radius == pytest.approx(sigma * stats.norm.ppf(alpha ** (1 / 1000)), rel=1e-10)
    pred, _ = certify(np.array([0, 50, 50]), np.array([0, 1000, 0]), sigma, alpha)  # tie -> smallest class
    assert pred == 1
    assert certify(np.array([0, 50, 50]), np.array([0, 0, 1000]), sigma, alpha) == (-1, 0.0)
    pred, radius = certify(np.array([3, 97]), np.array([20, 980]), sigma, alpha)  # C = 2
    assert pred == 1 and radius == pytest.approx(certify_reference(np.array([3, 97]), np.array([20, 980]), sigma, alpha)[1])
    with pytest.raises(ValueError):
        certify(np.array([1, 2]), np.array([1, 2]), sigma, 0.5)
    with pytest.raises(ValueError):
        certify(np.array([1, 2]), np.array([1, 2]), -1.0, alpha)
