"""The whole pipeline over mutual TLS: a real `iotad worker` (Faust + aiokafka), kafka-python producers and
readers, all through IOTAD_KAFKA_SECURITY_PROTOCOL=SSL with a client certificate.

Tansu has no working TLS listener, so a loopback TLS front (tests/integration/tls_front.py) terminates
TLS for it and Tansu advertises the front: every connection after bootstrap goes through TLS as well.
SASL is pinned by tests/unit/test_kafka_security.py (Tansu cannot hold a SCRAM user; see there).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import msgspec
import pytest

from connectors.influx import count_points
from connectors.kafka_admin import create_topics, read_all, wait_for_broker
from connectors.kafka_security import PLAINTEXT, KafkaSecurity
from connectors.localstack import InfluxD, free_port
from connectors.simulator import FleetSimulator, make_producer, run_simulation
from pipeline.settings import Settings
from pipeline.settings_files import secret_fields
from pipeline.stack import WorkerProcess
from tests.integration.tls_front import AdvertisedTansu, TlsFront, make_pki

pytestmark = pytest.mark.integration


def worker_env(s: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTAD_")}
    skip = set(secret_fields(Settings))
    env.update(
        {
            f"IOTAD_{name.upper()}": str(getattr(s, name))
            for name in Settings.model_fields
            if name not in skip and getattr(s, name) is not None
        }
    )
    return env


def test_pipeline_over_mutual_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    front_port = free_port()
    with contextlib.ExitStack() as stack:
        tansu = stack.enter_context(AdvertisedTansu(tmp_path / "tansu", advertised_port=front_port))
        front = stack.enter_context(
            TlsFront(tansu.port, pki.server_cert, pki.server_key, client_ca=pki.ca, port=front_port)
        )
        influx = stack.enter_context(InfluxD(tmp_path / "influxdb"))
        s = Settings(
            topic_prefix="tls",
            app_id="tls-worker",
            influx_database="tls",
            influx_url=influx.url,
            data_dir=tmp_path,
            warmup_steps=5,
            kafka_bootstrap=front.bootstrap,
            kafka_security_protocol="SSL",
            kafka_ssl_cafile=pki.ca,
            kafka_ssl_certfile=pki.client_cert,
            kafka_ssl_keyfile=pki.client_key,
        )
        influx.create_database(s.influx_database)
        security = KafkaSecurity.from_settings(s)
        create_topics(
            front.bootstrap,
            {s.readings_topic: 4, s.scores_topic: 4, s.dlq_topic: 1, s.control_topic: 1},
            security=security,
        )
        worker = WorkerProcess(worker_env(s), tmp_path / "worker.log")
        stack.callback(worker.stop)
        worker.start().wait_ready(timeout_s=120)

        sim = FleetSimulator(6, seed=4, step_ms=s.step_ms, anomaly_rate=0)
        producer = make_producer(front.bootstrap, security=security)
        stats = run_simulation(producer, s.readings_topic, sim, steps=40, end_at_now=True, malformed_every=40)
        producer.close()
        deadline = time.monotonic() + 90
        while worker.metric("iotad_readings_scored_total") < stats.readings_sent and time.monotonic() < deadline:
            time.sleep(0.3)
        scores = read_all(front.bootstrap, s.scores_topic, min_records=stats.readings_sent, security=security)
        dlq = read_all(front.bootstrap, s.dlq_topic, min_records=stats.malformed_sent, security=security)
        points = count_points(influx.url, s.influx_database, s.influx_measurement, field="threshold")

        # Nothing gets through the front without TLS, a trusted server chain and the client certificate.
        refused = []
        for wrong in (
            PLAINTEXT,
            KafkaSecurity("SSL", cafile=str(pki.ca)),  # no client certificate
            KafkaSecurity("SSL", cafile=str(pki.other_ca), certfile=str(pki.client_cert), keyfile=str(pki.client_key)),
        ):
            with pytest.raises(TimeoutError):
                wait_for_broker(front.bootstrap, timeout_s=2, security=wrong)
            refused.append(wrong.describe())
        alive = worker.proc is not None and worker.proc.poll() is None
        log = worker.log_path.read_text(errors="replace")

    assert alive, log[-3000:]
    assert stats.malformed_sent > 0 and not stats.send_errors
    assert len({(x["device_id"], x["ts"]) for x in map(msgspec.json.decode, (r.value for r in scores))}) == (
        stats.readings_sent
    )
    assert len(dlq) == stats.malformed_sent
    assert points == stats.readings_sent
    assert front.accepted > 0
    assert len(refused) == 3
    assert "Traceback" not in log, log[-3000:]
