"""Alert delivery against real servers on loopback: a real Alertmanager routing to a local webhook, and local
aiohttp receivers for the signed webhook, Slack and PagerDuty formats, including receivers that fail.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from connectors.alert_delivery import (
    AlertmanagerReceiver,
    DeliveryResult,
    PagerDutyReceiver,
    Receiver,
    RetryPolicy,
    SlackReceiver,
    WebhookReceiver,
)
from connectors.alertmanager_server import Alertmanager, webhook_config
from connectors.localstack import ServerStartError, free_port
from pipeline.alerting import AlertEngine, AlertPolicy, ScoreIn, encode_event
from tests.integration.alert_receivers import ReceiverServer
from tests.servers import unavailable

pytestmark = pytest.mark.integration

SECRET = b"test-hmac-secret"
ROUTING_KEY = "R0UTINGKEY0123456789012345678901"


def _incident(device: str = "pump-7") -> list[tuple[dict, bytes]]:
    """A trigger and its resolve, from the engine, at current times (Alertmanager cares about endsAt)."""
    t0 = int(time.time() * 1000) - 10_000
    e = AlertEngine(
        AlertPolicy(open_steps=2, resolve_steps=1, storm_share=0, grafana_url="http://grafana/d/x?d={device}")
    )
    events = []
    for i, above in enumerate([True, True, False]):
        s = ScoreIn(device, t0 + i * 1000, "ok", 12.0 if above else 1.0, 5.0, above, "temp", {"temp": 9.0}, None, "v2")
        events += e.process(s)
    return [(json.loads(encode_event(ev)), encode_event(ev)) for ev in events]


@pytest.fixture
def receivers() -> Iterator[ReceiverServer]:
    server = ReceiverServer(SECRET, ROUTING_KEY).start()
    try:
        yield server
    finally:
        server.stop()


async def _deliver(r: Receiver, items: list[tuple[dict, bytes]]) -> list[DeliveryResult]:
    async with aiohttp.ClientSession() as session:
        return [await r.deliver(session, alert, raw) for alert, raw in items]


def _wait(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_real_alertmanager_fires_and_resolves(tmp_path: Path, receivers: ReceiverServer):
    am = Alertmanager(tmp_path / "am", webhook_config(receivers.url("/am-hook")))
    try:
        am.start()
    except ServerStartError as exc:
        unavailable("Alertmanager", exc)
    try:
        (trigger, trigger_raw), (resolve, resolve_raw) = _incident()
        r = AlertmanagerReceiver("am", am.url, firing_ttl_s=3600)
        (res,) = asyncio.run(_deliver(r, [(trigger, trigger_raw)]))
        assert res.ok and res.status == 200
        _wait(lambda: receivers.of("am-hook"), 10, "the firing notification")
        firing = receivers.of("am-hook")[0].doc
        assert firing["status"] == "firing"
        (alert,) = firing["alerts"]
        assert alert["labels"] == {
            "alertname": "IotadDeviceAnomaly",
            "device": "pump-7",
            "group": "default",
            "incident": trigger["dedup_key"],
            "scope": "device",
            "severity": "major",
        }
        assert alert["annotations"]["top_sensors"] == "temp" and alert["generatorURL"] == "http://grafana/d/x?d=pump-7"

        (res,) = asyncio.run(_deliver(r, [(resolve, resolve_raw)]))
        assert res.ok
        _wait(lambda: any(x.doc["status"] == "resolved" for x in receivers.of("am-hook")), 10, "the resolution")
        resolved = next(x.doc for x in receivers.of("am-hook") if x.doc["status"] == "resolved")
        assert resolved["alerts"][0]["labels"]["incident"] == trigger["dedup_key"]
        assert resolved["alerts"][0]["endsAt"].startswith(
            time.strftime("%Y-%m-%dT", time.gmtime(resolve["resolved_at"] / 1000))
        )
    finally:
        am.stop()


def test_http_receivers_formats_signatures_and_failures(receivers: ReceiverServer):
    items = _incident()
    fast = RetryPolicy(max_attempts=4, base_delay_s=0.05, max_delay_s=0.2, budget_s=5.0, circuit_open_s=30.0)
    hook = WebhookReceiver("ops", receivers.url("/webhook/ops"), secret=SECRET, retry=fast)
    slack = SlackReceiver("chat", receivers.url("/slack"), retry=fast, rate_per_s=0)
    pager = PagerDutyReceiver("pager", receivers.url("/pagerduty"), routing_key=ROUTING_KEY, retry=fast)
    for r in (hook, slack, pager):
        results = asyncio.run(_deliver(r, items))
        assert [x.ok for x in results] == [True, True], results
        assert all(x.attempts == 1 for x in results)

    # Signed webhook: the exact outbox bytes, verified by the receiver (wrong key -> 401 -> rejected).
    got = receivers.of("webhook", "ops")
    assert [x.body for x in got] == [raw for _, raw in items]
    assert [x.headers["X-Iotad-Event-Id"] for x in got] == [a["event_id"] for a, _ in items]
    wrong = WebhookReceiver("ops", receivers.url("/webhook/ops"), secret=b"wrong", retry=fast)
    (res,) = asyncio.run(_deliver(wrong, items[:1]))
    assert (res.ok, res.reason, res.status, res.attempts) == (False, "rejected", 401, 1)

    # Slack and PagerDuty payloads as their services expect them.
    texts = [x.doc["text"] for x in receivers.of("slack")]
    assert "FIRING" in texts[0] and "pump-7" in texts[0] and "RESOLVED" in texts[1]
    pd = [x.doc for x in receivers.of("pagerduty")]
    assert [d["event_action"] for d in pd] == ["trigger", "resolve"]
    assert pd[0]["dedup_key"] == pd[1]["dedup_key"] == items[0][0]["dedup_key"]
    assert pd[0]["payload"]["severity"] == "error" and pd[0]["payload"]["source"] == "pump-7"

    # A receiver that answers 503 + Retry-After, then recovers: each alert accepted exactly once, and the
    # retries waited as told.
    receivers.recover_at["f"] = time.monotonic() + 1.5
    flaky = WebhookReceiver("f", receivers.url("/flaky/f"), secret=SECRET, retry=fast)
    t = time.monotonic()
    results = asyncio.run(_deliver(flaky, items))
    assert [x.ok for x in results] == [True, True]
    assert results[0].attempts >= 2 and results[1].attempts == 1
    assert time.monotonic() - t >= 1.0  # Retry-After: 1 honoured (jitter alone would retry within 0.2 s)
    assert [x.doc["event_id"] for x in receivers.of("flaky", "f")] == [a["event_id"] for a, _ in items]
    assert ("flaky/f", 503) in receivers.refused

    # Always failing: the budget is spent, then the receiver counts as down (one attempt per alert).
    broken = WebhookReceiver("b", receivers.url("/broken/b"), secret=SECRET, retry=fast)
    first, second = asyncio.run(_deliver(broken, items))
    assert (first.ok, first.reason, first.attempts, first.status) == (False, "retries_exhausted", 4, 500)
    assert (second.ok, second.reason, second.attempts) == (False, "receiver_down", 1)
    # Rejected payloads are not retried; nobody listening is retried like a 5xx.
    (res,) = asyncio.run(_deliver(WebhookReceiver("r", receivers.url("/reject"), retry=fast), items[:1]))
    assert (res.reason, res.attempts, res.status) == ("rejected", 1, 400)
    closed = WebhookReceiver("c", f"http://127.0.0.1:{free_port()}/x", retry=fast)
    (res,) = asyncio.run(_deliver(closed, items[:1]))
    assert (res.reason, res.attempts, res.status) == ("retries_exhausted", 4, None)
    assert "Connect" in res.detail
