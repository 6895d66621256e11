"""NAB (Numenta Anomaly Benchmark) scoring, reimplemented from NAB's ``nab/sweeper.py`` in numpy.

What is scored, per NAB's conventions (``numenta/NAB`` at the commit recorded in the dataset's SOURCE.md):

* **Windows** come from ``labels/combined_windows.json``: ``[start, end]`` timestamps that match rows
  of the CSV; both ends are inside the window. Keys whose CSV is missing are skipped.
* **Probationary period**: the first ``min(floor(0.15 * n), 0.15 * 5000)`` rows of a file (at most 750)
  are not scored at all; a detection there is neither a TP nor an FP.
* **Scaled sigmoid** ``S(y) = 2 / (1 + exp(5 y)) - 1`` (and ``-1`` for ``y >= 3``).
* **Inside a window** ``[L, R]`` (width ``w = R - L + 1``) a detection at row ``i`` has relative position
  ``y = -(R - i + 1) / w`` (``-1`` at the left edge) and is worth ``A_tp * S(y) / S(-1)``: exactly
  ``A_tp`` at the left edge, falling towards 0 at the right edge. Only the best, i.e. earliest,
  detection of a window counts; a window with no detection costs ``-A_fn``.
* **Outside windows** a detection is a false positive worth ``A_fp * S(y)`` with ``y = |i - R_prev| /
  (w_prev - 1)`` measured from the end of the preceding window (so it costs little right after a
  window and ``-A_fp`` one window-width later), or ``-A_fp`` when no window precedes it.
* **Detections** are the rows whose anomaly score is ``>= threshold``.
* **Threshold**: one per profile for the whole corpus, the one maximising the corpus' summed raw score
  (NAB's sweep: every distinct score is a candidate; ties go to the highest threshold).
* **Normalisation**: ``100 * (S - S_null) / (S_perfect - S_null)`` over all files together, with
  ``S_null = -A_fn * windows`` (never alarming) and ``S_perfect = A_tp * windows`` (every window detected
  at its left edge, no false positive). Per-category figures use the same formula on that category's
  files (a category without windows gets no normalised score, only its raw false-positive cost).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PROBATION_PERCENT = 0.15


@dataclass(frozen=True)
class Profile:
    name: str
    tp: float
    fp: float
    fn: float


DEFAULT_PROFILES = (
    Profile("standard", 1.0, 0.11, 1.0),
    Profile("reward_low_FP_rate", 1.0, 0.22, 1.0),
    Profile("reward_low_FN_rate", 1.0, 0.11, 2.0),
)


def load_profiles(path: Path) -> tuple[Profile, ...]:
    """The profiles of NAB's ``config/profiles.json`` (cost-matrix weights), in file order."""
    raw = json.loads(Path(path).read_text())
    return tuple(
        Profile(
            name,
            float(p["CostMatrix"]["tpWeight"]),
            float(p["CostMatrix"]["fpWeight"]),
            float(p["CostMatrix"]["fnWeight"]),
        )
        for name, p in raw.items()
    )


def probation_length(n: int, percent: float = PROBATION_PERCENT) -> int:
    """NAB's ``getProbationPeriod``: ``min(floor(percent * n), percent * 5000)`` rows."""
    return int(min(math.floor(percent * n), percent * 5000))


def scaled_sigmoid(y: np.ndarray | float) -> np.ndarray:
    """NAB's ``scaledSigmoid``: ``2 * sigmoid(-5 y) - 1``, and ``-1`` from ``y >= 3`` on."""
    y = np.asarray(y, dtype=np.float64)
    return np.where(y >= 3.0, -1.0, 2.0 / (1.0 + np.exp(np.minimum(5.0 * y, 700.0))) - 1.0)


MAX_TP = float(scaled_sigmoid(-1.0))


@dataclass
class NabSeries:
    """One NAB data file: ``timestamps`` as written in the CSV, values, and its windows as row ranges."""

    name: str  # "<category>/<file>.csv", the key of the label files
    timestamps: list[str]
    values: np.ndarray  # (n,) float64
    windows: list[tuple[int, int]]  # inclusive row indices, in time order

    @property
    def category(self) -> str:
        return self.name.split("/", 1)[0]

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def probation(self) -> int:
        return probation_length(len(self.values))

    def labels(self) -> np.ndarray:
        """1 inside a window, else 0 (the ``label`` column of NAB's results files)."""
        out = np.zeros(len(self.values), np.int64)
        for a, b in self.windows:
            out[a : b + 1] = 1
        return out


def _norm_ts(text: str) -> str:
    """``2014-04-10 07:15:00.000000`` -> ``2014-04-10 07:15:00`` (label files carry microseconds)."""
    text = text.strip()
    return text[:-7] if text.endswith(".000000") else text


