"""``python -m jobs.aggregate`` (analysis.report) end to end: local run dirs, s3:// via moto, bad input
writes nothing, a failed local write leaves the previous report whole."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis import certify_table, summarize
from analysis.synthetic import synthetic_counts
from jobs.aggregate import main
from pipeline.counts_schema import ERRORS_SCHEMA

OUTPUTS = {"results.parquet", "summary.csv", "summary.md", "summary.tex", "certified_accuracy.png"}
LEGACY = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t3\t3\t0.9\t1\t0:00:01\n1\t2\t-1\t0.0\t0\t0:00:01\n"


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return synthetic_counts(40, (0.25, 0.5, 1.0), num_classes=10, n0=20, n=150, seed=21)


def write_run(root, table: pa.Table, manifest: dict | None = None, errors: tuple[str, ...] = ()) -> None:
    os.makedirs(f"{root}/counts", exist_ok=True)
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), f"{root}/counts/part-a.parquet")
    pq.write_table(table.slice(half), f"{root}/counts/part-b.parquet")
    if manifest is not None:
        with open(f"{root}/manifest.json", "w") as f:
            json.dump(manifest, f)
    if errors:
        os.makedirs(f"{root}/errors", exist_ok=True)
        records = pa.table({"run_id": ["r"] * len(errors), "image_id": list(errors), "source": ["s"] * len(errors),
                            "error": ["decode"] * len(errors)}, schema=ERRORS_SCHEMA)
        pq.write_table(records, f"{root}/errors/err-0.parquet")


def test_local_run_directory_end_to_end(tmp_path, table, capsys):
    run = tmp_path / "runs" / "r1"
    manifest = {"config": {"smoothing": {"p0": 0.6, "alpha": 0.01, "schedule": "paper"}}}
    write_run(run, table, manifest, errors=("broken1", "img3"))  # img3 has counts: not skipped
    (tmp_path / "cohen.tsv").write_text(LEGACY)
    out = tmp_path / "out"
    code = main([str(run), "--out", str(out), "--radii", "0", "0.5", "1", "--legacy", f"Cohen={tmp_path / 'cohen.tsv'}",
                 "--cascade", "0.5,1.0", "--cascade", "0.25,0.5,1.0"])
    assert code == 0
    assert set(os.listdir(out)) == OUTPUTS
    results = pd.read_parquet(out / "results.parquet")
    expected = certify_table(table, cascades=[[0.5, 1.0], [0.25, 0.5, 1.0]], p0=0.6, alpha=0.01, schedule="paper")
    methods = ["sigma=0.25", "sigma=0.5", "sigma=1.0", "cascade(0.5,1.0)", "cascade(0.25,0.5,1.0)", "Cohen"]
    assert results["method"].astype(str).unique().tolist() == methods
    mine = results[results["method"] != "Cohen"].reset_index(drop=True)
    pd.testing.assert_frame_equal(mine.astype({"method": str}), expected.astype({"method": str}), check_dtype=False)
    summary = pd.read_csv(out / "summary.csv")
    pd.testing.assert_frame_equal(summary.iloc[:5].reset_index(drop=True),
                                  summarize(expected, [0, 0.5, 1]).astype({"method": object}), check_dtype=False)
    markdown = (out / "summary.md").read_text()
    assert "p0=0.6, alpha=0.01, schedule=paper" in markdown and "error records, no counts): 1." in markdown
    assert "| Cohen | 2 | - |" in markdown
    assert markdown.split("\n\n", 1)[1] == capsys.readouterr().out
    assert r"\textbf{" in (out / "summary.tex").read_text()
    assert (out / "certified_accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_flags_override_manifest_and_counts_dir_works(tmp_path, table):
    run = tmp_path / "r2"
    write_run(run, table, {"smoothing": {"p0": 0.7}})
    out = tmp_path / "out"
    assert main([f"file://{run}/counts", "--out", str(out), "--sigmas", "0.5", "1.0", "--p0", "0.55"]) == 0
    markdown = (out / "summary.md").read_text()
    assert "p0=0.55, alpha=0.001, schedule=bonferroni" in markdown and "Skipped" not in markdown
    assert pd.read_csv(out / "summary.csv")["method"].tolist() == ["sigma=0.5", "sigma=1.0", "cascade(0.5,1.0)"]
    assert main([str(run), "--out", str(out), "--no-cascade"]) == 0  # into an existing directory
    assert pd.read_csv(out / "summary.csv")["method"].tolist() == ["sigma=0.25", "sigma=0.5", "sigma=1.0"]
    assert "p0=0.7" in (out / "summary.md").read_text()  # the manifest's, top-level "smoothing"
    assert sorted(os.listdir(tmp_path)) == ["out", "r2"]  # no staging directories left behind


def test_s3_run_directory(s3_bucket, tmp_path, table):
    import s3fs

    fs = s3fs.S3FileSystem()
    with fs.open(f"{s3_bucket}/runs/r3/counts/part-0.parquet", "wb") as f:
        pq.write_table(table, f)
    fs.pipe(f"{s3_bucket}/runs/r3/counts/.tmp-123", b"partial upload")
    with fs.open(f"{s3_bucket}/runs/r3/errors/err-0.parquet", "wb") as f:
        pq.write_table(pa.table({"run_id": ["r"], "image_id": ["lost"], "source": ["s"], "error": ["e"]},
                                schema=ERRORS_SCHEMA), f)
    fs.pipe(f"{s3_bucket}/runs/r3/manifest.json", json.dumps({"config": {"smoothing": {"alpha": 0.05}}}).encode())
    out = tmp_path / "out"
    assert main([f"s3://{s3_bucket}/runs/r3", "--out", str(out)]) == 0
    results = pd.read_parquet(out / "results.parquet")
    expected = certify_table(table, alpha=0.05)
    np.testing.assert_array_equal(results["pred"], expected["pred"])
    np.testing.assert_allclose(results["radius"], expected["radius"])
    assert "error records, no counts): 1." in (out / "summary.md").read_text()


def mutate(table: pa.Table, row: int, **changes) -> pa.Table:
    rows = table.to_pylist()
    rows[row] |= changes
    return pa.Table.from_pylist(rows, schema=table.schema)


BAD_INPUTS = {
    "missing column": (lambda t: t.drop_columns(["counts_values"]), "counts_values", None),
    "wrong type": (lambda t: t.set_column(3, "sigma", t["sigma"].cast(pa.float32())), "sigma", None),
    "negative counts": (lambda t: mutate(t, 9, counts_values=[-3] + t["counts_values"][9].as_py()[1:]), "counts_values", 9),
    "class out of range": (lambda t: mutate(t, 9, counts0_classes=t["counts0_classes"][9].as_py()[:-1] + [12]),
                           "counts0_classes", 9),
    "num_classes disagrees": (lambda t: mutate(t, 9, num_classes=12), "num_classes", 9),
    "sum != n": (lambda t: mutate(t, 9, n=151), "counts_values", 9),
    "sum != n0": (lambda t: mutate(t, 9, n0=19), "counts0_values", 9),
    "not ascending": (lambda t: mutate(t, 9, counts_classes=t["counts_classes"][9].as_py()[::-1]), "counts_classes", 9),
    "conflicting duplicate": (lambda t: pa.concat_tables([t, mutate(t.slice(9, 1), 0, label=(t["label"][9].as_py() + 1) % 10)]),
                              "label", 9),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_column_and_row_and_writes_nothing(tmp_path, table, capsys, case):
    change, column, row = BAD_INPUTS[case]
    write_run(tmp_path / "run", change(table))
    out = tmp_path / "out"
    assert main([str(tmp_path / "run"), "--out", str(out)]) == 2
    message = capsys.readouterr().err
    assert f"'{column}'" in message
    row = row or 0
    assert f"image_id={table['image_id'][row].as_py()!r}, sigma={table['sigma'][row].as_py()!r}" in message
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_bad_input_leaves_existing_output_untouched(tmp_path, table, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.md").write_text("old")
    write_run(tmp_path / "run", mutate(table, 4, n=1))
    assert main([str(tmp_path / "run"), "--out", str(out)]) == 2
    assert os.listdir(out) == ["summary.md"] and (out / "summary.md").read_text() == "old"
    # a missing level the cascade needs fails before writing too
    write_run(tmp_path / "run2", table.filter(pa.compute.not_equal(table["sigma"], 1.0)))
    assert main([str(tmp_path / "run2"), "--out", str(out), "--cascade", "0.25,0.5"]) == 0
    assert main([str(tmp_path / "run2"), "--out", str(out), "--legacy", "x=/nonexistent.tsv"]) == 2
    (tmp_path / "cohen.tsv").write_text(LEGACY)
    assert main([str(tmp_path / "run2"), "--out", str(out), "--legacy", f"cascade(0.25,0.5)={tmp_path / 'cohen.tsv'}"]) == 2
    assert "appear in more than one" in capsys.readouterr().err
    assert "sigma=0.25" in (out / "summary.md").read_text()


def test_module_entry_point(tmp_path, table):
    write_run(tmp_path / "run", table)
    proc = subprocess.run([sys.executable, "-m", "jobs.aggregate", str(tmp_path / "run"), "--out", str(tmp_path / "o"),
                           "--no-cascade", "--radii", "0", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("| Method | n | Clean (%) | r=0 | r=1 | ACR | Abstain (%) |")
    assert len(proc.stdout.strip().splitlines()) == 5


def test_reads_what_the_pipeline_writes(tmp_path, table):
    """A run directory written by pipeline.run_dir.RunDirectory, as a cascade-mode run leaves it."""
    from pipeline.run_dir import RunDirectory
    from pipeline.counts_schema import COUNTS_SCHEMA

    store = RunDirectory(f"file://{tmp_path}/runs", "cascade-run")
    smoothing = {"sigmas": [0.25, 0.5, 1.0], "mode": "cascade", "p0": 0.5, "alpha": 0.01, "schedule": "bonferroni"}
    store.write_manifest({"run_id": "cascade-run", "config": {"smoothing": smoothing}})
    full = certify_table(table, alpha=0.01)
    fired = full[full["method"] == "cascade(0.25,0.5,1.0)"].set_index("image_id")["fired_sigma"].fillna(0.0)
    below = table["sigma"].to_numpy() < fired.reindex(table["image_id"].to_pylist()).to_numpy()
    rows = table.filter(pa.array(~below))  # never-reached levels are not sampled
    rows = rows.set_column(rows.schema.get_field_index("run_id"), "run_id", pa.array(["cascade-run"] * rows.num_rows))
    optional = {f.name: pa.nulls(rows.num_rows, f.type) for f in COUNTS_SCHEMA if f.name not in rows.column_names}
    rows = pa.table({**{n: rows[n] for n in rows.column_names}, **optional})
    for lo in range(0, rows.num_rows, 25):
        store.write_counts(rows.slice(lo, 25))
    store.write_error("corrupt.jpg", "shard-0.tar", "cannot decode")
    (tmp_path / "runs" / "cascade-run" / "counts" / ".tmp-crashed").write_bytes(b"half a file")
    out = tmp_path / "out"
    assert main([f"{tmp_path}/runs/cascade-run", "--out", str(out)]) == 0
    results = pd.read_parquet(out / "results.parquet")
    cascade = results[results["method"] == "cascade(0.25,0.5,1.0)"].set_index("image_id").sort_index()
    expected = full[full["method"] == "cascade(0.25,0.5,1.0)"].set_index("image_id").sort_index()
    assert cascade.index.equals(expected.index)  # the files' order differs from the table's
    np.testing.assert_array_equal(cascade["pred"], expected["pred"])
    np.testing.assert_allclose(cascade["radius"], expected["radius"])
    summary = pd.read_csv(out / "summary.csv").set_index("method")["n_images"]
    # the run's own cascade and its top level (which holds every image) by default
    assert summary.to_dict() == {"sigma=1.0": 40, "cascade(0.25,0.5,1.0)": 40}
    markdown = (out / "summary.md").read_text()
    assert "alpha=0.01" in markdown and "error records, no counts): 1." in markdown
    # the lower levels alone are still there when asked for (subsets of the images)
    assert main([f"{tmp_path}/runs/cascade-run", "--out", str(tmp_path / "out2"), "--sigmas", "0.25", "1.0",
                 "--no-cascade"]) == 0
    singles = pd.read_csv(tmp_path / "out2" / "summary.csv").set_index("method")["n_images"]
    assert singles["sigma=0.25"] < singles["sigma=1.0"] == 40


def test_a_cascade_level_no_image_reached_is_fine(tmp_path):
    """Every image fires at the top level: the run has no rows at the lower sigmas, and the run's
    cascade (3 levels: its alpha split) is still the analysis; asking for it explicitly works too."""
    from pipeline.certification import SparseCounts
    from pipeline.counts_schema import REQUIRED_COLUMNS

    labels = np.arange(12) % 10
    unanimous = np.zeros((12, 10), dtype=np.int64)
    unanimous[np.arange(12), labels] = 1
    lists = {}
    for prefix, total in (("counts0", 20), ("counts", 400)):
        lists[f"{prefix}_classes"], lists[f"{prefix}_values"] = SparseCounts.from_dense(unanimous * total).to_arrow_lists()
    table = pa.table({"run_id": ["r"] * 12, "image_id": [f"img{i}" for i in range(12)], "label": labels,
                      "sigma": [1.0] * 12, "n0": [20] * 12, "n": [400] * 12, **lists, "num_classes": [10] * 12,
                      "pred_clean": labels}).cast(pa.schema(REQUIRED_COLUMNS.items()))
    write_run(tmp_path / "run", table, {"run_id": "r", "config": {"smoothing": {
        "sigmas": [0.25, 0.5, 1.0], "mode": "cascade", "p0": 0.5, "alpha": 0.001, "schedule": "bonferroni"}}})
    for extra in ([], ["--cascade", "0.25,0.5,1.0"]):
        out = tmp_path / f"out{len(extra)}"
        assert main([str(tmp_path / "run"), "--out", str(out), *extra]) == 0
        results = pd.read_parquet(out / "results.parquet")
        cascade = results[results["method"] == "cascade(0.25,0.5,1.0)"]
        assert len(cascade) == 12 and (cascade["fired_sigma"] == 1.0).all()
        # three levels split alpha: the radius uses alpha/3 at sigma = 1.0, below sigma=1.0 alone at alpha
        single = results[results["method"] == "sigma=1.0"].set_index("image_id")["radius"]
        assert (cascade.set_index("image_id")["radius"] < single).all()


def report_folder(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.mark.parametrize("failing", ["old aside", "new into place"])
def test_failed_swap_leaves_the_old_report_whole(tmp_path, table, monkeypatch, failing):
    """The local write is all or nothing: a rename that fails leaves the previous report, every file."""
    write_run(tmp_path / "run", table)
    out = tmp_path / "out"
    assert main([str(tmp_path / "run"), "--out", str(out), "--no-cascade"]) == 0
    before = report_folder(out)
    real_replace = os.replace

    def replace(src, dst):
        moving = os.path.basename(src).startswith(".out.new-") if failing == "new into place" else src == str(out)
        if moving:
            raise OSError(f"injected failure renaming {src}")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="injected failure"):
        main([str(tmp_path / "run"), "--out", str(out), "--sigmas", "0.5", "1.0", "--p0", "0.6"])
    monkeypatch.undo()
    assert report_folder(out) == before  # the old complete set, not a mix
    assert sorted(os.listdir(tmp_path)) == ["out", "run"]  # no staging or backup folders left
    assert main([str(tmp_path / "run"), "--out", str(out), "--sigmas", "0.5", "1.0", "--p0", "0.6"]) == 0
    after = report_folder(out)
    assert set(after) == OUTPUTS and all(after[name] != before[name] for name in ("summary.csv", "summary.md"))


def test_folder_with_other_files_is_refused(tmp_path, table, capsys):
    """Replacing the folder whole must not delete what is not a report's: refused, nothing written."""
    write_run(tmp_path / "run", table)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "summary.md").write_text("old")
    assert main([str(tmp_path / "run"), "--out", str(out)]) == 2
    assert "not a report folder" in capsys.readouterr().err
    assert report_folder(out) == {"notes.txt": b"mine", "summary.md": b"old"}
    assert sorted(os.listdir(tmp_path)) == ["out", "run"]


