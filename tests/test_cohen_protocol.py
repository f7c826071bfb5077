"""Cohen et al. (2019)'s ImageNet protocol (configs/protocols/cohen-imagenet.yaml): no denoiser, one
noise-trained classifier per sigma, their checkpoints. The config and its cross-section rule, the
preprocessing against their torchvision transform, their checkpoint format (logits equal to their
model's; a pickled object refused), the routing of each item to its sigma's classifier, and the
protocol run end to end through run_certification with tiny classifiers in their format."""
from __future__ import annotations

import argparse
import io
import pathlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch
import torchvision
import yaml
from PIL import Image
from torchvision import transforms

from pipeline.certify_run import run_certification
from pipeline.config import ConfigError, config_from_dict, model_uris
from pipeline.images import to_float_chw
from pipeline.models.classifier import load_classifier
from pipeline.models.factory import PerSigmaClassifier, create_denoise_classify, model_checksums
from pipeline.run_dir import RunDirectory
from pipeline.shard_writer import make_shards
from test_protocols import SIZES, photo, preprocess, protocol

COHEN = "configs/protocols/cohen-imagenet.yaml"


class NormalizeLayer(torch.nn.Module):
    """Their datasets.NormalizeLayer (on the CPU): mean and std as plain attributes, outside the state dict."""

    def __init__(self, means, sds):
        super().__init__()
        self.means, self.sds = torch.tensor(means), torch.tensor(sds)

    def forward(self, input):
        (batch_size, num_channels, height, width) = input.shape
        means = self.means.repeat((batch_size, height, width, 1)).permute(0, 3, 1, 2)
        sds = self.sds.repeat((batch_size, height, width, 1)).permute(0, 3, 1, 2)
        return (input - means) / sds


def cohen_model(inner: torch.nn.Module) -> torch.nn.Sequential:
    """Their architectures.get_architecture: Sequential(NormalizeLayer(ImageNet), DataParallel(model))."""
    return torch.nn.Sequential(NormalizeLayer([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
                               torch.nn.DataParallel(inner)).eval()


def save_cohen_checkpoint(model: torch.nn.Sequential, arch: str, path, **torch_save_kwargs) -> str:
    """Their train.py's checkpoint: {'epoch', 'arch', 'state_dict', 'optimizer'} with torch.save."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    torch.save({"epoch": 90, "arch": arch, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()},
               path, **torch_save_kwargs)
    return str(path)


def perturb_batch_norm(model: torch.nn.Module, seed: int) -> None:
    """Running statistics away from their init, so that loading them is checked too."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


# ---------------------------------------------------------------------------------------------
# the config


def test_the_protocol_config_is_cohens():
    cfg = protocol("cohen-imagenet")
    assert cfg.models["denoiser"] is None
    c = cfg.models["classifier"]
    assert (c["name"], c["format"], c["num_classes"], c["uri"]) == ("resnet50", "cohen", 1000, None)
    assert [float(s) for s in c["per_sigma"]] == list(cfg.smoothing["sigmas"]) == [0.25, 0.5, 1.0]
    s = cfg.smoothing
    assert (s["mode"], s["n0"], s["n"], s["alpha"], s["sampling"]) == ("full", 100, 100_000, 0.001, "fixed")
    assert cfg.data["selection"]["every"] == 100 and cfg.compute["batch_size"] == 400
    assert [key for key, _ in model_uris(cfg.models)] == [
        "models.classifier.per_sigma.0.25", "models.classifier.per_sigma.0.5", "models.classifier.per_sigma.1.0"]
    assert cfg.to_dict()["models"]["denoiser"] is None  # recorded in the manifest as null


@pytest.fixture
def raw():
    with open(COHEN) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("overrides, message", [
    (["smoothing.sigmas=[0.25, 0.5, 1.0, 2.0]"],
     "models.classifier.per_sigma.2.0: required: smoothing.sigmas has 2.0"),
    (["smoothing.sigmas=[0.25, 1.0]"], "models.classifier.per_sigma.0.5: not one of smoothing.sigmas (0.25, 1.0)"),
    (["models.classifier.per_sigma={0.25: a, 0.5: b, one: c}"], "models.classifier.per_sigma.one: not a noise level"),
    (["models.classifier.per_sigma={0.25: a, 0.5: b, 1.0: c, '1.0': d}"], "models.classifier.per_sigma.1.0: given twice"),
    (["models.classifier.per_sigma={0.25: a, 0.5: b, 1.0: 7}"], "models.classifier.per_sigma.1.0: must be a non-empty string"),
    (["models.classifier.per_sigma={}"], "models.classifier.per_sigma: must be a non-empty mapping"),
    (["models.classifier.uri=/x.pth.tar"],
     "models.classifier.per_sigma: cannot be combined with models.classifier.uri"),
    (["models.classifier.per_sigma=null"], "models.classifier.uri: required (or models.classifier.per_sigma or "
                                           "models.classifier.pretrained: true or models.classifier.random_weights: true)"),
    (["models.classifier.format=onnx"], "models.classifier.format: must be one of timm, hf-vit, cohen"),
])
def test_per_sigma_errors_name_the_key(raw, overrides, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, overrides)
    assert str(err.value).startswith(message)


def test_no_denoiser_is_explicit(raw):
    del raw["models"]["denoiser"]
    with pytest.raises(ConfigError, match=r"^models.denoiser: required"):
        config_from_dict(raw)


def test_cascade_and_one_classifier_for_every_sigma_are_allowed(raw):
    """The cascade's certificate holds for any smoothed classifier per level (each level's bounds are
    about its own base classifier), so per-sigma classifiers may cascade; one noise-trained
    classifier for every sigma (no denoiser) is Cohen's smoothing too."""
    assert config_from_dict(raw, ["smoothing.mode=cascade"]).smoothing["mode"] == "cascade"
    single = config_from_dict(raw, ["models.classifier.per_sigma=null", "models.classifier.uri=/x.pth.tar"])
    assert model_uris(single.models) == [("models.classifier.uri", "/x.pth.tar")]


# ---------------------------------------------------------------------------------------------
# preprocessing


@pytest.mark.parametrize("size", SIZES)
def test_preprocessing_equals_their_torchvision_transform(size):
    """datasets.py: Scale(256) (Resize, bilinear on the PIL image) + CenterCrop(224) + ToTensor."""
    d = protocol("cohen-imagenet").data
    data = photo(size)
    theirs = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])(
        Image.open(io.BytesIO(data)).convert("RGB"))
    ours = preprocess(data, d)
    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    np.testing.assert_array_equal(ours, np.asarray(reference(Image.open(io.BytesIO(data)).convert("RGB"))))
    torch.testing.assert_close(to_float_chw(ours[None].copy(), "cpu")[0], theirs, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# their checkpoints


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])  # torch >= 1.6 / their torch 1.x
def test_their_checkpoint_gives_their_logits(tmp_path, zipfile):
    torch.manual_seed(0)
    inner = torchvision.models.resnet50()
    perturb_batch_norm(inner, 1)
    theirs = cohen_model(inner)
    path = save_cohen_checkpoint(theirs, "resnet50", tmp_path / "checkpoint.pth.tar",
                                 _use_new_zipfile_serialization=zipfile)
    ours = load_classifier({"name": "resnet50", "num_classes": 1000, "format": "cohen", "uri": path,
                            "input_size": [3, 64, 64]})
    assert ours.weight_files == {path: path}
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected, got = theirs(x), ours(x)
    assert expected.std() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


