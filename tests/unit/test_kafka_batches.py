"""Which dead letters are worth compressing, and the batches compressed in lz4's fast mode (the record
batches are checked against a broker in tests/integration/test_kafka_batches.py)."""

from __future__ import annotations

import random

import msgspec
import pytest
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch

from connectors.kafka_batches import PROBE_MIN_BYTES, RECORD_BATCH_BYTES, Lz4FastBatch, compresses, lz4_fast


def test_a_large_value_is_compressed_only_if_its_sample_shrinks() -> None:
    rng = random.Random(3)
    assert not compresses(rng.randbytes(1_048_600))  # noise: gzip or LZ4 HC would spend ~20 ms on it for nothing
    assert not compresses(rng.randbytes(PROBE_MIN_BYTES))
    assert compresses(b"a" * 1_048_600)  # the padding of an oversized message
    readings = [{"device_id": f"dev-{i:04d}", "ts": 1_765_000_000_000 + i, "values": {"t": i / 7}} for i in range(3000)]
    assert compresses(msgspec.json.encode(readings))
    # noise around a compressible middle is judged by the middle (one sample, a few µs)
    assert compresses(rng.randbytes(100_000) + b"x" * 100_000 + rng.randbytes(100_000))


def test_small_values_are_not_probed() -> None:
    rng = random.Random(4)
    assert compresses(rng.randbytes(PROBE_MIN_BYTES - 1))  # a batch of small records compresses as a whole
    assert compresses(b"")
    assert compresses(None)


def test_a_fast_lz4_batch_reads_back_as_the_same_records_with_a_valid_crc() -> None:
    records = [
        (b"dev-1", b'{"device_id":"dev-1","ts":"x"}', [("iotad-reason", b"bad_schema")]),
        (None, b"a" * 300_000, []),
        (b"k" * 70_000, bytes(range(256)) * 40, [("iotad-reason", b"oversized"), ("iotad-error", b"\xff")]),
    ]
    fast, plain = Lz4FastBatch(RECORD_BATCH_BYTES), BatchBuilder(RECORD_BATCH_BYTES, DefaultRecordBatch.CODEC_NONE)
    for key, value, headers in records:
        for b in (fast, plain):
            assert b.append(key=key, value=value, timestamp=1_765_000_000_000, headers=headers) is not None
    built = fast._build()
    assert built is fast._build()  # built once: aiokafka asks again for its size
    batch = DefaultRecordBatch(bytes(built))
    assert batch.compression_type == DefaultRecordBatch.CODEC_LZ4
    assert batch.validate_crc()
    assert int.from_bytes(built[8:12], "big") == len(built) - 12  # the length counts what follows it
    assert len(built) < 20_000 < len(plain._build())
    assert [(r.key, r.value, list(r.headers), r.offset) for r in batch] == [
        (k, v, h, i) for i, (k, v, h) in enumerate(records)
    ]
    # everything but the records, their length, codec and CRC is the uncompressed batch's
    raw = DefaultRecordBatch(bytes(plain._build()))
    for field in ("base_offset", "magic", "timestamp_type", "producer_id", "next_offset", "is_transactional"):
        assert getattr(batch, field) == getattr(raw, field)


def test_lz4_fast_refuses_a_compressed_batch() -> None:
    b = BatchBuilder(RECORD_BATCH_BYTES, DefaultRecordBatch.CODEC_GZIP)
    b.append(key=None, value=b"x" * 1000, timestamp=None, headers=[])
    with pytest.raises(ValueError, match="already compressed"):
        lz4_fast(b._build())
