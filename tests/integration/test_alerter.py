"""`iotad alerter` end to end on real servers: Tansu, an alerter process, a real Alertmanager, local receivers.

Synthetic score records go into <prefix>.scores (the scoring worker is not needed); the alerter turns them
into alert lifecycles on <prefix>.alerts and delivers them: signed webhook, Slack, PagerDuty, Alertmanager
(which notifies a local webhook), a receiver that answers 503 + Retry-After for a while, and one that
fails past its budget (dead-lettered, then re-driven once it works).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError

from connectors.alertmanager_server import Alertmanager, webhook_config
from connectors.kafka_admin import make_producer, read_all
from connectors.localstack import ServerStartError
from pipeline.alert_agents import redrive
from pipeline.settings import Settings
from pipeline.stack import PipelineStack
from tests.integration.alert_receivers import ReceiverServer
from tests.servers import unavailable

pytestmark = pytest.mark.integration

SECRET = "e2e-hmac-secret"
ROUTING_KEY = "E2EROUTINGKEY000000000000000000"
STEP = 1000
DEVICES = [f"{g}-{i}" for g in ("north", "south", "east", "west", "plant") for i in (1, 2)]


def _score(device: str, ts: int, ratio: float | None) -> bytes:
    above = ratio is not None
    value = 5.0 * ratio if ratio is not None else 1.0
    return msgspec.json.encode(
        {
            "device_id": device,
            "ts": ts,
            "status": "ok",
            "score": value,
            "threshold": 5.0,
            "is_anomaly": above,
            "top_sensor": "vibration" if above else "temp",
            "values": {"temp": 21.0, "vibration": 3.0 if above else 0.4},
            "forecast": {"temp": 21.1, "vibration": 0.4},
            "model_version": "lstm-v7",
            "n_readings": 1,
            "emitted_at": ts + 50,
        }
    )


class Feed:
    """Produces one score per device per step; ``plan(step) -> {device: ratio}`` says who is anomalous."""

    def __init__(self, bootstrap: str, topic: str, plan: Callable[[int], dict[str, float]]) -> None:
        self.producer = make_producer(bootstrap)
        self.topic = topic
        self.plan = plan
        self.t0 = (int(time.time() * 1000) // STEP - 120) * STEP
        self.sent = 0

    def ts(self, step: int) -> int:
        return self.t0 + step * STEP

    def steps(self, first: int, last: int) -> None:
        for step in range(first, last + 1):
            hot = self.plan(step)
            for d in DEVICES:
                self.producer.send(self.topic, key=d.encode(), value=_score(d, self.ts(step), hot.get(d)))
                self.sent += 1
        self.producer.flush()

    def close(self) -> None:
        self.producer.close()


def _wait(cond: Callable[[], Any], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def receivers() -> Iterator[ReceiverServer]:
    server = ReceiverServer(SECRET.encode(), ROUTING_KEY).start()
    try:
        yield server
    finally:
        server.stop()


def _committed(bootstrap: str, group: str, topic: str) -> int:
    """Sum of the group's committed offsets on topic (0 while it has none)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="iotad-test-admin")
    try:
        offsets = admin.list_group_offsets({group: None}).get(group, {})
    except KafkaError:
        return 0
    finally:
        admin.close()
    return sum(o.offset for tp, o in offsets.items() if tp.topic == topic and o.offset > 0)


