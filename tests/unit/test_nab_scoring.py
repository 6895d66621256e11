"""NAB scoring (bench/nab.py) against hand-computed cases and NAB's own rules."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from bench.nab import (
    DEFAULT_PROFILES,
    MAX_TP,
    NabSeries,
    Profile,
    load_corpus,
    load_profiles,
    normalise,
    optimise_threshold,
    probation_length,
    scaled_sigmoid,
    score_corpus,
    score_file,
    sweep_rows,
    sweep_thresholds,
    write_results,
)

STANDARD, LOW_FP, LOW_FN = DEFAULT_PROFILES


def test_scaled_sigmoid_matches_nab_docstring_values():
    # values quoted in NAB's sweeper.py docstring
    assert float(scaled_sigmoid(-1.0)) == pytest.approx(0.98661, abs=1e-5)
    assert float(scaled_sigmoid(-0.5)) == pytest.approx(0.84828, abs=1e-5)
    assert float(scaled_sigmoid(0.0)) == pytest.approx(0.0, abs=1e-12)
    assert float(scaled_sigmoid(1.0)) == pytest.approx(-0.98661, abs=1e-5)
    assert float(scaled_sigmoid(3.0)) == -1.0  # "FP well behind window"
    assert float(scaled_sigmoid(10.0)) == -1.0
    assert pytest.approx(0.98661, abs=1e-5) == MAX_TP


def test_probation_length():
    assert probation_length(20) == 3  # floor(0.15 * 20)
    assert probation_length(1127) == 169
    assert probation_length(5000) == 750
    assert probation_length(22695) == 750  # capped at 0.15 * 5000


def test_hand_computed_file():
    """20 rows, probation 3 rows, one window on rows 8..12 (width 5).

    Detections at rows 1 (probation: ignored), 5 (FP before any window: -A_fp), 10 and 11 (in the
    window: only the first counts, y = -(12 - 10 + 1) / 5 = -0.6), 14 (FP after the window:
    y = |12 - 14| / (5 - 1) = 0.5).

    By hand: S(-0.6) = 2 / (1 + e^-3) - 1 = 0.905148, / S(-1) = 0.986614 -> 0.917428;
    S(0.5) = 2 / (1 + e^2.5) - 1 = -0.848284.
      standard: -0.11 + 0.917428 + 0.11 * -0.848284 = 0.714117 -> 100 * (0.714117 + 1) / 2 = 85.706
      low FP:   -0.22 + 0.917428 + 0.22 * -0.848284 = 0.510806 -> 100 * (0.510806 + 1) / 2 = 75.540
      low FN:    0.714117 -> 100 * (0.714117 + 2) / 3 = 90.471
    """
    n, windows = 20, [(8, 12)]
    scores = np.zeros(n)
    scores[[1, 5, 10, 11, 14]] = [0.9, 0.8, 0.7, 0.95, 0.6]
    rows = sweep_rows(n, windows)
    assert rows.scorable.tolist() == [False] * 3 + [True] * 17
    expected = {"standard": (0.714117, 85.706), "reward_low_FP_rate": (0.510806, 75.540)}
    expected["reward_low_FN_rate"] = (0.714117, 90.471)
    for prof in DEFAULT_PROFILES:
        fs = score_file(scores, rows, 0.5, prof)
        raw, norm = expected[prof.name]
        assert fs.raw == pytest.approx(raw, abs=2e-6)
        assert normalise(fs.raw, 1, prof) == pytest.approx(norm, abs=2e-3)
        assert (fs.tp, fs.fn, fs.fp, fs.windows) == (1, 0, 2, 1)
    # the same from the literal formula, to pin the arithmetic
    s = lambda y: 2 / (1 + math.exp(5 * y)) - 1  # noqa: E731
    assert score_file(scores, rows, 0.5, STANDARD).raw == pytest.approx(
        -0.11 + s(-0.6) / s(-1) + 0.11 * s(0.5), abs=1e-12
    )
    # a higher threshold drops rows 5, 10, 14: the first detection in the window is now row 11
    fs = score_file(scores, rows, 0.9, STANDARD)
    assert fs.raw == pytest.approx(s(-2 / 5) / s(-1), abs=1e-12)
    assert fs.fp == 0
    # nothing detected: the window is missed
    assert score_file(scores, rows, 2.0, STANDARD).raw == -1.0
    assert score_file(scores, rows, 2.0, LOW_FN).raw == -2.0


def test_detection_at_window_start_is_worth_a_tp_and_far_fp_costs_a_full_fp():
    n, windows = 100, [(40, 49)]
    rows = sweep_rows(n, windows)
    scores = np.zeros(n)
    scores[40] = 1.0  # left edge
    assert score_file(scores, rows, 0.5, STANDARD).raw == pytest.approx(1.0)
    scores[49 + 3 * 9] = 1.0  # three (width - 1) lengths after the window: S(3) = -1
    assert score_file(scores, rows, 0.5, STANDARD).raw == pytest.approx(1.0 - 0.11)
    scores[:] = 0
    scores[50] = 1.0  # right after the window: almost free
    assert score_file(scores, rows, 0.5, STANDARD).raw == pytest.approx(-1.0 + 0.11 * float(scaled_sigmoid(1 / 9)))


def test_sweep_equals_scoring_every_threshold_and_optimiser_picks_the_best():
    rng = np.random.default_rng(3)
    lengths = [300, 120, 500]
    windows = [[(100, 129), (200, 229)], [], [(90, 139), (300, 349), (400, 420)]]
    scores = [np.round(rng.random(n), 2) for n in lengths]  # many ties
    for sc, w in zip(scores, windows, strict=True):
        for a, _ in w:
            sc[a + 5] = 0.999  # most windows are detectable at a high threshold
    rows = [sweep_rows(n, w) for n, w in zip(lengths, windows, strict=True)]
    for prof in DEFAULT_PROFILES:
        thresholds, totals = sweep_thresholds(scores, rows, prof)
        assert thresholds[0] > max(float(s.max()) for s in scores)
        assert np.all(np.diff(thresholds) < 0)
        for thr, total in zip(thresholds, totals, strict=True):
            direct = sum(score_file(s, r, thr, prof).raw for s, r in zip(scores, rows, strict=True))
            assert total == pytest.approx(direct, abs=1e-9)
        best = optimise_threshold(scores, rows, prof)
        assert best == thresholds[int(np.argmax(totals))]
        assert totals.max() > totals[0]  # better than the null detector


def test_score_corpus_normalises_between_null_and_perfect():
    series = [
        NabSeries("catA/a.csv", [str(i) for i in range(200)], np.zeros(200), [(100, 119)]),
        NabSeries("catB/b.csv", [str(i) for i in range(200)], np.zeros(200), [(60, 69), (150, 159)]),
    ]
    perfect = [np.zeros(200), np.zeros(200)]
    perfect[0][100] = 1.0
    perfect[1][[60, 150]] = 1.0
    res = score_corpus(series, perfect)
    for prof in DEFAULT_PROFILES:
        assert res[prof.name].score == pytest.approx(100.0)
        assert res[prof.name].categories["catB"]["score"] == pytest.approx(100.0)
    null = score_corpus(series, [np.zeros(200), np.zeros(200)])
    # all scores equal: detecting everything (many FPs) is worse than nothing, so the null score is 0
    for prof in DEFAULT_PROFILES:
        assert null[prof.name].score == pytest.approx(0.0)
        assert null[prof.name].tp == 0 and null[prof.name].fn == 3
    fixed = score_corpus(series, perfect, thresholds={"standard": 0.5})
    assert fixed["standard"].threshold == 0.5


def test_profiles_file(tmp_path):
    path = tmp_path / "profiles.json"
    path.write_text(
        json.dumps({"x": {"CostMatrix": {"tpWeight": 1.0, "fnWeight": 2.0, "fpWeight": 0.5, "tnWeight": 1.0}}})
    )
    assert load_profiles(path) == (Profile("x", 1.0, 0.5, 2.0),)


def _write_nab(root, name, n, windows):
    path = root / "data" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    ts = [f"2015-01-01 {h:02d}:{m:02d}:00" for h in range(24) for m in range(0, 60, 5)][:n]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["timestamp", "value"])
        for i, t in enumerate(ts):
            w.writerow([t, float(i % 7)])
    return [[f"{ts[a]}.000000", f"{ts[b]}.000000"] for a, b in windows]


def test_load_corpus_maps_windows_to_rows_and_skips_missing_files(tmp_path):
    labels = {
        "catA/one.csv": _write_nab(tmp_path, "catA/one.csv", 200, [(50, 59), (120, 139)]),
        "catB/two.csv": _write_nab(tmp_path, "catB/two.csv", 100, []),
        "catB/missing.csv": [["2015-01-01 00:00:00.000000", "2015-01-01 00:10:00.000000"]],
    }
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "combined_windows.json").write_text(json.dumps(labels))
    series, missing = load_corpus(tmp_path)
    assert missing == ["catB/missing.csv"]
    assert [s.name for s in series] == ["catA/one.csv", "catB/two.csv"]
    one = series[0]
    assert one.windows == [(50, 59), (120, 139)]
    assert one.category == "catA" and one.probation == 30
    assert one.labels().sum() == 30
    assert one.values[:8].tolist() == [0, 1, 2, 3, 4, 5, 6, 0]

    out = write_results(tmp_path / "results", "iotad", one, np.linspace(0, 1, 200))
    assert out == tmp_path / "results" / "iotad" / "catA" / "iotad_one.csv"
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["timestamp", "value", "anomaly_score", "label"]
    assert len(rows) == 201
    assert rows[1][0] == one.timestamps[0] and rows[51][3] == "1" and rows[50][3] == "0"
    assert float(rows[-1][2]) == 1.0
