"""A deterministic, labelled simulator of an IoT sensor fleet, and a thin Kafka shell around it.

The generation core (:class:`FleetSimulator`, :func:`malformed`) is pure: no I/O, no clock, no global
random state; the same arguments and seed give bit-identical output however the steps are requested
(one by one with :meth:`FleetSimulator.step`, or in bulk with :meth:`FleetSimulator.series`).

Signal model, per device ``d`` and step ``t`` (all devices are generated at once with numpy):

* ``daily``: a slow cycle ``sin(2*pi*t/daily_period_steps + phase_d)``;
* ``load``: the machine's duty, a faster per-device cycle (40-160 steps) plus a slowly wandering AR(1)
  component and a little of the daily cycle, clipped to ``[0.02, 1]``;
* ``heat``: a first-order low-pass of the *previous* step's load (thermal inertia), so ``current``
  (proportional to load) drives ``temp`` with a lag of several steps;
* each sensor is ``base + a*daily + b*load + c*load**2 + g*heat`` with per-device coefficients, plus
  AR(1) measurement noise of marginal std ``noise_std[d, s]``, rounded to 4 decimals.

Anomalies are *sensor faults* applied on top of the clean signal of one sensor of one device, never
overlapping another anomaly of the same device (and at least ``MIN_GAP_STEPS`` apart):

============  ========  ==========================================================================
kind          steps     effect (``sigma`` = that sensor's noise std)
============  ========  ==========================================================================
spike         1-3       ``+/- 8..12 sigma``
level_shift   30-150    ``+/- 5..8 sigma`` for the whole window
drift         60-240    a ramp reaching ``+/- 8..14 sigma`` at the last step
stuck         30-120    the value freezes at the last reading before the window
noise_burst   10-60     extra white noise of std ``4..8 sigma``
============  ========  ==========================================================================

Windows are half-open: an anomaly covers steps ``[start_step, end_step)`` and timestamps
``[start_ts_ms, end_ts_ms)``. Anomalies never begin before ``anomalies_after_step``.

The Kafka shell (:func:`run_simulation`) turns steps into messages in the wire format of
:mod:`pipeline.schema`, interleaving optional malformed and late messages, and paces to the wall clock
when asked to.
"""

from __future__ import annotations

import functools
import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import msgspec
import numpy as np

from pipeline.schema import MAX_MESSAGE_BYTES, encode_envelope, encode_reading

__all__ = [
    "ANOMALY_KINDS",
    "DEFAULT_SENSORS",
    "MALFORMED_KINDS",
    "MIN_GAP_STEPS",
    "Anomaly",
    "FleetSimulator",
    "Producer",
    "SimSeries",
    "SimStats",
    "aligned_now_ms",
    "kinds_fitting",
    "make_producer",
    "malformed",
    "run_simulation",
    "upload_offset_ms",
]

DEFAULT_SENSORS: tuple[str, ...] = ("temp", "pressure", "vibration", "current")
ANOMALY_KINDS: tuple[str, ...] = ("spike", "level_shift", "drift", "stuck", "noise_burst")
MIN_GAP_STEPS = 30
"""Clean steps kept between two anomalies of one device (so a detector can settle in between)."""

# kind -> (min duration, max duration, min |magnitude| in sigma, max |magnitude| in sigma)
_KIND_SPECS: dict[str, tuple[int, int, float, float]] = {
    "spike": (1, 3, 8.0, 12.0),
    "level_shift": (30, 150, 5.0, 8.0),
    "drift": (60, 240, 8.0, 14.0),
    "stuck": (30, 120, 0.0, 0.0),
    "noise_burst": (10, 60, 4.0, 8.0),
}
_KIND_CODE = {k: i for i, k in enumerate(ANOMALY_KINDS)}


def kinds_fitting(room_steps: int) -> tuple[str, ...]:
    """Anomaly kinds whose longest duration fits in ``room_steps`` (short demos and tests)."""
    return tuple(k for k in ANOMALY_KINDS if _KIND_SPECS[k][1] <= room_steps)


_SIGNED_KINDS = frozenset({"spike", "level_shift", "drift"})
_BLOCK_STEPS = 1000  # rate-based anomalies are drawn per block of this many steps
_ROUND_DECIMALS = 4

# Per known sensor: ((lo, hi) ranges of the coefficients of [1, daily, load, load**2, heat]),
# base noise std, AR(1) coefficient of the noise. Units: degC, bar, mm/s, A.
_SensorSpec = tuple[tuple[tuple[float, float], ...], float, float]
_SENSOR_SPECS: dict[str, _SensorSpec] = {
    "temp": (((35.0, 55.0), (1.5, 4.0), (0.0, 0.0), (0.0, 0.0), (8.0, 16.0)), 0.15, 0.7),
    "pressure": (((2.0, 4.0), (0.02, 0.1), (0.6, 1.4), (0.0, 0.0), (0.0, 0.0)), 0.03, 0.5),
    "vibration": (((0.4, 1.0), (0.0, 0.05), (0.1, 0.4), (0.8, 2.0), (0.0, 0.0)), 0.05, 0.4),
    "current": (((3.0, 6.0), (0.0, 0.2), (10.0, 20.0), (0.0, 0.0), (0.0, 0.0)), 0.2, 0.3),
}


@dataclass(frozen=True, slots=True)
class Anomaly:
    """One injected anomaly (ground truth). Windows are half-open: ``[start, end)``.

    ``magnitude`` is in units of the sensor's noise std (signed for spike/level_shift/drift, the extra
    noise std for noise_burst, 0 for stuck).
    """

    device_id: str
    kind: str
    sensor: str
    start_step: int
    end_step: int
    start_ts_ms: int
    end_ts_ms: int
    magnitude: float = 0.0

    def covers_ts(self, ts_ms: int) -> bool:
        return self.start_ts_ms <= ts_ms < self.end_ts_ms


