"""The published protocols (configs/protocols/): preprocessing equal to the reference code's torchvision
transform, the denoiser's placement (reflect pad / direct) against a direct computation and the UNet
sizes of the papers, the resolution check, explicit random weights, and the CIFAR-10 protocol's real
models run once on CPU (the ImageNet ones take minutes per sample there: jobs.smoke_protocols)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import UNet2DModel
from PIL import Image
from torchvision import transforms

from pipeline.config import ConfigError, config_from_dict, load_config
from pipeline.diffusion import NoiseSchedule, timestep_for_sigma
from pipeline.images import resize_image
from pipeline.models.classifier import load_classifier
from pipeline.models.denoiser import Denoiser, InputPlacement, load_denoiser
from pipeline.models.factory import create_denoise_classify

PROTOCOLS = "configs/protocols"
# widths x heights of ImageNet-like images, with crop offsets of x.5 (rounded half to even by
# torchvision's CenterCrop) and an image whose shorter side already is the resize target
SIZES = [(500, 375), (375, 500), (333, 500), (257, 300), (300, 257), (259, 1000), (256, 256), (224, 331)]


def protocol(name: str):
    return load_config(f"{PROTOCOLS}/{name}.yaml")


def photo(size: tuple[int, int], seed: int = 0) -> bytes:
    """A JPEG with edges, gradients and noise (what resampling differences show on)."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx // 13 + yy // 7) % 2) * 255], -1)
    noisy = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def preprocess(data: bytes, d: dict) -> np.ndarray:
    return resize_image(data, d["resolution"], d["resize"], d["crop"], d["interpolation"])


# ---------------------------------------------------------------------------------------------
# preprocessing: the image before noise


@pytest.mark.parametrize("size", SIZES)
def test_carlini_imagenet_equals_torchvision_resize256_centercrop224(size):
    """Carlini et al. (and Cohen et al.): Resize(256) (bilinear) + CenterCrop(224) on the PIL image."""
    d = protocol("carlini-imagenet").data
    data = photo(size)
    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    expected = np.asarray(reference(Image.open(io.BytesIO(data)).convert("RGB")))
    ours = preprocess(data, d)
    assert ours.shape == (224, 224, 3)
    np.testing.assert_array_equal(ours, expected)


def test_cifar10_is_not_resized():
    """Carlini et al.'s CIFAR-10: ToTensor only; the 32 x 32 pixels pass unchanged."""
    d = protocol("carlini-cifar10").data
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    np.testing.assert_array_equal(preprocess(buf.getvalue(), d), pixels)
    expected = transforms.ToTensor()(Image.open(io.BytesIO(buf.getvalue())))
    torch.testing.assert_close(torch.from_numpy(preprocess(buf.getvalue(), d).copy()).permute(2, 0, 1) / 255, expected)


def jeong_shin_reference(data: bytes, antialias: bool = False) -> torch.Tensor:
    """Their get_dataset: ToTensor, Resize(224, bicubic) on the float tensor (torchvision 0.13: no
    antialias, no clamp), CenterCrop(224); [3, 224, 224] float."""
    x = transforms.ToTensor()(Image.open(io.BytesIO(data)).convert("RGB"))
    resize = transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC, antialias=antialias)
    return transforms.CenterCrop(224)(resize(x))


