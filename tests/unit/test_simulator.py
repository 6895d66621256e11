"""The fleet simulator: determinism, anomaly ground truth, malformed messages, the Kafka shell."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import msgspec
import numpy as np
import pytest

from connectors.simulator import (
    ANOMALY_KINDS,
    DEFAULT_SENSORS,
    MALFORMED_KINDS,
    MIN_GAP_STEPS,
    FleetSimulator,
    SimStats,
    aligned_now_ms,
    malformed,
    run_simulation,
    upload_offset_ms,
)
from pipeline.schema import (
    MAX_MESSAGE_BYTES,
    Limits,
    Reading,
    Reason,
    Rejection,
    encode_envelope,
    encode_reading,
    validate,
)

NOW_MS = 1_795_341_600_000  # 2026-11-22T10:00:00Z
LIMITS = Limits(sensors=DEFAULT_SENSORS, min_ts_ms=946_684_800_000, max_future_skew_ms=300_000)


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self.flushed = 0

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> None:
        assert value is not None
        self.sent.append((topic, key, value))

    def flush(self, timeout: float | None = None) -> None:
        self.flushed += 1


class FakeTime:
    """A monotonic clock that only moves when slept on (or ticked)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def _sim(n_devices: int = 20, **kw: Any) -> FleetSimulator:
    kw.setdefault("seed", 11)
    kw.setdefault("start_ts_ms", NOW_MS - 10_000_000)
    return FleetSimulator(n_devices, **kw)


# ---------------------------------------------------------------------- generation


def test_deterministic_under_seed() -> None:
    a, b = _sim(), _sim()
    sa, sb = a.series(1500), b.series(1500)
    assert np.array_equal(sa.values, sb.values)
    assert np.array_equal(sa.ts_ms, sb.ts_ms)
    assert np.array_equal(sa.anomaly_mask, sb.anomaly_mask)
    assert a.anomalies == b.anomalies
    assert a.anomalies, "the default rate should inject some anomalies in 1500 steps x 20 devices"
    c = _sim(seed=12).series(1500)
    assert not np.allclose(c.values, sa.values)


def test_step_and_series_agree_however_chunked() -> None:
    a, b, c = _sim(n_devices=7), _sim(n_devices=7), _sim(n_devices=7)
    whole = a.series(1300)
    parts = [b.series(k) for k in (1, 5, 994, 300)]
    assert np.array_equal(np.concatenate([p.values for p in parts]), whole.values)
    assert np.array_equal(np.concatenate([p.anomaly_mask for p in parts]), whole.anomaly_mask)
    assert a.anomalies == b.anomalies
    for t in range(40):
        rows = c.step()
        assert [r[0] for r in rows] == c.device_ids
        assert {r[1] for r in rows} == {int(whole.ts_ms[t])}
        got = np.array([[r[2][s] for s in DEFAULT_SENSORS] for r in rows])
        assert np.array_equal(got, whole.values[t])


def test_shapes_timestamps_and_device_ids() -> None:
    sim = _sim(n_devices=3, step_ms=500, start_ts_ms=NOW_MS, device_prefix="pump")
    assert sim.device_ids == ["pump-0000", "pump-0001", "pump-0002"]
    s = sim.series(10)
    assert s.values.shape == (10, 3, 4) and s.anomaly_mask.shape == (10, 3, 4)
    assert s.ts_ms.dtype == np.int64
    assert list(s.ts_ms) == [NOW_MS + 500 * i for i in range(10)]
    assert sim.next_ts_ms == NOW_MS + 5000
    sim.align_to(NOW_MS + 123_000)
    assert sim.step()[0][1] == NOW_MS + 123_000
    assert aligned_now_ms(1000, 1_700_000_000.002) == 1_700_000_001_000
    assert aligned_now_ms(1000, 1_700_000_000.0) == 1_700_000_000_000


def test_large_fleet_single_step() -> None:
    sim = FleetSimulator(100_000, seed=1, start_ts_ms=NOW_MS)
    ts, values, mask = sim.step_arrays()
    assert ts == NOW_MS and values.shape == (100_000, 4) and mask.shape == (100_000, 4)
    rows = sim.step()
    assert len(rows) == 100_000
    assert rows[-1][0] == "dev-99999" and rows[-1][1] == NOW_MS + 1000
    assert set(rows[12345][2]) == set(DEFAULT_SENSORS)
    assert np.isfinite(values).all()


