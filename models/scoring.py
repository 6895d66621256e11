"""From forecast errors to anomaly scores and flags: pure, batched numpy.

For a batch of ``B`` device steps with ``F`` sensors, the error ``e = x - forecast`` (in the model's
normalised units) is normalised per device and per sensor by exponentially weighted running
statistics of that device's own past errors: ``z = (e - mean) / std``. The step's score is
``max_f |z_f|`` and the sensor holding the maximum is the top contributor. Scores are causal: the
statistics used at ``t`` were updated with errors up to ``t - 1`` only.

A device is ``warming_up`` until it has seen ``warmup_steps`` errors; it is never flagged while
warming up. Thresholding is its own class (:class:`Threshold`), which may refuse to learn from the
steps it flags. A threshold may also *transform* the raw score before comparing it (the anomaly
likelihood of :class:`LikelihoodThreshold` maps it into ``[0, 1]``); the transformed score is what the
detector reports.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike

EPS = 1e-6


class Status(StrEnum):
    WARMING_UP = "warming_up"
    OK = "ok"


@dataclass(frozen=True)
class ScoringConfig:
    warmup_steps: int = 30
    halflife_steps: float = 200.0
    learn_from_anomalies: bool = False
    burnin_steps: int = 5  # forecasts right after a reset are not learnt from (cold recurrent state)

    @property
    def alpha(self) -> float:
        return float(1.0 - 0.5 ** (1.0 / self.halflife_steps))


@dataclass
class ErrorStats:
    """Per-device, per-sensor running error statistics (rows are device slots)."""

    mean: np.ndarray  # (N, F) float64
    var: np.ndarray  # (N, F) float64
    count: np.ndarray  # (N,) int64: errors seen

    @classmethod
    def empty(cls, capacity: int, n_features: int) -> ErrorStats:
        return cls(np.zeros((capacity, n_features)), np.ones((capacity, n_features)), np.zeros(capacity, np.int64))

    def reset(self, slots: np.ndarray) -> None:
        self.mean[slots] = 0.0
        self.var[slots] = 1.0
        self.count[slots] = 0


@dataclass(frozen=True)
class ScoreBatch:
    score: np.ndarray  # (B,) float64
    top: np.ndarray  # (B,) int64: index of the top-contributing sensor
    z: np.ndarray  # (B, F)
    warm: np.ndarray  # (B,) bool: past warm-up


def score_errors(stats: ErrorStats, slots: np.ndarray, err: np.ndarray, warmup_steps: int) -> ScoreBatch:
    """Normalise errors ``(B, F)`` by the statistics of ``slots`` (no update)."""
    z = (err - stats.mean[slots]) / np.sqrt(stats.var[slots] + EPS)
    absz = np.abs(z)
    top = absz.argmax(axis=1)
    score = absz[np.arange(len(slots)), top]
    return ScoreBatch(score, top, z, stats.count[slots] >= warmup_steps)


def update_stats(stats: ErrorStats, slots: np.ndarray, err: np.ndarray, learn: np.ndarray, alpha: float) -> None:
    """EWMA update of ``slots`` with ``err`` where ``learn`` is true.

    While few errors have been seen the weight is ``1/(n+1)`` (a plain running mean), so the
    statistics converge within the warm-up instead of after several half-lives.
    """
    s = slots[learn]
    if len(s) == 0:
        return
    e = err[learn]
    n = stats.count[s].astype(np.float64)
    w = np.maximum(1.0 / (n + 1.0), alpha)[:, None]
    delta = e - stats.mean[s]
    mean = stats.mean[s] + w * delta
    # West's incremental weighted variance; the first error seeds a unit-free floor.
    var = np.where(n[:, None] == 0, np.maximum(delta**2, 1e-4), (1 - w) * (stats.var[s] + w * delta**2))
    stats.mean[s] = mean
    stats.var[s] = np.maximum(var, 1e-8)
    stats.count[s] += 1


@dataclass(frozen=True)
class Units:
    """How inputs map from one artifact's normalised units to another's, per feature: ``x_new = x_old *
    scale + shift`` (``scale = std_old / std_new``, ``shift = (mean_old - mean_new) / std_new``)."""

    scale: np.ndarray  # (F,)
    shift: np.ndarray  # (F,)

    @classmethod
    def between(cls, old_mean: ArrayLike, old_std: ArrayLike, new_mean: np.ndarray, new_std: np.ndarray) -> Units:
        """From inputs normalised by ``(old_mean, old_std)`` to inputs normalised by ``(new_mean, new_std)``."""
        old_mean, old_std = np.asarray(old_mean, np.float64), np.asarray(old_std, np.float64)
        return cls(old_std / new_std, (old_mean - new_mean) / new_std)

    def convert(self, kind: str, v: np.ndarray) -> np.ndarray:
        """``v`` ``(..., F)`` converted in place by its ``kind``: ``level`` (a value, smoothed or not),
        ``square`` (a squared spread), ``log`` (a log-spread: ``+ log scale``), ``diff`` (a difference of
        values: scaled, not shifted); anything else is unitless. In place because a fleet's profiles are
        hundreds of MB, whose temporaries cost more than the arithmetic."""
        if kind in ("level", "diff"):
            v *= self.scale
        if kind == "level":
            v += self.shift
        elif kind == "square":
            v *= self.scale**2
        elif kind == "log":
            v += np.log(self.scale)
        return v


def _width(parts: list[np.ndarray]) -> int:
    """Floats per slot in export ``parts`` (each ``(B,)`` or ``(B, ...)``)."""
    return sum(math.prod(p.shape[1:]) for p in parts)


def _framed(n: int, *groups: list[np.ndarray]) -> list[np.ndarray]:
    """Export parts of ``groups`` for ``n`` slots, each group preceded by its width (a column)."""
    return [x for g in groups for x in (np.full(n, _width(g)), *g)]


class _Exports:
    """A per-slot state exported for many slots at once: :meth:`export_parts` gives its per-slot arrays in
    order, :meth:`export_many` one float64 row per slot (the same layout for every slot, written in one
    pass), :meth:`export` one slot's row as the list :meth:`restore` reads."""

    def export_parts(self, slots: np.ndarray) -> list[np.ndarray]:
        return []

    def export_many(self, slots: np.ndarray) -> np.ndarray:
        parts = self.export_parts(slots)
        out = np.empty((len(slots), _width(parts)))
        o = 0
        for p in parts:
            k = math.prod(p.shape[1:])
            out[:, o : o + k] = p.reshape(len(slots), k)
            o += k
        return out

    def export(self, slot: int) -> list[float]:
        row: list[float] = self.export_many(np.array([slot], np.int64))[0].tolist()
        return row


