"""Alert lifecycles (pipeline/alerting.py): hysteresis, cooldown, dedup keys, severity, storms, restarts."""

from __future__ import annotations

import random

import msgspec
import pytest

from pipeline.alerting import (
    STORM_KEY,
    AlertEngine,
    AlertEvent,
    AlertPolicy,
    ScoreIn,
    decode_event,
    decode_score,
    encode_event,
    parse_severity_bands,
    policy_from,
    severity_for,
)
from pipeline.settings import Settings

T0 = 1_795_341_600_000
STEP = 1000


def score(
    device: str,
    step: int,
    above: bool = False,
    *,
    ratio: float = 1.5,
    threshold: float = 5.0,
    top: str = "temp",
    status: str = "ok",
    model: str = "v1",
) -> ScoreIn:
    value = threshold * ratio if above else threshold * 0.2
    return ScoreIn(
        device_id=device,
        ts=T0 + step * STEP,
        status=status,
        score=None if status != "ok" else value,
        threshold=threshold,
        is_anomaly=above and status == "ok",
        top_sensor=top,
        values={"temp": 20.0 + step, "vibration": 0.5, "pressure": 1.0},
        forecast={"temp": 20.0, "vibration": 0.4, "pressure": 1.0},
        model_version=model,
    )


def run(engine: AlertEngine, device: str, pattern: str, start: int = 0, **kw: object) -> list[AlertEvent]:
    """Feed a pattern such as "..###..": '#' above threshold, '.' below, 'w' warming up."""
    out = []
    for i, ch in enumerate(pattern):
        status = "warming_up" if ch == "w" else "ok"
        out += engine.process(score(device, start + i, ch == "#", status=status, **kw))  # type: ignore[arg-type]
    return out


def no_storms(**kw: object) -> AlertPolicy:
    base: dict[str, object] = {"open_steps": 3, "resolve_steps": 2, "cooldown_ms": 0, "storm_share": 0.0}
    base.update(kw)
    return AlertPolicy(**base)  # type: ignore[arg-type]


def test_hysteresis_opens_after_n_above_and_resolves_after_m_below():
    e = AlertEngine(no_storms())
    # Blips shorter than open_steps never open an alert.
    assert run(e, "d1", "..#.##..#.") == []
    events = run(e, "d1", "###.#..", start=10)
    assert [(ev.action, ev.triggered_at) for ev in events] == [("trigger", T0 + 12 * STEP), ("resolve", T0 + 12 * STEP)]
    trigger, resolve = events
    assert trigger.dedup_key == resolve.dedup_key == f"iotad:d1:{T0 + 10 * STEP}"
    assert trigger.opened_at == T0 + 10 * STEP
    # A step back above threshold while resolving keeps the alert open; the resolve time is the start of
    # the final run below threshold.
    assert resolve.resolved_at == T0 + 15 * STEP
    assert resolve.steps_above == 4
    assert trigger.event_id == f"{trigger.dedup_key}:trigger" and resolve.event_id.endswith(":resolve")
    assert not trigger.suppressed and not resolve.suppressed


def test_neutral_steps_do_not_break_streaks():
    e = AlertEngine(no_storms())
    events = run(e, "d1", "#w#w#ww.w.")
    assert [ev.action for ev in events] == ["trigger", "resolve"]


def test_cooldown_defers_reopening_and_keeps_the_streak_start():
    e = AlertEngine(no_storms(open_steps=2, resolve_steps=1, cooldown_ms=5 * STEP))
    events = run(e, "d1", "##.####..")
    # Resolved at step 2 -> cooldown until step 7: the streak from step 3 opens at step 7, keyed by step 3.
    assert [(ev.action, ev.triggered_at if ev.action == "trigger" else ev.resolved_at) for ev in events] == [
        ("trigger", T0 + 1 * STEP),
        ("resolve", T0 + 2 * STEP),
    ]
    events = run(e, "d1", "##.", start=9)  # steps 9..11, after the cooldown
    assert [ev.action for ev in events] == ["trigger", "resolve"]
    assert events[0].dedup_key == f"iotad:d1:{T0 + 9 * STEP}"

    e = AlertEngine(no_storms(open_steps=2, resolve_steps=1, cooldown_ms=5 * STEP))
    events = run(e, "d1", "##.######")
    assert [ev.action for ev in events] == ["trigger", "resolve", "trigger"]
    assert events[2].triggered_at == T0 + 7 * STEP
    assert events[2].opened_at == T0 + 3 * STEP


