"""The anomaly likelihood (in the style of Numenta HTM): a rolling distribution of averaged raw scores and
the tail probability of the current average, with its probation, suppression and spatial check."""

from __future__ import annotations

import math

import numpy as np

from models.scoring.state import _Carried

_SQRT2 = math.sqrt(2.0)


_FAR = 1 << 40  # "no red step yet"


_LOG_1E10 = math.log(1e-10)


def erfc(x: np.ndarray) -> np.ndarray:
    """Complementary error function, elementwise (Numerical Recipes ``erfcc``: relative error < 1.2e-7)."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = (
        -z * z
        - 1.26551223
        + t
        * (
            1.00002368
            + t
            * (
                0.37409196
                + t
                * (
                    0.09678418
                    + t
                    * (
                        -0.18628806
                        + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))
                    )
                )
            )
        )
    )
    r = t * np.exp(poly)
    return np.where(x >= 0, r, 2.0 - r)


def tail_probability(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Gaussian tail probability of ``x``, mirrored below the mean as in Numenta's ``tailProbability``:
    ``Q(|x - mean| / std)``, so an unusually *low* average error (a signal gone flat) is unlikely too."""
    return 0.5 * erfc(np.abs(x - mean) / (std * _SQRT2))


def log10_tail(z: np.ndarray) -> np.ndarray:
    """``log10 Q(z)`` of the standard Gaussian upper tail, stable far into the tail (no underflow):
    the asymptotic series ``Q(z) ~ phi(z) / z * (1 - 1/z^2 + 3/z^4)`` beyond ``z = 8``."""
    z = np.asarray(z, np.float64)
    near = np.log10(np.maximum(0.5 * erfc(np.minimum(z, 8.0) / _SQRT2), 1e-300))
    zz = np.maximum(z, 8.0)
    far = (-0.5 * zz * zz - np.log(zz) - 0.5 * math.log(2 * math.pi) + np.log1p(-1 / zz**2 + 3 / zz**4)) / math.log(10)
    return np.where(z > 8.0, far, near)


def tail_score(log10_tail_: np.ndarray) -> np.ndarray:
    """A non-saturating, order-preserving scale of a tail probability into ``[0, 1)``:
    ``L / (1 + L)`` with ``L = -log10(tail) / 5``. It keeps Numenta's anchor (tail 1e-5 -> 0.5) but,
    unlike :func:`log_likelihood`, still ranks events beyond 1e-10 (1e-10 -> 0.67, 1e-50 -> 0.91), so
    one global threshold can separate large anomalies from moderate ones."""
    lvl = np.maximum(-np.asarray(log10_tail_, np.float64), 0.0) / 5.0
    return lvl / (1.0 + lvl)


def log_likelihood(tail: np.ndarray) -> np.ndarray:
    """Numenta's ``computeLogLikelihood`` of the likelihood ``1 - tail``: ``log(tail + 1e-10) / log(1e-10)``.

    In ``[0, 1]``: a tail probability of 0.5 gives 0.03, 1e-5 gives 0.5, 0 gives 1."""
    return np.clip(np.log(tail + 1e-10) / _LOG_1E10, 0.0, 1.0)


