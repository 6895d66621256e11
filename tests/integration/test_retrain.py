"""The retraining job against a real InfluxDB 1.x and a real Tansu broker.

Scored history is written exactly as the pipeline writes it (``pipeline.records.score_line`` through
``InfluxV1Writer``), with simulated sensor values; the points flagged ``is_anomaly`` carry wild values,
so a model trained on them would show it in its normaliser.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from connectors.influx import InfluxV1Writer
from connectors.kafka_admin import read_all
from connectors.simulator import FleetSimulator, aligned_now_ms
from models.artifact import load_artifact
from models.registry import open_registry
from models.scoring import Status
from models.training import TrainConfig
from pipeline import control
from pipeline.records import ScoreRecord, score_line
from pipeline.retrain import run_loop, run_once
from pipeline.settings import Settings
from tests.conftest import TEST_DATABASE

pytestmark = pytest.mark.integration

DEVICES = 6
STEPS = 700
TINY = TrainConfig(
    hidden=12, layers=1, dropout=0.0, seq_len=32, batch_size=16, max_epochs=3, max_batches_per_epoch=20, seed=0
)


def write_history(url: str, measurement: str) -> dict[str, object]:
    """DEVICES x STEPS scored steps ending now; returns what was written."""
    sim = FleetSimulator(
        DEVICES,
        seed=7,
        step_ms=1000,
        start_ts_ms=aligned_now_ms(1000) - STEPS * 1000,
        anomaly_count=6,
        anomalies_after_step=100,
        anomaly_horizon_steps=STEPS - 50,
        anomaly_kinds=("spike", "level_shift", "stuck"),
    )
    s = sim.series(STEPS)
    flagged = s.anomaly_mask.any(axis=2)  # (steps, devices)
    flagged[np.arange(200, STEPS, 97), 0] = True  # a few isolated flags too: short gaps, masked
    lines = []
    for t in range(STEPS):
        for d, device in enumerate(sim.device_ids):
            values = s.values[t, d]
            if flagged[t, d]:
                values = values * 1000.0 + 1e6  # must never reach the training data
            record = ScoreRecord(
                device_id=device,
                ts_ms=int(s.ts_ms[t]),
                status=Status.WARMING_UP if t < 20 else Status.OK,
                score=None if t < 20 else 0.5,
                threshold=5.0,
                is_anomaly=bool(flagged[t, d]),
                top_sensor="temp",
                values=tuple(float(v) for v in values),
                forecast=tuple(float(v) for v in values),
                model_version="v0",
                n_readings=1,
            )
            lines.append(score_line(record, sim.sensors, measurement))

    async def write() -> None:
        async with InfluxV1Writer(url, TEST_DATABASE) as writer:
            for i in range(0, len(lines), 5000):
                await writer.write(lines[i : i + 5000])

    asyncio.run(write())
    clean = s.values[~flagged]
    return {"flagged": int(flagged.sum()), "clean": int((~flagged).sum()), "clean_mean": clean.mean(axis=0)}


def make_settings(tmp_path, influxd, tansu, measurement: str, prefix: str, **overrides) -> Settings:
    values = {
        "influx_url": influxd.url,
        "influx_database": TEST_DATABASE,
        "influx_measurement": measurement,
        "kafka_bootstrap": tansu.bootstrap,
        "topic_prefix": prefix,
        "registry_url": str(tmp_path / "registry"),
        "data_dir": tmp_path,
        "step_ms": 1000,
        "max_gap_steps": 10,
        "retrain_history_hours": 1.0,
        "retrain_min_points": 1000,
        "retrain_min_device_points": 60,
        "retrain_margin": 0.0,
        **overrides,
    }
    return Settings(**values)


def control_messages(tansu, topic: str, n: int) -> list[dict]:
    records = read_all(tansu.bootstrap, topic, min_records=n, idle_timeout_s=0.5, timeout_s=15)
    return [json.loads(r.value) for r in records]


def test_retrain_promotes_then_keeps_champion(tmp_path, influxd, tansu, unique_name):
    measurement, prefix = unique_name("scores"), unique_name("iotad")
    written = write_history(influxd.url, measurement)
    settings = make_settings(tmp_path, influxd, tansu, measurement, prefix)
    registry = open_registry(settings.registry_url)

    # First run: no champion, so the candidate is promoted and announced.
    first = run_once(settings, config=TINY)
    assert first["decision"] == "promoted", first
    version = first["version"]
    assert registry.champion() == version and first["notified"] is True
    data = first["data"]
    assert data["anomalous_points_excluded"] == written["flagged"]
    assert data["points_counted"] == written["clean"]
    assert data["points"] + data["points_in_short_runs_dropped"] == written["clean"]
    assert data["devices"] == DEVICES and data["series"] >= DEVICES
    assert data["gap_steps_masked"] > 0
    assert first["champion"] is None and first["candidate"]["eval_targets"] > 0
    stored = registry.read_report(first["report"])
    assert stored["decision"] == "promoted" and stored["version"] == version
    # The flagged points' wild values stayed out: the normaliser matches the clean data.
    artifact = load_artifact(registry.fetch(version, tmp_path / "cache"))
    assert artifact.features == ("temp", "pressure", "vibration", "current")
    np.testing.assert_allclose(artifact.normaliser.mean, written["clean_mean"], rtol=0.05)
    assert artifact.metadata["training"]["data"]["measurement"] == measurement

    (message,) = control_messages(tansu, settings.control_topic, 1)
    assert message["type"] == control.MODEL_UPDATED and message["version"] == version
    assert message["registry"] == registry.url and message["previous"] is None and message["at"]
    assert message["path"] == str(registry.local_path(version))
    assert load_artifact(message["path"]).version == version  # loadable where a worker would look

    # Second run: a margin no candidate can meet keeps the champion; the challenger stays a candidate.
    second = run_once(settings.model_copy(update={"retrain_margin": 0.99}), config=TINY)
    assert second["decision"] == "kept-champion", second
    assert registry.champion() == version
    assert second["champion"]["version"] == version
    assert second["candidate"]["eval_targets"] == second["champion"]["eval_targets"] > 0
    assert second["candidate"]["eval_mse"] > second["champion"]["eval_mse"] * 0.01
    assert registry.info(second["version"]).stage == "candidate"
    assert registry.reports() == sorted([first["report"], second["report"]])
    assert len(control_messages(tansu, settings.control_topic, 1)) == 1  # nothing new published


def test_too_little_data_is_a_clean_no_op(tmp_path, influxd, tansu, unique_name, monkeypatch):
    measurement = unique_name("empty")
    settings = make_settings(tmp_path, influxd, tansu, measurement, unique_name("iotad"))
    report = run_once(settings, config=TINY)
    assert report["decision"] == "insufficient-data" and not report["promoted"]
    assert open_registry(settings.registry_url).champion() is None
    # The CLI: exit code 0 and the report as JSON on the last line.
    from pipeline.cli import app

    for key, value in {
        "INFLUX_URL": influxd.url,
        "INFLUX_DATABASE": TEST_DATABASE,
        "INFLUX_MEASUREMENT": measurement,
        "REGISTRY_URL": settings.registry_url,
        "DATA_DIR": str(tmp_path),
    }.items():
        monkeypatch.setenv(f"IOTAD_{key}", value)
    result = CliRunner().invoke(app, ["retrain", "--once", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["decision"] == "insufficient-data"
    assert len(open_registry(settings.registry_url).reports()) == 2


def test_loop_wakes_up_on_retrain_request(tmp_path, influxd, tansu, unique_name):
    settings = make_settings(tmp_path, influxd, tansu, unique_name("empty"), unique_name("iotad"))
    reports: list[dict] = []
    stop = threading.Event()
    thread = threading.Thread(
        target=run_loop,
        kwargs={
            "settings": settings,
            "interval_s": 60.0,  # far longer than the test: only the request can start run 2
            "config": TINY,
            "max_runs": 2,
            "should_stop": stop.is_set,
            "on_report": reports.append,
        },
        daemon=True,
    )
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not reports and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(reports) == 1
        control.publish(settings.kafka_bootstrap, settings.control_topic, control.retrain_request("test"))
        thread.join(timeout=20)
        assert not thread.is_alive()
        assert len(reports) == 2
    finally:
        stop.set()
        thread.join(timeout=5)
