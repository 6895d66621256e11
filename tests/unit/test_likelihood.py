"""The anomaly likelihood, the reference deviation and the calibrated threshold (models/scoring/):
causal, per slot, batching-invisible, probation, suppression, not learning flagged steps, export/restore,
and wired into the Detector."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.scoring import (
    AnomalyLikelihood,
    CalibratedThreshold,
    EnsembleConfig,
    LikelihoodThreshold,
    ReferenceDeviation,
    SeasonalDeviation,
    SpreadDeviation,
    Units,
    WeeklySeasonalDeviation,
    ensemble_threshold,
    erfc,
    log_likelihood,
    make_threshold,
    slow_features,
    tail_probability,
)
from tests.unit.test_detector import STD, make_artifact, make_detector, noisy


def test_erfc_and_log_likelihood():
    x = np.linspace(-6, 6, 121)
    ref = np.array([math.erfc(v) for v in x])
    np.testing.assert_allclose(erfc(x), ref, rtol=2e-7, atol=1e-12)
    assert float(log_likelihood(np.array(0.5))) == pytest.approx(math.log(0.5) / math.log(1e-10))
    assert float(log_likelihood(np.array(1e-5))) == pytest.approx(0.5, abs=1e-4)
    assert float(log_likelihood(np.array(0.0))) == 1.0
    # mirrored below the mean, as Numenta's tailProbability
    t = tail_probability(np.array([1.0, -1.0]), np.array(0.0), np.array(1.0))
    assert t[0] == pytest.approx(t[1]) == pytest.approx(0.5 * math.erfc(1 / math.sqrt(2)))


def run(lik: AnomalyLikelihood, raw: np.ndarray, x: np.ndarray | None = None, learn: bool = True) -> np.ndarray:
    """Step one slot per column of ``raw`` (T, B) together; returns the scores (T, B)."""
    t_len, b = raw.shape
    lik.grow(b)
    slots = np.arange(b)
    xs = np.zeros((t_len, b, 1)) if x is None else x
    out = []
    for t in range(t_len):
        s = lik.step(slots, raw[t], xs[t], np.ones(b, bool))
        lik.update(slots, np.full(b, learn))
        out.append(s)
    return np.array(out)


def test_batched_slots_equal_each_slot_alone_and_scores_are_causal():
    rng = np.random.default_rng(0)
    raw = np.abs(rng.normal(size=(400, 3))) * np.array([1.0, 3.0, 0.2])
    raw[300, 1] = 40.0
    together = run(AnomalyLikelihood(estimation_steps=50), raw)
    for j in range(3):
        alone = run(AnomalyLikelihood(estimation_steps=50), raw[:, j : j + 1])
        np.testing.assert_allclose(together[:, j], alone[:, 0], rtol=0, atol=1e-12)
    changed = raw.copy()
    changed[250:] = 99.0  # the future does not change the past
    np.testing.assert_array_equal(run(AnomalyLikelihood(estimation_steps=50), changed)[:250], together[:250])


def test_probation_then_a_spike_is_likely_anomalous_and_repeats_are_suppressed():
    rng = np.random.default_rng(1)
    raw = np.abs(rng.normal(size=(600, 1)))
    raw[500:503, 0] = 30.0
    s = run(AnomalyLikelihood(estimation_steps=100, scale="htm"), raw)[:, 0]
    neutral = float(log_likelihood(np.array(0.5)))
    assert np.allclose(s[:100], neutral)  # probation: neutral likelihood
    assert s[100:500].max() < 0.5
    assert s[500] > 0.5  # the first red step is reported
    assert s[501] == pytest.approx(float(log_likelihood(np.array(1e-3))))  # the next red ones: yellow
    no_suppress = run(AnomalyLikelihood(estimation_steps=100, suppress=False, scale="htm"), raw)[:, 0]
    assert no_suppress[501] > 0.5
    assert ((s >= 0) & (s <= 1)).all()
    tail = run(AnomalyLikelihood(estimation_steps=100, scale="tail"), raw)[:, 0]
    np.testing.assert_array_equal(tail[100:500] > 0.5, s[100:500] > 0.5)  # same anchor: tail 1e-5 -> 0.5
    assert 0.5 < tail[500] < 1.0  # no saturation


@pytest.mark.parametrize("learn_red", [False, True])
def test_flagged_steps_and_red_averages_are_not_learnt(learn_red):
    lik = AnomalyLikelihood(estimation_steps=5, learn_red=learn_red)
    lik.grow(1)
    slots = np.array([0])
    rng = np.random.default_rng(6)
    for _ in range(40):
        lik.step(slots, np.array([1.0 + 0.1 * rng.normal()]), np.zeros((1, 1)), np.array([True]))
        lik.update(slots, np.array([True]))
    mean, var, count = lik.mean.copy(), lik.var.copy(), lik.count.copy()
    lik.step(slots, np.array([50.0]), np.zeros((1, 1)), np.array([True]))
    lik.update(slots, np.array([False]))  # the caller flagged it: never learnt
    assert lik.mean == mean and lik.var == var and lik.count == count
    lik.step(slots, np.array([50.0]), np.zeros((1, 1)), np.array([True]))  # a red average, not flagged
    lik.update(slots, np.array([True]))
    assert (lik.mean > mean)[0] == learn_red


def test_spatial_anomaly_scores_one():
    raw = np.full((200, 1), 0.5)
    x = np.sin(np.arange(200) / 5.0)[:, None, None].copy()
    x[150] = 1.2  # beyond max + 5 % of the range (1.1)
    x[170] = 1.05  # within the tolerance
    s = run(AnomalyLikelihood(estimation_steps=20, spatial_tolerance=0.05), raw, x)[:, 0]
    assert s[150] == 1.0
    assert s[170] < 1.0


def test_a_lagged_spatial_range_sees_an_excursion_that_creeps_beyond_it():
    """Numenta's range grows with every step, so a value that leaves it a little at a time never leaves it
    by the tolerance; the range of the inputs before the last ``spatial_lag`` steps still holds the level
    from before the excursion. Every plain hit is a lagged hit too (the lagged range is never wider)."""
    t = np.arange(400)
    x = np.sin(t / 5.0)[:, None, None].copy()  # range [-1, 1]: 5 % of it is 0.1
    x[250:300, 0, 0] = -1.0 - 0.008 * np.arange(50)  # creeps down to -1.392, 0.008 a step
    x[350, 0, 0] = 1.3  # a jump beyond the range
    raw = np.full((400, 1), 0.5)
    plain = run(AnomalyLikelihood(estimation_steps=20, spatial_tolerance=0.05), raw, x)[:, 0]
    lagged = run(AnomalyLikelihood(estimation_steps=20, spatial_tolerance=0.05, spatial_lag=20), raw, x)[:, 0]
    assert not (plain[250:300] == 1.0).any()
    hits = np.flatnonzero(lagged[250:300] == 1.0) + 250
    # the first step below the range before the excursion (minimum -0.9996) by 5 % of it: -1 - 0.008 k < -1.0996
    assert hits[0] == 263
    assert plain[350] == 1.0 and lagged[350] == 1.0
    # nothing else once the range has seen a whole period (31 steps) and the ring has let it in: a familiar sine
    assert (lagged[60:250] < 1.0).all() and (lagged[300:350] < 1.0).all()


def test_a_lagged_spatial_range_exports_and_restores_its_waiting_inputs():
    rng = np.random.default_rng(4)
    raw = np.abs(rng.normal(size=(300, 1)))
    x = rng.normal(size=(300, 1, 2))
    x[220:260, 0, 0] = np.linspace(2.5, 4.0, 40)  # beyond the normal range, part of it still in the ring
    a = AnomalyLikelihood(estimation_steps=30, spatial_tolerance=0.05, spatial_lag=15)
    run(a, raw[:230], x[:230])
    state = a.export(0)
    b = AnomalyLikelihood(estimation_steps=30, spatial_tolerance=0.05, spatial_lag=15)
    b.grow(2)
    b.restore(1, state)  # before its first step: the feature count comes from the state
    assert b.export(1) == state
    rest_a = run(a, raw[230:], x[230:])[:, 0]
    rest_b = []
    for t in range(230, 300):
        rest_b.append(b.step(np.array([1]), raw[t], x[t], np.array([True]))[0])
        b.update(np.array([1]), np.array([True]))
    np.testing.assert_allclose(rest_a, rest_b, rtol=0, atol=1e-12)
    # a state without the ring (the plain check, or an older version) restores with nothing waiting; one
    # saved with another lag puts its waiting inputs into the range at once
    plain = AnomalyLikelihood(estimation_steps=30, spatial_tolerance=0.05)
    plain.grow(1)
    plain.restore(0, state)
    assert plain.count[0] == state[1] and plain.hi[0, 0] == x[:230, 0, 0].max()  # the ring's inputs joined
    c = AnomalyLikelihood(estimation_steps=30, spatial_tolerance=0.05, spatial_lag=15)
    c.grow(1)
    c.restore(0, plain.export(0))
    assert c.count[0] == state[1] and np.isnan(c.recent[0]).all() and c.hi[0, 0] == plain.hi[0, 0]


def test_likelihood_export_restore_continues_identically():
    rng = np.random.default_rng(2)
    raw = np.abs(rng.normal(size=(300, 1)))
    raw[250, 0] = 20.0
    x = rng.normal(size=(300, 1, 2))
    a = AnomalyLikelihood(estimation_steps=30, spatial_tolerance=0.1)
    first = run(a, raw[:200], x[:200])
    b = AnomalyLikelihood(estimation_steps=30, spatial_tolerance=0.1)
    b.grow(3)
    b.restore(2, a.export(0))  # before any step, as a restarted worker does: the feature count comes with the state
    assert b.export(2) == a.export(0)
    rest_a = run(a, raw[200:], x[200:])
    rest_b = []
    for t in range(200, 300):
        rest_b.append(b.step(np.array([2]), raw[t], x[t], np.array([True]))[0])
        b.update(np.array([2]), np.array([True]))
    np.testing.assert_allclose(rest_a[:, 0], rest_b, rtol=0, atol=1e-12)
    assert first.shape == (200, 1)


def test_likelihood_threshold_in_the_detector():
    thr = make_threshold("likelihood", value=5.0, quantile=0.99, margin=1.5, likelihood=0.5)
    assert isinstance(thr, LikelihoodThreshold) and thr.value == 0.5
    thr.likelihood = AnomalyLikelihood(estimation_steps=40)
    det = make_detector(make_artifact(seed=4), warmup=5, threshold=thr)
    rng = np.random.default_rng(3)
    x = noisy(rng, 300, scale=0.3)
    x[250, 1] += 30 * STD[1]
    scores, flags = [], []
    for t in range(300):
        out = det.step(np.array([det.slot("d")]), x[t][None])
        scores.append(out.score[0])
        flags.append(out.is_anomaly[0])
    s = np.array(scores)
    assert np.isnan(s[0])
    assert np.nanmin(s) >= 0 and np.nanmax(s) <= 1
    assert flags[250] and s[250] > 0.5
    assert sum(flags) <= 3
    blob = det.export("d")
    other = make_detector(
        make_artifact(seed=4), warmup=5, threshold=make_threshold("likelihood", value=5, quantile=0.99, margin=1.5)
    )
    other.threshold.likelihood = AnomalyLikelihood(estimation_steps=40)  # type: ignore[attr-defined]
    other.threshold.grow(other.capacity)
    assert other.restore("d", blob)
    y = noisy(rng, 20, scale=0.3)
    for t in range(20):
        a = det.step(np.array([det.slot("d")]), y[t][None])
        b = other.step(np.array([other.slot("d")]), y[t][None])
        np.testing.assert_allclose(a.score, b.score, rtol=1e-6, atol=1e-9)


def test_reference_deviation_keeps_a_flagged_shift_flagged_but_follows_learnt_drift():
    rng = np.random.default_rng(4)
    n = 600
    x = rng.normal(0, 1.0, (n, 1, 2))
    x[400:, 0, 0] += 5.0  # a sustained shift of one feature
    for learn_shift in (False, True):
        ref = ReferenceDeviation(span=10, skip_steps=10, reference_steps=200, halflife_steps=20)
        ref.grow(1)
        got = []
        for t in range(n):
            got.append(ref.step(np.array([0]), x[t], np.array([True]))[0])
            ref.update(np.array([0]), np.array([t < 400 or learn_shift]))
        s = np.array(got)
        assert (s[:209] == 0).all()  # no score before the reference is set (210 seen steps)
        assert s[210:400].max() < 4
        if learn_shift:
            assert s[-50:].max() < 5  # the level followed the shift
        else:
            assert s[420:].min() > 10  # not learnt: stays flagged


def test_reference_deviation_of_a_constant_reference_period_is_bounded_by_its_scale_floor():
    """A sensor that sat still through its reference period (a door, a valve, an idle disk) has a
    reference std of 0. Its later moves are scored against the floor (0.1 input units, the seasonal
    member's too), not against nothing: a 1-unit shift is z = 10, not 1e6."""
    ref = ReferenceDeviation(span=10, skip_steps=5, reference_steps=50, halflife_steps=100)
    ref.grow(1)
    x = np.zeros((200, 1, 1))
    x[100:, 0, 0] = 1.0
    s = np.array([ref.step(np.array([0]), x[t], np.array([True]))[0] for t in range(200)])
    assert (s[55:100] == 0).all()
    assert s[-1] == pytest.approx(10.0, rel=1e-3)  # the smoothed value has converged to the shift


def test_calibrated_threshold_is_margin_times_the_calibration_quantile():
    thr = CalibratedThreshold(skip_steps=5, calibration_steps=100, quantile=0.9, margin=2.0)
    thr.grow(2)
    slots = np.array([0, 1])
    rng = np.random.default_rng(5)
    raws = np.abs(rng.normal(size=(120, 2))) * np.array([1.0, 4.0])
    for t in range(120):
        assert np.isinf(thr.values(slots)).all() == (t < 105)
        out = thr.transform(slots, raws[t], np.zeros((2, 1)), np.ones(2, bool))
        np.testing.assert_array_equal(out, raws[t])
    want = 2.0 * np.quantile(raws[5:105], 0.9, axis=0)
    np.testing.assert_allclose(thr.values(slots), want, rtol=1e-6)
    thr.reset(np.array([1]))
    assert np.isinf(thr.values(np.array([1])))[0]
    state = thr.export(0)
    other = CalibratedThreshold(skip_steps=5, calibration_steps=100, quantile=0.9, margin=2.0)
    other.grow(1)
    other.restore(0, state)
    assert other.values(np.array([0]))[0] == thr.values(np.array([0]))[0]


def test_per_slot_probation_learns_from_half_and_scores_after_the_prefix():
    rng = np.random.default_rng(7)
    raw = np.abs(rng.normal(size=(300, 2)))
    lik = AnomalyLikelihood(estimation_steps=100)
    lik.grow(2)
    slots = np.arange(2)
    lik.set_probation(np.array([1]), np.array([40]), np.array([60]))
    ready, counts = [], []
    for t in range(300):
        lik.step(slots, raw[t], np.zeros((2, 1)), np.ones(2, bool))
        lik.update(slots, np.ones(2, bool))
        ready.append(lik.ready(slots).copy())
        counts.append(lik.count.copy())
    r, c = np.array(ready), np.array(counts)
    assert c[39, 1] == 0 and c[40, 1] == 1  # slot 1: its first 40 averages are not learnt
    assert not r[98, 1] and r[99, 1]  # ready after 40 + 60 steps
    assert not r[98, 0] and r[99, 0]  # slot 0: the default (100 estimation steps from the start)
    assert c[40, 0] == 41
    # export/restore keeps the slot's own probation; a state without it keeps the default
    other = AnomalyLikelihood(estimation_steps=100)
    other.grow(1)
    other.step(np.array([0]), np.array([0.0]), np.zeros((1, 1)), np.array([False]))
    lik.reset(np.array([1]))
    lik.set_probation(np.array([1]), np.array([40]), np.array([60]))
    other.restore(0, lik.export(1))
    assert other.learn_n[0] == 40 and other.estimate_n[0] == 60
    other.reset(np.array([0]))
    other.restore(0, lik.export(1)[:-2])
    assert other.learn_n[0] == 0 and other.estimate_n[0] == 100
    with pytest.raises(ValueError):
        lik.set_probation(np.array([0]), np.array([-1]), np.array([5]))


def _daily(days: int, per_hour: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A daily square wave (high from 8 h to 18 h) with small noise; returns values (T, 1) and hour bins."""
    t = np.arange(days * 24 * per_hour)
    hour = (t // per_hour) % 24
    x = np.where((hour >= 8) & (hour < 18), 3.0, 0.0) + 0.05 * rng.normal(size=len(t))
    return x[:, None], hour


def _run_seasonal(
    sd: SeasonalDeviation, x: np.ndarray, bins: np.ndarray, learn: np.ndarray | None = None, flag: float = np.inf
):
    """One slot per column: x (T, B, F), bins (T, B); returns scores (T, B). Scores above ``flag`` are
    not learnt (as the detector does with flagged steps)."""
    t_len, b = bins.shape
    sd.grow(b)
    slots = np.arange(b)
    out = []
    for t in range(t_len):
        out.append(sd.step(slots, x[t], np.ones(b, bool), bins[t]))
        sd.update(slots, (np.ones(b, bool) if learn is None else learn[t]) & (out[-1] <= flag))
    return np.array(out)


def test_seasonal_deviation_flags_a_missing_daily_peak_that_a_level_cannot_see():
    rng = np.random.default_rng(8)
    x, hour = _daily(8, 4, rng)
    x[6 * 96 + 8 * 4 : 6 * 96 + 18 * 4] = 0.0  # day 6: the daily peak does not come (values stay normal)
    s = _run_seasonal(SeasonalDeviation(span=3), x[:, None, :], hour[:, None], flag=5.0)[:, 0]
    assert (s[: 2 * 96] == 0).all()  # no score before a bin has been entered min_visits (3) times
    normal = s[3 * 96 : 6 * 96]
    assert normal.max() < 5  # the daily step itself is normal (its hours have their own scale)
    assert s[6 * 96 + 9 * 4 : 6 * 96 + 17 * 4].min() > 2 * normal.max()
    # an unknown bin scores 0 and changes nothing
    sd = SeasonalDeviation()
    sd.grow(1)
    assert sd.step(np.array([0]), np.ones((1, 1)), np.array([True]), np.array([-1]))[0] == 0.0
    assert sd.visits.sum() == 0


def test_seasonal_deviation_is_causal_batched_and_restores_identically():
    rng = np.random.default_rng(9)
    x1, hour = _daily(6, 3, rng)
    x2 = rng.normal(size=x1.shape)
    x = np.stack([x1, x2], axis=1)  # (T, 2, 1)
    bins = np.stack([hour, (hour + 5) % 24], axis=1)
    together = _run_seasonal(SeasonalDeviation(span=3), x, bins)
    for j in range(2):
        alone = _run_seasonal(SeasonalDeviation(span=3), x[:, j : j + 1], bins[:, j : j + 1])
        np.testing.assert_allclose(together[:, j], alone[:, 0], rtol=0, atol=1e-12)
    changed = x.copy()
    changed[300:] = 50.0  # the future does not change the past
    np.testing.assert_array_equal(_run_seasonal(SeasonalDeviation(span=3), changed, bins)[:300], together[:300])
    # flagged (not learnt) steps leave the profile alone: a shift that is never learnt stays visible
    learn = np.ones(bins.shape, bool)
    learn[300:] = False
    kept = _run_seasonal(SeasonalDeviation(span=3), changed, bins, learn)
    assert kept[-20:, 0].min() > 10
    # export / restore continues identically
    a = SeasonalDeviation(span=3)
    _run_seasonal(a, x[:250], bins[:250])
    b = SeasonalDeviation(span=3)
    b.grow(3)
    b.restore(2, a.export(1))
    for t in range(250, len(x)):
        sa = a.step(np.array([1]), x[t, 1:2], np.array([True]), bins[t, 1:2])
        sb = b.step(np.array([2]), x[t, 1:2], np.array([True]), bins[t, 1:2])
        assert sa[0] == pytest.approx(sb[0], abs=1e-12)
        a.update(np.array([1]), np.array([True]))
        b.update(np.array([2]), np.array([True]))


def test_likelihood_threshold_with_a_seasonal_member_in_the_detector():
    thr = LikelihoodThreshold(
        AnomalyLikelihood(estimation_steps=40),
        0.5,
        ReferenceDeviation(skip_steps=5, reference_steps=20),
        SeasonalDeviation(span=3),
    )
    det = make_detector(make_artifact(seed=4), warmup=5, threshold=thr)
    rng = np.random.default_rng(10)
    x = noisy(rng, 400, scale=0.3)
    hours = (np.arange(400) // 4) % 24
    outs = [det.step(np.array([det.slot("d")]), x[t][None], context=hours[t : t + 1]) for t in range(300)]
    assert all(np.isnan(o.score[0]) or 0 <= o.score[0] <= 1 for o in outs)
    assert thr.seasonal is not None and thr.seasonal.visits[det.slot("d")].sum() > 0
    other = make_detector(
        make_artifact(seed=4),
        warmup=5,
        threshold=LikelihoodThreshold(
            AnomalyLikelihood(estimation_steps=40),
            0.5,
            ReferenceDeviation(skip_steps=5, reference_steps=20),
            SeasonalDeviation(span=3),
        ),
    )
    other.step(np.array([other.slot("d")]), x[0][None], context=hours[:1])  # learn the feature count
    assert other.restore("d", det.export("d"))
    for t in range(300, 400):
        a = det.step(np.array([det.slot("d")]), x[t][None], context=hours[t : t + 1])
        b = other.step(np.array([other.slot("d")]), x[t][None], context=hours[t : t + 1])
        np.testing.assert_allclose(a.score, b.score, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("hold_features", [False, True])
def test_hold_features_keeps_learning_the_sensors_that_are_not_anomalous(hold_features):
    """Feature 0 is anomalous (shifted) for a while; feature 1 drifts slowly all along. Holding the whole
    row locks feature 1's level in and flags it after the anomaly; holding only feature 0 does not."""
    n = 1200
    t = np.arange(n)
    x = np.zeros((n, 1, 2))
    x[:, 0, 1] = np.where(t > 500, (t - 500) * 0.003, 0.0)  # slow normal drift of feature 1 from 500 on
    x[600:900, 0, 0] = 20.0  # anomaly on feature 0
    x += np.random.default_rng(11).normal(0, 0.3, x.shape)
    ref = ReferenceDeviation(span=10, skip_steps=10, reference_steps=100, halflife_steps=20)
    thr = CalibratedThreshold(skip_steps=110, calibration_steps=200, reference=ref, hold_features=hold_features)
    thr.grow(1)
    slots = np.array([0])
    flags = []
    for i in range(n):
        value = thr.values(slots)
        raw = thr.transform(slots, np.zeros(1), x[i], np.ones(1, bool))
        flagged = raw > value
        flags.append(bool(flagged[0]))
        thr.update(slots, raw, ~flagged)
    f = np.array(flags)
    assert f[610:890].all()  # the anomaly is flagged either way
    assert not f[350:600].any()
    if hold_features:
        assert f[950:].mean() < 0.05  # feature 1 was learnt during the anomaly: no lock-in
    else:
        assert f[950:].mean() > 0.9  # feature 1 held at its pre-anomaly level: flagged to the end


def test_suppress_steps_reports_one_event_once_within_the_window():
    rng = np.random.default_rng(12)
    raw = np.abs(rng.normal(size=(400, 1)))
    raw[300, 0] = raw[312, 0] = 40.0  # the average is red 300-309, then again from 312: one event
    raw[350, 0] = 400.0  # a later, separate event (larger: the distribution learnt the first one)
    x = np.zeros((400, 1, 1))
    x[380, 0, 0], x[384, 0, 0] = 50.0, 200.0  # two spatial hits 4 steps apart (each beyond the range so far)
    x[:200, 0, 0] = np.sin(np.arange(200))
    numenta = run(AnomalyLikelihood(estimation_steps=100, spatial_tolerance=0.05), raw, x)[:, 0]
    wide = run(AnomalyLikelihood(estimation_steps=100, spatial_tolerance=0.05, suppress_steps=10), raw, x)[:, 0]
    assert numenta[300] > 0.5 and wide[300] > 0.5
    assert numenta[312] > 0.5  # Numenta's rule: not the step right after a red one, so reported again
    assert wide[312] < 0.5  # within 10 steps of the last red one: the same event
    assert wide[350] > 0.5  # a new event after the window
    assert numenta[380] == numenta[384] == 1.0
    assert wide[380] == 1.0 and wide[384] < 1.0
    np.testing.assert_array_equal(wide[:300], numenta[:300])  # identical until a repeat
    lik = AnomalyLikelihood(suppress_steps=10)
    lik.grow(1)
    with pytest.raises(ValueError):
        AnomalyLikelihood(suppress_steps=0)
    assert lik.since[0] > 10**9


def test_weekly_profile_sees_a_holiday_that_the_daily_one_takes_for_a_sunday():
    """Weekdays peak from 8 h to 18 h, Sundays stay flat; in week 5 a Wednesday stays flat (a holiday)."""
    per_hour = 2
    t = np.arange(6 * 7 * 24 * per_hour)
    hour = (t // per_hour) % 24
    weekday = (t // (24 * per_hour)) % 7
    x = np.where((weekday != 6) & (hour >= 8) & (hour < 18), 3.0, 0.0)
    x = x + 0.05 * np.random.default_rng(13).normal(size=len(t))
    holiday = (t // (24 * per_hour)) == 4 * 7 + 2
    x[holiday] = 0.0 + 0.05 * np.random.default_rng(14).normal(size=int(holiday.sum()))
    bins = (weekday * 24 + hour).astype(np.int64)
    both = WeeklySeasonalDeviation(per_day=24, span=3)
    daily = SeasonalDeviation(bins=24, span=3)
    sw = _run_seasonal(both, x[:, None, None], bins[:, None], flag=5.0)[:, 0]
    sd = _run_seasonal(daily, x[:, None, None], hour[:, None], flag=5.0)[:, 0]
    peak = holiday & (hour >= 10) & (hour < 17)
    assert sw[peak].min() > 5  # the weekly profile (3 weeks of history) expects a working day
    assert sd[peak].max() < sw[peak].min()  # the daily one learnt flat Sundays: the holiday looks less odd
    assert np.array_equal(sw[: 3 * 7 * 24 * per_hour] > 0, sd[: 3 * 7 * 24 * per_hour] > 0)  # daily until then
    # export / restore of both profiles
    other = WeeklySeasonalDeviation(per_day=24, span=3)
    other.grow(2)
    other.restore(1, both.export(0))
    np.testing.assert_array_equal(other.weekly.profile[1], both.weekly.profile[0])
    np.testing.assert_array_equal(other.daily.visits[1], both.daily.visits[0])


def test_hour_of_day_and_of_week_bins():
    from bench.evaluate import hour_of_day

    ts = ["2014-04-07 00:00:00", "2014-04-07 13:59:59", "2014-04-13 23:30:00"]  # Monday, Monday, Sunday
    assert hour_of_day(ts).tolist() == [0, 13, 23]
    assert hour_of_day(ts, weekly=True).tolist() == [0, 13, 6 * 24 + 23]
    assert hour_of_day(ts, bins=48).tolist() == [0, 27, 47]


def _run_spread(sp: SpreadDeviation, x: np.ndarray, learn: np.ndarray | None = None) -> np.ndarray:
    """Step one slot per column of ``x`` (T, B, F) together; returns the scores (T, B)."""
    t_len, b = x.shape[:2]
    sp.grow(b)
    slots = np.arange(b)
    out = []
    for t in range(t_len):
        out.append(sp.step(slots, x[t], np.ones(b, bool)))
        sp.update(slots, np.ones(b, bool) if learn is None else learn[t])
    return np.array(out)


def test_spread_deviation_sees_a_noise_change_but_not_a_level_shift_nor_a_spike():
    rng = np.random.default_rng(16)
    n = 1200
    base = rng.normal(0, 1.0, n)
    noisier = base.copy()
    noisier[800:] *= 3.0  # the noise level triples
    quieter = base.copy()
    quieter[800:] *= 0.2  # ... or drops
    shifted = base.copy()
    shifted[800:] += 10.0  # a level shift: one large increment
    spiked = base.copy()
    spiked[800] += 30.0  # one spike
    x = np.stack([noisier, quieter, shifted, spiked], axis=1)[:, :, None]
    s = _run_spread(SpreadDeviation(), x)
    assert (s[:129] == 0).all() and (s[130] > 0).all()  # scored once the reference is set
    assert s[150:800].max() < 4.5  # same noise: no large score
    assert s[830:900, :2].min() > 5  # more noise, less noise
    assert s[800:, 2].max() < 4.5 and s[800:, 3].max() < 4.5  # a level shift or one spike is not a noise change
    # not learnt (flagged), the changed noise stays visible; learnt, the level follows it
    learn = np.ones((n, 4), bool)
    learn[800:] = False
    held = _run_spread(SpreadDeviation(), x, learn)
    assert held[-100:, :2].min() > 6
    assert (s[-100:, :2].max(axis=0) < held[-100:, :2].min(axis=0)).all()


def test_spread_deviation_is_causal_batched_and_restores_identically():
    rng = np.random.default_rng(17)
    x = rng.normal(size=(500, 3, 2)) * np.array([1.0, 3.0, 0.5])[None, :, None]
    x[350:, 1] *= 4.0
    learn = rng.random((500, 3)) > 0.1
    together = _run_spread(SpreadDeviation(), x, learn)
    for j in range(3):
        alone = _run_spread(SpreadDeviation(), x[:, j : j + 1], learn[:, j : j + 1])
        np.testing.assert_allclose(together[:, j], alone[:, 0], rtol=0, atol=1e-12)
    changed = x.copy()
    changed[300:] = 40.0  # the future does not change the past
    np.testing.assert_array_equal(_run_spread(SpreadDeviation(), changed, learn)[:300], together[:300])
    a = SpreadDeviation()
    _run_spread(a, x[:250], learn[:250])
    b = SpreadDeviation()
    b.grow(3)
    b.restore(2, a.export(1))  # the feature count comes with the state
    for t in range(250, len(x)):
        sa = a.step(np.array([1]), x[t, 1:2], np.array([True]))
        sb = b.step(np.array([2]), x[t, 1:2], np.array([True]))
        assert sa[0] == pytest.approx(sb[0], abs=1e-12)
        a.update(np.array([1]), learn[t, 1:2])
        b.update(np.array([2]), learn[t, 1:2])


def test_likelihood_threshold_with_a_spread_member_exports_and_restores_every_member():
    rng = np.random.default_rng(18)

    def make() -> LikelihoodThreshold:
        return LikelihoodThreshold(
            AnomalyLikelihood(estimation_steps=20),
            0.5,
            ReferenceDeviation(skip_steps=5, reference_steps=20),
            WeeklySeasonalDeviation(per_day=4, span=3),
            SpreadDeviation(),
        )

    x = rng.normal(size=(400, 1))
    x[300:] *= 5.0
    bins = np.arange(400) % 28
    a, b = make(), make()
    a.grow(1)
    b.grow(2)
    one, seen = np.array([0]), np.array([True])
    for t in range(200):
        a.transform(one, np.abs(x[t]), x[t][None], seen, bins[t : t + 1])
        a.update(one, np.abs(x[t]), seen)
    b.transform(one, np.zeros(1), x[:1], np.array([False]), bins[:1])  # learn the feature counts
    b.restore(1, a.export(0))
    assert b.export(1) == a.export(0)
    got_a, got_b = [], []
    for t in range(200, 400):
        got_a.append(a.transform(one, np.abs(x[t]), x[t][None], seen, bins[t : t + 1])[0])
        a.update(one, np.abs(x[t]), seen)
        got_b.append(b.transform(np.array([1]), np.abs(x[t]), x[t][None], seen, bins[t : t + 1])[0])
        b.update(np.array([1]), np.abs(x[t]), seen)
    np.testing.assert_allclose(got_a, got_b, rtol=0, atol=1e-12)
    assert max(got_a[100:]) > 0.5  # the noise change is reported


def _spread_lik_threshold(shared: bool = True) -> LikelihoodThreshold:
    return LikelihoodThreshold(
        AnomalyLikelihood(estimation_steps=20, suppress_steps=10, spatial_tolerance=0.05),
        0.5,
        ReferenceDeviation(skip_steps=5, reference_steps=20),
        WeeklySeasonalDeviation(per_day=4, span=3),
        SpreadDeviation(),
        AnomalyLikelihood(estimation_steps=20, suppress_steps=10),
        shared,
    )


def _run_threshold(thr: LikelihoodThreshold, x: np.ndarray, raw: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Step one slot per column of ``x`` (T, B, F) / ``raw`` (T, B) together, flagged steps not learnt;
    returns the reported scores (T, B)."""
    t_len, b = raw.shape
    thr.grow(b)
    slots = np.arange(b)
    out = []
    for t in range(t_len):
        s = thr.transform(slots, raw[t], x[t], np.ones(b, bool), bins[t])
        thr.update(slots, raw[t], s <= thr.value)
        out.append(s)
    return np.array(out)


def test_spread_likelihood_sees_a_noise_change_and_is_causal_batched_and_restores_identically():
    rng = np.random.default_rng(21)
    n, b = 500, 3
    x = rng.normal(size=(n, b, 1)) * np.array([1.0, 3.0, 0.5])[None, :, None]
    x[350:, 1] *= 5.0  # slot 1: the noise level changes
    raw = np.abs(rng.normal(size=(n, b)))
    bins = np.tile((np.arange(n) % 28)[:, None], (1, b))
    together = _run_threshold(_spread_lik_threshold(), x, raw, bins)
    for j in range(b):
        alone = _run_threshold(_spread_lik_threshold(), x[:, j : j + 1], raw[:, j : j + 1], bins[:, j : j + 1])
        np.testing.assert_allclose(together[:, j], alone[:, 0], rtol=0, atol=1e-12)
    assert together[350:420, 1].max() > 0.5  # the noise change is reported
    changed, changed_raw = x.copy(), raw.copy()
    changed[300:], changed_raw[300:] = 40.0, 99.0  # the future does not change the past
    got = _run_threshold(_spread_lik_threshold(), changed, changed_raw, bins)
    np.testing.assert_array_equal(got[:300], together[:300])
    # the spread likelihood sees a row only once the spread's reference is set
    thr = _spread_lik_threshold()
    _run_threshold(thr, x[:129, :1], raw[:129, :1], bins[:129, :1])
    assert thr.spread_likelihood is not None and thr.spread_likelihood.n[0] == 0
    # export/restore: a restored slot continues identically
    a, c = _spread_lik_threshold(), _spread_lik_threshold()
    _run_threshold(a, x[:250, 1:2], raw[:250, 1:2], bins[:250, 1:2])
    c.grow(2)
    c.transform(np.array([0]), np.zeros(1), x[0, :1], np.array([False]), bins[0, :1])  # learn the feature counts
    c.restore(1, a.export(0))
    assert c.export(1) == a.export(0)
    for t in range(250, n):
        sa = a.transform(np.array([0]), raw[t, 1:2], x[t, 1:2], np.array([True]), bins[t, 1:2])
        a.update(np.array([0]), raw[t, 1:2], sa <= 0.5)
        sc = c.transform(np.array([1]), raw[t, 1:2], x[t, 1:2], np.array([True]), bins[t, 1:2])
        c.update(np.array([1]), raw[t, 1:2], sc <= 0.5)
        assert sa[0] == pytest.approx(sc[0], abs=1e-12)


def test_shared_suppression_reports_one_event_once_across_both_likelihoods():
    rng = np.random.default_rng(22)
    x, raw = rng.normal(size=(140, 1, 1)), np.abs(rng.normal(size=(140, 1)))
    bins = (np.arange(140) % 28)[:, None]
    one, seen = np.array([0]), np.array([True])
    since = {}
    for shared in (True, False):
        thr = _spread_lik_threshold(shared)
        _run_threshold(thr, x, raw, bins)  # past the spread's reference: both likelihoods see every row
        assert thr.spread_likelihood is not None
        thr.spread_likelihood.since[0], thr.likelihood.since[0] = 0, 50  # the spread one reported an event
        thr.transform(one, np.zeros(1), np.zeros((1, 1)), seen, np.zeros(1, np.int64))
        since[shared] = (int(thr.likelihood.since[0]), int(thr.spread_likelihood.since[0]))
    assert since[True] == (1, 1)  # both count from the last event of either
    assert since[False] == (51, 1)
    # before the spread is ready (128 steps), the main likelihood counts its events on its own
    spiked = raw[:120].copy()
    spiked[60] = 30.0
    a, b = _spread_lik_threshold(True), _spread_lik_threshold(False)
    np.testing.assert_array_equal(
        _run_threshold(a, x[:120], spiked, bins[:120]), _run_threshold(b, x[:120], spiked, bins[:120])
    )
    assert a.likelihood.since[0] == b.likelihood.since[0] < 60  # (not stuck at the spike)
    with pytest.raises(ValueError):
        LikelihoodThreshold(AnomalyLikelihood(), 0.5, spread_likelihood=AnomalyLikelihood())


def _run_calibrated(thr: CalibratedThreshold, x: np.ndarray, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step one slot per column of ``x`` (T, B, F) / ``raw`` (T, B) together, flagged steps not learnt;
    returns the reported scores and the flags (T, B)."""
    t_len, b = raw.shape
    thr.grow(b)
    slots = np.arange(b)
    scores, flags = [], []
    for t in range(t_len):
        value = thr.values(slots)
        s = thr.transform(slots, raw[t], x[t], np.ones(b, bool))
        f = s > value
        thr.update(slots, raw[t], ~f)
        scores.append(s)
        flags.append(f)
    return np.array(scores), np.array(flags)


def _wandering(seed: int, n: int = 900) -> tuple[np.ndarray, np.ndarray]:
    """Feature 0 wanders widely (a slow swing, also in the calibration); feature 1 is quiet until a
    moderate shift at 600..750."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    x = rng.normal(0, 0.3, (n, 1, 2))
    x[:, 0, 0] += 6.0 * np.sin(2 * np.pi * t / 200.0)
    x[600:750, 0, 1] += 0.5
    return x, np.abs(rng.normal(size=(n, 1)))


def _calibrated(per_member: bool) -> CalibratedThreshold:
    ref = ReferenceDeviation(span=10, skip_steps=10, reference_steps=100, halflife_steps=50)
    return CalibratedThreshold(
        skip_steps=110, calibration_steps=250, reference=ref, hold_features=True, per_member=per_member
    )


def test_per_member_thresholds_keep_a_wandering_sensor_from_hiding_a_quiet_one():
    x, raw = _wandering(19)
    _, shared = _run_calibrated(_calibrated(False), x, raw)
    score, own = _run_calibrated(_calibrated(True), x, raw)
    assert shared[620:740, 0].mean() < 0.4  # the wandering feature set a threshold the shift is mostly under
    assert own[620:740, 0].mean() > 0.85  # against its own threshold, the quiet feature's shift is flagged
    assert own[360:600, 0].mean() < 0.05 and own[780:, 0].mean() < 0.05  # the swing alone is not
    thr = _calibrated(True)
    _run_calibrated(thr, x[:400], raw[:400])
    assert thr.values(np.array([0]))[0] == 1.0 and thr.col.shape == (1, 3)  # forecast + 2 features
    assert thr.col[0, 1] > thr.col[0, 2]  # the wandering feature has the wider threshold
    assert score[360:, 0].max() > 1.0


def test_per_member_thresholds_are_causal_batched_and_restore_identically():
    xs, raws = zip(*(_wandering(20 + j) for j in range(3)), strict=True)
    x, raw = np.concatenate(xs, axis=1), np.concatenate(raws, axis=1)
    together, _ = _run_calibrated(_calibrated(True), x, raw)
    for j in range(3):
        alone, _ = _run_calibrated(_calibrated(True), x[:, j : j + 1], raw[:, j : j + 1])
        np.testing.assert_allclose(together[:, j], alone[:, 0], rtol=0, atol=1e-12)
    changed = x.copy()
    changed[500:] = 40.0  # the future does not change the past
    np.testing.assert_array_equal(_run_calibrated(_calibrated(True), changed, raw)[0][:500], together[:500])
    a = _calibrated(True)
    _run_calibrated(a, x[:450, :1], raw[:450, :1])
    b = _calibrated(True)
    b.grow(2)
    b.reference.step(np.array([1]), x[0, :1], np.array([False]))  # learn the feature count
    b.restore(1, a.export(0))
    assert b.export(1) == a.export(0)
    for t in range(450, len(x)):
        sa = a.transform(np.array([0]), raw[t, :1], x[t, :1], np.array([True]))
        sb = b.transform(np.array([1]), raw[t, :1], x[t, :1], np.array([True]))
        assert sa[0] == pytest.approx(sb[0], abs=1e-12)
        fa = sa > a.values(np.array([0]))
        a.update(np.array([0]), raw[t, :1], ~fa)
        b.update(np.array([1]), raw[t, :1], ~fa)


def test_a_state_saved_without_the_spread_likelihood_restores_its_members():
    rng = np.random.default_rng(23)
    old = _spread_lik_threshold()
    old.spread_likelihood = None  # the format of the previous version: no spread likelihood
    x, raw = rng.normal(size=(200, 1, 1)), np.abs(rng.normal(size=(200, 1)))
    _run_threshold(old, x, raw, (np.arange(200) % 28)[:, None])
    new = _spread_lik_threshold()
    new.grow(1)
    new.transform(np.array([0]), np.zeros(1), x[0], np.array([False]), np.zeros(1, np.int64))
    new.restore(0, old.export(0))
    assert new.likelihood.export(0) == old.likelihood.export(0)
    assert new.spread is not None and old.spread is not None
    assert new.spread.export(0) == old.spread.export(0)
    assert new.spread_likelihood is not None and new.spread_likelihood.n[0] == 0  # starts afresh


def test_reference_state_restores_into_a_member_that_has_not_stepped_yet():
    """A restarted worker restores a device's checkpoint before its first step: the feature count comes
    from the state itself (it used to be dropped when the member had not seen an input yet)."""
    from models.scoring import ReferenceDeviation

    rng = np.random.default_rng(1)
    a = ReferenceDeviation(skip_steps=2, reference_steps=5)
    a.grow(1)
    for _ in range(12):
        a.step(np.array([0]), rng.normal(size=(1, 3)), np.array([True]))
    fresh = ReferenceDeviation(skip_steps=2, reference_steps=5)
    fresh.grow(1)
    fresh.restore(0, a.export(0))
    assert fresh.export(0) == a.export(0)
    x = rng.normal(size=(1, 3))
    assert fresh.step(np.array([0]), x, np.array([True])) == pytest.approx(a.step(np.array([0]), x, np.array([True])))


def test_slow_features_are_those_that_carry_their_level() -> None:
    rng = np.random.default_rng(5)
    t = np.arange(400)
    train = np.column_stack(
        [
            np.cumsum(rng.normal(0, 0.1, 400)),  # a random walk: slow
            np.sin(2 * np.pi * t / 300.0) + rng.normal(0, 0.05, 400),  # a slow swing
            rng.normal(0, 1.0, 400),  # sensor noise: fast
            np.full(400, 3.0),  # constant: nothing to carry
        ]
    )
    np.testing.assert_array_equal(slow_features(train, lag=10, bound=0.5), [True, True, False, False])
    assert not slow_features(train[:5], lag=10).any()  # too short to tell


def _lock_in(seed: int, n: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Feature 0 is slow (a temperature), feature 1 fast. At 600..750 the fast one shifts and the slow one
    drifts away; after 750 the fast one is back, the slow one stays where the fault left it."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.3, (n, 1, 2))
    x[:, 0, 0] = np.convolve(rng.normal(0, 0.3, n + 49), np.ones(50) / 50, mode="valid")  # smooth, slow
    x[600:750, 0, 1] += 3.0
    x[600:750, 0, 0] += np.linspace(0, 4.0, 150)
    x[750:, 0, 0] += 4.0
    return x, np.abs(rng.normal(size=(n, 1)))


def test_a_slow_sensor_left_offset_by_a_fault_is_reanchored_once_the_fast_ones_are_back() -> None:
    x, raw = _lock_in(31)
    slow_marks = slow_features(x[:400, 0], lag=10, bound=0.5)
    assert slow_marks.tolist() == [True, False]
    _, held = _run_calibrated(_calibrated(True), x, raw)
    thr = _calibrated(True)
    thr.grow(1)
    thr.set_slow(np.array([0]), slow_marks[None, :])
    _, released = _run_calibrated(thr, x, raw)
    assert held[610:745, 0].mean() > 0.9 and released[610:745, 0].mean() > 0.9  # the fault: flagged either way
    assert held[800:, 0].mean() > 0.9  # held, the slow sensor stays flagged for good (the lock-in)
    assert released[770:, 0].mean() < 0.05  # re-anchored once the fast sensor is back
    # before the fault a slow sensor's own wandering beyond its threshold is re-anchored too
    assert released[:600, 0].mean() < held[:600, 0].mean() and released[:600, 0].mean() < 0.02
    # the marks are per slot state: exported and restored with it, cleared by a reset
    other = _calibrated(True)
    other.grow(2)
    other.reference.step(np.array([1]), x[0], np.array([False]))
    other.restore(1, thr.export(0))
    assert other.export(1) == thr.export(0) and other.slow[1].tolist() == [True, False]
    other.reset(np.array([1]))
    assert not other.slow[1].any()
    with pytest.raises(ValueError):
        _calibrated(False).set_slow(np.array([0]), slow_marks[None, :])


def test_the_ensemble_carries_its_state_into_another_normalisation():
    """A model swap hands the ensemble's state to a detector whose artifact normalises the inputs
    differently (Detector.adopt): converted, every member continues as if its inputs had always come in the
    new units -- the likelihood, the spatial range and its waiting inputs, the reference level, the hourly
    and weekly profiles, the noise level, the daily-recurrence memory. Slots may differ."""
    rng = np.random.default_rng(8)
    n, cut = 1400, 1000
    t = np.arange(n)
    raw = 50.0 + 10.0 * np.sin(2 * np.pi * t / 24)[:, None] + rng.normal(0.0, 2.0, size=(n, 2))
    raw[1200:1230, 1] += np.linspace(0.0, 25.0, 30)  # an excursion, reported and then learnt
    z = np.abs(rng.normal(size=n))  # the forecast error's score: unitless
    ctx = t % 168  # one step an hour
    mean_a, std_a, mean_b, std_b = np.array([40.0, 45.0]), np.array([4.0, 5.0]), np.array([55.0, 50.0]), 1.5
    xa, xb = (raw - mean_a) / std_a, (raw - mean_b) / std_b
    a, b = ensemble_threshold(EnsembleConfig()), ensemble_threshold(EnsembleConfig())
    a.grow(2)
    b.grow(5)

    def step(thr: LikelihoodThreshold, slot: int, i: int, x: np.ndarray) -> float:
        slots = np.array([slot])
        out = thr.transform(slots, z[i : i + 1], x[i : i + 1], np.array([True]), ctx[i : i + 1])
        thr.update(slots, z[i : i + 1], out <= 0.5)  # as the detector: flagged steps are not learnt
        return float(out[0])

    for i in range(cut):
        step(a, 1, i, xa)
    units = Units(std_a / std_b, (mean_a - mean_b) / std_b)
    assert b.carries(a)
    b.transfer(a, np.array([1]), np.array([3]), units)  # a shadow: copied, ``a`` goes on
    went_on = [step(a, 1, i, xa) for i in range(cut, n)]
    carried = [step(b, 3, i, xb) for i in range(cut, n)]
    # (to ~1e-6: the log-spread is log(spread + 1e-6), so a converted spread moves it by log(scale) only nearly)
    np.testing.assert_allclose(carried, went_on, rtol=0, atol=1e-5)
    assert [c > 0.5 for c in carried] == [w > 0.5 for w in went_on]
    assert max(went_on) > 0.5  # the excursion was reported by both
    assert b.likelihood.count[3] == a.likelihood.count[1] > 1000
    # a swap: the threshold itself is taken over, converted in place (every slot)
    c = ensemble_threshold(EnsembleConfig())
    c.grow(2)
    for i in range(cut):
        step(c, 0, i, xa)
    c.rescale(units)
    np.testing.assert_allclose([step(c, 0, i, xb) for i in range(cut, n)], went_on, rtol=0, atol=1e-5)
    # a threshold of other members takes nothing over
    assert not make_threshold("likelihood", value=0.5, quantile=0.99, margin=1.5).carries(a)
    assert not ensemble_threshold(EnsembleConfig(seasonal=False)).carries(a)
