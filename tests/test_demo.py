"""The demo end to end on a reduced setting: real digits, the committed models, Ray.

``python -m jobs.demo``'s main on the session's local Ray: 20 test images (every 18th, in
class-folder order: about two per class), n0=8, n=32. The counts must be the split's images and
labels; every single-sigma certificate must equal an independent CERTIFY (scipy's exact
binomial bound) recomputed from the counts Parquet; the committed models must certify the
digits at sigma = 0.25. Then the same demo, smaller, submitted with ``ray job submit`` to a
``ray start --head`` cluster (a cluster address set: the job must connect, not start its own).
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from conftest import submit_ray_job
from jobs.demo import main
from pipeline.digits import digits_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGMAS = {0.25, 0.5, 1.0}
N0, N = 8, 32
ALPHA = 0.001  # configs/demo.yaml's
RUN_ID = "digits-demo"
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def demo_run(ray_local, tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    overrides = ["data.selection.every=18", f"smoothing.n0={N0}", f"smoothing.n={N}", "compute.log_every=10"]
    assert main(["--work-dir", str(work), *(f"--set={o}" for o in overrides)]) == 0
    return work


def read_counts(work) -> pd.DataFrame:
    return pd.read_parquet(work / "runs" / RUN_ID / "counts")


def test_counts_table_has_one_row_per_image_and_sigma(demo_run):
    counts = read_counts(demo_run)
    assert len(counts) == 20 * len(SIGMAS)
    assert set(counts["sigma"]) == SIGMAS
    assert not counts.duplicated(["image_id", "sigma"]).any()
    assert (counts["n0"] == N0).all() and (counts["n"] == N).all()
    assert [sum(v) for v in counts["counts0_values"]] == [N0] * len(counts)
    assert [sum(v) for v in counts["counts_values"]] == [N] * len(counts)
    assert (counts["num_classes"] == 10).all()
    # Labels come from the class folders via the shard writer; they must be the split's labels.
    images, labels = digits_split()["test"]
    index = counts["image_id"].str.removeprefix("digit_").astype(int)
    np.testing.assert_array_equal(counts["label"].to_numpy(), labels[index])
    assert counts["label"].nunique() >= 9                                      # spread over the classes


def independent_certify(counts0: dict[int, int], counts: dict[int, int], n: int, sigma: float) -> tuple[int, float]:
    """Cohen et al.'s CERTIFY from scratch: c = argmax counts0 (ties: smallest class), one-sided
    (1 - alpha) Clopper-Pearson lower bound of counts[c] / n via scipy's exact binomial test."""
    top = max(counts0.values())
    c = min(k for k, v in counts0.items() if v == top)
    k = counts.get(c, 0)
    lower = stats.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * ALPHA, method="exact").low
    return (c, sigma * stats.norm.ppf(lower)) if lower >= 0.5 else (-1, 0.0)


def test_single_sigma_certificates_match_an_independent_certify(demo_run):
    counts = read_counts(demo_run)
    results = pd.read_parquet(demo_run / "aggregate" / "results.parquet").set_index(["method", "image_id"])
    for row in counts.itertuples():
        pred, radius = independent_certify(dict(zip(row.counts0_classes, row.counts0_values)),
                                           dict(zip(row.counts_classes, row.counts_values)), row.n, row.sigma)
        got = results.loc[(f"sigma={row.sigma}", row.image_id)]
        assert got["pred"] == pred, row.image_id
        assert got["radius"] == pytest.approx(radius, rel=1e-9, abs=1e-12), row.image_id
        assert got["correct"] == (pred == row.label)


def test_committed_models_certify_the_digits(demo_run):
    results = pd.read_parquet(demo_run / "aggregate" / "results.parquet")
    assert results.groupby("method").size().to_dict() == {"sigma=0.25": 20, "sigma=0.5": 20, "sigma=1.0": 20,
                                                          "cascade(0.25,0.5,1.0)": 20}
    certified = results[results["radius"] > 0].groupby("method")["correct"].sum() / 20  # certified accuracy at r=0
    assert certified["sigma=0.25"] >= 0.8 and certified["sigma=0.5"] >= 0.8  # chance is 0.1
    per_image = results.drop_duplicates("image_id")
    assert (per_image["pred_clean"] == per_image["label"]).mean() >= 0.8
    assert (demo_run / "aggregate" / "certified_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (demo_run / "aggregate" / "summary.md").read_text()
    assert "| Method |" in summary and "cascade" in summary


def test_demo_runs_as_a_submitted_ray_job(ray_head, tmp_path):
    """Under ``ray job submit`` RAY_ADDRESS is set: the demo must use that cluster, not start one."""
    address, env = ray_head
    work = tmp_path / "submitted"
    out = submit_ray_job(address, env, ["python", "-m", "jobs.demo", "--work-dir", str(work),
                                        "--set", "data.selection.every=90", "--set", "smoothing.n0=4",
                                        "--set", "smoothing.n=16", "--set", "compute.log_every=4"], cwd=REPO)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "| sigma=0.25 |" in out.stdout and "succeeded" in out.stdout
    counts = read_counts(work)
    assert len(counts) == 4 * len(SIGMAS) and (counts["n"] == 16).all()
    assert len(pd.read_parquet(work / "aggregate" / "results.parquet")) == 4 * 4
