"""Per-device resampling: right-closed buckets, watermark closing, grace, late readings, gaps, idle flush."""

from __future__ import annotations

import random

import msgspec
import pytest

from pipeline.windowing import DeviceWindow, Step, WindowConfig, add_reading, bucket_of, flush_idle

STEP = 1000
T0 = 1_795_341_600_000  # on the grid
CFG = WindowConfig(step_ms=STEP, grace_ms=0, max_gap_steps=3, idle_flush_ms=2000)


def v(x: float) -> tuple[float, float]:
    return (x, -2.0 * x)


def test_bucket_of_is_right_closed():
    assert bucket_of(T0, STEP) == T0 // STEP
    assert bucket_of(T0 + 1, STEP) == T0 // STEP + 1
    assert bucket_of(T0 + STEP - 1, STEP) == T0 // STEP + 1
    assert bucket_of(T0 + STEP, STEP) == T0 // STEP + 1
    assert bucket_of(T0 - 1, STEP) == T0 // STEP


def test_grid_aligned_readings_close_their_bucket_immediately():
    w = DeviceWindow()
    for i in range(5):
        steps = add_reading(w, T0 + i * STEP, v(i), CFG, now_wall_ms=T0 + i * STEP)
        assert steps == [Step(T0 + i * STEP, v(i), observed=True, n_readings=1, reset=False)]
        assert w.open == {}
        assert w.last_closed == T0 // STEP + i
    assert w.last_values == v(4)
    assert w.watermark == T0 + 4 * STEP