class SimSeries(NamedTuple):
    """``n`` consecutive steps of the whole fleet."""

    ts_ms: np.ndarray  # (n,) int64
    values: np.ndarray  # (n, n_devices, n_sensors) float64
    anomaly_mask: np.ndarray  # (n, n_devices, n_sensors) bool, True where an anomaly alters the value


class _Plan:
    """Scheduled anomalies as a structure of arrays (not yet finished ones only)."""

    __slots__ = ("dev", "end", "frozen", "kind", "mag", "sensor", "start")

    def __init__(self) -> None:
        self.dev = np.zeros(0, np.int64)
        self.sensor = np.zeros(0, np.int64)
        self.kind = np.zeros(0, np.int64)
        self.start = np.zeros(0, np.int64)
        self.end = np.zeros(0, np.int64)
        self.mag = np.zeros(0, np.float64)
        self.frozen = np.zeros(0, np.float64)

    def extend(
        self,
        dev: np.ndarray,
        sensor: np.ndarray,
        kind: np.ndarray,
        start: np.ndarray,
        end: np.ndarray,
        mag: np.ndarray,
    ) -> None:
        self.dev = np.concatenate([self.dev, dev.astype(np.int64)])
        self.sensor = np.concatenate([self.sensor, sensor.astype(np.int64)])
        self.kind = np.concatenate([self.kind, kind.astype(np.int64)])
        self.start = np.concatenate([self.start, start.astype(np.int64)])
        self.end = np.concatenate([self.end, end.astype(np.int64)])
        self.mag = np.concatenate([self.mag, mag.astype(np.float64)])
        self.frozen = np.concatenate([self.frozen, np.full(len(dev), np.nan)])

    def keep(self, sel: np.ndarray) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name)[sel])


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _hash_normal(seed: int, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Standard normals that are a pure function of ``(seed, a, b, c)`` (counter-based, vectorised).

    Used for noise bursts, so that they neither consume the signal's random stream (the clean
    counterfactual stays identical) nor depend on how steps are chunked.
    """
    with np.errstate(over="ignore"):
        key = np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0xD1B54A32D192ED03)
        x = _splitmix64(a.astype(np.uint64) ^ key)
        x = _splitmix64(x ^ b.astype(np.uint64))
        x = _splitmix64(x ^ c.astype(np.uint64))
        y = _splitmix64(x)
    u1 = ((x >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    u2 = (y >> np.uint64(11)).astype(np.float64) / 2.0**53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


_RowsBuilder = Callable[[list[str], int, list[list[float]]], list[tuple[str, int, dict[str, float]]]]


@functools.lru_cache(maxsize=64)
def _rows_builder(sensors: tuple[str, ...]) -> _RowsBuilder:
    """A function ``(ids, ts, columns) -> [(id, ts, {sensor: value})]`` with the dict as a literal.

    A generated dict display is ~40% faster than ``dict(zip(names, row))`` per device; the sensor
    names enter the generated source only through ``repr``, as string literals.
    """
    cols = [f"c{i}" for i in range(len(sensors))]
    items = ", ".join(f"{name!r}: {c}" for name, c in zip(sensors, cols, strict=True))
    src = (
        f"def build(ids, ts, columns):\n"
        f"    return [(d, ts, {{{items}}}) for d, {', '.join(cols)}, in zip(ids, *columns, strict=True)]\n"
    )
    namespace: dict[str, Any] = {}
    exec(compile(src, f"<rows builder {len(sensors)} sensors>", "exec"), namespace)
    builder: _RowsBuilder = namespace["build"]
    return builder


def aligned_now_ms(step_ms: int, now_s: float | None = None) -> int:
    """The wall clock rounded *up* to the step grid: ``ceil(now / step) * step``."""
    now_ms = int((time.time() if now_s is None else now_s) * 1000)
    return -(-now_ms // step_ms) * step_ms


class FleetSimulator:
    """A fleet of ``n_devices`` devices with the same ``sensors``, stepped in lock-step.

    Anomalies come either from ``anomaly_rate`` (expected anomalies per device per 1000 steps, drawn
    lazily per block of 1000 steps, so the stream is unbounded; draws that would overlap another
    anomaly of the device are dropped, so the realised rate is a little lower: ~0.9 at 1.0) or, when
    ``anomaly_count`` is given, exactly that many spread at random over devices and over steps
    ``[anomalies_after_step, anomaly_horizon_steps)``; ``anomaly_kinds`` restricts the kinds drawn.
    ``anomaly_rate=0`` with no ``anomaly_count`` gives the clean signal, identical (bit for bit) to the
    signal underneath the anomalies of any other configuration with the same seed.

    ``start_ts_ms`` is the timestamp of step 0 (default: now, rounded up to the step grid).
    """

    def __init__(
        self,
        n_devices: int,
        *,
        sensors: Sequence[str] = DEFAULT_SENSORS,
        seed: int = 0,
        step_ms: int = 1000,
        start_ts_ms: int | None = None,
        anomaly_rate: float = 1.0,
        anomaly_count: int | None = None,
        anomaly_horizon_steps: int = 1000,
        anomalies_after_step: int = 60,
        anomaly_kinds: Sequence[str] = ANOMALY_KINDS,
        daily_period_steps: int = 720,
        device_prefix: str = "dev",
    ) -> None:
        if n_devices < 1:
            raise ValueError("n_devices must be >= 1")
        if not sensors or len(set(sensors)) != len(sensors):
            raise ValueError(f"sensors must be non-empty and distinct: {sensors!r}")
        if step_ms < 1 or daily_period_steps < 2:
            raise ValueError("step_ms must be >= 1 and daily_period_steps >= 2")
        if anomaly_rate < 0 or anomalies_after_step < 0:
            raise ValueError("anomaly_rate and anomalies_after_step must be >= 0")
        unknown = [k for k in anomaly_kinds if k not in _KIND_CODE]
        if unknown or not anomaly_kinds:
            raise ValueError(f"unknown anomaly kinds {unknown}; choose from {ANOMALY_KINDS}")
        self.n_devices = n_devices
        self.sensors: tuple[str, ...] = tuple(sensors)
        self.seed = seed
        self.step_ms = step_ms
        self.anomaly_rate = 0.0 if anomaly_count is not None else float(anomaly_rate)
        self.anomalies_after_step = anomalies_after_step
        self.anomaly_kinds: tuple[str, ...] = tuple(anomaly_kinds)
        self.daily_period_steps = daily_period_steps
        width = max(4, len(str(n_devices - 1)))
        self.device_ids: list[str] = [f"{device_prefix}-{i:0{width}d}" for i in range(n_devices)]
        self._origin_ms = aligned_now_ms(step_ms) if start_ts_ms is None else int(start_ts_ms)
        self._t = 0  # index of the next step
        self._init_params()
        self._plan = _Plan()
        self._next_block = 0  # first rate-based block not drawn yet
        self._free_from = np.full(n_devices, anomalies_after_step, np.int64)  # earliest next start
        self._anomalies: list[Anomaly] = []
        if anomaly_count is not None:
            self._plan_count(anomaly_count, anomaly_horizon_steps)

    # ------------------------------------------------------------------ parameters and state

    def _init_params(self) -> None:
        D, S = self.n_devices, len(self.sensors)
        rng = np.random.default_rng([self.seed, 0])
        self._sig_rng = np.random.default_rng([self.seed, 1])
        day_phase = rng.uniform(0, 2 * np.pi, D)
        self._day_cs = np.stack([np.cos(day_phase), np.sin(day_phase)])  # (2, D)
        # Load cycles: each device picks one of a few periods, so sin(w*t + phase) is computed once per
        # period and step (sin(a+b) = sin a cos b + cos a sin b) instead of once per device and step.
        self._load_periods = np.linspace(40.0, 160.0, 16)
        self._load_period_idx = rng.integers(0, len(self._load_periods), D)
        load_phase = rng.uniform(0, 2 * np.pi, D)
        self._load_cs = np.stack([np.cos(load_phase), np.sin(load_phase)])  # (2, D)
        self._load_amp = rng.uniform(0.15, 0.3, D)
        self._load_day = rng.uniform(0.05, 0.15, D)
        self._load_slow_rho = 0.995
        self._heat_alpha = np.exp(-1.0 / rng.uniform(8, 30, D))
        # coefficients (D, S, 5) over features [1, daily, load, load**2, heat]
        coef = np.zeros((D, S, 5))
        sigma = np.zeros((D, S))
        rho = np.zeros(S)
        for s, name in enumerate(self.sensors):
            spec = _SENSOR_SPECS.get(name)
            if spec is None:  # a generic sensor: a random mix of the latent drivers
                base_hi = rng.uniform(5, 100)
                ranges = ((0.5 * base_hi, base_hi), (0.0, 0.05 * base_hi), (0.0, 0.2 * base_hi))
                spec = ((*ranges, (0.0, 0.05 * base_hi), (0.0, 0.1 * base_hi)), 0.01 * base_hi, 0.5)
            coef_ranges, base_sigma, rho[s] = spec
            for f, (lo, hi) in enumerate(coef_ranges):
                coef[:, s, f] = rng.uniform(lo, hi, D)
            sigma[:, s] = base_sigma * rng.uniform(0.7, 1.3, D)
        self._coef = np.ascontiguousarray(coef.transpose(2, 0, 1))  # (5, D, S)
        self.noise_std: np.ndarray = sigma
        """Marginal std of each device's sensor noise, shape (n_devices, n_sensors)."""
        self._rho = rho
        self._innov = np.sqrt(1 - rho**2) * sigma  # (D, S)
        # state
        self._noise = rng.standard_normal((D, S)) * sigma
        self._slow = rng.standard_normal(D)
        self._heat = np.full(D, 0.55)
        self._prev_load = np.full(D, 0.55)
        self._prev_clean = np.full((D, S), np.nan)  # clean values of step t-1

    # ------------------------------------------------------------------ anomaly planning

    def _draw_specs(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Kinds (codes), durations and signed magnitudes of ``n`` anomalies."""
        kinds = rng.choice(np.array([_KIND_CODE[k] for k in self.anomaly_kinds]), n)
        u_dur = rng.random(n)
        u_mag = rng.random(n)
        sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        dur = np.zeros(n, np.int64)
        mag = np.zeros(n)
        for kind, (dlo, dhi, mlo, mhi) in _KIND_SPECS.items():
            sel = kinds == _KIND_CODE[kind]
            dur[sel] = dlo + np.floor(u_dur[sel] * (dhi - dlo + 1)).astype(np.int64)
            mag[sel] = (mlo + u_mag[sel] * (mhi - mlo)) * (sign[sel] if kind in _SIGNED_KINDS else 1.0)
        return kinds, dur, mag

    def _plan_block(self, block: int) -> None:
        """Draw the rate-based anomalies starting in steps ``[block*B, (block+1)*B)``."""
        B = _BLOCK_STEPS
        lo = max(block * B, self.anomalies_after_step)
        hi = (block + 1) * B
        if self.anomaly_rate <= 0 or lo >= hi:
            return
        rng = np.random.default_rng([self.seed, 2, block])
        lam = self.anomaly_rate * (hi - lo) / 1000.0
        counts = rng.poisson(lam, self.n_devices)
        n = int(counts.sum())
        if n == 0:
            return
        dev = np.repeat(np.arange(self.n_devices), counts)
        start = rng.integers(lo, hi, n)
        sensor = rng.integers(0, len(self.sensors), n)
        kinds, dur, mag = self._draw_specs(rng, n)
        order = np.lexsort((start, dev))
        dev, start, sensor, kinds, dur, mag = (a[order] for a in (dev, start, sensor, kinds, dur, mag))
        end = start + dur
        # Conservative non-overlap: drop an anomaly if it starts before the running max of the ends
        # (plus the gap) of all earlier ones of its device, or before the device's last planned one.
        reach = end + MIN_GAP_STEPS
        big = np.int64(hi + 10 * B)
        acc = np.maximum.accumulate(reach + dev * big) - dev * big
        prev = np.empty(n, np.int64)
        prev[0] = -1
        prev[1:] = acc[:-1]
        first_of_dev = np.ones(n, bool)
        first_of_dev[1:] = dev[1:] != dev[:-1]
        prev[first_of_dev] = -1
        ok = (start >= prev) & (start >= self._free_from[dev])
        dev, start, sensor, kinds, end, mag = (a[ok] for a in (dev, start, sensor, kinds, end, mag))
        if len(dev):
            last = np.zeros(self.n_devices, np.int64)
            np.maximum.at(last, dev, end + MIN_GAP_STEPS)
            self._free_from = np.maximum(self._free_from, last)
            self._plan.extend(dev, sensor, kinds, start, end, mag)

    def _plan_count(self, count: int, horizon: int) -> None:
        """Exactly ``count`` anomalies in ``[anomalies_after_step, horizon)``, non-overlapping per device."""
        if count <= 0:
            return
        rng = np.random.default_rng([self.seed, 3])
        kinds, dur, mag = self._draw_specs(rng, count)
        taken: dict[int, list[tuple[int, int]]] = {}
        devs, starts, sensors = [], [], []
        for i in range(count):
            for _attempt in range(1000):
                d = int(rng.integers(self.n_devices))
                last_start = horizon - int(dur[i])
                if last_start < self.anomalies_after_step:
                    raise ValueError(f"anomaly_horizon_steps={horizon} too short for a {dur[i]}-step anomaly")
                st = int(rng.integers(self.anomalies_after_step, last_start + 1))
                en = st + int(dur[i])
                if all(en + MIN_GAP_STEPS <= a or st >= b + MIN_GAP_STEPS for a, b in taken.get(d, [])):
                    taken.setdefault(d, []).append((st, en))
                    devs.append(d)
                    starts.append(st)
                    sensors.append(int(rng.integers(len(self.sensors))))
                    break
            else:
                raise ValueError(f"cannot place {count} non-overlapping anomalies before step {horizon}")
        start_arr = np.array(starts, np.int64)
        self._plan.extend(np.array(devs), np.array(sensors), kinds, start_arr, start_arr + dur, mag)
        self._next_block = 1 << 62  # no rate-based blocks

    def inject(
        self, device: int | str, kind: str, sensor: str, start_step: int, duration: int, magnitude: float
    ) -> None:
        """Schedule one explicit anomaly (``magnitude`` in noise sigmas) at a step not yet generated.

        Planned random anomalies of that device overlapping it (with the gap) that have not begun are
        dropped; one already under way raises ValueError.
        """
        d = self.device_ids.index(device) if isinstance(device, str) else int(device)
        if kind not in _KIND_CODE or sensor not in self.sensors:
            raise ValueError(f"unknown kind {kind!r} or sensor {sensor!r}")
        if start_step < self._t or duration < 1 or not 0 <= d < self.n_devices:
            raise ValueError("start_step must not be in the past, duration >= 1, device in range")
        self._ensure_planned(start_step + duration + MIN_GAP_STEPS)
        end = start_step + duration
        p = self._plan
        clash = (p.dev == d) & (p.start < end + MIN_GAP_STEPS) & (p.end + MIN_GAP_STEPS > start_step)
        if np.any(clash & (p.start < self._t)):
            raise ValueError(f"device {d} has an anomaly under way overlapping step {start_step}")
        p.keep(~clash)
        self._plan.extend(
            np.array([d]),
            np.array([self.sensors.index(sensor)]),
            np.array([_KIND_CODE[kind]]),
            np.array([start_step]),
            np.array([end]),
            np.array([float(magnitude)]),
        )
        self._free_from[d] = max(int(self._free_from[d]), end + MIN_GAP_STEPS)

    def _ensure_planned(self, upto_step: int) -> None:
        while self._next_block * _BLOCK_STEPS < upto_step:
            self._plan_block(self._next_block)
            self._next_block += 1

    # ------------------------------------------------------------------ generation

    @property
    def steps_generated(self) -> int:
        return self._t

    @property
    def next_ts_ms(self) -> int:
        return self.ts_of(self._t)

    def ts_of(self, step: int) -> int:
        return self._origin_ms + step * self.step_ms

    def align_to(self, ts_ms: int) -> None:
        """Make the next step carry ``ts_ms`` (and the following ones ``ts_ms + k*step_ms``)."""
        self._origin_ms = int(ts_ms) - self._t * self.step_ms

    @property
    def anomalies(self) -> list[Anomaly]:
        """Ground truth: every anomaly that has begun within the steps generated so far, by start."""
        return list(self._anomalies)

    def _advance(self, n: int) -> SimSeries:
        D, S = self.n_devices, len(self.sensors)
        t0 = self._t
        t = np.arange(t0, t0 + n)
        z = self._sig_rng.standard_normal((n, D, S + 1), dtype=np.float32)  # measurement noise | load
        # latent drivers
        slow = np.empty((n, D))
        s_state, rho_l = self._slow, self._load_slow_rho
        c_l = math.sqrt(1 - rho_l**2)
        for i in range(n):
            s_state = rho_l * s_state + c_l * z[i, :, S]
            slow[i] = s_state
        self._slow = s_state
        w = 2 * np.pi * t[:, None] / self.daily_period_steps  # (n, 1)
        daily = np.sin(w) * self._day_cs[0] + np.cos(w) * self._day_cs[1]
        w = 2 * np.pi * t[:, None] / self._load_periods  # (n, n_periods)
        k = self._load_period_idx
        cyc = np.sin(w)[:, k] * self._load_cs[0] + np.cos(w)[:, k] * self._load_cs[1]
        load = np.clip(0.55 + self._load_amp * cyc + self._load_day * daily + 0.12 * slow, 0.02, 1.0)
        heat = np.empty((n, D))
        h, alpha, prev = self._heat, self._heat_alpha, self._prev_load
        for i in range(n):
            h = alpha * h + (1 - alpha) * prev
            heat[i] = h
            prev = load[i]
        self._heat, self._prev_load = h, prev
        # AR(1) measurement noise
        noise = np.empty((n, D, S))
        e, rho, innov = self._noise, self._rho, self._innov
        for i in range(n):
            e = rho * e + innov * z[i, :, :S]
            noise[i] = e
        self._noise = e
        c = self._coef
        clean = noise + c[0]
        clean += c[1] * daily[:, :, None]
        clean += c[2] * load[:, :, None]
        clean += c[3] * (load * load)[:, :, None]
        clean += c[4] * heat[:, :, None]
        clean = np.round(clean, _ROUND_DECIMALS)
        values = clean.copy()
        mask = np.zeros((n, D, S), bool)
        self._apply_anomalies(t0, n, clean, values, mask)
        self._prev_clean = clean[-1]
        self._t = t0 + n
        ts = self._origin_ms + t.astype(np.int64) * self.step_ms
        return SimSeries(ts, values, mask)

    def _apply_anomalies(self, t0: int, n: int, clean: np.ndarray, values: np.ndarray, mask: np.ndarray) -> None:
        t1 = t0 + n
        self._ensure_planned(t1)
        p = self._plan
        if len(p.dev) == 0:
            return
        # record anomalies beginning in this chunk, and the value a `stuck` one freezes at
        starting = np.flatnonzero((p.start >= t0) & (p.start < t1))
        if len(starting):
            ext = np.concatenate([self._prev_clean[None], clean])  # ext[k] = clean of step t0-1+k
            starting = starting[np.argsort(p.start[starting], kind="stable")]
            for j in starting.tolist():
                st = int(p.start[j])
                k = st - t0 if st > 0 else 1  # the last step before the window (step 0: itself)
                p.frozen[j] = ext[k, p.dev[j], p.sensor[j]]
                self._anomalies.append(
                    Anomaly(
                        device_id=self.device_ids[int(p.dev[j])],
                        kind=ANOMALY_KINDS[int(p.kind[j])],
                        sensor=self.sensors[int(p.sensor[j])],
                        start_step=st,
                        end_step=int(p.end[j]),
                        start_ts_ms=self.ts_of(st),
                        end_ts_ms=self.ts_of(int(p.end[j])),
                        magnitude=round(float(p.mag[j]), 3),
                    )
                )
        act = np.flatnonzero((p.start < t1) & (p.end > t0))
        if len(act):
            lo = np.maximum(p.start[act], t0)
            hi = np.minimum(p.end[act], t1)
            cnt = hi - lo
            idx = np.repeat(act, cnt)
            offs = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
            step = np.repeat(lo, cnt) + offs  # absolute step of each affected cell
            ti, dv, sn, kd = step - t0, p.dev[idx], p.sensor[idx], p.kind[idx]
            sig = self.noise_std[dv, sn]
            mag = p.mag[idx]
            delta = np.zeros(len(idx))
            sel = (kd == _KIND_CODE["spike"]) | (kd == _KIND_CODE["level_shift"])
            delta[sel] = mag[sel] * sig[sel]
            sel = kd == _KIND_CODE["drift"]
            frac = (step[sel] - p.start[idx][sel] + 1) / (p.end[idx][sel] - p.start[idx][sel])
            delta[sel] = mag[sel] * sig[sel] * frac
            sel = kd == _KIND_CODE["noise_burst"]
            zb = _hash_normal(self.seed, step[sel], dv[sel], sn[sel])
            delta[sel] = mag[sel] * sig[sel] * zb
            new = np.round(clean[ti, dv, sn] + delta, _ROUND_DECIMALS)
            sel = kd == _KIND_CODE["stuck"]
            new[sel] = p.frozen[idx][sel]
            values[ti, dv, sn] = new
            mask[ti, dv, sn] = True
        p.keep(p.end > t1)  # forget finished ones

    def scale_noise(self, factor: float) -> None:
        """Fleet-wide drift from the next step on: every sensor's noise std times ``factor`` (unlabelled;
        this is a change of regime, not an anomaly)."""
        self.noise_std = self.noise_std * factor
        self._innov = self._innov * factor

    def step_arrays(self) -> tuple[int, np.ndarray, np.ndarray]:
        """The next step as arrays: ``(ts_ms, values (n_devices, n_sensors), anomaly_mask)``."""
        s = self._advance(1)
        return int(s.ts_ms[0]), s.values[0], s.anomaly_mask[0]

    def step(self) -> list[tuple[str, int, dict[str, float]]]:
        """The next step of every device: ``[(device_id, ts_ms, {sensor: value}), ...]``."""
        ts, values, _ = self.step_arrays()
        # Building 10^5 small dicts is dominated by the cyclic GC's passes; they hold no cycles.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return _rows_builder(self.sensors)(self.device_ids, ts, values.T.tolist())
        finally:
            if gc_was_enabled:
                gc.enable()

    def series(self, n_steps: int, *, chunk_steps: int = 4096) -> SimSeries:
        """The next ``n_steps`` steps of the fleet (for training and evaluation data).

        Advances the simulator exactly like ``n_steps`` calls of :meth:`step` would.
        """
        if n_steps < 0:
            raise ValueError("n_steps must be >= 0")
        D, S = self.n_devices, len(self.sensors)
        ts = np.empty(n_steps, np.int64)
        values = np.empty((n_steps, D, S))
        mask = np.empty((n_steps, D, S), bool)
        done = 0
        while done < n_steps:
            k = min(max(1, chunk_steps), n_steps - done)
            part = self._advance(k)
            ts[done : done + k], values[done : done + k], mask[done : done + k] = part
            done += k
        return SimSeries(ts, values, mask)


# ---------------------------------------------------------------------- malformed messages

MALFORMED_KINDS: tuple[str, ...] = (
    "random_bytes",
    "truncated_json",
    "wrong_type",
    "nan",
    "infinity",
    "huge_number",
    "huge_string",
    "missing_fields",
    "unknown_sensors",
    "key_mismatch",
    "absurd_timestamp",
    "oversized",
    "empty_object",
    "bad_device_id",
)


def _values(rng: np.random.Generator, sensors: Sequence[str]) -> dict[str, Any]:
    return {s: round(float(rng.normal(10, 3)), 3) for s in sensors}


def malformed(
    rng: np.random.Generator,
    kind: str | None = None,
    *,
    sensors: Sequence[str] = DEFAULT_SENSORS,
    device_id: str = "dev-0000",
    now_ms: int | None = None,
) -> tuple[bytes | None, bytes, str]:
    """One message ``(key, value, kind)`` that :func:`pipeline.schema.validate` must reject.

    ``kind`` is one of :data:`MALFORMED_KINDS` (random when None). ``sensors`` is the sensor set the
    pipeline expects and ``now_ms`` its clock (default: the wall clock): apart from the fault named by
    ``kind``, the message is a valid reading of ``device_id`` at ``now_ms``. ``oversized`` values are
    just over :data:`pipeline.schema.MAX_MESSAGE_BYTES` (a producer needs ``max_request_size`` above
    that to send them): half such a reading padded with a run of one byte, half random bytes.
    """
    if kind is None:
        kind = MALFORMED_KINDS[int(rng.integers(len(MALFORMED_KINDS)))]
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    key: bytes | None = device_id.encode()
    msg: dict[str, Any] = {"device_id": device_id, "ts": now_ms, "values": _values(rng, sensors)}
    first = sensors[0]
    variant = int(rng.integers(1 << 30))
    raw: bytes
    if kind == "random_bytes":
        # 0xff is never valid UTF-8, so this can never decode as JSON
        raw = b"\xff" + rng.bytes(int(rng.integers(0, 256)))
        key = None if variant % 2 else key
    elif kind == "truncated_json":
        full = msgspec.json.encode(msg)
        raw = full[: int(rng.integers(1, len(full)))]  # any strict prefix of an object is incomplete
    elif kind == "wrong_type":
        choice = variant % 4
        if choice == 0:
            msg["values"][first] = str(msg["values"][first])
        elif choice == 1:
            msg["ts"] = [now_ms]
        elif choice == 2:
            msg["device_id"] = 12345
        else:
            msg["values"] = [msg["values"][s] for s in sensors]
        raw = msgspec.json.encode(msg)
    elif kind in ("nan", "infinity"):
        literal = b"NaN" if kind == "nan" else (b"Infinity", b"-Infinity", b"1e999")[variant % 3]
        msg["values"][first] = 0.0
        raw = msgspec.json.encode(msg).replace(
            msgspec.json.encode(first) + b":0.0", msgspec.json.encode(first) + b":" + literal, 1
        )
    elif kind == "huge_number":
        msg["values"][first] = (1e300, -1e300, 1e13)[variant % 3]
        raw = msgspec.json.encode(msg)
    elif kind == "huge_string":
        big = "x" * int(rng.integers(10_000, 200_000))
        if variant % 2:
            msg["device_id"] = big
            key = big.encode()
        else:
            msg["values"][first] = big
        raw = msgspec.json.encode(msg)
    elif kind == "missing_fields":
        del msg[("ts", "values", "device_id")[variant % 3]]
        raw = msgspec.json.encode(msg)
    elif kind == "unknown_sensors":
        extra = next(f"humidity{i}" for i in range(len(sensors) + 1) if f"humidity{i}" not in sensors)
        choice = variant % 3 if len(sensors) > 1 else variant % 2
        if choice == 0:
            msg["values"][extra] = 1.0
        elif choice == 1:
            msg["values"][extra] = msg["values"].pop(first)
        else:
            del msg["values"][first]
        raw = msgspec.json.encode(msg)
    elif kind == "key_mismatch":
        key = (device_id + "-other").encode() if variant % 2 else device_id.upper().encode() + b"x"
        raw = msgspec.json.encode(msg)
    elif kind == "absurd_timestamp":
        choice = variant % 4
        if choice == 0:
            msg["ts"] = now_ms // 1000  # epoch seconds read as ms: January 1970
        elif choice == 1:
            msg["ts"] = now_ms + 10 * 365 * 86_400_000  # ten years ahead
        elif choice == 2:
            msg["ts"] = "1970-01-01T00:00:00Z"
        else:
            msg["ts"] = "not-a-timestamp"
        raw = msgspec.json.encode(msg)
    elif kind == "oversized":
        over = 1 + int(rng.integers(0, 4096))
        if variant % 2:  # a binary blob (a misrouted file, encrypted bytes): nothing in it compresses
            raw = b"\xff" + rng.bytes(MAX_MESSAGE_BYTES + over - 1)
        else:  # a reading padded past the limit with a run of one byte
            body = msgspec.json.encode(msg)
            raw = body[:-1] + b',"pad":"' + b"a" * (MAX_MESSAGE_BYTES - len(body) + over) + b'"}'
    elif kind == "empty_object":
        raw = b"{}"
    elif kind == "bad_device_id":
        bad = ("", "dev\x00null", "tab\tbed", "x" * 200)[variant % 4]
        msg["device_id"] = bad
        key = bad.encode()
        raw = msgspec.json.encode(msg)
    else:
        raise ValueError(f"unknown malformed kind {kind!r}; choose from {MALFORMED_KINDS}")
    return key, raw, kind


# ---------------------------------------------------------------------- Kafka shell


class Producer(Protocol):
    """What the shell needs of a ``kafka.KafkaProducer`` (bytes keys and values)."""

    def send(self, topic: str, value: bytes | None = ..., key: bytes | None = ...) -> Any: ...

    def flush(self, timeout: float | None = ...) -> None: ...


def make_producer(bootstrap: str, *, security: Any = None, **overrides: Any) -> Any:
    """A ``kafka.KafkaProducer`` tuned for the simulator (batched, bytes in, 2 MiB max request).

    ``security``: a :class:`connectors.kafka_security.KafkaSecurity` (default: the one registered for
    ``bootstrap``, else PLAINTEXT)."""
    from kafka import KafkaProducer

    from connectors.kafka_security import security_for

    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap.split(","),
        "acks": 1,
        "linger_ms": 20,
        "batch_size": 256 * 1024,
        "max_request_size": 2 * MAX_MESSAGE_BYTES,
        "retries": 3,
        **security_for(bootstrap, security).kafka_python(),
    }
    config.update(overrides)
    return KafkaProducer(**config)


@dataclass
class SimStats:
    """What :func:`run_simulation` produced.

    ``readings_sent`` counts valid, on-time readings (each reading of an envelope counts);
    ``messages_sent`` counts every Kafka message sent (valid, late and malformed); late and malformed
    messages are counted only in ``late_sent`` / ``malformed_sent`` besides. ``send_errors`` counts
    messages the producer refused (e.g. an oversized one over its ``max_request_size``), by kind.
    """

    readings_sent: int = 0
    messages_sent: int = 0
    malformed_sent: int = 0
    late_sent: int = 0
    anomalies: list[Anomaly] = field(default_factory=list)
    first_ts_ms: int | None = None
    last_ts_ms: int | None = None
    malformed_by_kind: dict[str, int] = field(default_factory=dict)
    send_errors: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    first_step: int = 0
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy (anomalies as dicts)."""
        out: dict[str, Any] = {k: v for k, v in vars(self).items() if k != "anomalies"}
        out["anomalies"] = [{f: getattr(a, f) for f in Anomaly.__dataclass_fields__} for a in self.anomalies]
        return out


