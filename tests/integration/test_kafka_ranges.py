"""PartitionReader against a real broker: committed offsets of a group, exact offset ranges, and the hole repair
built on them (pipeline.holes)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import cast

import faust
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import OffsetAndMetadata, TopicPartition
from faust.types import TP
from prometheus_client import CollectorRegistry, Counter

from connectors.kafka_admin import create_topics, make_producer
from connectors.kafka_ranges import PartitionReader, RangeRecord
from connectors.localstack import Tansu
from pipeline.holes import HoleRepair

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


class _GapConsumer:
    """Faust's consumer as the repair sees it: the offsets it is told need no ack."""

    def __init__(self) -> None:
        self.gaps: list[tuple[TP, int, int]] = []

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        self.gaps.append((tp, offset_from, offset_to))


def test_hole_repair_splices_the_skipped_records_in_and_releases_them(
    tansu: Tansu, unique_name: Callable[[str], str]
) -> None:
    """What the worker and the alerter do with a batch in which Faust skipped offsets (pipeline.holes)."""
    topic, group = unique_name("holes"), unique_name("group")
    _fill(tansu.bootstrap, topic, 10)
    producer = make_producer(tansu.bootstrap)
    producer.send(topic, key=b"k0", value=b"0:10", partition=0, headers=[("iotad-redrive-receiver", b"hook")])
    producer.flush()
    producer.close()
    consumer = _GapConsumer()
    app = cast(faust.App, SimpleNamespace(consumer=consumer))
    refetched = Counter("holes_refetched", "re-read records", registry=CollectorRegistry())

    async def run() -> None:
        await _commit(tansu.bootstrap, group, topic, {0: 2})
        reader = PartitionReader(tansu.bootstrap, group)
        holes = HoleRepair[RangeRecord](app, reader, topic, lambda r: r, refetched)
        try:
            await holes.on_assigned({TP(topic, 0), TP(topic, 1), TP("other", 0)})
            # Faust delivered partition 0 from offset 4 (2 and 3 skipped), partition 1 whole, then 0's 7 and 10
            # (5, 6, 8 and 9 skipped): each hole is re-read and spliced in before the message that revealed it.
            delivered = [
                r
                for p, lo, hi in ((0, 4, 5), (1, 0, 2), (0, 7, 8), (0, 10, 11))
                for r in await reader.read(topic, p, lo, hi, timeout_s=10)
            ]
            batch, found = await holes.fill(delivered)
            assert [(r.partition, r.offset) for r in batch] == [
                (0, 2),
                (0, 3),
                (0, 4),
                (1, 0),
                (1, 1),
                (0, 5),
                (0, 6),
                (0, 7),
                (0, 8),
                (0, 9),
                (0, 10),
            ]
            assert [r.value for r in batch if r.partition == 0] == [f"0:{i}".encode() for i in range(2, 11)]
            assert batch[-1].headers == [("iotad-redrive-receiver", b"hook")] and batch[-1].topic == topic
            assert refetched._value.get() == 6
            assert consumer.gaps == []  # released only once the batch's results are written
            await holes.release(found)
            assert consumer.gaps == [(TP(topic, 0), 2, 3), (TP(topic, 0), 5, 6), (TP(topic, 0), 8, 9)]
            # a revoked partition is no longer tracked: what comes next is where it starts
            holes.on_revoked({TP(topic, 0)})
            again, more = await holes.fill(await reader.read(topic, 0, 9, 10, timeout_s=10))
            assert [r.offset for r in again] == [9] and more == []
        finally:
            await reader.stop()

    asyncio.run(run())


def test_hole_repair_finds_a_skipped_tail_once_the_agent_is_idle(
    tansu: Tansu, unique_name: Callable[[str], str]
) -> None:
    """A hole at a partition's tail: no later message reveals it, but the consumer's position is past it."""
    topic, group = unique_name("tails"), unique_name("group")
    _fill(tansu.bootstrap, topic, 10)
    consumer = _GapConsumer()
    app = cast(faust.App, SimpleNamespace(consumer=consumer, rebalancing=False))
    refetched = Counter("tails_refetched", "re-read records", registry=CollectorRegistry())
    grace = 0.3

    async def run() -> None:
        await _commit(tansu.bootstrap, group, topic, {0: 2, 1: 0})
        # Faust's fetcher: a real consumer that has been handed both partitions up to their ends
        fetcher = AIOKafkaConsumer(bootstrap_servers=tansu.bootstrap, enable_auto_commit=False)
        await fetcher.start()
        tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
        fetcher.assign([tp0, tp1])
        fetcher.seek(tp0, 2)
        fetcher.seek(tp1, 0)
        for _ in range(50):
            if await fetcher.position(tp0) == 10 and await fetcher.position(tp1) == 10:
                break
            await fetcher.getmany(timeout_ms=200)
        assert (await fetcher.position(tp0), await fetcher.position(tp1)) == (10, 10)

        async def position(tp: TP) -> int:
            return int(await fetcher.position(TopicPartition(tp.topic, tp.partition)))

        consumer.position = position  # type: ignore[attr-defined]
        reader = PartitionReader(tansu.bootstrap, group)
        holes = HoleRepair[RangeRecord](app, reader, topic, lambda r: r, refetched, tail_grace_s=grace)
        try:
            await holes.on_assigned({tp0, tp1})
            # the agent got partition 0 up to offset 5 and partition 1 whole; 6..9 of partition 0 were dropped
            delivered = [
                r for p, lo, hi in ((0, 2, 6), (1, 0, 10)) for r in await reader.read(topic, p, lo, hi, timeout_s=10)
            ]
            assert (await holes.fill(delivered))[1] == []
            assert await holes.tails() == ([], [])  # the agent was just busy
            await asyncio.sleep(grace)
            assert await holes.tails() == ([], [])  # first sighting: records may still be on their way
            # offset 6 arrives after all: the agent is busy again, and the next sighting starts afresh
            assert (await holes.fill(await reader.read(topic, 0, 6, 7, timeout_s=10)))[1] == []
            await asyncio.sleep(grace)
            assert await holes.tails() == ([], [])
            await asyncio.sleep(grace)
            records, found = await holes.tails()
            assert [(r.partition, r.offset) for r in records] == [(0, 7), (0, 8), (0, 9)]
            assert [r.value for r in records] == [b"0:7", b"0:8", b"0:9"]
            assert [(h.partition, h.start, h.end) for h in found] == [(0, 7, 10)]
            assert refetched._value.get() == 3
            assert consumer.gaps == []
            await holes.release(found)
            assert consumer.gaps == [(TP(topic, 0), 7, 9)]
            # repaired: a late delivery of a re-read offset is a replay, and no further tail is found
            late, more = await holes.fill(await reader.read(topic, 0, 8, 9, timeout_s=10))
            assert [r.offset for r in late] == [8] and more == []
            for _ in range(3):
                await asyncio.sleep(grace)
                assert await holes.tails() == ([], [])
        finally:
            await reader.stop()
            await fetcher.stop()

    asyncio.run(run())
