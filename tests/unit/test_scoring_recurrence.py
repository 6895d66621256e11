"""DailyRecurrence: events that recur at the same time every day are the series' pattern, not news."""

from __future__ import annotations

import numpy as np
import pytest

from models.scoring import (
    AnomalyLikelihood,
    DailyRecurrence,
    EnsembleConfig,
    LikelihoodThreshold,
    ReferenceDeviation,
    SpreadDeviation,
    WeeklySeasonalDeviation,
    ensemble_threshold,
)
from tests.unit.test_likelihood import _run_threshold

PER_DAY = 4  # 4 "hours" a day, 28 a week: short synthetic days


def _run(rec: DailyRecurrence, bins: np.ndarray, events: np.ndarray, seen: np.ndarray | None = None) -> np.ndarray:
    """Step one slot per column of ``bins`` / ``events`` (T, B) together; returns the recurrence flags."""
    t_len, b = bins.shape
    rec.grow(b)
    slots = np.arange(b)
    ok = np.ones((t_len, b), bool) if seen is None else seen
    return np.array([rec.step(slots, bins[t], ok[t], events[t]) for t in range(t_len)])


def test_an_event_recurs_once_2_of_the_3_previous_days_held_one_at_that_time():
    steps_per_hour = 3
    hours = np.repeat(np.arange(6 * PER_DAY), steps_per_hour)  # 6 days, 3 steps an hour
    bins = (hours % (7 * PER_DAY))[:, None]
    ev = np.zeros((len(hours), 1), bool)
    day = PER_DAY * steps_per_hour
    ev[1 + np.arange(5) * day, 0] = True  # days 0-4 at hour 0
    ev[4 * day + 2 * steps_per_hour, 0] = True  # day 4, two hours later: not the pattern
    got = _run(DailyRecurrence(per_day=PER_DAY, cycle=7 * PER_DAY), bins, ev)
    assert np.flatnonzero(got[:, 0]).tolist() == [1 + 2 * day, 1 + 3 * day, 1 + 4 * day]
    # one hour of jitter is the same time (an hour boundary may fall inside a job's jitter); two is not
    for shift, recurs in ((1, True), (-1, True), (2, False)):
        e = np.zeros_like(ev)
        e[[1, 1 + day, 1 + 2 * day + shift * steps_per_hour], 0] = True
        assert _run(DailyRecurrence(per_day=PER_DAY, cycle=7 * PER_DAY), bins, e)[:, 0].any() == recurs
    # 2 of the 3 previous days: one day without the event keeps the pattern, two do not
    e = np.zeros_like(ev)
    e[[1, 1 + 2 * day, 1 + 3 * day, 1 + 5 * day], 0] = True
    got = _run(DailyRecurrence(per_day=PER_DAY, cycle=7 * PER_DAY), bins, e)
    assert np.flatnonzero(got[:, 0]).tolist() == [1 + 3 * day, 1 + 5 * day]
    e[1 + 3 * day, 0] = False
    assert not _run(DailyRecurrence(per_day=PER_DAY, cycle=7 * PER_DAY), bins, e)[:, 0].any()


def test_hours_without_a_step_are_forgotten_and_unknown_bins_do_not_move_the_clock():
    rec = DailyRecurrence(per_day=PER_DAY, cycle=7 * PER_DAY, days=1, lookback=1, tolerance=0)
    rec.grow(1)
    one, yes = np.array([0]), np.array([True])

    def step(b: int, event: bool, seen: bool = True) -> bool:
        return bool(rec.step(one, np.array([b]), np.array([seen]), np.array([event]))[0])

    assert not step(0, True)  # hour 0 holds an event
    assert not step(-1, True)  # an unknown bin neither records nor moves the clock
    assert not step(3, True, seen=False)  # nor does an unseen row
    assert step(PER_DAY, True)  # a day later (a gap of a day): the same time
    assert rec.clock[0] == PER_DAY
    # a gap longer than the ring: the flags of the hours skipped are forgotten, not aliased
    assert not step(4 * PER_DAY, True)
    assert not step(6 * PER_DAY, True)
    assert step(7 * PER_DAY % 28, True)  # the week wraps: bins are modulo the cycle
    assert yes.all()
    with pytest.raises(ValueError):
        DailyRecurrence(per_day=24, cycle=100)
    with pytest.raises(ValueError):
        DailyRecurrence(days=3, lookback=2)


