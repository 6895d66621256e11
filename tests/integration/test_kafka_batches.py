"""Record batches against a real broker: how many batches a micro-batch's outputs take, and that they arrive."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.record.default_records import DefaultRecordBatch

from connectors.kafka_admin import create_topics, read_all
from connectors.kafka_batches import (
    CHANGELOG_MARKER,
    RECORD_BATCH_BYTES,
    Compression,
    Record,
    send_batches,
    send_checkpoints,
)
from connectors.localstack import Tansu
from pipeline.app import make_faust_app
from pipeline.settings import Settings

pytestmark = pytest.mark.integration

BLOB = b"s" * 1200  # about one device checkpoint


def test_a_micro_batch_of_checkpoints_is_one_record_batch_per_partition(
    tansu: Tansu, unique_name: Callable[[str], str]
) -> None:
    topic = unique_name("batches")
    create_topics(tansu.bootstrap, {topic: 2})

    async def batches(max_batch_size: int) -> int:
        producer = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap, max_batch_size=max_batch_size)
        await producer.start()
        try:
            records: list[Record] = [(f"d{i}".encode(), BLOB, []) for i in range(500)]
            futures = await send_batches(producer, topic, {0: records})
            await asyncio.gather(*futures)
            return len(futures)
        finally:
            await producer.stop()

    # The clients' 16 KiB default: 13 checkpoints a batch, and one batch in flight per partition at a time.
    assert asyncio.run(batches(16384)) == 39
    assert asyncio.run(batches(RECORD_BATCH_BYTES)) == 1
    got = read_all(tansu.bootstrap, topic, min_records=1000)
    assert len(got) == 1000 and all(r.value == BLOB for r in got)


def test_checkpoints_end_with_the_marker_and_faust_apps_use_the_batch_size(
    tansu: Tansu, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    topic = unique_name("changelog")
    create_topics(tansu.bootstrap, {topic: 1})

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap, max_batch_size=RECORD_BATCH_BYTES)
        await producer.start()
        try:
            await send_checkpoints(producer, topic, {f"d{i}".encode(): (0, BLOB) for i in range(300)})
        finally:
            await producer.stop()

    asyncio.run(run())
    got = read_all(tansu.bootstrap, topic, min_records=301)
    assert [r.key for r in got[:-1]] == [f"d{i}".encode() for i in range(300)]
    assert got[-1].key == CHANGELOG_MARKER
    app = make_faust_app(Settings(kafka_bootstrap=tansu.bootstrap, data_dir=tmp_path), unique_name("app"))
    assert app.conf.producer_max_batch_size == RECORD_BATCH_BYTES


@pytest.mark.parametrize("compression", ["lz4", "gzip", "none"])
def test_batches_in_their_own_compression_arrive_intact(
    tansu: Tansu, unique_name: Callable[[str], str], compression: Compression
) -> None:
    """The dead letters' case: a huge repetitive payload and key, a large key and a large value of random
    bytes, binary bytes, headers, no key."""
    topic = unique_name(f"codec-{compression}")
    create_topics(tansu.bootstrap, {topic: 2})
    noise = random.Random(7).randbytes(300_000)
    records: list[Record] = [
        (b"k" * 100_000, b"x" * 1_000_000, [("iotad-reason", b"oversized")]),
        (noise[:100_000], b"{}", [("iotad-reason", b"bad_device_id")]),
        (b"d0", noise, [("iotad-reason", b"bad_json")]),
        (None, bytes(range(256)), []),
        (b"d1", b"{}", [("iotad-reason", b"bad_schema"), ("iotad-error", b"\xff")]),
    ]
    built: list[bytes] = []

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap)  # no compression of its own
        await producer.start()
        send_batch = producer.send_batch

        async def keep(batch: Any, topic: str, *, partition: int) -> Any:
            future = await send_batch(batch, topic, partition=partition)
            built.append(batch._build())  # the bytes that went to the broker
            return future

        producer.send_batch = keep
        try:
            await asyncio.gather(
                *await send_batches(producer, topic, {0: records, 1: records[3:]}, compression=compression)
            )
        finally:
            await producer.stop()

    asyncio.run(run())
    codec = {"lz4": DefaultRecordBatch.CODEC_LZ4, "gzip": DefaultRecordBatch.CODEC_GZIP, "none": 0}[compression]
    codecs = [DefaultRecordBatch(b).compression_type for b in built]
    if compression == "none":  # the 1.1 MB record fills partition 0's first batch alone
        assert codecs == [0, 0, 0]
    else:  # the random bytes go uncompressed, in a batch of their own between the others
        assert codecs == [codec, 0, codec, codec]
        assert len(built[0]) < 50_000  # 1.1 MB of records
        assert len(built[1]) > len(noise) + 100_000
    got = read_all(tansu.bootstrap, topic, min_records=7)
    assert [(r.partition, r.key, r.value, list(r.headers.items())) for r in got] == [
        (p, k, v, h) for p, rs in ((0, records), (1, records[3:])) for k, v, h in rs
    ]
