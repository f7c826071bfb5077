"""Legacy per-image logs (idx label predict radius correct time) as tidy results."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis import LegacyLogError, certify_table, read_legacy_log, single_method, summarize, write_legacy_log
from analysis.synthetic import synthetic_counts

# As locuslab/smoothing's certify.py writes it: radius to 3 significant digits, time as a timedelta.
COHEN_LOG = """idx\tlabel\tpredict\tradius\tcorrect\ttime
0\t3\t3\t0.932\t1\t0:00:01.123456
20\t8\t-1\t0.0\t0\t0:00:01.100000
40\t8\t1\t0.211\t0\t0:00:01.097000
60\t0\t0\t1.27\t1\t0:00:01.230000
"""


def test_reads_reference_format(tmp_path):
    path = tmp_path / "sigma_0.50"
    path.write_text(COHEN_LOG)
    got = read_legacy_log(str(path), "Cohen et al. (0.50)")
    assert got["image_id"].tolist() == ["0", "20", "40", "60"]
    assert got["pred"].tolist() == [3, -1, 1, 0]
    assert got["correct"].tolist() == [True, False, False, True]
    np.testing.assert_allclose(got["radius"], [0.932, 0.0, 0.211, 1.27])
    assert got["fired_sigma"].isna().all() and got["pred_clean"].isna().all()
    summary = summarize(got, [0.0, 1.0]).iloc[0]
    assert (summary["n_images"], summary["r=0"], summary["r=1"], summary["abstain_rate"]) == (4, 0.5, 0.25, 0.25)
    assert summary["acr"] == pytest.approx((0.932 + 1.27) / 4)


def test_round_trip_of_tidy_results(tmp_path):
    table = synthetic_counts(40, (0.5,), num_classes=10, n0=20, n=150, seed=5)
    results = certify_table(table, alpha=0.01)
    path = str(tmp_path / "log.tsv")
    write_legacy_log(results, path)
    back = read_legacy_log(f"file://{path}", single_method(0.5))
    columns = ["image_id", "label", "method", "pred", "radius", "correct"]
    pd.testing.assert_frame_equal(back[columns], results[columns], check_categorical=False)
    assert (back["pred"] == -1).any() and back["correct"].any()


@pytest.mark.parametrize(
    "text,message",
    [
        ("idx\tlabel\tpredict\tcorrect\ttime\n0\t1\t1\t1\t0:00:01\n", "column 'radius' missing"),
        ("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t0\n7\t1\tcat\t0.5\t1\t0\n", r"'predict'.*'cat'.*idx=7"),
        ("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t0\n9\t2\t1\t0.5\t1\t0\n", r"'correct'.*idx=9"),
        ("idx\tlabel\tpredict\tradius\tcorrect\ttime\n4\t1\t1\t\t1\t0\n", r"'radius'.*idx=4"),
        ("", r"bad\.tsv: empty file"),
        ("idx\tlabel\tpredict\tradius\tcorrect\ttime\n", r"bad\.tsv: no rows"),
        ("idx\tlabel\tpredict\tradius\tcorrect\ttime\n3\t1\t1\tinf\t1\t0\n", r"'radius'.*inf.*idx=3"),
        ("idx\tlabel\tpredict\tradius\tcorrect\ttime\n3\t1\t1\t-0.5\t1\t0\n", r"'radius'.*idx=3"),
        ("idx\tlabel\tpredict\tradius\tcorrect\ttime\n5\t1\t-2\t0\t0\t0\n", r"'predict'.*-2.*idx=5"),
    ],
)
def test_malformed_logs_name_column_and_idx(tmp_path, text, message):
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(LegacyLogError, match=message):
        read_legacy_log(str(path), "bad")


# As Jeong & Shin's certify script writes it (10 columns; predict -2: the cascade stopped).
MULTISCALE_LOG = """idx\tlabel\tpredict\tradius\tr_neg\tcorrect\tpred_uc\tcorr_uc\tstage\ttime
0\t3\t3\t0.75\t0.1\t1\t3\t1\t0\t0:00:02.5
50\t8\t-2\t0.0\t0.0\t0\t8\t1\t2\t0:00:03.0
100\t1\t-1\t0.0\t0.0\t0\t2\t0\t1\t0:00:02.9
150\t4\t4\t1.5\t0.2\t1\t4\t1\t0\t0:00:02.7
"""


def test_reads_multiscale_format_with_stop_code(tmp_path):
    path = tmp_path / "mdds.tsv"
    path.write_text(MULTISCALE_LOG)
    got = read_legacy_log(str(path), "Jeong & Shin")
    assert got["pred"].tolist() == [3, -1, -1, 4]  # -2 (stop) is the abstain code -1 here
    assert got["correct"].tolist() == [True, False, False, True]
    np.testing.assert_allclose(got["radius"], [0.75, 0.0, 0.0, 1.5])
    summary = summarize(got, [0.0, 1.0]).iloc[0]
    assert (summary["r=0"], summary["r=1"], summary["abstain_rate"]) == (0.5, 0.25, 0.5)


def test_missing_log_names_the_file(tmp_path):
    with pytest.raises(LegacyLogError, match="nope.tsv: no such file"):
        read_legacy_log(str(tmp_path / "nope.tsv"), "x")