def test_mid_bucket_reading_waits_for_the_watermark():
    w = DeviceWindow()
    assert add_reading(w, T0 + 400, v(1), CFG, 0) == []
    assert add_reading(w, T0 + 999, v(3), CFG, 0) == []  # same bucket, still open
    assert list(w.open) == [T0 // STEP + 1]
    # a reading in the next bucket moves the watermark past the first bucket's end
    steps = add_reading(w, T0 + 1500, v(10), CFG, 0)
    assert steps == [Step(T0 + STEP, v(2), observed=True, n_readings=2)]
    assert list(w.open) == [T0 // STEP + 2]


def test_mean_aggregation_of_several_readings_in_one_bucket():
    w = DeviceWindow()
    readings = [(T0 + 100, (1.0, 10.0)), (T0 + 350, (2.0, 20.0)), (T0 + 700, (6.0, -30.0)), (T0 + 1000, (3.0, 4.0))]
    out: list[Step] = []
    for ts, vals in readings:
        steps = add_reading(w, ts, vals, CFG, 0)
        assert steps is not None
        out += steps
    assert len(out) == 1
    assert out[0].ts_ms == T0 + STEP
    assert out[0].n_readings == 4
    assert out[0].values == pytest.approx((3.0, 1.0))


def test_reading_exactly_on_boundary_belongs_to_the_bucket_ending_there():
    w = DeviceWindow()
    assert add_reading(w, T0 + 1, (1.0, 1.0), CFG, 0) == []
    steps = add_reading(w, T0 + STEP, (3.0, 3.0), CFG, 0)  # on the boundary: same bucket, closes it
    assert steps == [Step(T0 + STEP, (2.0, 2.0), True, 2)]
    # a reading 1 ms after the boundary opens the next bucket
    assert add_reading(w, T0 + STEP + 1, (5.0, 5.0), CFG, 0) == []
    assert list(w.open) == [T0 // STEP + 2]


def test_watermark_closes_several_buckets_at_once_in_order():
    w = DeviceWindow()
    cfg = WindowConfig(step_ms=STEP, grace_ms=1500, max_gap_steps=3)
    assert add_reading(w, T0 + 500, v(1), cfg, 0) == []
    assert add_reading(w, T0 + 1500, v(2), cfg, 0) == []
    assert add_reading(w, T0 + 2400, v(3), cfg, 0) == []  # watermark T0+2400 < T0+1000+1500
    assert add_reading(w, T0 + 2450, v(5), cfg, 0) == []
    assert len(w.open) == 3
    steps = add_reading(w, T0 + 4500, v(9), cfg, 0)  # watermark T0+4500: closes buckets ending 1000..3000
    assert steps is not None
    assert [s.ts_ms for s in steps] == [T0 + 1000, T0 + 2000, T0 + 3000]
    assert [s.values for s in steps] == [v(1), v(2), v(4)]
    assert [s.n_readings for s in steps] == [1, 1, 2]
    assert list(w.open) == [T0 // STEP + 5]


def test_out_of_order_within_grace_is_merged():
    cfg = WindowConfig(step_ms=STEP, grace_ms=2000, max_gap_steps=3)
    w = DeviceWindow()
    assert add_reading(w, T0 + 800, (1.0, 1.0), cfg, 0) == []
    assert add_reading(w, T0 + 1800, (9.0, 9.0), cfg, 0) == []
    assert add_reading(w, T0 + 200, (3.0, 5.0), cfg, 0) == []  # out of order, its bucket still open
    assert w.watermark == T0 + 1800  # an older reading does not move the watermark back
    steps = add_reading(w, T0 + 3000, (0.0, 0.0), cfg, 0)  # watermark reaches T0 + 1000 + grace
    assert steps == [Step(T0 + STEP, (2.0, 3.0), True, 2)]


def test_out_of_order_with_zero_grace_still_merges_while_bucket_open():
    w = DeviceWindow()
    assert add_reading(w, T0 + 1700, (8.0, 8.0), CFG, 0) == []
    # the bucket ending T0+1000 never had a reading; an older reading for it arrives now: the watermark
    # already passed its end, so it closes at once (it was not closed before, so it is not late)
    steps = add_reading(w, T0 + 600, (4.0, 4.0), CFG, 0)
    assert steps == [Step(T0 + STEP, (4.0, 4.0), True, 1)]
    assert list(w.open) == [T0 // STEP + 2]


def test_late_reading_returns_none_and_changes_nothing():
    w = DeviceWindow()
    add_reading(w, T0, v(1), CFG, now_wall_ms=5)
    add_reading(w, T0 + STEP, v(2), CFG, now_wall_ms=6)
    before = msgspec.msgpack.encode(w)
    assert add_reading(w, T0 + STEP, v(99), CFG, now_wall_ms=7) is None  # its bucket is closed
    assert add_reading(w, T0 + 1, v(99), CFG, now_wall_ms=8) is None
    assert add_reading(w, T0 - 5 * STEP, v(99), CFG, now_wall_ms=9) is None
    assert msgspec.msgpack.encode(w) == before  # neither values, watermark nor wall clock moved


def test_late_after_grace_expired():
    cfg = WindowConfig(step_ms=STEP, grace_ms=500, max_gap_steps=3)
    w = DeviceWindow()
    assert add_reading(w, T0 + 900, v(1), cfg, 0) == []
    steps = add_reading(w, T0 + 1600, v(2), cfg, 0)  # watermark T0+1600 >= T0+1000+500
    assert steps is not None and [s.ts_ms for s in steps] == [T0 + STEP]
    assert add_reading(w, T0 + 950, v(3), cfg, 0) is None


def test_short_gap_is_forward_filled_with_unobserved_steps():
    w = DeviceWindow()
    add_reading(w, T0, v(1), CFG, 0)
    steps = add_reading(w, T0 + 4 * STEP, v(5), CFG, 0)  # 3 missing steps == max_gap_steps
    assert steps == [
        Step(T0 + 1 * STEP, v(1), observed=False, n_readings=0),
        Step(T0 + 2 * STEP, v(1), observed=False, n_readings=0),
        Step(T0 + 3 * STEP, v(1), observed=False, n_readings=0),
        Step(T0 + 4 * STEP, v(5), observed=True, n_readings=1, reset=False),
    ]


def test_one_step_gap():
    w = DeviceWindow()
    add_reading(w, T0, v(1), CFG, 0)
    steps = add_reading(w, T0 + 2 * STEP, v(3), CFG, 0)
    assert steps == [Step(T0 + STEP, v(1), False, 0), Step(T0 + 2 * STEP, v(3), True, 1)]


def test_gap_fill_uses_the_mean_of_the_last_bucket():
    w = DeviceWindow()
    add_reading(w, T0 - 500, (2.0, 2.0), CFG, 0)
    add_reading(w, T0, (4.0, 0.0), CFG, 0)
    steps = add_reading(w, T0 + 2 * STEP, (1.0, 1.0), CFG, 0)
    assert steps is not None
    assert steps[0] == Step(T0 + STEP, (3.0, 1.0), False, 0)


def test_long_gap_resets_the_next_real_step():
    w = DeviceWindow()
    add_reading(w, T0, v(1), CFG, 0)
    steps = add_reading(w, T0 + 5 * STEP, v(5), CFG, 0)  # 4 missing steps > max_gap_steps
    assert steps == [Step(T0 + 5 * STEP, v(5), observed=True, n_readings=1, reset=True)]
    # the step after that is normal again
    assert add_reading(w, T0 + 6 * STEP, v(6), CFG, 0) == [Step(T0 + 6 * STEP, v(6), True, 1, False)]


def test_first_step_of_a_device_is_not_a_reset():
    w = DeviceWindow()
    assert add_reading(w, T0, v(1), CFG, 0) == [Step(T0, v(1), True, 1, False)]


def test_idle_flush_by_wall_clock():
    w = DeviceWindow()
    assert add_reading(w, T0 + 300, v(1), CFG, now_wall_ms=10_000) == []
    assert add_reading(w, T0 + 600, v(3), CFG, now_wall_ms=10_500) == []
    assert flush_idle(w, CFG, now_wall_ms=10_500 + CFG.idle_flush_ms - 1) == []  # not idle long enough
    assert w.open
    assert flush_idle(w, CFG, now_wall_ms=10_500 + CFG.idle_flush_ms) == [Step(T0 + STEP, v(2), True, 2)]
    assert w.open == {}
    assert flush_idle(w, CFG, now_wall_ms=99_999) == []  # nothing left to close
    # the flushed bucket is closed: a straggler for it is late
    assert add_reading(w, T0 + 900, v(9), CFG, now_wall_ms=20_000) is None
    # and the next bucket carries on normally
    assert add_reading(w, T0 + 2 * STEP, v(4), CFG, now_wall_ms=20_001) == [Step(T0 + 2 * STEP, v(4), True, 1)]


def test_idle_flush_fills_gaps_too():
    w = DeviceWindow()
    add_reading(w, T0, v(1), CFG, now_wall_ms=0)
    add_reading(w, T0 + 2 * STEP + 10, v(7), CFG, now_wall_ms=1)
    steps = flush_idle(w, CFG, now_wall_ms=1 + CFG.idle_flush_ms)
    assert steps == [
        Step(T0 + 1 * STEP, v(1), False, 0),
        Step(T0 + 2 * STEP, v(1), False, 0),
        Step(T0 + 3 * STEP, v(7), True, 1),
    ]


def _feed(w: DeviceWindow, readings: list[tuple[int, tuple[float, float]]], cfg: WindowConfig) -> list:
    out: list = []
    for i, (ts, vals) in enumerate(readings):
        steps = add_reading(w, ts, vals, cfg, now_wall_ms=i * 100)
        out.append(steps)
        if i % 7 == 6:
            out.append(flush_idle(w, cfg, now_wall_ms=i * 100 + cfg.idle_flush_ms))
    return out


@pytest.mark.parametrize("grace_ms", [0, 1500])
def test_msgpack_round_trip_mid_stream_continues_identically(grace_ms):
    cfg = WindowConfig(step_ms=STEP, grace_ms=grace_ms, max_gap_steps=2, idle_flush_ms=2000)
    rng = random.Random(7)
    readings = []
    ts = T0
    for _ in range(80):
        ts += rng.choice([137, 250, 500, 999, 1000, 1000, 2000, 3500, 6000, -700])
        readings.append((ts, (round(rng.uniform(-5, 5), 3), float(rng.randint(0, 9)))))

    reference = DeviceWindow()
    expected = _feed(reference, readings, cfg)

    open_at_cut = 0
    for cut in (1, 13, 40, 57, 79):
        w = DeviceWindow()
        got = _feed(w, readings[:cut], cfg)
        # mid-stream: the window holds open buckets with partial sums, a watermark, last values
        open_at_cut += bool(w.open)
        blob = msgspec.msgpack.encode(w)
        restored = msgspec.msgpack.decode(blob, type=DeviceWindow)
        assert restored == w
        assert msgspec.msgpack.encode(restored) == blob
        rest = _feed_from(restored, readings, cut, cfg)
        assert got + rest == expected
        assert restored == reference
    assert open_at_cut >= 2  # the interesting case: state with open buckets was carried over


def _feed_from(w: DeviceWindow, readings: list, start: int, cfg: WindowConfig) -> list:
    out: list = []
    for i in range(start, len(readings)):
        ts, vals = readings[i]
        out.append(add_reading(w, ts, vals, cfg, now_wall_ms=i * 100))
        if i % 7 == 6:
            out.append(flush_idle(w, cfg, now_wall_ms=i * 100 + cfg.idle_flush_ms))
    return out


def test_round_trip_preserves_open_bucket_partial_sums():
    w = DeviceWindow()
    add_reading(w, T0, (1.0, 1.0), CFG, 0)
    add_reading(w, T0 + 200, (2.0, 4.0), CFG, 0)
    add_reading(w, T0 + 700, (4.0, 8.0), CFG, 3)
    w2 = msgspec.msgpack.decode(msgspec.msgpack.encode(w), type=DeviceWindow)
    assert w2.open == {T0 // STEP + 1: ([6.0, 12.0], 2)}
    assert w2.last_closed == T0 // STEP and w2.last_values == (1.0, 1.0)
    assert w2.watermark == T0 + 700 and w2.last_seen_wall_ms == 3
    assert add_reading(w2, T0 + STEP, (0.0, 0.0), CFG, 4) == [Step(T0 + STEP, (2.0, 4.0), True, 3)]


def test_fresh_window_round_trip():
    w = msgspec.msgpack.decode(msgspec.msgpack.encode(DeviceWindow()), type=DeviceWindow)
    assert w == DeviceWindow()
    assert add_reading(w, T0, v(1), CFG, 0) == [Step(T0, v(1), True, 1)]
