"""Training of the demo's two models on the digits training split (CPU, minutes).

Guarantees:
* Training is reproducible (fixed seeds; bit-identical with one torch thread and deterministic
  algorithms): the classifier, a small timm ResNet (``CLASSIFIER_SPEC``), sees only clean
  training images (random one-pixel shifts as augmentation); the denoiser, a small diffusers
  ``UNet2DModel`` (``UNET_CONFIG``), is a DDPM with epsilon prediction on the linear 1000-step
  schedule, trained on images in [-1, 1]. Its training timesteps are weighted towards the
  one-shot denoising levels the demo certifies at (``DEMO_SIGMA_RANGE``), with the rest drawn
  uniformly so it stays a DDPM over all t.
* :func:`save_models` writes, a few MB: ``{out}/denoiser/{unet,scheduler}/`` (diffusers layout,
  safetensors, float16 weights), ``{out}/classifier.safetensors`` (timm state dict, float16) and
  ``{out}/classifier.json`` (the classifier spec minus its ``uri``).
* :func:`finetune_denoiser` fine-tunes ``{out}/denoiser`` for the cascade (pipeline.finetuning,
  configs/finetune-demo.yaml, on the digits training split, always from scratch in a work
  folder) and writes the EMA result as ``{out}/denoiser-finetuned`` (same layout, float16).
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from safetensors.torch import save_file

from pipeline.diffusion import NoiseSchedule, alphas_cumprod_for, timestep_for_sigma
from pipeline.digits import NUM_CLASSES, REPO, SEED, SIZE, write_digit_shards
from pipeline.finetuning import load_finetune_config, run_finetuning
from pipeline.models.classifier import Classifier
from pipeline.models.denoiser import Denoiser, load_denoiser, save_denoiser

FINETUNE_CONFIG = REPO / "configs" / "finetune-demo.yaml"

DEMO_SIGMA_RANGE = (0.3, 2.5)     # denoising levels the training timesteps concentrate on (see README)
SPECIALISED_FRACTION = 0.8        # share of training timesteps drawn from that range

CLASSIFIER_SPEC: Mapping[str, Any] = {
    "name": "test_resnet",
    "num_classes": NUM_CLASSES,
    "model_kwargs": {},
    "input_size": [3, 32, 32],
}
UNET_CONFIG: Mapping[str, Any] = {
    "sample_size": SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (16, 32, 64),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
}
SCHEDULE: Mapping[str, Any] = {"beta_schedule": "linear", "num_train_timesteps": 1000,
                               "prediction_type": "epsilon"}


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Each image translated by up to ``max_shift`` pixels per axis, zero padded."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


def _lr(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_classifier(classifier: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
                     batch_size: int = 128, lr: float = 3e-3, seed: int = SEED) -> torch.nn.Module:
    """Cross-entropy training of ``classifier`` ([0,1] images -> logits) on clean images."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=0.05)
    classifier.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        loss = F.cross_entropy(classifier(random_shift(x[idx], g)), y[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return classifier.eval()


def training_timesteps(n: int, acp: torch.Tensor, g: torch.Generator) -> torch.LongTensor:
    """``n`` timesteps: SPECIALISED_FRACTION uniform over the demo's sigma range, the rest over all t."""
    lo, hi = (int(t) for t in timestep_for_sigma(acp, DEMO_SIGMA_RANGE))
    special = torch.randint(lo, hi + 1, (n,), generator=g)
    anywhere = torch.randint(0, acp.numel(), (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < SPECIALISED_FRACTION, special, anywhere)


def train_denoiser(unet: UNet2DModel, x: torch.Tensor, steps: int, batch_size: int = 32,
                   lr: float = 2e-3, seed: int = SEED) -> UNet2DModel:
    """DDPM epsilon-prediction training of ``unet`` on images ``x`` in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    acp = alphas_cumprod_for(SCHEDULE["beta_schedule"], SCHEDULE["num_train_timesteps"]).float()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    unet.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        x0 = 2.0 * x[torch.randint(0, len(x), (batch_size,), generator=g)] - 1.0
        t = training_timesteps(batch_size, acp, g)
        eps = torch.randn(x0.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
    return unet.eval()


def save_models(unet: UNet2DModel, classifier: Classifier, out: str | Path) -> None:
    """Write the denoiser (diffusers layout via save_denoiser) and the classifier (safetensors +
    json spec), both with float16 weights (the loaders compute in float32)."""
    out = Path(out)
    save_denoiser(Denoiser(copy.deepcopy(unet).half(), NoiseSchedule(**SCHEDULE)), str(out / "denoiser"))
    state = {k: v.detach().half() if v.is_floating_point() else v.detach()
             for k, v in classifier.model.state_dict().items()}
    save_file(state, str(out / "classifier.safetensors"))
    (out / "classifier.json").write_text(json.dumps(dict(CLASSIFIER_SPEC), indent=2) + "\n")


def finetune_denoiser(models: str | Path, work: str | Path, overrides: Sequence[str] = ()) -> dict:
    """Fine-tune ``{models}/denoiser`` with configs/finetune-demo.yaml (+ ``overrides``) on the
    digits training split, from scratch under ``work`` (shards, Ray Train checkpoints, the
    float32 export), then write it as ``{models}/denoiser-finetuned`` (float16); returns
    run_finetuning's summary."""
    models, work = Path(models).resolve(), Path(work).resolve()
    train_uri = write_digit_shards("train", work / "train_images", work / "train_shards", shard_size=500,
                                   prefix="train")
    cfg = load_finetune_config(str(FINETUNE_CONFIG), [
        f"data.uri={train_uri}", f"models.denoiser.uri={models / 'denoiser'}",
        f"models.classifier.uri={models / 'classifier.safetensors'}", f"checkpoint.uri={work / 'checkpoints'}",
        f"output.uri={work / 'denoiser'}", *overrides])
    summary = run_finetuning(cfg)
    tuned = load_denoiser({"uri": str(work / "denoiser")})
    save_denoiser(Denoiser(tuned.unet.half(), tuned.schedule), str(models / "denoiser-finetuned"))
    return summary
