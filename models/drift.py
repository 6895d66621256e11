"""Drift of the forecast-error distribution per device group, by the population stability index.

The first ``reference`` errors a group produces under the current model become its reference
distribution (binned at the reference's own quantiles). Afterwards, every ``check_every`` errors the
most recent ``window`` errors are compared with it:

    PSI = sum_b (p_b - q_b) * ln(p_b / q_b)

with ``q`` the reference and ``p`` the recent shares per bin. PSI above ``bound`` (0.25 is the usual
"significant shift") raises a retrain request, at most once per ``min_interval_s`` per group. The
errors are the forecaster's own (``|x - forecast|`` in the model's normalised units): the per-device
score statistics adapt to drift by design, the model's raw error does not. A model swap calls
:meth:`DriftMonitor.reset`, since the reference belongs to a model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

EPS = 1e-4


def psi(reference: np.ndarray, recent: np.ndarray) -> float:
    """Population stability index of two share vectors over the same bins."""
    q = np.clip(reference, EPS, None)
    p = np.clip(recent, EPS, None)
    return float(np.sum((p - q) * np.log(p / q)))


@dataclass
class _Group:
    collecting: list[float] = field(default_factory=list)
    edges: np.ndarray | None = None
    reference: np.ndarray | None = None
    ring: np.ndarray | None = None
    filled: int = 0
    head: int = 0
    since_check: int = 0
    last_request: float = -float("inf")
    last_psi: float = 0.0


class DriftMonitor:
    def __init__(
        self,
        *,
        bins: int = 10,
        reference: int = 2000,
        window: int = 2000,
        check_every: int = 500,
        bound: float = 0.25,
        min_interval_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bins, self.reference_size, self.window = bins, reference, window
        self.check_every, self.bound, self.min_interval_s, self.clock = check_every, bound, min_interval_s, clock
        self.groups: dict[str, _Group] = {}

    def reset(self) -> None:
        """Forget all references (a new model was swapped in)."""
        self.groups.clear()

    def update(self, group: str, errors: np.ndarray) -> float | None:
        """Add a group's new errors; returns the PSI when it calls for a retrain (rate-limited)."""
        g = self.groups.setdefault(group, _Group())
        errors = np.asarray(errors, np.float64)
        errors = errors[np.isfinite(errors)]
        if g.edges is None:
            g.collecting.extend(errors.tolist())
            if len(g.collecting) < self.reference_size:
                return None
            ref = np.asarray(g.collecting[: self.reference_size])
            errors = np.asarray(g.collecting[self.reference_size :])
            g.collecting = []
            g.edges = np.unique(np.quantile(ref, np.linspace(0, 1, self.bins + 1)[1:-1]))
            g.reference = np.bincount(np.searchsorted(g.edges, ref), minlength=len(g.edges) + 1) / len(ref)
            g.ring = np.empty(self.window)
        assert g.ring is not None and g.reference is not None
        tail = errors[-self.window :]
        g.ring[(g.head + np.arange(len(tail))) % self.window] = tail
        g.head = (g.head + len(tail)) % self.window
        g.filled = min(self.window, g.filled + len(errors))
        g.since_check += len(errors)
        if g.filled < self.window or g.since_check < self.check_every:
            return None
        g.since_check = 0
        recent = np.bincount(np.searchsorted(g.edges, g.ring), minlength=len(g.edges) + 1) / self.window
        g.last_psi = psi(g.reference, recent)
        now = self.clock()
        if g.last_psi > self.bound and now - g.last_request >= self.min_interval_s:
            g.last_request = now
            return g.last_psi
        return None