def test_signals_are_plausible_and_learnable() -> None:
    s = _sim(anomaly_rate=0).series(3000)
    v = s.values
    assert np.isfinite(v).all()
    means = v.mean(axis=(0, 1))
    assert 35 < means[0] < 80 and 1 < means[1] < 7 and 0.2 < means[2] < 5 and 3 < means[3] < 30
    # a next-step forecaster beats the per-series spread by far: consecutive steps are close
    spread = v.std(axis=0).mean(axis=0)
    step_change = np.abs(np.diff(v, axis=0)).mean(axis=(0, 1))
    assert np.all(step_change < 0.5 * spread)
    # current drives temperature with a lag: the correlation peaks at a positive lag
    cur = v[:, :, 3] - v[:, :, 3].mean(axis=0)
    tmp = v[:, :, 0] - v[:, :, 0].mean(axis=0)

    def corr(lag: int) -> float:
        return float(np.mean([np.corrcoef(cur[: len(cur) - lag, d], tmp[lag:, d])[0, 1] for d in range(20)]))

    assert corr(8) > corr(0) > 0.3


def test_custom_sensor_names() -> None:
    sim = _sim(sensors=("flow", "temp", "rpm", 'odd "name"\n'), n_devices=4)
    rows = sim.step()
    assert list(rows[0][2]) == ["flow", "temp", "rpm", 'odd "name"\n']
    assert np.isfinite(sim.series(200).values).all()


# ---------------------------------------------------------------------- anomalies


def _with_and_without(n_steps: int, **kw: Any) -> tuple[FleetSimulator, np.ndarray, np.ndarray, np.ndarray]:
    sim = _sim(n_devices=40, anomaly_rate=6.0, **kw)
    s = sim.series(n_steps)
    clean = _sim(n_devices=40, anomaly_rate=0.0, **kw).series(n_steps).values
    return sim, s.values, clean, s.anomaly_mask


def test_anomalies_are_where_the_labels_say() -> None:
    n_steps = 3000
    sim, values, clean, mask = _with_and_without(n_steps)
    anomalies = sim.anomalies
    assert {a.kind for a in anomalies} == set(ANOMALY_KINDS)
    # the mask is exactly the union of the labelled windows (clipped to the generated range)
    expect = np.zeros_like(mask)
    for a in anomalies:
        d, s = sim.device_ids.index(a.device_id), sim.sensors.index(a.sensor)
        expect[a.start_step : min(a.end_step, n_steps), d, s] = True
    assert np.array_equal(mask, expect)
    # outside the windows the signal is exactly the clean counterfactual
    assert np.array_equal(values[~mask], clean[~mask])
    kinds_checked: Counter[str] = Counter()
    for a in anomalies:
        if a.end_step > n_steps:
            continue
        d, s = sim.device_ids.index(a.device_id), sim.sensors.index(a.sensor)
        sigma = sim.noise_std[d, s]
        win = slice(a.start_step, a.end_step)
        dev = (values[win, d, s] - clean[win, d, s]) / sigma
        if a.kind in ("spike", "level_shift"):
            assert 1 <= a.end_step - a.start_step <= (3 if a.kind == "spike" else 150)
            assert np.all(np.abs(dev) > (7.9 if a.kind == "spike" else 4.9)), a
            assert np.all(np.sign(dev) == np.sign(a.magnitude)), a
        elif a.kind == "drift":
            assert abs(dev[-1]) > 7.9, a
            assert np.all(np.diff(np.abs(dev)) > 0), a  # a ramp
        elif a.kind == "stuck":
            frozen = values[win, d, s]
            assert np.all(frozen == frozen[0]) and frozen[0] == values[a.start_step - 1, d, s], a
            assert np.std(clean[win, d, s]) > 0  # ... whereas the real signal moves
        else:
            assert np.sqrt(np.mean(dev**2)) > 1.5, a
        kinds_checked[a.kind] += 1
    assert set(kinds_checked) == set(ANOMALY_KINDS)


