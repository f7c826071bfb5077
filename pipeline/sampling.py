"""Monte Carlo engine: selection and estimation class counts per (image, sigma).

Every (image, sigma, phase, sample index) is a work item. Work items are flattened and run in
device batches of one fixed size that mix images and sigmas (per-sample sigma, hence per-sample
timestep); the last batch is padded and its padding masked out. Noise comes from
:mod:`pipeline.rng`, so counts do not depend on the batch size, on which images share a call,
or on retries. Argmax and counting stay on the device (``index_add_`` into a fixed-size counts
tensor); a fixed-n call makes one device-to-host transfer, at its end.

Sequential sampling (:meth:`MonteCarloSampler.sample_sequential`) draws the estimation samples
of each (image, sigma) pair up to pre-declared looks and asks a stopping rule at each look which
pairs are decided; the pairs still sampling share full, fixed-shape device batches, and the
host sees the counts only at look boundaries. The k-th sample of a pair is the same noise as in
the fixed path, so a pair's counts after k samples do not depend on batch size, on which
pairs share a batch, or on when other pairs stopped.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from pipeline.rng import PHASE_ESTIMATION, PHASE_SELECTION, gaussian_noise, noise_keys

if TYPE_CHECKING:
    from pipeline.device_settings import DeviceSettings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SampleCounts:
    """Counts of one :meth:`MonteCarloSampler.sample` call."""

    counts0: np.ndarray  # int64 [N, S, C] selection counts (n0 per row)
    counts: np.ndarray  # int64 [N, S, C] estimation counts (n per row)
    pred_clean: np.ndarray  # int64 [N] classifier on the clean image
    timesteps: np.ndarray  # int64 [S] diffusion timestep used for each sigma


@dataclass
class SequentialCounts(SampleCounts):
    """Counts of one :meth:`MonteCarloSampler.sample_sequential` call: ``counts`` rows hold the
    ``n`` estimation samples actually drawn for each pair."""

    n: np.ndarray  # int64 [N, S] estimation samples drawn (a look's sample count)
    stopped_look: np.ndarray  # int64 [N, S] index of the look at which sampling stopped


# stop(look index, counts0 [P, C], counts [P, C], n drawn [P]) -> bool [P]: True = decided, stop.
StopRule = Callable[[int, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class MonteCarloSampler:
    """Draws noisy samples through a denoise-and-classify model and counts predicted classes.

    ``model`` has ``forward(x_noisy, sigma) -> logits`` (x_noisy = x + sigma * eps in [0, 1]
    units, sigma one value per sample), ``classify_clean(x) -> logits``, ``num_classes`` and
    ``timesteps(sigma)`` (the denoiser's diffusion timestep per sigma; -1 without a denoiser).
    ``dtype`` selects autocast ("bfloat16", "float16") or plain float32. The same code runs on CPU
    and CUDA. ``model`` itself is moved (in place) to the device and memory format and put in eval
    mode. The certification actor builds it with
    :meth:`from_settings` from :func:`pipeline.device_settings.resolve_device_settings`'s choice;
    every setting here is a resolved value (``auto`` is refused).
    """

    def __init__(self, model: torch.nn.Module, batch_size: int, dtype: str = "float32",
                 device: str | None = None, compile: bool = False, channels_last: bool = True):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if not isinstance(compile, bool) or not isinstance(channels_last, bool):
            raise ValueError(f"compile and channels_last must be true or false (resolve 'auto' with "
                             f"pipeline.device_settings first), got {compile!r}, {channels_last!r}")
        self.device = torch.device(device) if device is not None else default_device()
        self.batch_size = int(batch_size)
        self.dtype = DTYPES[dtype]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(self.device, memory_format=self.memory_format)
        self.num_classes = int(model.num_classes)
        self._logits = torch.compile(self.model) if compile else self.model

    @classmethod
    def from_settings(cls, model: torch.nn.Module, settings: "DeviceSettings",
                      device: str | None = None) -> "MonteCarloSampler":
        """A sampler running with ``settings`` (pipeline.device_settings) on ``device``."""
        return cls(model, settings.batch_size, settings.dtype, device, settings.compile, settings.channels_last)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def warm_up(self, shape: Sequence[int], sigma: float) -> float:
        """Seconds of one batch at ``sigma`` on a zero image of ``shape`` ([C, H, W]), counts
        discarded: the compile, if any, and the device's one-time setup (kernels, allocator) happen
        here, not in the first counted call."""
        start = time.perf_counter()
        self.sample(torch.zeros((1, *shape)), ["warm-up"], [sigma], 0, self.batch_size, seed=0)
        return time.perf_counter() - start

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
            timesteps = self.model.timesteps(sigma_dev).to(torch.int64).reshape(num_sigmas)
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
        self._count_items(x, keys, sigma, counts, pair * 2 + phase, within - n0 * phase, valid)

    def _count_items(self, x: torch.Tensor, keys: torch.Tensor, sigma: torch.Tensor, counts: torch.Tensor,
                     slot: torch.Tensor, sample_index: torch.Tensor, valid: torch.Tensor) -> None:
        """Adds the argmax class of sample ``sample_index`` of each (image, sigma, phase) ``slot``
        (counted where ``valid``) to ``counts``; one device batch, no host sync."""
        pair = slot // 2
        image, sigma_b = pair // sigma.numel(), sigma[pair % sigma.numel()]
        eps = gaussian_noise(keys[slot], sample_index, tuple(x.shape[1:]))
        x_noisy = x.index_select(0, image) + sigma_b.float().view(-1, 1, 1, 1) * eps
        logits = self._logits(x_noisy.contiguous(memory_format=self.memory_format), sigma_b)
        counts.index_add_(0, slot * self.num_classes + logits.argmax(dim=1), valid.long())

    def sample_sequential(self, images, image_ids: Sequence[str], sigmas: Sequence[float], n0: int,
                          looks: Sequence[int], stop: StopRule, seed: int) -> SequentialCounts:
        """Selection counts (n0 per pair) and estimation counts drawn up to the looks until ``stop``.

        ``looks`` are increasing estimation sample counts (the last is n_max). Every pair draws
        its selection samples and its first ``looks[0]`` estimation samples; at look j,
        ``stop(j, counts0, counts, n)`` (host arrays of the pairs still sampling) returns which
        of them are decided; the others draw on to ``looks[j + 1]``. Every pair stops at the last
        look. A pair's counts at a look are exactly those the fixed path draws with n = that look.
        """
        x = torch.as_tensor(images).to(self.device, torch.float32)
        looks = [int(v) for v in looks]
        if x.ndim != 4 or len(image_ids) != x.shape[0] or n0 < 0 or not looks or looks[0] < 1 \
                or any(b <= a for a, b in zip(looks, looks[1:])):
            raise ValueError(f"need images [N, C, H, W], N image_ids, n0 >= 0 and increasing looks >= 1; got "
                             f"{tuple(x.shape)}, {len(image_ids)} ids, n0={n0}, looks={looks}")
        num_images, num_sigmas, classes = x.shape[0], len(sigmas), self.num_classes
        num_pairs = num_images * num_sigmas
        keys = np.empty((num_images, num_sigmas, 2), dtype=np.int64)
        for s, sigma in enumerate(sigmas):
            for phase in (PHASE_SELECTION, PHASE_ESTIMATION):
                keys[:, s, phase] = noise_keys(seed, image_ids, sigma, phase)
        keys_dev = torch.from_numpy(keys.reshape(-1)).to(self.device)
        sigma_dev = torch.tensor([float(s) for s in sigmas], dtype=torch.float64, device=self.device)
        counts = torch.zeros(num_pairs * 2 * classes, dtype=torch.int64, device=self.device)
        drawn = np.zeros(num_pairs, dtype=np.int64)
        stopped_look = np.full(num_pairs, -1, dtype=np.int64)
        active = np.arange(num_pairs)
        host = np.zeros((num_pairs, 2, classes), dtype=np.int64)
        with torch.inference_mode(), self.autocast():
            for j, target in enumerate(looks):
                # work items of this round: (slot, sample index) for every pair still sampling
                ranges = [(active * 2 + PHASE_ESTIMATION, drawn[active], np.full(active.size, target))]
                if j == 0:
                    ranges.append((active * 2 + PHASE_SELECTION, np.zeros(active.size, np.int64),
                                   np.full(active.size, n0)))
                slot = np.concatenate([np.repeat(sl, hi - lo) for sl, lo, hi in ranges])
                index = np.concatenate([_ranges(lo, hi) for _, lo, hi in ranges])
                self._count_round(x, keys_dev, sigma_dev, counts, slot, index)
                drawn[active] = target
                host[active] = counts.view(num_pairs, 2, classes)[torch.from_numpy(active).to(self.device)].cpu().numpy()
                done = np.ones(active.size, dtype=bool) if j == len(looks) - 1 else np.asarray(
                    stop(j, host[active, PHASE_SELECTION], host[active, PHASE_ESTIMATION], drawn[active]), dtype=bool)
                stopped_look[active[done]] = j
                active = active[~done]
                if active.size == 0:
                    break
            pred_clean = self._predict_clean(x).cpu().numpy()
            timesteps = self.model.timesteps(sigma_dev).to(torch.int64).reshape(num_sigmas).cpu().numpy()
        per_pair = host.reshape(num_images, num_sigmas, 2, classes)
        return SequentialCounts(
            counts0=per_pair[:, :, PHASE_SELECTION].copy(), counts=per_pair[:, :, PHASE_ESTIMATION].copy(),
            pred_clean=pred_clean, timesteps=timesteps,
            n=drawn.reshape(num_images, num_sigmas), stopped_look=stopped_look.reshape(num_images, num_sigmas))

    def _count_round(self, x: torch.Tensor, keys: torch.Tensor, sigma: torch.Tensor, counts: torch.Tensor,
                     slot: np.ndarray, index: np.ndarray) -> None:
        """The work items (slot, sample index) in full device batches of ``batch_size``; the last
        batch is padded with a repeat of item 0, masked out."""
        total = slot.size
        if total == 0:
            return
        padded = -(-total // self.batch_size) * self.batch_size
        valid = torch.arange(padded, device=self.device) < total
        slot_dev = torch.from_numpy(np.pad(slot, (0, padded - total))).to(self.device)
        index_dev = torch.from_numpy(np.pad(index, (0, padded - total))).to(self.device)
        for start in range(0, padded, self.batch_size):
            part = slice(start, start + self.batch_size)
            self._count_items(x, keys, sigma, counts, slot_dev[part], index_dev[part], valid[part])

    def _predict_clean(self, x: torch.Tensor) -> torch.Tensor:
        """Argmax of ``classify_clean`` per image, in chunks of the batch size, on the device."""
        preds = [self.model.classify_clean(chunk.contiguous(memory_format=self.memory_format)).argmax(dim=1)
                 for chunk in x.split(self.batch_size)]
        return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64, device=self.device)


def _ranges(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Concatenation of arange(low[i], high[i]) over i, vectorised."""
    lengths = high - low
    if lengths.sum() == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(low - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return (starts + np.arange(lengths.sum())).astype(np.int64)
