"""SKAB (Skoltech Anomaly Benchmark) data and metrics, following SKAB's own ``core/metrics.py``.

Conventions (upstream ``waico/SKAB``):

* A labelled file is ``datetime;<8 sensors>;anomaly;changepoint`` (semicolons); the first
  :data:`TRAIN_ROWS` rows of each file are its training part and are not scored.
* **Outlier detection** (``chp_score(..., metric="binary")``): per-row confusion counts pooled over the
  scored rows of all files; ``F1 = TP / (TP + (FN + FP) / 2)``, ``FAR = FP / (FP + TN)`` and
  ``MAR = FN / (FN + TP)`` (both in %).
* **Changepoint detection** (``chp_score(..., metric="nab", window_width="60s",
  anomaly_window_destination="righter")``): a window ``[t_cp, t_cp + 60 s]`` to the right of each true
  changepoint (an overlapping next window starts where the previous one ends: "cut right window");
  the first predicted changepoint in a window scores SKAB's "improved" scaled tanh
  (``A_tp`` at the window start falling to ``A_fp`` at its end, on a 1000-point grid); every prediction
  outside all windows adds ``A_fp``; a window without one adds ``A_fn``. Profiles (A_tp, A_fp, A_fn):
  Standard (1, -0.11, -1), LowFP (1, -0.22, -1), LowFN (1, -0.11, -2). Per profile the sum over files
  is normalised as ``100 * (S - S_null) / (S_perfect - S_null)`` with ``S_null = windows * A_fn`` and
  ``S_perfect = windows * A_tp``.
* Predicted changepoints are derived from the predicted outliers as in SKAB's notebooks:
  ``|diff(prediction)|`` (the rows where a flagged run starts or ends).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TRAIN_ROWS = 400
CP_WINDOW_S = 60.0
# The alarm levels tried by choose_alarms (x each file's calibrated threshold) and the false-alarm budget
# (%) within which the outlier level maximises F1: the FAR target.
ALARM_GRID = tuple(round(0.8 + 0.05 * i, 2) for i in range(25))
FAR_BUDGET = 13.0
SKAB_PROFILES = {"Standard": (1.0, -0.11, -1.0), "LowFP": (1.0, -0.22, -1.0), "LowFN": (1.0, -0.11, -2.0)}


@dataclass
class SkabFile:
    name: str  # "<folder>/<n>", e.g. "valve1/0"
    datetimes: list[str]  # as written in the file, in file order
    seconds: np.ndarray  # (n,) float64, epoch seconds (naive times read as UTC)
    values: np.ndarray  # (n, F)
    anomaly: np.ndarray  # (n,) int
    changepoint: np.ndarray  # (n,) int

    @property
    def folder(self) -> str:
        return self.name.split("/", 1)[0]


def _read(path: Path) -> tuple[list[str], list[str], list[list[str]]]:
    with Path(path).open(newline="", encoding="utf-8-sig") as fh:
        rows = [r for r in csv.reader(fh, delimiter=";") if r]
    header = [h.strip() for h in rows[0]]
    return header, [r[0].strip() for r in rows[1:]], rows[1:]


def read_skab_csv(path: Path) -> tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray]:
    """``(sensor names, datetimes, values (n, F), anomaly (n,), changepoint (n,))`` of one file; the
    anomaly-free file has no label columns (zeros are returned)."""
    header, dts, rows = _read(path)
    label_cols = [c for c in ("anomaly", "changepoint") if c in header]
    sensors = [h for h in header[1:] if h not in label_cols]
    idx = [header.index(s) for s in sensors]
    values = np.array([[float(r[j]) for j in idx] for r in rows])
    lab = {c: np.array([round(float(r[header.index(c)])) for r in rows], np.int64) for c in label_cols}
    zeros = np.zeros(len(rows), np.int64)
    return sensors, dts, values, lab.get("anomaly", zeros), lab.get("changepoint", zeros)


def _seconds(dts: Sequence[str]) -> np.ndarray:
    return np.array(dts, dtype="datetime64[s]").astype(np.int64).astype(np.float64)


def load_skab(root: Path) -> tuple[list[str], list[SkabFile], np.ndarray | None]:
    """Sensor names, the labelled files of ``root/data/<folder>/<n>.csv`` (folders and numbers sorted;
    the anomaly-free folder excluded) and the anomaly-free file's values (None if absent)."""
    data = Path(root) / "data"
    files: list[SkabFile] = []
    names: list[str] | None = None
    for folder in sorted(p for p in data.iterdir() if p.is_dir() and p.name != "anomaly-free"):
        for path in sorted(
            folder.glob("*.csv"), key=lambda p: (not p.stem.isdigit(), int(p.stem) if p.stem.isdigit() else 0, p.stem)
        ):
            sensors, dts, values, anomaly, cp = read_skab_csv(path)
            if names is None:
                names = sensors
            elif sensors != names:
                raise ValueError(f"{path}: sensors {sensors} != {names}")
            files.append(SkabFile(f"{folder.name}/{path.stem}", dts, _seconds(dts), values, anomaly, cp))
    free_path = data / "anomaly-free" / "anomaly-free.csv"
    free = None
    if free_path.is_file():
        sensors, _, free, _, _ = read_skab_csv(free_path)
        if names is not None and sensors != names:
            raise ValueError(f"{free_path}: sensors {sensors} != {names}")
        names = names or sensors
    if names is None:
        raise ValueError(f"no SKAB files under {data}")
    return names, files, free