def _routes(tmp_path: Path, receivers: ReceiverServer, am_url: str) -> Path:
    (tmp_path / "hook_secret").write_text(SECRET + "\n")
    (tmp_path / "slack_url").write_text(receivers.url("/slack"))
    (tmp_path / "pd_key").write_text(ROUTING_KEY)
    signed = {"type": "webhook", "secret_file": "hook_secret"}
    doc = {
        "receivers": {
            "hook": {**signed, "url": receivers.url("/webhook/hook")},
            "flaky": {**signed, "url": receivers.url("/flaky/flaky")},
            "broken": {**signed, "url": receivers.url("/flaky/broken"), "max_attempts": 2, "budget_s": 3},
            "chat": {"type": "slack", "url_file": "slack_url", "rate_per_s": 20},
            "pager": {"type": "pagerduty", "url": receivers.url("/pagerduty"), "routing_key_file": "pd_key"},
            "am": {"type": "alertmanager", "url": am_url, "firing_ttl_s": 600},
        },
        "routes": [
            {"match": {"kind": "storm"}, "receivers": ["hook", "chat", "pager"]},
            {"match": {"min_severity": "critical"}, "receivers": ["pager"], "continue": True},
            {"match": {"group": "plant"}, "receivers": ["hook", "chat"]},
            {"receivers": ["hook", "flaky", "chat", "am", "broken"]},
        ],
    }
    path = tmp_path / "routes.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _settings(tmp_path: Path, name: str, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "topic_prefix": name,
        "app_id": f"{name}-worker",
        "alert_app_id": f"{name}-alerter",
        "influx_database": name.replace("-", "_"),
        "data_dir": tmp_path,
        "partitions": 1,  # one partition: the storm guard sees the scores in production order
        "alert_open_steps": 2,
        "alert_resolve_steps": 2,
        "alert_cooldown_ms": 5 * STEP,
        "alert_group_pattern": r"^(?P<group>[a-z]+)-",
        "alert_storm_share": 0.5,
        "alert_storm_min_devices": 3,
        "alert_storm_window_ms": 10 * STEP,
        "alert_grafana_url": "http://grafana.test/d/iotad-device/x?var-device={device}&from={from_ms}&to={to_ms}",
        "alert_retry_base_s": 0.05,
        "alert_retry_max_delay_s": 0.5,
        "alert_retry_budget_s": 8.0,
        "alert_retry_max_attempts": 30,
    }
    base.update(kw)
    return Settings(**base)


def _plan(step: int) -> dict[str, float]:
    hot: dict[str, float] = {}
    if step == 2:
        hot["east-1"] = 2.0  # a one-step blip: never an alert
    if 2 <= step <= 5 or 9 <= step <= 13:
        hot["north-1"] = 4.0  # critical; the second streak starts inside the cooldown
    if 2 <= step <= 3:
        hot["plant-1"] = 1.5  # warning, routed to hook + chat only
    if 22 <= step <= 25:  # the storm: 7 of 10 devices
        for d in ("north-1", "north-2", "south-1", "south-2", "east-1", "east-2", "west-1"):
            hot[d] = 2.5
    return hot


