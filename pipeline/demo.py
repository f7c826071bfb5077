"""The demo's comparison: single sigmas, the cascade, and the cascade with the fine-tuned denoiser.

Guarantees:
* :func:`certify_demo` certifies the same test digits with the same ``smoothing.seed`` (hence
  the same noise for every (image, sigma, sample)) twice, in one Ray session: with the
  original denoiser in ``full`` mode (every sigma for every image: each single sigma and the
  cascade from one set of counts) and with the fine-tuned denoiser in ``cascade`` mode (a
  lower sigma only where the walk passes the higher ones).
* :func:`demo_results` certifies both runs with the run's own p0 / alpha / schedule: the
  single sigmas and the cascade of the original run, and the cascade of the fine-tuned run
  (method name suffixed ``FINETUNED``); :func:`samples_spent` gives the Monte Carlo samples
  (n0 + n over the counts rows) each method needs: a single sigma its rows; a cascade the rows
  of the levels its walk reaches (what a cascade-mode run draws, which for a cascade-mode run
  is every row it wrote).
* :func:`findings` states in two lines what the table shows, computed from the results (with a
  paired bootstrap interval over images for the fine-tuning's effect), nothing hard-coded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from analysis.counts import CountsTable, validate_counts
from analysis.io import resolve_run
from analysis.counts import read_counts
from analysis.plot import plot_certified_accuracy
from analysis.results import cascade_method, certify_table, concat_results, single_method
from analysis.summary import radius_column, summarize, to_markdown
from pipeline.certification import cascade_stage_outcome, walk_cascade
from pipeline.certify_run import run_certification
from pipeline.config import Config, ConfigError, load_config
from pipeline.digits import DEMO_CONFIG, DEMO_MODELS, DEMO_RADII, write_digit_shards
from pipeline.ray_runtime import ray_session

DENOISERS = {"original": "denoiser", "fine-tuned": "denoiser-finetuned"}   # folders in the models folder
FINETUNED = " fine-tuned"          # suffix of the fine-tuned denoiser's cascade method
BOOTSTRAP_DRAWS = 2000


@dataclass(frozen=True)
class DemoRuns:
    """The two runs' URIs and their configs (same data, seed and smoothing but mode and denoiser)."""
    original: str
    finetuned: str
    config: Config


def demo_configs(shards_uri: str, runs_uri: str, overrides: Sequence[str], models: Path = DEMO_MODELS
                 ) -> tuple[Config, Config]:
    """(original denoiser, mode full; fine-tuned denoiser, mode cascade) from configs/demo.yaml +
    overrides, with the classifier and the two denoisers of the ``models`` folder. ConfigError
    for sequential sampling: the single sigmas and the original cascade are read from one
    ``full``-mode run, and a sequential full-mode run stops each sigma for its own radii, not for
    the cascade's decisions (pipeline.sequential.SequentialPlan.uncovered)."""
    common = [f"data.uri={shards_uri}", f"models.classifier.uri={models / 'classifier.safetensors'}",
              f"output.uri={runs_uri}"]
    original = load_config(str(DEMO_CONFIG), [
        *common, f"models.denoiser.uri={models / DENOISERS['original']}", *overrides, "smoothing.mode=full"])
    if original.smoothing["sampling"] != "fixed":
        raise ConfigError(f"smoothing.sampling: the demo reads the single sigmas and the cascade from one full-mode "
                          f"run, which needs fixed sampling, got {original.smoothing['sampling']!r}")
    finetuned = load_config(str(DEMO_CONFIG), [
        *common, f"models.denoiser.uri={models / DENOISERS['fine-tuned']}", *overrides, "smoothing.mode=cascade",
        f"output.run_id={original.output['run_id']}-finetuned"])
    return original, finetuned


def certify_demo(work_dir: Path, overrides: Sequence[str], num_cpus: int | None, models: Path = DEMO_MODELS
                 ) -> DemoRuns:
    """Write the test shards under ``work_dir`` and certify them with both denoisers (one Ray session)."""
    shards = write_digit_shards("test", work_dir / "images", work_dir / "shards", shard_size=120)
    original, finetuned = demo_configs(shards, (work_dir / "runs").as_uri(), overrides, models)
    with ray_session(num_cpus, log_to_driver=False):
        runs = [run_certification(cfg)["run"] for cfg in (original, finetuned)]
    return DemoRuns(runs[0], runs[1], original)


def load_run_counts(run_uri: str) -> CountsTable:
    return validate_counts(read_counts(resolve_run(run_uri)))


def demo_results(original: CountsTable, finetuned: CountsTable, smoothing: dict) -> pd.DataFrame:
    """Each single sigma and the cascade from ``original``; the cascade from ``finetuned`` (renamed)."""
    settings = dict(alpha=smoothing["alpha"], p0=smoothing["p0"], schedule=smoothing["schedule"])
    sigmas = list(smoothing["sigmas"])
    base = certify_table(original, sigmas=sigmas, cascades=[sigmas], **settings)
    tuned = certify_table(finetuned, sigmas=[], cascades=[sigmas], **settings)
    tuned["method"] = tuned["method"].cat.rename_categories(lambda method: method + FINETUNED)
    return concat_results([base, tuned])