class AnomalyLikelihood(_Carried):
    """Per-slot anomaly likelihood over a rolling error distribution (in the style of Numenta HTM), batched.

    For each slot, step ``t``'s raw score ``r_t`` (clipped to ``cap``) enters a moving average over the
    last ``window`` raw scores (``t`` included). The long-term distribution of that average is a Gaussian
    whose mean and variance are running estimates (a plain mean over the first ``history_steps`` learnt
    averages, an exponential one with weight ``1 / history_steps`` after that; the std is floored at
    ``min_std``). The likelihood is ``1 - tail``, the tail probability of the current average under that
    distribution (:func:`tail_probability`), reported log-scaled in ``[0, 1]`` (:func:`log_likelihood`).

    * **Probation**: the first ``learning_steps`` averages are neither scored nor learnt; the next
      ``estimation_steps`` are learnt but report the neutral 0.5 likelihood; after that the slot scores.
      Both are per slot: the constructor's values are the defaults, :meth:`set_probation` gives a slot
      its own (e.g. half of a series' calibration prefix for learning and half for estimation, as
      Numenta's detector splits NAB's probationary period).
    * **Suppression** (``suppress``): as in Numenta's ``_filterLikelihoods``, while the tail stays in the
      red zone (``<= red``) only its first step reports it; the following red steps report ``yellow``.
      ``suppress_steps`` > 1 widens this to any red step within that many steps of the previous red (or
      spatial) one, and suppresses repeated spatial hits too: with ``suppress_steps = window``, a step
      whose moving average still holds raw scores of the last reported event is not a new report.
    * **Scale** of the reported score: ``"htm"`` is Numenta's log-likelihood (saturates at 1 for tails
      below 1e-10); ``"tail"`` is :func:`tail_score`, the same anchor (1e-5 -> 0.5) without saturation.
    * **Learning** happens in :meth:`update`, only for the steps the caller lets learn (e.g. not the
      flagged ones). Like Numenta's, it learns the averages in the red zone that it did not flag (the
      suppressed repeats); ``learn_red=False`` keeps those out too (on NAB that scored lower, see
      bench/README.md).
    * **Spatial check** (``spatial_tolerance`` not None): as in NAB's HTM detector, a step whose input
      leaves the range seen so far by more than ``spatial_tolerance`` x that range (any feature) scores 1.
      The range learns from every seen step. With ``spatial_lag`` > 0 the range is that of the inputs seen
      at least ``spatial_lag`` steps before (a ring of the last ``spatial_lag`` inputs delays them): an
      excursion that creeps beyond the range a little at a time would otherwise widen it as it goes and
      never leave it by the tolerance (a temperature falling slowly below anything seen before), while
      compared with the range before the excursion began it does. The lagged range is never wider than
      the plain one, so every plain hit is a lagged hit too; memory ``spatial_lag x F`` floats per slot.

    Causal: the score at ``t`` uses raw scores and inputs up to ``t`` and a distribution learnt before ``t``.
    """

    # the averages are unitless; the spatial range and the inputs waiting to join it are levels
    _UNITLESS = ("n", "buf", "avg", "mean", "var", "count", "prev_red", "since", "learn_n", "estimate_n")
    ARRAYS = (*((name, "") for name in _UNITLESS), ("lo", "level"), ("hi", "level"), ("recent", "level"))

    def __init__(
        self,
        *,
        window: int = 10,
        learning_steps: int = 0,
        estimation_steps: int = 100,
        history_steps: int = 8640,
        min_std: float = 0.05,
        cap: float | None = None,
        red: float = 1e-5,
        yellow: float = 1e-3,
        suppress: bool = True,
        suppress_steps: int = 1,
        spatial_tolerance: float | None = None,
        learn_red: bool = True,
        scale: str = "tail",
        spatial_lag: int = 0,
    ) -> None:
        if window < 1 or history_steps < 1 or learning_steps < 0 or estimation_steps < 1:
            raise ValueError("window, history_steps and estimation_steps must be >= 1, learning_steps >= 0")
        if spatial_lag < 0:
            raise ValueError("spatial_lag must be >= 0")
        self.window, self.learning_steps, self.estimation_steps = window, learning_steps, estimation_steps
        self.history_steps, self.min_std, self.cap = history_steps, min_std, cap
        self.red, self.yellow, self.suppress, self.spatial_tolerance = red, yellow, suppress, spatial_tolerance
        if suppress_steps < 1:
            raise ValueError("suppress_steps must be >= 1")
        self.suppress_steps = suppress_steps
        self.learn_red = learn_red
        if scale not in ("htm", "tail"):
            raise ValueError("scale must be 'htm' (log-likelihood, saturates at 1e-10) or 'tail' (tail_score)")
        self.scale = scale
        self.n = np.zeros(0, np.int64)  # raw scores seen
        self.buf = np.zeros((0, window))  # ring of the last raw scores
        self.avg = np.zeros(0)  # the last moving average (what update() learns)
        self.mean = np.zeros(0)
        self.var = np.zeros(0)
        self.count = np.zeros(0, np.int64)  # averages learnt
        self.prev_red = np.zeros(0, bool)
        self.since = np.zeros(0, np.int64)  # steps since the last red (or spatial) step; 0: the previous one
        self.learn_n = np.zeros(0, np.int64)  # per-slot probation (see set_probation)
        self.estimate_n = np.zeros(0, np.int64)
        self.lo = np.zeros((0, 0))  # spatial range, (N, F) once the feature count is known
        self.hi = np.zeros((0, 0))
        self.spatial_hit = np.zeros(0, bool)  # the last step's rows reported as spatial hits (B,)
        self.spatial_lag = spatial_lag
        self.recent = np.zeros((0, spatial_lag, 0))  # the last spatial_lag inputs, not yet in the range (N, L, F)

    @property
    def capacity(self) -> int:
        return len(self.n)

    def grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        if extra <= 0:
            return
        self.n = np.concatenate([self.n, np.zeros(extra, np.int64)])
        self.buf = np.concatenate([self.buf, np.zeros((extra, self.window))])
        self.avg = np.concatenate([self.avg, np.zeros(extra)])
        self.mean = np.concatenate([self.mean, np.zeros(extra)])
        self.var = np.concatenate([self.var, np.zeros(extra)])
        self.count = np.concatenate([self.count, np.zeros(extra, np.int64)])
        self.prev_red = np.concatenate([self.prev_red, np.zeros(extra, bool)])
        self.since = np.concatenate([self.since, np.full(extra, _FAR, np.int64)])
        self.learn_n = np.concatenate([self.learn_n, np.full(extra, self.learning_steps, np.int64)])
        self.estimate_n = np.concatenate([self.estimate_n, np.full(extra, self.estimation_steps, np.int64)])
        f = self.f
        self.lo = np.concatenate([self.lo, np.full((extra, f), np.nan)])
        self.hi = np.concatenate([self.hi, np.full((extra, f), np.nan)])
        self.recent = np.concatenate([self.recent, np.full((extra, self.spatial_lag, f), np.nan)])

    def reset(self, slots: np.ndarray) -> None:
        self.n[slots] = 0
        self.buf[slots] = 0.0
        self.avg[slots] = 0.0
        self.mean[slots] = 0.0
        self.var[slots] = 0.0
        self.count[slots] = 0
        self.prev_red[slots] = False
        self.since[slots] = _FAR
        self.learn_n[slots] = self.learning_steps
        self.estimate_n[slots] = self.estimation_steps
        self.lo[slots] = np.nan
        self.hi[slots] = np.nan
        self.recent[slots] = np.nan

    def set_probation(self, slots: np.ndarray, learning_steps: np.ndarray, estimation_steps: np.ndarray) -> None:
        """Give ``slots`` their own probation (call after the slot's reset; kept by export/restore)."""
        learning, estimation = np.asarray(learning_steps, np.int64), np.asarray(estimation_steps, np.int64)
        if (learning < 0).any() or (estimation < 1).any():
            raise ValueError("learning_steps must be >= 0 and estimation_steps >= 1")
        self.learn_n[slots] = learning
        self.estimate_n[slots] = estimation

    def ready(self, slots: np.ndarray) -> np.ndarray:
        """Slots past their probation (scoring)."""
        return self.count[slots] >= self.estimate_n[slots]

    @property
    def repeat_score(self) -> float:
        """What a suppressed repeat of an event reports: the score of a ``yellow`` tail."""
        lt = np.array(math.log10(self.yellow))
        return float(log_likelihood(10.0**lt) if self.scale == "htm" else tail_score(lt))

    def _features(self, f: int) -> None:
        """Size the spatial range for ``f`` features (set by the first step, or by a restored state)."""
        if self.f != f:
            self.f = f
            self.lo = np.full((self.capacity, f), np.nan)
            self.hi = np.full((self.capacity, f), np.nan)
            self.recent = np.full((self.capacity, self.spatial_lag, f), np.nan)

    def _spatial(self, slots: np.ndarray, x: np.ndarray, seen: np.ndarray) -> np.ndarray:
        self._features(x.shape[1])
        lo, hi = self.lo[slots], self.hi[slots]
        tol = (hi - lo) * float(self.spatial_tolerance or 0.0)
        with np.errstate(invalid="ignore"):
            outside = ((x > hi + tol) | (x < lo - tol)) & (hi > lo)
        s, xs = slots[seen], x[seen]
        if self.spatial_lag:  # this input waits in the ring; the one it replaces joins the range (NaN: none)
            pos = self.n[s] % self.spatial_lag
            xs, self.recent[s, pos] = self.recent[s, pos], xs
        self.lo[s] = np.fmin(self.lo[s], xs)
        self.hi[s] = np.fmax(self.hi[s], xs)
        return outside.any(axis=1)

    def step(self, slots: np.ndarray, raw: np.ndarray, x: np.ndarray, seen: np.ndarray) -> np.ndarray:
        """Log-likelihood scores ``(B,)`` of raw scores ``(B,)``; advances the ``seen`` rows (not the
        distribution, see :meth:`update`). Rows not seen score 0."""
        r = np.nan_to_num(np.asarray(raw, np.float64), nan=0.0, posinf=1e12)
        if self.cap is not None:
            r = np.minimum(r, self.cap)
        n = self.n[slots]
        pos = n % self.window
        rows = np.arange(len(slots))
        buf = self.buf[slots]
        total = buf.sum(axis=1) - np.where(n >= self.window, buf[rows, pos], 0.0) + r
        avg = total / np.minimum(n + 1, self.window)
        std = np.maximum(np.sqrt(self.var[slots]), self.min_std)
        lt = log10_tail(np.abs(avg - self.mean[slots]) / std)
        red = lt <= math.log10(self.red)
        recent = self.since[slots] < self.suppress_steps
        if self.suppress:
            lt = np.where(red & recent, math.log10(self.yellow), lt)
        ready = self.ready(slots)
        if self.scale == "htm":
            score = np.where(ready, log_likelihood(10.0**lt), log_likelihood(np.array(0.5)))
        else:
            score = np.where(ready, tail_score(lt), tail_score(np.array(math.log10(0.5))))
        spatial = np.zeros(len(slots), bool)
        self.spatial_hit = spatial
        if self.spatial_tolerance is not None:
            spatial = self._spatial(slots, x, seen) & ready
            hit = spatial & ~recent if self.suppress and self.suppress_steps > 1 else spatial
            score = np.where(hit, 1.0, score)
            self.spatial_hit = hit & seen
        score = np.where(seen, score, 0.0)
        s = slots[seen]
        buf[rows, pos] = r
        self.buf[s] = buf[seen]
        self.n[s] += 1
        self.avg[s] = avg[seen]
        self.prev_red[s] = red[seen] & ready[seen]
        event = (red | spatial) & ready if self.suppress_steps > 1 else red & ready
        self.since[s] = np.where(event[seen], 0, np.minimum(self.since[s] + 1, _FAR))
        return score

    def update(self, slots: np.ndarray, learn: np.ndarray) -> None:
        """Learn the last averages of ``slots`` where ``learn`` is true (past ``learning_steps``)."""
        ok = learn & (self.n[slots] > self.learn_n[slots])
        if not self.learn_red:
            ok &= ~self.prev_red[slots]
        s = slots[ok]
        if len(s) == 0:
            return
        a = self.avg[s]
        w = np.maximum(1.0 / (self.count[s] + 1.0), 1.0 / self.history_steps)
        delta = a - self.mean[s]
        self.mean[s] += w * delta
        self.var[s] = (1.0 - w) * (self.var[s] + w * delta**2)
        self.count[s] += 1

    def export_parts(self, slots: np.ndarray) -> list[np.ndarray]:
        s = slots
        head = [self.n[s], self.count[s], self.mean[s], self.var[s], self.prev_red[s], self.avg[s]]
        probation = [self.learn_n[s], self.estimate_n[s], self.since[s]]
        state = [*head, self.buf[s], self.lo[s], self.hi[s], *probation]
        if not self.spatial_lag:
            return state
        # the inputs waiting to join the lagged range, then their shape: the state describes itself
        return [*state, self.recent[s], np.full(len(s), self.f), np.full(len(s), self.spatial_lag)]

    def _core(self, f: int) -> int:
        """Length of an exported state of ``f`` features without its ring: head, window, range, probation."""
        return 6 + self.window + 2 * f + 3

    def _ring_layout(self, state: list[float]) -> tuple[int, int] | None:
        """``(features, ring rows)`` of a state exported with a lagged range, else None."""
        if len(state) < 2 or not all(v >= 1 and v == int(v) for v in state[-2:]):
            return None
        f, rows = int(state[-2]), int(state[-1])
        return (f, rows) if len(state) == self._core(f) + rows * f + 2 else None

    def restore(self, slot: int, state: list[float]) -> None:
        """Load what :meth:`export` produced (states from older versions, without the per-slot probation
        and the steps since the last red one, keep the defaults). A likelihood with a spatial check that has
        not stepped yet (a restarted worker restores a device before its first reading) takes its feature
        count from the state. The inputs waiting to join a lagged range come back into the ring; saved
        with another lag (or restored into a plain range) they join the range at once."""
        ring = self._ring_layout(state)
        waiting = np.zeros((0, 0))
        if ring is not None:
            f, rows = ring
            core = self._core(f)
            waiting = np.asarray(state[core:-2], np.float64).reshape(rows, f)
            state = state[:core]
        else:
            f, odd = divmod(len(state) - self._core(0), 2)
            if odd:
                f = 0
        if self.spatial_tolerance is not None and self.f == 0 and f > 0:
            self._features(f)
        f = self.f
        base = 6 + self.window + 2 * f
        if len(state) not in (base, base + 2, base + 3):
            return
        if len(state) >= base + 2:
            self.learn_n[slot], self.estimate_n[slot] = int(state[base]), int(state[base + 1])
        self.since[slot] = int(state[base + 2]) if len(state) == base + 3 else (0 if state[4] else _FAR)
        self.n[slot], self.count[slot] = int(state[0]), int(state[1])
        self.mean[slot], self.var[slot] = state[2], state[3]
        self.prev_red[slot], self.avg[slot] = bool(state[4]), state[5]
        self.buf[slot] = state[6 : 6 + self.window]
        self.lo[slot] = state[6 + self.window : 6 + self.window + f]
        self.hi[slot] = state[6 + self.window + f : base]
        self.recent[slot] = np.nan
        if self.spatial_lag and len(waiting) == self.spatial_lag:
            self.recent[slot] = waiting
        elif np.isfinite(waiting).any():
            self.lo[slot] = np.fmin(self.lo[slot], np.nanmin(waiting, axis=0))
            self.hi[slot] = np.fmax(self.hi[slot], np.nanmax(waiting, axis=0))
