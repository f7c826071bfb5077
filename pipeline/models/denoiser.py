"""One-shot diffusion denoiser D_sigma: a diffusers UNet2DModel plus its training schedule.

Loads a diffusers folder (``save_pretrained`` layout) or an original guided-/improved-diffusion
checkpoint (converted by :mod:`pipeline.models.adm`) from any URI that :mod:`pipeline.storage`
can fetch, or builds a preset's architecture with random weights when the spec says
``random_weights: true``. Weights are read with safetensors or ``torch.load(weights_only=True)`` only.

Input placement (``models.denoiser.input``, :class:`InputPlacement`): how the certification
resolution R (``data.resolution``) meets the UNet trained at S (its ``sample_size``):

* ``direct`` (default): the UNet runs on the R x R input as it is. Without ``size`` R must be S;
  ``size: R`` declares running the fully convolutional UNet off its training size (Carlini et
  al. run the ImageNet-256 ADM on 224 x 224). R must be a multiple of the UNet's downsampling
  factor.
* ``reflect_pad``: the input is reflect-padded symmetrically to ``size`` (default S) and the
  UNet's output centre-cropped back to R (Jeong & Shin: 224 -> 256 -> 224, their
  ``CropWrapper``). Padding commutes with the per-pixel scaling x -> x_t, so x_t is padded
  and x0_hat computed at R from x_t and the cropped output.

Any other mismatch is refused with a :class:`~pipeline.config.ConfigError` naming the keys,
when the model is created (:func:`pipeline.models.factory.create_denoise_classify`) and again
at every forward pass on the actual input size.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention

from pipeline.config import ConfigError
from pipeline.models.adm import adm_unet_config, convert_adm_state_dict
from pipeline.diffusion import NoiseSchedule, diffusion_input, predict_x0, timestep_for_sigma
from pipeline.models.presets import preset
from pipeline.storage import fetch_to_cache, is_local, load_state_dict_strict, read_state_dict, url_to_fs

SPEC_KEYS = frozenset({"uri", "random_weights", "preset", "adm_config", "schedule", "input"})
PLACEMENT_MODES = ("direct", "reflect_pad")
UNET_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SCHEDULE_KEYS = ("beta_schedule", "num_train_timesteps", "beta_start", "beta_end", "prediction_type",
                 "rescale_timesteps")


@dataclass(frozen=True)
class InputPlacement:
    """``models.denoiser.input``: ``mode`` (direct | reflect_pad) and ``size``, the side the
    UNet runs at (None: direct runs at the input's own side, which must be the UNet's size;
    reflect_pad pads to the UNet's size). See the module docstring."""

    mode: str = "direct"
    size: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in PLACEMENT_MODES:
            raise ConfigError(f"models.denoiser.input.mode: must be one of {', '.join(PLACEMENT_MODES)}, "
                              f"got {self.mode!r}")

    def padding(self, resolution: int, unet_size: int, downsampling: int) -> int:
        """Reflect padding on each side for an R = ``resolution`` input (0 for direct) after
        checking that this placement covers R for a UNet trained at ``unet_size`` whose
        spatial size must be a multiple of ``downsampling``; ConfigError naming the keys."""
        key, side = "models.denoiser.input", self.size or unet_size
        if self.mode == "direct":
            if resolution != side:
                if self.size is None:
                    raise ConfigError(
                        f"data.resolution: {resolution} differs from the denoiser UNet's size {unet_size}; declare "
                        f"{key}.mode: reflect_pad (pad to {unet_size}, crop back) or {key}: {{mode: direct, "
                        f"size: {resolution}}} (run the fully convolutional UNet on {resolution} directly)")
                raise ConfigError(f"{key}.size: {self.size} must equal data.resolution ({resolution}) in direct mode")
        else:
            pad, odd = divmod(side - resolution, 2)
            if side <= resolution or odd or pad >= resolution:
                raise ConfigError(
                    f"{key}.size: reflect_pad needs a padded side ({side}) larger than data.resolution "
                    f"({resolution}) by an even amount less than twice data.resolution")
        if side % downsampling:
            raise ConfigError(f"{key}.size: the UNet runs at {side}, not a multiple of its downsampling factor "
                              f"{downsampling} (data.resolution {resolution})")
        return 0 if self.mode == "direct" else (side - resolution) // 2


class Denoiser(torch.nn.Module):
    """x_noisy = x + sigma*eps in [0,1] pixel units -> x0_hat in [0,1] (DESIGN.md section 3),
    at the input's resolution, the UNet seeing it as ``placement`` says (module docstring).

    Differentiable (no inference_mode, no host sync). ``weight_files`` maps the loaded weight
    files' URIs to their local paths (for :func:`pipeline.models.factory.model_checksums`).
    """

    def __init__(self, unet: UNet2DModel, schedule: NoiseSchedule,
                 placement: InputPlacement = InputPlacement()) -> None:
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        self.placement = placement
        self.prediction_type = schedule.prediction_type
        self.timestep_scale = schedule.timestep_scale
        # float64 bits kept in an int64 buffer: follows .to(device) but not .to(dtype)/.half(),
        # so the timestep table never loses precision. Not part of the state dict.
        self.register_buffer("_alphas_cumprod_bits", schedule.alphas_cumprod().view(torch.int64), persistent=False)
        self.weight_files: dict[str, str] = {}

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """float64 [T] on the module's device."""
        return self._alphas_cumprod_bits.view(torch.float64)

    @property
    def image_size(self) -> int:
        """The UNet's training resolution (its ``sample_size``)."""
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else size[0])

    @property
    def downsampling(self) -> int:
        """The factor the UNet's spatial input size must be a multiple of."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    def check_resolution(self, resolution: int) -> int:
        """The reflect padding per side for ``resolution`` x ``resolution`` inputs (0 when
        direct); ConfigError naming the keys when the placement does not cover it."""
        return self.placement.padding(resolution, self.image_size, self.downsampling)

    def timesteps(self, sigma: torch.Tensor) -> torch.LongTensor:
        """Diffusion timestep per sigma, same shape as ``sigma``."""
        return timestep_for_sigma(self.alphas_cumprod, sigma)

    def forward(self, x_noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x0_hat in [0,1] for x_noisy [B,3,R,R]; ``sigma`` scalar or [B]."""
        height, width = x_noisy.shape[-2:]
        if height != width:
            raise ValueError(f"the denoiser takes square images, got {height} x {width}")
        pad = self.check_resolution(int(height))
        t = self.timesteps(sigma).reshape(-1).expand(x_noisy.shape[0])
        acp = self.alphas_cumprod[t]
        x_t = diffusion_input(x_noisy, acp.sqrt())
        unet_in = F.pad(x_t, (pad, pad, pad, pad), mode="reflect") if pad else x_t
        out = self.unet(unet_in, t.to(torch.float32) * self.timestep_scale).sample
        if pad:
            out = out[..., pad:pad + height, pad:pad + width]
        return (predict_x0(x_t, out, acp, self.prediction_type) + 1.0) / 2.0


