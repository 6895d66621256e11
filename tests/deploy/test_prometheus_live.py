"""A real Prometheus scrapes a live worker metrics endpoint; every dashboard PromQL query and every alert
rule is evaluated by it. A real Alertmanager runs deploy/alertmanager.yml and notifies a local webhook.

The endpoint is pipeline.metrics.Metrics served exactly as `iotad worker` serves it, with its metrics moving
(a thread increments the counters and observes the histograms), so rate() and histogram_quantile() have data.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from connectors.localstack import free_ports
from pipeline.metrics import Metrics
from tests.deploy.helpers import REPO, tool

pytestmark = pytest.mark.integration

DASHBOARDS = REPO / "dashboards"
RULES = REPO / "deploy" / "rules" / "iotad.rules.yml"


def _exercise(m: Metrics, stop: threading.Event) -> None:
    m.model_info.labels("sim-lstm-v1").set(1)
    m.devices.set(12)
    if hasattr(m, "assigned"):
        m.assigned.set(4)
    while not stop.is_set():
        m.messages.inc(20)
        m.readings.inc(18)
        m.scored.inc(16)
        m.anomalies.inc()
        m.dead_letters.labels("invalid_json").inc()
        m.late.inc()
        m.replayed.inc()
        m.imputed.inc()
        m.resets.inc()
        m.batch_size.observe(20)
        m.step_seconds.observe(0.02)
        m.latency.observe(0.4)
        for counter in (m.sink_writes, m.sink_errors, m.sink_retries):
            counter.labels("influxdb").inc()
        stop.wait(0.1)


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    metrics_port, prom_port = free_ports(2)
    metrics = Metrics()
    server, _thread = _serve(metrics, metrics_port)
    stop = threading.Event()
    worker = threading.Thread(target=_exercise, args=(metrics, stop), daemon=True)
    worker.start()
    # The rules as shipped, but every group evaluated each second (iotad-model runs hourly in production).
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group.pop("interval", None)
    (tmp / "rules.yml").write_text(yaml.safe_dump(rules))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp / "rules.yml")],
        "scrape_configs": [
            {"job_name": "iotad-worker", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{prom_port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus not ready"
            time.sleep(0.1)
        yield url
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        server.shutdown()


def _serve(metrics: Metrics, port: int) -> tuple[Any, Any]:
    from prometheus_client import start_http_server

    return start_http_server(port, addr="127.0.0.1", registry=metrics.registry)


def _query(url: str, expr: str) -> list[dict[str, Any]]:
    body = _get(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert body["status"] == "success", body
    return body["data"]["result"]


def _dashboard_exprs() -> list[tuple[str, str]]:
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        dash = json.loads(path.read_text())
        targets = [t for p in dash["panels"] for t in p.get("targets", [])]
        targets += [a for a in dash["annotations"]["list"] if "expr" in a]
        for t in targets:
            if t.get("datasource", {}).get("type") == "prometheus":
                out.append((f"{path.name}: {t.get('refId') or t.get('name')}", t["expr"]))
    return out


def test_dashboard_promql_returns_data(prometheus):
    exprs = [
        (where, e.replace("$__rate_interval", "10s").replace("$__interval", "5s"))
        for where, e in _dashboard_exprs()
        if "ALERTS" not in e  # only series once an alert fires
    ]
    assert exprs
    deadline = time.monotonic() + 30  # the first scrape comes ~5 s after start
    while True:
        empty = [(where, e) for where, e in exprs if not _query(prometheus, e)]
        if not empty:
            break
        assert time.monotonic() < deadline, f"queries with no data: {empty}"
        time.sleep(0.5)


def test_alert_rules_evaluate_without_errors(prometheus):
    deadline = time.monotonic() + 30
    while True:
        groups = _get(f"{prometheus}/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        expected = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
        assert len(rules) == len(expected)
        errors = [(r["name"], r.get("lastError")) for r in rules if r["health"] == "err"]
        assert not errors, errors
        pending = [r["name"] for r in rules if r["health"] != "ok"]
        if not pending:
            break
        assert time.monotonic() < deadline, f"rules never evaluated: {pending}"
        time.sleep(0.5)
    # The worker is up and scoring: once rates exist, the alerts that need a failure are not even pending.
    silent = {"IotadWorkerDown", "IotadNoScores", "IotadModelVersionSkew", "IotadSinkDown"}
    deadline = time.monotonic() + 30
    while True:
        active = {a["labels"]["alertname"] for a in _get(f"{prometheus}/api/v1/alerts")["data"]["alerts"]}
        if not active & silent:
            break
        assert time.monotonic() < deadline, f"active alerts: {sorted(active & silent)}"
        time.sleep(0.5)


def test_alertmanager_renders_and_delivers(tmp_path):
    """deploy/alertmanager.yml in a real Alertmanager: an alert reaches the chat webhook, templates rendered.

    Only the secret file's path and the grouping delays are changed for the test.
    """
    binary = tool("prometheus-alertmanager", "alertmanager")
    received: list[dict[str, Any]] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    secret = tmp_path / "alert_webhook_url"
    secret.write_text(f"http://127.0.0.1:{hook.server_address[1]}/slack\n")
    text = (REPO / "deploy" / "alertmanager.yml").read_text().replace("/run/secrets/alert_webhook_url", str(secret))
    config = yaml.safe_load(text)
    for route in [config["route"], *config["route"].get("routes", [])]:
        route["group_wait"] = "0s"
    (tmp_path / "am.yml").write_text(yaml.safe_dump(config))
    (port,) = free_ports(1)
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'am.yml'}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        alert = [
            {
                "labels": {"alertname": "IotadSinkDown", "severity": "critical", "sink": "influxdb"},
                "annotations": {"summary": "No successful write to influxdb for 5 minutes"},
            }
        ]
        while not received:
            assert proc.poll() is None, "alertmanager exited"
            assert time.monotonic() < deadline, "no notification reached the webhook"
            try:
                req = urllib.request.Request(
                    f"{url}/api/v2/alerts",
                    data=json.dumps(alert).encode(),
                    headers={"Content-Type": "application/json"},
                    method="POST",
                )
                urllib.request.urlopen(req, timeout=2).close()
            except OSError:
                pass
            time.sleep(0.3)
        (attachment,) = received[0]["attachments"]
        assert received[0]["channel"] == "#iotad-alerts"
        assert attachment["title"] == "[FIRING:1] IotadSinkDown"
        assert attachment["text"].strip() == "No successful write to influxdb for 5 minutes"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        hook.shutdown()