@dataclass(frozen=True)
class Binary:
    tp: int
    tn: int
    fp: int
    fn: int

    @property
    def f1(self) -> float:
        d = self.tp + (self.fn + self.fp) / 2
        return self.tp / d if d else math.nan

    @property
    def far(self) -> float:
        return 100.0 * self.fp / (self.fp + self.tn) if self.fp + self.tn else math.nan

    @property
    def mar(self) -> float:
        return 100.0 * self.fn / (self.fn + self.tp) if self.fn + self.tp else math.nan


def binary(true: Sequence[np.ndarray], pred: Sequence[np.ndarray]) -> Binary:
    """Per-row confusion counts pooled over files (``chp_score(metric="binary")``)."""
    tp = tn = fp = fn = 0
    for t, p in zip(true, pred, strict=True):
        t, p = np.asarray(t) == 1, np.asarray(p) == 1
        tp += int((t & p).sum())
        tn += int((~t & ~p).sum())
        fp += int((~t & p).sum())
        fn += int((t & ~p).sum())
    return Binary(tp, tn, fp, fn)


def changepoints_from_outliers(pred: np.ndarray) -> np.ndarray:
    """SKAB's notebooks: ``cp = |pred.diff()|`` with ``cp[0] = pred[0]``."""
    p = np.asarray(pred, np.int64)
    out = np.abs(np.diff(p, prepend=0))
    return out


def cp_windows(seconds: np.ndarray, cp: np.ndarray, width_s: float = CP_WINDOW_S) -> list[tuple[float, float]]:
    """``[t, t + width]`` after each true changepoint, overlapping ones cut on the right."""
    wins = [[float(t), float(t) + width_s] for t in seconds[np.asarray(cp) == 1]]
    for i in range(len(wins) - 1):
        if wins[i][1] >= wins[i + 1][0]:
            wins[i + 1][0] = wins[i][1]
    return [(a, b) for a, b in wins]


def _scaled(position: float, a_tp: float, a_fp: float, grid: int = 1000) -> float:
    """SKAB's ``my_scale`` (koef 1) at a relative position in ``[0, 1]`` of the window."""
    x = np.linspace(-np.pi / 2, np.pi / 2, grid)
    event = min(int(position * grid), grid - 1)
    return float((a_tp - a_fp) / 2 * -np.tanh(x[event]) / np.tanh(np.pi / 2) + (a_tp - a_fp) / 2 + a_fp)


