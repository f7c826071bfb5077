"""Denoise-and-classify throughput: MonteCarloSampler against the reference implementations' loop.

    python -m jobs.benchmark [--preset small|cifar10|imagenet] [--device cpu|cuda] [--images K]
        [--n0 N0] [--n N] [--sigmas S ...] [--batch-size B] [--dtype float32|bfloat16|float16] [--compile]
    ray job submit --working-dir . -- python -m jobs.benchmark --ray ...

Both paths run the same model (random weights) on the same images and sample counts in one
process (pipeline.throughput). The baseline is the loop of the reference implementations
(pipeline.reference_loop: one image and one sigma at a time, float32). Printed: samples/s of
each, their ratio, and the model's FLOPs per sample, the achieved FLOP/s and, on a known GPU,
the fraction of its dense bf16 peak. With ``--ray`` the measurement runs as a Ray task (with
one GPU when the cluster has GPUs).
"""
from __future__ import annotations

import argparse
from typing import Sequence

from pipeline.models.benchmark_presets import BENCHMARK_PRESETS
from pipeline.ray_runtime import ray_session
from pipeline.sampling import DTYPES
from pipeline.throughput import ThroughputResult, measure_throughput


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(BENCHMARK_PRESETS), default="small")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--images", type=int, default=None, help="number of images (default: the preset's)")
    p.add_argument("--n0", type=int, default=None, help="selection samples per image and sigma")
    p.add_argument("--n", type=int, default=None, help="estimation samples per image and sigma")
    p.add_argument("--sigmas", type=float, nargs="+", default=None)
    p.add_argument("--batch-size", type=int, default=None, help="device batch (default: the preset's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="sampler precision (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in the sampler")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--repeats", type=int, default=1, help="time each path this many times, keep the best")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--ray", action="store_true", help="run as a Ray task (a GPU one when GPUs exist)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> ThroughputResult:
    args = parse_args(argv)
    settings = dict(preset=args.preset, device=args.device, images=args.images, n0=args.n0, n=args.n,
                    sigmas=args.sigmas, batch_size=args.batch_size, dtype=args.dtype, compile=args.compile,
                    channels_last=not args.no_channels_last, repeats=args.repeats, threads=args.threads)
    if args.ray:
        import ray

        with ray_session():
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
            result = ray.get(ray.remote(num_gpus=gpus)(measure_throughput).remote(**settings))
    else:
        result = measure_throughput(**settings)
    for line in result.lines():
        print(line, flush=True)
    return result


if __name__ == "__main__":
    main()
