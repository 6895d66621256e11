"""The pure pipeline core: messages in, one score per closed step, dead letters, waves, replay safety."""

from __future__ import annotations

import gc
import zlib
from collections import Counter

import numpy as np
import pytest
import torch

from models.artifact import Artifact, Normaliser
from models.detector import Detector
from models.forecaster import Forecaster, ForecasterConfig
from models.scoring import AdaptiveThreshold, ScoringConfig, Status, make_threshold, seasonal_bin
from pipeline.app import freeze_startup_objects
from pipeline.processor import BatchResult, Inbound, Processor
from pipeline.records import ScoreRecord
from pipeline.schema import Limits, Reason, encode_envelope, encode_reading
from pipeline.windowing import WindowConfig

FEATURES = ("pressure", "temp", "vibration")
MEAN = np.array([10.0, -5.0, 100.0])
STD = np.array([2.0, 0.5, 10.0])
STEP = 1000
T0 = 1_795_341_600_000
TOPIC = "iotad.readings"
N_PARTITIONS = 4
WARMUP = 4
BURNIN = 2
WINDOW = WindowConfig(step_ms=STEP, grace_ms=0, max_gap_steps=3, idle_flush_ms=2000)
LIMITS = Limits(sensors=FEATURES, min_ts_ms=946_684_800_000, max_future_skew_ms=300_000)


@pytest.fixture(scope="module")
def artifact() -> Artifact:
    torch.manual_seed(21)
    model = Forecaster(ForecasterConfig(n_features=3, hidden=16, layers=2)).eval()
    return Artifact(model, FEATURES, Normaliser(MEAN, STD), version="t1")


def make_processor(artifact: Artifact, state_source=None, capacity: int = 8) -> Processor:
    det = Detector(
        artifact,
        ScoringConfig(warmup_steps=WARMUP, halflife_steps=20.0, burnin_steps=BURNIN),
        AdaptiveThreshold(quantile=0.95, margin=1.3, floor=3.0, rate=0.2),
        capacity=capacity,
    )
    return Processor(det, WINDOW, LIMITS, state_source=state_source)


def values_of(dev: str, t: int) -> dict[str, float]:
    rng = np.random.default_rng(zlib.crc32(f"{dev}/{t}".encode()))
    z = 0.7 * np.sin(t / 5.0 + np.arange(3) + len(dev)) + 0.5 * rng.standard_normal(3)
    if t == 17 and dev.endswith("3"):
        z[1] += 50.0  # an anomaly
    return dict(zip(FEATURES, (MEAN + STD * z).round(6).tolist(), strict=True))


class Fleet:
    """Devices keyed to partitions, with per-partition offsets, like a real topic."""

    def __init__(self, n: int) -> None:
        self.devices = [f"dev-{i}" for i in range(n)]
        self.offsets = Counter[int]()

    @staticmethod
    def partition(dev: str) -> int:
        return int(dev.rsplit("-", 1)[1]) % N_PARTITIONS

    def message(self, dev: str, value: bytes, key: bytes | None = None) -> Inbound:
        p = self.partition(dev)
        off = self.offsets[p]
        self.offsets[p] += 1
        return Inbound(dev.encode() if key is None else key, value, TOPIC, p, off)

    def reading(self, dev: str, t: int, offset_ms: int = 0) -> Inbound:
        return self.message(dev, encode_reading(dev, T0 + t * STEP + offset_ms, values_of(dev, t)))

    def batch(self, t: int) -> list[Inbound]:
        return [self.reading(d, t) for d in self.devices]


def by_key(scores: list[ScoreRecord]) -> dict[tuple[str, int], ScoreRecord]:
    out = {(s.device_id, s.ts_ms): s for s in scores}
    assert len(out) == len(scores), "a step was scored twice"
    return out


def assert_same_record(a: ScoreRecord, b: ScoreRecord, atol: float = 1e-6) -> None:
    assert (a.device_id, a.ts_ms, a.status, a.model_version, a.n_readings) == (
        b.device_id,
        b.ts_ms,
        b.status,
        b.model_version,
        b.n_readings,
    )
    assert a.values == pytest.approx(b.values, abs=atol)
    assert (a.score is None) == (b.score is None)
    if a.score is not None:
        assert a.score == pytest.approx(b.score, rel=1e-6, abs=atol)
        assert a.top_sensor == b.top_sensor
    assert a.threshold == pytest.approx(b.threshold, rel=1e-6, abs=atol)
    assert a.is_anomaly == b.is_anomaly
    assert (a.forecast is None) == (b.forecast is None)
    if a.forecast is not None:
        assert a.forecast == pytest.approx(b.forecast, rel=1e-6, abs=atol)


