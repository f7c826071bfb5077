"""Jeong & Shin's CLIP ViT classifier (format jeong-shin-clip): their checkpoints, loaded through the
project's loader, give the logits of an independent reference of their architecture (written here
in plain torch: nn.MultiheadAttention in sequence-first layout, QuickGELU, fc_norm per patch token
then the mean), on [0, 1] images that the reference maps to [-1, 1]; foreign keys and pickled
objects are refused naming them."""
from __future__ import annotations

import argparse
import pathlib
from collections import OrderedDict

import pytest
import safetensors.torch
import torch
from torch import nn

from pipeline.config import load_config
from pipeline.models.classifier import load_classifier
from pipeline.models.clip_vit import create_clip_vit

SMALL = {"img_size": 32, "patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 4}


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ReferenceBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, batch, width]
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Reference(nn.Module):
    """Their VisualTransformer's computation, parameter names as in their state dict (with the
    unused patch_embed.proj they carry)."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 num_classes: int) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.conv1 = nn.Conv2d(3, embed_dim, patch_size, patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(embed_dim))
        self.positional_embedding = nn.Parameter(torch.randn((img_size // patch_size) ** 2 + 1, embed_dim))
        self.ln_pre = nn.LayerNorm(embed_dim)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[ReferenceBlock(embed_dim, num_heads) for _ in range(depth)])
        self.fc_norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        x = self.conv1(2 * x01 - 1)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer.resblocks(self.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        return self.head(self.fc_norm(x[:, 1:]).mean(dim=1))


def reference(seed: int, num_classes: int = 10, **sizes: int) -> Reference:
    """Random weights everywhere, biases and layer norms included (a swapped key shows)."""
    torch.manual_seed(seed)
    model = Reference(**{**SMALL, **sizes}, num_classes=num_classes).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "embedding" in name:
                p.copy_(0.5 * torch.randn_like(p))
            elif ".ln_" in name or name.startswith(("ln_", "fc_norm")):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def spec(uri: str | None, num_classes: int = 10, **sizes: int) -> dict:
    weights = {"uri": uri} if uri else {"random_weights": True}
    return {"name": "CLIP_B16", "num_classes": num_classes, "format": "jeong-shin-clip",
            "model_kwargs": {**SMALL, **sizes}, **weights}


def images(size: int, batch: int = 3) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layout", ["model_ema", "model", "bare", "safetensors", "float16"])
def test_their_checkpoint_gives_their_logits(tmp_path, layout):
    ref = reference(0)
    state = ref.state_dict()
    if layout == "float16":  # a half-precision file: the model runs in float32 on the rounded weights
        state = {k: v.half() for k, v in state.items()}
        ref.load_state_dict({k: v.float() for k, v in state.items()})
        layout = "model_ema"
    if layout == "safetensors":
        path = str(tmp_path / "clip.safetensors")
        safetensors.torch.save_file(state, path)
    else:
        path = str(tmp_path / "checkpoint-best.pth")
        decoy = reference(1).state_dict()  # model_ema wins over model, as in their certify.py
        content = {"model_ema": {"model_ema": state, "model": decoy, "epoch": 9},
                   "model": {"model": state, "epoch": 9}, "bare": state}[layout]
        torch.save(content, path)
    classifier = load_classifier(spec(path))
    x = images(32)
    with torch.inference_mode():
        expected, logits = ref(x), classifier(x)
    assert classifier.input_size == (32, 32) and classifier.weight_files == {path: path}
    assert {(p.dtype, p.device.type) for p in classifier.parameters()} == {(torch.float32, "cpu")}
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_the_head_normalises_each_token_before_the_mean(tmp_path):
    """The mean first, then fc_norm (timm's global_pool='avg' head) is another function: the
    comparison above tells the two apart."""
    path = str(tmp_path / "ckpt.pth")
    torch.save({"model_ema": reference(0).state_dict()}, path)
    model = load_classifier(spec(path)).model
    with torch.inference_mode():
        features = model.forward_features(2 * images(32) - 1)
        ours = model.forward_head(features)
        mean_then_norm = model.head(model.fc_norm(features[:, 1:].mean(dim=1)))
    assert (ours - mean_then_norm).abs().max() > 1e-2


def test_clip_b16_full_size(tmp_path):
    """The protocol's classifier (CLIP_B16, 224, 1000 classes) from their checkpoint layout: one
    image (about 7 s on 2 cores)."""
    ref = reference(0, num_classes=1000, img_size=224, embed_dim=768, depth=12, num_heads=12)
    path = str(tmp_path / "clip_b16.pth")
    torch.save({"model_ema": ref.state_dict()}, path)
    classifier_spec = {**load_config("configs/protocols/jeong-shin-imagenet.yaml").models["classifier"], "uri": path}
    classifier = load_classifier(classifier_spec)
    x = images(224, batch=1)
    with torch.inference_mode():
        expected, logits = ref(x), classifier(x)
    assert classifier.input_size == (224, 224) and logits.shape == (1, 1000)
    # torch's default eps (too small a difference to show in these logits)
    assert {m.eps for m in classifier.modules() if isinstance(m, nn.LayerNorm)} == {1e-5}
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("edit, named", [
    (lambda s: {**s, "ln_post.weight": torch.ones(64)}, "unexpected (1): ln_post.weight"),
    (lambda s: {k: v for k, v in s.items() if k != "transformer.resblocks.1.attn.in_proj_bias"},
     "missing (1): transformer.resblocks.1.attn.in_proj_bias"),
    (lambda s: {f"module.{k}": v for k, v in s.items()}, "unexpected (35): module."),
])
def test_foreign_or_missing_keys_are_refused_naming_them(tmp_path, edit, named):
    path = str(tmp_path / "ckpt.pth")
    torch.save({"model_ema": edit(reference(0).state_dict())}, path)
    with pytest.raises(ValueError, match="is not Jeong & Shin's CLIP ViT with 2 blocks") as err:
        load_classifier(spec(path))
    assert named in str(err.value) and path in str(err.value)


def test_shapes_that_do_not_fit_are_refused(tmp_path):
    path = str(tmp_path / "ckpt.pth")
    torch.save({"model_ema": reference(0, num_classes=7).state_dict()}, path)
    with pytest.raises(ValueError, match=r"shape mismatch \(2\): head.bias"):
        load_classifier(spec(path))


def test_their_args_load_and_any_other_pickled_object_is_refused(tmp_path):
    """Their training script saves its argparse args next to the weights: a Namespace of plain
    values is read (an attribute bag); one holding any other object is refused, naming it."""
    path = str(tmp_path / "checkpoint-best.pth")
    torch.save({"model_ema": reference(0).state_dict(), "args": argparse.Namespace(lr=1e-3, model="CLIP_B16")}, path)
    assert load_classifier(spec(path)).weight_files
    torch.save({"model_ema": reference(0).state_dict(), "args": argparse.Namespace(output_dir=pathlib.Path("out"))}, path)
    with pytest.raises(ValueError, match="refused: the checkpoint holds objects") as err:
        load_classifier(spec(path))
    assert path in str(err.value) and "pathlib.PosixPath" in str(err.value)


def test_no_state_dict_is_refused(tmp_path):
    path = str(tmp_path / "ckpt.pth")
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, path)
    with pytest.raises(ValueError, match="is not a Jeong & Shin classifier checkpoint"):
        load_classifier(spec(path))


def test_random_weights_and_the_spec_checks():
    classifier = load_classifier(spec(None))
    assert classifier.weight_files == {} and classifier(images(32)).shape == (3, 10)
    with pytest.raises(ValueError, match="name 'CLIP_L14'; known: CLIP_B16"):
        load_classifier({**spec(None), "name": "CLIP_L14"})
    with pytest.raises(ValueError, match=r"model_kwargs \['global_pool'\]"):
        load_classifier({**spec(None), "model_kwargs": {"global_pool": "avg"}})
    with pytest.raises(ValueError, match="does not apply to format jeong-shin-clip"):
        load_classifier({**spec(None), "random_weights": False, "pretrained": True})
    assert create_clip_vit("CLIP_B16", **SMALL).head.out_features == 1000  # their create_model's default
