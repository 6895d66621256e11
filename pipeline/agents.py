"""The scoring agent: a thin shell around :class:`~pipeline.processor.Processor`.

Per micro-batch (``pipeline.delivery.take_batches``): process (pure) -> dead letters to ``<prefix>.dlq`` ->
points queued for InfluxDB (``WriteBehindSink``: written behind the scores, retried until written; while
``influx_max_pending_lines`` points wait, consumption waits, which is the backpressure) -> scores to
``<prefix>.scores``. The devices it advanced are checkpointed to the state table once per
``checkpoint_interval_s``, a slice of the fleet at a time (``pipeline.cadence``); once the points queued
before are written, the batches those checkpoints cover are acknowledged (unacknowledged until then). Faust
flushes the producer (changelog included) before committing the acknowledged offsets, so nothing is
committed before the state it advanced and the points it produced are written.

Model updates arrive on ``<prefix>.control`` (every worker follows it). A new artifact is loaded and
verified off the hot path; the swap itself happens between two micro-batches, so no batch is scored
by a mix of models, and a refused artifact leaves the current model serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, cast

import faust
import numpy as np
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from faust.transport.drivers.aiokafka import Producer as FaustKafkaProducer
from faust.types import TP, EventT, Message, StreamT

from connectors.influx import InfluxRejectedError, WriteBehindSink
from connectors.kafka_batches import Record, send_batches
from connectors.kafka_ranges import PartitionReader
from connectors.kafka_security import KafkaSecurity
from models.artifact import ArtifactError
from models.detector import Detector
from models.drift import DriftMonitor
from pipeline import control as ctl
from pipeline.app import Components, build_detector, fetch_version, write_checkpoints
from pipeline.cadence import CheckpointCadence, Pending, serialise
from pipeline.continuity import Hole
from pipeline.delivery import take_batches
from pipeline.groups import device_grouper
from pipeline.holes import HoleRepair, RepairedAgent
from pipeline.processor import BatchResult, Inbound
from pipeline.records import DeadLetter, score_json, score_line

log = logging.getLogger(__name__)

INFLUX_REJECTED = "influx_rejected"  # dead-letter reason: a score point InfluxDB refused (400/422)


class ScoringService(RepairedAgent[Inbound]):
    def __init__(self, comp: Components) -> None:
        s = comp.settings
        self.reader = PartitionReader(s.kafka_bootstrap, s.app_id, security=KafkaSecurity.from_settings(s))
        self.readings_topic = comp.readings.get_topic_name()
        # The agent and the idle-flush timer (which also runs the tail check) both drive the processor and
        # emit: one at a time, under RepairedAgent's lock, so that checkpoints and commits always follow the
        # order in which state advanced.
        super().__init__(
            HoleRepair(
                comp.app,
                self.reader,
                self.readings_topic,
                lambda r: Inbound(r.key, r.value or b"", r.topic, r.partition, r.offset),
                comp.metrics.refetched,
            )
        )
        self.c = comp
        self.sink = WriteBehindSink(
            comp.sink, max_pending_lines=s.influx_max_pending_lines, on_rejected=self._dead_letter_rejected
        )
        self.sensors = comp.processor.sensors
        self.scores_topic, self.dlq_topic, self.measurement = s.scores_topic, s.dlq_topic, s.influx_measurement
        self.drift = (
            DriftMonitor(
                reference=s.drift_reference,
                window=s.drift_window,
                check_every=max(1, s.drift_window // 4),
                bound=s.drift_bound,
                min_interval_s=s.drift_min_interval_s,
            )
            if s.drift_bound > 0
            else None
        )
        self.group_of = device_grouper(s.device_group_pattern)
        self._partitions: dict[str, list[int]] = {}
        self._partitioner = DefaultPartitioner()
        self._partition_of: dict[str, dict[bytes, int]] = {}  # topic -> key -> partition (scores: device ids)
        self._next_champion: Detector | None = None
        self._next_shadow: tuple[Detector | None] | None = None  # (None,) = stop the shadow
        self.cadence: CheckpointCadence[Message, Hole] = CheckpointCadence(s.checkpoint_interval_s)
        # From a rebalance's (or a stop's) wait for acknowledgements to the next assignment: every batch is
        # checkpointed at once, so the wait ends with the batches Faust had already handed out.
        self.draining = False
        self._writing: asyncio.Future[None] | None = None  # the last checkpoint's write and releases

    async def on_control(self, msg: dict[str, Any]) -> None:
        """``model-updated`` swaps the champion (fetched from the registry, or loaded from ``path``);
        ``{"type": "shadow", "path": DIR}`` (or ``"path": null``) starts (stops) a shadow model."""
        kind, path = msg.get("type"), msg.get("path")
        if kind == ctl.MODEL_UPDATED:
            version = msg.get("version")
            if version == self.c.processor.detector.version:
                return
            if not path and isinstance(version, str) and isinstance(msg.get("registry"), str):
                try:
                    path = str(await asyncio.to_thread(fetch_version, self.c.settings, msg["registry"], version))
                except (ArtifactError, OSError, KeyError, ValueError) as exc:
                    log.error(
                        "cannot fetch model %s from %s: %s; the current model keeps serving",
                        version,
                        msg["registry"],
                        exc,
                    )
                    self.c.metrics.model_load_failures.inc()
                    return
            detector = await self._load(path)
            if detector is not None:
                self._next_champion = detector
        elif kind == "shadow":
            shadow = await self._load(path) if path else None
            if shadow is not None or not path:
                self._next_shadow = (shadow,)

    async def _load(self, path: object) -> Detector | None:
        if not isinstance(path, str):
            log.error("control message without an artifact path: %r", path)
            self.c.metrics.model_load_failures.inc()
            return None
        try:
            # Loading and hashing the weights happens in a thread: consumption goes on meanwhile.
            return await asyncio.to_thread(build_detector, self.c.settings, Path(path))
        except (ArtifactError, OSError, ValueError) as exc:
            log.error("refusing model artifact %s: %s; the current model keeps serving", path, exc)
            self.c.metrics.model_load_failures.inc()
            return None

    async def _apply_swaps(self) -> None:
        """Between micro-batches: install a loaded champion or shadow (atomic per batch)."""
        m, proc = self.c.metrics, self.c.processor
        if self._next_champion is not None:
            # The swap marks every state stale, and a stale state is not checkpointed: write the old
            # model's states first, so that a crash restores (and re-warms) them rather than older ones.
            await self.flush_checkpoints(everything=True)
            await self._written()
            old = proc.detector.version
            proc.swap(self._next_champion)
            self._next_champion = None
            m.model_info.remove(old)
            m.model_info.labels(proc.detector.version).set(1)
            m.model_swaps.inc()
            if self.drift is not None:
                self.drift.reset()
            log.info("model %s -> %s (device states re-warm from history)", old, proc.detector.version)
        if self._next_shadow is not None:
            (shadow,) = self._next_shadow
            self._next_shadow = None
            m.shadow_info.clear()
            proc.set_shadow(shadow)
            if shadow is not None:
                m.shadow_info.labels(shadow.version).set(1)

    async def handle(self, events: Sequence[EventT]) -> None:
        batch = [
            Inbound(e.message.key, e.message.value or b"", e.message.topic, e.message.partition, e.message.offset)
            for e in events
        ]
        # Not acknowledged by take_batches: each message stays unacknowledged until the state it advances
        # is checkpointed (flush_checkpoints).
        messages = [e.message for e in events]
        async with self.busy:
            await self._process(*await self.holes.fill(batch), messages)

    async def process(self, batch: list[Inbound], holes: list[Hole]) -> None:
        await self._process(batch, holes, [])

    async def _process(self, batch: list[Inbound], holes: list[Hole], messages: list[Message]) -> None:
        m = self.c.metrics
        m.messages.inc(len(batch))
        m.batch_size.observe(len(batch))
        await self._apply_swaps()
        t0 = time.perf_counter()
        res = self.c.processor.process(batch, int(time.time() * 1000))
        m.step_seconds.observe(time.perf_counter() - t0)
        await self.emit(res)
        # Held only now, once processed: every flush before this point (a swap's) leaves them unacknowledged.
        self.cadence.add(res.dirty, holes, messages)
        if self.draining:
            await self.flush_checkpoints(everything=True)
        elif self._checkpoint_due():
            await self.flush_checkpoints()

    async def flush_idle(self) -> None:
        await self.sweep()
        async with self.busy:
            await self._apply_swaps()
            res = self.c.processor.flush_idle(int(time.time() * 1000))
            if res.scores or res.dirty:
                await self.emit(res)
                self.cadence.add(res.dirty)
            if self._checkpoint_due():
                await self.flush_checkpoints()

    def _checkpoint_due(self) -> bool:
        # Not while the last checkpoint is being written: it may wait for InfluxDB, and the readings must not.
        return self.cadence.due() and (self._writing is None or self._writing.done())

    async def drain(self) -> None:
        """Faust waits for every delivered message to be acknowledged (a rebalance, a stop): checkpoint and
        release everything now, and every batch at once until partitions are assigned again."""
        self.draining = True
        async with self.busy:
            await self.flush_checkpoints(everything=True)
            await self._written()

    async def flush_checkpoints(self, everything: bool = False) -> None:
        """Checkpoint the devices the cadence hands over (``everything``: every device advanced since the
        last checkpoint), then release what waited for them: the messages' acknowledgements (Faust commits
        their offsets) and the offset holes repaired meanwhile.

        Serialising the states, writing them and the releases go on in the background, a chunk of devices
        at a time, while the next batches are processed: a checkpoint of every device of a fleet is
        megabytes, and doing it in one go stalled every reading that arrived meanwhile. A state serialised
        later than now is only further ahead than the messages released with it, which is safe (replays up
        to a device's checkpointed offset are skipped). One checkpoint at a time, in order: the next waits
        for this one, so a failed write fails the agent there. Call it under ``busy``."""
        await self._written()
        self._writing = asyncio.ensure_future(
            self._write(self.cadence.take(everything), self.sink.written(), time.perf_counter())
        )

    async def _written(self) -> None:
        writing, self._writing = self._writing, None
        if writing is not None:
            await writing

    async def _write(self, pending: Pending[Message, Hole], points: Awaitable[None], t0: float) -> None:
        """Each device's state to the changelog partition numbered like its readings partition
        (co-partitioning by construction, whatever the partitioner), then, once the InfluxDB points queued
        before the checkpoint are written too, the releases."""
        records = await serialise(self.c.processor.checkpoint, pending.devices)
        if records:
            await write_checkpoints(self.c.app, self.c.table, records)
            self.c.metrics.checkpoints.inc(len(records))
        await points
        consumer = self.c.app.consumer
        for message in pending.acks:
            message.ack(consumer)
        await self.holes.release(pending.holes)
        self.c.metrics.checkpoint_seconds.observe(time.perf_counter() - t0)

    async def emit(self, res: BatchResult) -> None:
        m = self.c.metrics
        pending: list[Awaitable[Any]] = []
        if res.dead:
            pending.extend(await self._send_dead_letters(res.dead))
            for d in res.dead:
                m.dead_letters.labels(d.reason).inc()
        if res.scores:
            ts_s = np.fromiter((r.ts_ms for r in res.scores), np.float64, len(res.scores)) / 1000
            await self._write_points([score_line(r, self.sensors, self.measurement) for r in res.scores], ts_s)
            now = time.time()
            now_ms = int(now * 1000)
            records = [(r.device_id.encode(), score_json(r, self.sensors, now_ms)) for r in res.scores]
            pending.extend(await self._send_batched(self.scores_topic, records))
            m.latency.observe_many(np.maximum(0.0, now - ts_s))
            m.scored.inc(len(res.scores))
            m.anomalies.inc(sum(r.is_anomaly for r in res.scores))
        if self.drift is not None and res.scores:
            await self._watch_drift(res)
        if res.shadow_scores:
            # Shadow scores only go to their own measurement: never to the scores topic or alerts.
            shadow_measurement = f"{self.measurement}_shadow"
            await self._write_points([score_line(r, self.sensors, shadow_measurement) for r in res.shadow_scores])
        if pending:
            await asyncio.gather(*pending)
        m.readings.inc(res.readings)
        m.late.inc(res.late)
        m.replayed.inc(res.replayed)
        m.imputed.inc(res.imputed)
        m.resets.inc(res.resets)
        if res.rewarmed:
            m.rewarmed.inc(res.rewarmed)
            m.rewarm_seconds.observe(res.rewarm_s)
        m.devices.set(len(self.c.processor.devices))
        if res.scores or res.dead:
            m.last_output.set(time.time())

    def _aio(self) -> AIOKafkaProducer:
        # Faust's Kafka producer wraps one aiokafka producer; its batch API is what we need here.
        return cast(FaustKafkaProducer, self.c.app.producer)._ensure_producer()

    async def _topic_partitions(self, topic: str) -> list[int]:
        parts = self._partitions.get(topic)
        if parts is None:
            parts = self._partitions[topic] = sorted(await self._aio().partitions_for(topic))
        return parts

    async def _write_points(self, lines: list[str], ts_s: np.ndarray | None = None) -> None:
        """Queue points for InfluxDB, written behind the scores (retried until written); waits only while
        the write-behind buffer is full, which is the backpressure. ``ts_s``: the readings' timestamps, for
        the InfluxDB latency histogram."""
        m = self.c.metrics
        done = await self.sink.submit(lines)
        m.sink_pending.set(self.sink.pending_lines)

        def written(f: asyncio.Future[None]) -> None:
            m.sink_pending.set(self.sink.pending_lines)
            if f.cancelled() or f.exception() is not None:
                return
            now = time.time()
            if ts_s is not None:
                m.influx_latency.observe_many(np.maximum(0.0, now - ts_s))
            m.last_output.set(now)

        done.add_done_callback(written)

    async def _dead_letter_rejected(self, exc: InfluxRejectedError) -> None:
        """Points InfluxDB refuses for good (a field type conflict, a cardinality limit), which no retry can
        help, go to the DLQ with its reason; the rest was written."""
        log.error("InfluxDB refused %d points for good, dead-lettered: %s", len(exc.lines), exc.body[:500])
        dead = [
            DeadLetter(None, line.encode(), INFLUX_REJECTED, exc.body[:1000], self.measurement, 0, -1)
            for line in exc.lines
        ]
        self.c.metrics.dead_letters.labels(INFLUX_REJECTED).inc(len(dead))
        await asyncio.gather(*await self._send_dead_letters(dead))

    async def _send_dead_letters(self, dead: list[DeadLetter]) -> list[Awaitable[Any]]:
        """Dead letters as record batches, each to the DLQ partition numbered like its source partition
        (modulo the DLQ's partition count).

        One Faust send per dead letter cost the worker about twice a valid reading's whole processing, and the default
        partitioner hashes the key in pure-Python murmur2 (~13 ms per 100 KB): bad input can carry huge keys.
        """
        parts = await self._topic_partitions(self.dlq_topic)
        by_partition: dict[int, list[Record]] = {}
        for d in dead:
            by_partition.setdefault(parts[d.partition % len(parts)], []).append((d.key, d.value, d.headers()))
        return await send_batches(
            self._aio(), self.dlq_topic, by_partition, compression=self.c.settings.dlq_compression
        )

    async def _send_batched(self, topic: str, records: list[tuple[bytes, bytes]]) -> list[Awaitable[Any]]:
        """Keyed records as record batches, each to the partition every Kafka client's default partitioner
        (murmur2 of the key) would choose."""
        parts = await self._topic_partitions(topic)
        # murmur2 in pure Python costs ~1.6 us a key; a device's partition never changes.
        cache = self._partition_of.setdefault(topic, {})
        by_partition: dict[int, list[Record]] = {}
        for key, value in records:
            partition = cache.get(key)
            if partition is None:
                partition = cache[key] = self._partitioner(key, parts, parts)
            by_partition.setdefault(partition, []).append((key, value, []))
        return await send_batches(self._aio(), topic, by_partition)

    async def _watch_drift(self, res: BatchResult) -> None:
        """Feed the forecaster's errors (normalised units) per device group; publish a retrain request
        on the control topic when their distribution drifts (rate-limited per group)."""
        assert self.drift is not None
        if not res.forecast_errors:
            return
        errors = np.concatenate([e.error for e in res.forecast_errors])
        rows: dict[str, list[int]] = {}
        for i, device in enumerate(d for e in res.forecast_errors for d in e.devices):
            rows.setdefault(self.group_of(device), []).append(i)
        for group, idx in rows.items():
            value = self.drift.update(group, errors[idx])
            self.c.metrics.drift_psi.labels(group).set(self.drift.groups[group].last_psi)
            if value is not None:
                reason = f"forecast-error drift in device group {group!r}: PSI {value:.3f} > {self.drift.bound}"
                log.warning("%s: requesting a retrain", reason)
                message = ctl.encode(ctl.retrain_request(reason))
                await self.c.app.producer.send(
                    self.c.settings.control_topic, b"retrain-request", message, 0, None, None
                )
                self.c.metrics.retrain_requests.labels(group).inc()


def register(comp: Components) -> ScoringService:
    svc = ScoringService(comp)
    s = comp.settings
    app = comp.app
    app.before_wait_empty.append(svc.drain)

    @app.agent(comp.readings, name="iotad-score")
    async def score(stream: StreamT[bytes]) -> None:
        async for events in take_batches(cast(faust.Stream[bytes], stream), s.batch_max, s.batch_within_s):
            await svc.handle(events)

    @app.task
    async def control() -> None:
        await ctl.follow(s.kafka_bootstrap, s.control_topic, svc.on_control)

    @app.timer(interval=max(0.1, s.idle_flush_ms / 2000))
    async def flush_idle() -> None:
        await svc.flush_idle()

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]  # mode's signal stubs reject async
    async def on_revoked(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        revoked: set[TP] = args[0] if args else kwargs.get("revoked", set())
        # Faust's wait for acknowledgements has let every checkpoint finish; this makes sure of it (no
        # state of a revoked device may be serialised after it is forgotten).
        await svc.drain()
        svc.holes.on_revoked(revoked)
        parts = {tp.partition for tp in revoked if tp.topic == svc.readings_topic}
        if parts:
            log.info("partitions %s revoked: dropping cached device state", sorted(parts))
            comp.processor.forget(parts)

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]  # mode's signal stubs reject async
    async def on_assigned(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        assigned: set[TP] = args[0] if args else kwargs.get("assigned", set())
        comp.metrics.assigned.set(sum(1 for tp in assigned if tp.topic == svc.readings_topic))
        svc.draining = False
        await svc.holes.on_assigned(assigned)

    @app.on_before_shutdown.connect  # type: ignore[arg-type]  # mode's signal stubs reject async
    async def close_reader(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        await svc.reader.stop()

    return svc
