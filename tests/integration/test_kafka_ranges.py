"""PartitionReader against a real broker: committed offsets of a group, and exact offset ranges."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from connectors.kafka_admin import create_topics, make_producer
from connectors.kafka_ranges import PartitionReader
from connectors.localstack import Tansu

pytestmark = pytest.mark.integration


def _fill(bootstrap: str, topic: str, per_partition: int) -> None:
    create_topics(bootstrap, {topic: 2})
    producer = make_producer(bootstrap)
    for p in (0, 1):
        for i in range(per_partition):
            producer.send(topic, key=f"k{p}".encode(), value=f"{p}:{i}".encode(), partition=p)
    producer.flush()
    producer.close()


async def _commit(bootstrap: str, group: str, topic: str, offsets: dict[int, int]) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in offsets]
        consumer.assign(tps)
        await consumer.commit({TopicPartition(topic, p): OffsetAndMetadata(o, "") for p, o in offsets.items()})
    finally:
        await consumer.stop()


def test_next_offsets_and_exact_ranges(tansu: Tansu, unique_name: Callable[[str], str]) -> None:
    topic, group = unique_name("ranges"), unique_name("group")
    _fill(tansu.bootstrap, topic, 30)

    async def run() -> None:
        await _commit(tansu.bootstrap, group, topic, {0: 12})
        reader = PartitionReader(tansu.bootstrap, group)
        try:
            # partition 1 has nothing committed: the group would start at its first offset
            assert await reader.next_offsets(topic, {0, 1}) == {0: 12, 1: 0}
            got = await reader.read(topic, 0, 5, 17, timeout_s=10)
            assert [r.offset for r in got] == list(range(5, 17))
            assert [r.value for r in got] == [f"0:{i}".encode() for i in range(5, 17)]
            assert all(r.partition == 0 and r.key == b"k0" for r in got)
            # the reader moves on to another partition, and back, with exact results each time
            assert [r.value for r in await reader.read(topic, 1, 29, 30, timeout_s=10)] == [b"1:29"]
            assert [r.offset for r in await reader.read(topic, 0, 0, 2, timeout_s=10)] == [0, 1]
            # it never commits: the group's position is unchanged
            assert await reader.next_offsets(topic, {0}) == {0: 12}
        finally:
            await reader.stop()

    asyncio.run(run())


def test_range_beyond_the_end_times_out(tansu: Tansu, unique_name: Callable[[str], str]) -> None:
    topic = unique_name("ranges")
    _fill(tansu.bootstrap, topic, 3)

    async def run() -> None:
        reader = PartitionReader(tansu.bootstrap, unique_name("group"))
        try:
            with pytest.raises(TimeoutError):
                await reader.read(topic, 0, 0, 10, timeout_s=1.5)
        finally:
            await reader.stop()

    asyncio.run(run())
