"""Train the demo's two models on scikit-learn's bundled handwritten digits (CPU, minutes).

    python -m jobs.train_demo [--out configs/demo/models]

The data is pipeline.digits' deterministic training split; the models, their training and the
files written are pipeline.demo_training's (reproducible: with ``--threads 1`` the weights are
bit-identical run to run). Prints the classifier's clean test accuracy.
"""
from __future__ import annotations

import argparse
import time

import torch
from diffusers import UNet2DModel

from pipeline.demo_training import CLASSIFIER_SPEC, UNET_CONFIG, save_models, train_classifier, train_denoiser
from pipeline.digits import DEMO_MODELS, SEED, digits_split
from pipeline.images import to_float_chw
from pipeline.models.classifier import load_classifier


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEMO_MODELS))
    parser.add_argument("--classifier-steps", type=int, default=400)
    parser.add_argument("--denoiser-steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: bit-reproducible weights)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    split = digits_split()
    x_train, y_train = to_float_chw(split["train"][0]), torch.from_numpy(split["train"][1])
    x_test, y_test = to_float_chw(split["test"][0]), torch.from_numpy(split["test"][1])

    start = time.perf_counter()
    classifier = train_classifier(load_classifier({**CLASSIFIER_SPEC, "random_weights": True}), x_train, y_train, args.classifier_steps)
    with torch.no_grad():
        accuracy = (classifier(x_test).argmax(1) == y_test).float().mean().item()
    print(f"classifier: clean test accuracy {accuracy:.3f} ({time.perf_counter() - start:.0f}s)", flush=True)

    start = time.perf_counter()
    torch.manual_seed(SEED)
    unet = train_denoiser(UNet2DModel(**UNET_CONFIG), x_train, args.denoiser_steps)
    print(f"denoiser: {args.denoiser_steps} steps ({time.perf_counter() - start:.0f}s)", flush=True)
    save_models(unet, classifier, args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
