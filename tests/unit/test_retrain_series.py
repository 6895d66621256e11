"""Pure parts of the retraining job: series from scored history, the gate, evaluation in common units."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.artifact import Normaliser
from models.forecaster import Forecaster, ForecasterConfig
from models.training import evaluate_forecaster
from pipeline.retrain import build_series, choose_features, decide, evaluate_in_units

STEP = 1000


def rows(steps, values=None):
    steps = np.asarray(steps, np.int64)
    if values is None:
        values = np.stack([steps.astype(float), -steps.astype(float)], axis=1)
    return steps * STEP, np.asarray(values, np.float64)


def test_series_are_time_ordered_and_short_gaps_masked():
    ts, values = rows([5, 1, 2, 3, 7, 8])  # out of order; steps 4 and 6 missing
    h = build_series({"d": (ts, values)}, ["a", "b"], step_ms=STEP, max_gap_steps=2, min_points=3)
    assert len(h.series) == 1 and h.points == 6 and h.filled_steps == 2
    x, m = h.series[0], h.mask[0]
    assert x.shape == (8, 2)
    assert x[:, 0][~m].tolist() == [1, 2, 3, 5, 7, 8]
    assert m.tolist() == [False, False, False, True, False, True, False, False]
    assert h.runs[0] == {"device": "d", "first_ts_ms": 1000, "last_ts_ms": 8000, "steps": 8}


def test_long_gaps_split_runs_and_short_runs_are_dropped():
    steps = [*range(0, 10), *range(30, 33), *range(50, 60)]
    h = build_series({"d": rows(steps)}, ["a", "b"], step_ms=STEP, max_gap_steps=3, min_points=5)
    assert [len(s) for s in h.series] == [10, 10]
    assert h.dropped_points == 3 and h.points == 20 and h.devices == 1
    assert h.series[1][0, 0] == 50


def test_duplicate_steps_are_merged_and_incomplete_rows_masked():
    ts = np.array([1, 2, 2, 3, 4], np.int64) * STEP
    values = np.array([[1, 1], [np.nan, 9], [2, np.nan], [3, 3], [4, np.nan]], np.float64)
    h = build_series({"d": (ts, values)}, ["a", "b"], step_ms=STEP, max_gap_steps=2, min_points=2)
    x, m = h.series[0], h.mask[0]
    assert x[1].tolist() == [2, 9]  # the two rows of step 2 merged
    assert m.tolist() == [False, False, False, True]  # step 4 lacks b
    assert h.points == 3


def test_choose_features():
    assert choose_features(["current", "temp"], ["temp", "current"]) == ["temp", "current"]
    assert choose_features(["current", "temp"], ["temp", "pressure"]) == ["current", "temp"]
    assert choose_features(["x"], None) == ["x"]


def test_decide():
    assert decide(1.0, None, 0.1) == (True, "no champion yet")
    assert decide(0.9, 1.0, 0.1)[0] is True
    assert decide(0.91, 1.0, 0.1)[0] is False
    assert decide(1.0, 1.0, 0.0)[0] is True  # margin 0: a tie promotes
    assert decide(math.nan, 1.0, 0.0)[0] is False
    assert decide(0.5, math.nan, 0.0)[0] is True


def test_evaluation_in_common_units():
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(n_features=1, hidden=4, layers=1, dropout=0.0)).eval()
    rng = np.random.default_rng(0)
    series = [np.cumsum(rng.normal(size=(200, 1)), axis=0) + 10.0]
    mask = [np.zeros(200, bool)]
    own = Normaliser(np.array([10.0]), np.array([2.0]))
    common = Normaliser(np.array([7.0]), np.array([4.0]))
    native = evaluate_forecaster(model, own, series, start=[150], mask=mask)
    same = evaluate_in_units(model, own, own, series, start=[150], mask=mask)
    assert same["mse"] == pytest.approx(native["mse"], rel=1e-5)
    moved = evaluate_in_units(model, own, common, series, start=[150], mask=mask)
    # The same forecasts, errors measured in a unit twice as large: a quarter of the MSE.
    assert moved["mse"] == pytest.approx(native["mse"] * (2.0 / 4.0) ** 2, rel=1e-4)
    assert moved["targets"] == native["targets"] == 50