def test_anomaly_schedule_rules() -> None:
    sim, _, _, _ = _with_and_without(3000, anomalies_after_step=200)
    by_device: dict[str, list[tuple[int, int]]] = {}
    for a in sim.anomalies:
        assert a.start_step >= 200
        assert a.start_ts_ms == sim.ts_of(a.start_step) and a.end_ts_ms == sim.ts_of(a.end_step)
        assert a.covers_ts(a.start_ts_ms) and not a.covers_ts(a.end_ts_ms)
        by_device.setdefault(a.device_id, []).append((a.start_step, a.end_step))
    for windows in by_device.values():
        windows.sort()
        for (_, end), (start, _) in itertools.pairwise(windows):
            assert start >= end + MIN_GAP_STEPS
    starts = [a.start_step for a in sim.anomalies]
    assert starts == sorted(starts)


def test_anomaly_rate_zero_and_explicit_count() -> None:
    none = _sim(anomaly_rate=0)
    assert not none.series(2000).anomaly_mask.any() and none.anomalies == []
    exact = _sim(n_devices=5, anomaly_count=12, anomaly_horizon_steps=1500)
    s = exact.series(1500)
    assert len(exact.anomalies) == 12
    assert all(a.end_step <= 1500 for a in exact.anomalies)
    assert not s.anomaly_mask[:60].any()
    only = _sim(anomaly_count=30, anomaly_horizon_steps=3000, anomaly_kinds=("spike",))
    only.series(3000)
    assert {a.kind for a in only.anomalies} == {"spike"}


def test_inject_explicit_anomaly() -> None:
    sim = _sim(n_devices=3, anomaly_rate=0)
    clean = _sim(n_devices=3, anomaly_rate=0).series(100).values
    sim.inject("dev-0001", "level_shift", "pressure", start_step=40, duration=10, magnitude=-6.0)
    s = sim.series(100)
    [a] = sim.anomalies
    assert (a.device_id, a.kind, a.sensor, a.start_step, a.end_step) == (
        "dev-0001",
        "level_shift",
        "pressure",
        40,
        50,
    )
    assert s.anomaly_mask[:, 1, 1].sum() == 10 and s.anomaly_mask.sum() == 10
    np.testing.assert_allclose(s.values[40:50, 1, 1] - clean[40:50, 1, 1], -6.0 * sim.noise_std[1, 1], atol=1e-3)
    with pytest.raises(ValueError):
        sim.inject(0, "spike", "temp", start_step=10, duration=1, magnitude=9.0)  # in the past


# ---------------------------------------------------------------------- wire format

_EXPECTED_REASONS: dict[str, set[Reason]] = {
    "random_bytes": {Reason.BAD_JSON},
    "truncated_json": {Reason.BAD_JSON},
    "wrong_type": {Reason.BAD_SCHEMA},
    "nan": {Reason.BAD_JSON, Reason.NON_FINITE},
    "infinity": {Reason.BAD_JSON, Reason.NON_FINITE, Reason.VALUE_OUT_OF_RANGE},  # 1e999: "number out of range"
    "huge_number": {Reason.VALUE_OUT_OF_RANGE},
    "huge_string": {Reason.BAD_DEVICE_ID, Reason.BAD_SCHEMA},
    "missing_fields": {Reason.BAD_SCHEMA},
    "unknown_sensors": {Reason.UNKNOWN_SENSORS},
    "key_mismatch": {Reason.KEY_MISMATCH},
    "absurd_timestamp": {Reason.TIMESTAMP_OUT_OF_RANGE, Reason.BAD_TIMESTAMP},
    "oversized": {Reason.OVERSIZED},
    "empty_object": {Reason.BAD_SCHEMA},
    "bad_device_id": {Reason.BAD_DEVICE_ID},
}


def test_expected_reasons_cover_every_kind() -> None:
    assert set(_EXPECTED_REASONS) == set(MALFORMED_KINDS)


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
@pytest.mark.parametrize("sensors", [DEFAULT_SENSORS, ("level",)])
def test_every_malformed_kind_is_rejected(kind: str, sensors: tuple[str, ...]) -> None:
    limits = Limits(sensors=sensors, min_ts_ms=946_684_800_000, max_future_skew_ms=300_000)
    rng = np.random.default_rng(5)
    padded = set()
    for _ in range(8 if kind == "oversized" else 40):
        key, value, got_kind = malformed(rng, kind, sensors=sensors, device_id="dev-0042", now_ms=NOW_MS)
        assert got_kind == kind
        out = validate(value, key, limits, NOW_MS)
        assert out and all(isinstance(r, Rejection) for r in out), (kind, value[:200], out)
        assert {r.reason for r in out if isinstance(r, Rejection)} <= _EXPECTED_REASONS[kind], (kind, out)
        if kind == "oversized":
            assert MAX_MESSAGE_BYTES < len(value) < 2 * MAX_MESSAGE_BYTES
            padded.add(value.startswith(b"{"))  # a padded reading, or a blob of random bytes
    assert kind != "oversized" or padded == {True, False}


