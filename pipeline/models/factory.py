"""Denoise-and-classify: f(D_sigma(x + sigma*eps)), the base classifier being smoothed."""
from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import torch

from pipeline.models.classifier import Classifier, load_classifier
from pipeline.models.denoiser import Denoiser, load_denoiser
from pipeline.storage import sha256_file


class DenoiseAndClassify(torch.nn.Module):
    """logits = classifier(denoiser(x_noisy, sigma)); ``classify_clean`` skips the denoiser."""

    def __init__(self, denoiser: Denoiser, classifier: Classifier) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.classifier = classifier
        self.num_classes = classifier.num_classes

    def forward(self, x_noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x_noisy = x + sigma*eps [B,3,R,R] in [0,1] units at the certification resolution; sigma scalar or [B]."""
        return self.classifier(self.denoiser(x_noisy, sigma))

    def classify_clean(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the classifier alone on clean images in [0,1]."""
        return self.classifier(x)


def create_denoise_classify(denoiser_spec: Mapping[str, Any], classifier_spec: Mapping[str, Any],
                            cache_dir: str | None = None, resolution: int | None = None) -> DenoiseAndClassify:
    """Both models loaded from their specs (see load_denoiser / load_classifier), in eval mode.

    ``resolution`` (``data.resolution``, the certification resolution) is checked against the
    denoiser's UNet size and ``models.denoiser.input`` before the classifier is loaded: a
    mismatch that is not a declared placement is a ConfigError naming the keys. Without it the
    same check runs at the first forward pass, on the input's actual size.
    """
    denoiser = load_denoiser(denoiser_spec, cache_dir)
    if resolution is not None:
        denoiser.check_resolution(resolution)
    return DenoiseAndClassify(denoiser, load_classifier(classifier_spec, cache_dir)).eval()


def model_checksums(model: DenoiseAndClassify) -> dict[str, dict[str, str]]:
    """{"denoiser": {weights uri: sha256}, "classifier": {...}} of the files actually loaded
    (empty for randomly initialised weights). Hashes are memoised per file and modification time."""
    return {
        part: {uri: _sha256(path, os.stat(path).st_mtime_ns) for uri, path in module.weight_files.items()}
        for part, module in (("denoiser", model.denoiser), ("classifier", model.classifier))
    }


@functools.lru_cache(maxsize=64)
def _sha256(path: str, mtime_ns: int) -> str:
    return sha256_file(path)