class _Carried(_Exports):
    """Per-slot state that a model swap hands to the next detector (:meth:`transfer`) or keeps in place
    (:meth:`rescale`). ``ARRAYS`` names each per-slot array with its :meth:`Units.convert` kind: ``""`` for
    one without a feature axis, ``"free"`` for a unitless one with it."""

    ARRAYS: tuple[tuple[str, str], ...] = ()
    f = 0  # features; 0 until the member has seen an input

    def _features(self, f: int) -> None:
        """Size the feature axis (members with one override this)."""

    def transfer(self, src: Any, s: np.ndarray, d: np.ndarray, units: Units) -> None:
        """Rows ``s`` of ``src`` (a member of the same configuration) into rows ``d``, converted."""
        if src.f:
            self._features(src.f)
        for name, kind in self.ARRAYS:
            if kind and not src.f:
                continue  # a member that has seen no input has nothing on its feature axis
            getattr(self, name)[d] = units.convert(kind, getattr(src, name)[s])

    def rescale(self, units: Units) -> None:
        """Convert every slot's arrays to ``units``, in place."""
        if self.f:
            for name, kind in self.ARRAYS:
                units.convert(kind, getattr(self, name))


class Threshold(_Exports, abc.ABC):
    """Decides which scores are anomalous; may keep per-device state indexed by slot (exported per slot by
    :meth:`export_many`, none by default)."""

    name: str

    @abc.abstractmethod
    def values(self, slots: np.ndarray) -> np.ndarray:
        """Threshold in force for each slot ``(B,)`` before this step's update."""

    @abc.abstractmethod
    def update(self, slots: np.ndarray, scores: np.ndarray, learn: np.ndarray) -> None:
        """Learn from ``scores`` where ``learn`` is true."""

    def transform(
        self, slots: np.ndarray, scores: np.ndarray, x: np.ndarray, seen: np.ndarray, context: np.ndarray | None = None
    ) -> np.ndarray:
        """The score compared with :meth:`values` and reported, from the raw score ``(B,)``.

        Called once per step before :meth:`update`, with the step's normalised inputs ``x`` ``(B, F)`` and
        ``seen`` (rows with a raw score, i.e. a forecast and an observed reading). ``context`` ``(B,)`` int,
        if given, is each row's seasonal bin (e.g. its hour of day; -1 unknown), an input that is not
        scored itself (see :class:`SeasonalDeviation`). Identity by default; a stateful transform advances
        its per-slot state for the ``seen`` rows here.
        """
        return scores

    def context_of(self, ts_ms: np.ndarray) -> np.ndarray | None:
        """The ``context`` :meth:`transform` wants for steps stamped ``ts_ms`` (epoch ms); None: none."""
        return None

    def grow(self, capacity: int) -> None:
        """Make room for ``capacity`` slots."""

    def reset(self, slots: np.ndarray) -> None:
        """Forget what was learnt for ``slots``."""

    def restore(self, slot: int, state: list[float]) -> None:
        """Load what :meth:`export` produced."""

    def carries(self, src: Threshold) -> bool:
        """Whether this threshold takes over what ``src`` (of another model's detector) learnt. No by default:
        its state belongs to the model, and a swap re-warms it from history."""
        return False

    def transfer(self, src: Threshold, src_slots: np.ndarray, dst_slots: np.ndarray, units: Units) -> None:
        """Copy the state of ``src`` (:meth:`carries` it) for ``src_slots`` into ``dst_slots``, its inputs
        converted to this detector's normalised ``units``."""
        raise NotImplementedError

    def rescale(self, units: Units) -> None:
        """Convert every slot's state in place to ``units`` (a detector taking this threshold over)."""
        raise NotImplementedError


class StaticThreshold(Threshold):
    """A fixed bound on the normalised score (in error standard deviations)."""

    name = "static"

    def __init__(self, value: float) -> None:
        self.value = value

    def values(self, slots: np.ndarray) -> np.ndarray:
        return np.full(len(slots), self.value)

    def update(self, slots: np.ndarray, scores: np.ndarray, learn: np.ndarray) -> None:
        return None


class AdaptiveThreshold(Threshold):
    """Per-device threshold = ``margin`` x a streaming estimate of the ``quantile`` of its scores.

    The quantile is tracked by stochastic approximation (the Robbins-Monro update of the pinball loss),
    with a step proportional to the running mean score so it is scale-free; ``floor`` keeps a device
    with very regular errors from alerting on noise.
    """

    name = "adaptive"

    def __init__(self, quantile: float = 0.999, margin: float = 1.5, floor: float = 4.0, rate: float = 0.05):
        self.quantile, self.margin, self.floor, self.rate = quantile, margin, floor, rate
        self.q = np.zeros(0)
        self.scale = np.zeros(0)

    def grow(self, capacity: int) -> None:
        n = len(self.q)
        if capacity > n:
            self.q = np.concatenate([self.q, np.full(capacity - n, self.floor / self.margin)])
            self.scale = np.concatenate([self.scale, np.ones(capacity - n)])

    def reset(self, slots: np.ndarray) -> None:
        self.q[slots] = self.floor / self.margin
        self.scale[slots] = 1.0

    def values(self, slots: np.ndarray) -> np.ndarray:
        return np.maximum(self.margin * self.q[slots], self.floor)

    def update(self, slots: np.ndarray, scores: np.ndarray, learn: np.ndarray) -> None:
        s, x = slots[learn], scores[learn]
        self.scale[s] = 0.99 * self.scale[s] + 0.01 * x
        step = self.rate * self.scale[s]
        self.q[s] += step * np.where(x > self.q[s], self.quantile, self.quantile - 1.0)

    def export_parts(self, slots: np.ndarray) -> list[np.ndarray]:
        return [self.q[slots], self.scale[slots]]

    def restore(self, slot: int, state: list[float]) -> None:
        if len(state) == 2:
            self.q[slot], self.scale[slot] = state


