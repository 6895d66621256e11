from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from pipeline.metrics import BatchHistogram


def exposition(registry: CollectorRegistry) -> tuple[list[str], float]:
    """The exposition's lines without ``_created`` and ``_sum``, and the sum (summed in another order)."""
    lines = generate_latest(registry).decode().splitlines()
    total = next(float(line.split()[1]) for line in lines if line.startswith("x_seconds_sum "))
    return [line for line in lines if "_created" not in line and "_sum " not in line], total


def test_batch_histogram_exposes_what_a_prometheus_histogram_would() -> None:
    buckets = (0.005, 0.01, 0.1, 1.0)
    reference, batched = CollectorRegistry(), CollectorRegistry()
    hist = Histogram("x_seconds", "doc", buckets=buckets, registry=reference)
    bulk = BatchHistogram("x_seconds", "doc", buckets, batched)
    rng = np.random.default_rng(3)
    # values on the bounds (le is inclusive), between them, beyond the last one, over several batches
    batches = [np.array([0.0, 0.005, 0.0051, 0.01, 1.0, 30.0]), rng.exponential(0.2, 500), np.array([])]
    for values in batches:
        for v in values.tolist():
            hist.observe(v)
        bulk.observe_many(values)
    bulk.observe(0.05)
    hist.observe(0.05)
    lines, total = exposition(batched)
    reference_lines, reference_total = exposition(reference)
    assert lines == reference_lines and total == pytest.approx(reference_total, rel=1e-12)
    assert "x_seconds_count 507.0" in lines