def test_malformed_random_kind_and_unknown_kind() -> None:
    rng = np.random.default_rng(0)
    kinds = {malformed(rng, now_ms=NOW_MS)[2] for _ in range(400)}
    assert kinds == set(MALFORMED_KINDS)
    with pytest.raises(ValueError):
        malformed(rng, "nope")


def test_valid_simulator_messages_pass_validation() -> None:
    sim = _sim(n_devices=5, start_ts_ms=NOW_MS - 100_000, anomaly_rate=50.0, anomalies_after_step=0)
    history: list[list[tuple[str, int, dict[str, float]]]] = [sim.step() for _ in range(60)]
    for rows in history:
        for device_id, ts, values in rows:
            out = validate(encode_reading(device_id, ts, values), device_id.encode(), LIMITS, NOW_MS)
            assert out == [Reading(device_id, ts, tuple(values[s] for s in DEFAULT_SENSORS))]
    for d, device_id in enumerate(sim.device_ids):
        group = [(rows[d][1], rows[d][2]) for rows in history[:10]]
        out = validate(encode_envelope(device_id, group), device_id.encode(), LIMITS, NOW_MS)
        assert len(out) == 10 and all(isinstance(r, Reading) for r in out)


# ---------------------------------------------------------------------- Kafka shell


def _decode(value: bytes) -> dict:
    return msgspec.json.decode(value)


def test_run_simulation_counts_and_keys() -> None:
    sim = _sim(n_devices=10, start_ts_ms=NOW_MS - 200_000, anomaly_rate=20.0, anomalies_after_step=5)
    prod = FakeProducer()
    seen: list[int] = []
    stats = run_simulation(
        prod,
        "t.readings",
        sim,
        steps=50,
        malformed_every=7,
        late_every=11,
        progress=lambda i, _s: seen.append(i),
    )
    assert isinstance(stats, SimStats)
    assert seen == list(range(50)) and prod.flushed == 1
    assert stats.steps == 50 and stats.readings_sent == 500
    assert stats.malformed_sent == 500 // 7 == sum(stats.malformed_by_kind.values())
    assert 0 < stats.late_sent <= 500 // 11
    assert stats.messages_sent == len(prod.sent) == 500 + stats.malformed_sent + stats.late_sent
    assert stats.first_ts_ms == NOW_MS - 200_000 and stats.last_ts_ms == NOW_MS - 200_000 + 49_000
    assert stats.anomalies == sim.anomalies and stats.anomalies
    assert {t for t, _, _ in prod.sent} == {"t.readings"}
    valid = late = rejected = 0
    newest: dict[str, int] = {}
    for _, key, value in prod.sent:
        out = validate(value, key, LIMITS, NOW_MS)
        if isinstance(out[0], Rejection):
            rejected += 1
            continue
        [r] = out
        assert isinstance(r, Reading) and key == r.device_id.encode()
        if r.ts_ms < newest.get(r.device_id, -1):
            late += 1
            assert newest[r.device_id] - r.ts_ms >= 5 * sim.step_ms
        else:
            valid += 1
            newest[r.device_id] = r.ts_ms
    assert (valid, late, rejected) == (500, stats.late_sent, stats.malformed_sent)
    assert stats.to_dict()["readings_sent"] == 500


def test_run_simulation_envelopes() -> None:
    sim = _sim(n_devices=4, start_ts_ms=NOW_MS - 100_000)
    prod = FakeProducer()
    stats = run_simulation(prod, "t", sim, steps=11, envelope_steps=5)
    assert stats.readings_sent == 44 and stats.messages_sent == len(prod.sent) == 4 * 3
    sizes = [len(_decode(v)["readings"]) if "readings" in _decode(v) else 1 for _, _, v in prod.sent]
    assert sizes == [5] * 4 + [5] * 4 + [1] * 4  # the last partial group is a plain reading
    per_device: dict[str, list[int]] = {}
    for _, key, value in prod.sent:
        for r in validate(value, key, LIMITS, NOW_MS):
            assert isinstance(r, Reading)
            per_device.setdefault(r.device_id, []).append(r.ts_ms)
    for ts in per_device.values():
        assert ts == [NOW_MS - 100_000 + 1000 * i for i in range(11)]