def read_nab_csv(path: Path) -> tuple[list[str], np.ndarray]:
    """Timestamps (as written) and values of a NAB ``timestamp,value`` file, in file order."""
    with Path(path).open(newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader)]
        it, iv = header.index("timestamp"), header.index("value")
        ts, vals = [], []
        for row in reader:
            if row:
                ts.append(row[it].strip())
                vals.append(float(row[iv]))
    return ts, np.asarray(vals, dtype=np.float64)


def load_corpus(root: Path) -> tuple[list[NabSeries], list[str]]:
    """The series of ``root/data`` named in ``root/labels/combined_windows.json`` (sorted by name), and the
    names whose CSV is missing (skipped)."""
    root = Path(root)
    windows = json.loads((root / "labels" / "combined_windows.json").read_text())
    series, missing = [], []
    for name in sorted(windows):
        path = root / "data" / name
        if not path.is_file():
            missing.append(name)
            continue
        ts, values = read_nab_csv(path)
        index = {t: i for i, t in enumerate(ts)}
        rows = []
        for start, end in windows[name]:
            a, b = index.get(_norm_ts(start)), index.get(_norm_ts(end))
            if a is None or b is None:
                raise ValueError(f"{name}: window {start}..{end} does not match a row")
            rows.append((a, b))
        series.append(NabSeries(name, ts, values, sorted(rows)))
    return series, missing


@dataclass(frozen=True)
class SweepRows:
    """Per-row scoring terms of one file, before the profile weights.

    ``window``: index of the window holding the row, or -1; ``unweighted``: the scaled sigmoid of the row's
    position (inside a window, already divided by ``S(-1)``); ``scorable``: past the probationary period.
    """

    window: np.ndarray
    unweighted: np.ndarray
    scorable: np.ndarray

    def weighted(self, profile: Profile) -> np.ndarray:
        return np.where(self.window >= 0, self.unweighted * profile.tp, self.unweighted * profile.fp)


def sweep_rows(n: int, windows: Sequence[tuple[int, int]], probation: int | None = None) -> SweepRows:
    """NAB's ``calcSweepScore`` for a file of ``n`` rows (vectorised)."""
    i = np.arange(n)
    window = np.full(n, -1, np.int64)
    unweighted = np.full(n, -1.0)  # a false positive before any window
    for k, (a, b) in enumerate(windows):
        width = b - a + 1
        window[a : b + 1] = k
        unweighted[a : b + 1] = scaled_sigmoid(-(b - i[a : b + 1] + 1) / width) / MAX_TP
        nxt = windows[k + 1][0] if k + 1 < len(windows) else n
        after = i[b + 1 : nxt]
        if width > 1:
            unweighted[b + 1 : nxt] = scaled_sigmoid(np.abs(b - after) / (width - 1))
        else:  # NAB would divide by zero; a one-row window is treated as if followed by a far FP
            unweighted[b + 1 : nxt] = -1.0
    p = probation_length(n) if probation is None else probation
    return SweepRows(window, unweighted, i >= p)


@dataclass(frozen=True)
class FileScore:
    raw: float
    tp: int  # windows detected
    fn: int  # windows missed
    fp: int  # scorable detections outside windows
    windows: int  # windows with at least one scorable row


def score_file(scores: np.ndarray, rows: SweepRows, threshold: float, profile: Profile) -> FileScore:
    """Raw NAB score of one file at ``threshold`` (detections: ``score >= threshold`` past probation)."""
    det = rows.scorable & (np.asarray(scores, np.float64) >= threshold)
    w = rows.weighted(profile)
    outside = det & (rows.window < 0)
    raw = float(w[outside].sum())
    ids = np.unique(rows.window[rows.scorable & (rows.window >= 0)])
    tp = 0
    for k in ids:
        hit = det & (rows.window == k)
        if hit.any():
            raw += max(float(w[hit].max()), -profile.fn)
            tp += 1
        else:
            raw -= profile.fn
    return FileScore(raw, tp, len(ids) - tp, int(outside.sum()), len(ids))