def test_daily_recurrence_is_batched_causal_and_restores_identically():
    rng = np.random.default_rng(3)
    t_len, b = 300, 3
    bins = np.tile(((np.arange(t_len) // 2) % (7 * PER_DAY))[:, None], (1, b))
    events = rng.random((t_len, b)) < 0.2
    seen = rng.random((t_len, b)) < 0.9
    together = _run(DailyRecurrence(per_day=PER_DAY, cycle=7 * PER_DAY), bins, events, seen)
    assert together.any()
    for j in range(b):
        alone = _run(
            DailyRecurrence(per_day=PER_DAY, cycle=7 * PER_DAY),
            bins[:, j : j + 1],
            events[:, j : j + 1],
            seen[:, j : j + 1],
        )
        np.testing.assert_array_equal(together[:, j], alone[:, 0])
    changed = events.copy()
    changed[150:] = True  # the future does not change the past
    np.testing.assert_array_equal(
        _run(DailyRecurrence(per_day=PER_DAY, cycle=7 * PER_DAY), bins, changed, seen)[:150], together[:150]
    )
    a, c = DailyRecurrence(per_day=PER_DAY, cycle=7 * PER_DAY), DailyRecurrence(per_day=PER_DAY, cycle=7 * PER_DAY)
    _run(a, bins[:150, :1], events[:150, :1], seen[:150, :1])
    c.grow(2)
    c.restore(1, a.export(0))
    assert c.export(1) == a.export(0) and len(a.export(0)) == a.state_size
    for t in range(150, t_len):
        ra = a.step(np.array([0]), bins[t, :1], seen[t, :1], events[t, :1])
        rc = c.step(np.array([1]), bins[t, :1], seen[t, :1], events[t, :1])
        assert ra[0] == rc[0]


def _threshold(recurrence: bool = True, escalation: bool = False) -> LikelihoodThreshold:
    return LikelihoodThreshold(
        AnomalyLikelihood(estimation_steps=30, suppress_steps=10, spatial_tolerance=0.05),
        0.5,
        ReferenceDeviation(skip_steps=5, reference_steps=20),
        WeeklySeasonalDeviation(per_day=PER_DAY, span=3),
        SpreadDeviation(),
        AnomalyLikelihood(estimation_steps=30, suppress_steps=10),
        True,
        DailyRecurrence(per_day=PER_DAY, cycle=7 * PER_DAY, escalation=escalation) if recurrence else None,
    )


def _daily_spikes(
    n_days: int = 12, big_day: int = 11, steps_per_hour: int = 30, seed: int = 5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A noisy series with a short spike at the same time (hour 2, with jitter) every day from day 2 (on
    ``big_day`` beyond the range seen so far), and one at another time (hour 0) on day 9; returns ``x``
    (T, 1, 1), the raw forecast score (T, 1) and the bins (T, 1)."""
    rng = np.random.default_rng(seed)
    day = PER_DAY * steps_per_hour
    t = np.arange(n_days * day)
    x = rng.uniform(-1, 1, (len(t), 1, 1))
    raw = np.abs(rng.normal(0, 1, (len(t), 1)))
    for d in range(2, n_days):
        at = d * day + 2 * steps_per_hour + 5 + (d % 3)
        x[at : at + 2] += 8.0
        raw[at : at + 2] = 12.0
    big = big_day * day + 2 * steps_per_hour + 5 + big_day % 3
    x[big : big + 2] += 12.0
    odd = 9 * day + 10  # hour 0: two hours from the daily spike's
    x[odd : odd + 2] += 8.0
    raw[odd : odd + 2] = 12.0
    bins = ((t // steps_per_hour) % (7 * PER_DAY))[:, None]
    return x, raw, bins


def test_a_spike_every_day_at_the_same_time_is_reported_on_the_first_days_only():
    x, raw, bins = _daily_spikes()
    day, hour = PER_DAY * 30, 30
    plain = _run_threshold(_threshold(False), x, raw, bins)[:, 0]
    got = _run_threshold(_threshold(True), x, raw, bins)[:, 0]

    def reported(s: np.ndarray, d: int, h: int = 2) -> bool:
        return bool((s[d * day + h * hour : d * day + (h + 1) * hour] > 0.5).any())

    assert sum(reported(plain, d) for d in range(2, 12)) >= 7  # without it, the spike is news most days
    assert reported(got, 2) and reported(got, 3)  # the first two days are news
    assert not any(reported(got, d) for d in range(4, 11))  # then the daily pattern
    assert reported(got, 9, 0)  # a spike at another time still is
    first = 4 * day + 2 * hour
    np.testing.assert_array_equal(got[:first], plain[:first])  # nothing changes before the first recurrence
    repeat = _threshold().likelihood.repeat_score
    assert repeat == pytest.approx(0.375)  # tail 1e-3 in the tail_score scale
    news = first + int(np.argmax(plain[first : first + hour] > 0.5))
    assert got[news] == pytest.approx(repeat)  # the step that was news reports as a repeat


def test_a_daily_spike_beyond_the_range_seen_so_far_is_news():
    x, raw, bins = _daily_spikes(n_days=7, big_day=5)
    day, hour = PER_DAY * 30, 30
    got = _run_threshold(_threshold(True), x, raw, bins)[:, 0]
    assert got[4 * day + 2 * hour : 4 * day + 3 * hour].max() < 0.5  # day 4: the pattern
    assert got[5 * day + 2 * hour : 5 * day + 3 * hour].max() == 1.0  # day 5: a spatial hit at that time


@pytest.mark.parametrize("escalation", [False, True])
def test_the_threshold_exports_and_restores_the_recurrence_member(escalation: bool):
    x, raw, bins = _daily_spikes(n_days=8)
    cut = 5 * PER_DAY * 30 + 7
    a, c = _threshold(escalation=escalation), _threshold(escalation=escalation)
    _run_threshold(a, x[:cut], raw[:cut], bins[:cut])
    c.grow(2)
    c.transform(np.array([0]), np.zeros(1), x[0], np.array([False]), bins[0])  # learn the feature counts
    c.restore(1, a.export(0))
    assert c.export(1) == a.export(0)
    assert c.recurrence is not None and a.recurrence is not None
    assert c.recurrence.export(1) == a.recurrence.export(0) and a.recurrence.ring[0].any()
    one, other, seen = np.array([0]), np.array([1]), np.array([True])
    for t in range(cut, len(x)):
        sa = a.transform(one, raw[t], x[t], seen, bins[t])
        a.update(one, raw[t], sa <= 0.5)
        sc = c.transform(other, raw[t], x[t], seen, bins[t])
        c.update(other, raw[t], sc <= 0.5)
        assert sa[0] == pytest.approx(sc[0], abs=1e-12)
    # a state saved without the recurrence member restores the others; its memory starts afresh
    old = _threshold(False)
    _run_threshold(old, x[:cut], raw[:cut], bins[:cut])
    new = _threshold(escalation=escalation)
    new.grow(1)
    new.transform(np.array([0]), np.zeros(1), x[0], np.array([False]), bins[0])
    new.restore(0, old.export(0))
    assert new.likelihood.export(0) == old.likelihood.export(0)
    assert new.recurrence is not None and not new.recurrence.ring[0].any()


def test_the_ensemble_config_builds_it_clocked_by_the_seasonal_context():
    thr = ensemble_threshold(EnsembleConfig())
    assert thr.recurrence is not None and (thr.recurrence.per_day, thr.recurrence.cycle) == (24, 168)
    assert thr.recurrence.escalation and thr.recurrence.state_size == 2 + 2 * 96
    assert not ensemble_threshold(EnsembleConfig(escalation=False)).recurrence.escalation  # type: ignore[union-attr]
    assert ensemble_threshold(EnsembleConfig(weekly=False)).recurrence.cycle == 24  # type: ignore[union-attr]
    assert ensemble_threshold(EnsembleConfig(daily_recurrence=False)).recurrence is None
    assert ensemble_threshold(EnsembleConfig(seasonal=False)).recurrence is None  # no clock without a context


def test_report_peaks_last_a_day_and_restore_from_states_with_or_without_them():
    rec = DailyRecurrence(per_day=PER_DAY, cycle=7 * PER_DAY, escalation=True)
    rec.grow(2)
    one, yes, no = np.array([0]), np.array([True]), np.array([False])

    def weaker(b: int, score: float) -> bool:
        rec.step(one, np.array([b]), yes, no)
        return bool(rec.weaker(one, yes, np.array([score]))[0])

    assert not weaker(0, 0.6)  # nothing reported yet
    rec.report(one, yes, np.array([0.6]))
    assert weaker(1, 0.55) and weaker(1, 0.6) and not weaker(1, 0.65)  # no stronger than the report
    assert weaker(PER_DAY - 1, 0.55)  # the last per_day hours, the report's included
    assert not weaker(PER_DAY, 0.55)  # a day later it is forgotten
    rec.report(one, yes, np.array([0.7]))
    assert rec.state_size == len(rec.export(0)) == 2 + 2 * rec.hours
    rec.restore(1, rec.export(0))
    assert rec.export(1) == rec.export(0)
    rec.step(np.array([1]), np.array([PER_DAY + 1]), yes, no)
    assert rec.weaker(np.array([1]), yes, np.array([0.65]))[0]
    # a state saved without the peaks restores its flags and clock, with no peaks
    plain = DailyRecurrence(per_day=PER_DAY, cycle=7 * PER_DAY)
    plain.grow(1)
    plain.step(np.array([0]), np.array([3]), yes, yes)
    rec.restore(1, plain.export(0))
    assert rec.clock[1] == plain.clock[0] and rec.ring[1].any() and not rec.peak[1].any()
    # and one saved with them restores into a recurrence without escalation, which ignores them
    plain.restore(0, rec.export(0))
    assert plain.export(0) == rec.export(0)[: plain.state_size]


def test_within_a_day_of_a_report_an_event_no_stronger_is_a_repeat():
    """The likelihood alone on a raw score, its distribution frozen after day 3 so each spike's score
    grows with its size: A (day 3, 00:00) is news, B 3 hours later and smaller is the same episode, C larger
    is news; on day 4 a spatial hit is news and sets no peak, so a spike 3 hours after it is news too; D,
    as small as B but more than a day after any report, is news again."""
    per_day, hour = 24, 10  # 10 steps an hour; suppression: 10 steps
    day = per_day * hour
    rng = np.random.default_rng(7)
    n = 6 * day
    raw = np.abs(rng.normal(0, 1, (n, 1)))
    x = rng.uniform(-1, 1, (n, 1, 1))
    at = {"A": 3 * day + 1, "B": 3 * day + 3 * hour + 1, "C": 3 * day + 6 * hour + 1, "D": 5 * day + 18 * hour + 1}
    for k, v in zip(at, (40.0, 25.0, 80.0, 25.0), strict=True):
        raw[at[k]] = v
    spatial, after = 4 * day + 12 * hour + 1, 4 * day + 15 * hour + 1  # a value beyond the range, then a spike
    x[spatial] = 9.0
    raw[after] = 60.0
    bins = ((np.arange(n) // hour) % (7 * per_day))[:, None]

    def run(escalation: bool) -> np.ndarray:
        thr = LikelihoodThreshold(
            AnomalyLikelihood(estimation_steps=30, suppress_steps=10, spatial_tolerance=0.05),
            0.5,
            recurrence=DailyRecurrence(per_day=per_day, cycle=7 * per_day, escalation=escalation),
        )
        thr.grow(1)
        one, yes, out = np.array([0]), np.array([True]), np.zeros(n)
        for t in range(n):
            out[t] = thr.transform(one, raw[t], x[t], yes, bins[t])[0]
            thr.update(one, raw[t], np.array([t < 3 * day and out[t] <= 0.5]))
        return out

    plain, got = run(False), run(True)
    repeat = AnomalyLikelihood().repeat_score
    assert all(plain[t] > 0.5 for t in (*at.values(), after))  # without it, every spike is news
    assert plain[at["A"]] > plain[at["B"]] and plain[at["C"]] > plain[at["A"]]
    assert got[at["A"]] == plain[at["A"]] and got[at["C"]] == plain[at["C"]] and got[at["D"]] == plain[at["D"]]
    assert got[at["B"]] == pytest.approx(repeat)
    assert got[spatial] == plain[spatial] == 1.0
    assert got[after] == plain[after] < 1.0
    changed = np.flatnonzero(got != plain)
    assert changed.tolist() == [at["B"]]  # nothing else moves