def load_denoiser(spec: Mapping[str, Any], cache_dir: str | None = None) -> Denoiser:
    """A :class:`Denoiser` from ``spec`` (keys: uri, random_weights, preset, adm_config,
    schedule, input).

    Weights come from exactly one of ``uri`` and ``random_weights: true``. ``uri``: a diffusers
    folder with unet/ (+ scheduler/), a bare UNet2DModel folder, or an original ADM checkpoint
    (.pt/.pth/.safetensors; needs ``preset`` or ``adm_config``). ``random_weights``: the
    preset's / adm_config's architecture, randomly initialised (smoke tests, benchmarks).
    Schedule: preset < the folder's scheduler/ config < ``spec['schedule']``; ``adm_config``
    overrides the preset's keys. ``input``: the :class:`InputPlacement` ({mode, size}).
    A checkpoint that does not fit fails naming the keys.
    """
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ValueError(f"unknown denoiser spec keys {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    uri, random_weights = spec.get("uri"), bool(spec.get("random_weights"))
    if (uri is None) == (not random_weights):
        raise ValueError("denoiser: give exactly one of a weights uri and random_weights: true")
    base = preset(spec["preset"]) if spec.get("preset") else {}
    adm_config = {**base.get("adm_config", {}), **(spec.get("adm_config") or {})}
    weights, weight_uri, folder_schedule = None, None, {}
    if random_weights:
        if not adm_config:
            raise ValueError("denoiser: random_weights needs a preset or an adm_config for the architecture")
        unet = UNet2DModel(**adm_unet_config(adm_config))
    else:
        local = fetch_to_cache(uri, cache_dir)
        if os.path.isdir(local):
            unet, weights, folder_schedule = _load_diffusers_folder(local)
            weight_uri = f"{uri.rstrip('/')}/{os.path.relpath(weights, local)}"
        else:
            if not adm_config:
                raise ValueError(f"{uri} is an original ADM checkpoint: give a preset or an adm_config")
            unet = convert_adm_state_dict(read_state_dict(local), adm_config)
            weights, weight_uri = local, uri
    schedule = {**base.get("schedule", {}), **folder_schedule, **(spec.get("schedule") or {})}
    if "beta_schedule" not in schedule or "num_train_timesteps" not in schedule:
        raise ValueError(f"no noise schedule for {uri}: give a preset or schedule.beta_schedule and "
                         "schedule.num_train_timesteps")
    denoiser = Denoiser(unet, NoiseSchedule(**schedule), InputPlacement(**(spec.get("input") or {}))).eval()
    if weight_uri is not None:
        denoiser.weight_files[weight_uri] = weights
    return denoiser


def _load_diffusers_folder(folder: str) -> tuple[UNet2DModel, str, dict[str, Any]]:
    """(unet, weights file, schedule keys of scheduler/scheduler_config.json if present)."""
    unet_dir = os.path.join(folder, "unet") if os.path.isdir(os.path.join(folder, "unet")) else folder
    if not os.path.isfile(os.path.join(unet_dir, "config.json")):
        raise ValueError(f"{folder} is neither a diffusers pipeline folder (unet/) nor a UNet2DModel folder")
    config = UNet2DModel.load_config(unet_dir)
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"{unet_dir} holds a {config['_class_name']}, not a UNet2DModel")
    weights = next((os.path.join(unet_dir, n) for n in UNET_WEIGHTS if os.path.isfile(os.path.join(unet_dir, n))), None)
    if weights is None:
        raise ValueError(f"{unet_dir} has none of {UNET_WEIGHTS}")
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        unet = UNet2DModel.from_config(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in read_state_dict(weights).items()}
    load_state_dict_strict(unet, state, weights, assign=True)
    scheduler_config = os.path.join(folder, "scheduler", "scheduler_config.json")
    schedule: dict[str, Any] = {}
    if os.path.isfile(scheduler_config):
        with open(scheduler_config) as f:
            schedule = {k: v for k, v in json.load(f).items() if k in SCHEDULE_KEYS}
    return unet, weights, schedule


