"""Reading and validating counts tables: every contract breach names its column and an example row."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis import CountsError, load_counts, read_counts, resolve_run, skipped_images, validate_counts
from analysis.synthetic import synthetic_counts
from pipeline.counts_schema import ERRORS_SCHEMA, REQUIRED_COLUMNS
from pipeline.run_dir import RunDirectory, RunDirectoryError


def small_table(**kwargs) -> pa.Table:
    options = dict(num_images=6, sigmas=(0.25, 0.5), num_classes=10, n0=20, n=200, seed=3) | kwargs
    return synthetic_counts(**options)


def with_row(table: pa.Table, row: int, **changes) -> pa.Table:
    """``table`` with some values of one row replaced (types kept)."""
    rows = table.to_pylist()
    rows[row] = rows[row] | changes
    return pa.Table.from_pylist(rows, schema=table.schema)


def where(table: pa.Table, row: int) -> str:
    return f"image_id={table['image_id'][row].as_py()!r}, sigma={table['sigma'][row].as_py()!r}"


def test_synthetic_table_is_valid_and_sparse_view_matches_rows():
    table = small_table()
    counts = validate_counts(table)
    assert counts.num_classes == 10 and counts.sigmas.tolist() == [0.25, 0.5]
    rows = table.to_pylist()
    for i, row in enumerate(rows):
        assert counts.image_ids[counts.image[i]] == row["image_id"]
        for sparse, prefix in ((counts.counts0, "counts0"), (counts.counts, "counts")):
            lo, hi = sparse.offsets[i], sparse.offsets[i + 1]
            assert sparse.classes[lo:hi].tolist() == row[f"{prefix}_classes"]
            assert sparse.values[lo:hi].tolist() == row[f"{prefix}_values"]


BAD_CASES = {
    "negative count": ("counts_values", lambda r: {"counts_values": [-1] + r["counts_values"][1:]}),
    "class >= num_classes": ("counts_classes", lambda r: {"counts_classes": r["counts_classes"][:-1] + [10]}),
    "class < 0": ("counts0_classes", lambda r: {"counts0_classes": [-2] + r["counts0_classes"][1:]}),
    "classes not ascending": ("counts_classes", lambda r: {"counts_classes": r["counts_classes"][::-1]}),
    "repeated class": ("counts0_classes", lambda r: {"counts0_classes": [r["counts0_classes"][0]] * len(r["counts0_classes"])}),
    "sum != n": ("counts_values", lambda r: {"n": r["n"] + 1}),
    "sum != n0": ("counts0_values", lambda r: {"counts0_values": [v + 1 for v in r["counts0_values"]]}),
    "length mismatch": ("counts_values", lambda r: {"counts_values": r["counts_values"] + [1]}),
    "num_classes disagrees": ("num_classes", lambda r: {"num_classes": 11}),
    "label out of range": ("label", lambda r: {"label": 10}),
    "label differs across sigmas": ("label", lambda r: {"label": (r["label"] + 1) % 10}),
    "pred_clean out of range": ("pred_clean", lambda r: {"pred_clean": -5}),
    "null value": ("n0", lambda r: {"n0": None}),
    "null list element": ("counts_classes", lambda r: {"counts_classes": [None] + r["counts_classes"][1:]}),
    "sigma not positive": ("sigma", lambda r: {"sigma": 0.0}),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_values_name_column_and_row(case):
    column, change = BAD_CASES[case]
    table = small_table()
    row = 7  # the second sigma of an image: not the first row of anything
    bad = with_row(table, row, **change(table.slice(row, 1).to_pylist()[0]))
    with pytest.raises(CountsError) as info:
        validate_counts(bad)
    assert f"'{column}'" in str(info.value)
    assert where(bad, row) in str(info.value)


def test_missing_column_and_wrong_type_are_named():
    table = small_table()
    with pytest.raises(CountsError, match=r"'n0'.*missing.*image_id='img0', sigma=0.25"):
        validate_counts(table.drop_columns(["n0"]))
    as_float = table.set_column(table.schema.get_field_index("label"), "label", table["label"].cast(pa.float64()))
    with pytest.raises(CountsError, match=r"'label'.*type double, expected int64.*image_id='img0'"):
        validate_counts(as_float)
    wide = table.set_column(
        table.schema.get_field_index("counts_classes"), "counts_classes",
        table["counts_classes"].cast(pa.list_(pa.int64())),
    )
    with pytest.raises(CountsError, match=r"'counts_classes'.*list<item: int64>"):
        validate_counts(wide)


def test_identical_duplicates_are_dropped_and_different_ones_rejected():
    table = small_table()
    doubled = pa.concat_tables([table, table.slice(3, 4)])
    counts = validate_counts(doubled)
    assert counts.table.num_rows == table.num_rows
    assert counts.table.equals(table)
    changed = with_row(table.slice(5, 1), 0, pred_clean=(table["pred_clean"][5].as_py() + 1) % 10)
    with pytest.raises(CountsError, match=r"'pred_clean'.*duplicate.*" + where(table, 5)):
        validate_counts(pa.concat_tables([table, changed]))


def test_zero_counts_tolerated_and_empty_table_rejected():
    table = small_table()
    row = min(range(table.num_rows), key=lambda i: len(table["counts_classes"][i]))
    values = table.slice(row, 1).to_pylist()[0]
    free = min(set(range(10)) - set(values["counts_classes"]))
    pairs = sorted(zip(values["counts_classes"] + [free], values["counts_values"] + [0]))
    padded = with_row(table, row, counts_classes=[c for c, _ in pairs], counts_values=[v for _, v in pairs])
    assert validate_counts(padded).counts.totals()[row] == values["n"]
    with pytest.raises(CountsError, match="no rows"):
        validate_counts(table.slice(0, 0))


def write_run(root, table: pa.Table, parts: int = 2) -> None:
    (root / "counts").mkdir(parents=True)
    bounds = np.linspace(0, table.num_rows, parts + 1).astype(int)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        pq.write_table(table.slice(lo, hi - lo), root / "counts" / f"part-{i}.parquet")


def test_run_directory_reading_skips_in_progress_files(tmp_path):
    table = small_table()
    write_run(tmp_path, table)
    counts_dir = tmp_path / "counts"
    for junk in (".tmp-abc", ".part-9.parquet"):
        (counts_dir / junk).write_bytes(b"not parquet")
    run = resolve_run(str(tmp_path))
    assert [p.rsplit("/", 1)[-1] for p in run.counts] == ["part-0.parquet", "part-1.parquet"]
    assert run.errors == () and run.manifest is None
    assert list(run.counts) == RunDirectory.at(str(tmp_path)).counts_files()  # exactly what resume sees
    assert load_counts(str(tmp_path)).equals(table)
    assert load_counts(f"file://{counts_dir}").equals(table)
    assert load_counts(str(counts_dir / "part-1.parquet")).num_rows == table.num_rows - table.num_rows // 2


@pytest.mark.parametrize("stray", ["notes.txt", "_part-9.parquet", "part-9.parquet.tmp", "sub/part-9.parquet",
                                   "_temporary/part-9.parquet"])
def test_a_stray_file_in_a_run_is_named_not_read(tmp_path, stray):
    """Resume and compaction would not see it: the analysis must not aggregate it either."""
    table = small_table()
    write_run(tmp_path, table)
    path = tmp_path / "counts" / stray
    path.parent.mkdir(exist_ok=True)
    pq.write_table(table.slice(0, 1), path)
    named = f"counts/{stray.split('/')[0]}"
    for uri in (str(tmp_path), f"file://{tmp_path}/counts/"):
        with pytest.raises(RunDirectoryError, match=named):
            resolve_run(uri)
    with pytest.raises(RunDirectoryError, match=named):
        RunDirectory.at(str(tmp_path)).done_keys()


def test_a_stray_error_file_is_named(tmp_path):
    write_run(tmp_path, small_table())
    (tmp_path / "errors" / "nested").mkdir(parents=True)
    with pytest.raises(RunDirectoryError, match="errors/nested"):
        resolve_run(str(tmp_path))


def test_a_folder_outside_a_run_is_read_recursively_without_temporary_files(tmp_path):
    table = small_table()
    folder = tmp_path / "exported"
    (folder / "a").mkdir(parents=True)
    pq.write_table(table.slice(0, 5), folder / "first.parquet")
    pq.write_table(table.slice(5), folder / "a" / "second.parquet")
    for junk in (".tmp-abc", ".part-9.parquet", "_part-9.parquet", "part-9.parquet.tmp", "_temporary/part-9.parquet"):
        (folder / junk).parent.mkdir(exist_ok=True)
        (folder / junk).write_bytes(b"not parquet")
    run = resolve_run(str(folder))
    assert [p.rsplit("/", 2)[-2:] for p in run.counts] == [["a", "second.parquet"], ["exported", "first.parquet"]]
    assert load_counts(str(folder)).num_rows == table.num_rows


def test_extra_columns_are_not_read(tmp_path):
    table = small_table()
    extra = table.append_column("notes", pa.array(["x"] * table.num_rows))
    write_run(tmp_path, extra, parts=1)
    assert read_counts(resolve_run(str(tmp_path))).column_names == list(REQUIRED_COLUMNS)


@pytest.mark.parametrize("change", ["drop", "string", "double"])
def test_every_file_needs_the_schema(tmp_path, change):
    table = small_table()
    write_run(tmp_path, table, parts=1)
    second = table.slice(4)
    if change == "drop":
        second = second.drop_columns(["label"])
    else:
        second = second.set_column(2, "label", second["label"].cast(pa.string() if change == "string" else pa.float64()))
    pq.write_table(second, tmp_path / "counts" / "part-1.parquet")
    with pytest.raises(CountsError, match=r"'label'.*part-1.parquet.*" + where(table, 4)):
        load_counts(str(tmp_path))


def test_missing_column_in_file_and_nothing_to_read(tmp_path):
    write_run(tmp_path, small_table().drop_columns(["num_classes"]), parts=1)
    with pytest.raises(CountsError, match="'num_classes'.*missing"):
        load_counts(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        resolve_run(str(tmp_path / "nowhere"))
    (tmp_path / "empty" / "counts").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no counts"):
        resolve_run(str(tmp_path / "empty"))


def test_skipped_images_counts_error_records_without_counts(tmp_path):
    table = small_table()
    write_run(tmp_path, table)
    (tmp_path / "errors").mkdir()
    records = [("bad1", "a.tar"), ("bad2", "b.tar"), ("bad1", "a.tar"), ("img0", "c.tar")]  # img0 was retried fine
    for i, (image_id, source) in enumerate(records):
        error = pa.table({"run_id": ["r"], "image_id": [image_id], "source": [source], "error": ["decode"]},
                         schema=ERRORS_SCHEMA)
        pq.write_table(error, tmp_path / "errors" / f"err-{i}.parquet")
    run = resolve_run(str(tmp_path))
    assert len(run.errors) == 4
    assert skipped_images(run, validate_counts(read_counts(run)).image_ids) == 2


def test_two_runs_in_one_directory_are_refused(tmp_path):
    """Counts of two run_ids are never aggregated as one (issue 11, item 6)."""
    table = small_table()
    write_run(tmp_path, table)
    other = table.slice(0, 2).set_column(0, "run_id", pa.array(["other"] * 2))
    pq.write_table(other, tmp_path / "counts" / "part-9.parquet")
    first = table["run_id"][0].as_py()
    with pytest.raises(CountsError, match=rf"run_id.*'{first}'.*part-0.parquet.*'other'.*part-9.parquet"):
        load_counts(str(tmp_path))


def test_counts_of_another_run_than_the_manifest_are_refused(tmp_path):
    import json

    table = small_table()
    write_run(tmp_path, table)
    (tmp_path / "manifest.json").write_text(json.dumps({"run_id": "elsewhere"}))
    with pytest.raises(CountsError, match=r"run_id.*part-0.parquet.*'elsewhere'.*manifest"):
        load_counts(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"run_id": table["run_id"][0].as_py()}))
    assert load_counts(str(tmp_path)).num_rows == table.num_rows
