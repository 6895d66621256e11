"""SKAB metrics (bench/skab.py) against hand-computed cases and SKAB's conventions."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from bench.skab import (
    SKAB_PROFILES,
    Binary,
    binary,
    changepoints_from_outliers,
    cp_windows,
    load_skab,
    nab_changepoints,
    nab_file,
    write_results,
)


def test_binary_pools_rows_over_files():
    true = [np.array([0, 0, 1, 1, 1, 0]), np.array([1, 1, 0, 0])]
    pred = [np.array([0, 1, 1, 1, 0, 0]), np.array([0, 1, 0, 1])]
    b = binary(true, pred)
    assert (b.tp, b.tn, b.fp, b.fn) == (3, 3, 2, 2)
    assert b.f1 == pytest.approx(3 / (3 + (2 + 2) / 2))  # SKAB: TP / (TP + (FN + FP) / 2)
    assert b.far == pytest.approx(100 * 2 / 5)
    assert b.mar == pytest.approx(100 * 2 / 5)
    assert math.isnan(Binary(0, 0, 0, 0).f1)


def test_changepoints_are_the_edges_of_flagged_runs():
    pred = np.array([0, 0, 1, 1, 1, 0, 0, 1, 0])
    assert changepoints_from_outliers(pred).tolist() == [0, 0, 1, 0, 0, 1, 0, 1, 1]
    assert changepoints_from_outliers(np.array([1, 1, 0])).tolist() == [1, 0, 1]  # cp[0] = pred[0]


def test_windows_lie_right_of_changepoints_and_overlaps_are_cut_on_the_right():
    seconds = np.arange(0, 300, 1.0)
    cp = np.zeros(300, int)
    cp[[10, 40, 200]] = 1
    assert cp_windows(seconds, cp) == [(10.0, 70.0), (70.0, 100.0), (200.0, 260.0)]


def _tanh_scale(position: float, a_tp: float, a_fp: float) -> float:
    """SKAB's my_scale written out: y(x) on x = linspace(-pi/2, pi/2, 1000) at int(position * 1000)."""
    x = -math.pi / 2 + math.pi * int(position * 1000) / 999
    return (a_tp - a_fp) / 2 * -math.tanh(x) / math.tanh(math.pi / 2) + (a_tp - a_fp) / 2 + a_fp


def test_nab_changepoint_score_hand_computed():
    """Rows 1 s apart; true changepoints at t=100 and t=400 -> windows [100, 160] and [400, 460].

    Predictions: t=50 (before any window: FP), t=115 and t=130 (the first counts, at 15/60 = 0.25 of
    the window), t=300 (between windows: FP); nothing in the second window (FN).
    Standard: -0.11 + y(0.25) - 0.11 - 1, with y(0.25) = 1.11/2 * -tanh(x_249)/tanh(pi/2) + 1.11/2 - 0.11
    and x_250 = -pi/2 + pi * 250 / 999 = -0.7846: tanh = -0.6553, / tanh(pi/2) = 0.9172 -> y = 0.8416.
    """
    seconds = np.arange(600, dtype=float)
    true_cp = np.zeros(600, int)
    true_cp[[100, 400]] = 1
    pred = np.zeros(600, int)
    pred[[50, 115, 130, 300]] = 1
    score, windows = nab_file(seconds, true_cp, pred, "Standard")
    assert windows == 2
    tp = _tanh_scale(0.25, 1.0, -0.11)
    assert tp == pytest.approx(0.8416, abs=1e-4)
    assert score == pytest.approx(-0.11 + tp - 0.11 - 1.0, abs=1e-12)
    low_fn, _ = nab_file(seconds, true_cp, pred, "LowFN")
    assert low_fn == pytest.approx(-0.11 + tp - 0.11 - 2.0, abs=1e-12)
    # a detection at the very start of a window is worth A_tp; normalised over files
    perfect = true_cp.copy()
    assert nab_file(seconds, true_cp, perfect, "Standard") == (pytest.approx(2.0), 2)
    res = nab_changepoints([seconds, seconds], [true_cp, true_cp], [pred, perfect])
    for profile, (a_tp, a_fp, a_fn) in SKAB_PROFILES.items():
        s = nab_file(seconds, true_cp, pred, profile)[0] + 2 * a_tp
        assert res[profile] == pytest.approx(100 * (s - 4 * a_fn) / (4 * a_tp - 4 * a_fn))
        del a_fp
    empty = nab_changepoints([seconds], [true_cp], [np.zeros(600, int)])
    assert empty["Standard"] == pytest.approx(0.0)


def _write_skab(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ["datetime", "A", "B", "anomaly", "changepoint"]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh, delimiter=";", lineterminator="\r\n")
        w.writerow(header)
        for r in rows:
            w.writerow(r)


def test_load_skab_and_write_results(tmp_path):
    def rows(n, start):
        return [
            [
                f"2020-03-09 10:{(start + i) // 60:02d}:{(start + i) % 60:02d}",
                i * 0.5,
                1.0,
                float(i >= n - 3),
                float(i == n - 3),
            ]
            for i in range(n)
        ]

    _write_skab(tmp_path / "data" / "valve1" / "10.csv", rows(8, 0))
    _write_skab(tmp_path / "data" / "valve1" / "2.csv", rows(6, 100))
    free = tmp_path / "data" / "anomaly-free" / "anomaly-free.csv"
    free.parent.mkdir(parents=True)
    free.write_text("datetime;A;B\r\n2020-02-08 10:00:00;1.0;2.0\r\n2020-02-08 10:00:01;3.0;4.0\r\n")
    sensors, files, af = load_skab(tmp_path)
    assert sensors == ["A", "B"]
    assert [f.name for f in files] == ["valve1/2", "valve1/10"]  # numeric order
    assert af is not None and af.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    f = files[1]
    assert f.anomaly.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert f.changepoint.tolist() == [0, 0, 0, 0, 0, 1, 0, 0]
    assert np.diff(f.seconds).tolist() == [1.0] * 7
    out = write_results(tmp_path / "res", f, np.array([0, 0, 0, 0, 1, 1, 1, 1]), np.array([0, 0, 0, 0, 1, 0, 0, 0]))
    assert out == tmp_path / "res" / "valve1" / "10.csv"
    got = list(csv.reader(out.open()))
    assert got[0] == ["datetime", "anomaly", "changepoint"]
    assert [r[0] for r in got[1:]] == f.datetimes
    assert [r[1] for r in got[1:]] == ["0", "0", "0", "0", "1", "1", "1", "1"]
