"""The pipeline's pure core: raw Kafka messages in, scores and dead letters out.

``validate -> window -> batch-step -> score``, with no I/O. The Faust agent, the lean benchmark loop
and the tests drive the same :class:`Processor`; the agent owns only consuming, sinks and
checkpoints.

Exactly-once state: every device remembers the (partition, offset) of the last message applied to
it. After a crash the worker restores the device's checkpoint and re-consumes from the last
committed offset; messages at or below the remembered offset are skipped (counted ``replayed``),
so no reading advances a device's state twice.

Model swaps: recurrent state belongs to a model version. Every device keeps a bounded ring of its
recent resampled inputs; after :meth:`Processor.swap` (or when a checkpoint from another version is
restored) a device is *stale*, and before its next step it is re-warmed by running the new model over
that history — batched with the other stale devices of the same micro-batch — so the fleet does not
fall back to warm-up. What the threshold learnt is not the model's: a threshold that can carry it
(the likelihood ensemble's distribution, levels, profiles) hands it to the new detector at the swap,
converted to its normalised units (:meth:`Detector.take_over`), and those devices re-warm only the
recurrent state and error statistics. A batch is always scored by one model. A *shadow* detector (a
candidate) can run beside the champion on the same steps, its threshold state taken from the champion's
in the same way; its scores go to ``shadow_scores`` only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import msgspec
import numpy as np

from models.detector import Detector
from models.scoring import Status
from pipeline.records import DeadLetter, ScoreRecord
from pipeline.schema import Limits, Reading, Reason, validate
from pipeline.windowing import DeviceWindow, Step, WindowConfig, add_reading, flush_idle


@dataclass(frozen=True, slots=True)
class Inbound:
    """One consumed Kafka message."""

    key: bytes | None
    value: bytes
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class ForecastErrors:
    """One wave's forecast errors of the champion, for drift monitoring: the mean over sensors of
    ``|x - forecast|`` in the model's normalised units, for each observed, warm, scored step."""

    devices: list[str]
    error: np.ndarray


@dataclass
class BatchResult:
    scores: list[ScoreRecord] = field(default_factory=list)
    forecast_errors: list[ForecastErrors] = field(default_factory=list)
    shadow_scores: list[ScoreRecord] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    dirty: set[str] = field(default_factory=set)
    readings: int = 0
    late: int = 0
    replayed: int = 0
    imputed: int = 0
    resets: int = 0
    waves: int = 0
    rewarmed: int = 0
    rewarm_s: float = 0.0


class _Checkpoint(msgspec.Struct, array_like=True):
    partition: int
    last_offset: int
    window: DeviceWindow
    detector: bytes | None
    history: bytes = b""  # float32 (n, F): recent resampled inputs, oldest first


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(_Checkpoint)


