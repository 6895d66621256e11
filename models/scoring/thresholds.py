"""The threshold interface and the two simple methods: a static bound and an adaptive quantile."""

from __future__ import annotations

import abc

import numpy as np

from models.scoring.core import Units
from models.scoring.state import _Exports


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