def test_severity_bands_from_the_peak_of_the_opening_streak():
    bands = parse_severity_bands("warning:1, critical:3,major:2")
    assert [b.name for b in bands] == ["critical", "major", "warning"]
    assert severity_for(3.5, bands) == "critical"
    assert severity_for(2.0, bands) == "major"
    assert severity_for(1.01, bands) == "warning"
    assert severity_for(0.5, bands) == "info"
    with pytest.raises(ValueError):
        parse_severity_bands("urgent:2")

    e = AlertEngine(no_storms(open_steps=2))
    e.process(score("d1", 0, True, ratio=1.2))
    (trigger,) = e.process(score("d1", 1, True, ratio=2.4))
    assert trigger.severity == "major"
    assert trigger.ratio == pytest.approx(2.4)
    assert trigger.score == pytest.approx(12.0)
    # The peak keeps being tracked, the severity is fixed (receivers key on it).
    e.process(score("d1", 2, True, ratio=5.0))
    run(e, "d1", ".", start=3)
    (resolve,) = run(e, "d1", ".", start=4)
    assert resolve.severity == "major" and resolve.score == pytest.approx(25.0)


def test_top_sensors_links_model_version_and_groups():
    policy = no_storms(
        open_steps=3,
        top_sensors=2,
        grafana_url="http://grafana/d/iotad-device/x?var-device={device}&var-group={group}&from={from_ms}&to={to_ms}",
        group_pattern=r"^(?P<group>[a-z]+)-",
    )
    e = AlertEngine(policy)
    e.process(score("north-01", 0, True, top="vibration", model="m7"))
    e.process(score("north-01", 1, True, top="temp", model="m7"))
    (trigger,) = e.process(score("north-01", 2, True, top="vibration", model="m7"))
    assert trigger.top_sensors == ["vibration", "temp"]
    assert set(trigger.sensors) <= {"vibration", "temp"}
    assert trigger.sensors["vibration"] == {"value": 0.5, "forecast": 0.4}
    assert trigger.model_version == "m7"
    assert trigger.group == "north"
    assert trigger.links[0].url == (
        f"http://grafana/d/iotad-device/x?var-device=north-01&var-group=north&from={T0}&to=now"
    )
    assert policy.group_of("south-7") == "south"
    assert policy.group_of("X9") == "default"
    assert AlertPolicy(group_pattern=r"^site(\d+)").group_of("site42-a") == "42"
    assert AlertPolicy().group_of("anything") == "default"
    # Placeholders are URL-quoted; unknown placeholders are left alone.
    p = AlertPolicy(grafana_url="http://g/?d={device}&x={unknown}")
    assert (
        p.link(device="a b&c", group="g", dedup_key="k", from_ms=1, to_ms=2)[0].url
        == "http://g/?d=a%20b%26c&x={unknown}"
    )


def test_duplicates_and_replays_are_skipped_and_dedup_keys_are_stable():
    scores = [score("d1", i, ch == "#") for i, ch in enumerate("..####...##.###....")]
    a = AlertEngine(no_storms())
    first = [ev for s in scores for ev in a.process(s)]
    # The scores topic is at-least-once: repeat every score (and some older ones) -> identical alerts.
    b = AlertEngine(no_storms())
    second = []
    for i, s in enumerate(scores):
        second += b.process(s)
        second += b.process(s)
        second += b.process(scores[max(0, i - 3)])
    assert [encode_event(x) for x in first] == [encode_event(x) for x in second]
    assert b.stats.duplicates == 2 * len(scores)


def _storm_policy(**kw: object) -> AlertPolicy:
    base: dict[str, object] = {
        "open_steps": 2,
        "resolve_steps": 2,
        "cooldown_ms": 0,
        "storm_share": 0.5,
        "storm_min_devices": 3,
        "storm_window_ms": 10 * STEP,
    }
    base.update(kw)
    return AlertPolicy(**base)  # type: ignore[arg-type]


def _fleet_step(e: AlertEngine, step: int, above: set[str], devices: list[str]) -> list[AlertEvent]:
    out = []
    for d in devices:
        out += e.process(score(d, step, d in above))
    return out


