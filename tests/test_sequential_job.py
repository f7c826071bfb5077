"""Sequential certification end to end: the certify run on a local Ray with tiny random-weight
models, then the aggregation recomputing every certificate from the table and the manifest's plan.

Checks that can fail: every row's n is a look of the plan and its ``look`` names it; the counts of
each pair equal the fixed path's at that n (the same noise); the aggregation accepts every row
(it refuses rows the plan would not have stopped) and refuses a re-analysis the plan does not
cover; full and cascade modes.
"""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from analysis.report import render_report
from pipeline.certify_run import run_certification
from pipeline.images import resize_image, to_float_chw
from pipeline.models.factory import create_denoise_classify
from pipeline.run_dir import RunDirectory
from pipeline.sampling import MonteCarloSampler
from pipeline.sequential import SequentialError, SequentialPlan, top_looks
from pipeline.shards import list_shards
from tests.test_certify_job import bucket, images, make_config, models, read_dir, shards  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow
SEQUENTIAL = ["smoothing.sampling=sequential", "smoothing.n=64", "smoothing.n0=4",
              "smoothing.sequential={first_look: 8, look_ratio: 2.0, final_share: 0.5, futility: 0.2}",
              "smoothing.alpha=0.05", "data.selection.limit=6"]


def run(models, bucket, run_id, *extra):
    cfg = make_config(models, bucket, run_id, *SEQUENTIAL, *extra)
    run_certification(cfg)
    store = RunDirectory(cfg.output["uri"], run_id)
    return cfg, store, read_dir(store, store.counts_dir).to_pandas()


@pytest.mark.parametrize("mode, schedule", [("full", "bonferroni"), ("cascade", "bonferroni"),
                                            ("cascade", "bonferroni-fallthrough")])
def test_sequential_rows_are_the_plans_and_the_aggregation_recomputes_them(ray_local, models, bucket, shards, mode,
                                                                           schedule):
    cfg, store, rows = run(models, bucket, f"seq-{mode}-{schedule}", f"smoothing.mode={mode}",
                           f"smoothing.schedule={schedule}")
    plan = SequentialPlan.from_dict(store.read_manifest()["sequential_plan"])
    top = top_looks(64, 0.05, plan.radii, plan.sigmas, 0.2)  # the config's default top_share
    assert plan.looks == tuple(sorted({8, 16, 32, *top})) + (64,) and plan.mode == mode
    assert plan.schedule == schedule
    assert (rows["n"] == np.asarray(plan.looks)[rows["look"]]).all()
    assert (rows["n"] < 64).any(), "some pair should stop before n_max (random models: futility)"
    if mode == "full":
        assert len(rows) == 6 * 2
    report = render_report(store.uri())
    results = pd.read_parquet(io.BytesIO(report.files["results.parquet"]))
    assert results["image_id"].nunique() == 6 and results["method"].str.endswith("[grid radii]").all()
    with pytest.raises(SequentialError, match="alpha"):
        render_report(store.uri(), alpha=0.01)


def test_sequential_counts_are_the_fixed_paths_at_each_stopping_point(ray_local, models, bucket, shards):
    cfg, store, rows = run(models, bucket, "seq-identity")
    model = create_denoise_classify(cfg.models["denoiser"], cfg.models["classifier"], resolution=cfg.data["resolution"])
    settings = store.read_manifest()["device_settings"]
    sampler = MonteCarloSampler(model, settings["batch_size"], settings["dtype"], "cpu", False, settings["channels_last"])
    fs, paths = list_shards(cfg.data["uri"], "parquet")
    decoded = {}
    for path in paths:
        with fs.open(path, "rb") as f:
            for record in pq.read_table(f).to_pylist():
                if record["image_id"] in set(rows["image_id"]):
                    decoded[record["image_id"]] = resize_image(record["image"], cfg.data["resolution"],
                                                               cfg.data["resize"], cfg.data["crop"],
                                                               cfg.data["interpolation"])
    for row in rows.itertuples():
        x = to_float_chw(decoded[row.image_id][None])
        fixed = sampler.sample(x, [row.image_id], [row.sigma], cfg.smoothing["n0"], int(row.n), cfg.smoothing["seed"])
        got = np.zeros(fixed.counts.shape[-1], dtype=np.int64)
        got[np.asarray(row.counts_classes, dtype=np.int64)] = row.counts_values
        np.testing.assert_array_equal(got, fixed.counts[0, 0])
