"""Simulation of sequential against fixed certification from per-(image, sigma) true probabilities.

Each pair has p, the true probability of the class the selection picked, and whether that class
is the label. The estimation counts are binomial draws at the looks of a plan (common random
numbers: the fixed protocol's count at n_max is the sequential path's count there), so the two
protocols are compared pair by pair. Used by ``jobs.bench_sequential`` and the soundness tests.

Probabilities come from a counts table (:func:`pairs_from_counts`: the empirical top-class
frequency of each row) or from :func:`imagenet_like`, a generator calibrated to published
ImageNet results.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import special, stats

from pipeline.sequential import LookTable, SequentialPlan, lower_bound_counts, upper_bound_counts

IMAGENET_RADII = tuple(np.round(np.arange(0, 3.01, 0.5), 6))
IMAGENET_SIGMAS = (0.25, 0.5, 1.0)
DIGITS_RADII = tuple(np.round(np.arange(0, 2.01, 0.25), 6))

# Per sigma: (share of pairs whose selected class is the label, mean and sd of Phi^-1(p) for them).
# Chosen so that the fixed protocol (n = 10,000, alpha = 0.001) reproduces, within a few points,
# the per-sigma certified accuracies published for denoised smoothing on ImageNet with a
# BEiT-L classifier (Carlini et al., ICLR 2023): sigma 0.25: 82 / 75 at r = 0 / 0.5; sigma 0.5:
# 77 / 71 / 54 at r = 0 / 0.5 / 1.0; sigma 1.0: 63 / 57 / 50 / 30 / 13 at r = 0 / 0.5 / 1 / 2 / 3.
# A normal on Phi^-1(p) puts most correct pairs at p in 0.9-0.9999. The other pairs (17-35%):
# 70% hesitant (p uniform in 0.25-0.55: abstentions, the costly ones near 0.5), 30% confidently
# wrong (Phi^-1(p) ~ N(1, 0.8)).
_IMAGENET_MIX = {0.25: (0.83, 3.3, 1.0), 0.5: (0.78, 2.65, 1.2), 1.0: (0.65, 1.9, 1.17)}


@dataclass(frozen=True)
class Pairs:
    """Per-(image, sigma) truth for one sigma: ``p`` of the selected class and whether it is the label."""

    p: np.ndarray
    correct: np.ndarray


def imagenet_like(num_images: int, seed: int = 0) -> dict[float, Pairs]:
    """Realistic per-pair probabilities at the ImageNet protocol's sigmas (see ``_IMAGENET_MIX``)."""
    rng = np.random.default_rng(seed)
    out = {}
    for sigma, (share, mean, sd) in _IMAGENET_MIX.items():
        correct = rng.random(num_images) < share
        z = rng.normal(mean, sd, num_images)
        hesitant = rng.random(num_images) < 0.7
        wrong = np.where(hesitant, rng.uniform(0.25, 0.55, num_images), special.ndtr(rng.normal(1.0, 0.8, num_images)))
        out[sigma] = Pairs(np.where(correct, special.ndtr(z), wrong), correct)
    return out


def pairs_from_counts(table) -> dict[float, Pairs]:
    """Per sigma, each row's empirical top-class frequency of the estimation counts as p, and
    whether that class is the label, from a validated counts table (``analysis.counts.CountsTable``)."""
    top = table.counts.top_class()
    freq = table.counts.count_of(top) / np.maximum(table.counts.totals(), 1)
    return {float(s): Pairs(freq[table.sigma == s], (top == table.label)[table.sigma == s]) for s in table.sigmas}


