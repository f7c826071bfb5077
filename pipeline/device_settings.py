"""Device settings for the sampler (precision, memory format, torch.compile, batch size), chosen for the device.

``compute.dtype``, ``compute.channels_last``, ``compute.compile`` and ``compute.batch_size``
accept ``auto`` (the default). :func:`resolve_device_settings` turns them into one
:class:`DeviceSettings` with a one-line ``reason``; an explicit config value always wins over
``auto``. The policy:

* CUDA: bfloat16 autocast where the GPU supports it (else float32), channels_last, torch.compile
  (its one-time compile is small beside a GPU run of n = 10,000-100,000 samples per image), and
  the largest batch of 128, 256, ..., ``MAX_CUDA_BATCH`` whose forward pass fits in memory (a
  doubling probe of the real model; ``CUDA_DEFAULT_BATCH`` without a model).
* CPU: measured. A few forward passes of the real model (through :class:`MonteCarloSampler`,
  so noise, indexing and counting are included) at float32 / bfloat16 x channels_last on / off
  at batch 128, then the fastest of those at batch 64 and 256; the fastest setting wins. The
  sweep takes a few seconds. ``compile`` is never chosen automatically on CPU: compiling the
  demo's denoiser + classifier took ~100 s per process (every actor, every shape), which a
  measured 1.1-1.6x pays back only in runs of well over ten minutes per actor; set
  ``compute.compile: true`` for those. Without a model: float32, contiguous, batch 128 (the
  measured winners on the 2-core reference machine).

Reduced precision changes the function being certified (the base classifier is the model run in
that precision): the certificate holds for the function that was run, which the manifest records.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

AUTO = "auto"
SETTING_KEYS = ("dtype", "channels_last", "compile", "batch_size")
CPU_DEFAULT = {"dtype": "float32", "channels_last": False, "compile": False, "batch_size": 128}
CPU_PROBE_BATCH = 128              # the dtype x layout sweep runs at this batch
CPU_BATCHES = (64, 128, 256)       # then the winner at each of these
CUDA_DEFAULT_BATCH = 512
CUDA_PROBE_START = 128
MAX_CUDA_BATCH = 4096
PROBE_SIGMA = 0.5                  # the sigma of the probe's samples (cost does not depend on it)


@dataclass(frozen=True)
class DeviceSettings:
    """What the sampler runs with on its device, and why (``reason``: one line for logs and the manifest)."""

    dtype: str
    channels_last: bool
    compile: bool
    batch_size: int
    reason: str

    def record(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict (the manifest's ``device_settings``)."""
        return asdict(self)


@dataclass(frozen=True)
class Measurement:
    """Samples per second of one candidate setting in the CPU sweep."""

    dtype: str
    channels_last: bool
    batch_size: int
    samples_per_s: float

    def label(self) -> str:
        return f"{self.dtype}, {layout(self.channels_last)}, batch {self.batch_size}"


def layout(channels_last: bool) -> str:
    return "channels_last" if channels_last else "contiguous"


