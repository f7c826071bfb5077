"""Tidy per-image results against the scalar certify / certify_cascade, image by image."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from analysis import (
    RESULT_COLUMNS,
    CountsError,
    cascade_method,
    certify_table,
    concat_results,
    single_method,
    summarize,
)
from analysis.synthetic import synthetic_counts
from pipeline.certification import FIRE, UNDECIDED, SparseCounts, cascade_stage_outcome, certify, certify_cascade
from pipeline.schedules import FALLTHROUGH, SCHEDULES

C = 10
ALPHA = 0.05


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return synthetic_counts(60, (0.25, 0.5, 1.0), num_classes=C, n0=20, n=150, seed=11)


def dense_rows(table: pa.Table) -> dict[tuple[str, float], dict]:
    """(image_id, sigma) -> row with dense counts0 / counts vectors, built from Python lists."""
    out = {}
    for row in table.to_pylist():
        for prefix in ("counts0", "counts"):
            dense = np.zeros(row["num_classes"], dtype=np.int64)
            dense[row[f"{prefix}_classes"]] = row[f"{prefix}_values"]
            row[prefix] = dense
        out[row["image_id"], row["sigma"]] = row
    return out


def by_image(results: pd.DataFrame, method: str) -> pd.DataFrame:
    return results[results["method"] == method].set_index("image_id")


def test_single_sigmas_match_scalar_certify(table):
    results = certify_table(table.take(np.random.default_rng(0).permutation(table.num_rows)), cascades=[], alpha=ALPHA)
    assert list(results.columns) == list(RESULT_COLUMNS)
    rows = dense_rows(table)
    for sigma in (0.25, 0.5, 1.0):
        got = by_image(results, single_method(sigma))
        assert len(got) == 60 and got.index.is_monotonic_increasing
        for (image_id, s), row in rows.items():
            if s != sigma:
                continue
            pred, radius = certify(row["counts0"], row["counts"], sigma, ALPHA)
            r = got.loc[image_id]
            assert (r["pred"], r["label"], r["pred_clean"]) == (pred, row["label"], row["pred_clean"])
            assert r["radius"] == pytest.approx(radius, rel=1e-12, abs=1e-15)
            assert r["correct"] == (pred == row["label"])
            assert (r["fired_sigma"] == sigma) if pred >= 0 else np.isnan(r["fired_sigma"])
    # the table exercises both outcomes
    assert 0 < (results["pred"] == -1).mean() < 0.9


@pytest.mark.parametrize("schedule,p0", [("bonferroni", 0.5), ("paper", 0.5), ("bonferroni", 0.6), ("paper", 0.7),
                                        (FALLTHROUGH, 0.5), (FALLTHROUGH, 0.6)])
def test_cascades_match_scalar_certify_cascade(table, schedule, p0):
    subsets = [[0.25, 0.5, 1.0], [1.0, 0.25]]
    results = certify_table(table, sigmas=[0.5], cascades=subsets, p0=p0, alpha=ALPHA, schedule=schedule)
    assert list(results["method"].cat.categories) == ["sigma=0.5", "cascade(0.25,0.5,1.0)", "cascade(0.25,1.0)"]
    rows = dense_rows(table)
    fired_levels = set()
    for subset in subsets:
        got = by_image(results, cascade_method(subset))
        assert len(got) == 60 and got.index.is_monotonic_increasing
        for image_id, r in got.iterrows():
            levels = [(s, rows[image_id, s]["counts0"], rows[image_id, s]["counts"]) for s in subset]
            pred, radius, fired = certify_cascade(levels, ALPHA, p0=p0, schedule=schedule)
            assert r["pred"] == pred
            assert r["radius"] == pytest.approx(radius, rel=1e-12, abs=1e-15)
            assert np.isnan(r["fired_sigma"]) if np.isnan(fired) else r["fired_sigma"] == fired
            fired_levels.add(fired if pred >= 0 else -1.0)
    assert {-1.0, 1.0, 0.5} <= fired_levels  # abstentions and fires at more than one level


def cascade_mode(table: pa.Table, schedule: str, p0: float = 0.5) -> pa.Table:
    """The rows a cascade-mode run writes: highest sigma first, lower ones only after a fall-through
    (or, under bonferroni-fallthrough, an undecided level)."""
    rows, keep = dense_rows(table), set()
    for image_id in dict.fromkeys(table["image_id"].to_pylist()):
        for stage, sigma in enumerate((1.0, 0.5, 0.25)):
            keep.add((image_id, sigma))
            row = rows[image_id, sigma]
            outcome = cascade_stage_outcome(stage, 3, SparseCounts.from_dense(row["counts0"][None]),
                                            SparseCounts.from_dense(row["counts"][None]), ALPHA, p0, schedule)
            if outcome[0] == FIRE or (outcome[0] == UNDECIDED and schedule != FALLTHROUGH):
                break
    mask = [key in keep for key in zip(table["image_id"].to_pylist(), table["sigma"].to_pylist())]
    return table.filter(pa.array(mask))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cascade_mode_tables_give_the_full_tables_cascade(table, schedule):
    full = certify_table(table, alpha=ALPHA, schedule=schedule)
    method = cascade_method([0.25, 0.5, 1.0])
    cascade = by_image(full, method)
    partial_table = cascade_mode(table, schedule)
    assert partial_table.num_rows < table.num_rows - 20
    partial = certify_table(partial_table, alpha=ALPHA, schedule=schedule)
    pd.testing.assert_frame_equal(by_image(partial, method), cascade)
    summary = summarize(partial).set_index("method")
    has_row = {s: len(set(partial_table.filter(pa.compute.equal(partial_table["sigma"], s))["image_id"].to_pylist()))
               for s in (0.25, 0.5, 1.0)}
    assert summary["n_images"].to_dict() == {single_method(s): k for s, k in has_row.items()} | {method: 60}
    assert has_row[0.25] < has_row[0.5] < has_row[1.0] == 60


def without(table: pa.Table, image_id: str, sigma: float) -> pa.Table:
    drop = (table["image_id"].to_numpy(zero_copy_only=False) == image_id) & (table["sigma"].to_numpy() == sigma)
    assert drop.sum() == 1
    return table.filter(pa.array(~drop))


def test_cascade_needing_a_missing_level_names_the_image(table):
    full = by_image(certify_table(table, alpha=ALPHA), cascade_method([0.25, 0.5, 1.0]))
    partial = cascade_mode(table, "bonferroni")
    victim = full.index[full["fired_sigma"] == 0.25][0]  # reached the lowest level
    with pytest.raises(CountsError, match=rf"image_id='{victim}' has no row at sigma=0.25.*no higher level stopped it"):
        certify_table(without(partial, victim, 0.25), alpha=ALPHA)
    top_missing = without(partial, "img0", 1.0)
    with pytest.raises(CountsError, match=r"image_id='img0' has no row at sigma=1.0.*top level"):
        certify_table(top_missing, alpha=ALPHA)
    # single sigmas need no other level
    singles = certify_table(top_missing, cascades=[], alpha=ALPHA)
    assert (singles["method"] == single_method(1.0)).sum() == 59


def test_sigma_selection(table):
    results = certify_table(table, sigmas=[0.5000000000001, 1.0], alpha=ALPHA)
    assert list(results["method"].cat.categories) == ["sigma=0.5", "sigma=1.0", "cascade(0.5,1.0)"]
    with pytest.raises(ValueError, match="sigma=0.3 has no rows"):
        certify_table(table, sigmas=[0.3])
    one = certify_table(table, sigmas=[0.25])
    assert list(one["method"].cat.categories) == ["sigma=0.25"]
    same = certify_table(table, sigmas=[], cascades=[[0.5, 1.0], [1.0, 0.5]])
    assert list(same["method"].cat.categories) == ["cascade(0.5,1.0)"] and len(same) == 60
    with pytest.raises(ValueError, match="nothing to certify"):
        certify_table(table, sigmas=[], cascades=[])
    with pytest.raises(ValueError, match=r"\['sigma=0.25'\] appear in more than one"):
        concat_results([one, same, one])