def test_jeong_shin_imagenet_difference_is_stated():
    """Jeong & Shin resize the float tensor without antialiasing (torchvision 0.13); this project
    resizes the PIL image (antialiased bicubic, torchvision's own PIL path to the pixel) and
    stores uint8. Stated difference, all of it the antialiasing:

    * shorter side already 224: no resize in either; equal to the pixel;
    * downscaling (500 x 375 -> 224): on this image with per-pixel noise (std 20/255) their
      aliased resize differs by 5-6.5/255 on average (99th percentile 20-24/255); with the
      antialias switched on in their transform the difference drops to uint8 rounding and PIL
      vs torch kernel details (mean < 0.5/255, 99th percentile < 2/255).
    """
    d = protocol("jeong-shin-imagenet").data
    same = photo((224, 331))
    ours = torch.from_numpy(preprocess(same, d).copy()).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(ours, jeong_shin_reference(same), atol=0, rtol=0)
    for size in [(500, 375), (333, 500)]:
        data = photo(size)
        ours = torch.from_numpy(preprocess(data, d).copy()).permute(2, 0, 1).float() / 255
        theirs = (ours - jeong_shin_reference(data)).abs().flatten() * 255
        antialiased = (ours - jeong_shin_reference(data, antialias=True)).abs().flatten() * 255
        assert 4 < theirs.mean() < 8 and theirs.quantile(0.99) < 30, (size, theirs.mean())
        assert antialiased.mean() < 0.5 and antialiased.quantile(0.99) < 2, (size, antialiased.mean())
        expected = transforms.Compose([transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
                                       transforms.CenterCrop(224)])(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(preprocess(data, d), np.asarray(expected))


# ---------------------------------------------------------------------------------------------
# denoiser placement


SCHEDULE = NoiseSchedule(beta_schedule="linear", num_train_timesteps=1000)


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=6, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=8).eval()


def by_hand(unet: UNet2DModel, x_noisy: torch.Tensor, sigma: float, pad: int) -> torch.Tensor:
    """DESIGN section 3 written out: x_t = sqrt(acp) (2 x_noisy - 1); reflect pad; the UNet's first
    three output channels as eps, cropped; x0 = (x_t - sqrt(1 - acp) eps) / sqrt(acp), clamped; to [0, 1]."""
    acp_all = SCHEDULE.alphas_cumprod()
    t = int(timestep_for_sigma(acp_all, torch.tensor(sigma)))
    acp = acp_all[t].float()
    x_t = acp.sqrt() * (2 * x_noisy - 1)
    unet_in = F.pad(x_t, (pad,) * 4, mode="reflect") if pad else x_t
    eps = unet(unet_in, torch.full((x_noisy.shape[0],), float(t))).sample[:, :3]
    side = x_noisy.shape[-1]
    eps = eps[..., pad:pad + side, pad:pad + side]
    x0 = ((x_t - (1 - acp).sqrt() * eps) / acp.sqrt()).clamp(-1, 1)
    return (x0 + 1) / 2


def unet_sides(denoiser: Denoiser) -> list[tuple[int, int]]:
    seen: list[tuple[int, int]] = []
    denoiser.unet.register_forward_hook(lambda m, args, out: seen.append((args[0].shape[-1], out.sample.shape[-1])))
    return seen


@pytest.mark.parametrize("placement, side, pad", [
    (InputPlacement("reflect_pad"), 24, 4),              # Jeong & Shin's 224 -> 256 -> 224, scaled down
    (InputPlacement("reflect_pad", 32), 16, 8),
    (InputPlacement("direct", 24), 24, 0),               # Carlini et al.'s 256 UNet on 224, scaled down
    (InputPlacement(), 32, 0),
])
def test_placement_equals_the_direct_computation(placement, side, pad):
    unet = tiny_unet()
    denoiser = Denoiser(unet, SCHEDULE, placement).eval()
    seen = unet_sides(denoiser)
    x = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = denoiser(x, torch.tensor(0.5))
        expected = by_hand(unet, x, 0.5, pad)
    assert ours.shape == (2, 3, side, side)
    assert seen[0] == (side + 2 * pad, side + 2 * pad)  # [1] is by_hand's call
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_reflect_pad_is_jeong_shins_crop_wrapper():
    """Their CropWrapper: ReflectionPad2d((in - out) // 2), model, torchvision CenterCrop(out)."""
    x = torch.randn(1, 3, 24, 24)
    np.testing.assert_array_equal(F.pad(x, (4,) * 4, mode="reflect").numpy(), torch.nn.ReflectionPad2d(4)(x).numpy())
    y = torch.randn(1, 3, 32, 32)
    np.testing.assert_array_equal(y[..., 4:28, 4:28].numpy(), transforms.CenterCrop(24)(y).numpy())