def draw_paths(p: np.ndarray, looks: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Cumulative binomial counts [N, J] of each pair at each look (one path per pair)."""
    steps = np.diff(np.concatenate([[0], np.asarray(looks)]))
    return np.cumsum(rng.binomial(steps[None, :], np.asarray(p)[:, None]), axis=1)


def run_table(paths: np.ndarray, table: LookTable) -> tuple[np.ndarray, np.ndarray]:
    """(look index stopped at, bin) per pair following ``table`` along its count ``paths`` [N, J]."""
    num, num_looks = paths.shape
    stopped = np.full(num, num_looks - 1)
    bins = np.full(num, -1)
    active = np.arange(num)
    for j in range(num_looks):
        stop, g = table.decide(paths[active, j], j)
        stopped[active[stop]], bins[active[stop]] = j, g[stop]
        active = active[~stop]
    return stopped, bins


def fixed_bins(k: np.ndarray, n: int, sigma: float, alpha: float, radii: Sequence[float]) -> np.ndarray:
    """CERTIFY's bin at n samples: the largest g with sigma Phi^-1(CP lower bound at alpha) >= radii[g]."""
    thresholds = lower_bound_counts(n, alpha, special.ndtr(np.asarray(radii) / sigma), False)
    return (thresholds[None, :] <= np.asarray(k)[:, None]).sum(axis=1) - 1


def plain_rule_table(n_max: int, alpha: float, radii: Sequence[float], sigma: float) -> LookTable:
    """The issue's baseline: looks doubling from 100 to n_max, alpha/2 at the last look and the
    rest evenly; stop when the next bin is out of reach or the look's own CP upper bound is below
    the next bin's probability threshold Phi(r / sigma)."""
    looks = [n for n in (100 * 2**i for i in range(64)) if n < n_max] + [n_max]
    levels = alpha * np.array([0.5 / max(len(looks) - 1, 1)] * (len(looks) - 1) + [0.5 if len(looks) > 1 else 1.0])
    q = special.ndtr(np.asarray(radii) / sigma)
    certify = lower_bound_counts(np.array(looks)[:, None], levels[:, None], q[None], False)
    table = LookTable.build(np.array(looks), certify, futility=0.0)
    ruled_out = upper_bound_counts(np.array(looks)[:, None], levels[:, None], q[None])
    go = np.where(table.go < np.iinfo(np.int64).max // 4, np.maximum(table.go, ruled_out + 1), table.go)
    return LookTable(table.looks, table.certify, go)


def mixture_lower_counts(looks: Sequence[int], alpha: float, q: np.ndarray, prior: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Count thresholds [J, G] of the one-sided beta-binomial mixture confidence sequence
    (Robbins; Howard et al. 2021): reject p <= q_g at n once M_n(q_g) >= 1/alpha, where
    M_n(q) = int_q^1 L(p') dBeta(a, b)(p') / (Beta mass of [q, 1] * L(q)), L the binomial
    likelihood. M_n(q) is a non-negative supermartingale under every p <= q (each likelihood
    ratio L(p')/L(q) with p' >= q is one), so by Ville's inequality the claims made at any
    data-dependent times, at every n, are all true with probability >= 1 - alpha."""
    a, b = prior
    looks = np.asarray(looks, dtype=np.int64)
    q = np.asarray(q, dtype=float)

    def log_m(k, n, q):
        with np.errstate(divide="ignore"):
            return (special.betaln(a + k, b + n - k) - special.betaln(a, b)
                    + stats.beta.logsf(q, a + k, b + n - k) - stats.beta.logsf(q, a, b)
                    - k * np.log(q) - (n - k) * np.log1p(-q))

    out = np.empty((looks.size, q.size), dtype=np.int64)
    for j, n in enumerate(looks):
        ks = np.arange(n + 1)
        for g, qg in enumerate(q):
            if qg >= 1:  # p >= 1 can never be claimed
                out[j, g] = n + 1
                continue
            hit = np.flatnonzero(log_m(ks, n, qg) >= np.log(1 / alpha))
            out[j, g] = hit[0] if hit.size else n + 1
    return out


def mixture_table(plan: SequentialPlan, sigma: float, prior: tuple[float, float] = (1.0, 1.0)) -> LookTable:
    """A full-mode table at ``plan``'s looks whose certifying bound is the mixture confidence
    sequence at the plan's whole alpha (no spending), with the plan's futility rule."""
    q = special.ndtr(np.asarray(plan.radii) / sigma)
    return LookTable.build(np.asarray(plan.looks), mixture_lower_counts(plan.looks, plan.alpha, q, prior), plan.futility)


@dataclass(frozen=True, eq=False)
class Comparison:
    """Fixed against sequential at one sigma: mean samples and certified accuracy per grid radius."""

    sigma: float
    pairs: int
    fixed_samples: float
    sequential_samples: float
    fixed_accuracy: np.ndarray  # [G] fraction certified correct at radii[g]
    sequential_accuracy: np.ndarray

    @property
    def ratio(self) -> float:
        return self.fixed_samples / self.sequential_samples


def certified_accuracy(bins: np.ndarray, correct: np.ndarray, num_bins: int) -> np.ndarray:
    """Fraction of pairs certified correct at each grid radius (bin >= g)."""
    return np.array([np.mean(correct & (bins >= g)) for g in range(num_bins)])


def compare(pairs: Pairs, sigma: float, plan: SequentialPlan, table: LookTable, seed: int = 0) -> Comparison:
    """Fixed (n = plan.n_max, CP at plan.alpha) against ``table`` on the same count paths."""
    rng = np.random.default_rng(seed)
    looks = np.union1d(table.looks, [plan.n_max])
    paths = draw_paths(pairs.p, looks, rng)
    index = np.searchsorted(looks, table.looks)
    stopped, bins = run_table(paths[:, index], table)
    fixed = fixed_bins(paths[:, -1], plan.n_max, sigma, plan.alpha, plan.radii)
    g = len(plan.radii)
    return Comparison(sigma, len(pairs.p), float(plan.n_max), float(table.looks[stopped].mean()),
                      certified_accuracy(fixed, pairs.correct, g), certified_accuracy(bins, pairs.correct, g))


def overall_ratio(results: Sequence[Comparison]) -> float:
    """Fixed samples over sequential samples, summed over sigmas (pairs weighted equally)."""
    return sum(r.fixed_samples * r.pairs for r in results) / sum(r.sequential_samples * r.pairs for r in results)


def format_comparison(name: str, radii: Sequence[float], results: Sequence[Comparison]) -> str:
    """A printable block: per sigma the mean samples, the ratio and both certified-accuracy rows (%)."""
    lines = [f"== {name}", f"{'sigma':>6} {'pairs':>6} {'fixed n':>8} {'seq n':>8} {'ratio':>6}   "
             + " ".join(f"r={r:<5g}" for r in radii)]
    for r in results:
        lines.append(f"{r.sigma:>6g} {r.pairs:>6d} {r.fixed_samples:>8.0f} {r.sequential_samples:>8.0f} {r.ratio:>6.2f}x"
                     + "  fixed " + " ".join(f"{100 * a:7.2f}" for a in r.fixed_accuracy))
        lines.append(" " * 40 + "   seq " + " ".join(f"{100 * a:7.2f}" for a in r.sequential_accuracy))
        lines.append(" " * 40 + "  diff " + " ".join(f"{100 * d:7.2f}" for d in r.sequential_accuracy - r.fixed_accuracy))
    lines.append(f"overall ratio {overall_ratio(results):.2f}x; worst accuracy difference "
                 f"{100 * min(float((r.sequential_accuracy - r.fixed_accuracy).min()) for r in results):+.2f} points")
    return "\n".join(lines)


def compare_rules(pairs: dict[float, Pairs], plan: SequentialPlan, methods: bool = False,
                  seed: int = 0) -> dict[str, list[Comparison]]:
    """Fixed against, on the same count paths: the issue's plain rule, ``plan`` and (``methods``)
    the mixture confidence sequence at the plan's looks and at looks 10% apart."""
    sigmas = sorted(pairs)
    rules = {"plain rule (doubling looks, alpha/2 last, UB < next threshold)":
             lambda s: plain_rule_table(plan.n_max, plan.alpha, plan.radii, s),
             f"sequential plan ({len(plan.looks)} looks, {plan.spend[-1]:g} of alpha last, futility {plan.futility:g})":
             plan.table}
    if methods:
        fine = SequentialPlan.geometric(plan.n_max, plan.alpha, plan.radii, plan.sigmas, ratio=1.1,
                                        futility=plan.futility)
        rules["mixture confidence sequence, Beta(1/2,1/2), at the plan's looks"] = lambda s: mixture_table(plan, s, (0.5, 0.5))
        rules["mixture confidence sequence, Beta(1/2,1/2), looks 10% apart"] = lambda s: mixture_table(fine, s, (0.5, 0.5))
    return {name: [compare(pairs[s], s, plan, table(s), seed) for s in sigmas] for name, table in rules.items()}
