"""pipeline.models.denoiser / factory: small real diffusers UNets with random weights, the ADM
fixtures, diffusers folders on local disk and on a real S3 server."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import boto3
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from pipeline.diffusion import NoiseSchedule, alphas_cumprod_for
from pipeline.models.adm import adm_unet_config
from pipeline.models.denoiser import Denoiser, load_denoiser, save_denoiser
from pipeline.models.factory import DenoiseAndClassify, create_denoise_classify, model_checksums
from pipeline.models.presets import PRESETS
from tests.golden import TIMESTEPS

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "adm"
ADM_SCHEDULES = {
    "guided-small": {"beta_schedule": "linear", "num_train_timesteps": 1000},
    "improved-small": {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 4000, "rescale_timesteps": True},
}


def small_unet(out_channels: int = 3, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=out_channels, block_out_channels=(32, 64),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()


def inputs(batch: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sigma = torch.tensor([0.25, 0.5, 1.0])[:batch]
    x = torch.rand(batch, 3, 32, 32, generator=g)
    return x + sigma.reshape(-1, 1, 1, 1) * torch.randn(x.shape, generator=g), sigma


def reference_x0(unet: UNet2DModel, x_noisy: torch.Tensor, sigma: torch.Tensor, schedule: NoiseSchedule) -> np.ndarray:
    """DESIGN.md section 3 spelled out in numpy around the raw UNet (epsilon prediction)."""
    acp = alphas_cumprod_for(schedule.beta_schedule, schedule.num_train_timesteps).numpy()
    s = sigma.double().numpy()
    t = np.array([np.nonzero(np.sqrt(acp) <= 1 / np.sqrt(1 + 4 * v * v))[0][0] for v in s])
    a = acp[t][:, None, None, None]
    x_t = np.sqrt(a) * (2 * x_noisy.double().numpy() - 1)
    model_t = torch.from_numpy(t * (1000 / schedule.num_train_timesteps if schedule.rescale_timesteps else 1.0))
    with torch.no_grad():
        eps = unet(torch.from_numpy(x_t).float(), model_t.float()).sample[:, :3].double().numpy()
    return (np.clip((x_t - np.sqrt(1 - a) * eps) / np.sqrt(a), -1, 1) + 1) / 2


@pytest.mark.parametrize("out_channels,schedule", [
    (3, NoiseSchedule("linear", 1000)),
    (6, NoiseSchedule("squaredcos_cap_v2", 4000, rescale_timesteps=True)),
])
def test_forward_matches_direct_computation(out_channels, schedule):
    unet = small_unet(out_channels)
    denoiser = Denoiser(unet, schedule)
    x_noisy, sigma = inputs()
    with torch.no_grad():
        got = denoiser(x_noisy, sigma)
    assert got.shape == x_noisy.shape and got.min() >= 0 and got.max() <= 1
    np.testing.assert_allclose(got.double().numpy(), reference_x0(unet, x_noisy, sigma, schedule), atol=2e-5)
    assert denoiser.image_size == 32
    table = TIMESTEPS[schedule.beta_schedule, schedule.num_train_timesteps]
    assert denoiser.timesteps(sigma).tolist() == [table[float(s)] for s in sigma]


def test_scalar_sigma_and_dtype_casts_keep_the_schedule():
    denoiser = Denoiser(small_unet(), NoiseSchedule("linear", 1000))
    x_noisy, _ = inputs(batch=2)
    with torch.no_grad():
        torch.testing.assert_close(denoiser(x_noisy, torch.tensor(0.5)), denoiser(x_noisy, torch.tensor([0.5, 0.5])))
    denoiser.to(torch.bfloat16)
    assert denoiser.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(denoiser.alphas_cumprod, alphas_cumprod_for("linear", 1000), rtol=0, atol=0)
    assert "_alphas_cumprod_bits" not in denoiser.state_dict()


def test_bfloat16_autocast_on_cpu():
    denoiser = Denoiser(small_unet(6), NoiseSchedule("linear", 1000))
    x_noisy, sigma = inputs()
    with torch.no_grad():
        full = denoiser(x_noisy, sigma)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = denoiser(x_noisy, sigma)
    assert half.dtype == torch.float32  # the x0 arithmetic stays in the input's precision
    assert (half - full).abs().max() < 0.1 and (half - full).abs().mean() < 0.01


def test_forward_is_differentiable():
    unet = small_unet()
    denoiser = Denoiser(unet, NoiseSchedule("linear", 1000)).train()
    x_noisy, sigma = inputs()
    x_noisy.requires_grad_(True)
    denoiser(x_noisy, sigma).square().mean().backward()
    grads = [p.grad for p in unet.parameters()]
    assert all(g is not None for g in grads)
    assert sum(int(g.abs().sum() > 0) for g in grads) > 0.9 * len(grads)
    assert x_noisy.grad is not None and x_noisy.grad.abs().sum() > 0


def test_v_prediction_denoiser():
    unet = small_unet()
    denoiser = Denoiser(unet, NoiseSchedule("linear", 1000, prediction_type="v_prediction"))
    x_noisy, sigma = inputs()
    acp = alphas_cumprod_for("linear", 1000)
    a = acp[denoiser.timesteps(sigma)].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * (2 * x_noisy.double() - 1)
    with torch.no_grad():
        v = unet(x_t.float(), denoiser.timesteps(sigma)).sample.double()
        want = ((a.sqrt() * x_t - (1 - a).sqrt() * v).clamp(-1, 1) + 1) / 2
        torch.testing.assert_close(denoiser(x_noisy, sigma).double(), want, rtol=0, atol=2e-5)


def test_save_and_load_diffusers_folder(tmp_path):
    schedule = NoiseSchedule("squaredcos_cap_v2", 4000, prediction_type="epsilon", rescale_timesteps=True)
    denoiser = Denoiser(small_unet(6), schedule)
    save_denoiser(denoiser, str(tmp_path / "den"))
    assert sorted(os.listdir(tmp_path / "den")) == ["scheduler", "unet"]
    assert (tmp_path / "den" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_denoiser({"uri": str(tmp_path / "den")})
    assert loaded.schedule == schedule and not loaded.training
    x_noisy, sigma = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_noisy, sigma), denoiser(x_noisy, sigma), rtol=0, atol=0)
    # an explicit spec schedule overrides the folder's
    assert load_denoiser({"uri": str(tmp_path / "den"), "schedule": {"rescale_timesteps": False}}).timestep_scale == 1.0


def test_diffusers_pipeline_folder(tmp_path):
    unet = small_unet()
    scheduler = DDPMScheduler(num_train_timesteps=500, beta_start=0.001, beta_end=0.03, prediction_type="v_prediction")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    loaded = load_denoiser({"uri": str(tmp_path / "pipe")})
    assert loaded.schedule == NoiseSchedule("linear", 500, prediction_type="v_prediction", beta_start=0.001,
                                            beta_end=0.03)
    torch.testing.assert_close(loaded.alphas_cumprod, torch.cumprod(1 - scheduler.betas.double(), 0))


def test_save_refuses_what_a_config_cannot_rebuild(tmp_path):
    unet = small_unet()
    unet.down_blocks[1].attentions[0].heads = 2  # as the ADM converter does for mixed head dims
    with pytest.raises(ValueError, match="down_blocks.1.attentions.0"):
        save_denoiser(Denoiser(unet, NoiseSchedule("linear", 1000)), str(tmp_path / "den"))
    assert not (tmp_path / "den").exists()


def test_bare_unet_folder_needs_a_schedule(tmp_path):
    unet = small_unet()
    unet.save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="no noise schedule"):
        load_denoiser({"uri": str(tmp_path / "bare")})
    loaded = load_denoiser({"uri": f"file://{tmp_path / 'bare'}",
                            "schedule": {"beta_schedule": "linear", "num_train_timesteps": 1000}})
    x_noisy, sigma = inputs()
    with torch.no_grad():
        want = Denoiser(unet, NoiseSchedule("linear", 1000))(x_noisy, sigma)
        torch.testing.assert_close(loaded(x_noisy, sigma), want)


def test_folder_that_does_not_fit_names_the_keys(tmp_path):
    small_unet().save_pretrained(tmp_path / "bad" / "unet")
    weights = tmp_path / "bad" / "unet" / "diffusion_pytorch_model.safetensors"
    state = safetensors.torch.load_file(weights)
    del state["conv_out.bias"]
    state["extra.weight"] = torch.zeros(1)
    safetensors.torch.save_file(state, weights)
    with pytest.raises(ValueError, match=r"missing \(1\): conv_out.bias.*unexpected \(1\): extra.weight"):
        load_denoiser({"uri": str(tmp_path / "bad"), "preset": "adm-imagenet256-uncond"})


def adm_spec(name: str, uri: str) -> dict:
    config = json.loads((FIXTURES / f"{name}.json").read_text())
    return {"uri": uri, "adm_config": config, "schedule": ADM_SCHEDULES[name]}


@pytest.mark.parametrize("name", ["guided-small", "improved-small"])
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_adm_checkpoint_reproduces_original_network(name, fmt, tmp_path):
    uri = str(FIXTURES / f"{name}.pt")
    if fmt == "safetensors":
        uri = str(tmp_path / f"{name}.safetensors")
        safetensors.torch.save_file(torch.load(FIXTURES / f"{name}.pt", weights_only=True), uri)
    denoiser = load_denoiser(adm_spec(name, uri))
    io = torch.load(FIXTURES / f"{name}-io.pt", weights_only=True)
    with torch.no_grad():
        out = denoiser.unet(io["x"], io["t"]).sample
    torch.testing.assert_close(out, io["out"], rtol=0, atol=1e-4)
    assert denoiser.timestep_scale == (0.25 if name == "improved-small" else 1.0)
    # the converted model survives the diffusers layout
    save_denoiser(denoiser, str(tmp_path / "saved"))
    reloaded = load_denoiser({"uri": str(tmp_path / "saved")})
    x_noisy, sigma = inputs()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x_noisy, sigma), denoiser(x_noisy, sigma), rtol=0, atol=0)


def test_adm_checkpoint_that_does_not_fit_names_the_keys():
    spec = adm_spec("guided-small", str(FIXTURES / "guided-small.pt"))
    spec["adm_config"]["num_res_blocks"] = 2
    with pytest.raises(ValueError, match="input_blocks"):
        load_denoiser(spec)
    with pytest.raises(ValueError, match="preset or an adm_config"):
        load_denoiser({"uri": str(FIXTURES / "guided-small.pt")})


def test_presets_describe_the_published_architectures():
    with torch.device("meta"):
        imagenet = UNet2DModel(**adm_unet_config(PRESETS["adm-imagenet256-uncond"]["adm_config"]))
        cifar = UNet2DModel(**adm_unet_config(PRESETS["iddpm-cifar10-uncond"]["adm_config"]))
    # parameter counts of guided-diffusion's 256x256_diffusion_uncond and improved-diffusion's cifar10 model
    assert sum(p.numel() for p in imagenet.parameters()) == 552_814_086
    assert sum(p.numel() for p in cifar.parameters()) == 52_546_438
    assert imagenet.config.out_channels == cifar.config.out_channels == 6
    assert PRESETS["iddpm-cifar10-uncond"]["schedule"]["rescale_timesteps"] is True
    with pytest.raises(KeyError, match="known: adm-imagenet256-uncond"):
        load_denoiser({"uri": str(FIXTURES / "guided-small.pt"), "preset": "nope"})


def test_preset_with_adm_config_override(tmp_path):
    # the preset's schedule, the fixture's (small) architecture
    spec = {"uri": str(FIXTURES / "improved-small.pt"), "preset": "iddpm-cifar10-uncond",
            "adm_config": json.loads((FIXTURES / "improved-small.json").read_text())}
    denoiser = load_denoiser(spec)
    assert denoiser.schedule == NoiseSchedule("squaredcos_cap_v2", 4000, rescale_timesteps=True)


def test_load_from_s3_hits_the_cache_the_second_time(s3_server, s3_bucket, tmp_path):
    denoiser = Denoiser(small_unet(6), NoiseSchedule("linear", 1000))
    save_denoiser(denoiser, f"s3://{s3_bucket}/den")
    client = boto3.client("s3", endpoint_url=s3_server)
    client.upload_file(str(FIXTURES / "guided-small.pt"), s3_bucket, "adm/guided-small.pt")
    cache = str(tmp_path / "cache")
    first = load_denoiser({"uri": f"s3://{s3_bucket}/den"}, cache_dir=cache)
    adm = load_denoiser(adm_spec("guided-small", f"s3://{s3_bucket}/adm/guided-small.pt"), cache_dir=cache)
    for obj in client.list_objects_v2(Bucket=s3_bucket)["Contents"]:
        client.delete_object(Bucket=s3_bucket, Key=obj["Key"])
    second = load_denoiser({"uri": f"s3://{s3_bucket}/den"}, cache_dir=cache)  # the server no longer has it
    adm_again = load_denoiser(adm_spec("guided-small", f"s3://{s3_bucket}/adm/guided-small.pt"), cache_dir=cache)
    assert len(os.listdir(cache)) == 2
    x_noisy, sigma = inputs()
    with torch.no_grad():
        torch.testing.assert_close(first(x_noisy, sigma), denoiser(x_noisy, sigma), rtol=0, atol=0)
        torch.testing.assert_close(second(x_noisy, sigma), denoiser(x_noisy, sigma), rtol=0, atol=0)
        torch.testing.assert_close(adm_again(x_noisy, sigma), adm(x_noisy, sigma), rtol=0, atol=0)
    assert list(second.weight_files) == [f"s3://{s3_bucket}/den/unet/diffusion_pytorch_model.safetensors"]


def tiny_classifier_spec(tmp_path: Path) -> dict:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=4,
                              depth=2)
    safetensors.torch.save_file(model.state_dict(), tmp_path / "vit.safetensors")
    return {"name": "vit_tiny_patch16_224", "num_classes": 10, "uri": str(tmp_path / "vit.safetensors"),
            "model_kwargs": {"img_size": 32, "patch_size": 4, "depth": 2}}


def test_denoise_and_classify(tmp_path):
    save_denoiser(Denoiser(small_unet(), NoiseSchedule("linear", 1000)), str(tmp_path / "den"))
    model = create_denoise_classify({"uri": str(tmp_path / "den")}, tiny_classifier_spec(tmp_path))
    assert isinstance(model, DenoiseAndClassify) and model.num_classes == 10
    assert not any(m.training for m in model.modules())
    x_noisy, sigma = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x_noisy, sigma), model.classifier(model.denoiser(x_noisy, sigma)))
        torch.testing.assert_close(model.classify_clean(x_noisy), model.classifier(x_noisy))
        assert model(x_noisy, sigma).shape == (3, 10)
    unet_file = tmp_path / "den" / "unet" / "diffusion_pytorch_model.safetensors"
    vit_file = tmp_path / "vit.safetensors"
    assert model_checksums(model) == {
        "denoiser": {str(unet_file): hashlib.sha256(unet_file.read_bytes()).hexdigest()},
        "classifier": {str(vit_file): hashlib.sha256(vit_file.read_bytes()).hexdigest()},
    }