def assert_same_scores(a: list[ScoreRecord], b: list[ScoreRecord]) -> None:
    ka, kb = by_key(a), by_key(b)
    assert ka.keys() == kb.keys()
    for k in ka:
        assert_same_record(ka[k], kb[k])


# -- the normal path -----------------------------------------------------------------------------


def test_fleet_gets_exactly_one_score_per_valid_reading(artifact):
    proc = make_processor(artifact)  # capacity 8 < 24 devices: the detector grows on the way
    fleet = Fleet(24)
    all_scores: list[ScoreRecord] = []
    for t in range(22):
        batch = fleet.batch(t)
        res = proc.process(batch, now_ms=T0 + t * STEP + 50)
        assert res.dead == [] and res.late == 0 and res.replayed == 0
        assert res.readings == len(batch) == len(res.scores)
        assert res.waves == 1
        assert res.dirty == set(fleet.devices)
        assert {(s.device_id, s.ts_ms) for s in res.scores} == {(d, T0 + t * STEP) for d in fleet.devices}
        all_scores += res.scores
    assert len(by_key(all_scores)) == 24 * 22

    recs = by_key(all_scores)
    flagged = []
    for d in fleet.devices:
        mine = [recs[(d, T0 + t * STEP)] for t in range(22)]
        assert mine[0].score is None and mine[0].forecast is None and mine[0].top_sensor is None
        assert all(r.score is not None and r.forecast is not None for r in mine[1:])
        cold = 1 + BURNIN + WARMUP  # no forecast, burn-in, warm-up
        assert [r.status for r in mine] == [Status.WARMING_UP] * cold + [Status.OK] * (22 - cold)
        assert not any(r.is_anomaly for r in mine[:cold])
        for t, r in enumerate(mine):
            assert r.values == tuple(values_of(d, t).values())
            assert r.n_readings == 1 and r.model_version == "t1"
            assert r.threshold >= 3.0
        flagged += [(d, t) for t, r in enumerate(mine) if r.is_anomaly]
    # the injected anomaly is found, on its sensor
    for d in ("dev-3", "dev-13", "dev-23"):
        assert (d, 17) in flagged
        assert recs[(d, T0 + 17 * STEP)].top_sensor == "temp"


def test_scores_match_the_detector_stepped_alone(artifact):
    proc = make_processor(artifact)
    fleet = Fleet(6)
    scores: list[ScoreRecord] = []
    for t in range(12):
        scores += proc.process(fleet.batch(t), now_ms=T0 + t * STEP).scores
    recs = by_key(scores)
    for d in fleet.devices:
        alone = Detector(
            artifact,
            ScoringConfig(warmup_steps=WARMUP, halflife_steps=20.0, burnin_steps=BURNIN),
            AdaptiveThreshold(quantile=0.95, margin=1.3, floor=3.0, rate=0.2),
            capacity=1,
        )
        for t in range(12):
            x = np.array([list(values_of(d, t).values())])
            out = alone.step(np.array([alone.slot(d)]), x)
            r = recs[(d, T0 + t * STEP)]
            if t == 0:
                assert r.score is None
                continue
            assert r.score == pytest.approx(float(out.score[0]), rel=1e-5, abs=1e-5)
            assert r.forecast == pytest.approx(tuple(out.forecast[0]), rel=1e-5, abs=1e-5)
            assert r.is_anomaly == bool(out.is_anomaly[0])
            assert r.top_sensor == FEATURES[out.top[0]]


# -- dead letters --------------------------------------------------------------------------------


