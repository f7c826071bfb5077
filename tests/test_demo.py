"""The demo end to end on a reduced setting: real digits, the committed models, Ray.

``python -m jobs.demo``'s main on the session's local Ray: 20 test images (every 18th, in
class-folder order: about two per class), n0=8, n=32, both denoisers. The counts must be the
split's images and labels; every single-sigma certificate must equal an independent CERTIFY
(scipy's exact binomial bound) recomputed from the counts Parquet; the samples column must be
the counts' n0 + n sums, and the original cascade's must be what a cascade-mode run with the
original denoiser actually draws; the committed fine-tuned denoiser must load and differ from
the original. Then the same demo, smaller, submitted with ``ray job submit`` to a
``ray start --head`` cluster (a cluster address set: the job must connect, not start its own).
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file
from scipy import stats

from conftest import REPO, submit_ray_job
from jobs.demo import main
from pipeline.certify_run import run_certification
from pipeline.config import ConfigError, load_config
from pipeline.demo import DENOISERS, demo_configs
from pipeline.digits import DEMO_CONFIG, DEMO_MODELS, digits_split

SIGMAS = {0.25, 0.5, 1.5}
N0, N = 8, 32
ALPHA = 0.001  # configs/demo.yaml's
RUN_ID = "digits-demo"
CASCADE = "cascade(0.25,0.5,1.5)"
OVERRIDES = ["data.selection.every=18", f"smoothing.n0={N0}", f"smoothing.n={N}", "compute.log_every=10"]
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def demo_output(ray_local, tmp_path_factory):
    """(work dir, stdout) of the demo's main on the reduced setting."""
    import contextlib
    import io

    work = tmp_path_factory.mktemp("demo")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--work-dir", str(work), *(f"--set={o}" for o in OVERRIDES)]) == 0
    return work, out.getvalue()


def read_counts(work, run_id: str = RUN_ID) -> pd.DataFrame:
    return pd.read_parquet(work / "runs" / run_id / "counts")


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The printed markdown table: method -> its cells (without the method)."""
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith("| Method"):
            cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_counts_table_has_one_row_per_image_and_sigma(demo_output):
    work, _ = demo_output
    counts = read_counts(work)
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
    # The fine-tuned run (cascade mode): every image at the highest sigma, lower ones only below it.
    tuned = read_counts(work, f"{RUN_ID}-finetuned")
    assert set(tuned.loc[tuned["sigma"] == 1.5, "image_id"]) == set(counts["image_id"])
    per_image = tuned.groupby("image_id")["sigma"].apply(lambda s: sorted(s, reverse=True))
    assert all(s == [1.5, 0.5, 0.25][:len(s)] for s in per_image)


def independent_certify(counts0: dict[int, int], counts: dict[int, int], n: int, sigma: float) -> tuple[int, float]:
    """Cohen et al.'s CERTIFY from scratch: c = argmax counts0 (ties: smallest class), one-sided
    (1 - alpha) Clopper-Pearson lower bound of counts[c] / n via scipy's exact binomial test."""
    top = max(counts0.values())
    c = min(k for k, v in counts0.items() if v == top)
    k = counts.get(c, 0)
    lower = stats.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * ALPHA, method="exact").low
    return (c, sigma * stats.norm.ppf(lower)) if lower >= 0.5 else (-1, 0.0)


def test_single_sigma_certificates_match_an_independent_certify(demo_output):
    work, _ = demo_output
    counts = read_counts(work)
    results = pd.read_parquet(work / "results.parquet").set_index(["method", "image_id"])
    for row in counts.itertuples():
        pred, radius = independent_certify(dict(zip(row.counts0_classes, row.counts0_values)),
                                           dict(zip(row.counts_classes, row.counts_values)), row.n, row.sigma)
        got = results.loc[(f"sigma={row.sigma}", row.image_id)]
        assert got["pred"] == pred, row.image_id
        assert got["radius"] == pytest.approx(radius, rel=1e-9, abs=1e-12), row.image_id
        assert got["correct"] == (pred == row.label)


