"""The ceiling for the Faust worker: the same work in a lean aiokafka loop, no Faust.

consume (getmany) -> the same :class:`~pipeline.processor.Processor` (decode, validate, window, ONE
batched model step per wave) -> the same InfluxDB sink, written behind (``WriteBehindSink``) -> scores
produced in one batch per micro-batch -> the worker's checkpoint cadence (``pipeline.cadence``: each device
advanced once per ``checkpoint_interval_s``, a slice at a time), the same records, as record batches, plus
the end marker per partition, to a changelog topic of its own -> once the points queued before are
written, commit the offsets of the batches covered. What it leaves out is Faust: events, acks, streams,
tables.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from connectors.influx import RetryingSink, WriteBehindSink, make_writer
from connectors.kafka_admin import create_topics
from connectors.kafka_batches import RECORD_BATCH_BYTES, Record, send_batches, send_checkpoints
from connectors.kafka_security import KafkaSecurity
from pipeline.app import build_detector, build_processor, freeze_startup_objects
from pipeline.cadence import CheckpointCadence, Pending, serialise
from pipeline.processor import Inbound
from pipeline.records import score_json, score_line
from pipeline.settings import Settings


async def run_lean(settings: Settings, topic: str, expected_scores: int, timeout_s: float = 300.0) -> float:
    """Consume ``topic`` from the beginning until ``expected_scores`` are written; readings/s from the first
    message to the last score written (to the scores topic and InfluxDB), as the worker's rate is measured
    (the last checkpoint follows)."""
    processor = build_processor(settings, build_detector(settings))
    freeze_startup_objects()  # as the worker does once started
    security = KafkaSecurity.from_settings(settings).aiokafka()
    sensors = processor.sensors
    sink = WriteBehindSink(
        RetryingSink(
            make_writer(settings.influx_version, settings.influx_url, settings.influx_database, settings.influx_org, "")
        ),
        max_pending_lines=settings.influx_max_pending_lines,
    )
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=f"lean-{topic}-{time.monotonic_ns()}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        max_partition_fetch_bytes=8 * 1024 * 1024,
        **security,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, linger_ms=5, max_batch_size=RECORD_BATCH_BYTES, **security
    )
    changelog = f"{settings.topic_prefix}.changelog"
    await asyncio.to_thread(create_topics, settings.kafka_bootstrap, {changelog: settings.partitions})
    await consumer.start()
    await producer.start()
    # Each batch's acknowledgement is the offsets it consumed up to; a checkpoint commits the newest it covers.
    cadence: CheckpointCadence[dict[TopicPartition, int], None] = CheckpointCadence(settings.checkpoint_interval_s)
    writing: asyncio.Future[None] | None = None

    async def write(pending: Pending[dict[TopicPartition, int], None], points: Awaitable[None]) -> None:
        await send_checkpoints(producer, changelog, await serialise(processor.checkpoint, pending.devices))
        await points
        offsets: dict[TopicPartition, int] = {}
        for consumed in pending.acks:
            offsets |= consumed
        if offsets:
            await consumer.commit(offsets)

    async def checkpoint(everything: bool = False) -> None:
        # As the worker does: serialised in chunks and written (then committed) in the background, one
        # checkpoint at a time, while the next batches are processed.
        nonlocal writing
        if writing is not None:
            await writing
        writing = asyncio.ensure_future(write(cadence.take(everything), sink.written()))

    scored, t0, t_end = 0, None, 0.0

    def points_written(_: asyncio.Future[None]) -> None:
        nonlocal t_end
        t_end = time.perf_counter()

    deadline = time.monotonic() + timeout_s
    try:
        while scored < expected_scores and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200, max_records=settings.batch_max)
            msgs = [
                Inbound(m.key, m.value or b"", m.topic, m.partition, m.offset) for ms in batches.values() for m in ms
            ]
            if not msgs:
                continue
            if t0 is None:
                t0 = time.perf_counter()
            res = processor.process(msgs, int(time.time() * 1000))
            if res.scores:
                done = await sink.submit([score_line(r, sensors, settings.influx_measurement) for r in res.scores])
                done.add_done_callback(points_written)
                now_ms = int(time.time() * 1000)
                scores: list[Record] = [(r.device_id.encode(), score_json(r, sensors, now_ms), []) for r in res.scores]
                await asyncio.gather(*await send_batches(producer, settings.scores_topic, {0: scores}))
            t_end = time.perf_counter()
            scored += len(res.scores)
            cadence.add(res.dirty, acks=[{tp: ms[-1].offset + 1 for tp, ms in batches.items() if ms}])
            if cadence.due() and (writing is None or writing.done()):
                await checkpoint()
        await checkpoint(everything=True)
        if writing is not None:
            await writing
    finally:
        await consumer.stop()
        await producer.stop()
        await sink.close()
    elapsed = t_end - (t0 or 0.0)
    return scored / elapsed if elapsed > 0 else 0.0