def save_denoiser(denoiser: Denoiser, path: str) -> None:
    """Write ``denoiser`` as a diffusers folder at ``path`` (local or any fsspec URI):
    unet/ (config + safetensors) and scheduler/ (DDPMScheduler config + rescale_timesteps),
    which :func:`load_denoiser` reads back to the same model. Raises ValueError, writing
    nothing, for a model its config cannot rebuild (ADM with mixed attention head dims)."""
    _check_config_round_trip(denoiser.unet)
    fs, target = url_to_fs(path)
    if is_local(fs):
        _write_folder(denoiser, target)
        return
    with tempfile.TemporaryDirectory() as tmp:
        _write_folder(denoiser, tmp)
        for root, _, files in os.walk(tmp):
            for name in files:
                local = os.path.join(root, name)
                fs.put_file(local, f"{target.rstrip('/')}/{os.path.relpath(local, tmp)}")


def _check_config_round_trip(unet: UNet2DModel) -> None:
    """Raise unless UNet2DModel(**unet.config) has unet's attention head counts (the ADM
    converter sets per-layer counts for mixed head dims, which a config cannot express)."""
    with torch.device("meta"):
        rebuilt = UNet2DModel.from_config(unet.config)
    lost = [name for name, module in unet.named_modules()
            if isinstance(module, Attention) and module.heads != rebuilt.get_submodule(name).heads]
    if lost:
        raise ValueError(f"attention head counts of {', '.join(lost)} cannot be saved in a UNet2DModel config")


def _write_folder(denoiser: Denoiser, folder: str) -> None:
    denoiser.unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
    s = denoiser.schedule
    learned_variance = denoiser.unet.config.out_channels == 2 * denoiser.unet.config.in_channels
    scheduler = DDPMScheduler(
        beta_schedule=s.beta_schedule, num_train_timesteps=s.num_train_timesteps,
        beta_start=s.beta_start, beta_end=s.beta_end, prediction_type=s.prediction_type,
        variance_type="learned_range" if learned_variance else "fixed_small",
    )
    scheduler.register_to_config(rescale_timesteps=s.rescale_timesteps)
    scheduler.save_pretrained(os.path.join(folder, "scheduler"))
