"""The demo: multi-scale smoothing and its fine-tuned denoiser on real handwritten digits, on Ray, in minutes on CPU.

    python -m jobs.demo [--work-dir demo_out] [--set smoothing.n=128 ...] [--models configs/demo/models]
    ray job submit --working-dir . -- python -m jobs.demo --work-dir /abs/path   # a running cluster

1. scikit-learn's digits, test split (360 images, pipeline.digits) -> PNG folder
   ``{work}/images/{label}/digit_NNNN.png`` -> Parquet shards at ``file://{work}/shards`` (the
   local "object store", pipeline.shard_writer);
2. certification (pipeline.demo.certify_demo) with configs/demo.yaml, twice on the same images
   and noise (same seed): the original denoiser of configs/demo/models in mode ``full`` (every
   sigma for every image: each sigma alone and the cascade from one set of counts), and the
   denoiser fine-tuned for the cascade (configs/demo/models/denoiser-finetuned) in mode
   ``cascade``; on an embedded local Ray, or on the cluster the job was submitted to
   -> counts at ``{work}/runs/{run_id}`` and ``{work}/runs/{run_id}-finetuned``;
3. the report (pipeline.demo.demo_report): one markdown table (each sigma alone, the cascade,
   the cascade with the fine-tuned denoiser; certified accuracy at the radii, ACR, samples
   spent) on stdout, two lines saying what it shows, ``{work}/certified_accuracy.png`` and
   ``{work}/results.parquet`` (one row per image x method).

``--models`` certifies another models folder (e.g. a fine-tuning variant written by
``python -m jobs.train_demo --stages finetune --out DIR --set loss.lam=2``, with DIR holding a
copy of classifier.safetensors and denoiser/); ``--set data.selection.every=1 --set
smoothing.n=512`` is the longer study on all 360 digits.

Re-running resumes the same runs (finished rows are not recomputed); a changed
data/models/smoothing setting needs a new ``--set output.run_id=...``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from pipeline.demo import certify_demo, demo_report
from pipeline.digits import DEMO_MODELS


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="demo_out", help="local folder for images, shards, runs and the plot")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a configs/demo.yaml value (both runs), e.g. smoothing.n=128")
    parser.add_argument("--models", default=str(DEMO_MODELS),
                        help="folder with classifier.safetensors, denoiser/ and denoiser-finetuned/")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the embedded Ray (not used on a cluster)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = Path(args.work_dir).resolve()
    runs = certify_demo(work, args.set, args.num_cpus, Path(args.models).resolve())
    report = demo_report(runs)
    plot, results = work / "certified_accuracy.png", work / "results.parquet"
    plot.write_bytes(report.plot)
    report.results.to_parquet(results, index=False)
    print(report.table, end="")
    print("\n" + "\n".join(report.findings))
    print(f"\nplot:    {plot}\n"
          f"counts:  {runs.original}/counts, {runs.finetuned}/counts  (one row per image x sigma)\n"
          f"results: {results}  (one row per image x method)\n\n"
          "import pandas as pd\n"
          f"results = pd.read_parquet({str(results)!r})\n"
          "print(results.groupby('method').agg(accuracy=('correct', 'mean'), mean_radius=('radius', 'mean')))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
