"""The pipeline's pure core: raw Kafka messages in, scores and dead letters out.

``validate -> window -> batch-step -> score``, with no I/O. The Faust agent, the lean benchmark loop
and the tests drive the same :class:`Processor`; the agent owns only consuming, sinks and
checkpoints.

Exactly-once state: every device remembers the (partition, offset) of the last message applied to
it. After a crash the worker restores the device's checkpoint and re-consumes from the last
committed offset; messages at or below the remembered offset are skipped (counted ``replayed``),
so no reading advances a device's state twice.
"""

from __future__ import annotations

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


@dataclass
class BatchResult:
    scores: list[ScoreRecord] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    dirty: set[str] = field(default_factory=set)
    readings: int = 0
    late: int = 0
    replayed: int = 0
    imputed: int = 0
    resets: int = 0
    waves: int = 0


class _Checkpoint(msgspec.Struct, array_like=True):
    partition: int
    last_offset: int
    window: DeviceWindow
    detector: bytes | None


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(_Checkpoint)


@dataclass
class _Device:
    partition: int = -1
    last_offset: int = -1
    window: DeviceWindow = field(default_factory=DeviceWindow)


StateSource = Callable[[str], bytes | None]


class Processor:
    def __init__(
        self,
        detector: Detector,
        window: WindowConfig,
        limits: Limits,
        state_source: StateSource | None = None,
    ) -> None:
        self.detector = detector
        self.window = window
        self.limits = limits
        self.sensors = tuple(limits.sensors)
        self.state_source = state_source
        self.devices: dict[str, _Device] = {}

    # -- state ---------------------------------------------------------------------------------------
    def _device(self, device_id: str) -> _Device:
        d = self.devices.get(device_id)
        if d is not None:
            return d
        d = _Device()
        self.devices[device_id] = d
        self.detector.slot(device_id)
        blob = self.state_source(device_id) if self.state_source else None
        if blob:
            cp = _dec.decode(blob)
            d.partition, d.last_offset, d.window = cp.partition, cp.last_offset, cp.window
            if cp.detector is not None:
                self.detector.restore(device_id, cp.detector)
        return d

    def checkpoint(self, device_ids: Iterable[str]) -> dict[str, tuple[int, bytes]]:
        """``device -> (partition, serialised state)`` for the changelog."""
        out = {}
        for dev in device_ids:
            d = self.devices.get(dev)
            if d is not None:
                blob = _enc.encode(_Checkpoint(d.partition, d.last_offset, d.window, self.detector.export(dev)))
                out[dev] = (d.partition, blob)
        return out

    def forget(self, partitions: set[int] | None = None) -> int:
        """Drop in-memory state of devices on ``partitions`` (all if None) after a rebalance; the
        checkpoint is the source of truth and is reloaded on next sight."""
        gone = [k for k, d in self.devices.items() if partitions is None or d.partition in partitions]
        for k in gone:
            del self.devices[k]
            self.detector.release(k)
        return len(gone)

    # -- processing ----------------------------------------------------------------------------------
    def process(self, batch: Sequence[Inbound], now_ms: int) -> BatchResult:
        res = BatchResult()
        pending: dict[str, list[Step]] = {}
        for m in batch:
            device: _Device | None = None
            device_id = ""
            for item in validate(m.value, m.key, self.limits, now_ms):
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
                steps = add_reading(device.window, item.ts_ms, item.values, self.window, now_ms)
                if steps is None:
                    res.late += 1
                    closed_end = (device.window.last_closed or 0) * self.window.step_ms
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

    def _run(self, pending: dict[str, list[Step]], res: BatchResult) -> None:
        """Step every device through its pending steps, in ordered waves of distinct devices."""
        depth = 0
        while pending:
            devs = list(pending)
            wave = [pending[d][depth] for d in devs]
            slots = np.fromiter((self.detector.slots[d] for d in devs), np.int64, len(devs))
            resets = np.array([s.reset for s in wave])
            if resets.any():
                self.detector.reset(slots[resets])
                res.resets += int(resets.sum())
            x = np.array([s.values for s in wave], np.float64)
            observed = np.array([s.observed for s in wave])
            out = self.detector.step(slots, x, observed)
            res.waves += 1
            version = self.detector.version
            for i, (dev, st) in enumerate(zip(devs, wave, strict=True)):
                if not st.observed:
                    res.imputed += 1
                    continue
                has_score = not np.isnan(out.score[i])
                res.scores.append(
                    ScoreRecord(
                        device_id=dev,
                        ts_ms=st.ts_ms,
                        status=Status.OK if out.warm[i] else Status.WARMING_UP,
                        score=float(out.score[i]) if has_score else None,
                        threshold=float(out.threshold[i]),
                        is_anomaly=bool(out.is_anomaly[i]),
                        top_sensor=self.sensors[out.top[i]] if has_score else None,
                        values=st.values,
                        forecast=tuple(out.forecast[i].tolist()) if has_score else None,
                        model_version=version,
                        n_readings=st.n_readings,
                    )
                )
            depth += 1
            pending = {d: s for d, s in pending.items() if len(s) > depth}
