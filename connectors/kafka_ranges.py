"""Exact offset ranges and committed offsets of a topic's partitions, outside a consumer group's fetch loop.

The scoring worker and the alerter use this to repair a hole in what Faust delivered (see
``pipeline.holes``): it asks where its group's committed offsets stand when partitions are
assigned, and re-reads ``[start, end)`` of a partition when an offset went missing. One aiokafka
consumer with the group's id but no subscription: it never joins the group, never commits, and
assigning partitions to it does not disturb the group's own consumer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from connectors.kafka_security import KafkaSecurity, security_for

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RangeRecord:
    """A re-read record, with the attributes of a consumed message (so an agent can take it as one)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


class PartitionReader:
    """Committed offsets of ``group_id`` and exact ranges of offsets, for one bootstrap cluster."""

    def __init__(self, bootstrap: str, group_id: str, *, security: KafkaSecurity | None = None) -> None:
        self._config = {
            "bootstrap_servers": bootstrap,
            "group_id": group_id,
            "client_id": f"{group_id}-range-reader",
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            # Large enough for any message a producer may send (see pipeline.app.MAX_FETCH_BYTES).
            "max_partition_fetch_bytes": 8 * 1024 * 1024,
            "fetch_max_bytes": 16 * 1024 * 1024,
            **security_for(bootstrap, security).aiokafka(),
        }
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()  # one assignment at a time on the shared consumer

    async def _started(self) -> AIOKafkaConsumer:
        # Created on first use: aiokafka clients bind to the running event loop.
        if self._consumer is None:
            consumer = AIOKafkaConsumer(**self._config)
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def next_offsets(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        """The offset the group reads next on each partition: its committed offset, or the partition's
        first offset where nothing is committed (the worker's ``auto_offset_reset`` is earliest)."""
        tps = [TopicPartition(topic, p) for p in sorted(set(partitions))]
        if not tps:
            return {}
        async with self._lock:
            consumer = await self._started()
            out: dict[int, int] = {}
            missing: list[TopicPartition] = []
            for tp in tps:
                committed = await consumer.committed(tp)
                if committed is None or committed < 0:
                    missing.append(tp)
                else:
                    out[tp.partition] = committed
            if missing:
                first = await consumer.beginning_offsets(missing)
                out.update({tp.partition: first[tp] for tp in missing})
            return out

    async def read(self, topic: str, partition: int, start: int, end: int, *, timeout_s: float) -> list[RangeRecord]:
        """Every record with ``start <= offset < end`` of one partition, in offset order.

        Offsets that hold no record (transaction markers, compacted or deleted records) are simply absent;
        raises :class:`TimeoutError` if the reader has not got past ``end - 1`` within ``timeout_s``.
        """
        tp = TopicPartition(topic, partition)
        deadline = time.monotonic() + timeout_s
        records: list[RangeRecord] = []
        async with self._lock:
            consumer = await self._started()
            consumer.assign([tp])
            consumer.seek(tp, start)
            while await consumer.position(tp) < end:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{topic}[{partition}]: offsets {start}..{end - 1} not read in {timeout_s} s")
                batch = await consumer.getmany(tp, timeout_ms=int(min(left, 1.0) * 1000))
                for r in batch.get(tp, []):
                    if start <= r.offset < end:
                        records.append(RangeRecord(topic, partition, r.offset, r.key, r.value, list(r.headers)))
            consumer.unsubscribe()
        return records