def test_run_simulation_paced_to_wall_clock() -> None:
    sim = _sim(n_devices=2)
    fake = FakeTime()
    prod = FakeProducer()
    wall = 1_795_341_600.25
    stats = run_simulation(
        prod,
        "t",
        sim,
        steps=6,
        rate_steps_per_s=2.0,
        clock=fake.clock,
        sleep=fake.sleep,
        wall_clock=lambda: wall,
    )
    assert stats.first_ts_ms == 1_795_341_601_000  # ceil(now / step) * step
    assert stats.last_ts_ms == 1_795_341_601_000 + 5000
    # first the wait for the first grid point (0.75 s), then step i is sent at i / rate seconds
    assert fake.slept[0] == pytest.approx(0.75)
    assert sum(fake.slept) == pytest.approx(0.75 + 2.5)
    # unpaced with end_at_now: the last step is stamped (aligned) now
    sim2 = _sim(n_devices=2)
    s2 = run_simulation(FakeProducer(), "t", sim2, steps=30, end_at_now=True, wall_clock=lambda: wall)
    assert s2.last_ts_ms == 1_795_341_601_000 and s2.first_ts_ms == 1_795_341_601_000 - 29_000


def test_run_simulation_staggers_uploads_over_the_step() -> None:
    sim = _sim(n_devices=10, step_ms=1000)
    fake = FakeTime()
    sent_at: list[tuple[float, str, int]] = []

    class Clocked(FakeProducer):
        def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> None:
            assert value is not None
            doc = _decode(value)
            sent_at.append((fake.now, doc["device_id"], doc["ts"]))

    stats = run_simulation(
        Clocked(),
        "t",
        sim,
        steps=3,
        rate_steps_per_s=1.0,
        stagger_slices=4,
        clock=fake.clock,
        sleep=fake.sleep,
        wall_clock=lambda: 1_795_341_601.0,
    )
    assert stats.readings_sent == len(sent_at) == 30
    first_ts = stats.first_ts_ms
    assert first_ts is not None
    offsets = [upload_offset_ms(d, 10, 4, 1000) for d in range(10)]
    assert offsets == [0, 0, 0, 250, 250, 500, 500, 500, 750, 750]
    for k, (at, device_id, ts) in enumerate(sent_at):
        step, d = divmod(k, 10)
        assert device_id == sim.device_ids[d] and ts == first_ts + 1000 * step  # timestamps stay on the grid
        assert at - 1000.0 == pytest.approx(step + offsets[d] / 1000)  # uploaded at its slot of the step
    with pytest.raises(ValueError, match="stagger"):
        run_simulation(FakeProducer(), "t", _sim(n_devices=2), steps=1, stagger_slices=2)


def test_run_simulation_stops_at_duration() -> None:
    sim = _sim(n_devices=2)
    fake = FakeTime()
    stats = run_simulation(
        FakeProducer(),
        "t",
        sim,
        steps=10_000,
        rate_steps_per_s=10.0,
        duration_s=1.0,
        clock=fake.clock,
        sleep=fake.sleep,
        wall_clock=lambda: 1_795_341_601.0,  # on the step grid: no initial wait
    )
    assert stats.steps == 10  # steps are due at 0, 0.1, ..., 0.9 s; the 11th at 1.0 s is not sent
    assert fake.now - 1000.0 == pytest.approx(1.0)


def test_run_simulation_survives_producer_refusals() -> None:
    class Refusing(FakeProducer):
        def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> None:
            if value is not None and len(value) > MAX_MESSAGE_BYTES:
                raise ValueError("MessageSizeTooLargeError")
            super().send(topic, value=value, key=key)

    sim = _sim(n_devices=3, start_ts_ms=NOW_MS - 100_000)
    stats = run_simulation(Refusing(), "t", sim, steps=10, malformed_every=1, malformed_kinds=("oversized",))
    assert stats.malformed_sent == 30 and stats.send_errors == {"oversized": 30}
    assert stats.messages_sent == 30