def test_writes_report_to_s3(s3_bucket, tmp_path, table):
    import s3fs

    write_run(tmp_path / "run", table)
    assert main([str(tmp_path / "run"), "--out", f"s3://{s3_bucket}/reports/r1", "--no-cascade"]) == 0
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    assert {p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/reports/r1")} == OUTPUTS
    results = pd.read_parquet(io.BytesIO(fs.cat_file(f"{s3_bucket}/reports/r1/results.parquet")))
    expected = certify_table(table, cascades=[])
    np.testing.assert_allclose(results["radius"], expected["radius"])


MULTISCALE_LOG = ("idx\tlabel\tpredict\tradius\tr_neg\tcorrect\tpred_uc\tcorr_uc\tstage\ttime\n"
                  "0\t3\t3\t0.5\t0.1\t1\t3\t1\t0\t0:00:01\n1\t2\t-2\t0.0\t0.0\t0\t2\t1\t2\t0:00:01\n"
                  "2\t5\t4\t0.2\t0.0\t0\t4\t0\t1\t0:00:01\n")


def test_legacy_logs_alone(tmp_path, capsys):
    """Published baselines tabulated by themselves: no counts run (issue 11, the aggregation a user expects)."""
    (tmp_path / "cohen.tsv").write_text(LEGACY)
    (tmp_path / "jeong.tsv").write_text(MULTISCALE_LOG)
    out = tmp_path / "out"
    assert main(["--legacy", f"Cohen={tmp_path / 'cohen.tsv'}", "--legacy", f"Jeong & Shin={tmp_path / 'jeong.tsv'}",
                 "--out", str(out), "--radii", "0", "0.5"]) == 0
    assert set(os.listdir(out)) == OUTPUTS
    summary = pd.read_csv(out / "summary.csv")
    assert summary["method"].tolist() == ["Cohen", "Jeong & Shin"] and summary["n_images"].tolist() == [2, 3]
    assert summary["r=0"].tolist() == [0.5, 1 / 3] and summary["r=0.5"].tolist() == [0.5, 1 / 3]
    results = pd.read_parquet(out / "results.parquet")
    assert results["pred"].tolist() == [3, -1, 3, -1, 4]  # Jeong & Shin's stop (-2) is the abstain code
    markdown = (out / "summary.md").read_text()
    assert markdown.startswith(f"Settings: legacy logs: Cohen={tmp_path / 'cohen.tsv'}, Jeong & Shin=")
    assert markdown.split("\n\n", 1)[1] == capsys.readouterr().out
    assert "| Cohen | 2 | - | **50.0** | **50.0** |" in markdown
    assert (out / "certified_accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_legacy_logs_alone_from_the_command_line(tmp_path):
    (tmp_path / "cohen.tsv").write_text(LEGACY)
    argv = ["--legacy", f"Cohen={tmp_path / 'cohen.tsv'}", "--out", str(tmp_path / "o"), "--radii", "0", "1"]
    proc = subprocess.run([sys.executable, "-m", "jobs.aggregate", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[2] == "| Cohen | 2 | - | **50.0** | 0.0 | **0.450** | 50.0 |"


@pytest.mark.parametrize("argv, message", [
    ([], "give RESULTS_URI (a counts run), --legacy NAME=PATH, or both"),
])
def test_nothing_to_aggregate_is_a_usage_error(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, named", [(["--sigmas", "0.5"], "sigmas"), (["--no-cascade"], "cascades"),
                                          (["--p0", "0.6"], "p0"), (["--schedule", "paper"], "schedule")])
def test_counts_options_without_a_run_are_refused(tmp_path, capsys, flags, named):
    (tmp_path / "cohen.tsv").write_text(LEGACY)
    assert main(["--legacy", f"Cohen={tmp_path / 'cohen.tsv'}", "--out", str(tmp_path / "out"), *flags]) == 2
    assert capsys.readouterr().err.startswith(f"error: {named}: apply to a counts run")
    assert not (tmp_path / "out").exists()


def test_a_run_directory_without_counts_says_so(tmp_path, capsys):
    """A run whose every image failed (errors/ and a manifest, no counts/): not its error records read as counts."""
    from pipeline.run_dir import RunDirectory

    store = RunDirectory(f"file://{tmp_path}/runs", "r")
    store.write_manifest({"run_id": "r", "config": {}})
    store.write_error("a.jpg", "shard-0.tar", "cannot decode")
    assert main([f"{tmp_path}/runs/r", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}/runs/r: ") and "no counts" in err and "'label'" not in err
    assert not (tmp_path / "out").exists()
