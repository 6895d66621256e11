"""Produce records as one Kafka record batch per partition (aiokafka's batch API).

Sending through ``send()`` one record at a time costs about three times more client CPU per record
(``../shared/PERF-NOTES.md``: ~22 µs vs ~8 µs); the worker's high-volume outputs (scores, dead letters,
state checkpoints) all go out this way, to partitions the caller chose.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Mapping
from typing import Any

from aiokafka import AIOKafkaProducer

Headers = list[tuple[str, bytes]]  # aiokafka's C batch builder takes a list only
Record = tuple[bytes | None, bytes | None, Headers]


async def send_batches(
    producer: AIOKafkaProducer, topic: str, by_partition: Mapping[int, Iterable[Record]]
) -> list[Awaitable[Any]]:
    """Queue each partition's records as record batches (a full batch is sent and a new one started);
    returns the delivery futures, to be awaited by the caller. A fresh batch takes any single record, so an
    oversized record still goes out whole (up to the producer's ``max_request_size``)."""
    futures: list[Awaitable[Any]] = []
    for partition, records in by_partition.items():
        batch = producer.create_batch()
        for key, value, headers in records:
            if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None, headers=headers)
        futures.append(await producer.send_batch(batch, topic, partition=partition))
    return futures