def test_storm_groups_many_alerts_into_one_and_catches_up_when_it_ends():
    devices = [f"d{i:02d}" for i in range(10)]
    e = AlertEngine(_storm_policy())
    events = _fleet_step(e, 0, set(), devices)
    hit = set(devices[:7])
    events += _fleet_step(e, 1, hit, devices)
    events += _fleet_step(e, 2, hit, devices)  # all 7 reach open_steps here
    device_triggers = [ev for ev in events if ev.kind == "device" and ev.action == "trigger"]
    storm_triggers = [ev for ev in events if ev.kind == "storm" and ev.action == "trigger"]
    assert len(device_triggers) == 7
    # The first two (firing < min_devices) are delivered; the third one starts the storm.
    assert [ev.suppressed for ev in device_triggers] == [False, False] + [True] * 5
    (storm,) = storm_triggers
    assert storm.scope == "fleet" and not storm.suppressed
    assert storm.device_count == 7 and storm.fleet_size == 10
    assert storm.devices == ["d00", "d01", "d02"]
    assert all(ev.suppressed_by == storm.dedup_key for ev in device_triggers[2:])
    assert events.index(storm) < events.index(device_triggers[2])
    assert e.storms["fleet"].active

    # Five devices recover; two (one notified, one suppressed) stay firing.
    still = {"d00", "d03"}
    events = _fleet_step(e, 3, still, devices) + _fleet_step(e, 4, still, devices)
    resolves = [ev for ev in events if ev.action == "resolve" and ev.kind == "device"]
    assert sorted(ev.device_id for ev in resolves) == ["d01", "d02", "d04", "d05", "d06"]
    assert {ev.device_id for ev in resolves if not ev.suppressed} == {"d01"}  # resolved as it was notified
    storm_resolve = [ev for ev in events if ev.kind == "storm"]
    assert [ev.action for ev in storm_resolve] == ["resolve"]
    # The storm ended with d03 still firing and never notified: it is notified now, with its own key.
    catch_up = [ev for ev in events if ev.kind == "device" and ev.action == "trigger"]
    assert [(ev.device_id, ev.suppressed) for ev in catch_up] == [("d03", False)]
    assert catch_up[0].dedup_key == f"iotad:d03:{T0 + STEP}"
    events = _fleet_step(e, 5, set(), devices) + _fleet_step(e, 6, set(), devices)
    assert sorted((ev.device_id, ev.suppressed) for ev in events) == [("d00", False), ("d03", False)]


def test_group_storms_and_fleet_storm_suppresses_group_storms():
    policy = _storm_policy(group_pattern=r"^(?P<group>[a-z]+)-", storm_share=0.5, storm_min_devices=3)
    north = [f"north-{i}" for i in range(4)]
    south = [f"south-{i}" for i in range(8)]
    devices = north + south
    e = AlertEngine(policy)
    events = []
    for step in range(3):
        events += _fleet_step(e, step, set(north) if step else set(), devices)
    storms = [ev for ev in events if ev.kind == "storm"]
    # 4 of 12 devices is no fleet storm, but 4 of 4 in group north is a group storm.
    assert [(ev.scope, ev.action, ev.group, ev.suppressed) for ev in storms] == [
        ("group:north", "trigger", "north", False)
    ]
    assert sum(not ev.suppressed for ev in events if ev.kind == "device") == 2

    # Now most of south alerts too: a fleet storm; its group storm (south) is suppressed by it.
    hit = set(north) | set(south[:6])
    events = []
    for step in range(3, 6):
        events += _fleet_step(e, step, hit, devices)
    storms = [ev for ev in events if ev.kind == "storm"]
    fleet = [ev for ev in storms if ev.scope == "fleet"]
    assert [ev.action for ev in fleet] == ["trigger"] and not fleet[0].suppressed
    south_storm = [ev for ev in storms if ev.scope == "group:south"]
    assert south_storm and south_storm[0].suppressed and south_storm[0].suppressed_by == fleet[0].dedup_key


def test_devices_leave_the_storm_window():
    devices = [f"d{i}" for i in range(6)]
    e = AlertEngine(_storm_policy(storm_window_ms=3 * STEP))
    _fleet_step(e, 0, set(), devices)
    assert e.counts() == (6, 0, 0)
    for step in range(1, 6):  # only d0 keeps sending
        e.process(score("d0", step))
    assert e.counts() == (1, 0, 0)
    _fleet_step(e, 6, set(), devices)
    assert e.counts() == (6, 0, 0)


