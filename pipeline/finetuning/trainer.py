"""One worker's training state and step: model, optimizer, LR schedule, EMA, held-out statistics.

Guarantees:
* Only the UNet trains: the classifier is frozen (``requires_grad`` False, eval mode) while the
  loss's gradients flow through it into the UNet.
* The noise of a step is seeded by (seed, rank, step, purpose), so a resumed run draws what the
  uninterrupted one would have; nothing here syncs with the host except :func:`holdout_report`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from pipeline.finetuning.data import on_device
from pipeline.finetuning.loss import CalibrationLoss, holdout_statistics
from pipeline.models.denoiser import Denoiser
from pipeline.models.factory import DenoiseAndClassify


def warmup_cosine(warmup: int, steps: int) -> Callable[[int], float]:
    """LR factor: linear warm-up over ``warmup`` steps, then cosine decay to zero at ``steps``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))
    return factor


def stat_names(sigmas: Sequence[float]) -> list[str]:
    """Names of the per-step statistics, in the order of :meth:`Finetuner.train_step`'s vector."""
    per_sigma = [f"{k}@{s:g}" for k in ("recoverable", "brier", "collision") for s in sigmas]
    return ["loss", "calibration", "mse", "grad_norm", "lr", *per_sigma]


class Finetuner:
    """Model, optimizer, LR schedule and EMA of one worker, and the step that updates them.

    ``wrap`` prepares the loss module for data parallelism (``ray.train.torch.prepare_model``
    in a Ray worker; identity alone). Nothing here syncs with the host.
    """

    def __init__(self, model: DenoiseAndClassify, cfg: Mapping[str, Any], device: torch.device,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m) -> None:
        self.cfg, self.device = cfg, device
        t = cfg["training"]
        self.model = model.to(device)
        self.model.classifier.requires_grad_(False).eval()
        self.model.denoiser.train()
        self.unet = self.model.denoiser.unet
        self.ema = torch.optim.swa_utils.AveragedModel(
            self.unet, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(t["ema_decay"]), use_buffers=True)
        self.ema.update_parameters(self.unet)  # the first update copies: the EMA starts at the pretrained weights
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(t["warmup_steps"], t["steps"]))
        self.loss = wrap(CalibrationLoss(self.model, cfg["loss"]))
        self.sigmas = torch.tensor(cfg["loss"]["sigmas"], dtype=torch.float32, device=device)
        self.step, self.epoch = 0, 0
        self.autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and t["bf16"])

    def generator(self, rank: int, purpose: int) -> torch.Generator:
        """A device generator seeded by (seed, rank, step, purpose): resumes draw the same noise."""
        seed = np.random.SeedSequence([self.cfg["training"]["seed"], rank, self.step, purpose]).generate_state(1)[0]
        return torch.Generator(self.device).manual_seed(int(seed))

    def step_sigmas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas of this step, their indices): all, or one drawn from (seed, step), the same on every rank."""
        if self.cfg["loss"]["per_step"] == "all":
            index = torch.arange(self.sigmas.numel(), device=self.device)
        else:
            rng = np.random.default_rng([self.cfg["training"]["seed"], self.step])
            index = torch.tensor([int(rng.integers(self.sigmas.numel()))], device=self.device)
        return self.sigmas[index], index

    def train_step(self, x01: torch.Tensor, labels: torch.Tensor, rank: int = 0) -> torch.Tensor:
        """One optimizer step; returns the statistics vector (order: :func:`stat_names`; nan for sigmas not drawn)."""
        sigmas, index = self.step_sigmas()
        with torch.autocast(**self.autocast):
            out = self.loss(x01, labels, sigmas, self.generator(rank, 0))
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.cfg["training"]["grad_clip"])
        lr = torch.tensor(self.scheduler.get_last_lr()[0], device=self.device)
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update_parameters(self.unet)
        self.step += 1
        per_sigma = []
        for key in ("recoverable", "brier", "collision"):
            full = torch.full_like(self.sigmas, float("nan"))
            per_sigma.append(full.index_copy(0, index, out.per_sigma[key].float()))
        head = torch.stack([out.loss.detach(), out.calibration, out.mse, grad_norm, lr]).float()
        return torch.cat([head, *per_sigma])

    def ema_model(self) -> DenoiseAndClassify:
        """The EMA denoiser with the frozen classifier (shares the classifier, not a copy)."""
        denoiser = Denoiser(self.ema.module, self.model.denoiser.schedule, self.model.denoiser.placement).to(self.device).eval()
        return DenoiseAndClassify(denoiser, self.model.classifier)

    def holdout_sums(self, batches, rank: int = 0) -> torch.Tensor:
        """Sums [S, 4] of :func:`holdout_statistics` over ``batches`` with the EMA weights."""
        model, total = self.ema_model(), torch.zeros(self.sigmas.numel(), 4, device=self.device)
        generator = self.generator(rank, 1)
        for batch in batches:
            x01, labels = on_device(batch, self.device)
            with torch.autocast(**self.autocast):
                total += holdout_statistics(model, x01, labels, self.sigmas, self.cfg["loss"]["m"], generator)
        return total

    def state_dict(self) -> dict:
        return {"unet": self.unet.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step, "epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.unet.load_state_dict(state["unet"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])


def holdout_report(sums: torch.Tensor, sigmas: Sequence[float]) -> dict[str, float]:
    """Per sigma: fraction recoverable and mean top-class frequency of (un)recoverable images."""
    out = {}
    for s, (n_rec, f_rec, n_un, f_un) in zip(sigmas, sums.tolist()):
        total = n_rec + n_un
        out[f"holdout_recoverable@{s:g}"] = n_rec / total if total else float("nan")
        out[f"holdout_topfreq_recoverable@{s:g}"] = f_rec / n_rec if n_rec else float("nan")
        out[f"holdout_topfreq_unrecoverable@{s:g}"] = f_un / n_un if n_un else float("nan")
    return out
