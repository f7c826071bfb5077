"""pipeline.models.hf_vit through load_classifier: a small random transformers ViTForImageClassification
saved with save_pretrained (safetensors, and the same weights as a pytorch_model.bin) computes the
same logits after conversion into timm."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pipeline.models.classifier import load_classifier

transformers = pytest.importorskip("transformers")

SMALL = {"image_size": 32, "patch_size": 8, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 128, "num_labels": 10}
# the timm VisionTransformer of the same shape
SPEC = {"name": "vit_tiny_patch16_224", "num_classes": 10, "format": "hf-vit",
        "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0}}


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL)).eval()
    with torch.no_grad():  # the default init leaves biases and layer norms at 0/1: make every tensor matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def folders(hf_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(root / "st")
    # a transformers 4.x-style pickle checkpoint of the same tensors (transformers 5 writes safetensors only)
    (root / "bin").mkdir()
    shutil.copy(root / "st" / "config.json", root / "bin" / "config.json")
    torch.save(load_file(root / "st" / "model.safetensors"), root / "bin" / "pytorch_model.bin")
    return root


def hf_logits(model, x01: torch.Tensor, mean=0.5, std=0.5) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=(x01 - mean) / std).logits


@pytest.mark.parametrize("layout", ["st", "bin"])
def test_logits_equal_the_transformers_model(hf_model, folders, layout):
    clf = load_classifier({**SPEC, "uri": str(folders / layout)})
    assert clf.input_size == (32, 32) and clf.num_classes == 10
    assert {m.eps for m in clf.model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-12}
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = clf(x)
    expected = hf_logits(hf_model, x)
    assert expected.abs().max() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    (uri, path), = clf.weight_files.items()
    assert uri.endswith("model.safetensors" if layout == "st" else "pytorch_model.bin") and path.endswith(uri[-12:])


def test_processor_normalisation_is_used(hf_model, folders, tmp_path):
    folder = tmp_path / "proc"
    shutil.copytree(folders / "st", folder)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "ViTImageProcessor", "do_normalize": True, "image_mean": mean, "image_std": std}))
    clf = load_classifier({**SPEC, "uri": str(folder)})
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    expected = hf_logits(hf_model, x, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1))
    with torch.no_grad():
        torch.testing.assert_close(clf(x), expected, atol=1e-5, rtol=0)


def test_other_input_sizes_are_resized_bicubic_antialiased(hf_model, folders):
    clf = load_classifier({**SPEC, "uri": str(folders / "st")})
    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    resized = torch.nn.functional.interpolate(x, (32, 32), mode="bicubic", antialias=True)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), hf_logits(hf_model, resized), atol=1e-5, rtol=0)


def test_mismatches_are_refused(folders, tmp_path):
    with pytest.raises(ValueError, match="num_attention_heads 4 but the timm model has \\[2\\]"):
        load_classifier({**SPEC, "uri": str(folders / "st"), "model_kwargs": {**SPEC["model_kwargs"], "num_heads": 2}})
    with pytest.raises(ValueError, match="image_size 32 but the timm model has \\[64\\]"):
        load_classifier({**SPEC, "uri": str(folders / "st"), "model_kwargs": {**SPEC["model_kwargs"], "img_size": 64}})
    with pytest.raises(ValueError, match="head.weight"):  # 10 labels in the checkpoint, 7 asked for
        load_classifier({**SPEC, "num_classes": 7, "uri": str(folders / "st")})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "beit"}))
    with pytest.raises(ValueError, match="model_type 'beit'"):
        load_classifier({**SPEC, "uri": str(tmp_path / "other")})
    with pytest.raises(ValueError, match="pretrained"):
        load_classifier({**SPEC, "pretrained": True})


def test_random_weights_take_transformers_conventions():
    clf = load_classifier({**SPEC, "random_weights": True})
    assert {m.eps for m in clf.model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-12}
    assert clf.mean.flatten().tolist() == [0.5] * 3 and clf.std.flatten().tolist() == [0.5] * 3
    assert clf.weight_files == {}
    assert clf(torch.rand(1, 3, 32, 32)).shape == (1, 10)