_SQRT2 = math.sqrt(2.0)
_FAR = 1 << 40  # "no red step yet"
# The least scale a level member (reference, seasonal) divides by, in input units: below it a sensor was
# still, not quiet, and dividing by its near-zero spread would score its next move in millions.
LEVEL_SCALE_FLOOR = 0.1
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


class _Member(Protocol):
    """What :class:`LikelihoodThreshold` does with each of its optional members."""

    def grow(self, capacity: int) -> None: ...
    def reset(self, slots: np.ndarray) -> None: ...
    def transfer(self, src: Any, s: np.ndarray, d: np.ndarray, units: Units) -> None: ...
    def rescale(self, units: Units) -> None: ...


class LikelihoodThreshold(Threshold):
    """Adaptive and unsupervised: the raw score becomes the anomaly likelihood of :class:`AnomalyLikelihood`
    (log-scaled, in ``[0, 1]``), and a step is flagged when that exceeds ``value`` (0.5 = tail 1e-5).

    The raw score may first be put in an ensemble (max) with a :class:`ReferenceDeviation` of the inputs
    (``reference``), a :class:`SeasonalDeviation` (``seasonal``, which needs the step's ``context``) and a
    :class:`SpreadDeviation` (``spread``, a change of the noise level). With ``spread_likelihood`` the
    spread member is not in that max: its score has its own :class:`AnomalyLikelihood` (fed once the
    spread's reference is set) and the reported score is the larger of the two likelihoods; with
    ``shared_suppression`` the two share their "steps since the last red/spatial step" state, so an
    event reported by one is not reported again by the other within ``suppress_steps``. With
    ``recurrence`` (a :class:`DailyRecurrence`, which needs the step's ``context``), an event (a red or
    spatial step of either likelihood) at a time of day that held one on most of the previous days is the
    series' daily pattern (a daily job's spike), not news: it reports as a repeat, unless it is a spatial
    hit (a value beyond the whole range seen so far is news whenever it comes). With the recurrence's
    ``escalation``, an event no stronger than a report of the last 24 hours is a repeat too (the same
    episode), unless it is a spatial hit. The detector reports
    the likelihood as the step's score. Flagged steps are not learnt by the likelihood distribution (nor
    by the ensemble's levels) unless the scoring config lets anomalies be learnt.
    """

    name = "likelihood"

    def __init__(
        self,
        likelihood: AnomalyLikelihood | None = None,
        value: float = 0.5,
        reference: ReferenceDeviation | None = None,
        seasonal: SeasonalDeviation | WeeklySeasonalDeviation | None = None,
        spread: SpreadDeviation | None = None,
        spread_likelihood: AnomalyLikelihood | None = None,
        shared_suppression: bool = False,
        recurrence: DailyRecurrence | None = None,
    ) -> None:
        self.likelihood = likelihood or AnomalyLikelihood()
        self.value = value
        self.reference = reference  # optional ensemble: raw = max(raw, reference deviation of the inputs)
        self.seasonal = seasonal  # optional ensemble: raw = max(raw, seasonal deviation of the inputs)
        self.spread = spread  # optional ensemble: raw = max(raw, change of the inputs' noise level)
        # optional: the spread member judged by its own likelihood (its own distribution of averages, fed
        # only once the spread is ready); the reported score is then the max of the two likelihoods.
        if spread_likelihood is not None and spread is None:
            raise ValueError("spread_likelihood needs a spread member")
        self.spread_likelihood = spread_likelihood
        self.shared_suppression = shared_suppression
        self.recurrence = recurrence  # optional: events that recur at the same time every day report as repeats
        self._spread_rows = np.zeros(0, bool)  # rows the spread likelihood saw this step (transform -> update)

    def context_of(self, ts_ms: np.ndarray) -> np.ndarray | None:
        return None if self.seasonal is None else self.seasonal.context_of(ts_ms)

    def grow(self, capacity: int) -> None:
        self.likelihood.grow(capacity)
        for member in self._members():
            if member is not None:
                member.grow(capacity)

    def reset(self, slots: np.ndarray) -> None:
        self.likelihood.reset(slots)
        for member in self._members():
            if member is not None:
                member.reset(slots)

    def values(self, slots: np.ndarray) -> np.ndarray:
        return np.full(len(slots), self.value)

    def transform(
        self, slots: np.ndarray, scores: np.ndarray, x: np.ndarray, seen: np.ndarray, context: np.ndarray | None = None
    ) -> np.ndarray:
        scores = np.nan_to_num(np.asarray(scores, np.float64), nan=0.0)
        bins = np.full(len(slots), -1, np.int64) if context is None else np.asarray(context, np.int64)
        if self.reference is not None:
            scores = np.maximum(scores, self.reference.step(slots, x, seen))
        if self.seasonal is not None:
            scores = np.maximum(scores, self.seasonal.step(slots, x, seen, bins))
        spread = None if self.spread is None else self.spread.step(slots, x, seen)
        if spread is not None and self.spread_likelihood is None:
            scores = np.maximum(scores, spread)
        out = self.likelihood.step(slots, scores, x, seen)
        if spread is not None and self.spread is not None and self.spread_likelihood is not None:
            self._spread_rows = seen & self.spread.ready(slots)
            out = np.maximum(out, self.spread_likelihood.step(slots, spread, x, self._spread_rows))
            if self.shared_suppression:  # one event, one report: either likelihood's red mutes both's repeats
                s = slots[self._spread_rows]  # (rows both likelihoods saw this step)
                since = np.minimum(self.likelihood.since[s], self.spread_likelihood.since[s])
                self.likelihood.since[s] = since
                self.spread_likelihood.since[s] = since
        if self.recurrence is not None:
            event = self.likelihood.since[slots] == 0  # a red or spatial step now (see AnomalyLikelihood.step)
            if self.spread_likelihood is not None and len(self._spread_rows) == len(slots):
                event |= self._spread_rows & (self.spread_likelihood.since[slots] == 0)
            recurs = self.recurrence.step(slots, bins, seen, seen & event)
            # a value beyond the whole range seen so far is news whenever it comes: the earlier days'
            # events were within that range
            recurs &= ~self.likelihood.spatial_hit
            repeat = self.likelihood.repeat_score
            out = np.where(recurs, np.minimum(out, repeat), out)
            if self.recurrence.escalation:
                # within a day of a report, an event no stronger than it is the same episode (a second wave
                # of a burst), not news. A spatial hit always is, and sets no peak: its 1 comes from the
                # range rule, not from the tail of the average, so it does not measure the episode's size
                news = seen & event & (out > repeat) & ~self.likelihood.spatial_hit
                weaker = self.recurrence.weaker(slots, news, out)
                out = np.where(weaker, np.minimum(out, repeat), out)
                self.recurrence.report(slots, news & ~weaker, out)
        return out

    def update(self, slots: np.ndarray, scores: np.ndarray, learn: np.ndarray) -> None:
        self.likelihood.update(slots, learn)
        if self.spread_likelihood is not None and len(self._spread_rows) == len(slots):
            self.spread_likelihood.update(slots, learn & self._spread_rows)
        for member in (self.reference, self.seasonal, self.spread):
            if member is not None:
                member.update(slots, learn)

    def _members(self) -> tuple[_Member | None, ...]:
        return (self.reference, self.seasonal, self.spread, self.spread_likelihood, self.recurrence)

    def carries(self, src: Threshold) -> bool:
        """What the ensemble learnt is the device's, not the model's (its distribution, probation, range,
        levels, profiles and recurrence memory): taken over from an ensemble of the same members, likelihood
        window and spatial lag."""
        return (
            isinstance(src, LikelihoodThreshold)
            and src.likelihood.window == self.likelihood.window
            and src.likelihood.spatial_lag == self.likelihood.spatial_lag
            and all(type(a) is type(b) for a, b in zip(src._members(), self._members(), strict=True))
        )

    def transfer(self, src: Threshold, src_slots: np.ndarray, dst_slots: np.ndarray, units: Units) -> None:
        assert isinstance(src, LikelihoodThreshold) and self.carries(src)
        self.likelihood.transfer(src.likelihood, src_slots, dst_slots, units)
        for mine, theirs in zip(self._members(), src._members(), strict=True):
            if mine is not None:
                mine.transfer(theirs, src_slots, dst_slots, units)

    def rescale(self, units: Units) -> None:
        self.likelihood.rescale(units)
        for member in self._members():
            if member is not None:
                member.rescale(units)

    def export_parts(self, slots: np.ndarray) -> list[np.ndarray]:
        state = self._export_members(slots)
        if self.recurrence is None:
            return state
        return [*_framed(len(slots), state), *self.recurrence.export_parts(slots)]

    def restore(self, slot: int, state: list[float]) -> None:
        if self.recurrence is not None:
            k = int(state[0]) if state else -1
            if len(state) - 1 - k in self.recurrence.state_sizes:
                self.recurrence.restore(slot, state[1 + k :])
                state = state[1 : 1 + k]
            # else: a state saved without the recurrence member, whose memory of events starts afresh
        self._restore_members(slot, state)

    def _export_members(self, slots: np.ndarray) -> list[np.ndarray]:
        n, own = len(slots), self.likelihood.export_parts(slots)

        def part(m: _Exports | None) -> list[np.ndarray]:
            return [] if m is None else m.export_parts(slots)

        if self.spread_likelihood is not None:  # [n, own.., n, ref.., n, seasonal.., n, spread.., spread lik..]
            members = (part(self.reference), part(self.seasonal), part(self.spread))
            return [*_framed(n, own, *members), *self.spread_likelihood.export_parts(slots)]
        if self.spread is not None:  # every part with its length: [n, own.., n, ref.., n, seasonal.., spread..]
            return [*_framed(n, own, part(self.reference), part(self.seasonal)), *part(self.spread)]
        if self.reference is None and self.seasonal is None:
            return own
        if self.seasonal is None:  # [n, own.., ref..]
            return [*_framed(n, own), *part(self.reference)]
        return [*_framed(n, own, part(self.reference)), *part(self.seasonal)]  # [n, own.., n, ref.., seasonal..]

    def _restore_members(self, slot: int, state: list[float]) -> None:
        if self.spread_likelihood is not None and self.spread is not None:
            rest = list(state)
            for part in (self.likelihood, self.reference, self.seasonal):
                if not rest or len(rest) < 1 + int(rest[0]):
                    return
                k = int(rest[0])
                if part is not None:
                    part.restore(slot, rest[1 : 1 + k])
                rest = rest[1 + k :]
            k = int(rest[0]) if rest else 0
            lik_len = 9 + self.spread_likelihood.window + 2 * self.spread_likelihood.lo.shape[1]  # (no spatial: 0)
            if k > 1 and (k - 1) % len(SpreadDeviation.ROWS) == 0 and len(rest) == 1 + k + lik_len:
                self.spread.restore(slot, rest[1 : 1 + k])
                self.spread_likelihood.restore(slot, rest[1 + k :])
            else:  # a state saved without the spread likelihood: the spread member alone (its likelihood starts afresh)
                self.spread.restore(slot, rest)
            return
        if self.spread is not None:
            rest = list(state)
            for member in (self.likelihood, self.reference, self.seasonal):
                if not rest or len(rest) < 1 + int(rest[0]):
                    return
                k = int(rest[0])
                if member is not None:
                    member.restore(slot, rest[1 : 1 + k])
                rest = rest[1 + k :]
            self.spread.restore(slot, rest)
            return
        if self.reference is None and self.seasonal is None:
            self.likelihood.restore(slot, state)
            return
        if not state:
            return
        k = int(state[0])
        self.likelihood.restore(slot, state[1 : 1 + k])
        rest = state[1 + k :]
        if self.seasonal is None:
            if self.reference is not None:
                self.reference.restore(slot, rest)
            return
        if not rest:
            return
        r = int(rest[0])
        if self.reference is not None:
            self.reference.restore(slot, rest[1 : 1 + r])
        self.seasonal.restore(slot, rest[1 + r :])


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


