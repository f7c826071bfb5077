"""Device settings for the sampler (precision, memory format, torch.compile, batch size), chosen for the device.

``compute.dtype``, ``compute.channels_last``, ``compute.compile`` and ``compute.batch_size``
accept ``auto`` (the default). :func:`resolve_device_settings` turns them into one
:class:`DeviceSettings` with a one-line ``reason``; an explicit config value always wins over
``auto``. The policy:

* CUDA: bfloat16 autocast where the GPU supports it (else float32), channels_last, torch.compile
  (its one-time compile is small beside a GPU run of n = 10,000-100,000 samples per image), and
  the largest batch of 128, 256, ..., ``MAX_CUDA_BATCH`` whose forward pass fits in memory (a
  doubling probe of the real model; ``CUDA_DEFAULT_BATCH`` without a model).
* CPU: measured. Forward passes of the real model (through :class:`MonteCarloSampler`, so
  noise, indexing and counting are included) at float32 / bfloat16 x channels_last on / off at
  batch 128, then the fastest of those at batch 64 and 256, each for at least
  :data:`CPU_MEASURE_S`. The sweep takes several seconds. ``torch.compile`` is measured too when
  the run is long enough to pay for it: when one actor's work (``work_samples``, its projected
  samples: pipeline.certify_run.projected_samples_per_actor) at the fastest eager speed is at
  least :data:`CPU_COMPILE_MIN_WORK_S`, one compiled candidate is timed, compile included:
  bfloat16 where the CPU computes it natively (oneDNN's bf16 support: AVX512-BF16 / AMX), else
  float32 (contiguous, the eager winner's batch; inductor picks its own memory formats). The
  setting that finishes that work first wins, the compile counted once. On
  the 2-core reference machine (demo models, batch 256, 12,288 samples each, 2026-12-07; the host
  drifts by up to 30%): float32 eager 1,460-1,800 samples/s, bfloat16 eager 1,790-2,390,
  bfloat16 compiled 2,520-2,910, the reference loop (pipeline.reference_loop) 1,450; a cold
  compile takes ~35-40 s, ~6-8 s with inductor's on-disk cache warm (the probe warms it for the
  actors on its node). Without a model: float32, contiguous, eager, batch 128.

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
CPU_COMPILE_MIN_WORK_S = 240.0     # eager seconds of work per actor from which compiled settings are measured
CPU_MEASURE_S = 0.75               # each CPU candidate is timed over at least this long (two batches at least)


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
    compile: bool = False
    warmup_s: float = 0.0          # the first call: the compile, for a compiled setting

    def label(self) -> str:
        return f"{self.dtype}, {layout(self.channels_last)}, {'compiled' if self.compile else 'eager'}, batch {self.batch_size}"

    def seconds_for(self, samples: float) -> float:
        """Projected seconds to draw ``samples``, a compiled setting's compile included."""
        return (self.warmup_s if self.compile else 0.0) + samples / self.samples_per_s


def layout(channels_last: bool) -> str:
    return "channels_last" if channels_last else "contiguous"