def test_malformed_messages_become_dead_letters_with_their_coordinates(artifact):
    proc = make_processor(artifact)
    fleet = Fleet(4)
    good = fleet.reading("dev-0", 0)
    bad_json = fleet.message("dev-1", b'{"device_id": "dev-1", "ts": ')
    mismatch = fleet.message("dev-2", encode_reading("dev-9", T0, values_of("dev-9", 0)))
    unknown = fleet.message("dev-3", encode_reading("dev-3", T0, {"pressure": 1.0}))
    future = fleet.message("dev-1", encode_reading("dev-1", T0 + 10**9, values_of("dev-1", 0)))
    env = fleet.message(
        "dev-2",
        encode_envelope(
            "dev-2",
            [
                (T0, values_of("dev-2", 0)),
                (T0 + STEP, {"pressure": 1e15, "temp": 0.0, "vibration": 0.0}),
                (T0 + 2 * STEP, values_of("dev-2", 2)),
            ],
        ),
    )
    batch = [good, bad_json, mismatch, unknown, future, env]
    res = proc.process(batch, now_ms=T0 + 3 * STEP)

    expected = [
        (bad_json, Reason.BAD_JSON, -1),
        (mismatch, Reason.KEY_MISMATCH, -1),
        (unknown, Reason.UNKNOWN_SENSORS, -1),
        (future, Reason.TIMESTAMP_OUT_OF_RANGE, -1),
        (env, Reason.VALUE_OUT_OF_RANGE, 1),
    ]
    assert len(res.dead) == len(expected)
    for dl, (m, reason, index) in zip(res.dead, expected, strict=True):
        assert dl.value is m.value  # the original bytes, untouched
        assert dl.key == m.key
        assert dl.reason == reason
        assert dl.detail
        assert (dl.topic, dl.partition, dl.offset, dl.index) == (m.topic, m.partition, m.offset, index)
        assert dl.headers()[0] == ("iotad-reason", str(reason).encode())
    assert sorted((s.device_id, s.ts_ms) for s in res.scores) == [
        ("dev-0", T0),
        ("dev-2", T0),
        ("dev-2", T0 + 2 * STEP),
    ]
    assert res.readings == 3
    # the envelope's gap (its bad reading) was forward-filled
    assert res.imputed == 1
    # devices that sent nothing valid were not created
    assert set(proc.devices) == {"dev-0", "dev-2"}
    assert res.dirty == {"dev-0", "dev-2"}


def test_poison_message_with_invalid_utf8_is_dead_lettered_not_raised(artifact):
    proc = make_processor(artifact)
    fleet = Fleet(2)
    poison = fleet.message("dev-1", b'{"device_id": "dev-\xff", "ts": 1795341600000, "values": {}}')
    batch = [fleet.reading("dev-0", 0), poison, fleet.reading("dev-1", 0)]
    res = proc.process(batch, now_ms=T0 + 10)
    assert [(d.reason, d.offset) for d in res.dead] == [(Reason.BAD_JSON, poison.offset)]
    assert res.dead[0].value is poison.value
    assert sorted(s.device_id for s in res.scores) == ["dev-0", "dev-1"]


def test_late_reading_is_dead_lettered(artifact):
    proc = make_processor(artifact)
    fleet = Fleet(1)
    first = fleet.reading("dev-0", 5)
    late = fleet.reading("dev-0", 3)
    res = proc.process([first, late], now_ms=T0 + 6 * STEP)
    assert [s.ts_ms for s in res.scores] == [T0 + 5 * STEP]
    assert res.late == 1 and res.readings == 2
    (dl,) = res.dead
    assert dl.reason == Reason.LATE == "late"
    assert (dl.value, dl.partition, dl.offset, dl.index) == (late.value, late.partition, late.offset, -1)
    assert str(T0 + 3 * STEP) in dl.detail

    # inside an envelope: only that reading, with its index
    env = fleet.message(
        "dev-0",
        encode_envelope(
            "dev-0",
            [
                (T0 + 6 * STEP, values_of("dev-0", 6)),
                (T0 + 2 * STEP, values_of("dev-0", 2)),
                (T0 + 7 * STEP, values_of("dev-0", 7)),
            ],
        ),
    )
    res = proc.process([env], now_ms=T0 + 8 * STEP)
    assert [s.ts_ms for s in res.scores] == [T0 + 6 * STEP, T0 + 7 * STEP]
    assert [(d.reason, d.index, d.offset) for d in res.dead] == [(Reason.LATE, 1, env.offset)]
    # a late reading still counts as applied: the message's offset is remembered
    assert proc.devices["dev-0"].last_offset == env.offset


# -- envelopes and waves -------------------------------------------------------------------------