def test_alerter_end_to_end(tmp_path: Path, receivers: ReceiverServer):
    am = Alertmanager(tmp_path / "am", webhook_config(receivers.url("/am-hook")))
    try:
        am.start()
    except ServerStartError as exc:
        unavailable("Alertmanager", exc)
    s = _settings(tmp_path, "alerts-e2e", alert_routes=str(_routes(tmp_path, receivers, am.url)))
    receivers.recover_at["flaky"] = time.monotonic() + 1e6  # down until the first alert has been tried
    receivers.recover_at["broken"] = time.monotonic() + 1e6
    stack = PipelineStack(s, workers=0, alerters=1)
    try:
        stack.start()
    except ServerStartError as exc:
        am.stop()
        unavailable("local stack", exc)
    feed = Feed(stack.bootstrap, s.scores_topic, _plan)
    try:
        ts = feed.ts

        def am_notified(status: str, key: str) -> bool:
            return any(
                n.doc["status"] == status and a["labels"]["incident"] == key
                for n in receivers.of("am-hook")
                for a in n.doc["alerts"]
            )

        def hook_ids() -> list[str]:
            return [r.doc["event_id"] for r in receivers.of("webhook", "hook")]

        n1 = [f"alerts-e2e:north-1:{ts(2)}", f"alerts-e2e:north-1:{ts(9)}", f"alerts-e2e:north-1:{ts(22)}"]
        n2 = f"alerts-e2e:north-2:{ts(22)}"
        p1 = f"alerts-e2e:plant-1:{ts(2)}"
        # A: north-1 and plant-1 open at step 3. flaky answers 503 + Retry-After: 1 for ~2 s more.
        feed.steps(0, 3)
        feed.producer.send(s.scores_topic, key=b"north-1", value=b'{"device_id": "north-1", "ts": "soon"}')
        _wait(lambda: receivers.refused, "a first delivery attempt")
        receivers.recover_at["flaky"] = time.monotonic() + 2.0
        _wait(lambda: am_notified("firing", n1[0]), "Alertmanager: north-1 firing")
        _wait(lambda: {f"{n1[0]}:trigger", f"{p1}:trigger"} <= set(hook_ids()), "hook: the first triggers")
        # B: both resolve; north-1 is above again from step 9, in its cooldown (until step 12).
        feed.steps(4, 10)
        _wait(lambda: am_notified("resolved", n1[0]), "Alertmanager: north-1 resolved")
        feed.steps(11, 12)
        _wait(lambda: am_notified("firing", n1[1]), "Alertmanager: north-1 firing again after the cooldown")
        feed.steps(13, 22)
        _wait(lambda: am_notified("resolved", n1[1]), "Alertmanager: second north-1 incident resolved")
        # C: 7 of 10 devices open at step 23: two alerts go out, then one storm alert for the rest.
        feed.steps(23, 23)
        _wait(lambda: am_notified("firing", n2), "Alertmanager: north-2 firing")
        feed.steps(24, 30)
        _wait(lambda: am_notified("resolved", n2) and am_notified("resolved", n1[2]), "Alertmanager: resolves")

        storm_key = f"alerts-e2e:storm:fleet:{ts(23)}"
        device_incidents = [*n1, n2]
        expected_hook = {f"{k}:{a}" for k in [*device_incidents, p1, storm_key] for a in ("trigger", "resolve")}
        expected_default = {f"{k}:{a}" for k in device_incidents for a in ("trigger", "resolve")}
        _wait(lambda: set(hook_ids()) == expected_hook, "hook: every alert")
        _wait(lambda: len(receivers.of("flaky", "flaky")) >= len(expected_default), "flaky: every alert")
        _wait(lambda: len(receivers.of("slack")) >= len(expected_hook), "slack: every alert")
        _wait(lambda: len(receivers.of("pagerduty")) >= 6, "pagerduty: critical alerts and the storm")
        dead = read_all(stack.bootstrap, s.alerts_dlq_topic, min_records=len(expected_default) + 1, timeout_s=20)
        invalid = [r for r in dead if r.headers["iotad-reason"] == b"invalid_score"]
        dlq = [r for r in dead if r not in invalid]
        outbox = [msgspec.json.decode(r.value) for r in read_all(stack.bootstrap, s.alerts_topic, min_records=20)]
        alerter = stack.alerter_procs[0]
        failed = alerter.metric('iotad_alert_deliveries_total{outcome="failed",receiver="broken"}')
        opened = alerter.metric("iotad_alerts_opened_total")
        suppressed = alerter.metric("iotad_alerts_suppressed_total")

        # The receiver that failed past its budget: every alert routed to it is dead-lettered with the reason,
        # and re-driving the dead letters once it works delivers each of them to it (and only to it).
        # The unreadable score: dead-lettered with its original bytes, nothing else happened to north-1.
        assert [(r.key, r.value) for r in invalid] == [(b"north-1", b'{"device_id": "north-1", "ts": "soon"}')]
        assert invalid[0].headers["iotad-topic"].decode() == s.scores_topic
        assert {r.headers["iotad-event-id"].decode() for r in dlq} == expected_default
        assert len(dlq) == len(expected_default)
        assert {r.headers["iotad-receiver"] for r in dlq} == {b"broken"}
        assert {r.headers["iotad-reason"] for r in dlq} <= {b"retries_exhausted", b"receiver_down"}
        assert all(r.headers["iotad-topic"].decode() == s.alerts_topic and r.headers["iotad-detail"] for r in dlq)
        assert all(r.key == msgspec.json.decode(r.value)["dedup_key"].encode() for r in dlq)
        receivers.recover_at["broken"] = 0.0
        before = len(hook_ids())
        counts = redrive(s.model_copy(update={"kafka_bootstrap": stack.bootstrap}), timeout_s=20)
        assert counts == {"redriven": len(expected_default), "skipped": 1}
        _wait(lambda: len(receivers.of("flaky", "broken")) >= len(expected_default), "broken: re-driven alerts")
        time.sleep(0.5)
        assert len(hook_ids()) == before  # re-drive targets the failed receiver only
    finally:
        feed.close()
        stack.stop()
        am.stop()

    # Every alert reached every receiver routed to it exactly once (no crash here, so at-least-once did not
    # need to repeat anything), in order, with valid signatures.
    hook = Counter(hook_ids())
    assert set(hook) == expected_hook and max(hook.values()) == 1
    flaky = Counter(r.doc["event_id"] for r in receivers.of("flaky", "flaky"))
    assert set(flaky) == expected_default and max(flaky.values()) == 1
    assert sum(1 for e, status in receivers.refused if e == "flaky/flaky" and status == 503) >= 1
    broken = Counter(r.doc["event_id"] for r in receivers.of("flaky", "broken"))
    assert set(broken) == expected_default and max(broken.values()) == 1
    assert not [r for r in receivers.refused if r[1] == 401], "every signature verified"
    assert len(receivers.of("slack")) == len(expected_hook)
    order = [r.doc["event_id"] for r in receivers.of("webhook", "hook")]
    for key in [*device_incidents, p1, storm_key]:
        assert order.index(f"{key}:trigger") < order.index(f"{key}:resolve")

    # Contents: severity from the score ratio, top sensors, model version, group, links.
    by_id = {r.doc["event_id"]: r.doc for r in receivers.of("webhook", "hook")}
    first = by_id[f"{n1[0]}:trigger"]
    assert first["severity"] == "critical" and first["group"] == "north"
    assert first["top_sensors"] == ["vibration"] and first["model_version"] == "lstm-v7"
    assert first["links"][0]["url"] == f"http://grafana.test/d/iotad-device/x?var-device=north-1&from={ts(2)}&to=now"
    assert by_id[f"{p1}:trigger"]["severity"] == "warning"
    assert by_id[f"{n1[1]}:trigger"]["triggered_at"] == ts(12)  # held back by the cooldown, keyed by step 9
    storm = by_id[f"{storm_key}:trigger"]
    assert storm["kind"] == "storm" and storm["device_count"] == 7 and storm["fleet_size"] == 10
    assert storm["severity"] == "major"

    # PagerDuty: critical device incidents and the storm, trigger then resolve under one dedup key.
    pd = [r.doc for r in receivers.of("pagerduty")]
    assert Counter((d["dedup_key"], d["event_action"]) for d in pd) == Counter(
        {(k, a): 1 for k in (n1[0], n1[1], storm_key) for a in ("trigger", "resolve")}
    )
    # Alertmanager got (and notified) exactly the default-routed incidents: not plant-1, not the storm.
    am_keys = {a["labels"]["incident"] for n in receivers.of("am-hook") for a in n.doc["alerts"]}
    assert am_keys == set(device_incidents)

    # The outbox holds everything, suppressed storm members included (audit trail), once each.
    ids = Counter(x["event_id"] for x in outbox)
    assert max(ids.values()) == 1
    members = {f"alerts-e2e:{d}:{ts(22)}" for d in ("south-1", "south-2", "east-1", "east-2", "west-1")}
    held = {x["dedup_key"] for x in outbox if x["suppressed"]}
    assert held == members
    assert all(x["suppressed_by"] == storm_key for x in outbox if x["suppressed"] and x["action"] == "trigger")
    assert not any("east-1:" + str(ts(2)) in x["dedup_key"] for x in outbox)  # the blip
    assert opened == 11 and suppressed == 10  # 5 device incidents + 5 held back + 1 storm; 5 x (trigger, resolve)
    assert failed == len(expected_default)


