"""Alert delivery (connectors/alert_delivery.py) offline: signatures, payload formats, retries, routing."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from pathlib import Path

import pytest

from connectors.alert_delivery import (
    PAGERDUTY_URL,
    AlertmanagerReceiver,
    PagerDutyReceiver,
    RetryPolicy,
    RoutesConfigError,
    SlackReceiver,
    TokenBucket,
    WebhookReceiver,
    alertmanager_payload,
    load_router,
    pagerduty_dedup_key,
    pagerduty_payload,
    router_from_config,
    sign,
    slack_payload,
    verify_signature,
)
from pipeline.alerting import AlertEngine, AlertPolicy, ScoreIn, encode_event

T0 = 1_795_341_600_000


def _alerts() -> tuple[dict, dict, bytes]:
    """A real trigger/resolve pair from the engine (as the deliverer decodes them) and the trigger's bytes."""
    policy = AlertPolicy(
        open_steps=2, resolve_steps=1, storm_share=0, grafana_url="http://grafana/d/x?var-device={device}"
    )
    e = AlertEngine(policy)
    events = []
    for i, above in enumerate([True, True, True, False]):
        s = ScoreIn(
            "pump-7",
            T0 + i * 1000,
            "ok",
            16.0 if above else 1.0,
            5.0,
            above,
            "vibration",
            {"vibration": 3.0},
            None,
            "v9",
        )
        events += e.process(s)
    trigger, resolve = events
    raw = encode_event(trigger)
    return json.loads(raw), json.loads(encode_event(resolve)), raw


def test_signature_round_trip_and_rejections():
    body = b'{"event_id":"x"}'
    now = 1_800_000_000
    sig = sign(b"s3cret", now, body)
    expected = hmac.new(b"s3cret", f"{now}.".encode() + body, hashlib.sha256).hexdigest()
    assert sig == "sha256=" + expected
    assert verify_signature(b"s3cret", body, str(now), sig, now=now + 10)
    assert verify_signature([b"new", b"s3cret"], body, str(now), sig, now=now)  # key rotation
    assert not verify_signature(b"other", body, str(now), sig, now=now)
    assert not verify_signature(b"s3cret", body + b" ", str(now), sig, now=now)  # tampered body
    assert not verify_signature(b"s3cret", body, str(now + 1), sig, now=now)  # tampered timestamp
    assert not verify_signature(b"s3cret", body, str(now), sig, now=now + 301)  # replay window
    assert not verify_signature(b"s3cret", body, str(now), sig, now=now - 301)
    assert not verify_signature(b"s3cret", body, "soon", sig, now=now)
    assert not verify_signature(b"s3cret", body, None, sig, now=now)
    assert not verify_signature(b"s3cret", body, str(now), "sha1=" + expected, now=now)


def test_webhook_sends_the_outbox_bytes_signed_per_attempt():
    trigger, _, raw = _alerts()
    r = WebhookReceiver("hook", "http://127.0.0.1:1/h", secret=b"k")
    req = r.render(trigger, raw, 1_800_000_000.7)
    assert req.body == raw
    assert req.headers["X-Iotad-Timestamp"] == "1800000000"
    assert verify_signature(
        b"k", req.body, req.headers["X-Iotad-Timestamp"], req.headers["X-Iotad-Signature"], now=1_800_000_001
    )
    assert req.headers["X-Iotad-Event-Id"] == trigger["event_id"]
    assert req.headers["X-Iotad-Dedup-Key"] == trigger["dedup_key"]
    later = r.render(trigger, raw, 1_800_000_100.0)
    assert later.headers["X-Iotad-Signature"] != req.headers["X-Iotad-Signature"]
    assert "X-Iotad-Signature" not in WebhookReceiver("plain", "http://x/").render(trigger, raw, 0).headers


