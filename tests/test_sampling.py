"""MonteCarloSampler on the project's DenoiseAndClassify: a tiny random-weight ADM UNet + timm ViT."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch.overrides import TorchFunctionMode

from pipeline.rng import gaussian_noise, noise_keys
from pipeline.sampling import MonteCarloSampler, SampleCounts
from tests.golden import TIMESTEPS
from tests.tiny_models import tiny_model

torch.set_num_threads(1)

SIGMAS = [0.25, 0.5]
IDS = ["img-a", "img-b", "img-c"]



@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).random((3, 3, 16, 16), dtype=np.float32)


@pytest.fixture(scope="module")
def reference(model, images):
    return MonteCarloSampler(model, batch_size=7, device="cpu").sample(images, IDS, SIGMAS, n0=5, n=24, seed=11)


def test_shapes_and_totals(reference: SampleCounts):
    for c in (reference.counts0, reference.counts):
        assert c.dtype == np.int64 and c.shape == (3, 2, 10) and (c >= 0).all()
    assert (reference.counts0.sum(-1) == 5).all() and (reference.counts.sum(-1) == 24).all()
    assert reference.pred_clean.dtype == np.int64 and reference.pred_clean.shape == (3,)
    table = TIMESTEPS["linear", 1000]
    np.testing.assert_array_equal(reference.timesteps, [table[s] for s in SIGMAS])


def test_counts_match_direct_computation(model, images, reference):
    """Each row equals the histogram of argmax over that row's own noise, drawn in one go."""
    with torch.inference_mode():
        for i in range(3):
            for s, sigma in enumerate(SIGMAS):
                for phase, (num, got) in enumerate(((5, reference.counts0), (24, reference.counts))):
                    key = torch.from_numpy(noise_keys(11, [IDS[i]], sigma, phase)).repeat(num)
                    eps = gaussian_noise(key, torch.arange(num), (3, 16, 16))
                    x = torch.from_numpy(images[i]) + sigma * eps
                    pred = model(x, torch.full((num,), sigma)).argmax(1)
                    np.testing.assert_array_equal(got[i, s], np.bincount(pred.numpy(), minlength=10))


def test_counts_invariant_to_batch_size_and_split(model, images, reference):
    """Other batch sizes, images split across calls, one sigma per call (cascade mode): same counts."""
    whole = MonteCarloSampler(model, batch_size=16, device="cpu", channels_last=False).sample(
        torch.from_numpy(images), IDS, SIGMAS, 5, 24, seed=11)
    np.testing.assert_array_equal(whole.counts0, reference.counts0)
    np.testing.assert_array_equal(whole.counts, reference.counts)
    sampler = MonteCarloSampler(model, batch_size=4, device="cpu")
    for s, sigma in enumerate(SIGMAS):
        for rows in ([2], [0, 1]):
            part = sampler.sample(images[rows], [IDS[r] for r in rows], [sigma], 5, 24, seed=11)
            np.testing.assert_array_equal(part.counts0[:, 0], reference.counts0[rows, s])
            np.testing.assert_array_equal(part.counts[:, 0], reference.counts[rows, s])
            np.testing.assert_array_equal(part.pred_clean, reference.pred_clean[rows])
    other_seed = sampler.sample(images, IDS, SIGMAS, 5, 24, seed=12)
    assert not np.array_equal(other_seed.counts, reference.counts)


def test_pred_clean_is_classifier_argmax(model, images, reference):
    with torch.inference_mode():
        expected = model.classify_clean(torch.from_numpy(images)).argmax(1).numpy()
    np.testing.assert_array_equal(reference.pred_clean, expected)


def test_bfloat16_agrees_in_distribution(model, images):
    """Autocast bfloat16 on CPU runs; with the same noise, class frequencies stay close to float32's."""
    kwargs = dict(images=images, image_ids=IDS, sigmas=SIGMAS, n0=0, n=64, seed=3)
    exact = MonteCarloSampler(model, batch_size=32, device="cpu").sample(**kwargs)
    low = MonteCarloSampler(model, batch_size=32, device="cpu", dtype="bfloat16").sample(**kwargs)
    assert (low.counts.sum(-1) == 64).all() and (low.counts0 == 0).all()
    assert (exact.counts.max(-1) < 64).any()  # the model does not predict one class only
    tv = 0.5 * np.abs(exact.counts - low.counts).sum(-1) / 64.0  # per (image, sigma) total variation
    assert tv.max() <= 0.25 and tv.mean() <= 0.1, tv