@pytest.mark.parametrize("placement, resolution, message", [
    (InputPlacement(), 24, r"^data.resolution: 24 differs from the denoiser UNet's size 32; declare "
                           r"models.denoiser.input.mode: reflect_pad"),
    (InputPlacement("direct", 16), 24, r"^models.denoiser.input.size: 16 must equal data.resolution \(24\)"),
    (InputPlacement("direct", 25), 25, r"^models.denoiser.input.size: the UNet runs at 25, not a multiple of its "
                                       r"downsampling factor 2"),
    (InputPlacement("reflect_pad"), 25, r"^models.denoiser.input.size: reflect_pad needs"),   # odd difference
    (InputPlacement("reflect_pad"), 32, r"^models.denoiser.input.size: reflect_pad needs"),   # nothing to pad
    (InputPlacement("reflect_pad", 32), 10, r"^models.denoiser.input.size: reflect_pad needs"),  # pad >= side
])
def test_mismatches_are_refused_naming_the_keys(placement, resolution, message):
    denoiser = Denoiser(tiny_unet(), SCHEDULE, placement)
    with pytest.raises(ConfigError, match=message):
        denoiser.check_resolution(resolution)
    with pytest.raises(ConfigError, match=message):  # and at the forward pass, on the input's size
        denoiser(torch.rand(1, 3, resolution, resolution), torch.tensor(0.5))


def test_factory_checks_the_resolution_before_loading_the_classifier(monkeypatch):
    spec = {"random_weights": True, "schedule": {"beta_schedule": "linear", "num_train_timesteps": 1000},
            "adm_config": {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "attention_resolutions": "16",
                           "channel_mult": (1, 2), "num_head_channels": 16, "learn_sigma": True}}
    classifier = {"name": "test_vit", "num_classes": 10, "random_weights": True}
    monkeypatch.setattr("pipeline.models.factory.load_classifier", lambda *a: pytest.fail("classifier loaded"))
    with pytest.raises(ConfigError, match="^data.resolution: 24 differs"):
        create_denoise_classify(spec, classifier, resolution=24)
    monkeypatch.undo()
    model = create_denoise_classify({**spec, "input": {"mode": "reflect_pad"}}, classifier, resolution=24)
    assert model.denoiser.placement == InputPlacement("reflect_pad")


@pytest.mark.parametrize("name, resolution, unet_in", [
    ("jeong-shin-imagenet", 224, 256), ("carlini-imagenet", 224, 224), ("carlini-cifar10", 32, 32)])
def test_protocol_denoiser_sizes_are_the_papers(name, resolution, unet_in):
    """The real architectures (shapes only, on the meta device): what the UNet sees and returns."""
    cfg = protocol(name)
    assert cfg.data["resolution"] == resolution
    with torch.device("meta"):
        denoiser = load_denoiser({**cfg.models["denoiser"], "uri": None, "random_weights": True})
        seen = unet_sides(denoiser)
        out = denoiser(torch.empty(1, 3, resolution, resolution), torch.tensor(0.5))
    assert denoiser.image_size == {"carlini-cifar10": 32}.get(name, 256)
    assert seen == [(unet_in, unet_in)] and tuple(out.shape) == (1, 3, resolution, resolution)


# ---------------------------------------------------------------------------------------------
# configs: the protocols, explicit random weights