def upload_offset_ms(index: int, n_devices: int, slices: int, step_ms: int) -> int:
    """When device ``index`` uploads a step's reading, after the step's grid point, with ``slices``
    staggered upload slots per step (``run_simulation(stagger_slices=...)``); 0 when not staggered."""
    return index * slices // n_devices * step_ms // slices


def run_simulation(
    producer: Producer,
    topic: str,
    sim: FleetSimulator,
    *,
    steps: int,
    rate_steps_per_s: float | None = None,
    malformed_every: int = 0,
    malformed_kinds: Sequence[str] = MALFORMED_KINDS,
    late_every: int = 0,
    late_steps: int = 5,
    envelope_steps: int = 1,
    stagger_slices: int = 1,
    duration_s: float | None = None,
    end_at_now: bool = False,
    progress: Callable[[int, SimStats], None] | None = None,
    seed: int | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    wall_clock: Callable[[], float] = time.time,
) -> SimStats:
    """Produce ``steps`` steps of ``sim`` to ``topic``, keyed by device id; flush; return the stats.

    * ``rate_steps_per_s``: None sends as fast as possible; otherwise steps are paced to the wall clock
      and the simulator is first aligned so the next step's timestamp is ``ceil(now/step)*step``
      (with ``rate_steps_per_s == 1000/step_ms`` timestamps then follow the wall clock).
    * ``envelope_steps = k > 1``: every ``k`` steps, one envelope per device carries its ``k`` readings
      (a trailing partial group is sent at the end).
    * ``stagger_slices = k > 1`` (paced runs): the devices upload in ``k`` equal slices spread over the
      step, slice ``j`` at ``j/k`` of a step after the grid point (:func:`upload_offset_ms`), as a fleet
      with staggered upload slots does; the timestamps stay on the grid. ``1``: every device at once.
    * ``malformed_every = m > 0``: after every ``m`` valid messages, one :func:`malformed` message of a
      random kind among ``malformed_kinds`` (for a random device, timestamped at the current step).
    * ``late_every = m > 0``: after every ``m`` valid messages, one reading of a random device stamped
      ``late_steps`` steps before the newest step already sent (skipped until that many were sent).
    * ``end_at_now`` (unpaced runs only): align the simulator first so the *last* step is stamped
      ``ceil(now/step)*step``, i.e. the run backfills the past. Unpaced runs otherwise keep the
      simulator's timestamps, which run ahead of the wall clock by ``steps*step_ms`` at most; the
      pipeline rejects readings more than its ``max_future_skew_ms`` ahead.
    * Stops after ``steps`` steps or ``duration_s`` seconds, whichever comes first.
    """
    if steps < 0 or envelope_steps < 1 or malformed_every < 0 or late_every < 0 or late_steps < 1:
        raise ValueError("steps >= 0, envelope_steps >= 1, malformed_every/late_every >= 0, late_steps >= 1")
    if stagger_slices < 1 or (stagger_slices > 1 and rate_steps_per_s is None):
        raise ValueError("stagger_slices >= 1, and > 1 only for paced runs")
    if rate_steps_per_s is not None and rate_steps_per_s <= 0:
        raise ValueError("rate_steps_per_s must be > 0 (or None)")
    kinds = tuple(malformed_kinds)
    if malformed_every and (not kinds or any(k not in MALFORMED_KINDS for k in kinds)):
        raise ValueError(f"malformed_kinds must be a non-empty subset of {MALFORMED_KINDS}")
    rng = np.random.default_rng([sim.seed if seed is None else seed, 4, sim.steps_generated])
    stats = SimStats(first_step=sim.steps_generated)
    if rate_steps_per_s is not None:
        sim.align_to(aligned_now_ms(sim.step_ms, wall_clock()))
        # A real device sends a reading once its timestamp has come: wait for the first grid point.
        sleep(max(0.0, sim.next_ts_ms / 1000 - wall_clock()))
    elif end_at_now:
        sim.align_to(aligned_now_ms(sim.step_ms, wall_clock()) - max(steps - 1, 0) * sim.step_ms)
    names = sim.sensors
    ids = sim.device_ids
    keys = [d.encode() for d in ids]
    n_anomalies_before = len(sim.anomalies)
    since_malformed = 0
    since_late = 0
    sent_steps = 0  # steps whose readings have all been sent
    newest_sent_ts: int | None = None
    buffer: list[tuple[int, np.ndarray]] = []
    last_values = np.zeros((sim.n_devices, len(names)))

    def count_error(kind: str) -> Callable[[Any], None]:
        def errback(_exc: Any) -> None:
            stats.send_errors[kind] = stats.send_errors.get(kind, 0) + 1

        return errback

    def send(key: bytes | None, value: bytes, kind: str) -> None:
        try:
            fut = producer.send(topic, key=key, value=value)
        except Exception:  # e.g. MessageSizeTooLargeError: record it and go on
            stats.send_errors[kind] = stats.send_errors.get(kind, 0) + 1
            return
        if kind != "valid" and hasattr(fut, "add_errback"):
            fut.add_errback(count_error(kind))
        stats.messages_sent += 1

    def after_valid() -> None:
        nonlocal since_malformed, since_late
        if malformed_every:
            since_malformed += 1
            if since_malformed >= malformed_every:
                since_malformed = 0
                mk = kinds[int(rng.integers(len(kinds)))]
                dev = ids[int(rng.integers(len(ids)))]
                key, value, mk = malformed(rng, mk, sensors=names, device_id=dev, now_ms=stats.last_ts_ms)
                send(key, value, mk)
                stats.malformed_sent += 1
                stats.malformed_by_kind[mk] = stats.malformed_by_kind.get(mk, 0) + 1
        if late_every:
            since_late += 1
            if since_late >= late_every:
                since_late = 0
                if newest_sent_ts is not None and sent_steps > late_steps:
                    d = int(rng.integers(len(ids)))
                    late_ts = newest_sent_ts - late_steps * sim.step_ms
                    vals = {s: float(v) for s, v in zip(names, last_values[d].tolist(), strict=True)}
                    send(keys[d], encode_reading(ids[d], late_ts, vals), "late")
                    stats.late_sent += 1

    t_start = clock()
    deadline = None if duration_s is None else t_start + duration_s

    def flush_buffer(due: float | None = None) -> None:
        """Send the buffered steps; ``due``: when the step was due (clock), for staggered uploads."""
        nonlocal sent_steps, newest_sent_ts
        if not buffer:
            return
        group_ts = [ts for ts, _ in buffer]
        rows = [v.tolist() for _, v in buffer]
        n = len(ids)
        for d, dev in enumerate(ids):
            if due is not None and d and d * stagger_slices // n != (d - 1) * stagger_slices // n:
                sleep(max(0.0, due + upload_offset_ms(d, n, stagger_slices, sim.step_ms) / 1000 - clock()))
            if len(buffer) == 1:
                value = encode_reading(dev, group_ts[0], dict(zip(names, rows[0][d], strict=True)))
            else:
                value = encode_envelope(
                    dev,
                    [(ts, dict(zip(names, r[d], strict=True))) for ts, r in zip(group_ts, rows, strict=True)],
                )
            send(keys[d], value, "valid")
            stats.readings_sent += len(buffer)
            after_valid()
        sent_steps += len(buffer)
        newest_sent_ts = group_ts[-1]
        buffer.clear()

    for i in range(steps):
        now = clock()
        if deadline is not None and now >= deadline:
            break
        due = None
        if rate_steps_per_s is not None:
            due = t_start + i / rate_steps_per_s
            wait = due - now
            if deadline is not None and now + wait >= deadline:
                sleep(max(deadline - now, 0.0))  # the next step is due after the deadline
                break
            if wait > 0:
                sleep(wait)
        ts, values, _ = sim.step_arrays()
        last_values = values
        if stats.first_ts_ms is None:
            stats.first_ts_ms = ts
        stats.last_ts_ms = ts
        stats.steps += 1
        buffer.append((ts, values))
        if len(buffer) >= envelope_steps:
            flush_buffer(due if stagger_slices > 1 else None)
        if progress is not None:
            progress(i, stats)
    flush_buffer()
    producer.flush()
    stats.anomalies = sim.anomalies[n_anomalies_before:]
    stats.elapsed_s = clock() - t_start
    return stats
