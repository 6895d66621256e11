"""A fleet-wide drift injected by the simulator makes the worker request exactly one retrain."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from connectors.kafka_admin import read_all
from connectors.simulator import FleetSimulator, make_producer, run_simulation
from pipeline import control
from pipeline.settings import Settings
from pipeline.stack import PipelineStack

pytestmark = pytest.mark.integration


def _requests(stack: PipelineStack, topic: str) -> list[dict]:
    out = [control.decode(r.value) for r in read_all(stack.bootstrap, topic, idle_timeout_s=0.5)]
    return [m for m in out if m and m["type"] == control.RETRAIN_REQUEST]


def test_noise_drift_triggers_one_rate_limited_retrain_request(tmp_path: Path) -> None:
    s = Settings(
        topic_prefix="drift",
        app_id="drift-worker",
        influx_database="drift",
        data_dir=tmp_path,
        warmup_steps=10,
        drift_reference=400,
        drift_window=300,
        drift_bound=0.25,
        drift_min_interval_s=3600,
    )
    sim = FleetSimulator(20, seed=8, step_ms=s.step_ms, anomaly_rate=0)
    with PipelineStack(s) as stack:
        producer = make_producer(stack.bootstrap)
        steady = run_simulation(producer, s.readings_topic, sim, steps=70, end_at_now=True)
        deadline = time.monotonic() + 60
        while stack.total("iotad_readings_scored_total") < steady.readings_sent and time.monotonic() < deadline:
            time.sleep(0.3)
        assert stack.total("iotad_drift_psi") < 0.25  # the reference and window are both steady
        assert _requests(stack, s.control_topic) == []
        sim.scale_noise(4.0)
        drifted = run_simulation(producer, s.readings_topic, sim, steps=60)
        producer.close()
        total = steady.readings_sent + drifted.readings_sent
        deadline = time.monotonic() + 60
        while stack.total("iotad_readings_scored_total") < total and time.monotonic() < deadline:
            time.sleep(0.3)
        requests = _requests(stack, s.control_topic)
        counted = stack.total("iotad_retrain_requests_total")
    assert len(requests) == 1, requests
    assert "drift" in requests[0]["reason"] and counted == 1