class _History:
    """The last ``steps`` resampled inputs of every device: one float32 ring per row of a shared array.

    float32 as in the checkpoint, so a device restored from its checkpoint re-warms from exactly the inputs
    a device that never left memory would (and half the memory of float64).

    A wave appends all its devices' inputs with one fancy-indexed write, and checkpoints and re-warms
    gather many devices at once; per-device Python containers cost several times more.
    """

    def __init__(self, steps: int, n_features: int, capacity: int = 1024) -> None:
        self.steps = steps
        self.data = np.zeros((capacity, steps, n_features), np.float32)
        self.start = np.zeros(capacity, np.int64)  # position of the oldest step
        self.count = np.zeros(capacity, np.int64)
        self._free = list(range(capacity - 1, -1, -1))

    def alloc(self) -> int:
        if not self._free:
            old = len(self.data)
            self.data = np.concatenate([self.data, np.zeros_like(self.data)])
            self.start = np.concatenate([self.start, np.zeros(old, np.int64)])
            self.count = np.concatenate([self.count, np.zeros(old, np.int64)])
            self._free = list(range(2 * old - 1, old - 1, -1))
        return self._free.pop()

    def free(self, row: int) -> None:
        self.start[row] = self.count[row] = 0
        self._free.append(row)

    def append(self, rows: np.ndarray, x: np.ndarray) -> None:
        """Append ``x[i]`` to the ring of ``rows[i]`` (distinct rows)."""
        if not self.steps:
            return
        count = self.count[rows]
        full = count == self.steps
        self.data[rows, (self.start[rows] + count) % self.steps] = x
        self.start[rows[full]] = (self.start[rows[full]] + 1) % self.steps
        self.count[rows[~full]] += 1

    def extend(self, row: int, x: np.ndarray) -> None:
        """Append the rows of ``x`` ``(n, F)``, oldest first, to the ring of ``row``."""
        old, count = self.get(np.array([row]))
        kept = np.concatenate([old[0, : count[0]], x])[max(0, len(x) + count[0] - self.steps) :]
        self.data[row, : len(kept)] = kept
        self.start[row], self.count[row] = 0, len(kept)

    def get(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(len(rows), steps, F)`` oldest first (only the first ``count`` steps of each are valid), and
        the counts."""
        order = (self.start[rows, None] + np.arange(self.steps)) % max(self.steps, 1)
        return self.data[rows[:, None], order], self.count[rows]


class _Device(msgspec.Struct, gc=False):
    """One device's bookkeeping. Not tracked by the cyclic GC (it holds no cycle): a worker keeps one per
    device for as long as it owns it, and every full collection would otherwise scan them all."""

    row: int  # of the history
    partition: int = -1
    last_offset: int = -1
    window: DeviceWindow = msgspec.field(default_factory=DeviceWindow)
    stale: bool = False  # its recurrent state is not (yet) from the current model


StateSource = Callable[[str], bytes | None]
# Devices whose histories one checkpoint gathers at a time (bounds the temporary copy).
_CHECKPOINT_CHUNK = 4096


class Processor:
    def __init__(
        self,
        detector: Detector,
        window: WindowConfig,
        limits: Limits,
        state_source: StateSource | None = None,
        *,
        history_steps: int = 48,
    ) -> None:
        self.detector = detector
        self.shadow: Detector | None = None
        self._shadow_warm: set[str] = set()
        self._carried: set[str] = set()  # stale devices whose threshold state the new detector took over
        self.window = window
        self.limits = limits
        self.sensors = tuple(limits.sensors)
        self.state_source = state_source
        self.devices: dict[str, _Device] = {}
        self.history = _History(history_steps, len(self.sensors))

    # -- state ---------------------------------------------------------------------------------------
    def _device(self, device_id: str) -> _Device:
        d = self.devices.get(device_id)
        if d is not None:
            return d
        d = _Device(self.history.alloc())
        self.devices[device_id] = d
        self.detector.slot(device_id)
        blob = self.state_source(device_id) if self.state_source else None
        if blob:
            cp = _dec.decode(blob)
            d.partition, d.last_offset, d.window = cp.partition, cp.last_offset, cp.window
            rows = np.frombuffer(cp.history, np.float32).reshape(-1, len(self.sensors))
            self.history.extend(d.row, rows)
            restored = cp.detector is not None and self.detector.restore(device_id, cp.detector)
            if not restored and cp.detector is not None and self.detector.restore_threshold(device_id, cp.detector):
                self._carried.add(device_id)  # saved by another model: what its threshold learnt still holds
            d.stale = not restored and bool(self.history.count[d.row])
        return d

    def swap(self, detector: Detector) -> None:
        """Serve ``detector`` from the next step on; every known device is re-warmed lazily, keeping the
        threshold state ``detector`` takes over from the current one."""
        if detector.take_over(self.detector):
            # the stale devices of a swap before this one are still carried: their state came along again
            self._carried |= {dev for dev, d in self.devices.items() if not d.stale}
        else:
            self._carried = set()
        self.detector = detector
        for d in self.devices.values():
            d.stale = True

    def set_shadow(self, detector: Detector | None) -> None:
        """Run ``detector`` beside the champion (``None`` stops it); it warms from device history."""
        self.shadow = detector
        self._shadow_warm.clear()

    def checkpoint(self, device_ids: Iterable[str]) -> dict[str, tuple[int, bytes]]:
        """``device -> (partition, serialised state)`` for the changelog."""
        known = [(dev, d) for dev in device_ids if (d := self.devices.get(dev)) is not None]
        out = {}
        for start in range(0, len(known), _CHECKPOINT_CHUNK):
            chunk = known[start : start + _CHECKPOINT_CHUNK]
            history, count = self.history.get(np.fromiter((d.row for _, d in chunk), np.int64, len(chunk)))
            count = count.tolist()
            fresh = [dev for dev, d in chunk if not d.stale]
            states = dict(zip(fresh, self.detector.export_many(fresh), strict=True))
            for i, (dev, d) in enumerate(chunk):
                state = states.get(dev)  # None: a stale state is re-warmed on restore, not checkpointed
                cp = _Checkpoint(d.partition, d.last_offset, d.window, state, history[i, : count[i]].tobytes())
                out[dev] = (d.partition, _enc.encode(cp))
        return out

    def forget(self, partitions: set[int] | None = None) -> int:
        """Drop in-memory state of devices on ``partitions`` (all if None) after a rebalance; the
        checkpoint is the source of truth and is reloaded on next sight."""
        gone = [k for k, d in self.devices.items() if partitions is None or d.partition in partitions]
        for k in gone:
            self.history.free(self.devices.pop(k).row)
            self.detector.release(k)
            self._carried.discard(k)
            if self.shadow is not None:
                self.shadow.release(k)
                self._shadow_warm.discard(k)
        return len(gone)

    # -- processing ----------------------------------------------------------------------------------
    def process(self, batch: Sequence[Inbound], now_ms: int) -> BatchResult:
        res = BatchResult()
        pending: dict[str, list[Step]] = {}
        limits, cfg = self.limits, self.window
        for m in batch:
            device: _Device | None = None
            device_id = ""
            for item in validate(m.value, m.key, limits, now_ms):
                if not isinstance(item, Reading):
                    res.dead.append(
                        DeadLetter(m.key, m.value, item.reason, item.detail, m.topic, m.partition, m.offset, item.index)
                    )
                    continue
                if device is None:
                    device_id, device = item.device_id, self._device(item.device_id)
                    if device.partition == m.partition and m.offset <= device.last_offset:
                        res.replayed += 1
                        break
                res.readings += 1
                steps = add_reading(device.window, item.ts_ms, item.values, cfg, now_ms)
                if steps is None:
                    res.late += 1
                    closed_end = (device.window.last_closed or 0) * cfg.step_ms
                    detail = f"ts {item.ts_ms} falls in a closed bucket (closed up to {closed_end})"
                    res.dead.append(
                        DeadLetter(m.key, m.value, Reason.LATE, detail, m.topic, m.partition, m.offset, item.index)
                    )
                elif steps:
                    pending.setdefault(device_id, []).extend(steps)
            else:
                if device is not None:
                    device.partition, device.last_offset = m.partition, m.offset
                    res.dirty.add(device_id)
        self._run(pending, res)
        return res

    def flush_idle(self, now_ms: int) -> BatchResult:
        """Close buckets of devices that went quiet (wall clock); call periodically."""
        res = BatchResult()
        pending: dict[str, list[Step]] = {}
        for dev, d in self.devices.items():
            steps = flush_idle(d.window, self.window, now_ms)
            if steps:
                pending[dev] = steps
                res.dirty.add(dev)
        self._run(pending, res)
        return res

    def _rewarm(self, detector: Detector, devices: list[str], carried: set[str]) -> None:
        """Fresh state for ``devices`` in ``detector``, then their history through it (batched waves). The
        ``carried`` ones keep their threshold state: their history re-warms only the recurrent state and
        the error statistics (and they leave ``carried``)."""
        slots = detector.slots_of(devices)
        keep = np.fromiter((d in carried for d in devices), bool, len(devices))
        detector.reset(slots[~keep])
        detector.reset(slots[keep], keep_threshold=True)
        carried.difference_update(devices)
        history, count = self.history.get(np.fromiter((self.devices[d].row for d in devices), np.int64, len(devices)))
        for depth in range(int(count[~keep].max(initial=0))):
            full = (count > depth) & ~keep  # devices keep their order; each steps through its history oldest first
            detector.step(slots[full], history[full, depth])
        if keep.any():
            detector.warm(slots[keep], history[keep], count[keep])

    def _prepare(self, pending: dict[str, list[Step]], res: BatchResult) -> None:
        t = time.perf_counter()
        stale = [d for d in pending if self.devices[d].stale]
        if stale:
            self._rewarm(self.detector, stale, self._carried)
            for d in stale:
                self.devices[d].stale = False
            res.rewarmed += len(stale)
        if self.shadow is not None:
            cold = [d for d in pending if d not in self._shadow_warm]
            if cold:
                self._rewarm(self.shadow, cold, set(self.shadow.adopt(self.detector, cold)))
                self._shadow_warm.update(cold)
        res.rewarm_s += time.perf_counter() - t

    def _run(self, pending: dict[str, list[Step]], res: BatchResult) -> None:
        """Step every device through its pending steps, in ordered waves of distinct devices: wave k
        holds the k-th step of every device that has one, in ``pending`` order."""
        if not pending:
            return
        self._prepare(pending, res)
        devs, steps = list(pending), list(pending.values())
        lengths = np.fromiter(map(len, steps), np.int64, len(devs))
        rows = np.fromiter((self.devices[d].row for d in devs), np.int64, len(devs))
        detectors = [self.detector] if self.shadow is None else [self.detector, self.shadow]
        slots = [np.fromiter((det.slots[d] for d in devs), np.int64, len(devs)) for det in detectors]
        for depth in range(int(lengths.max())):
            alive = np.flatnonzero(lengths > depth)
            wave_devs = [devs[i] for i in alive.tolist()]
            wave = [steps[i][depth] for i in alive.tolist()]
            x = np.array([s.values for s in wave], np.float64)
            observed = np.array([s.observed for s in wave])
            resets = np.array([s.reset for s in wave])
            res.resets += int(resets.sum())
            res.scores.extend(
                self._step(self.detector, slots[0][alive], wave_devs, wave, x, observed, resets, res.forecast_errors)
            )
            if self.shadow is not None:
                res.shadow_scores.extend(self._step(self.shadow, slots[1][alive], wave_devs, wave, x, observed, resets))
            self.history.append(rows[alive], x)
            res.imputed += int((~observed).sum())
            res.waves += 1

    def _step(
        self,
        detector: Detector,
        slots: np.ndarray,
        devs: list[str],
        wave: list[Step],
        x: np.ndarray,
        observed: np.ndarray,
        resets: np.ndarray,
        errors: list[ForecastErrors] | None = None,
    ) -> list[ScoreRecord]:
        if resets.any():
            detector.reset(slots[resets])
        context = detector.threshold.context_of(np.fromiter((st.ts_ms for st in wave), np.int64, len(wave)))
        out = detector.step(slots, x, observed, context)
        if errors is not None:
            keep = observed & out.warm & np.isfinite(out.score)
            error = (np.abs(x - out.forecast) / detector.artifact.normaliser.std).mean(axis=1)
            kept = devs if keep.all() else [devs[i] for i in np.flatnonzero(keep).tolist()]
            errors.append(ForecastErrors(kept, error[keep]))
        version, sensors = detector.version, self.sensors
        ok, warming = Status.OK, Status.WARMING_UP
        # Whole columns to Python objects at once (indexing numpy arrays per row costs far more); a NaN
        # score (s != s) means no forecast yet, so no score, top sensor or forecast either.
        columns = zip(
            devs,
            wave,
            out.score.tolist(),
            out.threshold.tolist(),
            out.warm.tolist(),
            out.is_anomaly.tolist(),
            out.top.tolist(),
            out.forecast.tolist(),
            strict=True,
        )
        return [
            ScoreRecord(
                dev,
                st.ts_ms,
                ok if warm else warming,
                s if s == s else None,
                thr,
                anomaly,
                sensors[top] if s == s else None,
                st.values,
                tuple(fc) if s == s else None,
                version,
                st.n_readings,
            )
            for dev, st, s, thr, warm, anomaly, top, fc in columns
            if st.observed
        ]