def test_envelope_scores_in_order_and_equals_one_message_per_batch(artifact):
    n_steps = 7
    fleet_a, fleet_b = Fleet(5), Fleet(5)

    # A: one message per device per batch
    pa = make_processor(artifact)
    scores_a: list[ScoreRecord] = []
    for t in range(n_steps):
        scores_a += pa.process(fleet_a.batch(t), now_ms=T0 + t * STEP).scores

    # B: everything in one batch: dev-0 and dev-1 send envelopes, dev-2 sends one message per reading,
    # the others send one envelope of all-but-the-first readings after a single first message
    pb = make_processor(artifact)
    batch = []
    for d in ("dev-0", "dev-1"):
        batch.append(fleet_b.message(d, encode_envelope(d, [(T0 + t * STEP, values_of(d, t)) for t in range(n_steps)])))
    batch += [fleet_b.reading("dev-2", t) for t in range(n_steps)]
    for d in ("dev-3", "dev-4"):
        batch.append(fleet_b.reading(d, 0))
        rest = [(T0 + t * STEP, values_of(d, t)) for t in range(1, n_steps)]
        batch.append(fleet_b.message(d, encode_envelope(d, rest)))
    res = pb.process(batch, now_ms=T0 + n_steps * STEP)

    assert res.dead == [] and res.readings == 5 * n_steps
    assert res.waves == n_steps  # each device's consecutive steps are ordered waves
    assert len(res.scores) == 5 * n_steps
    for d in fleet_b.devices:
        assert [s.ts_ms for s in res.scores if s.device_id == d] == [T0 + t * STEP for t in range(n_steps)]
    assert_same_scores(scores_a, res.scores)
    # and the carried state ends up the same
    for d in fleet_a.devices:
        sa, sb = pa.detector.slots[d], pb.detector.slots[d]
        for ta, tb in zip(pa.detector.state, pb.detector.state, strict=True):
            np.testing.assert_allclose(ta[:, sa].numpy(), tb[:, sb].numpy(), rtol=0, atol=1e-6)


def test_mid_bucket_readings_are_averaged_into_one_score(artifact):
    proc = make_processor(artifact)
    fleet = Fleet(1)
    v1 = {"pressure": 10.0, "temp": -5.0, "vibration": 100.0}
    v2 = {"pressure": 12.0, "temp": -4.0, "vibration": 80.0}
    batch = [
        fleet.message("dev-0", encode_reading("dev-0", T0 - 600, v1)),
        fleet.message("dev-0", encode_reading("dev-0", T0 - 100, v2)),
    ]
    res = proc.process(batch, now_ms=T0)
    assert res.scores == [] and res.readings == 2
    res = proc.process([fleet.message("dev-0", encode_reading("dev-0", T0 + 10, v1))], now_ms=T0 + 10)
    (s,) = res.scores
    assert (s.ts_ms, s.n_readings, s.values) == (T0, 2, (11.0, -4.5, 90.0))


def test_gaps_are_imputed_and_long_gaps_reset(artifact):
    proc = make_processor(artifact)
    fleet = Fleet(1)
    for t in range(8):
        proc.process([fleet.reading("dev-0", t)], now_ms=T0 + t * STEP)
    res = proc.process([fleet.reading("dev-0", 10)], now_ms=T0 + 10 * STEP)  # 2 missing steps
    assert res.imputed == 2 and res.resets == 0 and res.waves == 3
    (s,) = res.scores
    assert s.ts_ms == T0 + 10 * STEP and s.status == Status.OK and s.score is not None
    res = proc.process([fleet.reading("dev-0", 20)], now_ms=T0 + 20 * STEP)  # 9 missing steps > 3
    assert res.imputed == 0 and res.resets == 1
    (s,) = res.scores
    assert s.status == Status.WARMING_UP and s.score is None and s.forecast is None


# -- replay protection ---------------------------------------------------------------------------


def _stream(fleet: Fleet, t: int) -> list[Inbound]:
    """One batch: devices send grid readings, dev-1/dev-5 send mid-bucket ones (open buckets in state)."""
    out = []
    for d in fleet.devices:
        off = -300 if d in ("dev-1", "dev-5") else 0
        out.append(fleet.reading(d, t, offset_ms=off))
    return out


def test_replay_after_restore_is_skipped_and_continuation_is_identical(artifact):
    fleet = Fleet(8)
    batches = [_stream(fleet, t) for t in range(20)]
    now = [T0 + t * STEP + 10 for t in range(20)]

    p1 = make_processor(artifact)
    for t in range(10):
        p1.process(batches[t], now[t])
    cps = p1.checkpoint(fleet.devices)
    assert set(cps) == set(fleet.devices)
    assert all(p == fleet.partition(d) for d, (p, _) in cps.items())
    loads: list[str] = []

    def source(dev: str) -> bytes | None:
        loads.append(dev)
        return cps[dev][1] if dev in cps else None

    p2 = make_processor(artifact, state_source=source, capacity=3)
    for t in range(10):  # the same messages again, same partitions and offsets
        res = p2.process(batches[t], now[t])
        assert res.replayed == len(batches[t])
        assert res.scores == [] and res.dead == [] and res.readings == 0 and res.dirty == set()
    assert sorted(loads) == sorted(fleet.devices)  # each device's checkpoint loaded once
    assert p2.checkpoint(fleet.devices) == cps  # state unchanged, bit for bit

    for t in range(10, 20):
        r1, r2 = p1.process(batches[t], now[t]), p2.process(batches[t], now[t])
        assert r2.replayed == 0
        assert len(r1.scores) == len(r2.scores) == len(fleet.devices)
        assert_same_scores(r1.scores, r2.scores)
        assert [s.device_id for s in r1.scores] == [s.device_id for s in r2.scores]


