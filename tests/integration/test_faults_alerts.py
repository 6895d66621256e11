"""Fault injection, alerting side (bench/faults.py ``alert_receiver_down``): the alerter's only receiver
goes down while spikes raise alerts, then comes back; everything in the outbox reaches it, dead letters
through ``iotad alerts-redrive``, and nothing twice. Kept apart from test_faults.py (about 50 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.faults import FaultConfig, run_scenario
from connectors.localstack import ServerStartError
from pipeline.settings import Settings
from tests.servers import unavailable

pytestmark = pytest.mark.integration

# A short retry budget, so that the 6 s outage dead-letters some deliveries and the re-drive is exercised.
POLICY = {"base_delay_s": 0.2, "max_delay_s": 1.0, "budget_s": 3.0, "circuit_open_s": 5.0}


def test_alert_receiver_down_loses_nothing(tmp_path: Path) -> None:
    cfg = FaultConfig(devices=12, steps_per_s=4.0, stream_s=24.0, receiver_down_s=6.0, receiver_policy=POLICY)
    try:
        out = run_scenario("alert_receiver_down", cfg, Settings(), tmp_path)
    except ServerStartError as exc:
        unavailable("local servers", exc)
    d = out.details
    assert d["undelivered_at_recovery"] > 0, d  # alerts were raised while the receiver was down
    assert out.lost == 0 and out.duplicated == 0 and out.unexpected == 0, d
    assert d["dead_lettered"] == d["redriven"], d
    assert out.state_mismatch_max is not None and out.state_mismatch_max < 1e-4
    assert all(out.checks.values()), out.checks