def test_table_rows_and_samples_spent(demo_output, tmp_path):
    work, stdout = demo_output
    rows = table_rows(stdout)
    assert list(rows) == ["sigma=0.25", "sigma=0.5", "sigma=1.5", CASCADE, f"{CASCADE} fine-tuned"]
    samples = {method: int(cells[-1].replace(",", "")) for method, cells in rows.items()}
    for sigma in SIGMAS:
        assert samples[f"sigma={sigma}"] == 20 * (N0 + N)
    tuned = read_counts(work, f"{RUN_ID}-finetuned")
    assert samples[f"{CASCADE} fine-tuned"] == int((tuned["n0"] + tuned["n"]).sum())
    # The original cascade's samples, computed from the full-mode counts, must be what the pipeline's
    # cascade mode draws with the original denoiser on the same images and noise.
    cfg = load_config(str(DEMO_CONFIG), [
        f"data.uri={(work / 'shards').as_uri()}", f"models.denoiser.uri={DEMO_MODELS / DENOISERS['original']}",
        f"models.classifier.uri={DEMO_MODELS / 'classifier.safetensors'}", f"output.uri={tmp_path.as_uri()}",
        *OVERRIDES, "smoothing.mode=cascade", "output.run_id=original-cascade"])
    run_certification(cfg)
    sampled = pd.read_parquet(tmp_path / "original-cascade" / "counts")
    assert samples[CASCADE] == int((sampled["n0"] + sampled["n"]).sum())
    assert 20 * (N0 + N) <= samples[CASCADE] <= 60 * (N0 + N)


def test_findings_and_plot_follow_the_results(demo_output):
    work, stdout = demo_output
    results = pd.read_parquet(work / "results.parquet")
    at0 = results[results["radius"] > 0].groupby("method", observed=True)["correct"].sum() / 20
    line1 = next(line for line in stdout.splitlines() if line.startswith("No single sigma"))
    assert f"sigma=0.25 certifies {100 * at0.get('sigma=0.25', 0):.1f}%" in line1
    line2 = next(line for line in stdout.splitlines() if line.startswith("The cascade with the fine-tuned"))
    assert len(re.findall(r"95% paired bootstrap", line2)) == 2
    assert (work / "certified_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_committed_models_certify_the_digits(demo_output):
    work, _ = demo_output
    results = pd.read_parquet(work / "results.parquet")
    assert results.groupby("method", observed=True).size().to_dict() == {
        "sigma=0.25": 20, "sigma=0.5": 20, "sigma=1.5": 20, CASCADE: 20, f"{CASCADE} fine-tuned": 20}
    certified = results[results["radius"] > 0].groupby("method", observed=True)["correct"].sum() / 20
    assert certified["sigma=0.25"] >= 0.8 and certified["sigma=0.5"] >= 0.8  # chance is 0.1
    per_image = results.drop_duplicates("image_id")
    assert (per_image["pred_clean"] == per_image["label"]).mean() >= 0.8


def test_finetuned_denoiser_loads_and_differs_from_the_original():
    original, tuned = (load_file(str(DEMO_MODELS / DENOISERS[k] / "unet" / "diffusion_pytorch_model.safetensors"))
                       for k in ("original", "fine-tuned"))
    assert original.keys() == tuned.keys()
    assert all(tuned[k].dtype == original[k].dtype and tuned[k].shape == original[k].shape for k in original)
    changed = [k for k in original if not (original[k] == tuned[k]).all()]
    assert len(changed) > len(original) // 2                    # fine-tuning moved most tensors


def test_sequential_sampling_is_refused_naming_the_key(tmp_path):
    """The demo's single sigmas and original cascade come from one full-mode run: sequential
    counts of that run do not certify a cascade, so the demo refuses before certifying anything."""
    with pytest.raises(ConfigError, match=r"^smoothing.sampling: .*fixed sampling, got 'sequential'"):
        demo_configs(tmp_path.as_uri(), (tmp_path / "runs").as_uri(), ["smoothing.sampling=sequential"])


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
    assert len(pd.read_parquet(work / "results.parquet")) == 4 * 5