def test_redelivered_batch_straddling_the_checkpoint(artifact):
    """A consumer restarts from an older committed offset: old and new messages in one batch."""
    fleet = Fleet(6)
    batches = [_stream(fleet, t) for t in range(12)]
    p1 = make_processor(artifact)
    for t in range(8):
        p1.process(batches[t], T0 + t * STEP)
    cps = p1.checkpoint(fleet.devices)
    p2 = make_processor(artifact, state_source=lambda d: cps[d][1] if d in cps else None)

    mixed = [m for t in range(5, 10) for m in batches[t]]
    r2 = p2.process(mixed, T0 + 9 * STEP)
    assert r2.replayed == 3 * len(fleet.devices)
    expected: list[ScoreRecord] = []
    for t in (8, 9):
        expected += p1.process(batches[t], T0 + t * STEP).scores
    assert_same_scores(expected, r2.scores)
    assert r2.waves == 2


def test_checkpoint_of_unknown_device_is_skipped(artifact):
    proc = make_processor(artifact)
    proc.process([Fleet(1).reading("dev-0", 0)], T0)
    assert set(proc.checkpoint(["dev-0", "nobody"])) == {"dev-0"}


def test_forget_drops_only_those_partitions(artifact):
    fleet = Fleet(8)
    proc = make_processor(artifact)
    for t in range(6):
        proc.process(fleet.batch(t), T0 + t * STEP)
    cps = proc.checkpoint(fleet.devices)
    proc.state_source = lambda d: cps[d][1] if d in cps else None

    gone = {d for d in fleet.devices if fleet.partition(d) in {1, 2}}
    assert proc.forget({1, 2}) == len(gone) == 4
    assert set(proc.devices) == set(fleet.devices) - gone
    assert set(proc.detector.slots) == set(fleet.devices) - gone

    # an uninterrupted twin, to compare the continuation against
    twin = make_processor(artifact)
    twin_fleet = Fleet(8)
    for t in range(6):
        twin.process(twin_fleet.batch(t), T0 + t * STEP)
    for t in range(6, 9):  # a forgotten device reloads its checkpoint on next sight and continues
        r = proc.process(fleet.batch(t), T0 + t * STEP)
        assert r.replayed == 0
        assert_same_scores(twin.process(twin_fleet.batch(t), T0 + t * STEP).scores, r.scores)

    assert proc.forget(None) == 8
    assert proc.devices == {} and proc.detector.slots == {}


# -- idle flush ----------------------------------------------------------------------------------


def test_idle_flush_closes_a_mid_bucket_reading(artifact):
    proc = make_processor(artifact)
    fleet = Fleet(2)
    proc.process([fleet.reading("dev-0", 0), fleet.reading("dev-1", 0)], now_ms=T0)
    last = T0 + STEP + 10
    res = proc.process(
        [fleet.reading("dev-0", 1, offset_ms=-500), fleet.reading("dev-1", 1, offset_ms=-500)], now_ms=last
    )
    assert res.scores == []
    assert proc.flush_idle(last + WINDOW.idle_flush_ms - 1).scores == []
    # dev-1 keeps talking; only dev-0 goes quiet
    res = proc.process([fleet.reading("dev-1", 2)], now_ms=last + 1500)
    assert [(s.device_id, s.ts_ms) for s in res.scores] == [("dev-1", T0 + STEP), ("dev-1", T0 + 2 * STEP)]
    res = proc.flush_idle(last + WINDOW.idle_flush_ms)
    assert isinstance(res, BatchResult)
    (s,) = res.scores
    assert (s.device_id, s.ts_ms, s.n_readings) == ("dev-0", T0 + STEP, 1)
    assert s.values == pytest.approx(tuple(values_of("dev-0", 1).values()))
    assert res.dirty == {"dev-0"}
    assert proc.flush_idle(last + 10 * WINDOW.idle_flush_ms).scores == []
    # a straggler for the flushed bucket is late
    res = proc.process([fleet.reading("dev-0", 1, offset_ms=-100)], now_ms=last + 5000)
    assert [d.reason for d in res.dead] == [Reason.LATE]