def explicit_settings(compute_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of :data:`SETTING_KEYS` that the config sets to a value other than ``auto``."""
    return {k: compute_cfg[k] for k in SETTING_KEYS if compute_cfg.get(k, AUTO) != AUTO}


def resolve_device_settings(compute_cfg: Mapping[str, Any], device: torch.device | str,
                            model: torch.nn.Module | None = None,
                            sample_shape: Sequence[int] | None = None) -> DeviceSettings:
    """The settings for ``device`` (module docstring): explicit config values, the rest by policy
    (CUDA) or measured on ``model`` at ``sample_shape`` ([3, H, W]; default: the denoiser's
    training size) (CPU). ``model`` is moved to ``device`` when measured."""
    device = torch.device(device)
    fixed = explicit_settings(compute_cfg)
    if len(fixed) == len(SETTING_KEYS):
        return DeviceSettings(**fixed, reason=f"{device.type}: all four set in the config")
    if device.type == "cuda":
        return _cuda_settings(fixed, device, model, sample_shape)
    if model is None:
        chosen = CPU_DEFAULT | fixed
        return DeviceSettings(**chosen, reason=f"cpu: {_describe(chosen)}: documented default (no model to measure)"
                                               + _explicit_note(fixed))
    shape = tuple(sample_shape) if sample_shape is not None else (3, model.denoiser.image_size, model.denoiser.image_size)
    start = time.perf_counter()
    sweep = measure_cpu_sweep(model, device, shape, fixed)
    best = max(sweep, key=lambda m: m.samples_per_s)
    first = sweep[0]
    chosen = {"dtype": best.dtype, "channels_last": best.channels_last,
              "compile": fixed.get("compile", False), "batch_size": best.batch_size}
    reason = (f"cpu: {_describe(chosen)}: {best.samples_per_s / first.samples_per_s:.2f}x {first.label()} "
              f"(measured {len(sweep)} settings in {time.perf_counter() - start:.1f} s)" + _explicit_note(fixed))
    return DeviceSettings(**chosen, reason=reason)


def measure_cpu_sweep(model: torch.nn.Module, device: torch.device, shape: tuple[int, ...],
                      fixed: Mapping[str, Any], passes: int = 2) -> list[Measurement]:
    """Samples/s of each candidate (dtype x layout at :data:`CPU_PROBE_BATCH`, then the fastest at
    each of :data:`CPU_BATCHES`), explicit values held fixed; the first entry is the reference
    (float32, channels_last where free). Each candidate: one warm-up batch, then ``passes`` batches."""
    dtypes = [fixed["dtype"]] if "dtype" in fixed else ["float32", "bfloat16"]
    layouts = [fixed["channels_last"]] if "channels_last" in fixed else [True, False]
    probe_batch = fixed.get("batch_size", CPU_PROBE_BATCH)
    image = torch.rand((1, *shape), generator=torch.Generator().manual_seed(0))
    sweep = [_measure(model, device, image, dt, cl, probe_batch, passes) for dt, cl in itertools.product(dtypes, layouts)]
    if "batch_size" not in fixed:
        best = max(sweep, key=lambda m: m.samples_per_s)
        sweep += [_measure(model, device, image, best.dtype, best.channels_last, b, passes)
                  for b in CPU_BATCHES if b != probe_batch]
    return sweep


def _measure(model: torch.nn.Module, device: torch.device, image: torch.Tensor, dtype: str, channels_last: bool,
             batch_size: int, passes: int) -> Measurement:
    from pipeline.sampling import MonteCarloSampler

    sampler = MonteCarloSampler(model, batch_size, dtype, str(device), compile=False, channels_last=channels_last)
    sampler.sample(image, ["device-probe"], [PROBE_SIGMA], 0, batch_size, seed=0)  # warm-up
    start = time.perf_counter()
    sampler.sample(image, ["device-probe"], [PROBE_SIGMA], 0, batch_size * passes, seed=1)
    return Measurement(dtype, channels_last, batch_size, batch_size * passes / (time.perf_counter() - start))


def _cuda_settings(fixed: Mapping[str, Any], device: torch.device, model: torch.nn.Module | None,
                   sample_shape: Sequence[int] | None) -> DeviceSettings:
    bf16 = torch.cuda.is_bf16_supported()
    chosen = {"dtype": "bfloat16" if bf16 else "float32", "channels_last": True, "compile": True} | fixed
    why = "bfloat16 supported" if bf16 else "no bfloat16 support"
    if "batch_size" in fixed:
        batch_note = "batch from the config"
    elif model is None:
        chosen["batch_size"], batch_note = CUDA_DEFAULT_BATCH, "documented default batch (no model to probe)"
    else:
        shape = tuple(sample_shape) if sample_shape is not None else (3, model.denoiser.image_size, model.denoiser.image_size)
        chosen["batch_size"] = probe_cuda_batch(model, device, shape, chosen["dtype"], chosen["channels_last"])
        batch_note = f"largest fitting batch of {CUDA_PROBE_START}..{MAX_CUDA_BATCH} (doubling probe)"
    return DeviceSettings(**{k: chosen[k] for k in SETTING_KEYS},
                          reason=f"cuda: {_describe(chosen)}: policy ({why}; {batch_note})" + _explicit_note(fixed))


def probe_cuda_batch(model: torch.nn.Module, device: torch.device, shape: tuple[int, ...], dtype: str,
                     channels_last: bool) -> int:
    """The largest of CUDA_PROBE_START, 2x, ... up to MAX_CUDA_BATCH whose sampler batch runs
    without running out of memory (eager mode: torch.compile needs no more)."""
    from pipeline.sampling import MonteCarloSampler

    image = torch.rand((1, *shape), device=device)
    fits, batch = CUDA_PROBE_START, CUDA_PROBE_START
    while batch <= MAX_CUDA_BATCH:
        try:
            sampler = MonteCarloSampler(model, batch, dtype, str(device), compile=False, channels_last=channels_last)
            sampler.sample(image, ["device-probe"], [PROBE_SIGMA], 0, batch, seed=0)
            torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        fits, batch = batch, batch * 2
    return fits


def _describe(s: Mapping[str, Any]) -> str:
    return f"{s['dtype']}, {layout(s['channels_last'])}, {'compiled' if s['compile'] else 'eager'}, batch {s['batch_size']}"


def _explicit_note(fixed: Mapping[str, Any]) -> str:
    return f"; from the config: {', '.join(f'{k}={v}' for k, v in fixed.items())}" if fixed else ""


def sweep_lines(model: torch.nn.Module, device: torch.device | str, sample_shape: Sequence[int],
                compute_cfg: Mapping[str, Any] | None = None) -> list[str]:
    """The CPU sweep as printable lines (one per measured setting, its speed relative to the
    first, the fastest marked ``*``); on CUDA the policy's reason (nothing is swept)."""
    device = torch.device(device)
    cfg = compute_cfg or {}
    if device.type == "cuda":
        return [resolve_device_settings(cfg, device, model, sample_shape).reason]
    sweep = measure_cpu_sweep(model, device, tuple(sample_shape), explicit_settings(cfg))
    best = max(sweep, key=lambda m: m.samples_per_s)
    return [f"{'*' if m is best else ' '} {m.label():40s} {m.samples_per_s:9.1f} samples/s "
            f"({m.samples_per_s / sweep[0].samples_per_s:.2f}x)" for m in sweep]