def test_protocol_configs_and_the_default_imagenet_config():
    for name in ("carlini-imagenet", "carlini-cifar10", "jeong-shin-imagenet", "cohen-imagenet"):
        protocol(name)
    default, jeong_shin = load_config("configs/imagenet.yaml").to_dict(), protocol("jeong-shin-imagenet").to_dict()
    assert (default["smoothing"]["schedule"], jeong_shin["smoothing"]["schedule"]) == ("bonferroni", "paper")
    assert (default["compute"]["dtype"], jeong_shin["compute"]["dtype"]) == ("auto", "float16")
    for cfg in (default, jeong_shin):
        cfg["smoothing"].pop("schedule"), cfg["output"].pop("run_id"), cfg["compute"].pop("dtype")
    assert default == jeong_shin  # configs/imagenet.yaml is Jeong & Shin's protocol
    carlini = protocol("carlini-cifar10")
    assert (carlini.smoothing["n"], carlini.data["selection"]["every"], carlini.models["classifier"]["format"]) == \
        (100_000, 1, "hf-vit")


@pytest.fixture
def raw():
    with open("configs/small.yaml") as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("overrides, message", [
    (["models.denoiser.uri=null"], "models.denoiser.uri: required (or models.denoiser.random_weights: true)"),
    (["models.denoiser.random_weights=true"],
     "models.denoiser.random_weights: cannot be combined with models.denoiser.uri"),
    (["models.classifier.uri=null"], "models.classifier.uri: required (or models.classifier.per_sigma or "
                                     "models.classifier.pretrained: true or models.classifier.random_weights: true)"),
    (["models.classifier.uri=null", "models.classifier.pretrained=true", "models.classifier.random_weights=true"],
     "models.classifier.random_weights: cannot be combined with models.classifier.pretrained"),
    (["models.denoiser.input={mode: crop}"], "models.denoiser.input.mode: must be one of direct, reflect_pad"),
    (["models.classifier.format=onnx"], "models.classifier.format: must be one of timm, hf-vit"),
])
def test_weight_sources_are_explicit(raw, overrides, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, overrides)
    assert str(err.value).startswith(message)


def test_random_weights_are_in_the_resolved_config(raw):
    cfg = config_from_dict(raw, ["models.denoiser.uri=null", "models.denoiser.random_weights=true",
                                 "models.classifier.uri=null", "models.classifier.random_weights=true"])
    assert cfg.models["denoiser"]["random_weights"] is True and cfg.models["classifier"]["random_weights"] is True
    assert cfg.to_dict()["models"]["denoiser"]["input"] == {"mode": "direct", "size": None}
    assert config_from_dict(raw).models["denoiser"]["random_weights"] is False


def test_loaders_refuse_a_silent_random_default():
    with pytest.raises(ValueError, match="exactly one of a weights uri and random_weights"):
        load_denoiser({"preset": "iddpm-cifar10-uncond"})
    with pytest.raises(ValueError, match="exactly one of a weights uri and random_weights"):
        load_denoiser({"preset": "iddpm-cifar10-uncond", "uri": "/nowhere", "random_weights": True})
    with pytest.raises(ValueError, match="exactly one of a weights uri, pretrained: true and random_weights"):
        load_classifier({"name": "test_vit", "num_classes": 5})


# ---------------------------------------------------------------------------------------------
# the real CIFAR-10 models, once


def test_cifar10_protocol_models_run_on_cpu():
    """Carlini et al.'s CIFAR-10 architectures (iDDPM 32, ViT-B/16 in the transformers layout) with
    random weights: one denoise-and-classify pass at 32 x 32 (about 25 s on 2 cores)."""
    cfg = load_config(f"{PROTOCOLS}/carlini-cifar10.yaml", [
        "models.denoiser.uri=null", "models.denoiser.random_weights=true",
        "models.classifier.uri=null", "models.classifier.random_weights=true"])
    torch.manual_seed(0)
    model = create_denoise_classify(cfg.models["denoiser"], cfg.models["classifier"], resolution=32)
    assert model.classifier.input_size == (224, 224)
    with torch.inference_mode():
        logits = model(torch.rand(1, 3, 32, 32), torch.tensor(0.5))
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()
