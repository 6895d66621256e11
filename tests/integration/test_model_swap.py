"""Hot swap of the model in a running worker, on the real local stack (Tansu, InfluxDB, worker process)."""

from __future__ import annotations

import itertools
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import msgspec
import pytest

from connectors.influx import influx_v1_query
from connectors.kafka_admin import read_all
from connectors.simulator import FleetSimulator, make_producer, run_simulation
from models import DEFAULT_MODEL_DIR
from models.artifact import load_artifact
from models.training import TrainConfig, save_trained, train
from pipeline import control
from pipeline.datasets import simulator_dataset
from pipeline.settings import Settings
from pipeline.stack import PipelineStack

pytestmark = pytest.mark.integration


def _tiny_model(directory: Path, version: str) -> Path:
    data = simulator_dataset(8, 600, seed=9)
    result = train(data.series, data.features, TrainConfig(hidden=16, layers=1, max_epochs=2, seed=1), progress=False)
    return save_trained(result, directory, version=version, data_description=data.description)


def _scores(stack: PipelineStack, topic: str, expect: int) -> list[dict]:
    deadline = time.monotonic() + 90
    out: list[dict] = []
    while time.monotonic() < deadline:
        out = [msgspec.json.decode(r.value or b"{}") for r in read_all(stack.bootstrap, topic, idle_timeout_s=0.5)]
        if len({(x["device_id"], x["ts"]) for x in out}) >= expect:
            break
        time.sleep(0.5)
    return out


def _wait_metric(stack: PipelineStack, name: str, target: float, timeout_s: float = 60) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (v := stack.total(name)) >= target:
            return v
        time.sleep(0.2)
    return stack.total(name)


def test_swap_rollback_and_corrupt_artifact_under_load(tmp_path: Path) -> None:
    s = Settings(topic_prefix="swap", app_id="swap-worker", influx_database="swap", data_dir=tmp_path, warmup_steps=10)
    new_dir = _tiny_model(tmp_path / "candidate", "cand-1")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(new_dir, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + b"\0" * 64)
    old_version = load_artifact(DEFAULT_MODEL_DIR).version
    sim = FleetSimulator(10, seed=4, step_ms=s.step_ms, anomaly_rate=0)

    with PipelineStack(s) as stack:
        producer = make_producer(stack.bootstrap)
        first = run_simulation(producer, s.readings_topic, sim, steps=60, end_at_now=True)
        _wait_metric(stack, "iotad_readings_scored_total", first.readings_sent)

        # Swap while readings are streaming in: one step every 0.1 s, the swap lands mid-stream.
        # (Unpaced calls keep the simulator's own clock, so timestamps stay contiguous.)
        def stream(steps: int) -> int:
            n = 0
            for _ in range(steps):
                n += run_simulation(producer, s.readings_topic, sim, steps=1).readings_sent
                time.sleep(0.1)
            return n

        sent: list[int] = []
        t = threading.Thread(target=lambda: sent.append(stream(40)))
        t.start()
        time.sleep(1.5)
        control.publish(
            stack.bootstrap, s.control_topic, {"type": "model-updated", "version": "cand-1", "path": str(new_dir)}
        )
        t.join(60)
        second = sent[0]
        assert _wait_metric(stack, "iotad_model_swaps_total", 1) == 1

        # A corrupt artifact is refused; the new champion keeps serving.
        control.publish(
            stack.bootstrap, s.control_topic, {"type": "model-updated", "version": "bad", "path": str(corrupt)}
        )
        assert _wait_metric(stack, "iotad_model_load_failures_total", 1) == 1
        third = run_simulation(producer, s.readings_topic, sim, steps=10).readings_sent

        # Rollback: the previous champion comes back.
        control.publish(
            stack.bootstrap,
            s.control_topic,
            {"type": "model-updated", "version": old_version, "path": str(DEFAULT_MODEL_DIR)},
        )
        assert _wait_metric(stack, "iotad_model_swaps_total", 2) == 2
        fourth = run_simulation(producer, s.readings_topic, sim, steps=10).readings_sent
        producer.close()
        total = first.readings_sent + second + third + fourth
        scores = _scores(stack, s.scores_topic, total)
        rewarmed = stack.total("iotad_rewarmed_devices_total")
        info = stack.procs[0].metrics()

    keys = Counter((x["device_id"], x["ts"]) for x in scores)
    assert len(keys) == total, "no reading lost across the swaps"
    assert max(keys.values()) == 1, "none scored twice"
    by_ts = sorted(scores, key=lambda x: x["ts"])
    # Each device switches model exactly at the swaps, in order, never back and forth.
    for dev in sim.device_ids:
        versions = [x["model_version"] for x in by_ts if x["device_id"] == dev]
        runs = [versions[0]] + [b for a, b in itertools.pairwise(versions) if a != b]
        assert runs == [old_version, "cand-1", old_version], (dev, runs)
    # Re-warmed from history: no device falls back to warm-up after a swap.
    after_first = [x for x in by_ts if x["ts"] > first.last_ts_ms]
    assert all(x["status"] == "ok" for x in after_first)
    assert rewarmed >= 20  # 10 devices, two swaps
    assert f'iotad_model_info{{version="{old_version}"}} 1.0' in info


def test_shadow_model_scores_beside_the_champion(tmp_path: Path) -> None:
    shadow = _tiny_model(tmp_path / "shadow", "shadow-1")
    s = Settings(
        topic_prefix="shadow",
        app_id="shadow-worker",
        influx_database="shadow",
        data_dir=tmp_path,
        warmup_steps=10,
        shadow_model_dir=shadow,
    )
    sim = FleetSimulator(6, seed=2, step_ms=s.step_ms, anomaly_rate=0)
    with PipelineStack(s) as stack:
        producer = make_producer(stack.bootstrap)
        stats = run_simulation(producer, s.readings_topic, sim, steps=50, end_at_now=True)
        producer.close()
        _wait_metric(stack, "iotad_readings_scored_total", stats.readings_sent)
        scores = _scores(stack, s.scores_topic, stats.readings_sent)
        rows = influx_v1_query(
            stack.influx_url,
            s.influx_database,
            f'SELECT count("threshold") FROM "{s.influx_measurement}_shadow" GROUP BY "model_version"',
        )
    assert {x["model_version"] for x in scores} == {load_artifact(DEFAULT_MODEL_DIR).version}
    assert len(rows) == 1 and rows[0]["tags"]["model_version"] == "shadow-1"
    assert rows[0]["values"][0][1] == stats.readings_sent