def test_offsets_are_remembered_per_device(artifact):
    proc = make_processor(artifact)
    fleet = Fleet(4)
    for t in range(3):
        proc.process(fleet.batch(t), T0 + t * STEP)
    for d in fleet.devices:
        dev = proc.devices[d]
        assert dev.partition == fleet.partition(d)
        assert dev.last_offset == fleet.offsets[dev.partition] - 1
    # an old offset on the same partition is a replay even without a restore
    m = fleet.reading("dev-0", 3)
    old = Inbound(m.key, m.value, m.topic, m.partition, 0)
    res = proc.process([old], T0 + 3 * STEP)
    assert res.replayed == 1 and res.scores == []


def _artifact(version: str, seed: int) -> Artifact:
    torch.manual_seed(seed)
    model = Forecaster(ForecasterConfig(n_features=3, hidden=16, layers=2)).eval()
    return Artifact(model, FEATURES, Normaliser(MEAN, STD), version=version)


def _detector(art: Artifact) -> Detector:
    return Detector(
        art,
        ScoringConfig(warmup_steps=WARMUP, halflife_steps=20.0, burnin_steps=BURNIN),
        AdaptiveThreshold(quantile=0.95, margin=1.3, floor=3.0, rate=0.2),
        capacity=8,
    )


def test_swap_rewarms_from_history_and_a_shadow_runs_beside(artifact):
    """After a swap every known device continues warm (state rebuilt from its history ring) and a new
    device simply starts; a shadow scores the same steps and does not change the champion's scores."""
    new, cand = _artifact("t2", 7), _artifact("s1", 3)
    fleet = Fleet(4)
    proc = make_processor(artifact)
    twin = make_processor(artifact)
    for t in range(30):
        batch = fleet.batch(t)
        proc.process(batch, T0 + t * STEP)
        twin.process(batch, T0 + t * STEP)
    proc.swap(_detector(new))
    proc.set_shadow(_detector(cand))
    twin.swap(_detector(new))
    fleet.devices.append("dev-4")
    for t in range(30, 33):
        batch = fleet.batch(t)
        res = proc.process(batch, T0 + t * STEP)
        ref = twin.process(batch, T0 + t * STEP)
        assert_same_scores(res.scores, ref.scores)  # the shadow never touches the champion
        assert {r.model_version for r in res.scores} == {"t2"}
        assert {r.model_version for r in res.shadow_scores} == {"s1"}
        assert len(res.shadow_scores) == len(res.scores) == 5
        assert res.rewarmed == (4 if t == 30 else 0)
        assert all(r.status == Status.OK for r in res.scores if r.device_id != "dev-4")
        assert all(r.status == Status.WARMING_UP for r in res.scores if r.device_id == "dev-4")


def test_a_swap_carries_the_ensembles_state_and_rewarms_only_the_model(artifact):
    """With the likelihood ensemble, what the threshold learnt survives a model swap (and seeds a shadow):
    the new detector takes it over, in its own artifact's units, and the history re-warms only the recurrent
    state and the error statistics. The static/adaptive thresholds re-warm from history as before."""
    scoring = ScoringConfig(warmup_steps=WARMUP, halflife_steps=20.0, burnin_steps=BURNIN)

    def ensemble(art: Artifact) -> Detector:
        return Detector(art, scoring, make_threshold("ensemble", value=0.5, quantile=0.99, margin=1.5), capacity=8)

    torch.manual_seed(7)
    model = Forecaster(ForecasterConfig(n_features=3, hidden=16, layers=2)).eval()
    new = Artifact(model, FEATURES, Normaliser(MEAN + 1.0, STD * 2.0), version="t2")  # other units
    proc = Processor(ensemble(artifact), WINDOW, LIMITS)
    fleet = Fleet(3)
    for t in range(160):
        proc.process(fleet.batch(t), T0 + t * STEP)
    old = proc.detector
    before = {d: old.threshold.likelihood.count[old.slots[d]] for d in fleet.devices}
    assert min(before.values()) > 100  # past its probation
    ref = {d: old.threshold.reference.level[old.slots[d]].copy() for d in fleet.devices}
    proc.swap(ensemble(new))
    proc.set_shadow(ensemble(_artifact("s1", 3)))
    res = proc.process(fleet.batch(160), T0 + 160 * STEP)
    det, shadow = proc.detector, proc.shadow
    assert det is not old and shadow is not None and res.rewarmed == 3
    for d in fleet.devices:
        s = det.slots[d]
        # one more learnt average, not a new probation; the level in the new units (it learnt one step since)
        assert det.threshold.likelihood.count[s] == before[d] + 1
        np.testing.assert_allclose(
            det.threshold.reference.level[s], (ref[d] * STD + MEAN - (MEAN + 1.0)) / (STD * 2.0), atol=0.05
        )
        assert det.stats.count[s] > 40  # the error statistics re-warmed from the 48 steps of history
        assert shadow.threshold.likelihood.count[shadow.slots[d]] == before[d] + 1  # seeded by the champion's
    assert all(r.status == Status.OK for r in res.scores + res.shadow_scores)
    # two swaps before a device comes back: the second takes over the state the first carried
    again = Processor(ensemble(artifact), WINDOW, LIMITS)
    for t in range(160):
        again.process(fleet.batch(t), T0 + t * STEP)
    again.swap(ensemble(new))
    again.swap(ensemble(_artifact("t3", 5)))
    again.process(fleet.batch(160), T0 + 160 * STEP)
    assert [again.detector.threshold.likelihood.count[again.detector.slots[d]] for d in fleet.devices] == [
        before[d] + 1 for d in fleet.devices
    ]
    # the new detector kept the old one's slots; a device seen for the first time gets a free one
    fleet.devices.append("dev-9")
    res = proc.process(fleet.batch(161), T0 + 161 * STEP)
    assert len(res.scores) == 4 and len(set(det.slots.values())) == len(det.slots) == 4
    assert det.threshold.likelihood.count[det.slots["dev-9"]] == 0