class DailyRecurrence(_Carried):
    """Per-slot memory of *when* events happened, to tell a new event from one that recurs at the same time
    every day (a daily job's spike), batched and causal.

    A max-ensemble cannot learn such a spike away: each occurrence is flagged, so no member learns it, and
    it is reported day after day. The clock is each step's context bin, the hour of the day or of the week
    as the seasonal members get it (``cycle`` bins, ``per_day`` of them a day): the hours elapsed since a
    slot's previous step are the difference of their bins modulo the cycle (a gap of a whole cycle is not
    seen), and a step with an unknown bin (-1) neither moves the clock nor records. Per slot, a ring of
    ``(lookback + 1) x per_day`` flags records the hours that held an event. An event *recurs* when at least
    ``days`` of the ``lookback`` previous days held one within ``tolerance`` hours of the same time (a daily
    job's start jitters, and an hour boundary can fall inside the jitter). One coincidence a day earlier is
    not yet a pattern, hence 2 days; and once a daily spike is no longer reported its members learn it, so
    on some days it falls just short of the red level: 2 of the last 3 days keep the pattern through such a
    day. Memory: ``(lookback + 1) x per_day`` flags and 2 ints per slot.

    With ``escalation`` the same clock also keeps, per hour of the ring, the largest score *reported* in it
    (:meth:`report`), and :meth:`weaker` tells the events no stronger than a report of the last ``per_day``
    hours (``(lookback + 1) x per_day`` floats more per slot, exported after the flags).
    """

    ARRAYS = (("clock", ""), ("prev", ""), ("ring", ""), ("peak", ""))  # hours and scores: no input units

    def __init__(
        self,
        *,
        per_day: int = 24,
        cycle: int = 168,
        days: int = 2,
        lookback: int = 3,
        tolerance: int = 1,
        escalation: bool = False,
    ) -> None:
        if (
            per_day < 1
            or cycle < per_day
            or cycle % per_day
            or not 1 <= days <= lookback
            or not 0 <= tolerance < per_day
        ):
            raise ValueError(
                "per_day >= 1, cycle a multiple of per_day, 1 <= days <= lookback, 0 <= tolerance < per_day"
            )
        self.per_day, self.cycle, self.tolerance = per_day, cycle, tolerance
        self.days, self.lookback = days, lookback
        # ring length: the oldest hour looked at is lookback x per_day + tolerance ago
        self.hours = (lookback + 1) * per_day
        self.clock = np.zeros(0, np.int64)  # hours since the slot's first known bin
        self.prev = np.zeros(0, np.int64)  # the slot's last known bin (-1: none yet)
        self.ring = np.zeros((0, self.hours), bool)  # ring[s, h % hours]: hour h of slot s held an event
        self.escalation = escalation
        self.peak = np.zeros((0, self.hours))  # peak[s, h % hours]: the largest score reported in hour h (0: none)
        self.stepped = np.zeros(0, bool)  # the rows of the last step that moved the clock (known bin)

    @property
    def capacity(self) -> int:
        return len(self.clock)

    @property
    def state_size(self) -> int:
        """Length of :meth:`export`'s state."""
        return self.state_sizes[self.escalation]

    @property
    def state_sizes(self) -> tuple[int, int]:
        """Lengths :meth:`restore` accepts: a state saved without and with the report peaks."""
        return (2 + self.hours, 2 + 2 * self.hours)

    def grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        if extra <= 0:
            return
        self.clock = np.concatenate([self.clock, np.zeros(extra, np.int64)])
        self.prev = np.concatenate([self.prev, np.full(extra, -1, np.int64)])
        self.ring = np.concatenate([self.ring, np.zeros((extra, self.hours), bool)])
        self.peak = np.concatenate([self.peak, np.zeros((extra, self.hours))])

    def reset(self, slots: np.ndarray) -> None:
        self.clock[slots] = 0
        self.prev[slots] = -1
        self.ring[slots] = False
        self.peak[slots] = 0.0

    def step(self, slots: np.ndarray, bins: np.ndarray, seen: np.ndarray, event: np.ndarray) -> np.ndarray:
        """Move the clocks of the ``seen`` rows with a known bin to it and record their ``event`` ``(B,)``;
        returns the rows whose event recurs ``(B,)`` (judged on the previous days only)."""
        b = np.asarray(bins, np.int64)
        rows = seen & (b >= 0) & (b < self.cycle)
        s, bs = slots[rows], b[rows]
        prev = self.prev[s]
        elapsed = np.where(prev >= 0, (bs - prev) % self.cycle, 0)
        # the hours passed since the previous step held no event (their flags are from a ring ago); only
        # the rows whose hour changed have any (most steps of a fleet stay within their hour)
        moved = elapsed > 0
        if moved.any():
            sm, em = s[moved], elapsed[moved]
            ahead = np.arange(1, min(int(em.max()), self.hours) + 1)
            passed = (self.clock[sm][:, None] + ahead) % self.hours
            kept = ahead[None, :] > em[:, None]
            self.ring[sm[:, None], passed] &= kept
            self.peak[sm[:, None], passed] *= kept
        self.stepped = rows
        clock = self.clock[s] + elapsed
        self.clock[s], self.prev[s] = clock, bs
        near = np.arange(-self.tolerance, self.tolerance + 1)
        held = np.zeros(len(s), np.int64)  # previous days with an event at this time
        for day in range(1, self.lookback + 1):
            hours = (clock[:, None] - day * self.per_day + near) % self.hours
            held += self.ring[s[:, None], hours].any(axis=1)
        recurs = held >= self.days
        ev = np.asarray(event, bool)[rows]
        self.ring[s[ev], clock[ev] % self.hours] = True
        out = np.zeros(len(slots), bool)
        out[rows] = recurs & ev
        return out

    def weaker(self, slots: np.ndarray, rows: np.ndarray, score: np.ndarray) -> np.ndarray:
        """Of ``rows`` ``(B,)`` (call after :meth:`step`), those whose ``score`` is no larger than a report
        of the last ``per_day`` hours, this one included (only rows whose step moved the clock)."""
        r, s = self._moved(slots, rows)
        back = (self.clock[s][:, None] - np.arange(self.per_day)[None, :]) % self.hours
        out = np.zeros(len(slots), bool)
        out[r] = np.asarray(score, np.float64)[r] <= self.peak[s[:, None], back].max(axis=1)
        return out

    def report(self, slots: np.ndarray, rows: np.ndarray, score: np.ndarray) -> None:
        """Record the scores of ``rows`` ``(B,)`` as reported in the current hour (call after :meth:`step`)."""
        r, s = self._moved(slots, rows)
        h = self.clock[s] % self.hours
        self.peak[s, h] = np.maximum(self.peak[s, h], np.asarray(score, np.float64)[r])

    def _moved(self, slots: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The mask of ``rows`` whose last step moved the clock, and their slots."""
        r = np.asarray(rows, bool) & self.stepped
        return r, slots[r]

    def export_parts(self, slots: np.ndarray) -> list[np.ndarray]:
        s = slots
        return [self.clock[s], self.prev[s], self.ring[s], *((self.peak[s],) if self.escalation else ())]

    def restore(self, slot: int, state: list[float]) -> None:
        """Load what :meth:`export` produced; a state saved without the report peaks restores with none (and
        one saved with them into a recurrence without ``escalation`` ignores them)."""
        if len(state) not in self.state_sizes:
            return
        self.clock[slot], self.prev[slot] = int(state[0]), int(state[1])
        self.ring[slot] = np.asarray(state[2 : 2 + self.hours]) > 0.5
        rest = state[2 + self.hours :]
        self.peak[slot] = rest if self.escalation and len(rest) == self.hours else 0.0


def slow_features(train: np.ndarray, lag: int = 10, bound: float = 0.5) -> np.ndarray:
    """Which features of ``train`` ``(T, F)`` (a calibration period of one slot) are slow: their
    autocorrelation at ``lag`` steps exceeds ``bound`` (a level that carries its past, like a temperature;
    white-ish sensor noise is near 0). A constant feature is not slow."""
    x = np.asarray(train, np.float64)
    x = x - x.mean(axis=0)
    var = (x * x).sum(axis=0)
    cov = (x[:-lag] * x[lag:]).sum(axis=0) if len(x) > lag else np.zeros(x.shape[1])
    return (var > 0) & (cov > bound * var)


class CalibratedThreshold(Threshold):
    """Per-slot threshold set once from the slot's own calibration period, SKAB's convention for its
    baselines: ``margin`` x the ``quantile`` of the scores of the last ``calibration_steps`` steps of the
    calibration (the first ``skip_steps`` scored steps are left out); no flag before that.

    The score it compares is ``max(forecast_weight * raw, reference(x))``: the detector's forecast-error
    score, optionally in an ensemble with a :class:`ReferenceDeviation` of the inputs (``reference``).
    Flagged steps do not move the reference level unless the scoring config lets anomalies be learnt;
    with ``hold_features`` a flagged step holds the level only of the features whose own reference
    score is beyond the threshold, and the others keep following their input (a sensor that drifts
    normally, e.g. a temperature warming up, while another one is anomalous would otherwise be held for
    the whole anomaly and still be flagged long after it: a lock-in on a sensor that was never
    anomalous).

    With ``per_member``, every member of the ensemble -- the forecast-error score and each feature's
    reference score -- gets its own calibrated threshold (``margin`` x its own ``quantile``), and the
    score is the largest *ratio* of a member to its threshold, flagged above 1: a sensor that wanders
    widely in normal operation (a slow temperature) no longer sets the threshold of all the others,
    and is itself judged against its own wandering. ``hold_features`` then compares each feature with
    its own threshold. Memory: ``calibration_steps`` float32 per slot (x members with ``per_member``).

    **Slow features** (:meth:`set_slow`, with ``per_member`` and ``hold_features``): a feature the caller
    marks slow for a slot (a temperature, whose level integrates what happened before) is held while it
    is beyond its threshold only as long as a fast member -- the forecast error or a feature not marked
    slow -- is beyond its own too. A step flagged by slow features alone re-anchors their level at their
    current smoothed value (so it is flagged, once): the process is back within every fast member's
    bounds, and a lasting offset of a slow sensor is what it left behind, not an ongoing fault.
    """

    name = "calibrated"

    def __init__(
        self,
        *,
        skip_steps: int,
        calibration_steps: int,
        quantile: float = 0.99,
        margin: float = 1.5,
        reference: ReferenceDeviation | None = None,
        forecast_weight: float = 1.0,
        hold_features: bool = False,
        per_member: bool = False,
    ) -> None:
        if calibration_steps < 1 or skip_steps < 0 or not (0.0 < quantile <= 1.0):
            raise ValueError("calibration_steps >= 1, skip_steps >= 0, 0 < quantile <= 1")
        self.skip_steps, self.calibration_steps = skip_steps, calibration_steps
        self.quantile, self.margin = quantile, margin
        self.reference, self.forecast_weight = reference, forecast_weight
        self.hold_features = hold_features
        self.per_member = per_member
        self._flagged = np.zeros(0, bool)  # this step's flags (transform -> update of the same step)
        self._fast = np.zeros(0, bool)  # this step's rows with a fast member beyond its threshold
        self.n = np.zeros(0, np.int64)
        self.c = 0 if per_member else 1  # calibrated columns (per_member: 1 + features, once known)
        self.buf = np.zeros((0, calibration_steps, self.c), np.float32)
        self.col = np.zeros((0, self.c))  # per-column thresholds (per_member)
        self.slow = np.zeros((0, max(self.c - 1, 0)), bool)  # per-feature slow marks (per_member)
        self.value = np.zeros(0)

    def _columns(self, c: int) -> None:
        if c != self.c:
            self.c = c
            self.buf = np.zeros((len(self.n), self.calibration_steps, c), np.float32)
            self.col = np.full((len(self.n), c), np.inf)
            self.slow = np.zeros((len(self.n), max(c - 1, 0)), bool)

    def set_slow(self, slots: np.ndarray, slow: np.ndarray) -> None:
        """Mark the slow features ``(len(slots), F)`` of ``slots`` (call after the slot's reset; kept by
        export/restore). Needs ``per_member``, ``hold_features`` and a reference member."""
        if not (self.per_member and self.hold_features and self.reference is not None):
            raise ValueError("slow features need per_member, hold_features and a reference member")
        slow = np.asarray(slow, bool)
        self._columns(1 + slow.shape[1])
        self.slow[slots] = slow

    def grow(self, capacity: int) -> None:
        extra = capacity - len(self.n)
        if extra <= 0:
            return
        self.n = np.concatenate([self.n, np.zeros(extra, np.int64)])
        self.buf = np.concatenate([self.buf, np.zeros((extra, self.calibration_steps, self.c), np.float32)])
        self.col = np.concatenate([self.col, np.full((extra, self.c), np.inf)])
        self.slow = np.concatenate([self.slow, np.zeros((extra, self.slow.shape[1]), bool)])
        self.value = np.concatenate([self.value, np.full(extra, np.inf)])
        if self.reference is not None:
            self.reference.grow(capacity)

    def reset(self, slots: np.ndarray) -> None:
        self.n[slots] = 0
        self.value[slots] = np.inf
        self.col[slots] = np.inf
        self.slow[slots] = False
        if self.reference is not None:
            self.reference.reset(slots)

    def values(self, slots: np.ndarray) -> np.ndarray:
        return self.value[slots]

    def transform(
        self, slots: np.ndarray, scores: np.ndarray, x: np.ndarray, seen: np.ndarray, context: np.ndarray | None = None
    ) -> np.ndarray:
        raw = np.nan_to_num(np.asarray(scores, np.float64), nan=0.0) * self.forecast_weight
        if self.per_member:
            cols = raw[:, None]
            if self.reference is not None:
                self.reference.step(slots, x, seen)
                cols = np.column_stack([raw, self.reference.z])
            self._columns(cols.shape[1])
            col = self.col[slots]
            calibrated = np.isfinite(col).all(axis=1)
            ratios = cols / np.where(calibrated[:, None], np.maximum(col, 1e-12), 1.0)
            fast = np.column_stack([np.ones(len(slots), bool), ~self.slow[slots]])  # the forecast error is fast
            self._fast = calibrated & ((ratios > 1.0) & fast).any(axis=1)
            raw = np.where(calibrated, ratios.max(axis=1), cols.max(axis=1))  # the plain max until calibrated
        else:
            if self.reference is not None:
                raw = np.maximum(raw, self.reference.step(slots, x, seen))
            cols = raw[:, None]
        self._flagged = seen & (raw > self.value[slots])
        n = self.n[slots]
        k = n - self.skip_steps
        collect = seen & (k >= 0) & (k < self.calibration_steps)
        if collect.any():
            self.buf[slots[collect], k[collect]] = cols[collect]
        done = seen & (k == self.calibration_steps - 1)
        if done.any():
            d = slots[done]
            q = self.margin * np.quantile(self.buf[d].astype(np.float64), self.quantile, axis=1)  # (D, C)
            self.col[d] = q
            self.value[d] = 1.0 if self.per_member else q[:, 0]
        self.n[slots[seen]] += 1
        return raw

    def update(self, slots: np.ndarray, scores: np.ndarray, learn: np.ndarray) -> None:
        if self.reference is None:
            return
        if self.hold_features and len(self._flagged) == len(slots):
            # flagged rows: the features below the threshold (their own, with per_member) still learn
            bound = self.col[slots][:, 1:] if self.per_member else self.value[slots][:, None]
            quiet = self.reference.z <= bound
            self.reference.update(slots, learn[:, None] | (self._flagged[:, None] & quiet))
            if self.per_member and len(self._fast) == len(slots):
                # flagged by slow features alone: re-anchored where they are
                anchor = (self._flagged & ~self._fast)[:, None] & self.slow[slots] & ~quiet
                if anchor.any():
                    ref = self.reference
                    ref.level[slots] = np.where(anchor, ref.ema[slots], ref.level[slots])
        else:
            self.reference.update(slots, learn)

    def export_parts(self, slots: np.ndarray) -> list[np.ndarray]:
        s = slots
        head = [self.n[s], self.value[s]]
        if self.per_member:
            head += [np.full(len(s), self.c), self.col[s], self.slow[s]]
        tail = self.reference.export_parts(s) if self.reference is not None else []
        return [*head, self.buf[s], *tail]

    def restore(self, slot: int, state: list[float]) -> None:
        if self.per_member:
            if len(state) < 3:
                return
            c = int(state[2])
            if c < 1 or len(state) < 3 + c + (c - 1) + self.calibration_steps * c:
                return
            self._columns(c)
            self.col[slot] = state[3 : 3 + c]
            self.slow[slot] = np.asarray(state[3 + c : 2 + 2 * c]) > 0.5
            o = 2 + 2 * c
        else:
            o = 2
        m = self.calibration_steps * self.c
        if len(state) < o + m:
            return
        self.n[slot], self.value[slot] = int(state[0]), state[1]
        self.buf[slot] = np.asarray(state[o : o + m]).reshape(self.calibration_steps, self.c)
        if self.reference is not None:
            self.reference.restore(slot, state[o + m :])


@dataclass(frozen=True)
class EnsembleConfig:
    """The likelihood ensemble: the forecaster's error z together (max) with a reference deviation of the
    inputs and a seasonal (hour-of-day/-week) deviation, turned into an HTM-style anomaly likelihood, and
    a noise-level change with a likelihood of its own (the reported score: the larger of the two); events
    that recur at the same time every day report as repeats. ``IOTAD_THRESHOLD_METHOD=ensemble`` in the
    worker and ``iotad evaluate nab`` build it from here. The likelihood parameters follow Numenta's HTM
    detector (moving average of 10, Gaussian tail, red/yellow suppression, log scaling, 5 % spatial
    tolerance)."""

    window: int = 10
    estimation_steps: int = 100
    history_steps: int = 8640
    min_std: float = 0.05
    cap: float | None = None
    spatial_tolerance: float | None = 0.05
    # The spatial check's range is that of the inputs seen at least this many steps before (AnomalyLikelihood's
    # spatial_lag), so an excursion that creeps beyond it is compared with the range from before it began.
    # None: the likelihood's suppression span (below), the steps over which one event is one report.
    spatial_lag: int | None = None
    suppress: bool = True
    # Red (or spatial) steps within ``suppress_steps`` of the previous one are repeats of the same event,
    # reported as yellow. None: as long as the likelihood's moving average still holds the event's inputs:
    # ``window`` raw scores, each from members that smooth their inputs over their span (86 % of an EWMA's
    # weight lies within its span): window + reference_span for the likelihood of the forecast error,
    # reference and seasonal members, window + spread_span for the spread member's.
    suppress_steps: int | None = None
    learn_red: bool = True
    scale: str = "tail"
    flag_value: float = 0.5
    reference: bool = True  # ensemble with a ReferenceDeviation of the (prefix-normalised) value
    reference_span: float = 10.0
    reference_steps: int = 100
    reference_halflife: float = 200.0
    # Ensemble with a SeasonalDeviation: the value vs the file's own hour-of-day profile (the context bin
    # comes from the row's timestamp; it is an input, never scored itself).
    seasonal: bool = True
    seasonal_bins: int = 24
    # Hour-of-week profiles where a bin has been seen for 3 weeks, hour-of-day before (WeeklySeasonalDeviation).
    weekly: bool = True
    # Ensemble with a SpreadDeviation: a change of the noise level (log-spread of the increments, 30-step
    # EWMA, spikes clipped at 3x the spread) vs its prefix reference, which neither the level nor the
    # one-step error shows for long (a metric that starts to oscillate, usual spikes that stop).
    spread: bool = True
    spread_span: int = 30
    # The spread member judged by its own AnomalyLikelihood (its own distribution of averages, fed once the
    # spread's reference is set; no spatial check) and reported as the max of the two likelihoods, instead
    # of inside the raw max, where the other members' noise on the same series hides it.
    spread_likelihood: bool = True
    # With spread_likelihood: a red (or spatial) step of either likelihood within ``suppress_steps`` of the
    # previous one of either is a repeat of the same event (the noise level moves after a spike or a shift
    # the other members already reported).
    shared_suppression: bool = True
    # An event (a red or spatial step of either likelihood) at the time of day (+-1 hour) that held one on
    # 2 of the 3 previous days is the series' daily pattern (a daily job's spike), reported as a repeat
    # unless it is a spatial hit (DailyRecurrence, clocked by the seasonal context).
    daily_recurrence: bool = True
    # With daily_recurrence: within 24 hours (the same clock) of a report, an event whose score is no larger
    # than that report's is the same episode (a burst's second wave, the aftermath of a change), reported
    # as a repeat; a stronger one, or a spatial hit, is news. One episode, one report, as an on-call
    # alert is not re-raised at the same or a lower severity.
    escalation: bool = True


def ensemble_threshold(cfg: EnsembleConfig = EnsembleConfig()) -> LikelihoodThreshold:
    smoothed = int(cfg.reference_span) if cfg.reference or cfg.seasonal else 0  # (the forecast error is not)
    suppress_steps = cfg.window + smoothed if cfg.suppress_steps is None else cfg.suppress_steps
    lik = AnomalyLikelihood(
        window=cfg.window,
        estimation_steps=cfg.estimation_steps,
        history_steps=cfg.history_steps,
        min_std=cfg.min_std,
        cap=cfg.cap,
        suppress=cfg.suppress,
        suppress_steps=suppress_steps,
        spatial_tolerance=cfg.spatial_tolerance,
        learn_red=cfg.learn_red,
        scale=cfg.scale,
        spatial_lag=suppress_steps if cfg.spatial_lag is None else cfg.spatial_lag,
    )
    ref = (
        ReferenceDeviation(
            span=cfg.reference_span,
            skip_steps=20,
            reference_steps=cfg.reference_steps,
            halflife_steps=cfg.reference_halflife,
        )
        if cfg.reference
        else None
    )
    seasonal: SeasonalDeviation | WeeklySeasonalDeviation | None = None
    if cfg.seasonal and cfg.weekly:
        seasonal = WeeklySeasonalDeviation(per_day=cfg.seasonal_bins, span=cfg.reference_span)
    elif cfg.seasonal:
        seasonal = SeasonalDeviation(bins=cfg.seasonal_bins, span=cfg.reference_span)
    # warm-up 30 + reference 100 seen steps: set within the shortest NAB prefix (186 rows; seen from row 36)
    spread = SpreadDeviation(span=cfg.spread_span, skip_steps=30, reference_steps=100) if cfg.spread else None
    spread_lik = None
    if spread is not None and cfg.spread_likelihood:
        spread_lik = AnomalyLikelihood(
            window=cfg.window,
            estimation_steps=cfg.estimation_steps,
            history_steps=cfg.history_steps,
            min_std=cfg.min_std,
            cap=cfg.cap,
            suppress=cfg.suppress,
            suppress_steps=cfg.window + cfg.spread_span if cfg.suppress_steps is None else cfg.suppress_steps,
            spatial_tolerance=None,
            learn_red=cfg.learn_red,
            scale=cfg.scale,
        )
    recurrence = None
    if cfg.seasonal and cfg.daily_recurrence:
        recurrence = DailyRecurrence(
            per_day=cfg.seasonal_bins, cycle=cfg.seasonal_bins * (7 if cfg.weekly else 1), escalation=cfg.escalation
        )
    return LikelihoodThreshold(
        lik, cfg.flag_value, ref, seasonal, spread, spread_lik, cfg.shared_suppression, recurrence
    )


def seasonal_bin(ts_s: np.ndarray, bins: int = 24, weekly: bool = True) -> np.ndarray:
    """The context bin of each UTC timestamp (seconds, int): its time of day in ``bins`` equal parts
    (24: the hour), or with ``weekly`` its time of the week in ``7 x bins`` parts (0: Monday's first)."""
    t = np.asarray(ts_s, np.int64)
    day = (t % 86400) * bins // 86400
    if not weekly:
        return day
    weekday = (t // 86400 + 3) % 7  # 1970-01-01 was a Thursday
    return weekday * bins + day


def make_threshold(method: str, *, value: float, quantile: float, margin: float, likelihood: float = 0.5) -> Threshold:
    """``static`` (``value``), ``adaptive`` (floor ``0.75 * value``), ``likelihood`` (bound on the
    log-scaled anomaly likelihood, default 0.5, i.e. a tail probability of about 1e-5) or ``ensemble``
    (:class:`EnsembleConfig`'s likelihood ensemble with that bound; it uses each step's hour-of-week)."""
    if method == "static":
        return StaticThreshold(value)
    if method == "adaptive":
        return AdaptiveThreshold(quantile=quantile, margin=margin, floor=value * 0.75)
    if method == "likelihood":
        return LikelihoodThreshold(AnomalyLikelihood(), likelihood)
    if method == "ensemble":
        return ensemble_threshold(EnsembleConfig(flag_value=likelihood))
    raise ValueError(f"unknown threshold method {method!r} (static, adaptive, likelihood, ensemble)")
