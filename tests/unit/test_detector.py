"""The batched, stateful detector: carried state == whole-sequence forward, batching is invisible,
warm-up, flagging, export/restore, slot growth and thresholds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.artifact import Artifact, Normaliser
from models.detector import Detector, StepOutput
from models.forecaster import Forecaster, ForecasterConfig
from models.scoring import AdaptiveThreshold, ScoringConfig, StaticThreshold, Threshold, make_threshold, update_stats

FEATURES = ("pressure", "temp", "vibration")
MEAN = np.array([10.0, -5.0, 100.0])
STD = np.array([2.0, 0.5, 10.0])
NORM = Normaliser(MEAN, STD)


def make_artifact(cell: str = "lstm", *, seed: int = 0, version: str = "t1", hidden: int = 16) -> Artifact:
    torch.manual_seed(seed)
    model = Forecaster(ForecasterConfig(n_features=3, hidden=hidden, layers=2, cell=cell)).eval()  # type: ignore[arg-type]
    return Artifact(model, FEATURES, NORM, version=version)


def make_detector(
    artifact: Artifact,
    *,
    warmup: int = 5,
    threshold: Threshold | None = None,
    learn_from_anomalies: bool = False,
    capacity: int = 64,
    burnin: int = 0,
) -> Detector:
    scoring = ScoringConfig(
        warmup_steps=warmup, halflife_steps=20.0, learn_from_anomalies=learn_from_anomalies, burnin_steps=burnin
    )
    return Detector(artifact, scoring, threshold or StaticThreshold(6.0), device="cpu", capacity=capacity)


def noisy(rng: np.random.Generator, n: int, scale: float = 1.0) -> np.ndarray:
    """Raw readings (n, F): a slow sine plus Gaussian noise, in each sensor's own units."""
    t = np.arange(n)[:, None]
    z = 0.8 * np.sin(t / 7.0 + np.arange(3)) + scale * rng.standard_normal((n, 3))
    return MEAN + STD * z


def step1(det: Detector, dev: str, x: np.ndarray, observed: bool = True) -> StepOutput:
    return det.step(np.array([det.slot(dev)]), x[None, :], np.array([observed]))


def row(out: StepOutput, i: int) -> dict[str, object]:
    return {
        "forecast": out.forecast[i].copy(),
        "score": float(out.score[i]),
        "top": int(out.top[i]),
        "threshold": float(out.threshold[i]),
        "warm": bool(out.warm[i]),
        "is_anomaly": bool(out.is_anomaly[i]),
    }


def assert_rows_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    np.testing.assert_allclose(a["forecast"], b["forecast"], rtol=1e-6, atol=atol)
    np.testing.assert_allclose(a["score"], b["score"], rtol=1e-5, atol=atol)
    np.testing.assert_allclose(a["threshold"], b["threshold"], rtol=1e-6, atol=atol)
    assert a["warm"] == b["warm"]
    assert a["is_anomaly"] == b["is_anomaly"]
    if not np.isnan(a["score"]):
        assert a["top"] == b["top"]


