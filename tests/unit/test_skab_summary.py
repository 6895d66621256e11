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
