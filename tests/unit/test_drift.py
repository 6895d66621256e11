"""Drift monitor: PSI against a per-group reference, rate-limited retrain requests."""

from __future__ import annotations

import numpy as np

from models.drift import DriftMonitor, psi


def test_psi_is_zero_for_identical_and_large_for_shifted_shares():
    a = np.full(10, 0.1)
    assert psi(a, a) == 0.0
    b = np.array([0.0] * 5 + [0.2] * 5)
    assert psi(a, b) > 1.0


def test_stable_errors_never_request_and_a_shift_requests_exactly_once_per_interval():
    now = [0.0]
    mon = DriftMonitor(reference=1000, window=500, check_every=100, bound=0.25, min_interval_s=60, clock=lambda: now[0])
    rng = np.random.default_rng(0)
    requests = []
    for _ in range(60):  # 6,000 stable errors: no request
        r = mon.update("pumps", np.abs(rng.normal(0, 1, 100)))
        assert r is None
    for _ in range(30):  # the error distribution doubles in scale
        now[0] += 1
        if (r := mon.update("pumps", np.abs(rng.normal(0, 2, 100)))) is not None:
            requests.append(r)
    assert len(requests) == 1 and requests[0] > 0.25  # rate-limited to one within the interval
    now[0] += 61
    assert mon.update("pumps", np.abs(rng.normal(0, 2, 500))) is not None  # the next interval may ask again


def test_groups_are_independent_and_reset_forgets_the_reference():
    mon = DriftMonitor(reference=200, window=100, check_every=50, bound=0.25, min_interval_s=0)
    rng = np.random.default_rng(1)
    mon.update("a", np.abs(rng.normal(0, 1, 400)))
    mon.update("b", np.abs(rng.normal(0, 1, 400)))
    assert mon.update("a", np.abs(rng.normal(0, 5, 100))) is not None
    assert mon.update("b", np.abs(rng.normal(0, 1, 100))) is None
    mon.reset()
    assert mon.update("a", np.abs(rng.normal(0, 5, 150))) is None  # collecting a new reference
