"""bench.skab.summarise: the figures of `iotad evaluate skab --json` from per-row predictions."""

from __future__ import annotations

import numpy as np

from bench import skab


def _file(name: str, anomaly: np.ndarray) -> skab.SkabFile:
    n = len(anomaly)
    cp = np.abs(np.diff(anomaly, prepend=0))
    return skab.SkabFile(
        name, [str(i) for i in range(n)], np.arange(n, dtype=np.float64), np.zeros((n, 1)), anomaly, cp
    )


def test_summarise_scores_the_rows_after_the_training_part_and_all_rows():
    tr = skab.TRAIN_ROWS
    anomaly = np.zeros(tr + 100, np.int64)
    anomaly[tr + 20 : tr + 60] = 1
    pred = np.zeros_like(anomaly)
    pred[tr + 30 : tr + 70] = 1  # 30 TP, 10 FN, 10 FP
    pred_train = pred.copy()
    pred_train[10:20] = 1  # flagged training rows count only in "all_rows"
    out = skab.summarise([_file("valve1/0", anomaly)], [pred_train])
    assert out["counts"] == {"tp": 30, "tn": 50, "fp": 10, "fn": 10}
    assert out["f1"] == round(30 / (30 + 10), 4) and out["far"] == round(100 * 10 / 60, 2) and out["mar"] == 25.0
    assert out["all_rows"]["far"] == round(100 * 20 / 460, 2)
    assert set(out) == {"f1", "far", "mar", "nab_standard", "nab_low_fp", "nab_low_fn", "counts", "all_rows"}
    assert -100 <= out["nab_standard"] <= 100


def test_alarm_predictions_flag_beyond_alarm_times_the_threshold_after_the_training_part():
    tr = skab.TRAIN_ROWS
    score = np.full(tr + 6, 2.0)
    threshold = np.array([1.0] * tr + [1.0, 1.0, np.nan, np.inf, 1.0, 1.0])
    score[tr + 4], score[tr + 5] = np.nan, 1.5
    assert skab.alarm_predictions(score, threshold, 1.0).tolist() == [0] * tr + [1, 1, 0, 0, 0, 1]
    assert skab.alarm_predictions(score, threshold, 1.5).tolist() == [0] * tr + [1, 1, 0, 0, 0, 0]  # strictly beyond
    assert skab.alarm_predictions(score, threshold, 2.0).sum() == 0


def test_choose_alarms_best_f1_within_the_far_budget_and_best_changepoint_score():
    tr = skab.TRAIN_ROWS
    anomaly = np.zeros(tr + 200, np.int64)
    anomaly[tr + 20 : tr + 100] = 1  # longer than the 60 s changepoint window (1 s rows)
    f = _file("valve1/0", anomaly)
    score = np.full(len(anomaly), 0.5)
    score[tr + 20 : tr + 100] = 3.0  # the anomaly, clearly beyond
    score[tr + 30 : tr + 35] = 1.1  # a dip inside the anomaly: missed above 1.1
    score[tr + 170 : tr + 195] = 1.2  # a mild excursion after both windows: false alarms below 1.2
    thr = np.ones(len(anomaly))
    grid = (1.0, 1.15, 1.25, 4.0)
    a = skab.choose_alarms([f], [score], [thr], grid, far_budget=None)
    assert [c["alarm"] for c in a.curve] == list(grid)
    by = {c["alarm"]: c for c in a.curve}
    assert by[1.0]["far"] == by[1.15]["far"] == round(100 * 25 / 120, 2) and by[1.25]["far"] == 0.0
    assert by[1.0]["mar"] == 0.0 and by[1.15]["mar"] == round(100 * 5 / 80, 2) and by[4.0]["mar"] == 100.0
    assert a.outlier == 1.25  # the best F1: no false alarm for 5 missed rows
    # a budget only 4.0 meets: chosen although its F1 is 0; a budget none meets: the lowest FAR
    assert skab.choose_alarms([f], [score], [thr], (1.0, 4.0), far_budget=0.0).outlier == 4.0
    assert skab.choose_alarms([f], [score], [thr], (1.0, 1.15), far_budget=1.0).outlier == 1.0
    # changepoints: the excursion's two changes cost 1.0 and 1.15 their perfect score (the dip's fall
    # inside the first window after its detection is not counted)
    assert a.changepoint == 1.25 and by[1.25]["nab_standard"] == 100.0
    assert by[1.0]["nab_standard"] == by[1.15]["nab_standard"] < 100.0