def test_a_checkpoint_of_another_model_keeps_what_the_ensemble_learnt(artifact):
    """A worker serving a newer model restores a device whose checkpoint the previous model wrote (a restart or
    a rebalance right after a swap): the recurrent state re-warms from the history, the ensemble's state is
    taken over, converted from the units the checkpoint names. A static threshold's checkpoint carries no units."""
    scoring = ScoringConfig(warmup_steps=WARMUP, halflife_steps=20.0, burnin_steps=BURNIN)

    def ensemble(art: Artifact) -> Detector:
        return Detector(art, scoring, make_threshold("ensemble", value=0.5, quantile=0.99, margin=1.5), capacity=8)

    torch.manual_seed(7)
    model = Forecaster(ForecasterConfig(n_features=3, hidden=16, layers=2)).eval()
    new = Artifact(model, FEATURES, Normaliser(MEAN + 1.0, STD * 2.0), version="t2")
    fleet = Fleet(2)
    proc = Processor(ensemble(artifact), WINDOW, LIMITS)
    for t in range(160):
        proc.process(fleet.batch(t), T0 + t * STEP)
    saved = {d: blob for d, (_, blob) in proc.checkpoint(fleet.devices).items()}
    old = proc.detector
    count = {d: old.threshold.likelihood.count[old.slots[d]] for d in fleet.devices}
    level = {d: old.threshold.reference.level[old.slots[d]].copy() for d in fleet.devices}
    later = Processor(ensemble(new), WINDOW, LIMITS, state_source=saved.get)
    res = later.process(fleet.batch(160), T0 + 160 * STEP)
    det = later.detector
    assert res.rewarmed == 2 and all(r.status == Status.OK for r in res.scores)
    for d in fleet.devices:
        s = det.slots[d]
        assert det.threshold.likelihood.count[s] == count[d] + 1
        np.testing.assert_allclose(
            det.threshold.reference.level[s], (level[d] * STD + MEAN - (MEAN + 1.0)) / (STD * 2.0), atol=0.05
        )
    plain = make_processor(artifact)
    plain.process(fleet.batch(0), T0)
    assert not _detector(new).restore_threshold("dev-0", plain.detector.export("dev-0"))


@pytest.mark.parametrize("steps", [0, 1, 5])
def test_history_ring_behaves_like_a_bounded_deque_per_device(steps):
    from collections import deque

    from pipeline.processor import _History

    rng = np.random.default_rng(steps)
    ring = _History(steps, 2, capacity=2)  # grows on the third device
    rows = [ring.alloc() for _ in range(3)]
    ref = {r: deque(maxlen=steps) for r in rows}
    for _ in range(40):
        if rng.random() < 0.15:  # a restore (or re-warm seeding): several rows at once
            r = rows[int(rng.integers(3))]
            x = rng.normal(size=(int(rng.integers(0, 8)), 2)).astype(np.float32)
            ring.extend(r, x)
            ref[r].extend(map(tuple, x.tolist()))
        else:  # a wave: some distinct devices, one row each
            wave = np.array(sorted(set(rng.integers(0, 3, size=3).tolist())))
            x = rng.normal(size=(len(wave), 2)).astype(np.float32)
            ring.append(np.array([rows[i] for i in wave]), x)
            for i, v in zip(wave, x.tolist(), strict=True):
                ref[rows[i]].append(tuple(v))
        if rng.random() < 0.05:
            r = rows.pop(0)
            ring.free(r)
            rows.append(ring.alloc())
            ref[rows[-1]] = deque(maxlen=steps)
        history, count = ring.get(np.array(rows))
        for i, r in enumerate(rows):
            assert [tuple(v) for v in history[i, : count[i]].tolist()] == list(ref[r])


