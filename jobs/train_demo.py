"""Train the demo's models on scikit-learn's bundled handwritten digits (CPU, minutes).

    python -m jobs.train_demo [--out configs/demo/models] [--stages base finetune]

``base``: the classifier and the denoiser (pipeline.demo_training, on pipeline.digits'
deterministic training split; with ``--threads 1`` the weights are bit-identical run to run);
prints the classifier's clean test accuracy. ``finetune``: the denoiser fine-tuned for the
cascade from ``{out}/denoiser`` (pipeline.demo_training.finetune_denoiser: Ray Train with
configs/finetune-demo.yaml, ``--set`` overrides it) -> ``{out}/denoiser-finetuned``.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
from diffusers import UNet2DModel

from pipeline.demo_training import (CLASSIFIER_SPEC, UNET_CONFIG, finetune_denoiser, save_models, train_classifier,
                                    train_denoiser)
from pipeline.digits import DEMO_MODELS, SEED, digits_split
from pipeline.images import to_float_chw
from pipeline.models.classifier import load_classifier


def train_base(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    split = digits_split()
    x_train, y_train = to_float_chw(split["train"][0]), torch.from_numpy(split["train"][1])
    x_test, y_test = to_float_chw(split["test"][0]), torch.from_numpy(split["test"][1])

    start = time.perf_counter()
    classifier = train_classifier(load_classifier({**CLASSIFIER_SPEC, "random_weights": True}), x_train, y_train,
                                  args.classifier_steps)
    with torch.no_grad():
        accuracy = (classifier(x_test).argmax(1) == y_test).float().mean().item()
    print(f"classifier: clean test accuracy {accuracy:.3f} ({time.perf_counter() - start:.0f}s)", flush=True)

    start = time.perf_counter()
    torch.manual_seed(SEED)
    unet = train_denoiser(UNet2DModel(**UNET_CONFIG), x_train, args.denoiser_steps)
    print(f"denoiser: {args.denoiser_steps} steps ({time.perf_counter() - start:.0f}s)", flush=True)
    save_models(unet, classifier, args.out)
    print(f"saved to {args.out}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEMO_MODELS))
    parser.add_argument("--stages", nargs="+", choices=("base", "finetune"), default=["base", "finetune"])
    parser.add_argument("--classifier-steps", type=int, default=400)
    parser.add_argument("--denoiser-steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: bit-reproducible weights)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a configs/finetune-demo.yaml value")
    args = parser.parse_args(argv)
    if "base" in args.stages:
        train_base(args)
    if "finetune" in args.stages:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="finetune-demo-") as work:
            summary = finetune_denoiser(args.out, work, args.set)
        print(f"fine-tuned denoiser ({time.perf_counter() - start:.0f}s): {args.out}/denoiser-finetuned; "
              f"final metrics {summary['metrics']}", flush=True)


if __name__ == "__main__":
    main()
