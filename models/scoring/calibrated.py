"""A threshold set per device from its own calibration period (SKAB's convention for its baselines), and the
slow-feature test its reference member uses."""

from __future__ import annotations

import numpy as np

from models.scoring.members import ReferenceDeviation
from models.scoring.thresholds import Threshold


def slow_features(train: np.ndarray, lag: int = 10, bound: float = 0.5) -> np.ndarray:
    """Which features of ``train`` ``(T, F)`` (a calibration period of one slot) are slow: their
    autocorrelation at ``lag`` steps exceeds ``bound`` (a level that carries its past, like a temperature;
    white-ish sensor noise is near 0). A constant feature is not slow."""
    x = np.asarray(train, np.float64)
    x = x - x.mean(axis=0)
    var = (x * x).sum(axis=0)
    cov = (x[:-lag] * x[lag:]).sum(axis=0) if len(x) > lag else np.zeros(x.shape[1])
    return (var > 0) & (cov > bound * var)


class CalibratedThreshold(Threshold):
    """Per-slot threshold set once from the slot's own calibration period, SKAB's convention for its
    baselines: ``margin`` x the ``quantile`` of the scores of the last ``calibration_steps`` steps of the
    calibration (the first ``skip_steps`` scored steps are left out); no flag before that.

    The score it compares is ``max(forecast_weight * raw, reference(x))``: the detector's forecast-error
    score, optionally in an ensemble with a :class:`ReferenceDeviation` of the inputs (``reference``).
    Flagged steps do not move the reference level unless the scoring config lets anomalies be learnt;
    with ``hold_features`` a flagged step holds the level only of the features whose own reference
    score is beyond the threshold, and the others keep following their input (a sensor that drifts
    normally, e.g. a temperature warming up, while another one is anomalous would otherwise be held for
    the whole anomaly and still be flagged long after it: a lock-in on a sensor that was never
    anomalous).

    With ``per_member``, every member of the ensemble -- the forecast-error score and each feature's
    reference score -- gets its own calibrated threshold (``margin`` x its own ``quantile``), and the
    score is the largest *ratio* of a member to its threshold, flagged above 1: a sensor that wanders
    widely in normal operation (a slow temperature) no longer sets the threshold of all the others,
    and is itself judged against its own wandering. ``hold_features`` then compares each feature with
    its own threshold. Memory: ``calibration_steps`` float32 per slot (x members with ``per_member``).

    **Slow features** (:meth:`set_slow`, with ``per_member`` and ``hold_features``): a feature the caller
    marks slow for a slot (a temperature, whose level integrates what happened before) is held while it
    is beyond its threshold only as long as a fast member -- the forecast error or a feature not marked
    slow -- is beyond its own too. A step flagged by slow features alone re-anchors their level at their
    current smoothed value (so it is flagged, once): the process is back within every fast member's
    bounds, and a lasting offset of a slow sensor is what it left behind, not an ongoing fault.
    """

    name = "calibrated"

    def __init__(
        self,
        *,
        skip_steps: int,
        calibration_steps: int,
        quantile: float = 0.99,
        margin: float = 1.5,
        reference: ReferenceDeviation | None = None,
        forecast_weight: float = 1.0,
        hold_features: bool = False,
        per_member: bool = False,
    ) -> None:
        if calibration_steps < 1 or skip_steps < 0 or not (0.0 < quantile <= 1.0):
            raise ValueError("calibration_steps >= 1, skip_steps >= 0, 0 < quantile <= 1")
        self.skip_steps, self.calibration_steps = skip_steps, calibration_steps
        self.quantile, self.margin = quantile, margin
        self.reference, self.forecast_weight = reference, forecast_weight
        self.hold_features = hold_features
        self.per_member = per_member
        self._flagged = np.zeros(0, bool)  # this step's flags (transform -> update of the same step)
        self._fast = np.zeros(0, bool)  # this step's rows with a fast member beyond its threshold
        self.n = np.zeros(0, np.int64)
        self.c = 0 if per_member else 1  # calibrated columns (per_member: 1 + features, once known)
        self.buf = np.zeros((0, calibration_steps, self.c), np.float32)
        self.col = np.zeros((0, self.c))  # per-column thresholds (per_member)
        self.slow = np.zeros((0, max(self.c - 1, 0)), bool)  # per-feature slow marks (per_member)
        self.value = np.zeros(0)

    def _columns(self, c: int) -> None:
        if c != self.c:
            self.c = c
            self.buf = np.zeros((len(self.n), self.calibration_steps, c), np.float32)
            self.col = np.full((len(self.n), c), np.inf)
            self.slow = np.zeros((len(self.n), max(c - 1, 0)), bool)

    def set_slow(self, slots: np.ndarray, slow: np.ndarray) -> None:
        """Mark the slow features ``(len(slots), F)`` of ``slots`` (call after the slot's reset; kept by
        export/restore). Needs ``per_member``, ``hold_features`` and a reference member."""
        if not (self.per_member and self.hold_features and self.reference is not None):
            raise ValueError("slow features need per_member, hold_features and a reference member")
        slow = np.asarray(slow, bool)
        self._columns(1 + slow.shape[1])
        self.slow[slots] = slow

    def grow(self, capacity: int) -> None:
        extra = capacity - len(self.n)
        if extra <= 0:
            return
        self.n = np.concatenate([self.n, np.zeros(extra, np.int64)])
        self.buf = np.concatenate([self.buf, np.zeros((extra, self.calibration_steps, self.c), np.float32)])
        self.col = np.concatenate([self.col, np.full((extra, self.c), np.inf)])
        self.slow = np.concatenate([self.slow, np.zeros((extra, self.slow.shape[1]), bool)])
        self.value = np.concatenate([self.value, np.full(extra, np.inf)])
        if self.reference is not None:
            self.reference.grow(capacity)

    def reset(self, slots: np.ndarray) -> None:
        self.n[slots] = 0
        self.value[slots] = np.inf
        self.col[slots] = np.inf
        self.slow[slots] = False
        if self.reference is not None:
            self.reference.reset(slots)

    def values(self, slots: np.ndarray) -> np.ndarray:
        return self.value[slots]

    def transform(
        self, slots: np.ndarray, scores: np.ndarray, x: np.ndarray, seen: np.ndarray, context: np.ndarray | None = None
    ) -> np.ndarray:
        raw = np.nan_to_num(np.asarray(scores, np.float64), nan=0.0) * self.forecast_weight
        if self.per_member:
            cols = raw[:, None]
            if self.reference is not None:
                self.reference.step(slots, x, seen)
                cols = np.column_stack([raw, self.reference.z])
            self._columns(cols.shape[1])
            col = self.col[slots]
            calibrated = np.isfinite(col).all(axis=1)
            ratios = cols / np.where(calibrated[:, None], np.maximum(col, 1e-12), 1.0)
            fast = np.column_stack([np.ones(len(slots), bool), ~self.slow[slots]])  # the forecast error is fast
            self._fast = calibrated & ((ratios > 1.0) & fast).any(axis=1)
            raw = np.where(calibrated, ratios.max(axis=1), cols.max(axis=1))  # the plain max until calibrated
        else:
            if self.reference is not None:
                raw = np.maximum(raw, self.reference.step(slots, x, seen))
            cols = raw[:, None]
        self._flagged = seen & (raw > self.value[slots])
        n = self.n[slots]
        k = n - self.skip_steps
        collect = seen & (k >= 0) & (k < self.calibration_steps)
        if collect.any():
            self.buf[slots[collect], k[collect]] = cols[collect]
        done = seen & (k == self.calibration_steps - 1)
        if done.any():
            d = slots[done]
            q = self.margin * np.quantile(self.buf[d].astype(np.float64), self.quantile, axis=1)  # (D, C)
            self.col[d] = q
            self.value[d] = 1.0 if self.per_member else q[:, 0]
        self.n[slots[seen]] += 1
        return raw

    def update(self, slots: np.ndarray, scores: np.ndarray, learn: np.ndarray) -> None:
        if self.reference is None:
            return
        if self.hold_features and len(self._flagged) == len(slots):
            # flagged rows: the features below the threshold (their own, with per_member) still learn
            bound = self.col[slots][:, 1:] if self.per_member else self.value[slots][:, None]
            quiet = self.reference.z <= bound
            self.reference.update(slots, learn[:, None] | (self._flagged[:, None] & quiet))
            if self.per_member and len(self._fast) == len(slots):
                # flagged by slow features alone: re-anchored where they are
                anchor = (self._flagged & ~self._fast)[:, None] & self.slow[slots] & ~quiet
                if anchor.any():
                    ref = self.reference
                    ref.level[slots] = np.where(anchor, ref.ema[slots], ref.level[slots])
        else:
            self.reference.update(slots, learn)

    def export_parts(self, slots: np.ndarray) -> list[np.ndarray]:
        s = slots
        head = [self.n[s], self.value[s]]
        if self.per_member:
            head += [np.full(len(s), self.c), self.col[s], self.slow[s]]
        tail = self.reference.export_parts(s) if self.reference is not None else []
        return [*head, self.buf[s], *tail]

    def restore(self, slot: int, state: list[float]) -> None:
        if self.per_member:
            if len(state) < 3:
                return
            c = int(state[2])
            if c < 1 or len(state) < 3 + c + (c - 1) + self.calibration_steps * c:
                return
            self._columns(c)
            self.col[slot] = state[3 : 3 + c]
            self.slow[slot] = np.asarray(state[3 + c : 2 + 2 * c]) > 0.5
            o = 2 + 2 * c
        else:
            o = 2
        m = self.calibration_steps * self.c
        if len(state) < o + m:
            return
        self.n[slot], self.value[slot] = int(state[0]), state[1]
        self.buf[slot] = np.asarray(state[o : o + m]).reshape(self.calibration_steps, self.c)
        if self.reference is not None:
            self.reference.restore(slot, state[o + m :])