def test_alerter_restart_recovers_lifecycle_state(tmp_path: Path, receivers: ReceiverServer):
    (tmp_path / "hook_secret").write_text(SECRET)
    routes = tmp_path / "routes.json"
    routes.write_text(
        msgspec.json.encode(
            {
                "receivers": {
                    "hook": {"type": "webhook", "url": receivers.url("/webhook/hook"), "secret_file": "hook_secret"}
                },
                "routes": [{"receivers": ["hook"]}],
            }
        ).decode()
    )
    s = _settings(
        tmp_path,
        "alerts-restart",
        partitions=2,
        alert_open_steps=3,
        alert_routes=str(routes),
        broker_session_timeout_s=3.0,
    )
    plan: dict[int, dict[str, float]] = {0: {"south-2": 3.0}, 1: {"south-2": 3.0}, 2: {"south-2": 3.0}}
    stack = PipelineStack(s, workers=0, alerters=1)
    try:
        stack.start()
    except ServerStartError as exc:
        unavailable("local stack", exc)
    feed = Feed(stack.bootstrap, s.scores_topic, lambda step: plan.get(step, {}))
    key = f"alerts-restart:south-2:{feed.ts(0)}"
    try:
        # Two of the three steps needed: pending, checkpointed. Then the alerter is killed (no clean stop).
        feed.steps(0, 1)
        first = stack.alerter_procs[0]
        _wait(lambda: first.metric("iotad_messages_consumed_total") >= feed.sent, "the alerter to consume")
        # Committed offsets come after the batch's checkpoint; once they cover everything sent, a restart
        # cannot re-read these scores: the pending streak can only come back from the changelog.
        _wait(lambda: _committed(stack.bootstrap, s.alert_app_id, s.scores_topic) >= feed.sent, "the commit")
        first.stop(kill=True)
        consumed_before = feed.sent
        second = stack.add_alerter()
        # The third step opens the alert with the streak's first step as its key: the state survived.
        # Steps 3 and 4 are below threshold: resolved.
        feed.steps(2, 5)
        _wait(lambda: [r for r in receivers.of("webhook", "hook")], "the trigger after the restart")
        _wait(lambda: len(receivers.of("webhook", "hook")) >= 2, "the resolve")
        outbox = [msgspec.json.decode(r.value) for r in read_all(stack.bootstrap, s.alerts_topic, min_records=2)]
        # The resolve can go out before the other partition's last scores are consumed: wait for those.
        rest = feed.sent - consumed_before
        _wait(lambda: second.metric("iotad_messages_consumed_total") >= rest, "the rest to be consumed")
    finally:
        feed.close()
        stack.stop()
    # Its first batch started from the recovered table (a rebalance may make it re-read uncommitted scores
    # later: they are skipped as not newer than the devices' checkpoints).
    loads = [line for line in second.log_path.read_text().splitlines() if "alert state loaded" in line]
    assert loads and "alert state loaded: 10 devices" in loads[0]
    # The alerter's consumer got the configured fetch wait too (Tansu holds a fetch for part of it).
    assert f"consumer fetch_max_wait_ms = {s.kafka_fetch_max_wait_ms}" in second.log_path.read_text()
    # At-least-once: when the dead member's session expires the group rebalances, and records not yet
    # committed may be delivered again: always the same event, same dedup key, same content.
    got: dict[str, dict] = {}
    for r in receivers.of("webhook", "hook"):
        doc = {k: v for k, v in r.doc.items() if k != "emitted_at"}
        assert got.setdefault(doc["event_id"], doc) == doc
    assert list(got) == [f"{key}:trigger", f"{key}:resolve"]
    assert got[f"{key}:trigger"]["triggered_at"] == feed.ts(2)
    assert got[f"{key}:resolve"]["resolved_at"] == feed.ts(3)
    assert {x["event_id"] for x in outbox} == {f"{key}:trigger", f"{key}:resolve"}
