"""Counter-based noise: exact bits against a numpy uint64 transcription, and its statistics."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from scipy import stats

from pipeline.rng import PHASE_ESTIMATION, PHASE_SELECTION, gaussian_noise, noise_keys, random_words

U64 = np.uint64


def np_mix64(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> U64(30))) * U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> U64(27))) * U64(0x94D049BB133111EB)
    return x ^ (x >> U64(31))


def np_noise(key: int, sample: int, numel: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent transcription in unsigned numpy arithmetic: (words as uint64, float32 noise)."""
    golden = U64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        stream = np_mix64(np.array([key], U64) ^ np_mix64(np.array([sample + 1], U64) * golden))
        j = np.arange(1, (numel + 1) // 2 + 1, dtype=U64)
        words = np_mix64(stream + j * golden)
    u1 = ((words >> U64(32)).astype(np.float64) + 0.5) / 2.0**32
    u2 = (words & U64(0xFFFFFFFF)).astype(np.float64) / 2.0**32
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.empty(2 * len(words))
    z[0::2], z[1::2] = r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)
    return words, z[:numel].astype(np.float32)


def test_keys_match_blake2b_and_depend_on_every_field():
    ids = ["img-0", "img-1"]
    keys = noise_keys(7, ids, 0.25, PHASE_SELECTION)
    digest = hashlib.blake2b(b"7\x1fimg-1\x1f0.25\x1f0", digest_size=8, person=b"msds-noise").digest()
    assert keys.dtype == np.int64 and keys[1] == int.from_bytes(digest, "little") >> 1
    assert (keys >= 0).all()
    variants = [
        noise_keys(8, ids, 0.25, PHASE_SELECTION),
        noise_keys(7, ids, 0.5, PHASE_SELECTION),
        noise_keys(7, ids, float(np.nextafter(0.25, 1.0)), PHASE_SELECTION),  # next float up
        noise_keys(7, ids, 0.25, PHASE_ESTIMATION),
    ]
    for other in variants:
        assert (other != keys).all()
    # per-image sigma equals the scalar form; a key does not depend on the other images in the call
    np.testing.assert_array_equal(noise_keys(7, ids, [0.25, 0.25], 0), keys)
    np.testing.assert_array_equal(noise_keys(7, ids[1:], 0.25, 0), keys[1:])


def test_bits_match_numpy_transcription():
    keys = np.array([0, 1, 2**62 + 12345, 2**63 - 1, 987654321987654321], dtype=np.int64)
    samples = np.array([0, 5, 2**40, 10_099, 3], dtype=np.int64)
    shape = (3, 5, 7)  # odd numel: last word contributes one element
    words = random_words(torch.from_numpy(keys), torch.from_numpy(samples), (105 + 1) // 2)
    z = gaussian_noise(torch.from_numpy(keys), torch.from_numpy(samples), shape)
    assert z.shape == (5, *shape) and z.dtype == torch.float32
    for b in range(len(keys)):
        ref_words, ref_z = np_noise(int(keys[b]), int(samples[b]), 105)
        np.testing.assert_array_equal(words[b].numpy().view(np.uint64), ref_words)
        np.testing.assert_allclose(z[b].reshape(-1).numpy(), ref_z, rtol=1e-6, atol=1e-6)


def test_row_depends_only_on_its_key_and_sample():
    keys = torch.from_numpy(noise_keys(3, [f"i{k}" for k in range(6)], 0.5, 1))
    samples = torch.arange(6) * 11
    full = gaussian_noise(keys, samples, (2, 8, 8))
    perm = torch.tensor([4, 0, 5, 2])
    np.testing.assert_array_equal(gaussian_noise(keys[perm], samples[perm], (2, 8, 8)).numpy(), full[perm].numpy())
    # a smaller shape is a prefix of the same stream
    np.testing.assert_array_equal(gaussian_noise(keys, samples, (5,)).numpy(), full.reshape(6, -1)[:, :5].numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    keys = torch.from_numpy(noise_keys(1, [str(k) for k in range(16)], 0.25, 0))
    samples = torch.arange(16) * 1000 + 3
    cpu = gaussian_noise(keys, samples, (3, 32, 32))
    cuda = gaussian_noise(keys.cuda(), samples.cuda(), (3, 32, 32))
    assert torch.equal(random_words(keys, samples, 99), random_words(keys.cuda(), samples.cuda(), 99).cpu())
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-6, atol=1e-6)


def test_moments_and_normality():
    keys = torch.from_numpy(noise_keys(0, [f"im{k}" for k in range(64)], 1.0, 0))
    z = gaussian_noise(keys, torch.arange(64), (4096,)).double().numpy()  # 262,144 draws
    flat = z.reshape(-1)
    m = flat.size
    assert abs(flat.mean()) < 5 / np.sqrt(m)
    assert abs(flat.var() - 1) < 5 * np.sqrt(2 / m)
    assert abs(stats.skew(flat)) < 5 * np.sqrt(6 / m)
    assert abs(stats.kurtosis(flat)) < 5 * np.sqrt(24 / m)
    assert stats.kstest(flat, "norm").pvalue > 1e-3
    # tail mass beyond 3 sigma (Box-Muller on 32-bit uniforms reaches about 6.8)
    expected = 2 * stats.norm.sf(3) * m
    assert abs((np.abs(flat) > 3).sum() - expected) < 5 * np.sqrt(expected)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.reshape(-1), b.reshape(-1))[0, 1])


def test_streams_look_independent():
    d = 1 << 16
    bound = 5 / np.sqrt(d)
    base_key = torch.from_numpy(noise_keys(0, ["a"], 0.5, 0))
    near_key = base_key + 1  # adjacent key values must still give unrelated streams
    other = torch.from_numpy(noise_keys(0, ["b"], 0.5, 0))
    keys = torch.cat([base_key, base_key, near_key, other, base_key])
    samples = torch.tensor([0, 1, 0, 0, 2**33])
    z = gaussian_noise(keys, samples, (d,)).double().numpy()
    for i in range(len(z)):
        for j in range(i + 1, len(z)):
            assert abs(_corr(z[i], z[j])) < bound, (i, j)
        # neighbouring elements: within a Box-Muller pair and across pairs
        assert abs(_corr(z[i][:-1], z[i][1:])) < bound
        assert abs(_corr(z[i][0::2] ** 2, z[i][1::2] ** 2)) < bound  # pair members independent
    # sample index k and k+1 over many keys: per-element correlation across the batch
    keys = torch.from_numpy(noise_keys(0, [f"k{i}" for i in range(2048)], 0.5, 0))
    a = gaussian_noise(keys, torch.zeros(2048, dtype=torch.long), (32,)).double().numpy()
    b = gaussian_noise(keys, torch.ones(2048, dtype=torch.long), (32,)).double().numpy()
    assert abs(_corr(a, b)) < 5 / np.sqrt(a.size)
