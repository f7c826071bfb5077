"""One-shot diffusion denoiser D_sigma: a diffusers UNet2DModel plus its training schedule.

Loads a diffusers folder (``save_pretrained`` layout) or an original guided-/improved-diffusion
checkpoint (converted by :mod:`pipeline.models.adm`) from any URI that :mod:`pipeline.storage`
can fetch. Weights are read with safetensors or ``torch.load(weights_only=True)`` only.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention

from pipeline.models.adm import adm_unet_config, convert_adm_state_dict
from pipeline.diffusion import NoiseSchedule, diffusion_input, predict_x0, timestep_for_sigma
from pipeline.models.presets import preset
from pipeline.storage import fetch_to_cache, is_local, load_state_dict_strict, read_state_dict, url_to_fs

SPEC_KEYS = frozenset({"uri", "preset", "adm_config", "schedule"})
UNET_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SCHEDULE_KEYS = ("beta_schedule", "num_train_timesteps", "beta_start", "beta_end", "prediction_type",
                 "rescale_timesteps")


class Denoiser(torch.nn.Module):
    """x_noisy = x + sigma*eps in [0,1] pixel units -> x0_hat in [0,1] (DESIGN.md section 3).

    Differentiable (no inference_mode, no host sync). ``weight_files`` maps the loaded weight
    files' URIs to their local paths (for :func:`pipeline.models.factory.model_checksums`).
    """

    def __init__(self, unet: UNet2DModel, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.unet = unet
        self.schedule = schedule
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
        """The UNet's training resolution (the certification resolution it expects)."""
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else size[0])

    def timesteps(self, sigma: torch.Tensor) -> torch.LongTensor:
        """Diffusion timestep per sigma, same shape as ``sigma``."""
        return timestep_for_sigma(self.alphas_cumprod, sigma)

    def forward(self, x_noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x0_hat in [0,1] for x_noisy [B,3,H,W]; ``sigma`` scalar or [B]."""
        t = self.timesteps(sigma).reshape(-1).expand(x_noisy.shape[0])
        acp = self.alphas_cumprod[t]
        x_t = diffusion_input(x_noisy, acp.sqrt())
        out = self.unet(x_t, t.to(torch.float32) * self.timestep_scale).sample
        return (predict_x0(x_t, out, acp, self.prediction_type) + 1.0) / 2.0


def load_denoiser(spec: Mapping[str, Any], cache_dir: str | None = None) -> Denoiser:
    """A :class:`Denoiser` from ``spec`` (keys: uri, preset, adm_config, schedule).

    ``uri``: a diffusers folder with unet/ (+ scheduler/), a bare UNet2DModel folder, or an
    original ADM checkpoint (.pt/.pth/.safetensors; needs ``preset`` or ``adm_config``).
    Without ``uri``: the preset's / adm_config's architecture with random weights (benchmarks).
    Schedule: preset < the folder's scheduler/ config < ``spec['schedule']``; ``adm_config``
    overrides the preset's keys. A checkpoint that does not fit fails naming the keys.
    """
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ValueError(f"unknown denoiser spec keys {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    base = preset(spec["preset"]) if spec.get("preset") else {}
    adm_config = {**base.get("adm_config", {}), **(spec.get("adm_config") or {})}
    uri = spec.get("uri")
    weights, weight_uri, folder_schedule = None, None, {}
    if uri is None:
        if not adm_config:
            raise ValueError("denoiser: give a uri, or a preset / adm_config for random weights")
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
    denoiser = Denoiser(unet, NoiseSchedule(**schedule)).eval()
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
