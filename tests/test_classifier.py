"""pipeline.models.classifier: tiny real timm models with random weights."""
from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F

from pipeline.models.classifier import Classifier, load_classifier

VIT_KWARGS = {"img_size": 32, "patch_size": 4, "depth": 2}


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def expected_logits(model: torch.nn.Module, x: torch.Tensor, size: int, mean, std,
                    mode: str = "bicubic") -> torch.Tensor:
    """Resize (antialiased) when needed, normalise with the given constants, run the model."""
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode=mode, antialias=True, align_corners=False)
    m, s = torch.tensor(mean).reshape(1, 3, 1, 1), torch.tensor(std).reshape(1, 3, 1, 1)
    with torch.no_grad():
        return model.eval()((x - m) / s)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_vit_weights_round_trip(tmp_path, fmt):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **VIT_KWARGS)
    path = tmp_path / f"vit.{fmt}"
    if fmt == "safetensors":
        safetensors.torch.save_file(model.state_dict(), path)
    else:
        torch.save(model.state_dict(), path)
    clf = load_classifier({"name": "vit_tiny_patch16_224", "num_classes": 10, "uri": str(path),
                           "model_kwargs": VIT_KWARGS})
    assert isinstance(clf, Classifier) and not clf.training
    assert clf.input_size == (32, 32) and clf.num_classes == 10 and clf.interpolation == "bicubic"
    assert clf.weight_files == {str(path): str(path)}
    for size in (32, 64):  # 64: resized down to the model's 32
        x = images(size=size)
        with torch.no_grad():
            torch.testing.assert_close(clf(x), expected_logits(model, x, 32, (0.5,) * 3, (0.5,) * 3))


def test_resnet_with_explicit_input_size(tmp_path):
    torch.manual_seed(1)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=7)
    torch.save(model.state_dict(), tmp_path / "resnet.pth")
    clf = load_classifier({"name": "test_resnet", "num_classes": 7, "uri": f"file://{tmp_path / 'resnet.pth'}",
                           "input_size": [3, 48, 48]})
    assert clf.input_size == (48, 48) and clf.interpolation == "bilinear"  # timm's config for test_resnet
    x = images(size=32)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), expected_logits(model, x, 48, (0.5,) * 3, (0.5,) * 3, "bilinear"))


def test_timm_data_config_sets_the_input_size():
    clf = load_classifier({"name": "test_vit", "num_classes": 5, "random_weights": True})
    assert clf.input_size == (160, 160)
    assert clf.weight_files == {}
    assert clf(images(size=32)).shape == (2, 5)


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **VIT_KWARGS)
    safetensors.torch.save_file(model.state_dict(), tmp_path / "vit.safetensors")
    with pytest.raises(ValueError, match=r"head.weight: checkpoint \(10, 192\) vs model \(100, 192\)"):
        load_classifier({"name": "vit_tiny_patch16_224", "num_classes": 100, "uri": str(tmp_path / "vit.safetensors"),
                         "model_kwargs": VIT_KWARGS})


def fake_hf_cache(root: Path, repo: str, state: dict[str, torch.Tensor]) -> Path:
    """The layout huggingface_hub's cache has after a download of repo's model.safetensors."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    safetensors.torch.save_file(state, snapshot / "model.safetensors")
    return snapshot / "model.safetensors"


def test_pretrained_only_from_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    spec = {"name": "test_vit", "num_classes": 1000, "pretrained": True}
    with pytest.raises(FileNotFoundError, match="timm/test_vit.r160_in1k.*not in the local cache"):
        load_classifier(spec)
    torch.manual_seed(2)
    model = timm.create_model("test_vit", pretrained=False)
    cached = fake_hf_cache(tmp_path / "hub", "timm/test_vit.r160_in1k", model.state_dict())
    clf = load_classifier(spec)
    assert clf.weight_files == {"hf://timm/test_vit.r160_in1k/model.safetensors": str(cached)}
    x = images(size=160)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), expected_logits(model, x, 160, (0.5,) * 3, (0.5,) * 3))
    # timm's own head adaptation applies when num_classes differs from the pretrained one
    assert load_classifier({**spec, "num_classes": 3})(x).shape == (2, 3)
    for other in ({"uri": str(cached)}, {"random_weights": True}):
        with pytest.raises(ValueError, match="exactly one of a weights uri, pretrained: true and random_weights"):
            load_classifier({**spec, **other})


def test_unknown_spec_keys_are_rejected():
    with pytest.raises(ValueError, match="unknown classifier spec keys"):
        load_classifier({"name": "test_vit", "num_classes": 5, "weights": "x"})
