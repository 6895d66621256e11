"""The stateful detector: one batched forecaster step for many devices, then scoring.

Every device owns a *slot* in preallocated tensors that hold its carried recurrent state
(``(L, capacity, H)`` per state tensor, on the inference device), the forecast it made for its next
step, and its error statistics. A call to :meth:`Detector.step` gathers the state of ``B`` slots,
advances all of them by exactly one step in ONE tensor operation, scores the readings against the
forecasts made one step earlier, and scatters the new state back. A slot must appear at most once
per call; the caller splits a device's consecutive steps into ordered waves.

The live Faust agent, the lean benchmark loop and the evaluation harness all score through this class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import numpy as np
import torch

from models.artifact import Artifact
from models.scoring import ErrorStats, ScoringConfig, Threshold, Units, score_errors, update_stats

# A re-warm from history (:meth:`Detector.warm`) does not learn errors this many robust standard deviations
# from the median of the device's history errors (a Gaussian error lies beyond 5 once in ~1.7 million), nor
# takes that scale below the error statistics' own floor (std 0.01 normalised units, see update_stats).
WARM_OUTLIER_Z = 5.0
WARM_SCALE_FLOOR = 0.01


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def set_cpu_threads(n: int) -> None:
    """torch's intra-op CPU threads for this process.

    A worker steps small batches from one asyncio thread; with a thread pool per process its ops wait on
    each other's threads whenever another process holds a core, which cost a 2-core machine 5x its rate
    (1,760 vs 8,710 readings/s draining the same backlog). Scale with processes instead.
    """
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _median_of_steps(e: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Per row and feature, the median over the steps of ``e`` ``(B, D, F)`` whose ``n`` ``(B,)`` finite
    steps are the only ones (the rest NaN); ``(B, 1, F)``. ``np.nanmedian`` gives the same 8x slower."""
    srt = np.sort(e, axis=1)  # NaN sorts last
    rows = np.arange(len(e))
    return (0.5 * (srt[rows, (n - 1) // 2] + srt[rows, n // 2]))[:, None, :]


@dataclass(frozen=True)
class StepOutput:
    """Per-row results of one batched step (``B`` rows, ``F`` sensors, raw units)."""

    forecast: np.ndarray  # (B, F) what was forecast for this step; NaN rows where none existed
    score: np.ndarray  # (B,) NaN where there was no forecast yet
    top: np.ndarray  # (B,) index of the top-contributing sensor
    threshold: np.ndarray  # (B,)
    warm: np.ndarray  # (B,) bool: past warm-up (status ok)
    is_anomaly: np.ndarray  # (B,) bool


class _Exported(msgspec.Struct, array_like=True):
    """Serialised state of one device (msgpack); ``version`` ties the recurrent state to a model. The
    artifact's normaliser comes after the threshold's state (states saved before it was added decode
    without it): a threshold whose state is the device's converts it from those units when another model
    restores it. The threshold's state is written as packed float64 (``threshold_f64``; the likelihood
    ensemble's ~2,500 floats as a msgpack list cost ~6x more to build and encode), ``threshold`` is the
    list that states saved before it hold."""

    version: str
    state: list[bytes]
    forecast: bytes
    age: int
    err_mean: list[float]
    err_var: list[float]
    err_count: int
    threshold: list[float]
    norm_mean: list[float] = msgspec.field(default_factory=list)
    norm_std: list[float] = msgspec.field(default_factory=list)
    threshold_f64: bytes = b""

    def threshold_state(self) -> list[float] | None:
        """The threshold's state, whichever way it was saved; None when the packed one is truncated."""
        if not self.threshold_f64:
            return self.threshold
        if len(self.threshold_f64) % 8:
            return None
        state: list[float] = np.frombuffer(self.threshold_f64, np.float64).tolist()
        return state


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(_Exported)


class Detector:
    def __init__(
        self,
        artifact: Artifact,
        scoring: ScoringConfig,
        threshold: Threshold,
        *,
        device: str = "cpu",
        capacity: int = 1024,
    ) -> None:
        self.artifact = artifact
        self.model = artifact.model.to(device).eval()
        self.device = torch.device(device)
        self.scoring = scoring
        self.threshold = threshold
        self.n_features = len(artifact.features)
        self.capacity = 0
        self.state: list[torch.Tensor] = [torch.zeros(0) for _ in range(self.model.n_state)]
        self.forecast = np.zeros((0, self.n_features), np.float32)
        self.age = np.zeros(0, np.int64)  # steps the recurrent state has run since reset
        self.stats = ErrorStats.empty(0, self.n_features)
        self.slots: dict[str, int] = {}
        self._free: list[int] = []
        self._grow(capacity)

    @property
    def version(self) -> str:
        return self.artifact.version

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        if capacity <= old:
            return
        cfg = self.model.config
        extra = capacity - old
        self.state = (
            [
                torch.cat([t.to(self.device), torch.zeros(cfg.layers, extra, cfg.hidden, device=self.device)], dim=1)
                for t in self.state
            ]
            if old
            else [torch.zeros(cfg.layers, capacity, cfg.hidden, device=self.device) for _ in self.state]
        )
        self.forecast = np.concatenate([self.forecast, np.zeros((extra, self.n_features), np.float32)])
        self.age = np.concatenate([self.age, np.zeros(extra, np.int64)])
        fresh = ErrorStats.empty(extra, self.n_features)
        self.stats = ErrorStats(
            np.concatenate([self.stats.mean, fresh.mean]),
            np.concatenate([self.stats.var, fresh.var]),
            np.concatenate([self.stats.count, fresh.count]),
        )
        self.threshold.grow(capacity)
        self._free.extend(range(capacity - 1, old - 1, -1))
        self.capacity = capacity

    def slot(self, device_id: str) -> int:
        """The slot of ``device_id``, allocating a fresh (reset) one on first sight."""
        s = self.slots.get(device_id)
        if s is None:
            if not self._free:
                self._grow(max(1024, self.capacity * 2))
            s = self._free.pop()
            self.slots[device_id] = s
            self.reset(np.array([s]))
        return s

    def slots_of(self, device_ids: Sequence[str]) -> np.ndarray:
        """The slots of ``device_ids`` (distinct), allocating the missing ones together: one reset for all
        of them instead of one per device (a swap takes over a whole fleet at once)."""
        missing = [d for d in device_ids if d not in self.slots]
        if len(self._free) < len(missing):
            self._grow(max(1024, self.capacity * 2, self.capacity + len(missing) - len(self._free)))
        fresh = np.array([self._free.pop() for _ in missing], np.int64)
        self.slots.update(zip(missing, fresh.tolist(), strict=True))
        if len(fresh):
            self.reset(fresh)
        return np.fromiter((self.slots[d] for d in device_ids), np.int64, len(device_ids))

    def release(self, device_id: str) -> None:
        """Forget a device (its partition moved to another worker)."""
        s = self.slots.pop(device_id, None)
        if s is not None:
            self._free.append(s)

    def reset(self, slots: np.ndarray, *, keep_threshold: bool = False) -> None:
        """Back to a fresh state: zero recurrent state, no forecast, warm-up starts again (the threshold's
        state too, unless ``keep_threshold``: one carried over from another model, see :meth:`take_over`)."""
        idx = torch.as_tensor(slots, device=self.device)
        for t in self.state:
            t.index_fill_(1, idx, 0.0)
        self.age[slots] = 0
        self.stats.reset(slots)
        if not keep_threshold:
            self.threshold.reset(slots)

    def _carries(self, src: Detector) -> Units | None:
        """The conversion from ``src``'s normalised units to this detector's when this one's threshold carries
        over what ``src``'s learnt (same sensors, :meth:`Threshold.carries`), else None."""
        if src.artifact.features != self.artifact.features or not self.threshold.carries(src.threshold):
            return None
        old, new = src.artifact.normaliser, self.artifact.normaliser
        return Units.between(old.mean, old.std, new.mean, new.std)

    def take_over(self, src: Detector) -> bool:
        """Replace ``src`` (the detector that served until now; not to be used afterwards): keep its devices'
        slots and the threshold state it learnt, converted in place to this artifact's normalised units (no
        copy of a fleet's profiles). False (nothing taken) when the threshold's state belongs to the model
        or this detector already serves devices. The taken devices' recurrent state and error statistics
        are fresh: re-warm them from history with :meth:`warm`."""
        units = self._carries(src)
        if units is None or self.slots:
            return False
        src.threshold.rescale(units)
        self.threshold = src.threshold
        self._grow(src.capacity)
        self.threshold.grow(self.capacity)
        self.slots = dict(src.slots)
        taken = set(self.slots.values())
        self._free = [s for s in self._free if s not in taken]
        return True

    def adopt(self, src: Detector, device_ids: Sequence[str]) -> list[str]:
        """Copy the threshold state ``src`` (another model's detector, which goes on serving) holds for
        ``device_ids`` into this detector, converted to its normalised units; returns the devices taken
        (none when the threshold's state belongs to the model). A shadow starts from the champion's."""
        units = self._carries(src)
        known = [d for d in device_ids if d in src.slots] if units is not None else []
        if units is None or not known:
            return []
        s = np.fromiter((src.slots[d] for d in known), np.int64, len(known))
        self.threshold.transfer(src.threshold, s, self.slots_of(known), units)
        return known

    @torch.inference_mode()
    def warm(self, slots: np.ndarray, history: np.ndarray, count: np.ndarray) -> None:
        """Re-warm ``slots`` from their history without the threshold (one carried over from another model):
        the recurrent state and the error statistics only. ``history`` ``(B, D, F)`` holds each slot's raw
        readings oldest first, ``count`` ``(B,)`` how many of them are real.

        Without the threshold no step is flagged, so the errors are screened as a whole instead: past the
        burn-in each is learnt unless it lies more than :data:`WARM_OUTLIER_Z` robust standard deviations
        (1.4826 x the median absolute deviation of the slot's history errors) from their median, as the
        live path would not learn a flagged step. One anomaly among the last steps would otherwise widen
        the statistics for many half-lives."""
        count = np.asarray(count, np.int64)
        depth = int(history.shape[1])
        err = np.full(history.shape, np.nan)  # (B, D, F); NaN: not a learnable step
        for d in range(int(count.max(initial=0))):
            has = count > d  # each slot steps through its history oldest first
            s = slots[has]
            xz = self.artifact.normaliser.apply(history[has, d])
            cold = self.age[s] <= max(self.scoring.burnin_steps, 0)  # (age 0: no forecast yet)
            err[has, d] = np.where(cold[:, None], np.nan, xz - self.forecast[s])
            self._advance(s, xz)
        learn = np.isfinite(err).all(axis=2)
        err[~learn] = np.nan  # a step with one sensor missing is left out whole
        rows = learn.any(axis=1)
        if not rows.any():
            return
        e, n = err[rows], learn[rows].sum(axis=1)
        dev = np.abs(e - _median_of_steps(e, n))
        scale = np.maximum(1.4826 * _median_of_steps(dev, n), WARM_SCALE_FLOOR)
        learn[rows] &= (dev <= WARM_OUTLIER_Z * scale).all(axis=2)
        for d in range(depth):
            update_stats(self.stats, slots, err[:, d], learn[:, d], self.scoring.alpha)

    @torch.inference_mode()
    def step(
        self, slots: np.ndarray, x: np.ndarray, observed: np.ndarray | None = None, context: np.ndarray | None = None
    ) -> StepOutput:
        """Advance ``slots`` (distinct) by one step with raw readings ``x`` ``(B, F)``.

        ``observed`` false marks imputed (gap-filled) rows: they advance the state but neither learn
        nor can be flagged. ``context`` ``(B,)`` int, optional, is each row's seasonal bin (e.g. its hour
        of day, -1 unknown): an input of the threshold's transform that is neither forecast nor scored.
        """
        b = len(slots)
        obs = np.ones(b, bool) if observed is None else observed
        xz = self.artifact.normaliser.apply(x)
        age = self.age[slots]
        has = age > 0
        prev = self.forecast[slots]
        err = xz - prev
        sb = score_errors(self.stats, slots, err, self.scoring.warmup_steps)
        thr = self.threshold.values(slots)
        scored = has & obs
        warm = sb.warm & scored
        # The threshold may map the raw score (e.g. to an anomaly likelihood); identity by default.
        reported = self.threshold.transform(slots, sb.score, xz, warm, context)
        is_anomaly = warm & (reported > thr)
        # The first forecasts after a reset come from a cold state; their errors would inflate the
        # device's error statistics for many half-lives, so they neither learn nor score as ok.
        learn = scored & (age > self.scoring.burnin_steps) & (~is_anomaly | self.scoring.learn_from_anomalies)
        update_stats(self.stats, slots, err, learn, self.scoring.alpha)
        self.threshold.update(slots, sb.score, learn & warm)
        self._advance(slots, xz)

        forecast = np.where(has[:, None], self.artifact.normaliser.invert(prev), np.nan)
        score = np.where(scored, reported, np.nan)
        return StepOutput(forecast, score, sb.top, thr, warm, is_anomaly)

    def _advance(self, slots: np.ndarray, xz: np.ndarray) -> None:
        """One batched recurrent step: gather the slots' state, step, scatter, keep the next forecast."""
        idx = torch.from_numpy(slots).to(self.device)
        state = tuple(t.index_select(1, idx) for t in self.state)
        y, new = self.model.step(torch.from_numpy(xz).to(self.device), state)
        for t, n in zip(self.state, new, strict=True):
            t.index_copy_(1, idx, n)
        self.forecast[slots] = y.cpu().numpy()
        self.age[slots] += 1

    def export(self, device_id: str) -> bytes:
        return self.export_many([device_id])[0]

    def export_many(self, device_ids: Sequence[str]) -> list[bytes]:
        """Each device's state blob (what :meth:`export` gives), gathered for all of them at once: one
        device-to-host copy per state tensor instead of one per device and tensor."""
        slots = np.fromiter((self.slots[d] for d in device_ids), np.int64, len(device_ids))
        idx = torch.from_numpy(slots).to(self.device)
        # (layers, B, hidden) -> (B, layers, hidden): each device's rows contiguous, as t[:, s] gave them
        states = [t.index_select(1, idx).cpu().numpy().transpose(1, 0, 2).copy() for t in self.state]
        forecast = self.forecast[slots]
        age = self.age[slots].tolist()
        mean, var = self.stats.mean[slots].tolist(), self.stats.var[slots].tolist()
        count = self.stats.count[slots].tolist()
        # the units of the threshold's state, for another model to convert it (only where it is carried over)
        carried = self.threshold.carries(self.threshold)
        norm_mean = np.asarray(self.artifact.normaliser.mean, np.float64).tolist() if carried else []
        norm_std = np.asarray(self.artifact.normaliser.std, np.float64).tolist() if carried else []
        thr = self.threshold.export_many(slots)
        return [
            _enc.encode(
                _Exported(
                    self.version,
                    [st[i].tobytes() for st in states],
                    forecast[i].tobytes(),
                    int(age[i]),
                    mean[i],
                    var[i],
                    int(count[i]),
                    [],
                    norm_mean,
                    norm_std,
                    thr[i].tobytes(),
                )
            )
            for i in range(len(slots))
        ]

    def restore(self, device_id: str, blob: bytes) -> bool:
        """Load a device's exported state; returns False and leaves the device fresh if the blob is
        corrupt, belongs to another model version or does not fit this model's shapes."""
        s = self.slot(device_id)
        self.reset(np.array([s]))
        try:
            e = _dec.decode(blob)
        except (msgspec.DecodeError, ValueError):
            return False
        cfg = self.model.config
        rows = [np.frombuffer(b, np.float32) for b in e.state if len(b) % 4 == 0]
        forecast = np.frombuffer(e.forecast, np.float32) if len(e.forecast) % 4 == 0 else np.zeros(0, np.float32)
        threshold = e.threshold_state()
        fits = (
            e.version == self.version
            and len(rows) == len(self.state)
            and all(r.size == cfg.layers * cfg.hidden for r in rows)
            and forecast.size == self.n_features
            and len(e.err_mean) == len(e.err_var) == self.n_features
        )
        if not fits or threshold is None:
            return False
        for t, r in zip(self.state, rows, strict=True):
            t[:, s] = torch.from_numpy(r.reshape(cfg.layers, cfg.hidden).copy()).to(self.device)
        self.forecast[s] = forecast
        self.age[s] = e.age
        self.stats.mean[s], self.stats.var[s], self.stats.count[s] = e.err_mean, e.err_var, e.err_count
        self.threshold.restore(s, threshold)
        return True

    def restore_threshold(self, device_id: str, blob: bytes) -> bool:
        """The threshold part of a state blob that another model version saved (:meth:`restore` refused it),
        converted from that model's normalised units to this one's, for a threshold whose state is the
        device's (:meth:`Threshold.carries`; the likelihood ensemble). True: taken; the recurrent state is
        still fresh, re-warm it with :meth:`warm`."""
        try:
            e = _dec.decode(blob)
        except (msgspec.DecodeError, ValueError):
            return False
        threshold = e.threshold_state()
        if (
            threshold is None
            or e.version == self.version
            or len(e.norm_mean) != self.n_features
            or len(e.norm_std) != self.n_features
            or not self.threshold.carries(self.threshold)
        ):
            return False
        s = np.array([self.slot(device_id)])
        self.threshold.restore(int(s[0]), threshold)
        new = self.artifact.normaliser
        self.threshold.transfer(self.threshold, s, s, Units.between(e.norm_mean, e.norm_std, new.mean, new.std))
        return True