def nab_file(seconds: np.ndarray, true_cp: np.ndarray, pred_cp: np.ndarray, profile: str) -> tuple[float, int]:
    """``(score, windows)`` of one file for one profile (``single_evaluate_nab``)."""
    a_tp, a_fp, a_fn = SKAB_PROFILES[profile]
    wins = cp_windows(seconds, true_cp)
    t_pred = np.sort(seconds[np.asarray(pred_cp) == 1])
    if not wins:
        return a_fp * len(t_pred), 0
    score = a_fp * int((t_pred < wins[0][0]).sum())
    for i, (a, b) in enumerate(wins):
        inside = t_pred[(t_pred >= a) & (t_pred <= b)]
        if len(inside) == 0:
            score += a_fn
        else:
            score += _scaled((inside[0] - a) / (b - a), a_tp, a_fp) if b > a else a_tp
        nxt = wins[i + 1][0] if i + 1 < len(wins) else math.inf
        score += a_fp * int(((t_pred > b) & (t_pred < nxt)).sum())
    return score, len(wins)


def nab_changepoints(
    seconds: Sequence[np.ndarray], true_cp: Sequence[np.ndarray], pred_cp: Sequence[np.ndarray]
) -> dict[str, float]:
    """Normalised NAB changepoint scores over all files, per profile (``chp_score(metric="nab")``)."""
    out = {}
    for profile, (a_tp, _, a_fn) in SKAB_PROFILES.items():
        total, windows = 0.0, 0
        for s, t, p in zip(seconds, true_cp, pred_cp, strict=True):
            sc, w = nab_file(s, t, p, profile)
            total += sc
            windows += w
        null, perfect = windows * a_fn, windows * a_tp
        out[profile] = 100.0 * (total - null) / (perfect - null) if windows else math.nan
    return out


def write_results(directory: Path, f: SkabFile, anomaly: np.ndarray, changepoint: np.ndarray) -> Path:
    """``directory/<folder>/<n>.csv``: ``datetime,anomaly,changepoint`` for every row of the data file."""
    path = Path(directory) / f"{f.name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["datetime", "anomaly", "changepoint"])
        for dt, a, c in zip(f.datetimes, np.asarray(anomaly).tolist(), np.asarray(changepoint).tolist(), strict=True):
            w.writerow([dt, int(a), int(c)])
    return path


def alarm_predictions(score: np.ndarray, threshold: np.ndarray, alarm: float) -> np.ndarray:
    """0/1 per row: the score above ``alarm`` x the row's threshold (a NaN score, or a threshold not yet
    calibrated, NaN or inf, is never above it); the training part is 0."""
    pred = (np.asarray(score, np.float64) > alarm * np.asarray(threshold, np.float64)).astype(np.int64)
    pred[:TRAIN_ROWS] = 0
    return pred


@dataclass(frozen=True)
class Alarms:
    """The global alarm level of each SKAB scoreboard and the operating curve it was chosen from."""

    outlier: float
    changepoint: float
    far_budget: float | None
    curve: list[dict[str, float]]