def test_slack_payload():
    trigger, resolve, _ = _alerts()
    doc = slack_payload(trigger)
    assert doc["text"].startswith(":warning: [FIRING · critical]")
    assert "pump-7" in doc["text"]
    fields = " ".join(f["text"] for f in doc["blocks"][1]["fields"])
    assert "*Device*\npump-7" in fields and "vibration" in fields and "v9" in fields
    assert "<http://grafana/d/x?var-device=pump-7|grafana>" in doc["blocks"][2]["elements"][0]["text"]
    assert slack_payload(resolve)["text"].startswith(":white_check_mark: [RESOLVED]")
    hostile = dict(trigger, summary="a <b> & c")
    assert "a &lt;b&gt; &amp; c" in slack_payload(hostile)["text"]


def test_pagerduty_payload():
    trigger, resolve, _ = _alerts()
    doc = pagerduty_payload(trigger, "R0UTING")
    assert doc["routing_key"] == "R0UTING" and doc["event_action"] == "trigger"
    assert doc["dedup_key"] == trigger["dedup_key"] == f"iotad:pump-7:{T0}"
    p = doc["payload"]
    assert p["severity"] == "critical" and p["source"] == "pump-7" and p["component"] == "vibration"
    assert p["class"] == "anomaly" and p["group"] == "default"
    assert p["timestamp"] == "2026-11-22T10:00:01.000Z"
    assert p["custom_details"]["model_version"] == "v9"
    assert doc["links"] == [{"href": "http://grafana/d/x?var-device=pump-7", "text": "grafana"}]
    assert pagerduty_payload(resolve, "R0UTING") == {
        "routing_key": "R0UTING",
        "event_action": "resolve",
        "dedup_key": trigger["dedup_key"],
    }
    assert pagerduty_payload(dict(trigger, severity="major"), "k")["payload"]["severity"] == "error"
    long_key = "x" * 300
    assert len(pagerduty_dedup_key(long_key)) <= 255 and pagerduty_dedup_key(long_key) == pagerduty_dedup_key(long_key)


def test_alertmanager_payload_resolves_by_ends_at():
    trigger, resolve, _ = _alerts()
    (fire,) = alertmanager_payload(trigger, now_s=T0 / 1000 + 10, firing_ttl_s=3600)
    (done,) = alertmanager_payload(resolve, now_s=T0 / 1000 + 20, firing_ttl_s=3600)
    assert (
        fire["labels"]
        == done["labels"]
        == {
            "alertname": "IotadDeviceAnomaly",
            "severity": "critical",
            "group": "default",
            "scope": "device",
            "incident": f"iotad:pump-7:{T0}",
            "device": "pump-7",
        }
    )
    assert fire["startsAt"] == done["startsAt"] == "2026-11-22T10:00:00.000Z"
    assert fire["endsAt"] == "2026-11-22T11:00:10.000Z"  # now + ttl while firing
    assert done["endsAt"] == "2026-11-22T10:00:03.000Z"  # back to normal at step 3
    assert fire["annotations"]["top_sensors"] == "vibration" and fire["annotations"]["model_version"] == "v9"
    assert fire["generatorURL"] == "http://grafana/d/x?var-device=pump-7"
    assert AlertmanagerReceiver("am", "http://127.0.0.1:9093/").url == "http://127.0.0.1:9093/api/v2/alerts"


def test_backoff_full_jitter_and_retry_after():
    p = RetryPolicy(base_delay_s=0.5, max_delay_s=4.0, max_retry_after_s=10.0)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (12, 4.0)]:
        delays = [p.backoff_s(attempt) for _ in range(200)]
        assert min(delays) >= 0 and max(delays) <= ceiling
        assert max(delays) > ceiling / 2  # jittered over the whole range
    assert p.backoff_s(1, retry_after=3.0) == 3.0
    assert p.backoff_s(5, retry_after=60.0) == 10.0


