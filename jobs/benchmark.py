"""Denoise-and-classify throughput: MonteCarloSampler against the reference implementations' loop.

    python -m jobs.benchmark [--preset small|cifar10|imagenet] [--device cpu|cuda] [--images K]
        [--n0 N0] [--n N] [--sigmas S ...] [--batch-size B] [--dtype float32|bfloat16|float16] [--compile]
    ray job submit --working-dir . -- python -m jobs.benchmark --ray ...

Both paths run the same model (random weights) on the same images and sample counts in one
process (pipeline.throughput). The baseline is the loop of the reference implementations
(pipeline.reference_loop: Cohen et al.'s sampling loop around Carlini et al.'s q_sample + p_sample
denoise, one image and one sigma at a time, float32, batch 1,000 unless --baseline-batch-size).
Printed: samples/s of each, their ratio, and the model's FLOPs per sample, the achieved FLOP/s
and, on a known GPU, the fraction of its dense bf16 peak. With ``--ray`` the measurement runs as
a Ray task (with one GPU when the cluster has GPUs).

    python -m jobs.benchmark --time-to-table [--images 24] [--n0 100] [--n 1000] [--set key=value ...]
    python -m jobs.benchmark --sweep [--device cpu] [--work-samples 1000000]

``--time-to-table``: wall time from shards to the certified-accuracy table for the same images,
models, sigmas, n0, n and alpha: (a) the reference loop, (b) this project in full mode, (c) in
cascade mode, ratios and the tables printed (pipeline.time_to_table). ``--sweep``: the
device-settings sweep on the demo's models (pipeline.device_settings) for a run in which one actor
draws ``--work-samples`` samples (compiled settings are measured when that work is long).
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Sequence

from pipeline.models.benchmark_presets import BENCHMARK_PRESETS
from pipeline.reference_loop import REFERENCE_BATCH_SIZE
from pipeline.ray_runtime import ray_session
from pipeline.sampling import DTYPES
from pipeline.throughput import measure_throughput


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
    p.add_argument("--baseline-batch-size", type=int, default=REFERENCE_BATCH_SIZE,
                   help="the reference loop's batch (theirs: 1,000)")
    p.add_argument("--time-to-table", action="store_true",
                   help="time shards -> certified table: reference loop, full mode, cascade mode (demo models)")
    p.add_argument("--sweep", action="store_true", help="print the device-settings sweep on the demo's models")
    p.add_argument("--work-samples", type=float, default=1e6,
                   help="--sweep: samples one actor would draw (compiled settings are measured for long runs)")
    p.add_argument("--work-dir", default=None, help="--time-to-table: folder for shards and runs (default: a temp dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="--time-to-table: override a configs/demo.yaml value (both paths)")
    return p.parse_args(argv)


def run_time_to_table(args: argparse.Namespace):
    from pipeline.time_to_table import time_to_table

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="time-to-table-") as tmp:
        work = Path(args.work_dir or tmp).resolve()
        result = time_to_table(work, args.images or TIME_TO_TABLE_IMAGES, TIME_TO_TABLE_N0 if args.n0 is None else args.n0,
                               args.n or TIME_TO_TABLE_N, args.baseline_batch_size, overrides=args.set)
    for line in result.lines():
        print(line, flush=True)
    return result


def run_sweep(args: argparse.Namespace) -> list[str]:
    import torch

    from pipeline.device_settings import resolve_device_settings, sweep_lines
    from pipeline.sampling import default_device
    from pipeline.time_to_table import demo_config, demo_model

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        cfg = demo_config(Path(tmp), 1, 1, 1)
    device = torch.device(args.device) if args.device else default_device()
    model, shape = demo_model(cfg), (3, cfg.data["resolution"], cfg.data["resolution"])
    auto = {"dtype": "auto", "channels_last": "auto", "compile": "auto", "batch_size": "auto"}
    lines = [f"device settings sweep on {device} (demo models, {shape[1]}x{shape[2]}):",
             *sweep_lines(model, device, shape, auto, args.work_samples),
             "resolved: " + resolve_device_settings(auto, device, model, shape, args.work_samples).reason]
    for line in lines:
        print(line, flush=True)
    return lines


TIME_TO_TABLE_IMAGES, TIME_TO_TABLE_N0, TIME_TO_TABLE_N = 24, 100, 1000


def main(argv: Sequence[str] | None = None):
    args = parse_args(argv)
    if args.time_to_table:
        return run_time_to_table(args)
    if args.sweep:
        return run_sweep(args)
    settings = dict(preset=args.preset, device=args.device, images=args.images, n0=args.n0, n=args.n,
                    sigmas=args.sigmas, batch_size=args.batch_size, dtype=args.dtype, compile=args.compile,
                    channels_last=not args.no_channels_last, repeats=args.repeats, threads=args.threads,
                    baseline_batch_size=args.baseline_batch_size)
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