def summarise(
    files: Sequence[SkabFile], preds: Sequence[np.ndarray], cp_preds: Sequence[np.ndarray] | None = None
) -> dict[str, Any]:
    """SKAB's figures of per-row predictions (0 on the training rows): pooled binary metrics and
    changepoint scores (``|diff|`` of ``cp_preds``, by default the same predictions) on the scored rows
    (``TRAIN_ROWS`` onwards), and the same on all rows; the keys of ``iotad evaluate skab --json``."""
    tr = TRAIN_ROWS
    cps = [changepoints_from_outliers(p) for p in (preds if cp_preds is None else cp_preds)]
    b = binary([f.anomaly[tr:] for f in files], [p[tr:] for p in preds])
    cp = nab_changepoints([f.seconds[tr:] for f in files], [f.changepoint[tr:] for f in files], [c[tr:] for c in cps])
    b_all = binary([f.anomaly for f in files], preds)
    cp_all = nab_changepoints([f.seconds for f in files], [f.changepoint for f in files], cps)
    return {
        "f1": round(b.f1, 4),
        "far": round(b.far, 2),
        "mar": round(b.mar, 2),
        "nab_standard": round(cp["Standard"], 2),
        "nab_low_fp": round(cp["LowFP"], 2),
        "nab_low_fn": round(cp["LowFN"], 2),
        "counts": {"tp": b.tp, "tn": b.tn, "fp": b.fp, "fn": b.fn},
        "all_rows": {
            "f1": round(b_all.f1, 4),
            "far": round(b_all.far, 2),
            "mar": round(b_all.mar, 2),
            "nab_standard": round(cp_all["Standard"], 2),
        },
    }


def choose_alarms(
    files: Sequence[SkabFile],
    scores: Sequence[np.ndarray],
    thresholds: Sequence[np.ndarray],
    grid: Sequence[float],
    far_budget: float | None,
) -> Alarms:
    """NAB's way of thresholding a detector, for each of SKAB's two scoreboards: one alarm level for all
    files (in units of each file's own calibrated threshold), chosen on the labels from ``grid``. Outliers:
    the level with the best F1 among those whose false-alarm rate is within ``far_budget`` % (the lowest
    FAR if none is; any FAR with None); changepoints: the level with the best NAB standard score."""
    curve = []
    for alarm in grid:
        fig = summarise(files, [alarm_predictions(s, t, alarm) for s, t in zip(scores, thresholds, strict=True)])
        curve.append({"alarm": round(float(alarm), 4), **{k: fig[k] for k in ("f1", "far", "mar", "nab_standard")}})
    within = [c for c in curve if far_budget is None or c["far"] <= far_budget]
    outlier = max(within, key=lambda c: c["f1"]) if within else min(curve, key=lambda c: c["far"])
    changepoint = max(curve, key=lambda c: c["nab_standard"])
    return Alarms(outlier["alarm"], changepoint["alarm"], far_budget, curve)


@dataclass(frozen=True)
class Detections:
    """What a SKAB run reports: the per-row outlier detections at ``alarms.outlier`` and, at
    ``alarms.changepoint``, the detections whose ``|diff|`` are the predicted changepoints."""

    alarms: Alarms
    outliers: list[np.ndarray]
    changepoints: list[np.ndarray]

    def summary(self, files: Sequence[SkabFile]) -> dict[str, Any]:
        a = self.alarms
        return {
            **summarise(files, self.outliers, self.changepoints),
            "alarms": {"outlier": a.outlier, "changepoint": a.changepoint, "far_budget": a.far_budget},
            "operating_curve": a.curve,
        }

    def export(self, directory: Path, files: Sequence[SkabFile]) -> None:
        """SKAB's results layout (:func:`write_results`) for every file."""
        for f, p, c in zip(files, self.outliers, self.changepoints, strict=True):
            write_results(directory, f, p, changepoints_from_outliers(c))


def detect(
    files: Sequence[SkabFile],
    scores: Sequence[np.ndarray],
    thresholds: Sequence[np.ndarray],
    grid: Sequence[float],
    far_budget: float | None,
) -> Detections:
    """The detections of per-row scores and calibrated thresholds at the alarm levels :func:`choose_alarms`
    picks from ``grid`` (an empty grid: both at 1, the calibrated threshold itself)."""
    alarms = choose_alarms(files, scores, thresholds, grid, far_budget) if grid else Alarms(1.0, 1.0, far_budget, [])
    outliers, changepoints = (
        [alarm_predictions(s, t, a) for s, t in zip(scores, thresholds, strict=True)]
        for a in (alarms.outlier, alarms.changepoint)
    )
    return Detections(alarms, outliers, changepoints)