def test_float16_runs(model, images):
    out = MonteCarloSampler(model, batch_size=4, device="cpu", dtype="float16").sample(images[:1], IDS[:1], [0.5], 1, 3, 0)
    assert out.counts0.sum() == 1 and out.counts.sum() == 3


class SyncCounter(TorchFunctionMode):
    """Counts tensor->host conversions and SDPA calls seen through __torch_function__."""

    SYNCS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"}

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self.sdpa = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.SYNCS:
            self.syncs.append(name)
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.sdpa += 1
        return func(*args, **(kwargs or {}))


def test_host_syncs_do_not_grow_with_batches(model, images):
    """The batch loop never converts device values to host values: only the final transfer does.

    (On CPU there is no real sync; this checks the code path. On CUDA the same loop can be run
    under torch.cuda.set_sync_debug_mode("error").)
    """
    seen = []
    for batch_size in (64, 5):  # 3 vs 35 batches
        with SyncCounter() as counter:
            MonteCarloSampler(model, batch_size=batch_size, device="cpu").sample(images, IDS, SIGMAS, 5, 24, seed=0)
        seen.append(counter)
    assert seen[0].syncs == seen[1].syncs == ["cpu", "numpy"]
    # every attention layer (UNet and ViT) runs through SDPA: one call per layer per device batch
    unet_layers = sum(isinstance(m, Attention) for m in model.denoiser.unet.modules())
    vit_layers = len(model.classifier.model.blocks)
    assert unet_layers > 0
    for counter, batches in zip(seen, (3, 35)):  # 3 * 2 * (5 + 24) = 174 work items
        assert counter.sdpa == batches * (unet_layers + vit_layers) + vit_layers  # + the clean pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_agrees_with_cpu_and_syncs_do_not_grow_with_batches(model, images, reference):
    """On CUDA: the same counts up to TF32/kernel rounding, and as many synchronising calls
    (torch.cuda sync debug mode) with 3 batches as with 35."""
    syncs = []
    for batch_size in (64, 5):
        sampler = MonteCarloSampler(copy.deepcopy(model), batch_size=batch_size, device="cuda")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = sampler.sample(images, IDS, SIGMAS, 5, 24, seed=11)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs.append(len(caught))
        assert (out.counts.sum(-1) == 24).all()
        assert (0.5 * np.abs(out.counts - reference.counts).sum(-1) / 24).max() <= 0.1
    assert syncs[0] == syncs[1]


def test_channels_last_and_validation(model, images):
    sampler = MonteCarloSampler(model, batch_size=8, device="cpu")
    conv = sampler.model.denoiser.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError):
        sampler.sample(images, IDS[:2], SIGMAS, 1, 1, seed=0)
    with pytest.raises(ValueError):
        MonteCarloSampler(model, batch_size=8, dtype="int8")
    empty = sampler.sample(images, IDS, SIGMAS, 0, 0, seed=0)
    assert empty.counts.shape == (3, 2, 10) and not empty.counts.any()


def test_from_settings_runs_the_resolved_settings_and_auto_is_refused(model, images, reference):
    """A DeviceSettings builds the same sampler as its values; an unresolved ``auto`` is an error."""
    from pipeline.device_settings import DeviceSettings

    settings = DeviceSettings(dtype="float32", channels_last=False, compile=False, batch_size=5, reason="test")
    sampler = MonteCarloSampler.from_settings(model, settings, "cpu")
    assert (sampler.batch_size, sampler.dtype, sampler.memory_format) == (5, torch.float32, torch.contiguous_format)
    assert not sampler.model.denoiser.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    out = sampler.sample(images, IDS, SIGMAS, n0=5, n=24, seed=11)
    np.testing.assert_array_equal(out.counts, reference.counts)
    for bad in (dict(batch_size="auto"), dict(batch_size=8, compile="auto"), dict(batch_size=8, channels_last="auto"),
                dict(batch_size=8, dtype="auto")):
        with pytest.raises(ValueError):
            MonteCarloSampler(model, device="cpu", **bad)
