"""The base classifier being smoothed: logits = f_sigma(D_sigma(x + sigma*eps)).

D is the one-shot diffusion denoiser (Carlini et al., Jeong & Shin), or none (``models.denoiser:
null``): the noisy image goes to the classifier as it is (Cohen et al.). f is one classifier for
every sigma, or one per sigma (``models.classifier.per_sigma``, :class:`PerSigmaClassifier`;
Cohen et al. train a ResNet-50 with Gaussian noise at each sigma and certify each sigma with its
own). :func:`create_denoise_classify` is the one place that builds it from a config's specs.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from pipeline.models.classifier import Classifier, load_classifier
from pipeline.models.denoiser import Denoiser, load_denoiser
from pipeline.storage import sha256_file


class PerSigmaClassifier(torch.nn.Module):
    """One classifier per noise level: item i of a batch goes to the classifier of ``sigma[i]``
    (compared in sigma's own dtype) and its logits come back at row i. A sigma without a
    classifier is a ValueError. ``weight_files`` holds every classifier's files."""

    def __init__(self, classifiers: Mapping[float, Classifier]) -> None:
        super().__init__()
        by_sigma = {float(s): c for s, c in classifiers.items()}
        if not by_sigma:
            raise ValueError("per-sigma classifiers: none given")
        self.sigmas = tuple(sorted(by_sigma))
        self.classifiers = torch.nn.ModuleList(by_sigma[s] for s in self.sigmas)
        classes = {s: c.num_classes for s, c in by_sigma.items()}
        if len(set(classes.values())) != 1:
            raise ValueError(f"per-sigma classifiers disagree on the number of classes: {classes}")
        self.num_classes = classes[self.sigmas[0]]
        self.weight_files = {uri: path for c in self.classifiers for uri, path in c.weight_files.items()}

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """Logits [B, C] of x [B, ...]; ``sigma`` a scalar or [B] (a batch may mix sigmas)."""
        sigma = torch.as_tensor(sigma, device=x.device)
        if not sigma.is_floating_point():
            sigma = sigma.double()
        sigma = sigma.reshape(-1).expand(x.shape[0])
        levels = torch.tensor(self.sigmas, dtype=sigma.dtype, device=sigma.device)
        match = (sigma[:, None] == levels[None, :]).cpu()  # [B, K]: the one host transfer
        unknown = ~match.any(dim=1)
        if unknown.any():
            raise ValueError(f"no classifier for sigma {float(sigma[int(unknown.nonzero()[0])])}: "
                             f"the per-sigma classifiers are for {', '.join(map(str, self.sigmas))}")
        logits = None
        for k, classifier in enumerate(self.classifiers):
            rows = match[:, k].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            rows = rows.to(x.device)
            out = classifier(x.index_select(0, rows))
            if logits is None:
                logits = out.new_empty((x.shape[0], out.shape[1]))
            logits.index_copy_(0, rows, out)
        return logits

    def classify_clean(self, x: torch.Tensor) -> torch.Tensor:
        """Logits on clean images of the smallest sigma's classifier (trained nearest to clean images)."""
        return self.classifiers[0](x)


class DenoiseAndClassify(torch.nn.Module):
    """logits = classifier(denoiser(x_noisy, sigma)), the denoiser skipped when there is none and
    a :class:`PerSigmaClassifier` given each item's sigma; ``classify_clean`` skips the denoiser
    (and takes the smallest sigma's classifier when there is one per sigma)."""

    def __init__(self, denoiser: Denoiser | None, classifier: Classifier | PerSigmaClassifier) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.classifier = classifier
        self.num_classes = classifier.num_classes

    def forward(self, x_noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x_noisy = x + sigma*eps [B,3,R,R] in [0,1] units at the certification resolution; sigma scalar or [B]."""
        x = x_noisy if self.denoiser is None else self.denoiser(x_noisy, sigma)
        if isinstance(self.classifier, PerSigmaClassifier):
            return self.classifier(x, sigma)
        return self.classifier(x)

    def classify_clean(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the classifier alone on clean images in [0,1]."""
        if isinstance(self.classifier, PerSigmaClassifier):
            return self.classifier.classify_clean(x)
        return self.classifier(x)

    def timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """The denoiser's diffusion timestep per sigma (int64, sigma's shape); -1 without a denoiser."""
        if self.denoiser is None:
            return torch.full(sigma.shape, -1, dtype=torch.int64, device=sigma.device)
        return self.denoiser.timesteps(sigma)


def create_denoise_classify(denoiser_spec: Mapping[str, Any] | None, classifier_spec: Mapping[str, Any],
                            cache_dir: str | None = None, resolution: int | None = None) -> DenoiseAndClassify:
    """The models loaded from their specs (see load_denoiser / load_classifier), in eval mode.

    ``denoiser_spec`` None: no denoiser. ``classifier_spec`` with ``per_sigma`` ({sigma: uri}):
    one classifier per sigma, each the spec with that uri. ``resolution`` (``data.resolution``,
    the certification resolution) is checked against the denoiser's UNet size and
    ``models.denoiser.input`` before the classifier is loaded: a mismatch that is not a declared
    placement is a ConfigError naming the keys. Without it the same check runs at the first
    forward pass, on the input's actual size.
    """
    models = {"denoiser": denoiser_spec, "classifier": classifier_spec, "cache_dir": cache_dir}
    return assemble_denoise_classify(models, [load() for _, _, load in model_loaders(models, resolution)])


def assemble_denoise_classify(models: Mapping[str, Any], loaded: Sequence[Any]) -> DenoiseAndClassify:
    """The DenoiseAndClassify (eval mode) of the models that :func:`model_loaders` (``models``)
    loaded, in its order: a caller that loads them one by one, to name the one that fails, builds
    the model from those parts without loading any of them again."""
    parts = list(loaded)
    denoiser = parts.pop(0) if models["denoiser"] is not None else None
    classifier_spec = models["classifier"]
    if classifier_spec.get("per_sigma") is None:
        (classifier,) = parts
    else:
        classifier = PerSigmaClassifier(dict(zip(_per_sigma_specs(classifier_spec), parts, strict=True)))
    return DenoiseAndClassify(denoiser, classifier).eval()


def model_loaders(models: Mapping[str, Any], resolution: int | None = None) -> list[tuple[str, str, Callable[[], Any]]]:
    """(config key, uri or name, load) of each model a resolved ``models`` section names, in the
    factory's order: the denoiser (its placement checked against ``resolution``), then the
    classifier or each per-sigma classifier (``models.classifier.per_sigma.<sigma>``). Calling
    ``load`` loads that model alone: to say which one cannot load before a run starts."""
    denoiser, classifier, cache_dir = models["denoiser"], models["classifier"], models["cache_dir"]
    steps: list[tuple[str, str, Callable[[], Any]]] = []
    if denoiser is not None:
        steps.append(("models.denoiser.uri", denoiser.get("uri") or "random weights",
                      functools.partial(_denoiser, denoiser, cache_dir, resolution)))
    if classifier.get("per_sigma") is None:
        steps.append(("models.classifier.uri", classifier.get("uri") or classifier["name"],
                      functools.partial(load_classifier, classifier, cache_dir)))
    else:
        steps += [(f"models.classifier.per_sigma.{sigma}", spec["uri"], functools.partial(load_classifier, spec, cache_dir))
                  for sigma, spec in _per_sigma_specs(classifier).items()]
    return steps


def _denoiser(spec: Mapping[str, Any], cache_dir: str | None, resolution: int | None) -> Denoiser:
    denoiser = load_denoiser(spec, cache_dir)
    if resolution is not None:
        denoiser.check_resolution(resolution)
    return denoiser


def _per_sigma_specs(spec: Mapping[str, Any]) -> dict[float, dict[str, Any]]:
    """{sigma: the classifier spec with that sigma's uri} of a spec with ``per_sigma``."""
    base = {k: v for k, v in spec.items() if k != "per_sigma"}
    return {float(sigma): {**base, "uri": uri} for sigma, uri in spec["per_sigma"].items()}


def model_checksums(model: DenoiseAndClassify) -> dict[str, dict[str, str]]:
    """{"denoiser": {weights uri: sha256}, "classifier": {...}} of the files actually loaded
    (empty for randomly initialised weights and without a denoiser; every per-sigma classifier's
    file under "classifier"). Hashes are memoised per file and modification time."""
    def files(module: torch.nn.Module | None) -> dict[str, str]:
        weight_files = {} if module is None else module.weight_files
        return {uri: _sha256(path, os.stat(path).st_mtime_ns) for uri, path in weight_files.items()}
    return {"denoiser": files(model.denoiser), "classifier": files(model.classifier)}


@functools.lru_cache(maxsize=64)
def _sha256(path: str, mtime_ns: int) -> str:
    return sha256_file(path)