def test_ensemble_threshold_gets_each_steps_hour_of_week(artifact):
    """IOTAD_THRESHOLD_METHOD=ensemble: the worker hands the detector the hour of the week (UTC) of each
    step's timestamp, as the evaluation harness does from its rows' timestamps."""
    scoring = ScoringConfig(warmup_steps=WARMUP, halflife_steps=20.0, burnin_steps=BURNIN)
    det = Detector(artifact, scoring, make_threshold("ensemble", value=5, quantile=0.99, margin=1.5), capacity=8)
    seen: list[int] = []
    step = det.step

    def spy(slots, x, observed=None, context=None):
        seen.extend(context.tolist())
        return step(slots, x, observed, context)

    det.step = spy  # type: ignore[method-assign]
    proc = Processor(det, WINDOW, LIMITS)
    fleet = Fleet(3)
    hour = 3_600_000
    scores: list[ScoreRecord] = []
    for t in (0, 1):
        # the second batch is stamped 30 hours later: another hour and another day of the week
        batch = [fleet.reading(d, t, offset_ms=t * 30 * hour) for d in fleet.devices]
        scores += proc.process(batch, now_ms=T0 + t * 30 * hour + t * STEP).scores
    expected = [seasonal_bin(np.array([r.ts_ms // 1000]), 24, weekly=True)[0] for r in scores]
    assert seen == expected
    assert len(set(expected)) == 2


def test_device_state_is_not_scanned_by_the_cyclic_gc(artifact: Artifact) -> None:
    # One per device for as long as the worker owns it: every full collection would walk them all.
    proc = make_processor(artifact)
    fleet = Fleet(3)
    proc.process(fleet.batch(0), T0)
    proc.process([fleet.reading("dev-1", 1, offset_ms=-300)], T0)  # an open bucket: its dict holds a list
    assert len(proc.devices) == 3
    for d in proc.devices.values():
        assert not gc.is_tracked(d) and not gc.is_tracked(d.window)
    assert proc.devices["dev-1"].window.open  # still referenced and intact
    gc.collect()
    assert proc.devices["dev-1"].window.open


def test_freeze_startup_objects_takes_them_out_of_the_scans() -> None:
    alive = [object()]  # a tracked container alive at startup
    assert gc.is_tracked(alive) and any(o is alive for o in gc.get_objects())
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > 0
        assert not any(o is alive for o in gc.get_objects())  # the collections' generations no longer hold it
        later = [object()]
        assert any(o is later for o in gc.get_objects())  # objects made afterwards are scanned as usual
    finally:
        gc.unfreeze()


def test_forecast_errors_are_those_of_the_warm_scored_records(artifact):
    """The drift monitor's input: one error per observed, warm step with a forecast, in the model's
    normalised units, never for imputed or warming-up steps."""
    proc = make_processor(artifact)
    fleet = Fleet(6)
    records: list[ScoreRecord] = []
    devices: list[str] = []
    errors: list[float] = []
    imputed = 0
    for t in range(14):
        # dev-2 skips step 9: step 9 is imputed (unobserved) when step 10 arrives
        batch = [m for m in fleet.batch(t) if not (t == 9 and m.key == b"dev-2")]
        res = proc.process(batch, now_ms=T0 + t * STEP + 50)
        records += res.scores
        imputed += res.imputed
        for e in res.forecast_errors:
            assert len(e.devices) == len(e.error)
            devices += e.devices
            errors += e.error.tolist()
    assert imputed == 1 and len(records) == 6 * 14 - 1
    expected = [
        (r.device_id, float(np.mean(np.abs(np.subtract(r.values, r.forecast)) / STD)))
        for r in records
        if r.forecast is not None and r.status == Status.OK
    ]
    assert 0 < len(expected) < len(records)  # warm-up steps are left out
    assert devices == [d for d, _ in expected]
    np.testing.assert_allclose(errors, [e for _, e in expected], rtol=1e-9)
