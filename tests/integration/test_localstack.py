"""Managed servers and the Kafka helpers against a real Tansu broker and InfluxDB 1.x."""

from __future__ import annotations

import os
import socket

import pytest

from connectors.influx import count_points, influx_v1_query
from connectors.kafka_admin import create_topics, end_offsets, make_producer, read_all, wait_for_broker
from connectors.localstack import InfluxD, LocalStack, ServerStartError, Tansu, free_port, new_run_dir

pytestmark = pytest.mark.integration


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A reaped child is gone; an unreaped zombie would still answer, so check its state too.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_tansu_start_stop(tmp_path):
    try:
        server = Tansu(tmp_path / "tansu").start()
    except ServerStartError as exc:
        pytest.skip(str(exc))
    pid = server.pid
    assert pid is not None and server.running
    assert server.bootstrap == f"127.0.0.1:{server.port}"
    wait_for_broker(server.bootstrap, timeout_s=5)
    server.stop()
    assert not server.running and not _pid_alive(pid)
    assert "ready" in server.log_tail()
    server.stop()  # idempotent


def test_wait_for_broker_times_out():
    with pytest.raises(TimeoutError):
        wait_for_broker(f"127.0.0.1:{free_port()}", timeout_s=1)


def test_topics_and_round_trip_with_headers(tansu, unique_name):
    topic = unique_name("roundtrip")
    create_topics(tansu.bootstrap, {topic: 3}, retention_ms=3_600_000)
    create_topics(tansu.bootstrap, {topic: 3})  # idempotent
    producer = make_producer(tansu.bootstrap)
    try:
        for i in range(30):
            producer.send(
                topic,
                key=f"dev-{i % 5}".encode(),
                value=f"v{i}".encode(),
                headers=[("trace", str(i).encode()), ("schema", b"1")],
            )
        producer.flush(10)
    finally:
        producer.close(5)

    records = read_all(tansu.bootstrap, topic, idle_timeout_s=0.5, timeout_s=15, min_records=30)
    assert len(records) == 30
    assert {r.partition for r in records} <= {0, 1, 2}
    by_value = {r.value: r for r in records}
    for i in range(30):
        r = by_value[f"v{i}".encode()]
        assert r.key == f"dev-{i % 5}".encode()
        assert r.headers == {"trace": str(i).encode(), "schema": b"1"}
        assert r.topic == topic and r.timestamp_ms > 0
    # Same key -> same partition, and offsets are dense per partition.
    assert len({(r.key, r.partition) for r in records}) == 5
    for p in {r.partition for r in records}:
        offsets = [r.offset for r in records if r.partition == p]
        assert offsets == list(range(len(offsets)))


def test_read_all_from_end_offsets_sees_only_later_messages(tansu, unique_name):
    topic = unique_name("later")
    create_topics(tansu.bootstrap, {topic: 2})
    producer = make_producer(tansu.bootstrap)
    try:
        for i in range(10):
            producer.send(topic, key=b"k", value=f"old{i}".encode(), partition=i % 2)
            producer.flush(10)  # one record per batch: Tansu's end offset is its last batch's base + 1
        start = end_offsets(tansu.bootstrap, topic)
        assert start == {0: 5, 1: 5}
        for i in range(4):
            producer.send(topic, key=b"k", value=f"new{i}".encode(), partition=i % 2)
        producer.flush(10)
    finally:
        producer.close(5)
    records = read_all(tansu.bootstrap, topic, idle_timeout_s=0.5, timeout_s=15, min_records=4, start=start)
    assert sorted(r.value for r in records) == [b"new0", b"new1", b"new2", b"new3"]
    assert {(r.partition, r.offset) for r in records} == {(0, 5), (0, 6), (1, 5), (1, 6)}


def test_read_all_missing_topic_returns_empty(tansu, unique_name):
    assert read_all(tansu.bootstrap, unique_name("absent"), idle_timeout_s=0.2, timeout_s=0.5) == []


def test_influxd_start_ping_and_restart(tmp_path):
    server = InfluxD(tmp_path / "influx")
    try:
        server.start()
    except ServerStartError as exc:
        pytest.skip(str(exc))
    try:
        server.create_database("db1")
        server.create_database("db1")  # idempotent
        names = [row[0] for s in influx_v1_query(server.url, "", "SHOW DATABASES") for row in s["values"]]
        assert "db1" in names
        first_pid, port = server.pid, server.port
        server.stop()
        server.start()  # same port, same data dir: the database survives
        assert server.port == port and server.pid != first_pid
        assert count_points(server.url, "db1", "nothing") == 0
    finally:
        server.stop()
    assert not server.running


def test_influxd_missing_binary_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServerStartError, match="make servers"):
        InfluxD(tmp_path / "influx").start()


def test_local_stack_starts_and_stops_everything(tmp_path):
    stack = LocalStack(new_run_dir(tmp_path), databases=["iotad"])
    try:
        stack.start()
    except ServerStartError as exc:
        pytest.skip(str(exc))
    with stack:
        pids = [stack.tansu.pid, stack.influxd.pid]
        wait_for_broker(stack.bootstrap, timeout_s=5)
        assert count_points(stack.influx_url, "iotad", "m") == 0
        assert stack.data_dir.name.startswith("run-")
        assert (stack.data_dir / "influxdb" / "influxdb.conf").is_file()
    assert all(pid is not None and not _pid_alive(pid) for pid in pids)


def test_local_stack_failed_start_cleans_up(tmp_path, monkeypatch):
    stack = LocalStack(tmp_path / "stack")
    # Tansu starts, then influxd is "missing": the started broker must be stopped again.
    monkeypatch.setattr("connectors.localstack.shutil.which", lambda name: None)
    try:
        with pytest.raises(ServerStartError):
            stack.start()
    finally:
        stack.stop()
    assert not stack.tansu.running and not stack.influxd.running
