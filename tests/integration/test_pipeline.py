"""The whole pipeline on real local servers: Tansu, InfluxDB and `iotad worker` processes.

Nothing is mocked: readings go through Kafka to a Faust worker process and out to the scores topic,
the dead-letter topic and InfluxDB, and the worker's Prometheus endpoint is scraped.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections import Counter
from pathlib import Path

import msgspec
import pytest

from connectors.influx import count_points
from connectors.kafka_admin import Record, read_all
from connectors.kafka_batches import CHANGELOG_MARKER
from connectors.kafka_ranges import PartitionReader
from connectors.simulator import FleetSimulator, make_producer, run_simulation
from pipeline.app import STATE_TABLE, build_detector, build_processor
from pipeline.processor import Inbound
from pipeline.schema import Reason
from pipeline.settings import Settings
from pipeline.stack import PipelineStack

pytestmark = pytest.mark.integration


def _settings(tmp_path: Path, name: str) -> Settings:
    return Settings(
        topic_prefix=name,
        app_id=f"{name}-worker",
        influx_database=name.replace("-", "_"),
        data_dir=tmp_path,
        warmup_steps=20,
        step_ms=1000,
        partitions=4,
    )


def _wait_for(stack: PipelineStack, metric: str, target: float, timeout_s: float = 90.0) -> float:
    deadline = time.monotonic() + timeout_s
    value = 0.0
    while time.monotonic() < deadline:
        value = stack.total(metric)
        if value >= target:
            return value
        time.sleep(0.3)
    return value


def _scores(records: list[Record]) -> list[dict]:
    return [msgspec.json.decode(r.value) for r in records]


def test_fleet_end_to_end(tmp_path: Path) -> None:
    s = _settings(tmp_path, "e2e")
    sim = FleetSimulator(
        24,
        seed=3,
        step_ms=s.step_ms,
        anomaly_count=6,
        anomalies_after_step=50,
        anomaly_horizon_steps=115,
        anomaly_kinds=("spike",),
    )
    with PipelineStack(s) as stack:
        producer = make_producer(stack.bootstrap)
        stats = run_simulation(
            producer, s.readings_topic, sim, steps=120, end_at_now=True, malformed_every=60, late_every=300
        )
        producer.close()
        assert stats.malformed_sent > 10 and stats.late_sent > 3 and not stats.send_errors
        _wait_for(stack, "iotad_readings_scored_total", stats.readings_sent)
        _wait_for(stack, "iotad_influx_latency_seconds_count", stats.readings_sent)  # points go behind the scores
        scores = _scores(read_all(stack.bootstrap, s.scores_topic, min_records=stats.readings_sent))
        dlq = read_all(stack.bootstrap, s.dlq_topic, min_records=stats.malformed_sent + stats.late_sent)
        points = count_points(stack.influx_url, s.influx_database, s.influx_measurement, field="threshold")
        worker = stack.procs[0]
        worker_log = worker.log_path.read_text(errors="replace")
        metrics = worker.metric_values(
            "iotad_readings_scored_total",
            "iotad_dead_letters_total",
            "iotad_late_readings_total",
            "iotad_anomalies_total",
            "iotad_devices_tracked",
            "iotad_last_output_timestamp_seconds",
        )
        scraped_at = time.time()

    # Each valid on-time reading -> exactly one score and one InfluxDB point.
    keys = Counter((x["device_id"], x["ts"]) for x in scores)
    assert len(keys) == stats.readings_sent
    assert max(keys.values()) == 1
    assert points == stats.readings_sent
    # Every malformed and every late message is dead-lettered with its reason and original bytes.
    reasons = Counter(r.headers["iotad-reason"].decode() for r in dlq)
    assert len(dlq) == stats.malformed_sent + stats.late_sent
    assert reasons[Reason.LATE] == stats.late_sent
    assert set(reasons) <= {r.value for r in Reason}
    assert all({"iotad-topic", "iotad-partition", "iotad-offset", "iotad-detail"} <= set(r.headers) for r in dlq)
    assert all(r.headers["iotad-topic"].decode() == s.readings_topic for r in dlq)
    # Warm-up is explicit, then scores are ok.
    by_dev = sorted((x for x in scores if x["device_id"] == sim.device_ids[0]), key=lambda x: x["ts"])
    assert [x["status"] for x in by_dev[: s.warmup_steps + 1]] == ["warming_up"] * (s.warmup_steps + 1)
    assert by_dev[-1]["status"] == "ok"
    # Injected anomalies are flagged (within their window + a few steps).
    hits = 0
    for a in stats.anomalies:
        hits += any(
            x["is_anomaly"] and x["device_id"] == a.device_id and a.start_ts_ms <= x["ts"] < a.end_ts_ms + 5000
            for x in scores
        )
    assert hits >= 0.8 * len(stats.anomalies)
    # Metrics count what happened.
    assert metrics["iotad_readings_scored_total"] == stats.readings_sent
    assert metrics["iotad_dead_letters_total"] == len(dlq)
    assert metrics["iotad_late_readings_total"] == stats.late_sent
    assert metrics["iotad_anomalies_total"] == sum(x["is_anomaly"] for x in scores)
    assert metrics["iotad_devices_tracked"] == 24
    # The staleness gauge is the wall time of the last written outputs: the worker was idle after them.
    assert scraped_at - 60 < metrics["iotad_last_output_timestamp_seconds"] <= scraped_at
    # The worker could set its consumer's fetch wait (Faust internals; IOTAD_KAFKA_FETCH_MAX_WAIT_MS).
    assert "cannot set the consumer's fetch_max_wait_ms" not in worker_log
    assert f"consumer fetch_max_wait_ms = {s.kafka_fetch_max_wait_ms}" in worker_log


def test_worker_killed_mid_stream_resumes_state_exactly(tmp_path: Path) -> None:
    s = _settings(tmp_path, "crash")
    sim = FleetSimulator(12, seed=5, step_ms=s.step_ms, anomaly_rate=0)
    with PipelineStack(s) as stack:
        producer = make_producer(stack.bootstrap)
        first = run_simulation(producer, s.readings_topic, sim, steps=60, end_at_now=True)
        # SIGKILL while the stream is being consumed: some batches are checkpointed, some not committed.
        _wait_for(stack, "iotad_readings_scored_total", first.readings_sent // 3)
        stack.procs[0].stop(kill=True)
        stack.add_worker()
        second = run_simulation(producer, s.readings_topic, sim, steps=30, end_at_now=False)
        producer.close()
        total = first.readings_sent + second.readings_sent
        deadline = time.monotonic() + 90
        scores: list[dict] = []
        while time.monotonic() < deadline:
            scores = _scores(read_all(stack.bootstrap, s.scores_topic, idle_timeout_s=0.5))
            if len({(x["device_id"], x["ts"]) for x in scores}) >= total:
                break
            time.sleep(1)
        readings = read_all(stack.bootstrap, s.readings_topic, min_records=total)

    # Reference: the same messages through one uninterrupted in-process processor.
    detector = build_detector(s)
    ref_proc = build_processor(s, detector)
    inbound = [Inbound(r.key, r.value, r.topic, r.partition, r.offset) for r in readings]
    ref = {}
    for i in range(0, len(inbound), 97):
        for r in ref_proc.process(inbound[i : i + 97], int(time.time() * 1000)).scores:
            ref[(r.device_id, r.ts_ms)] = r

    got: dict[tuple[str, int], list[dict]] = {}
    for x in scores:
        got.setdefault((x["device_id"], x["ts"]), []).append(x)
    assert set(got) == set(ref), "every reading scored, none lost"
    worst = 0.0
    for key, outs in got.items():
        r = ref[key]
        for x in outs:  # at-least-once output: a replayed score must be identical, never a second state step
            assert x["status"] == r.status.value
            if r.score is not None:
                worst = max(worst, abs(x["score"] - r.score))
    assert worst < 1e-4


def test_states_are_checkpointed_once_per_interval_and_only_checkpointed_offsets_are_committed(
    tmp_path: Path,
) -> None:
    """With a checkpoint interval longer than the test, a worker scores every reading at once but writes no
    state and commits no offset. A clean stop writes each device's state once and commits everything; a
    SIGKILL before the interval commits nothing, and loses nothing: the next worker consumes every message
    since the last checkpoint again and scores them exactly as they were scored."""
    s = _settings(tmp_path, "cadence").model_copy(update={"checkpoint_interval_s": 3600.0})
    sim = FleetSimulator(6, seed=7, step_ms=s.step_ms, anomaly_rate=0)
    changelog = f"{s.app_id}-{STATE_TABLE}-changelog"

    def device_checkpoints(bootstrap: str) -> Counter[bytes]:
        return Counter(r.key for r in read_all(bootstrap, changelog, idle_timeout_s=0.5) if r.key != CHANGELOG_MARKER)

    def committed(bootstrap: str) -> int:
        """How many readings the group has committed (offsets run from 0 on each partition)."""

        async def read() -> dict[int, int]:
            reader = PartitionReader(bootstrap, s.app_id)
            try:
                return await reader.next_offsets(s.readings_topic, range(s.partitions))
            finally:
                await reader.stop()

        return sum(asyncio.run(read()).values())

    with PipelineStack(s) as stack:
        producer = make_producer(stack.bootstrap)
        first = run_simulation(producer, s.readings_topic, sim, steps=40, end_at_now=True)
        assert _wait_for(stack, "iotad_readings_scored_total", first.readings_sent) == first.readings_sent
        time.sleep(2.0)  # two of Faust's commit intervals
        assert stack.procs[0].metric("iotad_device_checkpoints_total") == 0
        assert not device_checkpoints(stack.bootstrap)
        assert committed(stack.bootstrap) == 0
        stack.procs[0].stop()  # SIGTERM: a clean stop
        assert device_checkpoints(stack.bootstrap) == Counter({d.encode(): 1 for d in sim.device_ids})
        assert committed(stack.bootstrap) == first.readings_sent

        stack.add_worker()
        second = run_simulation(producer, s.readings_topic, sim, steps=20, end_at_now=False)
        assert _wait_for(stack, "iotad_readings_scored_total", second.readings_sent) == second.readings_sent
        before_kill = _scores(read_all(stack.bootstrap, s.scores_topic, min_records=first.readings_sent))
        stack.procs[1].stop(kill=True)
        assert committed(stack.bootstrap) == first.readings_sent

        stack.add_worker()
        # The states are the clean stop's, so every reading since is scored again.
        rescored = _wait_for(stack, "iotad_readings_scored_total", second.readings_sent)
        producer.close()
        after = _scores(
            read_all(stack.bootstrap, s.scores_topic, min_records=first.readings_sent + 2 * second.readings_sent)
        )

    assert rescored == second.readings_sent
    assert len(before_kill) == first.readings_sent + second.readings_sent
    by_reading: dict[tuple[str, int], list[dict]] = {}
    for x in after:
        by_reading.setdefault((x["device_id"], x["ts"]), []).append(x)
    assert Counter(len(v) for v in by_reading.values()) == {1: first.readings_sent, 2: second.readings_sent}
    # A replay's score is the original one (within the batched step's float32 rounding, which depends on
    # how many devices share a step).
    for original, replay in (v for v in by_reading.values() if len(v) == 2):
        assert (replay["status"], replay["is_anomaly"]) == (original["status"], original["is_anomaly"])
        assert original["score"] is None or abs(replay["score"] - original["score"]) < 1e-4


def test_points_influxdb_refuses_are_dead_lettered_and_scoring_goes_on(tmp_path: Path) -> None:
    """A field type conflict makes InfluxDB refuse every score point for good (400, no retry can help): each
    one goes to the DLQ with InfluxDB's reason, and the worker keeps scoring instead of crash-looping."""
    s = _settings(tmp_path, "rejected")
    sim = FleetSimulator(4, seed=5, step_ms=s.step_ms, anomaly_count=0)
    with PipelineStack(s) as stack:
        # `threshold` as a string in the shard the scores fall into: every float `threshold` after it conflicts.
        now_ms = int(time.time() * 1000)
        body = f'{s.influx_measurement},device=squatter threshold="text" {now_ms}'.encode()
        url = f"{stack.influx_url}/write?db={s.influx_database}&precision=ms"
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=10) as r:
            assert r.status == 204
        producer = make_producer(stack.bootstrap)
        stats = run_simulation(producer, s.readings_topic, sim, steps=30, end_at_now=True)
        producer.close()
        scored = _wait_for(stack, "iotad_readings_scored_total", stats.readings_sent)
        scores = _scores(read_all(stack.bootstrap, s.scores_topic, min_records=stats.readings_sent))
        dlq = read_all(stack.bootstrap, s.dlq_topic, min_records=stats.readings_sent)
        points = count_points(stack.influx_url, s.influx_database, s.influx_measurement, field="score")
        rejected_metric = stack.procs[0].metric("iotad_dead_letters_total")

    assert scored == stats.readings_sent
    assert len({(x["device_id"], x["ts"]) for x in scores}) == stats.readings_sent
    assert points == 0
    assert len(dlq) == stats.readings_sent == rejected_metric
    assert {r.headers["iotad-reason"] for r in dlq} == {b"influx_rejected"}
    assert all(b"field type conflict" in r.headers["iotad-detail"] for r in dlq)
    # The original line protocol, so the points can be re-written once the conflict is resolved.
    lines = sorted(r.value.decode() for r in dlq)
    assert all(line.startswith(f"{s.influx_measurement},") for line in lines)
    assert {line.split("device=")[1].split(",")[0] for line in lines} == set(sim.device_ids)
