"""Forecast errors to raw scores: the per-device, per-sensor error statistics, the score of a step, its
status, and the units a device's state is kept in."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from numpy.typing import ArrayLike

EPS = 1e-6


class Status(StrEnum):
    WARMING_UP = "warming_up"
    OK = "ok"


@dataclass(frozen=True)
class ScoringConfig:
    warmup_steps: int = 30
    halflife_steps: float = 200.0
    learn_from_anomalies: bool = False
    burnin_steps: int = 5  # forecasts right after a reset are not learnt from (cold recurrent state)

    @property
    def alpha(self) -> float:
        return float(1.0 - 0.5 ** (1.0 / self.halflife_steps))


@dataclass
class ErrorStats:
    """Per-device, per-sensor running error statistics (rows are device slots)."""

    mean: np.ndarray  # (N, F) float64
    var: np.ndarray  # (N, F) float64
    count: np.ndarray  # (N,) int64: errors seen

    @classmethod
    def empty(cls, capacity: int, n_features: int) -> ErrorStats:
        return cls(np.zeros((capacity, n_features)), np.ones((capacity, n_features)), np.zeros(capacity, np.int64))

    def reset(self, slots: np.ndarray) -> None:
        self.mean[slots] = 0.0
        self.var[slots] = 1.0
        self.count[slots] = 0


@dataclass(frozen=True)
class ScoreBatch:
    score: np.ndarray  # (B,) float64
    top: np.ndarray  # (B,) int64: index of the top-contributing sensor
    z: np.ndarray  # (B, F)
    warm: np.ndarray  # (B,) bool: past warm-up


def score_errors(stats: ErrorStats, slots: np.ndarray, err: np.ndarray, warmup_steps: int) -> ScoreBatch:
    """Normalise errors ``(B, F)`` by the statistics of ``slots`` (no update)."""
    z = (err - stats.mean[slots]) / np.sqrt(stats.var[slots] + EPS)
    absz = np.abs(z)
    top = absz.argmax(axis=1)
    score = absz[np.arange(len(slots)), top]
    return ScoreBatch(score, top, z, stats.count[slots] >= warmup_steps)


def update_stats(stats: ErrorStats, slots: np.ndarray, err: np.ndarray, learn: np.ndarray, alpha: float) -> None:
    """EWMA update of ``slots`` with ``err`` where ``learn`` is true.

    While few errors have been seen the weight is ``1/(n+1)`` (a plain running mean), so the
    statistics converge within the warm-up instead of after several half-lives.
    """
    s = slots[learn]
    if len(s) == 0:
        return
    e = err[learn]
    n = stats.count[s].astype(np.float64)
    w = np.maximum(1.0 / (n + 1.0), alpha)[:, None]
    delta = e - stats.mean[s]
    mean = stats.mean[s] + w * delta
    # West's incremental weighted variance; the first error seeds a unit-free floor.
    var = np.where(n[:, None] == 0, np.maximum(delta**2, 1e-4), (1 - w) * (stats.var[s] + w * delta**2))
    stats.mean[s] = mean
    stats.var[s] = np.maximum(var, 1e-8)
    stats.count[s] += 1


@dataclass(frozen=True)
class Units:
    """How inputs map from one artifact's normalised units to another's, per feature: ``x_new = x_old *
    scale + shift`` (``scale = std_old / std_new``, ``shift = (mean_old - mean_new) / std_new``)."""

    scale: np.ndarray  # (F,)
    shift: np.ndarray  # (F,)

    @classmethod
    def between(cls, old_mean: ArrayLike, old_std: ArrayLike, new_mean: np.ndarray, new_std: np.ndarray) -> Units:
        """From inputs normalised by ``(old_mean, old_std)`` to inputs normalised by ``(new_mean, new_std)``."""
        old_mean, old_std = np.asarray(old_mean, np.float64), np.asarray(old_std, np.float64)
        return cls(old_std / new_std, (old_mean - new_mean) / new_std)

    def convert(self, kind: str, v: np.ndarray) -> np.ndarray:
        """``v`` ``(..., F)`` converted in place by its ``kind``: ``level`` (a value, smoothed or not),
        ``square`` (a squared spread), ``log`` (a log-spread: ``+ log scale``), ``diff`` (a difference of
        values: scaled, not shifted); anything else is unitless. In place because a fleet's profiles are
        hundreds of MB, whose temporaries cost more than the arithmetic."""
        if kind in ("level", "diff"):
            v *= self.scale
        if kind == "level":
            v += self.shift
        elif kind == "square":
            v *= self.scale**2
        elif kind == "log":
            v += np.log(self.scale)
        return v
