"""MonteCarloSampler.sample_sequential: full fixed-shape batches, counts identical to the fixed
path at every pair's stopping point, invariant to batch size and image split, host syncs per look."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.sampling import MonteCarloSampler
from tests.test_sampling import IDS, SIGMAS, SyncCounter, images, model  # noqa: F401 (fixtures)

torch.set_num_threads(1)

LOOKS = [6, 12, 20]


def never(j, counts0, counts, n):
    return np.zeros(len(n), dtype=bool)


def unanimous(j, counts0, counts, n):
    """A data-dependent rule: stop a pair once its top estimation class holds >= 2/3 of the samples."""
    return counts.max(axis=1) * 3 >= 2 * n


def test_never_stopping_equals_the_fixed_path(model, images):
    sampler = MonteCarloSampler(model, batch_size=7, device="cpu")
    fixed = sampler.sample(images, IDS, SIGMAS, n0=5, n=20, seed=3)
    seq = sampler.sample_sequential(images, IDS, SIGMAS, 5, LOOKS, never, seed=3)
    np.testing.assert_array_equal(seq.counts0, fixed.counts0)
    np.testing.assert_array_equal(seq.counts, fixed.counts)
    np.testing.assert_array_equal(seq.pred_clean, fixed.pred_clean)
    np.testing.assert_array_equal(seq.timesteps, fixed.timesteps)
    assert (seq.n == 20).all() and (seq.stopped_look == len(LOOKS) - 1).all()


def test_each_pair_holds_the_fixed_counts_at_its_stopping_point(model, images):
    sampler = MonteCarloSampler(model, batch_size=5, device="cpu")
    seq = sampler.sample_sequential(images, IDS, SIGMAS, 5, LOOKS, unanimous, seed=3)
    assert (seq.counts.sum(-1) == seq.n).all() and (seq.counts0.sum(-1) == 5).all()
    np.testing.assert_array_equal(seq.n, np.asarray(LOOKS)[seq.stopped_look])
    assert len(np.unique(seq.n)) > 1, "the rule should stop pairs at different looks"
    for i, image_id in enumerate(IDS):
        for s, sigma in enumerate(SIGMAS):
            fixed = sampler.sample(images[i:i + 1], [image_id], [sigma], n0=5, n=int(seq.n[i, s]), seed=3)
            np.testing.assert_array_equal(seq.counts[i, s], fixed.counts[0, 0])
            np.testing.assert_array_equal(seq.counts0[i, s], fixed.counts0[0, 0])
            if seq.stopped_look[i, s] < len(LOOKS) - 1:
                assert unanimous(0, None, fixed.counts[0], fixed.counts[0].sum(-1, keepdims=True))[0]


def test_invariant_to_batch_size_and_image_split(model, images):
    runs = [MonteCarloSampler(model, batch_size=b, device="cpu").sample_sequential(
        images, IDS, SIGMAS, 5, LOOKS, unanimous, seed=3) for b in (4, 64)]
    split = [MonteCarloSampler(model, batch_size=9, device="cpu").sample_sequential(
        images[i:i + 1], IDS[i:i + 1], SIGMAS, 5, LOOKS, unanimous, seed=3) for i in range(3)]
    for name in ("counts0", "counts", "n", "stopped_look"):
        np.testing.assert_array_equal(getattr(runs[0], name), getattr(runs[1], name))
        np.testing.assert_array_equal(getattr(runs[0], name), np.concatenate([getattr(r, name) for r in split]))


def test_host_syncs_per_look_not_per_batch(model, images):
    seen = []
    for batch_size in (64, 3):
        with SyncCounter() as counter:
            MonteCarloSampler(model, batch_size=batch_size, device="cpu").sample_sequential(
                images, IDS, SIGMAS, 5, LOOKS, never, seed=0)
        seen.append(counter.syncs)
    assert seen[0] == seen[1]
    assert seen[0].count("cpu") == len(LOOKS) + 2  # one transfer per look, + clean predictions and timesteps


def test_rejects_bad_looks(model, images):
    sampler = MonteCarloSampler(model, batch_size=8, device="cpu")
    for looks in ([], [0, 4], [8, 8], [8, 4]):
        with pytest.raises(ValueError, match="looks"):
            sampler.sample_sequential(images, IDS, SIGMAS, 5, looks, never, seed=0)
