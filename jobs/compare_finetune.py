"""Does calibration fine-tuning help the demo's cascade? One command, CPU, minutes.

    python -m jobs.compare_finetune [--work-dir demo_out/finetune] [--models configs/demo/models]
        [--set training.steps=300 ...] [--certify-set smoothing.n=256 ...] [--radii 0 0.25 ...]

1. the digits *training* split (pipeline.digits) -> PNGs -> Parquet shards, and the test split
   as jobs.demo writes it;
2. fine-tuning (pipeline.finetuning) with configs/finetune-demo.yaml (+ --set) on the training
   shards, unless the
   fine-tuned denoiser for this exact config is already in the work directory (the checkpoint
   name and output folder carry a hash of the config, so a changed config trains afresh and
   an interrupted one resumes);
3. certification (pipeline.certify_run) twice with configs/demo.yaml (+ --certify-set, by default every second test image,
   n0 = 16, n = 128: ``--certify-set data.selection.every=1`` certifies all 360), mode ``full``, once with the
   original denoiser and once with the fine-tuned one: same images, same seed, hence the same
   noise samples;
4. the report (analysis.report) of both runs; prints one table with the two rows of every method (each sigma
   alone and the cascade) one under the other, and writes it to ``{work}/comparison.md``.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from analysis.report import render_report, write_report
from analysis.summary import to_markdown
from pipeline.certify_run import run_certification
from pipeline.config import load_config
from pipeline.digits import DEMO_CONFIG, DEMO_MODELS, DEMO_RADII, write_digit_shards
from pipeline.finetuning import FinetuneConfig, load_finetune_config, run_finetuning
from pipeline.finetuning.train_loop import CONFIG_FILE
from pipeline.ray_runtime import ray_session
from pipeline.storage import url_to_fs

REPO = Path(__file__).resolve().parent.parent
FINETUNE_CONFIG = REPO / "configs" / "finetune-demo.yaml"
LABELS = ("original", "fine-tuned")
CERTIFY_DEFAULTS = ("data.selection.every=2", "smoothing.n0=16", "smoothing.n=128")  # 180 test images: minutes on 2 CPUs


def digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:10]


def finetune_config(work: Path, models: Path, train_uri: str, overrides: Sequence[str]) -> FinetuneConfig:
    """The demo's fine-tuning config with checkpoint name and output folder keyed by its content."""
    settings = [f"data.uri={train_uri}", f"models.denoiser.uri={models / 'denoiser'}",
                f"models.classifier.uri={models / 'classifier.safetensors'}",
                f"checkpoint.uri={work / 'checkpoints'}", *overrides]
    cfg = load_finetune_config(str(FINETUNE_CONFIG), settings)
    d = cfg.to_dict()
    key = digest({k: d[k] for k in ("data", "models", "loss", "training")})
    return load_finetune_config(str(FINETUNE_CONFIG), [
        *settings, f"checkpoint.name={cfg.checkpoint['name']}-{key}", f"output.uri={work / f'denoiser-{key}'}"])


def ensure_finetuned(cfg: FinetuneConfig) -> str:
    """Fine-tune unless ``output.uri`` already holds the result; returns output.uri."""
    uri = cfg.output["uri"]
    fs, path = url_to_fs(uri)
    if fs.exists(f"{path.rstrip('/')}/{CONFIG_FILE}"):
        logging.getLogger("jobs.compare_finetune").info("fine-tuned denoiser found at %s", uri)
    else:
        run_finetuning(cfg)
    return uri


def certify_both(work: Path, models: Path, test_uri: str, denoisers: Sequence[str],
                 overrides: Sequence[str]) -> list[str]:
    """Certification (mode full) with each denoiser on the same images and seed; returns the run URIs."""
    key = digest(list(overrides))
    runs = []
    for label, denoiser in zip(LABELS, denoisers):
        run_id = f"{label}-{key}" if label == LABELS[0] else f"{label}-{key}-{Path(denoiser).name}"
        cfg = load_config(str(DEMO_CONFIG), [
            f"data.uri={test_uri}", f"models.denoiser.uri={denoiser}",
            f"models.classifier.uri={models / 'classifier.safetensors'}",
            f"output.uri={(work / 'runs').as_uri()}", f"output.run_id={run_id}", *overrides, "smoothing.mode=full"])
        runs.append(run_certification(cfg)["run"])
    return runs


def side_by_side(runs: Sequence[str], work: Path, radii: Sequence[float]) -> str:
    """The report of each run (in ``{work}/aggregate/{label}``), summaries interleaved method by method."""
    summaries = []
    for label, run in zip(LABELS, runs):
        report = render_report(run, radii=radii)
        write_report(str(work / "aggregate" / label), report.files)
        summary = pd.read_csv(io.BytesIO(report.files["summary.csv"]))
        summaries.append(summary.assign(order=range(len(summary)), which=len(summaries),
                                        method=summary["method"] + f" [{label}]"))
    both = pd.concat(summaries).sort_values(["order", "which"]).drop(columns=["order", "which"])
    return to_markdown(both.reset_index(drop=True), radii)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", default="demo_out/finetune")
    parser.add_argument("--models", default=str(DEMO_MODELS), help="folder with denoiser/ and classifier.safetensors")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fine-tuning config override")
    parser.add_argument("--certify-set", action="append", default=None, metavar="KEY=VALUE",
                        help=f"certification config override (both runs); default {' '.join(CERTIFY_DEFAULTS)}")
    parser.add_argument("--radii", type=float, nargs="+", default=list(DEMO_RADII))
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the embedded local Ray")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work, models = Path(args.work_dir).resolve(), Path(args.models).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        with ray_session(args.num_cpus):
            train_uri = write_digit_shards("train", work / "train_images", work / "train_shards", shard_size=500,
                                           prefix="train")
            cfg = finetune_config(work, models, train_uri, args.set)
            tuned = ensure_finetuned(cfg)
            certify_set = CERTIFY_DEFAULTS if args.certify_set is None else args.certify_set
            test_uri = write_digit_shards("test", work / "images", work / "shards", shard_size=120)
            runs = certify_both(work, models, test_uri, [str(models / "denoiser"), tuned], certify_set)
        table = side_by_side(runs, work, args.radii)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    header = (f"Fine-tuning: {json.dumps(cfg.loss)}, {cfg.training['steps']} steps x {cfg.training['batch_size']} "
              f"images x {cfg.compute['num_workers']} worker(s); denoiser {tuned}\n\n")
    (work / "comparison.md").write_text(header + table)
    print(header + table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
