"""From forecast errors to anomaly scores and flags: pure, batched numpy.

For a batch of ``B`` device steps with ``F`` sensors, the error ``e = x - forecast`` (in the model's
normalised units) is normalised per device and per sensor by exponentially weighted running
statistics of that device's own past errors: ``z = (e - mean) / std``. The step's score is
``max_f |z_f|`` and the sensor holding the maximum is the top contributor. Scores are causal: the
statistics used at ``t`` were updated with errors up to ``t - 1`` only.

A device is ``warming_up`` until it has seen ``warmup_steps`` errors; it is never flagged while
warming up. Thresholding is its own class (:class:`Threshold`), which may refuse to learn from the
steps it flags.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

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


class Threshold(abc.ABC):
    """Decides which scores are anomalous; may keep per-device state indexed by slot."""

    name: str

    @abc.abstractmethod
    def values(self, slots: np.ndarray) -> np.ndarray:
        """Threshold in force for each slot ``(B,)`` before this step's update."""

    @abc.abstractmethod
    def update(self, slots: np.ndarray, scores: np.ndarray, learn: np.ndarray) -> None:
        """Learn from ``scores`` where ``learn`` is true."""

    def grow(self, capacity: int) -> None:  # noqa: B027 - stateless thresholds need nothing
        """Make room for ``capacity`` slots."""

    def reset(self, slots: np.ndarray) -> None:  # noqa: B027
        """Forget what was learnt for ``slots``."""

    def export(self, slot: int) -> list[float]:
        return []

    def restore(self, slot: int, state: list[float]) -> None:  # noqa: B027
        """Load what :meth:`export` produced."""


class StaticThreshold(Threshold):
    """A fixed bound on the normalised score (in error standard deviations)."""

    name = "static"

    def __init__(self, value: float) -> None:
        self.value = value

    def values(self, slots: np.ndarray) -> np.ndarray:
        return np.full(len(slots), self.value)

    def update(self, slots: np.ndarray, scores: np.ndarray, learn: np.ndarray) -> None:
        return None


class AdaptiveThreshold(Threshold):
    """Per-device threshold = ``margin`` x a streaming estimate of the ``quantile`` of its scores.

    The quantile is tracked by stochastic approximation (the Robbins-Monro update of the pinball loss),
    with a step proportional to the running mean score so it is scale-free; ``floor`` keeps a device
    with very regular errors from alerting on noise.
    """

    name = "adaptive"

    def __init__(self, quantile: float = 0.999, margin: float = 1.5, floor: float = 4.0, rate: float = 0.05):
        self.quantile, self.margin, self.floor, self.rate = quantile, margin, floor, rate
        self.q = np.zeros(0)
        self.scale = np.zeros(0)

    def grow(self, capacity: int) -> None:
        n = len(self.q)
        if capacity > n:
            self.q = np.concatenate([self.q, np.full(capacity - n, self.floor / self.margin)])
            self.scale = np.concatenate([self.scale, np.ones(capacity - n)])

    def reset(self, slots: np.ndarray) -> None:
        self.q[slots] = self.floor / self.margin
        self.scale[slots] = 1.0

    def values(self, slots: np.ndarray) -> np.ndarray:
        return np.maximum(self.margin * self.q[slots], self.floor)

    def update(self, slots: np.ndarray, scores: np.ndarray, learn: np.ndarray) -> None:
        s, x = slots[learn], scores[learn]
        self.scale[s] = 0.99 * self.scale[s] + 0.01 * x
        step = self.rate * self.scale[s]
        self.q[s] += step * np.where(x > self.q[s], self.quantile, self.quantile - 1.0)

    def export(self, slot: int) -> list[float]:
        return [float(self.q[slot]), float(self.scale[slot])]

    def restore(self, slot: int, state: list[float]) -> None:
        if len(state) == 2:
            self.q[slot], self.scale[slot] = state


def make_threshold(method: str, *, value: float, quantile: float, margin: float) -> Threshold:
    if method == "static":
        return StaticThreshold(value)
    if method == "adaptive":
        return AdaptiveThreshold(quantile=quantile, margin=margin, floor=value * 0.75)
    raise ValueError(f"unknown threshold method {method!r} (static, adaptive)")
