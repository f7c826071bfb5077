"""Calibration fine-tuning: config errors, the resume policy, one step's effect, and a real
two-worker Ray Train run (digits shards made by make_shards, tiny diffusers UNet + timm ResNet,
checkpoints and result on the moto S3 server) that certification's loader reads, resumed to a
later step; and two one-worker runs of ``python -m jobs.finetune``, each on its own local Ray, that
export the same bytes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from diffusers import UNet2DModel

from conftest import REPO
from pipeline.config import ConfigError
from pipeline.digits import digits_split, write_image_folder
from pipeline.finetuning import Finetuner, finetune_config_from_dict, is_holdout, run_finetuning, stat_names
from pipeline.finetuning.train_loop import check_resumable
from pipeline.models.denoiser import load_denoiser
from pipeline.models.factory import create_denoise_classify
from pipeline.shard_writer import make_shards
from pipeline.storage import url_to_fs

SIGMAS = [0.25, 0.5]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny UNet2DModel folder (16x16) and a tiny timm ResNet state dict, random weights."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    UNet2DModel(sample_size=16, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(root / "denoiser")
    safetensors.torch.save_file(timm.create_model("test_resnet", num_classes=10).state_dict(),
                                str(root / "classifier.safetensors"))
    return root


def raw_config(models, **sections) -> dict:
    raw = {
        "data": {"uri": "unused", "format": "parquet", "resolution": 16, "crop": "none"},
        "models": {"denoiser": {"uri": str(models / "denoiser"),
                                "schedule": {"beta_schedule": "linear", "num_train_timesteps": 1000}},
                   "classifier": {"name": "test_resnet", "num_classes": 10,
                                  "uri": str(models / "classifier.safetensors"), "input_size": [3, 16, 16]}},
        "loss": {"sigmas": SIGMAS, "m": 2, "lam": 1.0, "mu": 0.0},
        "training": {"steps": 1, "batch_size": 4, "lr": 1e-3, "ema_decay": 0.5},
        "checkpoint": {"uri": "unused", "name": "run"},
        "output": {"uri": "unused"},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


@pytest.mark.parametrize("override,message", [
    ("loss.m=1", "loss.m: must be an integer >= 2"),
    ("training.ema_decay=1", "training.ema_decay: must be a number in [0, 1)"),
    ("training.lr=0", "training.lr: must be a positive number"),
    ("loss.per_step=some", "loss.per_step: must be one of all, sample"),
    ("compute.workers=2", "compute.workers: unknown key"),
    ("checkpoint.name=a/b", "checkpoint.name: must be a non-empty string without '/'"),
    ("models.denoiser=null", "models.denoiser: required for fine-tuning"),
])
def test_config_errors_name_the_key(models, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        finetune_config_from_dict(raw_config(models), [override])


def test_resume_may_change_only_the_resumable_settings(models, tmp_path):
    def submit(*overrides):
        check_resumable(finetune_config_from_dict(raw_config(models), [f"checkpoint.uri={tmp_path}", *overrides]))

    submit()  # the first submission records its settings beside the checkpoints
    assert (tmp_path / "run" / "finetune_request.json").exists()
    submit("training.steps=10", "training.log_every=1", "training.checkpoint_every=5",
           "training.holdout_limit=8", f"models.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(ConfigError, match=r"checkpoint.name: run exists with a different config \(training.lr differ\)"):
        submit("training.lr=0.01")
    with pytest.raises(ConfigError, match=r"checkpoint.name: run exists with a different config "
                                          r"\(data.resolution, models.denoiser.uri differ\)"):
        submit("data.resolution=32", f"models.denoiser.uri={tmp_path}")
    submit("training.lr=0.01", "checkpoint.name=other")  # a new name is a new run


def test_holdout_split_is_a_stable_fraction():
    ids = [f"img_{i}" for i in range(4000)]
    held = [is_holdout(i, 0.1, seed=0) for i in ids]
    assert 0.08 < np.mean(held) < 0.12
    assert held == [is_holdout(i, 0.1, seed=0) for i in ids]
    assert held != [is_holdout(i, 0.1, seed=1) for i in ids]


def test_one_step_changes_the_unet_not_the_classifier(models):
    torch.set_num_threads(1)
    cfg = finetune_config_from_dict(raw_config(models)).to_dict()  # mu = 0: only the calibration term,
    model = create_denoise_classify(cfg["models"]["denoiser"], cfg["models"]["classifier"])  # which reaches
    finetuner = Finetuner(model, cfg, torch.device("cpu"))  # the UNet only through the classifier
    unet0 = {k: v.clone() for k, v in model.denoiser.unet.state_dict().items()}
    clf0 = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    x01 = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    stats = finetuner.train_step(x01, torch.tensor([0, 1, 2, 3]))
    assert finetuner.step == 1 and stats.shape == (len(stat_names(SIGMAS)),)
    assert not model.classifier.training and not any(p.requires_grad for p in model.classifier.parameters())
    assert all(p.grad is None for p in model.classifier.parameters())
    for k, v in model.classifier.state_dict().items():  # weights and BatchNorm statistics
        torch.testing.assert_close(v, clf0[k], rtol=0, atol=0)
    changed = [k for k, v in model.denoiser.unet.state_dict().items() if not torch.equal(v, unet0[k])]
    assert len(changed) > 0.9 * len(unet0), "the calibration gradient did not reach the UNet through the classifier"
    # EMA (decay 0.5) moved half-way: between the old and the new weights
    name = "conv_in.weight"
    ema = finetuner.ema.module.state_dict()[name]
    torch.testing.assert_close(ema, 0.5 * (unet0[name] + model.denoiser.unet.state_dict()[name]))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    images, labels = digits_split()["train"]
    root = tmp_path_factory.mktemp("digits")
    write_image_folder(images[:24], labels[:24], root / "images")
    return make_shards(str(root / "images"), str(root / "shards"), "parquet", shard_size=8)


def run_overrides(shards, checkpoints: str, output: str) -> list[str]:
    """What every Ray Train run here sets: the digits shards, where checkpoints and the result go,
    and a small CPU run with a held-out split."""
    return [f"data.uri={os.path.dirname(shards[0])}", f"checkpoint.uri={checkpoints}", f"output.uri={output}",
            "compute.cpus_per_worker=0.5", "compute.torch_threads=1", "training.batch_size=4",
            "training.holdout_fraction=0.2", "loss.mu=1.0"]


def test_two_worker_run_on_s3_is_certifiable_and_resumes(ray_local, s3_bucket, models, shards, tmp_path):
    base = f"s3://{s3_bucket}"
    overrides = [*run_overrides(shards, f"{base}/checkpoints", f"{base}/finetuned"), "compute.num_workers=2",
                 "compute.cpus_per_task=0.5", "compute.max_failures=0", "training.log_every=1",
                 "training.checkpoint_every=2",
                 # a relative path names the same file for the workers as for the driver
                 f"models.classifier.uri={os.path.relpath(models / 'classifier.safetensors')}"]
    first = run_finetuning(finetune_config_from_dict(raw_config(models), [*overrides, "training.steps=3"]))
    assert first["metrics"]["step"] == 3 and first["metrics"]["start_step"] == 0
    assert first["checkpoint"].endswith("step-00000003")

    cfg = raw_config(models)
    original = load_denoiser(cfg["models"]["denoiser"])
    tuned = load_denoiser({"uri": f"{base}/finetuned"}, cache_dir=str(tmp_path / "cache1"))
    assert tuned.schedule == original.schedule
    diff = [k for k, v in tuned.unet.state_dict().items() if not torch.equal(v, original.unet.state_dict()[k])]
    assert diff, "the exported denoiser equals the original"

    # re-submitting the same checkpoint name resumes at step 3 and trains to the new total
    second = run_finetuning(finetune_config_from_dict(raw_config(models), [*overrides, "training.steps=4"]))
    assert second["metrics"]["step"] == 4 and second["metrics"]["start_step"] == 3
    fs, path = url_to_fs(f"{base}/finetuned")
    written = json.loads(fs.cat_file(f"{path}/finetune_config.json"))
    assert written["steps"] == 4 and written["config"]["training"]["steps"] == 4
    held_out = [written["final_metrics"][f"holdout_{k}@{s:g}"] for k in ("topfreq_recoverable", "recoverable")
                for s in SIGMAS]
    assert all(0 <= v <= 1 for v in held_out if v == v) and any(v == v for v in held_out)
    resumed = load_denoiser({"uri": f"{base}/finetuned"}, cache_dir=str(tmp_path / "cache2"))
    assert any(not torch.equal(v, tuned.unet.state_dict()[k]) for k, v in resumed.unet.state_dict().items())

    # a re-submission that would change the trajectory is refused before any work
    with pytest.raises(ConfigError, match=r"checkpoint.name: run exists with a different config \(loss.lam differ\)"):
        run_finetuning(finetune_config_from_dict(raw_config(models), [*overrides, "training.steps=5", "loss.lam=2.0"]))


def test_command_line_runs_on_their_own_local_ray_repeat_bit_for_bit(models, shards, tmp_path):
    """Two fresh ``python -m jobs.finetune`` runs of the same one-worker config, each with no cluster
    to join, export the same weights byte for byte (what makes the committed demo denoiser
    reproducible): the batches follow the shards' order, not the order in which the decode tasks
    finish. Each embedded local Ray serves the state API, so Ray Train's placement-group cleaner
    can watch the controller (without the dashboard it logged "State API may be temporarily
    unavailable" at every poll)."""
    config = tmp_path / "finetune.yaml"
    config.write_text(json.dumps(raw_config(models)))  # JSON is YAML
    env = {**os.environ, "RAY_ADDRESS": ""}  # no cluster to join

    def run(name: str) -> bytes:
        overrides = [*run_overrides(shards, str(tmp_path / "checkpoints"), str(tmp_path / name)),
                     f"checkpoint.name={name}", "compute.num_workers=1", "compute.cpus_per_task=0.25",
                     "training.steps=6"]
        out = subprocess.run([sys.executable, "-m", "jobs.finetune", "--config", str(config),
                              *(a for o in overrides for a in ("--set", o))],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        logs = out.stdout + out.stderr
        assert out.returncode == 0, logs[-3000:]
        assert "State API may be temporarily unavailable" not in logs
        assert json.loads(out.stdout.strip().splitlines()[-1])["metrics"]["step"] == 6
        return (tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    assert run("first") == run("second")
