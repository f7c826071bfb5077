"""Soundness by simulation: counts drawn from known class probabilities at every level.

A certificate *fails* when it names a class (does not abstain) and that class differs from the
population cascade's (the rule applied to the true probabilities), or its radius exceeds the
population radius. ``bonferroni`` must fail at most alpha of the time (plus Monte Carlo error);
the ``paper`` schedule's rate is measured and printed (``pytest -s``). A plug-in certificate
(true probabilities replaced by the empirical frequencies) must fail often: the harness can detect
failures.

``bonferroni-fallthrough`` claims robustness on the ball, not the population's formula radius
(a lower level may certify the class an undecided level above truly fires, farther than that
level's own radius). Its certificate fails when its radius exceeds :func:`ball_radius` of its
class: the radius within which the true probabilities at x prove that the population cascade
outputs that class. It must fail at most alpha of the time; the same walk without the undecided
levels' radius caps must fail often.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from pipeline.certification import UNDECIDED, SparseCounts, cascade_stage_outcome, certify_cascade_sparse
from pipeline.schedules import FALLTHROUGH

ALPHA = 0.05
TRIALS = 12_000
SIGMAS = (1.0, 0.5, 0.25)  # stage order: highest sigma first


def population_cascade(probs: np.ndarray, p0: float) -> tuple[np.ndarray, np.ndarray]:
    """The cascade on probabilities ``probs`` [T, K, C] (stages by sigma descending): (pred, radius)."""
    trials, num_levels, _ = probs.shape
    pred = np.full(trials, -1)
    radius = np.zeros(trials)
    open_ = np.ones(trials, bool)
    for s in range(num_levels):
        top = probs[:, s].argmax(1)
        fires = open_ & (probs[np.arange(trials), s, top] >= p0)
        r = SIGMAS[s] * (norm.ppf(probs[np.arange(trials), s, top]) - norm.ppf(p0))
        for j in range(s):
            others = probs[:, j].copy()
            others[np.arange(trials), top] = -1
            r = np.minimum(r, SIGMAS[j] * (norm.ppf(p0) - norm.ppf(others.max(1))))
        pred[fires], radius[fires] = top[fires], r[fires]
        open_ &= ~fires
    return pred, radius


def ball_radius(probs: np.ndarray, cls: np.ndarray, p0: float) -> np.ndarray:
    """Per trial, the largest r for which the probabilities ``probs`` [K, C] at x prove that the
    population cascade outputs ``cls`` [T] everywhere within r: the max over stages s of
    min(sigma_s (Phi^-1(p_s(cls)) - Phi^-1(p0)), min_{j<s} sigma_j (Phi^-1(p0) - Phi^-1(max_{c != cls}
    p_j(c)))), each term by the sigma-Lipschitz bound on Phi^-1 of a smoothed probability."""
    best, cap = np.full(cls.size, -np.inf), np.full(cls.size, np.inf)
    for s, p in enumerate(probs):
        own = SIGMAS[s] * (norm.ppf(p[cls]) - norm.ppf(p0))
        best = np.maximum(best, np.minimum(own, cap))
        others = np.where(np.arange(p.size)[None, :] == cls[:, None], -1.0, p[None, :]).max(1)
        cap = np.minimum(cap, SIGMAS[s] * (norm.ppf(p0) - norm.ppf(others)))
    return best


def failure_rate(pred, radius, true_pred, true_radius) -> float:
    wrong = (pred >= 0) & ((pred != true_pred) | (radius > true_radius * (1 + 1e-9) + 1e-12))
    return float(wrong.mean())


def ball_failure_rate(pred, radius, probs, p0) -> float:
    wrong = (pred >= 0) & (radius > ball_radius(np.asarray(probs), np.maximum(pred, 0), p0) * (1 + 1e-9) + 1e-12)
    return float(wrong.mean())


def pad(p):
    return np.asarray(p + [0.0] * (10 - len(p)))


# name: (per-level class probabilities, highest sigma first; p0; n0; n)
SCENARIOS = {
    "fires at the top, just above p0": ([pad([0.53, 0.2, 0.15, 0.12]), pad([0.8, 0.2]), pad([0.95, 0.05])], 0.5, 100, 1000),
    "top just below p0, second level fires": ([pad([0.47, 0.3, 0.23]), pad([0.7, 0.2, 0.1]), pad([0.9, 0.1])], 0.5, 100, 1000),
    "fires at the last level, just above p0": ([pad([0.3] * 3 + [0.1]), pad([0.45, 0.45, 0.1]), pad([0.52, 0.48])], 0.5, 100, 2000),
    "population abstains, every level near p0": ([pad([0.48, 0.47, 0.05]), pad([0.49, 0.48, 0.03]), pad([0.495, 0.49, 0.015])], 0.5, 100, 1000),
    "selection error above p0 (p0 = 0.6)": ([pad([0.62, 0.38]), pad([0.95, 0.05]), pad([0.99, 0.01])], 0.6, 30, 500),
    "many small cells above (Goodman)": ([np.full(10, 0.1), pad([0.56, 0.44]), pad([0.9, 0.1])], 0.5, 50, 100),
    "top level exactly at p0 = 0.6": ([pad([0.6, 0.25, 0.15]), pad([0.9, 0.1]), pad([0.95, 0.05])], 0.6, 100, 1000),
    "C = 2, p0 = 0.7": ([np.array([0.36, 0.64]), np.array([0.28, 0.72]), np.array([0.1, 0.9])], 0.7, 100, 1000),
    "undecided top, another class fires there": ([pad([0.46, 0.52, 0.02]), pad([0.95, 0.05]), pad([0.97, 0.03])], 0.5, 100, 1000),
    "undecided top, the lower level's class": ([pad([0.52, 0.3, 0.18]), pad([0.9, 0.1]), pad([0.95, 0.05])], 0.5, 100, 1000),
}


def simulate(probs, p0, n0, n, seed):
    rng = np.random.default_rng(seed)
    levels = []
    for sigma, p in zip(SIGMAS, probs):
        counts0 = SparseCounts.from_dense(rng.multinomial(n0, p, size=TRIALS))
        counts = rng.multinomial(n, p, size=TRIALS)
        levels.append((sigma, counts0, counts))
    true_pred, true_radius = population_cascade(np.broadcast_to(np.stack(probs), (1, *np.shape(probs))), p0)
    sparse = [(sigma, c0, SparseCounts.from_dense(c)) for sigma, c0, c in levels]
    rates = {}
    for schedule in ("bonferroni", FALLTHROUGH, "paper"):
        pred, radius, _ = certify_cascade_sparse(sparse, ALPHA, p0, schedule)
        rates[schedule] = (ball_failure_rate(pred, radius, probs, p0) if schedule == FALLTHROUGH
                           else failure_rate(pred, radius, true_pred, true_radius))
        rates[schedule + " certified"] = float((pred >= 0).mean())
    plug_in = np.stack([c / n for _, _, c in levels], axis=1)
    rates["plug-in"] = failure_rate(*population_cascade(plug_in, p0), true_pred, true_radius)
    # broken: where the top level is undecided, the walk goes on without that level's radius cap
    undecided = cascade_stage_outcome(0, len(sparse), *sparse[0][1:], ALPHA, p0, FALLTHROUGH) == UNDECIDED
    pred, radius, _ = certify_cascade_sparse(sparse, ALPHA, p0, FALLTHROUGH)
    below, below_radius, _ = certify_cascade_sparse(sparse[1:], ALPHA, p0, FALLTHROUGH)
    rates["no undecided cap"] = ball_failure_rate(np.where(undecided, below, pred), np.where(undecided, below_radius, radius),
                                                  probs, p0)
    return rates


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_bonferroni_is_sound(name):
    probs, p0, n0, n = SCENARIOS[name]
    rates = simulate(probs, p0, n0, n, seed=list(SCENARIOS).index(name))
    margin = 3 * math.sqrt(ALPHA * (1 - ALPHA) / TRIALS)
    print(
        f"\n[{name}] failure rate over {TRIALS} trials at alpha={ALPHA}: "
        f"bonferroni {rates['bonferroni']:.4f} (certified {rates['bonferroni certified']:.3f}), "
        f"{FALLTHROUGH} {rates[FALLTHROUGH]:.4f} (certified {rates[FALLTHROUGH + ' certified']:.3f}; without the "
        f"undecided caps {rates['no undecided cap']:.4f}), "
        f"paper {rates['paper']:.4f} (certified {rates['paper certified']:.3f}), plug-in {rates['plug-in']:.4f}"
    )
    for schedule in ("bonferroni", FALLTHROUGH):
        assert rates[schedule] <= ALPHA + margin
        assert rates[schedule + " certified"] > 0 or name.startswith("population abstains")


def test_harness_detects_unsound_certificates():
    probs, p0, n0, n = SCENARIOS["fires at the top, just above p0"]
    assert simulate(probs, p0, n0, n, seed=1)["plug-in"] > 0.3
    probs, p0, n0, n = SCENARIOS["undecided top, another class fires there"]
    assert simulate(probs, p0, n0, n, seed=2)["no undecided cap"] > 0.3