def sweep_thresholds(
    scores: Sequence[np.ndarray], rows: Sequence[SweepRows], profile: Profile
) -> tuple[np.ndarray, np.ndarray]:
    """Every candidate threshold (descending; the first, above every score, means no detection) and the
    corpus' summed raw score at each: NAB's ``calcScoreByThreshold`` over all files at once."""
    s_parts, v_parts, w_parts = [], [], []
    offset = 0
    for sc, r in zip(scores, rows, strict=True):
        keep = r.scorable
        s_parts.append(np.asarray(sc, np.float64)[keep])
        v_parts.append(r.weighted(profile)[keep])
        wid = r.window[keep]
        w_parts.append(np.where(wid >= 0, wid + offset, -1))
        offset += int(r.window.max()) + 1 if len(r.window) else 0
    s = np.concatenate(s_parts) if s_parts else np.zeros(0)
    v = np.concatenate(v_parts) if v_parts else np.zeros(0)
    w = np.concatenate(w_parts) if w_parts else np.zeros(0, np.int64)
    if not np.all(np.isfinite(s)):
        raise ValueError("anomaly scores must be finite")
    n_windows = len(np.unique(w[w >= 0]))
    order = np.argsort(-s, kind="stable")
    s, v, w = s[order], v[order], w[order]
    delta = np.where(w < 0, v, 0.0)
    inside = np.flatnonzero(w >= 0)
    if len(inside):
        # Per window, the running best (max) of the weighted scores of its detections, in sweep order.
        grp = np.unique(w[inside], return_inverse=True)[1]
        o2 = np.lexsort((inside, grp))
        g, vals = grp[o2], v[inside][o2]
        big = 4.0 * (abs(profile.tp) + abs(profile.fn) + 1.0)
        best = np.maximum.accumulate(vals + g * big) - g * big
        best = np.maximum(best, -profile.fn)
        first = np.r_[True, g[1:] != g[:-1]]
        prev = np.where(first, -profile.fn, np.r_[-profile.fn, best[:-1]])
        delta[inside[o2]] = best - prev
    total = -profile.fn * n_windows + np.cumsum(delta)
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True]) if len(s) else np.zeros(0, np.int64)
    thresholds = np.r_[max(1.1, float(s[0]) + 1.0) if len(s) else 1.1, s[last]]
    totals = np.r_[-profile.fn * n_windows, total[last]]
    return thresholds, totals


def optimise_threshold(scores: Sequence[np.ndarray], rows: Sequence[SweepRows], profile: Profile) -> float:
    """The corpus-wide threshold with the best summed raw score (the highest one among ties)."""
    thresholds, totals = sweep_thresholds(scores, rows, profile)
    return float(thresholds[int(np.argmax(totals))])


def normalise(raw: float, windows: int, profile: Profile) -> float | None:
    """``100 * (raw - null) / (perfect - null)``; None without windows."""
    if windows == 0:
        return None
    null, perfect = -profile.fn * windows, profile.tp * windows
    return 100.0 * (raw - null) / (perfect - null)


@dataclass
class ProfileResult:
    profile: str
    threshold: float
    raw: float
    windows: int
    score: float | None  # normalised, all files
    tp: int
    fn: int
    fp: int
    categories: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, FileScore] = field(default_factory=dict)


def score_corpus(
    series: Sequence[NabSeries],
    scores: Sequence[np.ndarray],
    profiles: Sequence[Profile] = DEFAULT_PROFILES,
    thresholds: dict[str, float] | None = None,
) -> dict[str, ProfileResult]:
    """Optimise one threshold per profile over all ``series`` (unless given) and score them."""
    rows = [sweep_rows(len(s.values), s.windows) for s in series]
    out: dict[str, ProfileResult] = {}
    for prof in profiles:
        thr = (
            thresholds[prof.name] if thresholds and prof.name in thresholds else optimise_threshold(scores, rows, prof)
        )
        files = {s.name: score_file(sc, r, thr, prof) for s, sc, r in zip(series, scores, rows, strict=True)}
        cats: dict[str, dict[str, Any]] = {}
        for s in series:
            f = files[s.name]
            c = cats.setdefault(s.category, {"files": 0, "raw": 0.0, "windows": 0, "tp": 0, "fn": 0, "fp": 0})
            c["files"] += 1
            c["raw"] += f.raw
            c["windows"] += f.windows
            c["tp"] += f.tp
            c["fn"] += f.fn
            c["fp"] += f.fp
        for c in cats.values():
            c["score"] = normalise(c["raw"], c["windows"], prof)
        raw = sum(f.raw for f in files.values())
        n_win = sum(f.windows for f in files.values())
        out[prof.name] = ProfileResult(
            prof.name,
            thr,
            raw,
            n_win,
            normalise(raw, n_win, prof),
            sum(f.tp for f in files.values()),
            sum(f.fn for f in files.values()),
            sum(f.fp for f in files.values()),
            dict(sorted(cats.items())),
            files,
        )
    return out


def write_results(directory: Path, detector: str, series: NabSeries, scores: np.ndarray) -> Path:
    """``directory/<detector>/<category>/<detector>_<file>.csv`` with ``timestamp,value,anomaly_score,label``:
    the layout of NAB's ``results/`` folder, which NAB's own scorer reads."""
    path = Path(directory) / detector / series.category / f"{detector}_{Path(series.name).name}"
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = series.labels()
    with path.open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["timestamp", "value", "anomaly_score", "label"])
        for t, v, s, lab in zip(
            series.timestamps, series.values.tolist(), np.asarray(scores).tolist(), labels.tolist(), strict=True
        ):
            w.writerow([t, repr(float(v)), repr(float(s)), lab])
    return path
