"""bench/processor.py stays runnable and deterministic (its digest is how optimisations are checked)."""

from __future__ import annotations

from bench.processor import Scenario, run_scenario


def test_micro_benchmark_runs_and_its_digest_is_reproducible():
    a, b = (run_scenario(Scenario(20, 2), runs=2, run_readings=40, batch_max=20) for _ in range(2))
    assert a["digest"] == b["digest"]
    assert a["readings_per_run"] == 40 and a["scores_per_run"] == 40
    assert set(a["us_per_reading"]) == {
        "validate",
        "step",
        "process",
        "lines",
        "json",
        "checkpoint",
        "total",
        "python",
    }
