"""Monte Carlo engine: selection and estimation class counts per (image, sigma).

Every (image, sigma, phase, sample index) is a work item. Work items are flattened and run in
device batches of one fixed size that mix images and sigmas (per-sample sigma, hence per-sample
timestep); the last batch is padded and its padding masked out. Noise comes from
:mod:`pipeline.rng`, so counts do not depend on the batch size, on which images share a call,
or on retries. Argmax and counting stay on the device (``index_add_`` into a fixed-size counts
tensor); a call makes one device-to-host transfer, at its end.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pipeline.rng import PHASE_ESTIMATION, PHASE_SELECTION, gaussian_noise, noise_keys

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SampleCounts:
    """Counts of one :meth:`MonteCarloSampler.sample` call."""

    counts0: np.ndarray  # int64 [N, S, C] selection counts (n0 per row)
    counts: np.ndarray  # int64 [N, S, C] estimation counts (n per row)
    pred_clean: np.ndarray  # int64 [N] classifier on the clean image
    timesteps: np.ndarray  # int64 [S] diffusion timestep used for each sigma


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class MonteCarloSampler:
    """Draws noisy samples through a denoise-and-classify model and counts predicted classes.

    ``model`` has ``forward(x_noisy, sigma) -> logits`` (x_noisy = x + sigma * eps in [0, 1]
    units, sigma one value per sample), ``classify_clean(x) -> logits``, ``num_classes`` and
    ``denoiser.timesteps(sigma)``. ``dtype`` selects autocast ("bfloat16", "float16") or plain
    float32. The same code runs on CPU and CUDA. ``model`` itself is moved (in place) to the
    device and memory format and put in eval mode.
    """

    def __init__(self, model: torch.nn.Module, batch_size: int, dtype: str = "float32",
                 device: str | None = None, compile: bool = False, channels_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.device = torch.device(device) if device is not None else default_device()
        self.batch_size = int(batch_size)
        self.dtype = DTYPES[dtype]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(self.device, memory_format=self.memory_format)
        self.num_classes = int(model.num_classes)
        self._logits = torch.compile(self.model) if compile else self.model

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def sample(self, images, image_ids: Sequence[str], sigmas: Sequence[float], n0: int, n: int,
               seed: int) -> SampleCounts:
        """Counts for every image (float [0, 1], [N, 3, H, W], torch or numpy) at every sigma.

        Row (i, s) of ``counts0`` / ``counts`` holds the argmax classes of samples 0..n0-1 of the
        selection phase / 0..n-1 of the estimation phase for image_ids[i] at sigmas[s]. For
        cascade mode, call with a single sigma and the images still undecided.
        """
        x = torch.as_tensor(images).to(self.device, torch.float32)
        if x.ndim != 4 or len(image_ids) != x.shape[0] or n0 < 0 or n < 0:
            raise ValueError(f"need images [N, C, H, W], N image_ids and n0, n >= 0; got {tuple(x.shape)}, "
                             f"{len(image_ids)} ids, n0={n0}, n={n}")
        num_images, num_sigmas, per_pair = x.shape[0], len(sigmas), n0 + n
        keys = np.empty((num_images, num_sigmas, 2), dtype=np.int64)  # keys[i, s, phase]
        for s, sigma in enumerate(sigmas):
            for phase in (PHASE_SELECTION, PHASE_ESTIMATION):
                keys[:, s, phase] = noise_keys(seed, image_ids, sigma, phase)
        keys_dev = torch.from_numpy(keys.reshape(-1)).to(self.device)
        # float64 so that the model's timestep lookup sees the exact sigma
        sigma_dev = torch.tensor([float(s) for s in sigmas], dtype=torch.float64, device=self.device)
        counts = torch.zeros(num_images * num_sigmas * 2 * self.num_classes, dtype=torch.int64, device=self.device)
        total = num_images * num_sigmas * per_pair
        with torch.inference_mode(), self.autocast():
            if total > 0:
                offsets = torch.arange(self.batch_size, device=self.device)
                for start in range(0, total, self.batch_size):
                    self._count_batch(x, keys_dev, sigma_dev, counts, start + offsets, total, n0, per_pair)
            pred_clean = self._predict_clean(x)
            timesteps = self.model.denoiser.timesteps(sigma_dev).to(torch.int64).reshape(num_sigmas)
        host = torch.cat([counts, pred_clean, timesteps]).cpu().numpy()  # the one host transfer
        per_phase = host[: counts.numel()].reshape(num_images, num_sigmas, 2, self.num_classes)
        return SampleCounts(
            counts0=per_phase[:, :, PHASE_SELECTION].copy(),
            counts=per_phase[:, :, PHASE_ESTIMATION].copy(),
            pred_clean=host[counts.numel(): counts.numel() + num_images].copy(),
            timesteps=host[counts.numel() + num_images:].copy(),
        )

    def _count_batch(self, x: torch.Tensor, keys: torch.Tensor, sigma: torch.Tensor, counts: torch.Tensor,
                     item: torch.Tensor, total: int, n0: int, per_pair: int) -> None:
        """Adds the argmax classes of work items ``item`` (those < total) to ``counts``; no host sync."""
        valid = item < total
        item = item.clamp(max=total - 1)
        pair, within = item // per_pair, item % per_pair  # pair = image * S + sigma index
        phase = (within >= n0).long()
        sample_index = within - n0 * phase
        slot = pair * 2 + phase  # (image, sigma, phase) row of keys and counts
        image, sigma_b = pair // sigma.numel(), sigma[pair % sigma.numel()]
        eps = gaussian_noise(keys[slot], sample_index, tuple(x.shape[1:]))
        x_noisy = x.index_select(0, image) + sigma_b.float().view(-1, 1, 1, 1) * eps
        logits = self._logits(x_noisy.contiguous(memory_format=self.memory_format), sigma_b)
        counts.index_add_(0, slot * self.num_classes + logits.argmax(dim=1), valid.long())

    def _predict_clean(self, x: torch.Tensor) -> torch.Tensor:
        """Argmax of ``classify_clean`` per image, in chunks of the batch size, on the device."""
        preds = [self.model.classify_clean(chunk.contiguous(memory_format=self.memory_format)).argmax(dim=1)
                 for chunk in x.split(self.batch_size)]
        return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64, device=self.device)
