"""Events that recur at the same time of day: the daily pattern a series has, reported as repeats."""

from __future__ import annotations

import numpy as np

from models.scoring.state import _Carried


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