def test_token_bucket_limits_the_rate():
    async def go() -> float:
        bucket = TokenBucket(rate=20.0, burst=2)
        t = time.monotonic()
        for _ in range(6):
            await bucket.acquire()
        return time.monotonic() - t

    elapsed = asyncio.run(go())
    assert 0.15 <= elapsed < 1.0  # 2 at once, then 4 at 20/s


ROUTES = {
    "receivers": {
        "ops": {"type": "webhook", "url": "http://127.0.0.1:1/ops", "secret_env": "HOOK_SECRET"},
        "chat": {"type": "slack", "url_file": "slack_url"},
        "pager": {"type": "pagerduty", "routing_key_env": "PD_KEY", "max_attempts": 3},
        "am": {"type": "alertmanager", "url": "http://127.0.0.1:9093", "firing_ttl_s": 600},
    },
    "routes": [
        {"match": {"kind": "storm"}, "receivers": ["chat", "pager"]},
        {"match": {"min_severity": "major", "group": ["plant-*"]}, "receivers": ["pager"], "continue": True},
        {"match": {"device": "test-*"}, "receivers": []},
        {"receivers": ["ops", "chat", "am"]},
    ],
}


def test_routes_file_secrets_and_routing(tmp_path: Path):
    (tmp_path / "slack_url").write_text("https://hooks.slack.example/services/T000/B000/XXXX\n")
    path = tmp_path / "routes.json"
    path.write_text(json.dumps(ROUTES))
    env = {"HOOK_SECRET": "hook-s3cret", "PD_KEY": "pd-r0uting-key"}
    router = load_router(path, env)
    assert isinstance(router.receivers["chat"], SlackReceiver)
    assert router.receivers["chat"].url.endswith("/XXXX")
    pager = router.receivers["pager"]
    assert isinstance(pager, PagerDutyReceiver) and pager.url == PAGERDUTY_URL and pager.retry.max_attempts == 3
    # Secrets never show in reprs.
    text = repr(router.receivers)
    assert "XXXX" not in text and "hook-s3cret" not in text and "pd-r0uting-key" not in text
    assert pager.redact("bad key pd-r0uting-key") == "bad key ***"

    def names(**alert: object) -> list[str]:
        base = {"kind": "device", "severity": "warning", "group": "default", "device_id": "d1"}
        return [r.name for r in router.route({**base, **alert})]

    assert names(kind="storm") == ["chat", "pager"]
    assert names(severity="critical", group="plant-3") == ["pager", "ops", "chat", "am"]
    assert names(severity="warning", group="plant-3") == ["ops", "chat", "am"]
    assert names(device_id="test-1") == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"receivers": {"x": {"type": "sms", "url": "http://x"}}}, "type must be one of"),
        ({"receivers": {"x": {"type": "webhook", "url": "http://x", "secret": "inline"}}}, "<key>_env or <key>_file"),
        ({"receivers": {"x": {"type": "webhook", "url": "http://x", "secret_env": "NOPE"}}}, "NOPE"),
        ({"receivers": {"x": {"type": "pagerduty"}}}, "routing_key_env or routing_key_file"),
        ({"receivers": {"x": {"type": "slack"}}}, "url"),
        ({"receivers": {"x": {"type": "slack", "url_file": "/nonexistent/u"}}}, "cannot read"),
        ({"receivers": {}, "routes": [{"receivers": ["ghost"]}]}, "unknown receivers"),
        ({"receivers": {}, "routes": [{"match": {"severity": "urgent"}, "receivers": []}]}, "unknown severity"),
        ({"receivers": {}, "routes": [{"match": {"colour": "red"}, "receivers": []}]}, "unknown keys"),
        ({"extra": 1}, "unknown keys"),
    ],
)
def test_routes_config_errors(change: dict, message: str):
    doc = {"receivers": {}, "routes": []} | change
    with pytest.raises(RoutesConfigError, match=message) as info:
        router_from_config(doc, {"PD": "secret-value"})
    assert "secret-value" not in str(info.value)
