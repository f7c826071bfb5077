"""Sequential certification (pipeline/sequential.py): bounds, soundness by simulation, stopping.

Soundness: a claim is *false* when the pair names its class with a grid radius >= the true radius
sigma Phi^-1(p) (single sigma, p exactly at a grid boundary, so the boundary bin's claim counts
as false), or when a cascade row differs from the population cascade (class, or radius above the
population radius; under ``bonferroni-fallthrough``, radius above the one the true probabilities
prove for its class, ``tests.test_soundness.ball_radius``). Its rate must stay <= alpha + 3 Monte Carlo standard errors; the same check
on a bound that spends the full alpha at every look must fail.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special, stats
from scipy.stats import binomtest
from statsmodels.stats.proportion import proportion_confint

from analysis.sequential_sim import (IMAGENET_RADII, compare, draw_paths, fixed_bins, imagenet_like,
                                     mixture_table, run_table)
from pipeline.certification import FALL_THROUGH, FIRE, UNDECIDED, SparseCounts, certify_cascade_sparse
from pipeline.schedules import FALLTHROUGH
from pipeline.sequential import (LookTable, SequentialError, SequentialPlan, certify_cascade_sequential_sparse,
                                 certify_sequential_sparse, lower_bound_counts, top_looks, upper_bound_counts)
from tests.test_soundness import SIGMAS as CASCADE_SIGMAS
from tests.test_soundness import ball_failure_rate, failure_rate, population_cascade

ALPHA = 0.1
DIGITS_RADII = tuple(np.arange(0, 2.01, 0.25))


def margin(alpha: float, trials: int) -> float:
    return 3 * math.sqrt(alpha * (1 - alpha) / trials)


def false_claim_rate(bins: np.ndarray, p: float, sigma: float, radii) -> float:
    q = special.ndtr(np.asarray(radii) / sigma)
    return float(np.mean((bins >= 0) & (q[np.maximum(bins, 0)] >= p)))


# ----------------------------------------------------------------------------- (i) bounds


@pytest.mark.parametrize("n", [1, 7, 100, 301])
def test_count_thresholds_match_statsmodels_and_binomtest(n):
    ks = np.arange(n + 1)
    for tail in (0.05, 0.001 / 7):
        lower = proportion_confint(ks, n, alpha=2 * tail, method="beta")[0]
        lower = np.where(ks == 0, 0.0, lower)
        upper = np.array([binomtest(int(k), n, alternative="less").proportion_ci(1 - tail).high for k in ks])
        for q in (0.5, 0.6, 0.9, 0.99):
            hits = np.flatnonzero(lower >= q)
            assert lower_bound_counts(n, tail, q, False) == (hits[0] if hits.size else n + 1)
            below = np.flatnonzero(upper < q)
            assert upper_bound_counts(n, tail, q) == (below[-1] if below.size else -1)
    # strict: the cascade's radius-0 bin needs p_lower > p0
    exact = stats.beta.ppf(0.01, 60, 41)  # the lower bound of 60/100 at level 0.01, as a threshold
    assert lower_bound_counts(100, 0.01, exact, False) == 60
    assert lower_bound_counts(100, 0.01, exact, True) == 61


def test_plan_table_is_clopper_pearson_at_each_looks_share():
    plan = SequentialPlan.geometric(3000, 0.001, IMAGENET_RADII, (0.5,), first=50, ratio=1.5)
    table = plan.table(0.5)
    q = special.ndtr(np.asarray(IMAGENET_RADII) / 0.5)
    for j, (n, share) in enumerate(zip(plan.looks, plan.spend)):
        ks = np.arange(n + 1)
        lower = np.where(ks > 0, stats.beta.ppf(0.001 * share, np.maximum(ks, 1), n - ks + 1), 0.0)
        for g in range(len(q)):
            hits = np.flatnonzero(lower >= q[g])
            assert table.certify[j, g] == (hits[0] if hits.size else n + 1)
    assert math.isclose(sum(plan.spend), 1.0) and plan.spend[-1] == 0.75


def test_top_looks_are_where_agreeing_samples_first_certify_each_sigmas_top_bin():
    n_max, alpha, share = 10_000, 0.001, 0.2
    plan = SequentialPlan.geometric(n_max, alpha, DIGITS_RADII, (0.25, 1.0), top_share=share)
    # brute force, scipy's beta: the top bin reachable at n_max per sigma, then the first n certifying it
    thresholds = set()
    for sigma in (0.25, 1.0):
        q = special.ndtr(np.asarray(DIGITS_RADII) / sigma)
        reachable = q[q <= stats.beta.ppf(alpha, n_max, 1)]
        thresholds.add(float(reachable.max()))
    assert len(thresholds) == 2  # sigma 0.25: r = 0.75 (Phi(3)); sigma 1.0: r = 2.0 (Phi(2))
    expected = {}
    for q in thresholds:
        n = next(n for n in range(1, n_max) if stats.beta.ppf(alpha * share / 2, n, 1) >= q)
        expected[n] = share / 2
    assert top_looks(n_max, alpha, DIGITS_RADII, (0.25, 1.0), share) == pytest.approx(expected)
    for n, each in expected.items():
        j = plan.looks.index(n)
        assert plan.spend[j] >= each  # its own share (plus a geometric look's when they coincide)
        sigma, top_bin = (0.25, 3) if n > 1000 else (1.0, 8)
        assert plan.table(sigma).decide(n, j)[1] == top_bin  # n agreeing samples certify it there
    assert math.isclose(sum(plan.spend), 1.0)
    assert top_looks(n_max, alpha, DIGITS_RADII, (0.25,), 0.0) == {}
    assert SequentialPlan.geometric(100, alpha, DIGITS_RADII, (1.0,), first=100).looks == (100,)  # one look stays one


def test_continue_rule_matches_brute_force_without_futility():
    plan = SequentialPlan.geometric(400, 0.05, DIGITS_RADII, (0.5,), first=20, ratio=1.5, futility=0.0)
    table = plan.table(0.5)
    looks = plan.looks
    for j, n in enumerate(looks):
        k = np.arange(n + 1)
        stop, g = plan.decide(0.5, k, j)
        best_later = np.full(n + 1, -2)  # the highest bin any later look reaches if every sample agrees
        for jj in range(j + 1, len(looks)):
            best_later = np.maximum(best_later, table.decide(k + looks[jj] - n, jj)[1])
        np.testing.assert_array_equal(stop, best_later <= g)


def test_futility_only_stops_never_certifies():
    with_futility = SequentialPlan.geometric(2000, 0.01, DIGITS_RADII, (1.0,), futility=0.2)
    without = SequentialPlan.geometric(2000, 0.01, DIGITS_RADII, (1.0,), futility=0.0)
    np.testing.assert_array_equal(with_futility.table(1.0).certify, without.table(1.0).certify)
    assert np.all(with_futility.table(1.0).go >= without.table(1.0).go)
    assert np.any(with_futility.table(1.0).go > without.table(1.0).go)


# ----------------------------------------------------------------------------- (ii, iii) soundness


def broken_table(plan: SequentialPlan, sigma: float) -> LookTable:
    """The plan's rule, but every look's bound at the full alpha (not split over the looks)."""
    looks = np.asarray(plan.looks)
    q = special.ndtr(np.asarray(plan.radii) / sigma)
    return LookTable.build(looks, lower_bound_counts(looks[:, None], plan.alpha, q[None], False), 0.0)


# (n_max, first look, sigma, grid, bin whose boundary p sits on)
SINGLE = {
    "small n_max, top bin r = 0.5 at sigma 0.5": (200, 20, 0.5, (0.0, 0.25, 0.5), 2),
    "p at 0.5 (radius 0)": (400, 20, 1.0, (0.0,), 0),
    "mid-grid boundary r = 0.5 of 4 bins": (2000, 20, 1.0, (0.0, 0.5, 1.0, 1.5), 1),
    "large n_max, digits grid, r = 1.0": (10_000, 100, 1.0, DIGITS_RADII, 4),
    "top look: p at the top reachable bin r = 2.0": (2000, 20, 1.0, DIGITS_RADII, 8),
}


@pytest.mark.parametrize("name", list(SINGLE))
def test_single_sigma_soundness_and_broken_bound_fails(name):
    n_max, first, sigma, radii, g = SINGLE[name]
    trials = 6000
    p = float(special.ndtr(radii[g] / sigma))
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    strict_plan = SequentialPlan.geometric(n_max, ALPHA, radii, (sigma,), first=first, futility=0.0)
    paths = draw_paths(np.full(trials, p), strict_plan.looks, rng)
    limit = ALPHA + margin(ALPHA, trials)
    for plan in (strict_plan, SequentialPlan.geometric(n_max, ALPHA, radii, (sigma,), first=first),
                 SequentialPlan.geometric(n_max, ALPHA, radii, (sigma,), first=first, ratio=2.0, final_share=0.5)):
        _, bins = run_table(draw_paths(np.full(trials, p), plan.looks, rng), plan.table(sigma))
        assert false_claim_rate(bins, p, sigma, radii) <= limit, plan
    _, bins = run_table(paths, broken_table(strict_plan, sigma))
    assert false_claim_rate(bins, p, sigma, radii) > limit  # the check can fail


def test_mixture_confidence_sequence_is_sound():
    plan = SequentialPlan.geometric(2000, ALPHA, (0.0, 0.5), (1.0,), first=20, ratio=1.1, futility=0.0)
    p, trials = float(special.ndtr(0.5)), 6000
    _, bins = run_table(draw_paths(np.full(trials, p), plan.looks, np.random.default_rng(3)), mixture_table(plan, 1.0))
    assert false_claim_rate(bins, p, 1.0, plan.radii) <= ALPHA + margin(ALPHA, trials)


def pad(p, num_classes):
    others = num_classes - len(p)
    return np.asarray(list(p) + [(1 - sum(p)) / max(others, 1)] * others)


def simulate_cascade(plan: SequentialPlan, probs: np.ndarray, n0: int, trials: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """What a sampler does: stage by stage from the highest sigma, selection then estimation
    looks until ``decide_stage`` stops. Returns (pred, grid radius) recomputed from the stored
    counts and looks, after checking that they equal the sampler's own decisions on every row.
    ``probs`` [K, C] (stages highest sigma first)."""
    looks = np.asarray(plan.looks)
    levels, caps_from = [], []
    pred = np.full(trials, -1)
    radius = np.zeros(trials)
    active = np.arange(trials)
    for s, sigma in enumerate(plan.stage_sigmas()):
        counts0 = rng.multinomial(n0, probs[s], size=trials)
        chosen = counts0.argmax(1)
        counts = np.zeros((trials, probs.shape[1]), dtype=np.int64)
        stop_look = np.zeros(trials, dtype=np.int64)  # rows that never reach the stage are never read
        outcome = np.full(trials, FALL_THROUGH)
        cap = np.full(trials, np.inf)
        for i, (stored, stored_look) in enumerate(caps_from):
            other = stored.copy()
            other[np.arange(trials), chosen] = -1
            cap = np.minimum(cap, plan.stage_cap(i, other.max(1), stored_look))
        running, previous = active.copy(), 0
        for j, n in enumerate(looks):
            counts[running] += rng.multinomial(n - previous, probs[s], size=running.size)
            previous = n
            stop, result, bins = plan.decide_stage(s, counts[running, chosen[running]], counts[running].max(1), j,
                                                   plan.cap_bin(cap[running]))
            done = running[stop]
            stop_look[done], outcome[done] = j, result[stop]
            fired = done[(result[stop] == FIRE) & (bins[stop] >= 0)]
            pred[fired] = chosen[fired]
            radius[fired] = np.asarray(plan.radii)[bins[stop][(result[stop] == FIRE) & (bins[stop] >= 0)]]
            running = running[~stop]
        levels.append((sigma, SparseCounts.from_dense(counts0), SparseCounts.from_dense(counts), stop_look))
        caps_from.append((counts, stop_look))
        passes = [FALL_THROUGH, UNDECIDED] if plan.schedule == FALLTHROUGH else [FALL_THROUGH]
        active = active[np.isin(outcome[active], passes)]
    recomputed_pred, recomputed_radius, _ = certify_cascade_sequential_sparse(plan, levels)
    np.testing.assert_array_equal(recomputed_pred, pred)
    np.testing.assert_array_equal(recomputed_radius, radius)
    return pred, radius


# name: (per-stage class probabilities, highest sigma first; C; p0; n0; n_max)
CASCADE = {
    "C=2, top just above p0": ([[0.53, 0.47], [0.8, 0.2], [0.95, 0.05]], 2, 0.5, 50, 400),
    "C=2, every level at p0 = 0.5": ([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]], 2, 0.5, 50, 400),
    "C=1000, second level fires on a grid boundary": ([[0.45, 0.3], [float(special.ndtr(0.5 / 0.5)), 0.1], [0.9]],
                                                      1000, 0.5, 50, 2000),
    "C=1000, p0 = 0.6, top at p0": ([[0.6, 0.3], [0.9, 0.05], [0.99]], 1000, 0.6, 30, 400),
    "C=10, undecided top, another class fires there": ([[0.46, 0.52], [0.95], [0.97]], 10, 0.5, 50, 400),
    "C=10, undecided top, the lower stage's class": ([[0.52, 0.3], [0.9], [0.95]], 10, 0.5, 50, 400),
}


@pytest.mark.parametrize("schedule", ["bonferroni", FALLTHROUGH])
@pytest.mark.parametrize("name", list(CASCADE))
def test_cascade_soundness_and_recomputation(name, schedule):
    rows, num_classes, p0, n0, n_max = CASCADE[name]
    probs = np.stack([pad(p, num_classes) for p in rows])
    trials = 2000 if num_classes > 2 else 6000
    plan = SequentialPlan.geometric(n_max, ALPHA, DIGITS_RADII, CASCADE_SIGMAS, first=20, mode="cascade", p0=p0,
                                    schedule=schedule)
    pred, radius = simulate_cascade(plan, probs, n0, trials, np.random.default_rng(sum(map(ord, name))))
    if schedule == FALLTHROUGH:
        rate = ball_failure_rate(pred, radius, probs, p0)
    else:
        true_pred, true_radius = population_cascade(np.broadcast_to(probs, (trials,) + probs.shape).copy(), p0)
        rate = failure_rate(pred, radius, true_pred, true_radius)
    assert rate <= ALPHA + margin(ALPHA, trials)
    assert np.any(pred >= 0) or name.startswith("C=2, every") or (schedule == "bonferroni" and "undecided" in name)


def test_cascade_stage_is_never_stronger_than_the_bonferroni_schedule_at_n_max():
    """At the last look, the stage's bounds are the bonferroni schedule's at a share of its
    budget: a row certified sequentially is certified at least as far by the fixed schedule."""
    plan = SequentialPlan.geometric(1000, 0.01, DIGITS_RADII, (0.5, 0.25), first=50, mode="cascade")
    rng = np.random.default_rng(5)
    counts = rng.multinomial(1000, [0.9, 0.06, 0.04], size=400) * (rng.random((400, 1)) < 0.5) \
        + rng.multinomial(1000, [0.3, 0.66, 0.04], size=400) * 0
    counts = np.where(counts.sum(1, keepdims=True) == 0, rng.multinomial(1000, [0.2, 0.3, 0.5], size=400), counts)
    counts0 = SparseCounts.from_dense(counts[:, ::1] // 10)
    last = len(plan.looks) - 1
    levels = [(s, counts0, SparseCounts.from_dense(counts), np.full(400, last)) for s in plan.sigmas]
    pred, radius, _ = certify_cascade_sequential_sparse(plan, levels)
    fixed_pred, fixed_radius, _ = certify_cascade_sparse([(s, c0, c) for s, c0, c, _ in levels], 0.01, 0.5)
    certified = pred >= 0
    assert certified.any()
    np.testing.assert_array_equal(pred[certified], fixed_pred[certified])
    assert np.all(radius[certified] <= fixed_radius[certified])


# ----------------------------------------------------------------------------- (iv) stopping, sanity, determinism


def test_pairs_stop_when_the_bin_cannot_rise():
    plan = SequentialPlan.geometric(10_000, 0.001, IMAGENET_RADII, (0.25,))
    # at sigma 0.25 the top reachable bin is r = 0.5 (0.25 Phi^-1 of the best bound < 1.0)
    assert fixed_bins(np.array([10_000]), 10_000, 0.25, 0.001, IMAGENET_RADII)[0] == 1
    k = np.array(plan.looks)  # every sample agreed
    stop, bins = plan.decide(0.25, k, np.arange(len(plan.looks)))
    first = int(np.argmax(stop))  # stops at the first look certifying the top reachable bin
    assert first == int(np.argmax(bins == 1)) and plan.looks[first] <= 1000 and not stop[:first].any()
    looks, bins = run_table(draw_paths(np.full(2000, 0.999), plan.looks, np.random.default_rng(0)), plan.table(0.25))
    assert np.mean(np.asarray(plan.looks)[looks]) < 1000 and np.mean(bins == 1) > 0.99


def test_never_certifies_more_than_fixed_clopper_pearson_at_full_alpha():
    plan = SequentialPlan.geometric(10_000, 0.001, IMAGENET_RADII, (1.0,))
    best_fixed = fixed_bins(np.array([10_000]), 10_000, 1.0, 0.001, IMAGENET_RADII)[0]
    for j, n in enumerate(plan.looks):
        k = np.arange(n + 1)
        _, bins = plan.decide(1.0, k, j)
        assert np.all(bins <= fixed_bins(k, n, 1.0, 0.001, IMAGENET_RADII))
        assert bins.max() <= best_fixed


def test_simulated_imagenet_protocol_meets_the_bar():
    pairs = imagenet_like(20_000, seed=0)
    plan = SequentialPlan.geometric(10_000, 0.001, IMAGENET_RADII, tuple(pairs))
    results = [compare(pairs[s], s, plan, plan.table(s), seed=1) for s in sorted(pairs)]
    fixed = sum(r.fixed_samples for r in results)
    assert fixed / sum(r.sequential_samples for r in results) >= 3.5
    for r in results:
        assert np.all(r.sequential_accuracy >= r.fixed_accuracy - 0.01)


def test_determinism_and_manifest_round_trip():
    plan = SequentialPlan.geometric(5000, 0.001, DIGITS_RADII, (0.25, 0.5))
    again = SequentialPlan.from_dict(plan.to_dict())
    assert again == plan
    np.testing.assert_array_equal(again.table(0.5).go, plan.table(0.5).go)
    pairs = imagenet_like(500, seed=3)[0.5]
    a = compare(pairs, 0.5, plan, plan.table(0.5), seed=9)
    b = compare(pairs, 0.5, again, again.table(0.5), seed=9)
    assert a.sequential_samples == b.sequential_samples < a.fixed_samples
    np.testing.assert_array_equal(a.sequential_accuracy, b.sequential_accuracy)
    with pytest.raises(SequentialError, match="keys"):
        SequentialPlan.from_dict({**plan.to_dict(), "extra": 1})
    # a manifest written before the cascade's schedule was recorded: the bonferroni walk it ran
    before = {k: v for k, v in plan.to_dict().items() if k != "schedule"}
    assert SequentialPlan.from_dict(before) == plan and plan.schedule == "bonferroni"
    with pytest.raises(SequentialError, match="keys"):
        SequentialPlan.from_dict({k: v for k, v in plan.to_dict().items() if k != "looks"})
    with pytest.raises(SequentialError, match="schedule must be one of"):
        SequentialPlan.from_dict({**plan.to_dict(), "schedule": "paper"})


def test_certificates_recomputed_from_the_table_and_inconsistent_rows_refused():
    plan = SequentialPlan.geometric(2000, 0.001, DIGITS_RADII, (0.5,), first=50)
    rng = np.random.default_rng(4)
    p = rng.uniform(0.4, 1.0, 3000)
    paths = draw_paths(p, plan.looks, rng)
    stopped, bins = run_table(paths, plan.table(0.5))
    k = paths[np.arange(p.size), stopped]
    n = np.asarray(plan.looks)[stopped]
    counts = SparseCounts.from_dense(np.stack([k, n - k], axis=1))
    counts0 = SparseCounts.from_dense(np.tile([[90, 10]], (p.size, 1)))
    pred, radius = certify_sequential_sparse(plan, 0.5, counts0, counts, stopped)
    np.testing.assert_array_equal(pred, np.where(bins >= 0, 0, -1))
    np.testing.assert_array_equal(radius, plan.radius_of(bins))
    assert 0 < np.mean(pred == 0) < 1 and len(np.unique(stopped)) > 3
    with pytest.raises(SequentialError, match="is not the plan's look"):
        certify_sequential_sparse(plan, 0.5, counts0, counts, np.where(stopped > 0, stopped - 1, 1))
    half = plan.looks[0] // 2  # a pair at 50% after the first look: the plan continues
    undecided = SparseCounts.from_dense(np.tile([[half, plan.looks[0] - half]], (p.size, 1)))
    with pytest.raises(SequentialError, match="continues"):
        certify_sequential_sparse(plan, 0.5, counts0, undecided, np.zeros(p.size, dtype=np.int64))


def test_covers_names_what_it_refuses():
    plan = SequentialPlan.geometric(10_000, 0.001, IMAGENET_RADII, (0.25, 0.5, 1.0))
    assert plan.covers(alpha=0.01, radii=(0.0, 1.0, 3.0), sigmas=(0.5,))
    assert any("smaller" in r for r in plan.uncovered(alpha=0.0005))
    assert any("not on the sequential plan's grid" in r for r in plan.uncovered(radii=(0.25,)))
    assert plan.uncovered(mode="cascade")
    cascade = SequentialPlan.geometric(10_000, 0.001, IMAGENET_RADII, (0.25, 0.5, 1.0), mode="cascade", p0=0.5)
    assert cascade.covers(alpha=0.001, radii=(0.5,), p0=0.5, sigmas=(1.0, 0.5, 0.25))
    assert any("p0" in r for r in cascade.uncovered(p0=0.6))
    assert any("sigmas" in r for r in cascade.uncovered(sigmas=(0.5, 0.25)))


@pytest.mark.parametrize("bad", [dict(looks=(100, 50, 1000)), dict(spend=(0.6, 0.6)), dict(alpha=0.7),
                                 dict(radii=(0.5, 0.0)), dict(mode="other")])
def test_plan_validation(bad):
    base = dict(n_max=1000, alpha=0.001, radii=(0.0, 0.5), sigmas=(0.5,), looks=(100, 1000), spend=(0.2, 0.8))
    with pytest.raises(SequentialError):
        SequentialPlan(**{**base, **bad})
