"""The demo end to end on a reduced setting: real digits, the committed models, the local Ray.

20 test images (every 18th, in class-folder order: about two per class), n0=8, n=32. Checks shapes and sanity, not numbers.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from jobs import demo
from jobs.train_demo import digits_split

SIGMAS = {0.25, 0.5, 1.0}
N0, N = 8, 32
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def demo_run(ray_local, tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    overrides = ["data.selection.every=18", f"smoothing.n0={N0}", f"smoothing.n={N}", "compute.log_every=10"]
    return work, demo.run_demo(work, overrides)


def test_counts_table_has_one_row_per_image_and_sigma(demo_run):
    _, paths = demo_run
    counts = pd.read_parquet(paths["counts"].removeprefix("file://"))
    assert len(counts) == 20 * len(SIGMAS)
    assert set(counts["sigma"]) == SIGMAS
    assert not counts.duplicated(["image_id", "sigma"]).any()
    assert (counts["n0"] == N0).all() and (counts["n"] == N).all()
    assert [sum(v) for v in counts["counts0_values"]] == [N0] * len(counts)
    assert [sum(v) for v in counts["counts_values"]] == [N] * len(counts)
    assert (counts["num_classes"] == 10).all()
    # Labels come from the class folders via make_shards; they must be the split's labels.
    images, labels = digits_split()["test"]
    index = counts["image_id"].str.removeprefix("digit_").astype(int)
    np.testing.assert_array_equal(counts["label"].to_numpy(), labels[index])
    assert counts["label"].nunique() >= 9                                      # spread over the classes


def test_results_are_sane(demo_run):
    work, paths = demo_run
    results = pd.read_parquet(paths["results"])
    methods = set(results["method"])
    assert len(methods) == 4 and any(m.startswith("cascade") for m in methods)
    assert results.groupby("method").size().eq(20).all()
    assert (results["radius"] >= 0).all()
    accuracy = results.groupby("method")["correct"].mean()
    assert accuracy.between(0, 1).all()
    per_image = results.drop_duplicates("image_id")
    assert (per_image["pred_clean"] == per_image["label"]).mean() >= 0.8     # chance is 0.1
    assert accuracy["sigma=0.25"] >= 0.5
    with open(paths["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = (work / "aggregate" / "summary.md").read_text()
    assert "| Method |" in summary and "cascade" in summary
