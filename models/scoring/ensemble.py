"""The likelihood threshold and its ensemble: the raw score and the members' scores, judged by anomaly
likelihoods, with one report per event."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from models.scoring.core import Units
from models.scoring.likelihood import AnomalyLikelihood
from models.scoring.members import ReferenceDeviation, SeasonalDeviation, SpreadDeviation, WeeklySeasonalDeviation
from models.scoring.recurrence import DailyRecurrence
from models.scoring.state import _Exports, _framed
from models.scoring.thresholds import Threshold


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

    def _restore_framed(self, slot: int, state: list[float]) -> list[float] | None:
        """Restore the framed likelihood, reference and seasonal parts of ``state`` (each preceded by its
        width, see :meth:`_export_members`); the rest of the state, or None where it is truncated."""
        rest = list(state)
        for part in (self.likelihood, self.reference, self.seasonal):
            if not rest or len(rest) < 1 + int(rest[0]):
                return None
            k = int(rest[0])
            if part is not None:
                part.restore(slot, rest[1 : 1 + k])
            rest = rest[1 + k :]
        return rest

    def _restore_members(self, slot: int, state: list[float]) -> None:
        if self.spread_likelihood is not None and self.spread is not None:
            rest = self._restore_framed(slot, state)
            if rest is None:
                return
            k = int(rest[0]) if rest else 0
            lik_len = 9 + self.spread_likelihood.window + 2 * self.spread_likelihood.lo.shape[1]  # (no spatial: 0)
            if k > 1 and (k - 1) % len(SpreadDeviation.ROWS) == 0 and len(rest) == 1 + k + lik_len:
                self.spread.restore(slot, rest[1 : 1 + k])
                self.spread_likelihood.restore(slot, rest[1 + k :])
            else:  # a state saved without the spread likelihood: the spread member alone (its likelihood starts afresh)
                self.spread.restore(slot, rest)
            return
        if self.spread is not None:
            rest = self._restore_framed(slot, state)
            if rest is not None:
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


def _likelihood(
    cfg: EnsembleConfig, suppress_steps: int, spatial_tolerance: float | None = None, spatial_lag: int = 0
) -> AnomalyLikelihood:
    """One of the ensemble's likelihoods: ``cfg``'s parameters with its own suppression span and spatial check."""
    return AnomalyLikelihood(
        window=cfg.window,
        estimation_steps=cfg.estimation_steps,
        history_steps=cfg.history_steps,
        min_std=cfg.min_std,
        cap=cfg.cap,
        suppress=cfg.suppress,
        suppress_steps=suppress_steps,
        spatial_tolerance=spatial_tolerance,
        learn_red=cfg.learn_red,
        scale=cfg.scale,
        spatial_lag=spatial_lag,
    )


def ensemble_threshold(cfg: EnsembleConfig = EnsembleConfig()) -> LikelihoodThreshold:
    smoothed = int(cfg.reference_span) if cfg.reference or cfg.seasonal else 0  # (the forecast error is not)
    suppress_steps = cfg.window + smoothed if cfg.suppress_steps is None else cfg.suppress_steps
    lag = suppress_steps if cfg.spatial_lag is None else cfg.spatial_lag
    lik = _likelihood(cfg, suppress_steps, cfg.spatial_tolerance, lag)
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
        spread_suppress = cfg.window + cfg.spread_span if cfg.suppress_steps is None else cfg.suppress_steps
        spread_lik = _likelihood(cfg, spread_suppress)  # no spatial check: its input is the spread, not a value
    recurrence = None
    if cfg.seasonal and cfg.daily_recurrence:
        recurrence = DailyRecurrence(
            per_day=cfg.seasonal_bins, cycle=cfg.seasonal_bins * (7 if cfg.weekly else 1), escalation=cfg.escalation
        )
    return LikelihoodThreshold(
        lik, cfg.flag_value, ref, seasonal, spread, spread_lik, cfg.shared_suppression, recurrence
    )
