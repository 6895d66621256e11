"""Which dead letters are worth compressing (the record batches themselves are checked against a broker
in tests/integration/test_kafka_batches.py)."""

from __future__ import annotations

import random

import msgspec

from connectors.kafka_batches import PROBE_MIN_BYTES, compresses


def test_a_large_value_is_compressed_only_if_its_sample_shrinks() -> None:
    rng = random.Random(3)
    assert not compresses(rng.randbytes(1_048_600))  # noise: LZ4 HC would spend ~15 ms on it for nothing
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