def cascade_rows(counts: CountsTable, sigmas: Sequence[float], alpha: float, p0: float, schedule: str) -> np.ndarray:
    """Indices of the counts rows a cascade over ``sigmas`` reads: each image's rows at the levels
    its walk reaches (from the highest sigma down to where it fired, abstained or ran out)."""
    levels = sorted(sigmas, reverse=True)
    row = np.full((len(levels), len(counts.image_ids)), -1, dtype=np.int64)
    for stage, sigma in enumerate(levels):
        rows = np.flatnonzero(np.isclose(counts.sigma, sigma))
        row[stage, counts.image[rows]] = rows
    walk = walk_cascade(len(counts.image_ids), len(levels), lambda stage, images: cascade_stage_outcome(
        stage, len(levels), counts.counts0.take(row[stage, images]), counts.counts.take(row[stage, images]),
        alpha, p0, schedule), schedule)
    reached = row[np.arange(len(levels))[:, None] <= walk.stage[None, :]]
    if (reached < 0).any():
        raise ValueError("the counts lack a row the cascade reaches (another p0 / alpha / schedule than sampled?)")
    return reached


def samples_spent(original: CountsTable, finetuned: CountsTable, smoothing: dict) -> dict[str, int]:
    """Monte Carlo samples (n0 + n summed over rows) per method of :func:`demo_results`."""
    def total(counts: CountsTable, rows: np.ndarray) -> int:
        return int(counts.counts0.totals()[rows].sum() + counts.counts.totals()[rows].sum())

    settings = (smoothing["alpha"], smoothing["p0"], smoothing["schedule"])
    sigmas = list(smoothing["sigmas"])
    spent = {single_method(s): total(original, np.flatnonzero(np.isclose(original.sigma, s))) for s in sigmas}
    spent[cascade_method(sigmas)] = total(original, cascade_rows(original, sigmas, *settings))
    spent[cascade_method(sigmas) + FINETUNED] = total(finetuned, cascade_rows(finetuned, sigmas, *settings))
    return spent


def with_samples_column(markdown: str, spent: dict[str, int], methods: Sequence[str]) -> str:
    """``markdown`` (analysis.summary.to_markdown, rows in ``methods`` order) with a Samples column."""
    lines = markdown.split("\n")
    lines[0] += " Samples |"
    lines[1] += "---:|"
    for i, method in enumerate(methods):
        lines[2 + i] += f" {spent[method]:,} |"
    return "\n".join(lines)


def certified_at(results: pd.DataFrame, method: str, r: float) -> np.ndarray:
    """Per image (sorted by image_id): certified correctly at radius ``r`` (bool)."""
    rows = results[results["method"].astype(str) == method].sort_values("image_id")
    return (rows["correct"] & (rows["radius"] >= r)).to_numpy(dtype=bool)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of mean(b) - mean(a) over images resampled with replacement (paired)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(draws, a.size))
    diffs = b[idx].mean(1) - a[idx].mean(1)
    return float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))


def large_radius(summary: pd.DataFrame, sigmas: Sequence[float], radii: Sequence[float]) -> float:
    """The largest of ``radii`` where the highest sigma alone certifies anything (else the smallest radius)."""
    top = summary.set_index("method").loc[single_method(max(sigmas))]
    hits = [r for r in radii if top[radius_column(r)] > 0]
    return max(hits) if hits else min(radii)


def findings(results: pd.DataFrame, sigmas: Sequence[float], radii: Sequence[float]) -> tuple[str, str]:
    """Two lines: the single sigmas' trade-off, then the cascades against it (fine-tuned vs original)."""
    summary = summarize(results, radii).set_index("method")
    acc = lambda method, r: 100 * float(summary.loc[method, radius_column(r)])  # noqa: E731
    low, high = single_method(min(sigmas)), single_method(max(sigmas))
    singles = [single_method(s) for s in sorted(sigmas)]
    best0 = max(singles, key=lambda m: acc(m, 0.0))
    far = large_radius(summary.reset_index(), sigmas, radii)
    cascade = cascade_method(sigmas)
    tuned = cascade + FINETUNED
    line1 = (f"No single sigma wins everywhere: at r = 0 {low} certifies {acc(low, 0):.1f}% and {high} "
             f"{acc(high, 0):.1f}%; at r = {far:g} {high} certifies {acc(high, far):.1f}% and {low} "
             f"{acc(low, far):.1f}%.")
    parts = []
    for r, ref in ((0.0, best0), (far, high)):
        lo, hi = paired_bootstrap(certified_at(results, cascade, r), certified_at(results, tuned, r))
        parts.append(f"at r = {r:g} {acc(tuned, r):.1f}% vs {acc(cascade, r):.1f}% (best single {ref}: "
                     f"{acc(ref, r):.1f}%; fine-tuned - original, 95% paired bootstrap over images: "
                     f"[{100 * lo:+.1f}, {100 * hi:+.1f}] points)")
    line2 = "The cascade with the fine-tuned denoiser against the original one: " + "; ".join(parts) + "."
    return line1, line2


@dataclass(frozen=True)
class DemoReport:
    table: str
    findings: tuple[str, str]
    results: pd.DataFrame
    plot: bytes


def demo_report(runs: DemoRuns, radii: Sequence[float] = DEMO_RADII) -> DemoReport:
    """The table (certified accuracy, ACR, samples), the two findings and the plot of both runs."""
    original, finetuned = load_run_counts(runs.original), load_run_counts(runs.finetuned)
    smoothing = runs.config.smoothing
    results = demo_results(original, finetuned, smoothing)
    summary = summarize(results, radii)
    table = with_samples_column(to_markdown(summary, radii), samples_spent(original, finetuned, smoothing),
                                summary["method"].tolist())
    sigmas = smoothing["sigmas"]
    title = (f"digits {runs.config.data['resolution']}x{runs.config.data['resolution']}, "
             f"n0={smoothing['n0']}, n={smoothing['n']}, alpha={smoothing['alpha']}, p0={smoothing['p0']} "
             f"({smoothing['schedule']})")
    plot = plot_certified_accuracy(results, title=title)
    return DemoReport(table, findings(results, sigmas, radii), results, plot)
