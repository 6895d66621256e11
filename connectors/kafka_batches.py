"""Produce records as one Kafka record batch per partition (aiokafka's batch API).

Sending through ``send()`` one record at a time costs about three times more client CPU per record
(``../shared/PERF-NOTES.md``: ~22 µs vs ~8 µs); the worker's high-volume outputs (scores, dead letters,
state checkpoints) all go out this way, to partitions the caller chose.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any, Literal

import cramjam
from aiokafka import AIOKafkaProducer
from aiokafka.codec import lz4_encode
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBase, DefaultRecordBatch
from aiokafka.record.util import calc_crc32c

# The producer's record batch size (``max_batch_size``; Faust's ``producer_max_batch_size``): just under
# what a default Kafka broker accepts in one batch (``message.max.bytes`` 1,048,588). Per partition the
# producer has one batch in flight at a time, so with the clients' 16 KiB default a micro-batch's
# checkpoints (~1.2 KiB each) went out 13 to a batch, one produce round trip after another.
RECORD_BATCH_BYTES = 1_000_000

# Codecs both clients read with this project's dependencies (lz4: cramjam for aiokafka, lz4 for kafka-python).
Compression = Literal["none", "gzip", "lz4"]
# aiokafka's codec ids (its producer takes one compression for all it sends; these batches choose their
# own); lz4 batches are :class:`Lz4FastBatch`.
_CODECS: dict[Compression, int] = {"none": DefaultRecordBatch.CODEC_NONE, "gzip": DefaultRecordBatch.CODEC_GZIP}

Headers = list[tuple[str, bytes]]  # aiokafka's C batch builder takes a list only
Record = tuple[bytes | None, bytes | None, Headers]

# Input that does not compress (random or already compressed bytes, a misrouted binary blob) costs gzip
# ~24 ms per MB, LZ4 HC ~18 ms and even lz4's fast mode ~0.5 ms, in the event loop's thread, for no gain
# (runs of one byte: 2.7, 0.25 and 0.15 ms). So a value this large is probed first, by lz4's fast mode on a
# sample from its middle (a few µs), and a record whose value or key does not shrink goes out uncompressed.
PROBE_MIN_BYTES = 64 * 1024
PROBE_BYTES = 16 * 1024
INCOMPRESSIBLE = 0.9  # compressed / sample at or above this: not worth compressing


def compresses(value: bytes | None) -> bool:
    """Whether ``value`` is worth compressing: small ones always, a large one if its sample shrinks."""
    if value is None or len(value) < PROBE_MIN_BYTES:
        return True
    start = (len(value) - PROBE_BYTES) // 2
    sample = memoryview(value)[start : start + PROBE_BYTES]
    return len(cramjam.lz4.compress_block(sample, store_size=False)) < INCOMPRESSIBLE * PROBE_BYTES


# lz4's fast mode, as librdkafka compresses by default. aiokafka uses level 9 (LZ4 HC), which costs ~32 ms
# per MB of small JSON dead letters and ~1 ms per MB of the bad-input benchmark's huge strings on this
# machine, against ~2 and ~0.26 ms in the fast mode, for compressed sizes of 0.28 instead of 0.36 of the
# small dead letters. Same frame format.
LZ4_FAST_LEVEL = 0
_HEADER = DefaultRecordBase.HEADER_STRUCT.size
_AFTER_LENGTH = DefaultRecordBase.AFTER_LEN_OFFSET  # the batch length counts the bytes after its own field
_LENGTH = struct.Struct(">i")
_ATTRIBUTES = struct.Struct(">h")
_CRC = struct.Struct(">I")


def lz4_fast(batch: bytes | bytearray) -> bytearray:
    """An uncompressed v2 record batch with its records compressed by lz4's fast mode: the header's length,
    codec bits and CRC (crc32c of everything from the attributes on) rewritten, the rest as it was."""
    (attributes,) = _ATTRIBUTES.unpack_from(batch, DefaultRecordBase.ATTRIBUTES_OFFSET)
    if attributes & DefaultRecordBase.CODEC_MASK:
        raise ValueError("the record batch is already compressed")
    out = bytearray(memoryview(batch)[:_HEADER])
    out += lz4_encode(bytes(memoryview(batch)[_HEADER:]), level=LZ4_FAST_LEVEL)  # the codec takes bytes only
    _LENGTH.pack_into(out, _AFTER_LENGTH - _LENGTH.size, len(out) - _AFTER_LENGTH)
    _ATTRIBUTES.pack_into(out, DefaultRecordBase.ATTRIBUTES_OFFSET, attributes | DefaultRecordBase.CODEC_LZ4)
    _CRC.pack_into(out, DefaultRecordBase.CRC_OFFSET, calc_crc32c(out[DefaultRecordBase.ATTRIBUTES_OFFSET :]))
    return out


class Lz4FastBatch(BatchBuilder):
    """A batch that aiokafka builds uncompressed and this module compresses in lz4's fast mode (:func:`lz4_fast`)
    when the producer takes its bytes; records are appended, and the batch fills, as in any batch."""

    def __init__(self, batch_size: int) -> None:
        super().__init__(batch_size, DefaultRecordBatch.CODEC_NONE)
        self._compressed: bytearray | None = None

    def _build(self) -> bytearray:  # where aiokafka takes a batch's bytes from, and its size once built
        if self._compressed is None:
            self._compressed = self._buffer = lz4_fast(super()._build())
        return self._compressed


async def send_batches(
    producer: AIOKafkaProducer,
    topic: str,
    by_partition: Mapping[int, Iterable[Record]],
    *,
    compression: Compression | None = None,
) -> list[Awaitable[Any]]:
    """Queue each partition's records as record batches (a full batch is sent and a new one started);
    returns the delivery futures, to be awaited by the caller. A fresh batch takes any single record, so an
    oversized record still goes out whole (up to the producer's ``max_request_size``). ``compression``
    overrides the producer's own for these batches (None: the producer's); a record with a large value or
    key that does not compress (:func:`compresses`) goes in an uncompressed batch instead, in its place in
    the partition's order."""

    def new_batch(codec: Compression | None) -> BatchBuilder:
        if codec is None:
            return producer.create_batch()
        if codec == "lz4":
            return Lz4FastBatch(RECORD_BATCH_BYTES)
        return BatchBuilder(RECORD_BATCH_BYTES, _CODECS[codec])

    probe = compression not in (None, "none")
    futures: list[Awaitable[Any]] = []
    for partition, records in by_partition.items():
        codec = compression
        batch = new_batch(codec)
        for key, value, headers in records:
            want = compression if not probe or (compresses(value) and compresses(key)) else "none"
            if want != codec:  # a batch in the other codec, after the records before it
                if batch.record_count():
                    futures.append(await producer.send_batch(batch, topic, partition=partition))
                codec, batch = want, new_batch(want)
            if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = new_batch(codec)
                batch.append(key=key, value=value, timestamp=None, headers=headers)
        futures.append(await producer.send_batch(batch, topic, partition=partition))
    return futures


CHANGELOG_MARKER = b"\x00checkpoint"


async def send_checkpoints(producer: AIOKafkaProducer, topic: str, records: Mapping[bytes, tuple[int, bytes]]) -> None:
    """State checkpoints ``key -> (partition, blob)`` to a changelog topic, awaited, then one end marker alone
    in its batch on each touched partition.

    Tansu 0.6 reports a partition's high watermark as the base offset of its last record batch + 1, so a
    reader that stops at the high watermark (Faust's table recovery) would miss the rest of a batched
    checkpoint; the lone trailing marker makes that watermark exact. Harmless on Kafka: the marker key is
    no valid device id and nothing reads it.
    """
    by_partition: dict[int, list[Record]] = {}
    for key, (partition, blob) in records.items():
        by_partition.setdefault(partition, []).append((key, blob, []))
    await asyncio.gather(*await send_batches(producer, topic, by_partition))
    markers: dict[int, list[Record]] = {p: [(CHANGELOG_MARKER, b"", [])] for p in by_partition}
    await asyncio.gather(*await send_batches(producer, topic, markers))
