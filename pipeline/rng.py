"""Counter-based, device-side Gaussian noise.

The noise for (run seed, image_id, sigma, phase, sample index) is a pure function of those
values: it does not depend on the batch it is drawn in, the device, or the order of draws.

* :func:`noise_keys` hashes (seed, image_id, exact sigma, phase) on the host with BLAKE2b into a
  63-bit key per image.
* :func:`gaussian_noise` derives, with integer tensor ops only, a 64-bit word per pair of output
  elements: ``stream = mix64(key ^ mix64((sample_index + 1) * GOLDEN))`` and
  ``word_j = mix64(stream + (j + 1) * GOLDEN)`` (SplitMix64 with a per-(key, sample) seed), then
  turns each word into two normals by Box-Muller in float64, cast to float32.

The integer words are bit-identical on every device (int64 arithmetic wraps; right shifts are
masked to act as logical shifts). Float64 Box-Muller keeps device differences of the
transcendental functions far below float32 resolution.
"""
from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np
import torch

PHASE_SELECTION, PHASE_ESTIMATION = 0, 1


def _signed(c: int) -> int:
    """The int64 with the same 64 bits as the unsigned constant ``c``."""
    return c - (1 << 64) if c >= 1 << 63 else c


GOLDEN = 0x9E3779B97F4A7C15
MIX_MUL1 = 0xBF58476D1CE4E5B9
MIX_MUL2 = 0x94D049BB133111EB
_GOLDEN_S, _MUL1_S, _MUL2_S = _signed(GOLDEN), _signed(MIX_MUL1), _signed(MIX_MUL2)


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (bits as unsigned, wrapping arithmetic)."""
    x = (x ^ _srl(x, 30)) * _MUL1_S
    x = (x ^ _srl(x, 27)) * _MUL2_S
    return x ^ _srl(x, 31)


def noise_keys(seed: int, image_ids: Sequence[str], sigma: float | Sequence[float], phase: int) -> np.ndarray:
    """One 63-bit key (int64 >= 0) per image for (seed, image_id, sigma, phase).

    ``sigma`` is a scalar or one value per image; it enters by its exact float repr, so equal
    floats give equal keys and any two distinct floats give unrelated keys.
    """
    sigmas = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (len(image_ids),))
    out = np.empty(len(image_ids), dtype=np.int64)
    for i, (image_id, s) in enumerate(zip(image_ids, sigmas)):
        msg = f"{int(seed)}\x1f{image_id}\x1f{float(s)!r}\x1f{int(phase)}".encode()
        digest = hashlib.blake2b(msg, digest_size=8, person=b"msds-noise").digest()
        out[i] = int.from_bytes(digest, "little") >> 1
    return out


def random_words(keys: torch.Tensor, sample_index: torch.Tensor, num_words: int) -> torch.Tensor:
    """int64 [B, num_words]: the 64-bit counter-based words behind :func:`gaussian_noise`."""
    stream = mix64(keys.long() ^ mix64((sample_index.long().to(keys.device) + 1) * _GOLDEN_S))
    counter = (torch.arange(1, num_words + 1, device=keys.device, dtype=torch.int64) * _GOLDEN_S)
    return mix64(stream[:, None] + counter[None, :])


def gaussian_noise(keys: torch.Tensor, sample_index: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal float32 noise [B, *shape] on ``keys.device`` for each (key, sample index).

    Element e of row b depends only on (keys[b], sample_index[b], e).
    """
    numel = math.prod(shape)
    words = random_words(keys, sample_index, (numel + 1) // 2)
    # Two 32-bit uniforms per word: u1 in (0, 1) for the radius, u2 in [0, 1) for the angle.
    u1 = (_srl(words, 32).double() + 0.5) * 2.0**-32
    u2 = (words & 0xFFFFFFFF).double() * 2.0**-32
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = (2.0 * math.pi) * u2
    z = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=-1)
    return z.reshape(keys.shape[0], -1)[:, :numel].float().reshape(keys.shape[0], *shape)
