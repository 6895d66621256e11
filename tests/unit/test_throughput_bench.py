from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import throughput


def test_pairs_alternate_the_order_and_report_medians(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    rates = iter([(100, 200), (300, 250), (120, 100)])  # (Faust, lean) per pair
    calls: list[dict[str, Any]] = []

    def fake_fleet(n: int, readings: int, envelope: int, base: Path, step_ms: int, **kw: Any) -> dict[str, Any]:
        calls.append(kw)
        faust, lean = next(rates)
        ratio = faust / lean
        return {
            "readings_per_s": faust,
            "ceiling_per_s": lean,
            "ratio": ratio,
            "lean_first": kw["lean_first"],
            "p99_ms": 5,
        }

    monkeypatch.setattr(throughput, "bench_fleet", fake_fleet)
    out = throughput.bench_pairs(100, 1000, 10, tmp_path, 1000, repeats=3)
    assert [c["lean_first"] for c in calls] == [False, True, False]
    assert [c["latency_run"] for c in calls] == [True, False, False]
    assert (out["readings_per_s"], out["ceiling_per_s"]) == (120, 200)
    assert out["ratio"] == 1.2  # the median of the pairs' ratios (0.5, 1.2, 1.2), not 120 / 200
    assert [p["ratio"] for p in out["pairs"]] == [0.5, 1.2, 1.2] and out["p99_ms"] == 5


def test_a_quantile_bucket_is_taken_from_what_was_observed_between_two_scrapes() -> None:
    inf = float("inf")
    before = {0.05: 900.0, 0.25: 1000.0, 1.0: 1000.0, inf: 1000.0}  # e.g. a backlog drain
    after = {0.05: 1800.0, 0.25: 1995.0, 1.0: 2000.0, inf: 2000.0}  # then 900 / 95 / 5 of 1,000
    assert throughput._bucket_bound_ms(before, after, 0.5) == 50.0
    assert throughput._bucket_bound_ms(before, after, 0.99) == 250.0
    assert throughput._bucket_bound_ms(before, after, 0.999) == 1000.0
    assert throughput._bucket_bound_ms(before, before, 0.99) is None  # nothing observed
    assert throughput._bucket_bound_ms({}, {0.05: 0.0, inf: 3.0}, 0.99) is None  # beyond the last bound


def test_a_worker_histogram_is_read_from_its_exposition() -> None:
    import numpy as np
    from prometheus_client import generate_latest

    from pipeline.metrics import Metrics

    metrics = Metrics()
    metrics.influx_latency.observe_many(np.array([0.02, 0.3, 0.3]))

    class Worker:
        def metrics(self) -> str:
            return generate_latest(metrics.registry).decode()

    buckets = throughput._histogram(Worker(), throughput.INFLUX_LATENCY)  # type: ignore[arg-type]
    assert buckets[0.01] == 0 and buckets[0.025] == 1 and buckets[0.5] == 3 and buckets[float("inf")] == 3
