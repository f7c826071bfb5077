"""Robustness scenarios (issue 11): bad data, changed weights, corrupt files and bad configs run
through the real certification command line on tiny random-weight models, in a temporary folder.

Each scenario ends in a correct result or a one-line project error (exit code 2); the table it
prints states, per scenario, the exit code, the (image_id, sigma) rows expected and written, how
many expected rows are missing (lost) or present more than once (duplicated), and the first line
of the error message. ``jobs.robustness_check`` is its entry point.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.run_dir import RunDirectory

REPO = Path(__file__).resolve().parent.parent
SIGMAS = (0.25, 0.5)
Cli = Callable[[Sequence[str]], int]  # a command line's main: argv -> exit code


@dataclass
class Outcome:
    scenario: str
    exit_code: int
    expected: int
    written: int
    lost: int
    duplicated: int
    message: str


def _image(fmt: str, seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _parquet(path: Path, ids: list[str], labels: list[int | None], seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image_id": ids, "label": pa.array(labels, pa.int64()),
                             "image": [_image("PNG", seed + i) for i in range(len(ids))]}), path)


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _write_classifier(path: Path, seed: int) -> None:
    import safetensors.torch
    import timm
    import torch

    torch.manual_seed(seed)
    safetensors.torch.save_file(timm.create_model("test_vit", num_classes=10, img_size=32).state_dict(), str(path))


class Scenarios:
    """The scenarios on ``root`` (a scratch folder), run through ``certify`` (jobs.certify's main)."""

    def __init__(self, root: Path, certify: Cli):
        from pipeline.models.small import write_small_models

        self.root, self.certify = root, certify
        self.models = root / "models"
        write_small_models(self.models)
        self.config = root / "small.yaml"
        shutil.copy(REPO / "configs" / "small.yaml", self.config)
        self.outcomes: list[Outcome] = []

    def argv(self, name: str, data: Path, fmt: str = "parquet", *overrides: str, models: Path | None = None) -> list[str]:
        models = models or self.models
        sets = [f"data.uri=file://{data}/", f"data.format={fmt}", f"models.denoiser.uri={models / 'denoiser'}",
                f"models.classifier.uri={models / 'classifier.safetensors'}", f"output.uri=file://{self.root}/runs",
                f"output.run_id={name}", "compute.images_per_call=2", "compute.compile=false", *overrides]
        return ["--config", str(self.config), *(x for s in sets for x in ("--set", s))]

    def run(self, argv: Sequence[str]) -> tuple[int, str]:
        """(exit code, first line of the error) of one certify command line, in process."""
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = self.certify(list(argv))
        except Exception as exc:  # noqa: BLE001 - what a user would see as a traceback (exit 1)
            return 1, f"traceback: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        lines = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
        return code, lines[0] if lines else ""

    def record(self, scenario: str, name: str, code: int, message: str, expected: set) -> None:
        store = RunDirectory(f"file://{self.root}/runs", name)
        try:
            keys = [k for ks in store.file_keys().values() for k in ks]
        except Exception as exc:  # noqa: BLE001 - an unreadable run is itself a finding
            keys, message = [], message or f"{type(exc).__name__}: {exc}"
        present = set(keys)
        self.outcomes.append(Outcome(scenario, code, len(expected), len(present), len(expected - present),
                                     len(keys) - len(present), message))

    def simple(self, scenario: str, name: str, data: Path, expected_ids: list[str], fmt: str = "parquet",
               *overrides: str, **kwargs) -> None:
        code, message = self.run(self.argv(name, data, fmt, *overrides, **kwargs))
        self.record(scenario, name, code, message, {(i, s) for i in expected_ids for s in SIGMAS})

    def all(self) -> list[Outcome]:
        r = self.root
        ids = ["a", "b", "c", "d"]
        _parquet(r / "clean" / "p-00000.parquet", ids, [0, 1, 2, 3])
        self.simple("clean parquet run (baseline)", "clean", r / "clean", ids)

        members = [("s0.png", _image("PNG", 0)), ("s0.cls", b"3"), ("s1.jpg", _image("JPEG", 1)), ("s1.cls", b"1"),
                   ("s2.png", _image("PNG", 2)), ("s3.webp", _image("WEBP", 3)), ("s3.cls", b"2"),
                   ("s4.jpeg", _image("JPEG", 4)), ("s4.cls", b""), ("s5.cls", b"7")]
        _tar(r / "mixed" / "w-00000.tar", members)
        self.simple("webdataset: png/jpg/webp mixed, missing .cls, one sample without image", "mixed",
                    r / "mixed", ["s0", "s1", "s2", "s3", "s4"], "webdataset")

        _parquet(r / "nulls" / "p-00000.parquet", ids, [0, None, 1, None])
        self.simple("parquet: null labels (-> -1)", "nulls", r / "nulls", ids)

        _parquet(r / "dup" / "p-00000.parquet", ["a", "b", "c"], [0, 1, 2])
        _parquet(r / "dup" / "p-00001.parquet", ["c", "d", "a"], [0, 1, 2])
        self.simple("duplicate image_ids across shards", "dup", r / "dup", [])

        _parquet(r / "odd" / "p-00000.parquet", ["x", "y", "x\t0.25\ny", "z\n0.5"], [0, 1, 2, 3])
        self.simple("image_ids holding tab/newline (file-name digest)", "odd", r / "odd",
                    ["x", "y", "x\t0.25\ny", "z\n0.5"], "parquet", "compute.images_per_call=1")

        self.weights_changed(ids)
        self.truncated_counts(ids)
        self.stale_temporaries(ids)

        good = r / "corrupt" / "p-00000.parquet"
        _parquet(good, ids[:2], [0, 1])
        (r / "corrupt" / "p-00001.parquet").write_bytes(good.read_bytes()[:-20])
        self.simple("corrupt (truncated) data shard", "corrupt", r / "corrupt", [])

        import safetensors.torch
        import torch

        bad = r / "bad-models"
        shutil.copytree(self.models, bad)
        safetensors.torch.save_file({"foo": torch.zeros(2)}, str(bad / "classifier.safetensors"))
        self.simple("classifier with mismatched keys", "badkeys", r / "clean", [], models=bad)
        pickled = r / "pickled-models"
        shutil.copytree(self.models, pickled)
        torch.save({"weights": Outcome("x", 0, 0, 0, 0, 0, "a pickled object")}, pickled / "classifier.pt")
        code, message = self.run(self.argv("pickle", r / "clean", "parquet",
                                           f"models.classifier.uri={pickled / 'classifier.pt'}"))
        self.record("classifier checkpoint needing a pickle (refused)", "pickle", code, message, set())

        self.simple("non-finite sigma (smoothing.sigmas=[.inf])", "inf", r / "clean", [], "parquet",
                    "smoothing.sigmas=[.inf]")
        code, message = self.run(["--config", str(r / "no-such-config.yaml")])
        self.record("missing config file", "none", code, message, set())
        return self.outcomes

    def weights_changed(self, ids: list[str]) -> None:
        r = self.root
        models = r / "changing-models"
        shutil.copytree(self.models, models)
        _parquet(r / "weights" / "p-00000.parquet", ids, [0, 1, 2, 3])
        argv = self.argv("weights", r / "weights", models=models)
        self.run(argv)
        _write_classifier(models / "classifier.safetensors", seed=1)  # other weights behind the same URI
        store = RunDirectory(f"file://{r}/runs", "weights")
        keys = store.done_keys()
        forgotten = set(sorted({i for i, _ in keys})[::2])
        store.forget(forgotten)
        kept = {k for k in keys if k[0] not in forgotten}
        code, message = self.run(argv)
        self.record("resume with other classifier weights (half the images' counts removed)", "weights", code,
                    message, kept)

    def truncated_counts(self, ids: list[str]) -> None:
        r = self.root
        _parquet(r / "trunc" / "p-00000.parquet", ids, [0, 1, 2, 3])
        argv = self.argv("trunc", r / "trunc")
        self.run(argv)
        store = RunDirectory(f"file://{r}/runs", "trunc")
        victim = store.counts_files()[0]
        data = Path(victim).read_bytes()
        Path(victim).write_bytes(data[: len(data) // 2])
        code, message = self.run(argv)
        expected = {(i, s) for i in ids for s in SIGMAS}
        self.outcomes.append(Outcome("truncated counts file: resume", code, len(expected), -1, -1, -1, message))
        os.remove(victim)  # what the message says to do
        code, message = self.run(argv)
        self.record("truncated counts file: deleted as told, resumed", "trunc", code, message, expected)

    def stale_temporaries(self, ids: list[str]) -> None:
        r = self.root
        _parquet(r / "stale" / "p-00000.parquet", ids, [0, 1, 2, 3])
        argv = self.argv("stale", r / "stale")
        self.run(argv)
        store = RunDirectory(f"file://{r}/runs", "stale")
        stale = f"{store.counts_dir}/.tmp-crashed"
        store.put(stale, b"PAR1 half written")
        os.utime(stale, (time.time() - 7200, time.time() - 7200))
        code, message = self.run(argv)
        self.record("stale .tmp file in counts/ (2 h old): resume", "stale", code,
                    message or f"stale temporary removed: {not os.path.exists(stale)}",
                    {(i, s) for i in ids for s in SIGMAS})

    def two_runs_aggregated(self) -> None:
        """Two runs' counts in one run directory: ``jobs.aggregate`` (a subprocess) refuses them."""
        r = self.root
        clean, other = RunDirectory(f"file://{r}/runs", "clean"), RunDirectory(f"file://{r}/runs", "odd")
        mixed = r / "runs" / "two-runs"
        shutil.copytree(clean.root, mixed)
        for path in other.counts_files():
            shutil.copy(path, mixed / "counts")
        out = subprocess.run([sys.executable, "-m", "jobs.aggregate", str(mixed), "--out", str(r / "agg")],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        message = lines[0] if lines else (out.stderr.strip().splitlines() or [""])[-1]
        self.outcomes.append(Outcome("aggregate: two runs' counts in one directory", out.returncode, 0, 0, 0, 0, message))


def run_scenarios(root: Path, certify: Cli) -> list[Outcome]:
    """Every scenario in ``root`` (created; must be empty), on a local Ray started here."""
    from pipeline.ray_runtime import ray_session

    root.mkdir(parents=True, exist_ok=True)
    scenarios = Scenarios(root, certify)
    with ray_session(num_cpus=2, log_to_driver=False):
        scenarios.all()
    scenarios.two_runs_aggregated()
    return scenarios.outcomes


def to_table(outcomes: list[Outcome], width: int = 160) -> str:
    """A Markdown table: scenario | exit code | rows expected | written | lost | duplicated | error message."""
    def cell(v: int) -> str:
        return "-" if v < 0 else str(v)

    lines = ["| scenario | exit code | rows expected | rows written | rows lost | rows duplicated | error message (first line) |",
             "|---|---|---|---|---|---|---|"]
    for o in outcomes:
        message = o.message.replace("|", "\\|")
        message = message if len(message) <= width else message[: width - 3] + "..."
        lines.append(f"| {o.scenario} | {o.exit_code} | {o.expected} | {cell(o.written)} | {cell(o.lost)} | "
                     f"{cell(o.duplicated)} | {message} |")
    return "\n".join(lines)
