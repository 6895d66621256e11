"""The ensemble's members that judge the inputs themselves rather than the forecast error: a reference level,
the noise level (spread), and hour-of-day / hour-of-week profiles."""

from __future__ import annotations

import math

import numpy as np

from models.scoring.core import Units
from models.scoring.state import _Carried, _Exports, _framed

# The least scale a level member (reference, seasonal) divides by, in input units: below it a sensor was
# still, not quiet, and dividing by its near-zero spread would score its next move in millions.
LEVEL_SCALE_FLOOR = 0.1


class _SlotRows(_Carried):
    """Per-slot state of a reference-based ensemble member: a count ``n`` of seen steps and ``(F,)`` float
    rows named in ``ROWS`` (the feature count ``f`` is set by the first step or restore). The first
    ``skip_steps`` seen steps warm up, the next ``reference_steps`` fix the reference. Exported as
    ``[n, *rows]``."""

    ROWS: tuple[str, ...] = ()
    SIGNAL = ""  # the row the reference is taken of and the level follows; ROWS also holds mean, m2, level
    skip_steps: int
    reference_steps: int
    alpha: float
    rate: float  # the level's per-step learning rate
    n: np.ndarray
    f: int
    mean: np.ndarray
    m2: np.ndarray
    level: np.ndarray
    z: np.ndarray  # the last step's per-feature scores (B, F)

    def _init_rows(self, span: float, skip_steps: int, reference_steps: int, halflife_steps: float) -> None:
        """Smoothing ``alpha`` of an EWMA over ``span`` steps, the periods, the level's ``rate`` for a
        half-life of ``halflife_steps``, and empty rows."""
        self.alpha = 2.0 / (span + 1.0)
        self.rate = float(1.0 - 0.5 ** (1.0 / halflife_steps))
        self.skip_steps, self.reference_steps = skip_steps, reference_steps
        self.n = np.zeros(0, np.int64)
        self.f = 0
        for name in self.ROWS:
            setattr(self, name, np.zeros((0, 0)))
        self.z = np.zeros((0, 0))

    def _reference(self, s: np.ndarray, n: np.ndarray, value: np.ndarray) -> None:
        """Within the reference period (``n`` = steps seen before this one), accumulate the mean and sum of
        squares of ``value`` (rows of slots ``s``, Welford); the level starts at the reference mean."""
        k = n - self.skip_steps
        ref = (k >= 0) & (k < self.reference_steps)
        if ref.any():
            r = s[ref]
            kk = (k[ref] + 1)[:, None].astype(np.float64)
            delta = value[ref] - self.mean[r]
            self.mean[r] += delta / kk
            self.m2[r] += delta * (value[ref] - self.mean[r])
            self.level[r] = self.mean[r]

    def _score(self, slots: np.ndarray, seen: np.ndarray, floor: np.ndarray | float) -> np.ndarray:
        """``max_f |signal - level| / std`` per slot (the reference std floored at ``floor``); 0 for rows not
        seen or whose reference is not set yet. Keeps the per-feature scores in ``z``."""
        k = np.clip(self.n[slots] - self.skip_steps, 1, self.reference_steps)[:, None]
        std = np.maximum(np.sqrt(self.m2[slots] / k), floor)
        z = np.abs(getattr(self, self.SIGNAL)[slots] - self.level[slots]) / std
        self.z = np.where((seen & self.ready(slots))[:, None], z, 0.0)
        return self.z.max(axis=1) if self.f else np.zeros(len(slots))

    def update(self, slots: np.ndarray, learn: np.ndarray) -> None:
        """Let the level of the ``learn`` rows (past the reference period) follow their signal.
        ``learn`` is ``(B,)`` (whole rows) or ``(B, F)`` (per feature)."""
        mask = np.asarray(learn, bool)
        if mask.ndim == 1:
            mask = np.repeat(mask[:, None], self.f, axis=1)
        mask = mask & self.ready(slots)[:, None]
        rows = mask.any(axis=1)
        s, m = slots[rows], mask[rows]
        signal = getattr(self, self.SIGNAL)
        self.level[s] += np.where(m, self.rate * (signal[s] - self.level[s]), 0.0)

    @property
    def capacity(self) -> int:
        return len(self.n)

    @property
    def calibration_steps(self) -> int:
        """Seen steps before the reference is set (and scores are meaningful)."""
        return self.skip_steps + self.reference_steps

    def _features(self, f: int) -> None:
        if f != self.f:
            self.f = f
            for name in self.ROWS:
                setattr(self, name, np.zeros((self.capacity, f)))

    def grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        if extra <= 0:
            return
        self.n = np.concatenate([self.n, np.zeros(extra, np.int64)])
        for name in self.ROWS:
            setattr(self, name, np.concatenate([getattr(self, name), np.zeros((extra, self.f))]))

    def reset(self, slots: np.ndarray) -> None:
        self.n[slots] = 0
        for name in self.ROWS:
            getattr(self, name)[slots] = 0.0

    def ready(self, slots: np.ndarray) -> np.ndarray:
        return self.n[slots] >= self.calibration_steps

    def export_parts(self, slots: np.ndarray) -> list[np.ndarray]:
        return [self.n[slots], *(getattr(self, name)[slots] for name in self.ROWS)]

    def restore(self, slot: int, state: list[float]) -> None:
        rows = len(self.ROWS)
        if self.f == 0 and len(state) > 1 and (len(state) - 1) % rows == 0:
            self._features((len(state) - 1) // rows)
        if len(state) != 1 + rows * self.f:
            return
        self.n[slot] = int(state[0])
        for i, name in enumerate(self.ROWS):
            getattr(self, name)[slot] = state[1 + i * self.f : 1 + (i + 1) * self.f]


class ReferenceDeviation(_SlotRows):
    """Per-slot deviation of the smoothed input from the slot's own reference level (batched, causal).

    A cheap baseline for sustained anomalies (a level that moves and stays), which a one-step forecast
    error only sees at the transitions. Per slot and feature, the input ``x`` is smoothed by an EWMA of
    ``span`` steps. Its first ``skip_steps`` seen steps only warm the EWMA up; the next ``reference_steps``
    fix the reference: the mean and std of the smoothed input (the std floored at ``scale_floor``, per
    feature; :data:`LEVEL_SCALE_FLOOR` by default, as :class:`SeasonalDeviation`'s scale). The score is
    ``max_f |ema_f - level_f| / std_f``, where the level starts at the reference mean and then follows
    the smoothed input with an EWMA of half-life ``halflife_steps`` -- learning only from the steps the
    caller lets learn (e.g. not the flagged ones), so a flagged level shift stays flagged while slow
    normal drifts are followed. Scores are 0 until the reference is set.
    """

    ROWS = ("ema", "mean", "m2", "level")  # smoothed input; reference mean / sum of squares; level
    SIGNAL = "ema"
    ARRAYS = (("n", ""), ("ema", "level"), ("mean", "level"), ("m2", "square"), ("level", "level"))
    ema: np.ndarray

    def __init__(
        self,
        *,
        span: float = 10.0,
        skip_steps: int = 20,
        reference_steps: int = 200,
        halflife_steps: float = 100.0,
        scale_floor: np.ndarray | float = LEVEL_SCALE_FLOOR,
    ) -> None:
        if span < 1 or reference_steps < 2 or skip_steps < 0 or halflife_steps <= 0:
            raise ValueError("span >= 1, reference_steps >= 2, skip_steps >= 0, halflife_steps > 0")
        self.scale_floor = np.asarray(scale_floor, np.float64)
        self._init_rows(span, skip_steps, reference_steps, halflife_steps)

    def step(self, slots: np.ndarray, x: np.ndarray, seen: np.ndarray) -> np.ndarray:
        """Scores ``(B,)`` of inputs ``x`` ``(B, F)``; advances the smoothing (and, within the reference
        period, the reference) of the ``seen`` rows."""
        self._features(x.shape[1])
        s, xs = slots[seen], np.asarray(x, np.float64)[seen]
        n = self.n[s]
        ema = np.where((n == 0)[:, None], xs, self.ema[s] + self.alpha * (xs - self.ema[s]))
        self.ema[s] = ema
        self._reference(s, n, ema)
        self.n[s] += 1
        return self._score(slots, seen, np.maximum(self.scale_floor, 1e-12))


class SpreadDeviation(_SlotRows):
    """Per-slot change of the input's *noise level* (spread of its increments), batched and causal.

    A level baseline and a one-step forecast error see a change of level; a series whose noise grows
    (a metric that starts to oscillate) or whose usual spikes stop coming shows neither for long. Per
    slot and feature, the increment ``d = x_t - x_{t-1}`` updates a short-term spread, an EWMA of
    ``d^2`` over ``span`` steps, with ``d`` clipped at ``clip`` x the current spread (Huber style: one
    spike is not a noise level; a lasting change still moves the spread geometrically). The score is
    ``|l - level| / std`` of its log ``l = 0.5 log(spread + eps)``: the first ``skip_steps`` seen steps
    warm the spread up, the next ``reference_steps`` fix the mean and std of ``l`` (the std floored at
    ``0.5 sqrt(2 / span)``, the sampling std of a log-spread of ``span`` increments), after which the
    level follows ``l`` with half-life ``halflife_steps`` on the steps the caller lets learn (not the
    flagged ones), as :class:`ReferenceDeviation`'s level. Two-sided: more noise and less noise both
    score. Scores are 0 until the reference is set.
    """

    # the last input, EWMA of the squared (clipped) increments, the last log-spread (what update() learns),
    # reference mean / sum of squares of the log-spread, level
    ROWS = ("last", "spread", "logs", "mean", "m2", "level")
    SIGNAL = "logs"
    # a log-spread moves by log(scale) (the eps under it aside); the spread of the log-spreads is unitless
    ARRAYS = (
        ("n", ""),
        ("last", "level"),
        ("spread", "square"),
        ("logs", "log"),
        ("mean", "log"),
        ("m2", "free"),
        ("level", "log"),
    )
    last: np.ndarray
    spread: np.ndarray
    logs: np.ndarray

    def __init__(
        self,
        *,
        span: float = 30.0,
        clip: float = 3.0,
        skip_steps: int = 30,
        reference_steps: int = 100,
        halflife_steps: float = 200.0,
        eps: float = 1e-6,
    ) -> None:
        if span < 1 or clip <= 0 or skip_steps < 1 or reference_steps < 2 or halflife_steps <= 0 or eps <= 0:
            raise ValueError("span >= 1, clip > 0, skip_steps >= 1, reference_steps >= 2, halflife_steps > 0, eps > 0")
        self.clip, self.eps = clip, eps
        self.std_floor = 0.5 * math.sqrt(2.0 / span)
        self._init_rows(span, skip_steps, reference_steps, halflife_steps)

    def step(self, slots: np.ndarray, x: np.ndarray, seen: np.ndarray) -> np.ndarray:
        """Scores ``(B,)`` of inputs ``x`` ``(B, F)``; advances the spread (and, within the reference
        period, the reference) of the ``seen`` rows."""
        x = np.asarray(x, np.float64)
        self._features(x.shape[1])
        s, xs = slots[seen], x[seen]
        n = self.n[s][:, None]
        d = xs - self.last[s]
        sp = self.spread[s]
        bound = self.clip * np.sqrt(sp)
        d = np.where(sp > 0, np.clip(d, -bound, bound), d)
        sp = np.where(n == 0, 0.0, np.where(n == 1, d * d, sp + self.alpha * (d * d - sp)))
        self.spread[s], self.last[s] = sp, xs
        log_spread = 0.5 * np.log(sp + self.eps)
        self.logs[s] = log_spread
        self._reference(s, n[:, 0], log_spread)
        self.n[s] += 1
        return self._score(slots, seen, self.std_floor)


class SeasonalDeviation(_Carried):
    """Per-slot deviation of the smoothed input from the slot's own *seasonal profile* (batched, causal).

    For series with a daily (or weekly) rhythm, an anomaly can be a value that is normal in itself but
    not at that time (a daily peak that does not come, a holiday): neither a one-step forecast error
    nor a single reference level sees it. Each step comes with a *context*, its seasonal bin (e.g. the
    hour of day, from the reading's timestamp; -1 when unknown), which is an input but is not scored.
    Per slot, feature and bin, the profile is the running mean of the input smoothed by an EWMA of
    ``span`` steps (weight ``1/(k+1)`` for the bin's first steps, then that of a half-life of
    ``halflife_steps`` steps spent in the bin), learnt only from the steps the caller lets learn (e.g.
    not the flagged ones), as :class:`ReferenceDeviation`'s level. The score is
    ``max_f |ema_f - profile[bin]_f| / scale_f`` where the scale is the larger of the running RMS of
    the residuals of all bins (half-life ``scale_halflife`` steps) and that of the bin's own residuals
    (once it has two; a bin coarser than the signal, e.g. the hour in which a daily step happens, varies
    more within itself than the others), floored at ``scale_floor``. A bin scores once it has been
    entered ``min_visits`` times (i.e. its profile holds ``min_visits - 1`` earlier periods) and
    ``min_residuals`` residuals have been learnt; before that, and for an unknown bin, the score is 0.

    Causal: the score at ``t`` compares the input up to ``t`` with a profile learnt before ``t``.
    Memory: ``bins x (2F + 3)`` floats per slot.
    """

    # the smoothed input and the profiles are levels, the residual variances squares, the last residual a
    # difference
    ARRAYS = (
        *((name, "") for name in ("n", "nres", "prev_bin", "bin", "count", "visits", "bin_nres")),
        ("ema", "level"),
        ("profile", "level"),
        ("var", "square"),
        ("bin_var", "square"),
        ("res", "diff"),
    )

    def __init__(
        self,
        *,
        bins: int = 24,
        span: float = 10.0,
        halflife_steps: float = 50.0,
        scale_halflife: float = 200.0,
        scale_floor: float = LEVEL_SCALE_FLOOR,
        min_visits: int = 3,
        min_residuals: int = 20,
    ) -> None:
        if bins < 1 or span < 1 or halflife_steps <= 0 or scale_halflife <= 0 or min_visits < 2:
            raise ValueError("bins >= 1, span >= 1, half-lives > 0, min_visits >= 2")
        self.bins, self.min_visits, self.min_residuals = bins, min_visits, min_residuals
        self.alpha = 2.0 / (span + 1.0)
        self.rate = float(1.0 - 0.5 ** (1.0 / halflife_steps))
        self.scale_rate = float(1.0 - 0.5 ** (1.0 / scale_halflife))
        self.scale_floor = scale_floor
        self.f = 0
        self.n = np.zeros(0, np.int64)  # seen steps
        self.ema = np.zeros((0, 0))
        self.prev_bin = np.zeros(0, np.int64)
        self.profile = np.zeros((0, bins, 0))
        self.count = np.zeros((0, bins), np.int64)  # steps learnt per bin
        self.visits = np.zeros((0, bins), np.int64)  # entries into each bin
        self.var = np.zeros((0, 0))  # running mean square residual, all bins
        self.bin_var = np.zeros((0, bins, 0))  # running mean square residual per bin
        self.bin_nres = np.zeros((0, bins), np.int64)
        self.nres = np.zeros(0, np.int64)  # residuals learnt
        self.res = np.zeros((0, 0))  # the last step's residual (what update() learns)
        self.bin = np.zeros(0, np.int64)  # the last step's bin (-1: none)
        self.ready_rows = np.zeros(0, bool)

    @property
    def capacity(self) -> int:
        return len(self.n)

    def _features(self, f: int) -> None:
        if f != self.f:
            c = self.capacity
            self.f = f
            self.ema, self.var, self.res = np.zeros((c, f)), np.zeros((c, f)), np.zeros((c, f))
            self.profile = np.zeros((c, self.bins, f))
            self.bin_var = np.zeros((c, self.bins, f))

    def context_of(self, ts_ms: np.ndarray) -> np.ndarray:
        """Time-of-day bins (UTC) of steps stamped ``ts_ms``."""
        return seasonal_bin(np.asarray(ts_ms, np.int64) // 1000, self.bins, weekly=False)

    def grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        if extra <= 0:
            return
        f, b = self.f, self.bins
        self.n = np.concatenate([self.n, np.zeros(extra, np.int64)])
        self.nres = np.concatenate([self.nres, np.zeros(extra, np.int64)])
        self.prev_bin = np.concatenate([self.prev_bin, np.full(extra, -1, np.int64)])
        self.bin = np.concatenate([self.bin, np.full(extra, -1, np.int64)])
        for name in ("ema", "var", "res"):
            setattr(self, name, np.concatenate([getattr(self, name), np.zeros((extra, f))]))
        self.profile = np.concatenate([self.profile, np.zeros((extra, b, f))])
        self.bin_var = np.concatenate([self.bin_var, np.zeros((extra, b, f))])
        self.bin_nres = np.concatenate([self.bin_nres, np.zeros((extra, b), np.int64)])
        self.count = np.concatenate([self.count, np.zeros((extra, b), np.int64)])
        self.visits = np.concatenate([self.visits, np.zeros((extra, b), np.int64)])

    def reset(self, slots: np.ndarray) -> None:
        self.n[slots] = 0
        self.nres[slots] = 0
        self.prev_bin[slots] = -1
        self.bin[slots] = -1
        for name in ("ema", "var", "res", "profile", "count", "visits", "bin_var", "bin_nres"):
            getattr(self, name)[slots] = 0

    def step(self, slots: np.ndarray, x: np.ndarray, seen: np.ndarray, bins: np.ndarray) -> np.ndarray:
        """Scores ``(B,)`` of inputs ``x`` ``(B, F)`` in seasonal bins ``bins`` ``(B,)`` (-1: unknown);
        advances the smoothing and the bin visits of the ``seen`` rows (the profile: see :meth:`update`)."""
        x = np.asarray(x, np.float64)
        self._features(x.shape[1])
        b = np.where((bins >= 0) & (bins < self.bins), bins, -1).astype(np.int64)
        s, xs, bs = slots[seen], x[seen], b[seen]
        n = self.n[s]
        ema = np.where((n == 0)[:, None], xs, self.ema[s] + self.alpha * (xs - self.ema[s]))
        self.ema[s] = ema
        self.n[s] += 1
        known = bs >= 0
        enter = known & (bs != self.prev_bin[s])
        self.visits[s[enter], bs[enter]] += 1
        self.prev_bin[s] = bs
        bb = np.maximum(bs, 0)
        res = ema - self.profile[s, bb]
        has_profile = known & (self.count[s, bb] > 0)
        self.res[s] = np.where(has_profile[:, None], res, np.nan)  # NaN: no residual to learn
        self.bin[s] = bs
        ready = has_profile & (self.visits[s, bb] >= self.min_visits) & (self.nres[s] >= self.min_residuals)
        own = np.where((self.bin_nres[s, bb] >= 2)[:, None], self.bin_var[s, bb], 0.0)
        scale = np.sqrt(np.maximum(np.maximum(self.var[s], own), self.scale_floor**2))
        z = (np.abs(np.nan_to_num(res)) / scale).max(axis=1) if self.f else np.zeros(len(s))
        out = np.zeros(len(slots))
        out[seen] = np.where(ready, z, 0.0)
        self.ready_rows = np.zeros(len(slots), bool)  # which rows scored (for a caller combining profiles)
        self.ready_rows[seen] = ready
        return out

    def update(self, slots: np.ndarray, learn: np.ndarray) -> None:
        """Learn the last step of the ``learn`` rows (once): its residual (the scale, if its bin already
        had a profile) and its bin's profile."""
        s = slots[learn]
        s = s[self.bin[s] >= 0]
        if len(s) == 0:
            return
        b = self.bin[s]
        r = s[np.isfinite(self.res[s, 0])]
        w = np.maximum(1.0 / (self.nres[r] + 1.0), self.scale_rate)[:, None]
        self.var[r] += w * (self.res[r] ** 2 - self.var[r])
        self.nres[r] += 1
        rb = self.bin[r]
        w = np.maximum(1.0 / (self.bin_nres[r, rb] + 1.0), self.scale_rate)[:, None]
        self.bin_var[r, rb] += w * (self.res[r] ** 2 - self.bin_var[r, rb])
        self.bin_nres[r, rb] += 1
        k = self.count[s, b]
        w = np.maximum(1.0 / (k + 1.0), self.rate)[:, None]
        self.profile[s, b] += w * (self.ema[s] - self.profile[s, b])
        self.count[s, b] += 1
        self.bin[s] = -1  # learnt once

    def export_parts(self, slots: np.ndarray) -> list[np.ndarray]:
        s = slots
        head = [self.n[s], self.nres[s], self.prev_bin[s], self.bin[s]]
        rows = [self.ema[s], self.var[s], self.res[s], self.profile[s], self.bin_var[s]]
        return [*head, *rows, self.count[s], self.visits[s], self.bin_nres[s]]

    def restore(self, slot: int, state: list[float]) -> None:
        f, b = self.f, self.bins
        if f == 0 and len(state) > 4 + 3 * b:
            f = (len(state) - 4 - 3 * b) // (3 + 2 * b)
            self._features(f)
        if len(state) != 4 + 3 * f + 2 * b * f + 3 * b:
            return
        self.n[slot], self.nres[slot] = int(state[0]), int(state[1])
        self.prev_bin[slot], self.bin[slot] = int(state[2]), int(state[3])
        v = np.asarray(state[4:], np.float64)
        self.ema[slot], self.var[slot], self.res[slot] = v[:f], v[f : 2 * f], v[2 * f : 3 * f]
        o = 3 * f
        self.profile[slot] = v[o : o + b * f].reshape(b, f)
        self.bin_var[slot] = v[o + b * f : o + 2 * b * f].reshape(b, f)
        o += 2 * b * f
        self.count[slot] = v[o : o + b].astype(np.int64)
        self.visits[slot] = v[o + b : o + 2 * b].astype(np.int64)
        self.bin_nres[slot] = v[o + 2 * b :].astype(np.int64)


class WeeklySeasonalDeviation(_Exports):
    """Two :class:`SeasonalDeviation` profiles, the finer one where it has enough history: the context bin
    is the hour of the *week* (``0..7 x per_day - 1``); the weekly profile (``7 x per_day`` bins) scores
    a step once its bin has been entered ``min_visits`` times (that many weeks), the daily one (bin modulo
    ``per_day``) before that. Human-driven series (traffic, taxis, tweets, ad clicks) have a weekly
    rhythm: a holiday looks like a Sunday, which the daily profile alone takes for normal once weekends
    have been learnt. Both profiles learn every step the caller lets learn."""

    def __init__(self, *, per_day: int = 24, **kwargs: float) -> None:
        self.per_day = per_day
        self.weekly = SeasonalDeviation(bins=7 * per_day, **kwargs)  # type: ignore[arg-type]
        self.daily = SeasonalDeviation(bins=per_day, **kwargs)  # type: ignore[arg-type]

    def context_of(self, ts_ms: np.ndarray) -> np.ndarray:
        """Hour-of-week bins (UTC) of steps stamped ``ts_ms``."""
        return seasonal_bin(np.asarray(ts_ms, np.int64) // 1000, self.per_day, weekly=True)

    def grow(self, capacity: int) -> None:
        self.weekly.grow(capacity)
        self.daily.grow(capacity)

    def reset(self, slots: np.ndarray) -> None:
        self.weekly.reset(slots)
        self.daily.reset(slots)

    def step(self, slots: np.ndarray, x: np.ndarray, seen: np.ndarray, bins: np.ndarray) -> np.ndarray:
        b = np.asarray(bins, np.int64)
        week = self.weekly.step(slots, x, seen, b)
        day = self.daily.step(slots, x, seen, np.where(b >= 0, b % self.per_day, -1))
        return np.where(self.weekly.ready_rows, week, day)

    def update(self, slots: np.ndarray, learn: np.ndarray) -> None:
        self.weekly.update(slots, learn)
        self.daily.update(slots, learn)

    def export_parts(self, slots: np.ndarray) -> list[np.ndarray]:
        return [*_framed(len(slots), self.weekly.export_parts(slots)), *self.daily.export_parts(slots)]

    def transfer(self, src: WeeklySeasonalDeviation, s: np.ndarray, d: np.ndarray, units: Units) -> None:
        self.weekly.transfer(src.weekly, s, d, units)
        self.daily.transfer(src.daily, s, d, units)

    def rescale(self, units: Units) -> None:
        self.weekly.rescale(units)
        self.daily.rescale(units)

    def restore(self, slot: int, state: list[float]) -> None:
        if state:
            k = int(state[0])
            self.weekly.restore(slot, state[1 : 1 + k])
            self.daily.restore(slot, state[1 + k :])


def seasonal_bin(ts_s: np.ndarray, bins: int = 24, weekly: bool = True) -> np.ndarray:
    """The context bin of each UTC timestamp (seconds, int): its time of day in ``bins`` equal parts
    (24: the hour), or with ``weekly`` its time of the week in ``7 x bins`` parts (0: Monday's first)."""
    t = np.asarray(ts_s, np.int64)
    day = (t % 86400) * bins // 86400
    if not weekly:
        return day
    weekday = (t // 86400 + 3) % 7  # 1970-01-01 was a Thursday
    return weekday * bins + day
