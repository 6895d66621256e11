"""EnsembleConfig -> ensemble_threshold: how long an event's repeats are suppressed."""

from __future__ import annotations

import numpy as np

from models.scoring import AnomalyLikelihood, EnsembleConfig, ensemble_threshold


def test_an_event_is_suppressed_while_the_moving_average_still_holds_its_inputs():
    thr = ensemble_threshold(EnsembleConfig())
    assert thr.spread_likelihood is not None
    # window (10) + the span of the members' smoothing: reference/seasonal EWMA 10, spread 30
    assert (thr.likelihood.suppress_steps, thr.spread_likelihood.suppress_steps) == (20, 40)
    bare = ensemble_threshold(EnsembleConfig(reference=False, seasonal=False, spread=False))
    assert bare.likelihood.suppress_steps == 10  # the forecast error alone is not smoothed
    fixed = ensemble_threshold(EnsembleConfig(suppress_steps=7))
    assert fixed.spread_likelihood is not None
    assert (fixed.likelihood.suppress_steps, fixed.spread_likelihood.suppress_steps) == (7, 7)


def test_a_red_step_within_suppress_steps_of_the_last_event_is_a_repeat():
    lik = AnomalyLikelihood(estimation_steps=50, suppress_steps=20)
    lik.grow(1)
    one, seen, x = np.array([0]), np.array([True]), np.zeros((1, 1))
    rng = np.random.default_rng(4)
    for _ in range(200):
        lik.step(one, np.abs(rng.normal(size=1)), x, seen)
        lik.update(one, seen)
    scores = []
    for t in range(70):
        raw = np.array([40.0 if t in (0, 22, 57) else abs(rng.normal())])
        scores.append(lik.step(one, raw, x, seen)[0])
    assert scores[0] > 0.5  # news
    # 13 steps after the last red step (the average held the first spike until step 9): the same event,
    # where suppress_steps = window (10) made it news
    assert max(scores[1:57]) < 0.5
    assert scores[57] > 0.5  # 26 steps after the last red step (the average held the spike until 31): news