# -- (a) carried state step by step == whole sequence at once ------------------------------------


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_step_by_step_equals_forward_over_the_whole_sequence(cell):
    art = make_artifact(cell, seed=3)
    det = make_detector(art)
    rng = np.random.default_rng(0)
    x = noisy(rng, 50)

    forecasts = []
    for t in range(len(x)):
        out = step1(det, "dev", x[t])
        forecasts.append(out.forecast[0])
    got = np.array(forecasts)

    with torch.no_grad():
        y, final = art.model(torch.from_numpy(NORM.apply(x))[None])
    want = np.vstack([np.full((1, 3), np.nan), NORM.invert(y[0, :-1].numpy().astype(np.float64))])

    assert np.isnan(got[0]).all()  # no forecast existed for the very first step
    # compare in normalised units (what the model computes)
    np.testing.assert_allclose((got[1:] - MEAN) / STD, (want[1:] - MEAN) / STD, rtol=0, atol=1e-5)
    # the carried state is the sequence's final state, and the stored forecast its last output
    slot = det.slots["dev"]
    assert len(det.state) == (2 if cell == "lstm" else 1)
    for carried, ref in zip(det.state, final, strict=True):
        np.testing.assert_allclose(carried[:, slot].numpy(), ref[:, 0].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(det.forecast[slot], y[0, -1].numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_forecaster_step_matches_forward(cell):
    torch.manual_seed(1)
    m = Forecaster(ForecasterConfig(n_features=3, hidden=16, layers=2, cell=cell)).eval()  # type: ignore[arg-type]
    x = torch.randn(5, 30, 3)
    with torch.no_grad():
        y_all, s_all = m(x)
        s = m.init_state(5)
        ys = []
        for t in range(30):
            y, s = m.step(x[:, t], s)
            ys.append(y)
    torch.testing.assert_close(torch.stack(ys, 1), y_all, rtol=0, atol=1e-5)
    for a, b in zip(s, s_all, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# -- (b) batching many devices is invisible ------------------------------------------------------


@pytest.mark.parametrize(("cell", "adaptive"), [("lstm", False), ("gru", True)])
def test_batch_of_many_devices_equals_each_device_alone(cell, adaptive):
    art = make_artifact(cell, seed=5)
    n_dev, horizon = 64, 36
    rng = np.random.default_rng(11)
    devs = [f"dev-{i}" for i in range(n_dev)]
    join = rng.integers(0, 20, n_dev)
    seqs = {d: noisy(rng, horizon, scale=rng.uniform(0.2, 2.0)) for d in devs}
    for d in devs:  # a few spikes so that flags happen
        for t in rng.choice(horizon, 2, replace=False):
            seqs[d][t, rng.integers(3)] += 40 * STD[0]
    observed = {d: rng.random(horizon) > 0.1 for d in devs}

    def thr() -> Threshold:
        return AdaptiveThreshold(quantile=0.95, margin=1.2, floor=3.0, rate=0.2) if adaptive else StaticThreshold(3.0)

    batched = make_detector(art, threshold=thr(), capacity=16, burnin=2)  # also grows on the way
    got: dict[str, list] = {d: [] for d in devs}
    pos = dict.fromkeys(devs, 0)
    for t in range(horizon + 20):
        active = [d for i, d in enumerate(devs) if join[i] <= t and pos[d] < horizon and rng.random() > 0.15]
        if not active:
            continue
        rng.shuffle(active)
        slots = np.array([batched.slot(d) for d in active])
        x = np.array([seqs[d][pos[d]] for d in active])
        obs = np.array([observed[d][pos[d]] for d in active])
        out = batched.step(slots, x, obs)
        for i, d in enumerate(active):
            got[d].append(row(out, i))
            pos[d] += 1

    flagged = 0
    for d in devs:
        alone = make_detector(art, threshold=thr(), capacity=2, burnin=2)
        n = pos[d]
        assert n > 5
        for k in range(n):
            ref = row(step1(alone, d, seqs[d][k], bool(observed[d][k])), 0)
            assert_rows_close(got[d][k], ref)
            flagged += ref["is_anomaly"]
    assert flagged > 0  # the comparison covered flagged steps too


# -- (c) warm-up ---------------------------------------------------------------------------------


@pytest.mark.parametrize("burnin", [0, 3])
def test_warm_up(burnin):
    warmup = 6
    det = make_detector(make_artifact(), warmup=warmup, threshold=StaticThreshold(3.0), burnin=burnin)
    rng = np.random.default_rng(2)
    x = noisy(rng, 24)
    x[3, 0] += 500 * STD[0]  # a huge spike while warming up
    outs = [step1(det, "dev", x[t]) for t in range(len(x))]
    slot = det.slots["dev"]

    first = outs[0]
    assert np.isnan(first.score[0]) and np.isnan(first.forecast[0]).all()
    assert not first.warm[0] and not first.is_anomaly[0]
    # the first warmup (+ burn-in) scored steps are warming up and never flagged, even the spike
    n_cold = warmup + burnin
    for t in range(1, n_cold + 1):
        assert not np.isnan(outs[t].score[0])
        assert not outs[t].warm[0], t
        assert not outs[t].is_anomaly[0], t
    assert outs[3].score[0] > 100  # the spike scored far above the threshold, still not flagged
    for t in range(n_cold + 1, len(x)):
        assert outs[t].warm[0], t
    assert det.stats.count[slot] == len(x) - 1 - burnin - sum(o.is_anomaly[0] for o in outs)


def test_burn_in_steps_do_not_learn():
    det = make_detector(make_artifact(), warmup=2, burnin=4)
    x = noisy(np.random.default_rng(3), 10)
    slot = det.slot("dev")
    counts = []
    for t in range(10):
        step1(det, "dev", x[t])
        counts.append(int(det.stats.count[slot]))
    # step 0 has no forecast; forecasts made after 1..4 steps of a cold state are not learnt from
    assert counts == [0, 0, 0, 0, 0, 1, 2, 3, 4, 5]


def test_reset_starts_warm_up_again():
    det = make_detector(make_artifact(), warmup=3)
    x = noisy(np.random.default_rng(4), 12)
    for t in range(8):
        assert step1(det, "dev", x[t]).warm[0] == (t > 3)
    slot = det.slots["dev"]
    det.reset(np.array([slot]))
    assert all((t[:, slot] == 0).all() for t in det.state)
    out = step1(det, "dev", x[8])
    assert np.isnan(out.score[0]) and not out.warm[0]
    assert not step1(det, "dev", x[9]).warm[0]


def test_unobserved_rows_neither_score_nor_learn():
    det = make_detector(make_artifact(), warmup=2)
    x = noisy(np.random.default_rng(6), 10)
    for t in range(5):
        step1(det, "dev", x[t])
    slot = det.slots["dev"]
    before = (det.stats.mean[slot].copy(), det.stats.var[slot].copy(), int(det.stats.count[slot]))
    out = step1(det, "dev", x[5] + 1000 * STD, observed=False)
    assert np.isnan(out.score[0]) and not out.warm[0] and not out.is_anomaly[0]
    assert not np.isnan(out.forecast[0]).any()  # the forecast for it existed
    np.testing.assert_array_equal(det.stats.mean[slot], before[0])
    np.testing.assert_array_equal(det.stats.var[slot], before[1])
    assert det.stats.count[slot] == before[2]
    assert det.age[slot] == 6  # but it advanced the recurrent state


# -- (d) flagging a spike --------------------------------------------------------------------------


def _warm_device(det: Detector, n: int = 40) -> tuple[np.ndarray, list[StepOutput]]:
    x = noisy(np.random.default_rng(8), n + 5, scale=0.5)
    outs = [step1(det, "dev", x[t]) for t in range(n)]
    return x, outs


@pytest.mark.parametrize("sensor", [0, 1, 2])
def test_spike_after_warm_up_is_flagged_with_its_sensor_on_top(sensor):
    det = make_detector(make_artifact(), warmup=10, threshold=StaticThreshold(6.0), burnin=5)
    x, outs = _warm_device(det)
    assert not any(o.is_anomaly[0] for o in outs)  # plain noise: no false alarms
    assert outs[-1].warm[0]
    spiked = x[40].copy()
    spiked[sensor] += 60 * STD[sensor]
    out = step1(det, "dev", spiked)
    assert out.warm[0] and out.is_anomaly[0]
    assert out.score[0] > out.threshold[0] == 6.0
    assert out.top[0] == sensor


def test_flagged_step_does_not_change_error_statistics_unless_asked():
    for learn in (False, True):
        thr = AdaptiveThreshold(quantile=0.99, margin=1.5, floor=6.0)
        det = make_detector(make_artifact(), warmup=10, threshold=thr, learn_from_anomalies=learn)
        x, _ = _warm_device(det)
        slot = det.slots["dev"]
        before = (det.stats.mean[slot].copy(), det.stats.var[slot].copy(), int(det.stats.count[slot]))
        q_before = thr.export(slot)
        spiked = x[40].copy()
        spiked[2] -= 80 * STD[2]
        out = step1(det, "dev", spiked)
        assert out.is_anomaly[0]
        if not learn:
            np.testing.assert_array_equal(det.stats.mean[slot], before[0])
            np.testing.assert_array_equal(det.stats.var[slot], before[1])
            assert det.stats.count[slot] == before[2]
            assert thr.export(slot) == q_before
        else:
            assert det.stats.count[slot] == before[2] + 1
            assert det.stats.var[slot][2] > 10 * before[1][2]
            assert thr.export(slot) != q_before
        # a normal step afterwards learns again
        count = det.stats.count[slot]
        ok = step1(det, "dev", x[41])
        if not ok.is_anomaly[0]:
            assert det.stats.count[slot] == count + 1


def test_a_rewarm_from_history_learns_its_errors_but_not_an_anomaly_among_them():
    """``warm`` (a re-warm under a carried-over threshold) rebuilds the recurrent state exactly as stepping
    would and learns the history's errors into the statistics, but not those of an anomalous step: with
    nothing flagged it screens the errors against their own median and MAD."""
    x = noisy(np.random.default_rng(3), 48, scale=0.5)
    spiked = x.copy()
    spiked[30, 1] += 60 * STD[1]
    stepped = make_detector(make_artifact(), warmup=10, burnin=5)
    for t in range(48):
        step1(stepped, "dev", x[t])

    def rewarmed(history: np.ndarray) -> tuple[Detector, int]:
        det = make_detector(make_artifact(), warmup=10, burnin=5)
        slots = det.slots_of(["dev", "other"])
        det.warm(slots, np.stack([history, np.zeros_like(history)]), np.array([48, 0]))
        return det, int(slots[0])

    clean, s = rewarmed(x)
    # the same state and statistics as stepping through the history (nothing flagged there either)
    for a, b in zip(clean.state, stepped.state, strict=True):
        torch.testing.assert_close(a[:, s], b[:, stepped.slots["dev"]])
    np.testing.assert_allclose(clean.forecast[s], stepped.forecast[stepped.slots["dev"]], rtol=1e-6)
    np.testing.assert_allclose(clean.stats.var[s], stepped.stats.var[stepped.slots["dev"]], rtol=1e-9)
    assert clean.stats.count[s] == 48 - 1 - 5  # past the burn-in, every clean error
    assert clean.stats.count[1 - s] == 0  # a slot without history is untouched
    screened, s = rewarmed(spiked)
    # the spike's step and the next one (its forecast follows the spike) are not learnt
    assert screened.stats.count[s] <= 48 - 1 - 5 - 1
    assert screened.stats.var[s][1] < 2 * clean.stats.var[s][1]
    # learning them, as before, widened the spiked sensor's statistics many times over
    naive = make_detector(make_artifact(), warmup=10, burnin=5)
    naive_slot = naive.slot("dev")
    with torch.inference_mode():
        for t in range(48):
            xz = NORM.apply(spiked[t][None, :])
            if naive.age[naive_slot] > 5:
                err = xz - naive.forecast[[naive_slot]]
                update_stats(naive.stats, np.array([naive_slot]), err, np.array([True]), naive.scoring.alpha)
            naive._advance(np.array([naive_slot]), xz)
    assert naive.stats.var[naive_slot][1] > 20 * screened.stats.var[s][1]


# -- (e) export / restore ------------------------------------------------------------------------


def test_export_restore_continues_identically():
    art = make_artifact(seed=9)
    a = make_detector(art, warmup=5, threshold=AdaptiveThreshold(quantile=0.9, margin=1.2, floor=2.0, rate=0.3))
    x = noisy(np.random.default_rng(10), 40)
    x[30, 1] += 30 * STD[1]
    for t in range(15):
        step1(a, "other", x[t] * 1.01)  # a neighbour so that slots differ
        step1(a, "dev", x[t])
    blob = a.export("dev")
    assert isinstance(blob, bytes)

    b = make_detector(art, warmup=5, threshold=AdaptiveThreshold(quantile=0.9, margin=1.2, floor=2.0, rate=0.3))
    for name in ("x1", "x2", "x3"):
        b.slot(name)
    assert b.restore("dev", blob) is True
    assert b.slots["dev"] != a.slots["dev"]
    assert b.export("dev") == blob  # the whole state, threshold included, moved

    flagged = 0
    for t in range(15, 40):
        ra, rb = row(step1(a, "dev", x[t]), 0), row(step1(b, "dev", x[t]), 0)
        assert_rows_close(ra, rb, atol=1e-6)
        flagged += ra["is_anomaly"]
    assert flagged >= 1
    assert a.export("dev") == b.export("dev")


def test_a_restarted_worker_restores_the_whole_ensemble_before_its_first_step():
    """The likelihood ensemble's checkpoint restores into a fresh detector (a restarted worker restores a
    device before its first reading): its spatial range used to need a first step to know the feature
    count, so its state (distribution, probation, range) was dropped and the device started afresh."""
    art = make_artifact(seed=9)
    a = make_detector(art, warmup=5, threshold=make_threshold("ensemble", value=0.5, quantile=0.99, margin=1.5))
    x = noisy(np.random.default_rng(10), 320)
    x[300, 0] += 12 * STD[0]
    for t in range(260):
        step1(a, "dev", x[t])
    blob = a.export("dev")
    b = make_detector(art, warmup=5, threshold=make_threshold("ensemble", value=0.5, quantile=0.99, margin=1.5))
    assert b.restore("dev", blob) is True
    assert b.export("dev") == blob
    for t in range(260, 320):
        assert_rows_close(row(step1(a, "dev", x[t]), 0), row(step1(b, "dev", x[t]), 0), atol=1e-6)
    assert a.export("dev") == b.export("dev")


def test_the_ensembles_state_is_exported_for_many_devices_at_once_and_old_checkpoints_restore():
    """``export_many`` gathers every device's threshold state in one pass (each row that device's own, as
    its single export has it) and packs it as float64; a checkpoint written before that, with the state
    as a msgpack list, restores to the same state."""
    import msgspec

    from models.detector import _dec, _Exported

    art = make_artifact(seed=9)
    a = make_detector(art, warmup=5, threshold=make_threshold("ensemble", value=0.5, quantile=0.99, margin=1.5))
    rng = np.random.default_rng(4)
    devices = ["d0", "d1", "d2"]
    for t in range(200):
        for k, dev in enumerate(devices):
            if t % (k + 1) == 0:  # each device at its own pace: different states
                step1(a, dev, noisy(rng, 1, scale=0.5 + k)[0])
    rows = a.threshold.export_many(a.slots_of(devices))
    singles = [a.threshold.export(a.slots[d]) for d in devices]
    for r, single in zip(rows, singles, strict=True):
        np.testing.assert_array_equal(r, np.array(single))
    assert not np.array_equal(rows[0], rows[1], equal_nan=True)
    blobs = a.export_many(devices)
    for blob, single in zip(blobs, singles, strict=True):
        e = _dec.decode(blob)
        assert e.threshold == [] and len(e.threshold_f64) == 8 * len(single)
        old = msgspec.msgpack.encode(msgspec.structs.replace(e, threshold=single, threshold_f64=b""))
        b = make_detector(art, warmup=5, threshold=make_threshold("ensemble", value=0.5, quantile=0.99, margin=1.5))
        assert b.restore("d0", old) is True
        np.testing.assert_array_equal(np.array(b.threshold.export(b.slots["d0"])), np.array(single))
        truncated = msgspec.msgpack.encode(msgspec.structs.replace(e, threshold_f64=e.threshold_f64[:-3]))
        assert b.restore("d0", truncated) is False
    assert isinstance(_dec.decode(blobs[0]), _Exported)


def test_restore_refuses_a_blob_from_another_model_version():
    art = make_artifact(seed=9)
    a = make_detector(art)
    x = noisy(np.random.default_rng(10), 10)
    for t in range(10):
        step1(a, "dev", x[t])
    blob = a.export("dev")

    other = Artifact(art.model, FEATURES, NORM, version="t2")  # same weights, different version
    b = make_detector(other)
    assert b.restore("dev", blob) is False
    slot = b.slots["dev"]
    assert b.age[slot] == 0 and b.stats.count[slot] == 0
    assert all((t[:, slot] == 0).all() for t in b.state)
    assert np.isnan(step1(b, "dev", x[0]).score[0])  # starts fresh


def test_restore_refuses_blobs_that_do_not_fit():
    a = make_detector(make_artifact(seed=9))
    step1(a, "dev", MEAN)
    blob = a.export("dev")
    wider = make_detector(make_artifact(seed=9, hidden=8))
    assert wider.restore("dev", blob) is False
    gru = make_detector(make_artifact("gru", seed=9))
    assert gru.restore("dev", blob) is False
    assert make_detector(make_artifact()).restore("dev", b"\x00garbage") is False


# -- (f) slot growth -----------------------------------------------------------------------------


def test_slot_growth_keeps_existing_states():
    art = make_artifact(seed=12)
    thr = AdaptiveThreshold(quantile=0.9, margin=1.2, floor=2.0, rate=0.3)
    small = make_detector(art, threshold=thr, capacity=4)
    ref = make_detector(art, threshold=AdaptiveThreshold(quantile=0.9, margin=1.2, floor=2.0, rate=0.3), capacity=64)
    rng = np.random.default_rng(13)
    first = [f"d{i}" for i in range(4)]
    seqs = {d: noisy(rng, 30) for d in first}

    def both(t: int) -> None:
        ss = np.array([small.slot(d) for d in first])
        rs = np.array([ref.slot(d) for d in first])
        x = np.array([seqs[d][t] for d in first])
        o1, o2 = small.step(ss, x), ref.step(rs, x)
        for i in range(4):
            assert_rows_close(row(o1, i), row(o2, i), atol=1e-6)

    for t in range(10):
        both(t)
    assert small.capacity == 4
    slots_before = dict(small.slots)
    exports_before = {d: small.export(d) for d in first}

    for i in range(10):  # beyond the initial capacity
        small.slot(f"new{i}")
    assert small.capacity > 4
    assert len(set(small.slots.values())) == 14
    assert {d: small.slots[d] for d in first} == slots_before
    assert {d: small.export(d) for d in first} == exports_before
    assert all(t.shape[1] == small.capacity for t in small.state)
    assert len(small.forecast) == len(small.age) == len(small.stats.count) == small.capacity
    assert len(thr.q) >= small.capacity
    for i in range(10):  # the new devices are fresh
        s = small.slots[f"new{i}"]
        assert small.age[s] == 0 and small.stats.count[s] == 0

    for t in range(10, 30):
        both(t)


def test_released_slot_is_reused_fresh():
    det = make_detector(make_artifact(), capacity=4)
    x = noisy(np.random.default_rng(14), 5)
    for t in range(5):
        step1(det, "old", x[t])
    s = det.slots["old"]
    det.release("old")
    assert "old" not in det.slots
    assert det.slot("new") == s  # the freed slot is reused ...
    assert det.age[s] == 0 and det.stats.count[s] == 0  # ... and reset
    assert all((t[:, s] == 0).all() for t in det.state)
    det.release("never-seen")  # no-op


# -- (g) thresholds --------------------------------------------------------------------------------


def test_static_threshold():
    thr = StaticThreshold(5.5)
    slots = np.array([0, 7, 3])
    np.testing.assert_array_equal(thr.values(slots), [5.5, 5.5, 5.5])
    thr.update(slots, np.array([100.0, 200.0, 300.0]), np.ones(3, bool))
    np.testing.assert_array_equal(thr.values(slots), [5.5, 5.5, 5.5])
    assert thr.export(0) == []


def test_adaptive_threshold_rises_for_a_noisier_device_and_respects_the_floor():
    floor = 4.0
    thr = AdaptiveThreshold(quantile=0.99, margin=1.5, floor=floor, rate=0.05)
    thr.grow(3)
    slots = np.array([0, 1, 2])
    np.testing.assert_array_equal(thr.values(slots), [floor] * 3)
    rng = np.random.default_rng(15)
    for _ in range(3000):
        scores = np.array([abs(rng.normal(0, 1.0)), abs(rng.normal(0, 6.0)), 1000.0])
        learn = np.array([True, True, False])  # slot 2 never learns
        thr.update(slots, scores, learn)
        assert (thr.values(slots) >= floor).all()
    quiet, loud, frozen = thr.values(slots)
    assert quiet == floor  # regular errors stay at the floor
    assert loud > 2 * floor  # the noisier device's threshold rose well above it
    assert loud == pytest.approx(1.5 * thr.q[1])
    # roughly tracks margin x the 99% quantile of |N(0, 6)| (~15.5)
    assert 1.5 * 10 < loud < 1.5 * 25
    assert frozen == floor

    state = thr.export(1)
    other = AdaptiveThreshold(quantile=0.99, margin=1.5, floor=floor, rate=0.05)
    other.grow(2)
    other.restore(0, state)
    assert other.values(np.array([0]))[0] == loud
    thr.reset(np.array([1]))
    assert thr.values(np.array([1]))[0] == floor


def test_adaptive_threshold_in_the_detector_rises_for_a_heavy_tailed_device():
    thr = AdaptiveThreshold(quantile=0.99, margin=1.5, floor=3.0, rate=0.1)
    det = make_detector(make_artifact(seed=16), warmup=5, threshold=thr)
    rng = np.random.default_rng(17)
    n = 300
    calm = noisy(rng, n, scale=0.3)
    wild = noisy(rng, n, scale=0.3)
    wild += STD * 0.3 * rng.standard_t(1.5, (n, 3)).clip(-40, 40)  # heavy tails: frequent large errors
    ids = np.array([det.slot("calm"), det.slot("wild")])
    for t in range(n):
        out = det.step(ids, np.array([calm[t], wild[t]]))
        assert (out.threshold >= 3.0).all()
    th = thr.values(ids)
    assert th[1] > th[0]
    assert th[1] > 3.0


def test_make_threshold():
    assert isinstance(make_threshold("static", value=6.0, quantile=0.99, margin=1.5), StaticThreshold)
    adaptive = make_threshold("adaptive", value=6.0, quantile=0.99, margin=1.5)
    assert isinstance(adaptive, AdaptiveThreshold)
    assert adaptive.floor == 4.5 and adaptive.quantile == 0.99 and adaptive.margin == 1.5
    with pytest.raises(ValueError):
        make_threshold("magic", value=6.0, quantile=0.99, margin=1.5)


def test_export_many_gathers_each_devices_own_state() -> None:
    from models.detector import _dec

    det = make_detector(make_artifact())
    rng = np.random.default_rng(3)
    ids = [f"d{i}" for i in range(7)]
    slots = np.array([det.slot(d) for d in ids])
    for _ in range(4):
        det.step(slots, rng.normal(size=(len(ids), det.n_features)) + det.artifact.normaliser.mean)
    order = ids[::-1]
    blobs = det.export_many(order)
    assert len(blobs) == len(order) and det.export_many([]) == []
    for dev, blob in zip(order, blobs, strict=True):
        s = det.slots[dev]
        e = _dec.decode(blob)
        assert e.version == det.version
        assert e.state == [t[:, s].cpu().numpy().tobytes() for t in det.state]
        assert e.forecast == det.forecast[s].tobytes()
        assert (e.age, e.err_count) == (int(det.age[s]), int(det.stats.count[s]))
        assert e.err_mean == det.stats.mean[s].tolist() and e.err_var == det.stats.var[s].tolist()
        assert blob == det.export(dev)


def test_the_median_of_a_histories_steps_is_numpys_nanmedian() -> None:
    from models.detector import _median_of_steps

    rng = np.random.default_rng(0)
    e = rng.normal(size=(50, 12, 3))
    n = rng.integers(1, 13, size=50)
    e[np.arange(12)[None, :] >= n[:, None]] = np.nan  # each row's finite steps, then NaN
    rng.permuted(e, axis=1, out=e)  # in any order
    np.testing.assert_allclose(_median_of_steps(e, n), np.nanmedian(e, axis=1, keepdims=True))