def _random_fleet(seed: int, steps: int = 60) -> list[tuple[ScoreIn, int]]:
    rng = random.Random(seed)
    devices = [f"{g}-{i}" for g in ("north", "south") for i in range(6)]
    storm_at = rng.randrange(10, steps - 20)
    out = []
    for step in range(steps):
        for i, d in enumerate(devices):
            if rng.random() < 0.05:
                continue  # a missing step
            p = 0.85 if storm_at <= step < storm_at + 8 else 0.12
            status = "warming_up" if step < 2 else "ok"
            out.append((score(d, step, rng.random() < p, ratio=rng.uniform(1.1, 4), status=status), i % 3))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_restart_from_checkpoints_equals_an_uninterrupted_run(seed: int):
    policy = _storm_policy(group_pattern=r"^(?P<group>[a-z]+)-", cooldown_ms=3 * STEP, storm_share=0.4)
    feed = _random_fleet(seed)
    ref = AlertEngine(policy)
    expected = [encode_event(ev) for s, p in feed for ev in ref.process(s, p)]
    assert any(b'"kind":"storm"' in x for x in expected) or seed > 3

    # Restart at random points from what the agent would have written to the changelog, including a replay
    # of scores that were processed but whose offsets were not committed.
    rng = random.Random(seed)
    table: dict[bytes, bytes] = {}
    engine = AlertEngine(policy)
    got: list[bytes] = []
    i = 0
    while i < len(feed):
        n = rng.randrange(1, 200)
        for s, p in feed[i : i + n]:
            got += [encode_event(ev) for ev in engine.process(s, p)]
        devices, storms = engine.take_dirty()
        for d, (_partition, blob) in engine.checkpoint(devices).items():
            table[d.encode()] = blob
        if storms:
            table[STORM_KEY] = engine.storm_blob()
        table[b"\x00checkpoint"] = b""
        i += n
        engine = AlertEngine(policy)
        engine.load(table.items())
        replay_from = max(0, i - rng.randrange(0, 30))
        for s, p in feed[replay_from:i]:
            assert engine.process(s, p) == []  # already applied: skipped
    assert got == expected


def test_wire_round_trip_and_settings():
    raw = msgspec.json.encode(
        {
            "device_id": "d1",
            "ts": T0,
            "status": "ok",
            "score": 7.5,
            "threshold": 5.0,
            "is_anomaly": True,
            "top_sensor": "temp",
            "values": {"temp": 1.0},
            "forecast": None,
            "model_version": "v3",
            "n_readings": 1,
            "emitted_at": T0 + 5,
        }
    )
    s = decode_score(raw)
    assert s.is_anomaly and s.forecast is None and s.model_version == "v3"
    with pytest.raises(msgspec.ValidationError):
        decode_score(b'{"device_id": "d1"}')
    e = AlertEngine(no_storms(open_steps=1))
    (ev,) = e.process(s)
    assert decode_event(encode_event(ev)) == ev
    policy = policy_from(
        Settings(alert_open_steps=4, alert_severity_bands="critical:5,warning:1", alert_storm_clear_share=-1)
    )
    assert policy.open_steps == 4 and policy.bands[0].min_ratio == 5.0
    assert policy.clear_share == pytest.approx(0.1)


def test_recovering_incidents_stay_silent_after_a_storm_unless_they_fire_again():
    devices = [f"d{i:02d}" for i in range(10)]
    e = AlertEngine(_storm_policy(resolve_steps=3))
    hit = set(devices[:7])
    events = []
    for step in range(3):
        events += _fleet_step(e, step, hit if step else set(), devices)
    assert e.storms["fleet"].active
    # Everyone recovers; the storm ends part way through the resolves.
    for step in range(3, 6):
        events += _fleet_step(e, step, set(), devices)
    assert not e.storms["fleet"].active
    catch_up = [ev for ev in events if ev.repeat]
    assert catch_up == []  # nobody was still firing when it ended
    delivered = sorted((ev.device_id or ev.scope, ev.action) for ev in events if not ev.suppressed)
    assert delivered == [
        ("d00", "resolve"),
        ("d00", "trigger"),
        ("d01", "resolve"),
        ("d01", "trigger"),
        ("fleet", "resolve"),
        ("fleet", "trigger"),
    ]

    # A suppressed incident that goes back above threshold while resolving, after the storm: notified then.
    e = AlertEngine(_storm_policy(resolve_steps=3))
    for step in range(3):
        _fleet_step(e, step, hit if step else set(), devices)
    events = _fleet_step(e, 3, set(), devices) + _fleet_step(e, 4, set(), devices)
    events += _fleet_step(e, 5, {"d05"}, devices)
    assert not e.storms["fleet"].active
    (refire,) = [ev for ev in events if ev.device_id == "d05" and ev.action == "trigger"]
    assert refire.repeat and not refire.suppressed and refire.dedup_key == f"iotad:d05:{T0 + STEP}"
    events = [ev for step in range(6, 9) for ev in _fleet_step(e, step, set(), devices)]
    (resolve,) = [ev for ev in events if ev.device_id == "d05"]
    assert resolve.action == "resolve" and not resolve.suppressed