def explicit_settings(compute_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of :data:`SETTING_KEYS` that the config sets to a value other than ``auto``."""
    return {k: compute_cfg[k] for k in SETTING_KEYS if compute_cfg.get(k, AUTO) != AUTO}


def resolve_device_settings(compute_cfg: Mapping[str, Any], device: torch.device | str,
                            model: torch.nn.Module | None = None,
                            sample_shape: Sequence[int] | None = None,
                            work_samples: float | None = None) -> DeviceSettings:
    """The settings for ``device`` (module docstring): explicit config values, the rest by policy
    (CUDA) or measured on ``model`` at ``sample_shape`` ([3, H, W]; default: the denoiser's
    training size) (CPU). ``work_samples``: the samples one actor is expected to draw (None: unknown,
    compiled settings are not measured). ``model`` is moved to ``device`` when measured."""
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
    sweep = measure_cpu_sweep(model, device, shape, fixed, work_samples)
    best = fastest(sweep, work_samples)
    first = sweep[0]
    chosen = {"dtype": best.dtype, "channels_last": best.channels_last,
              "compile": fixed.get("compile", best.compile), "batch_size": best.batch_size}
    reason = (f"cpu: {_describe(chosen)}: {best.samples_per_s / first.samples_per_s:.2f}x {first.label()} "
              f"(measured {len(sweep)} settings in {time.perf_counter() - start:.1f} s"
              + (f"; compiled ones for {work_samples:,.0f} samples per actor" if any(m.compile for m in sweep) else "")
              + ")" + _explicit_note(fixed))
    return DeviceSettings(**chosen, reason=reason)


def fastest(sweep: Sequence[Measurement], work_samples: float | None) -> Measurement:
    """The measurement that draws ``work_samples`` first (compile included); the highest
    samples/s when the work is unknown."""
    if work_samples is None:
        return max(sweep, key=lambda m: m.samples_per_s)
    return min(sweep, key=lambda m: m.seconds_for(work_samples))


def measure_cpu_sweep(model: torch.nn.Module, device: torch.device, shape: tuple[int, ...],
                      fixed: Mapping[str, Any], work_samples: float | None = None,
                      min_seconds: float = CPU_MEASURE_S) -> list[Measurement]:
    """Samples/s of each candidate (dtype x layout at :data:`CPU_PROBE_BATCH`, then the fastest at
    each of :data:`CPU_BATCHES`; then, when ``work_samples`` at that speed takes at least
    :data:`CPU_COMPILE_MIN_WORK_S`, one compiled candidate at that batch: module docstring),
    explicit values held fixed
    (an explicit ``compile`` is not measured: the eager sweep picks the rest); the first entry is
    the reference (float32, channels_last where free). Each candidate: one warm-up batch (timed:
    the compile), then whole batches for at least ``min_seconds`` (at least two): a fixed count of
    two batches, 0.1 s on the demo's models, let this host's drift pick bf16 eager over a compiled
    setting 1.5x faster."""
    dtypes = [fixed["dtype"]] if "dtype" in fixed else ["float32", "bfloat16"]
    layouts = [fixed["channels_last"]] if "channels_last" in fixed else [True, False]
    probe_batch = fixed.get("batch_size", CPU_PROBE_BATCH)
    image = torch.rand((1, *shape), generator=torch.Generator().manual_seed(0))
    sweep = [_measure(model, device, image, dt, cl, probe_batch, min_seconds) for dt, cl in itertools.product(dtypes, layouts)]
    best = max(sweep, key=lambda m: m.samples_per_s)
    if "batch_size" not in fixed:
        sweep += [_measure(model, device, image, best.dtype, best.channels_last, b, min_seconds)
                  for b in CPU_BATCHES if b != probe_batch]
        best = max(sweep, key=lambda m: m.samples_per_s)
    if "compile" not in fixed and work_samples is not None and work_samples / best.samples_per_s >= CPU_COMPILE_MIN_WORK_S:
        dtype = fixed.get("dtype", "bfloat16" if native_bf16() else "float32")
        sweep.append(_measure(model, device, image, dtype, fixed.get("channels_last", False), best.batch_size,
                              min_seconds, compile=True))
    return sweep


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's check: AVX512-BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _measure(model: torch.nn.Module, device: torch.device, image: torch.Tensor, dtype: str, channels_last: bool,
             batch_size: int, min_seconds: float, compile: bool = False) -> Measurement:
    from pipeline.sampling import MonteCarloSampler

    sampler = MonteCarloSampler(model, batch_size, dtype, str(device), compile=compile, channels_last=channels_last)
    warmup = sampler.warm_up(image.shape[1:], PROBE_SIGMA)  # the compile, for a compiled setting
    batches, start = 0, time.perf_counter()
    while batches < 2 or time.perf_counter() - start < min_seconds:
        batches += 1
        sampler.sample(image, ["device-probe"], [PROBE_SIGMA], 0, batch_size, seed=batches)
    return Measurement(dtype, channels_last, batch_size, batch_size * batches / (time.perf_counter() - start),
                       compile, warmup)


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
                compute_cfg: Mapping[str, Any] | None = None, work_samples: float | None = None) -> list[str]:
    """The CPU sweep as printable lines (one per measured setting, its speed relative to the
    first and its first call, the one that draws ``work_samples`` first marked ``*``); on CUDA the
    policy's reason (nothing is swept)."""
    device = torch.device(device)
    cfg = compute_cfg or {}
    if device.type == "cuda":
        return [resolve_device_settings(cfg, device, model, sample_shape, work_samples).reason]
    sweep = measure_cpu_sweep(model, device, tuple(sample_shape), explicit_settings(cfg), work_samples)
    best = fastest(sweep, work_samples)
    return [f"{'*' if m is best else ' '} {m.label():50s} {m.samples_per_s:9.1f} samples/s "
            f"({m.samples_per_s / sweep[0].samples_per_s:.2f}x; first call {m.warmup_s:.1f} s)" for m in sweep]