class Marker:
    """Unpickling this touches a file: proof that no pickled code ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_a_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    """argparse args of plain values are read (an attribute bag); any other object is refused
    without running its code."""
    model = cohen_model(timm.create_model("test_resnet", num_classes=10))
    marker = tmp_path / "unpickled"
    spec = {"name": "test_resnet", "num_classes": 10, "format": "cohen"}
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 1, "arch": "test_resnet", "state_dict": model.state_dict(),
                "args": argparse.Namespace(lr=0.1)}, path)
    assert load_classifier({**spec, "uri": str(path)}).weight_files
    for extra in (Marker(str(marker)), argparse.Namespace(hook=Marker(str(marker)))):
        torch.save({"epoch": 1, "arch": "test_resnet", "state_dict": model.state_dict(), "args": extra}, path)
        with pytest.raises(ValueError, match=r"checkpoint.pth.tar: refused: the checkpoint holds objects"):
            load_classifier({**spec, "uri": str(path)})
    assert not marker.exists()


def test_other_layouts_are_refused(tmp_path):
    model = cohen_model(timm.create_model("test_resnet", num_classes=10))
    spec = {"name": "test_resnet", "num_classes": 10, "format": "cohen"}
    wrong_arch = save_cohen_checkpoint(model, "cifar_resnet110", tmp_path / "arch.pth.tar")
    with pytest.raises(ValueError, match=r"holds arch 'cifar_resnet110', the classifier's name is 'test_resnet'"):
        load_classifier({**spec, "uri": wrong_arch})
    bare = tmp_path / "bare.pth.tar"
    torch.save({"arch": "test_resnet", "state_dict": model[1].module.state_dict()}, bare)  # no Sequential, no DataParallel
    with pytest.raises(ValueError, match=r"keys without the prefix '1.module.'"):
        load_classifier({**spec, "uri": str(bare)})
    flat = tmp_path / "flat.pt"
    torch.save(model.state_dict(), flat)
    with pytest.raises(ValueError, match=r"is not a Cohen et al. checkpoint"):
        load_classifier({**spec, "uri": str(flat)})


# ---------------------------------------------------------------------------------------------
# one classifier per sigma


TINY = {"name": "test_resnet", "num_classes": 10, "format": "cohen", "input_size": [3, 16, 16]}


def tiny_checkpoints(root, sigmas, seed: int = 0) -> dict[float, str]:
    """A test_resnet per sigma (different random weights), in their checkpoint format."""
    paths = {}
    for i, sigma in enumerate(sigmas):
        torch.manual_seed(seed + i)
        inner = timm.create_model("test_resnet", num_classes=10)
        perturb_batch_norm(inner, seed + i)
        paths[sigma] = save_cohen_checkpoint(cohen_model(inner), "test_resnet", pathlib.Path(root) / f"noise_{sigma}.pth.tar")
    return paths


def test_each_item_goes_to_its_sigmas_classifier(tmp_path):
    paths = tiny_checkpoints(tmp_path, (0.12, 0.25, 0.5))
    model = create_denoise_classify(None, {**TINY, "per_sigma": {str(s): p for s, p in paths.items()}})
    assert model.denoiser is None and isinstance(model.classifier, PerSigmaClassifier)
    single = {s: load_classifier({**TINY, "uri": p}) for s, p in paths.items()}
    x = torch.rand(7, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.5, 0.12, 0.25, 0.5, 0.12, 0.12, 0.25], dtype=torch.float64)
    with torch.inference_mode():
        mixed = model(x, sigma)
        expected = torch.cat([single[float(s)](x[i:i + 1]) for i, s in enumerate(sigma)])
        torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=0)
        assert not torch.allclose(single[0.12](x), single[0.25](x))  # the classifiers differ
        # float32 sigmas (0.12 is not a float32 value) and a scalar sigma
        torch.testing.assert_close(model(x, sigma.float()), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x, torch.tensor(0.25)), single[0.25](x), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.classify_clean(x), single[0.12](x), atol=0, rtol=0)  # smallest sigma's
        with pytest.raises(ValueError, match=r"no classifier for sigma 1.0: the per-sigma classifiers are for 0.12, 0.25, 0.5"):
            model(x[:2], torch.tensor([0.25, 1.0]))
    assert (model.num_classes, int(model.timesteps(sigma).max())) == (10, -1)
    assert set(model_checksums(model)["classifier"]) == set(paths.values())
    assert model_checksums(model)["denoiser"] == {}


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_the_protocol_runs_end_to_end(ray_local, tmp_path):
    """The protocol config with only sizes and URIs overridden: two tiny classifiers in their format,
    two images at 16 x 16, n0 = 1, n = 2, on local Ray CPU actors."""
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c in ("n0", "n1"):
        (images / c).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(images / c / f"{c}_0.jpg", quality=90)
    make_shards(str(images), f"file://{tmp_path}/shards", "parquet", shard_size=2)
    paths = tiny_checkpoints(tmp_path, (0.25, 0.5))
    cfg = config_from_dict(yaml.safe_load(open(COHEN)), [
        f"data.uri=file://{tmp_path}/shards/", "data.format=parquet", "data.selection={every: 1, offset: 0}",
        "data.resolution=16", "data.resize=16", "smoothing.sigmas=[0.25, 0.5]",
        f"models.classifier.per_sigma={{0.25: {paths[0.25]}, 0.5: {paths[0.5]}}}",
        "models.classifier.name=test_resnet", "models.classifier.num_classes=10", "models.classifier.input_size=[3, 16, 16]",
        "smoothing.n0=1", "smoothing.n=2", "compute.actors=1", "compute.gpus_per_actor=0", "compute.cpus_per_actor=1",
        "compute.batch_size=8", "compute.images_per_call=2", "compute.channels_last=false", "compute.torch_threads=1",
        f"output.uri=file://{tmp_path}/runs", "output.run_id=cohen"])
    summary = run_certification(cfg)
    assert (summary["rows_total"], summary["errors"]) == (4, 0)
    store = RunDirectory(cfg.output["uri"], "cohen")
    assert len(store.counts_files()) == 1  # compacted
    table = pq.read_table(store.counts_files()[0])
    rows = sorted(zip(table["image_id"].to_pylist(), table["sigma"].to_pylist()))
    assert rows == [("n0_0", 0.25), ("n0_0", 0.5), ("n1_0", 0.25), ("n1_0", 0.5)]
    assert set(table["n"].to_pylist()) == {2} and set(table["denoiser_id"].to_pylist()) == {None}
    assert table["timestep"].null_count == 4
    manifest = store.read_manifest()
    assert manifest["config"]["models"]["denoiser"] is None
    assert set(manifest["model_checksums"]["classifier"]) == set(paths.values())
    assert manifest["model_checksums"]["denoiser"] == {}
    assert {k: v["uri"] for k, v in manifest["weights"].items()} == {
        "models.classifier.per_sigma.0.25": paths[0.25], "models.classifier.per_sigma.0.5": paths[0.5]}
    tiny_checkpoints(tmp_path, (0.25, 0.5), seed=5)  # other weights behind the same files: a resume is refused
    with pytest.raises(ConfigError, match=r"other model weights \(models.classifier.per_sigma.0.25 differ: .*; "
                                          r"models.classifier.per_sigma.0.5 differ"):
        run_certification(cfg)
