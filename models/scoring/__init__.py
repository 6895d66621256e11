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

Modules, in the order data flows through them: :mod:`~models.scoring.core` (errors to raw scores),
:mod:`~models.scoring.thresholds` (the interface, static and adaptive bounds),
:mod:`~models.scoring.likelihood` (the anomaly likelihood), :mod:`~models.scoring.members` and
:mod:`~models.scoring.recurrence` (what the ensemble judges besides the forecast error),
:mod:`~models.scoring.ensemble` (the likelihood threshold that combines them),
:mod:`~models.scoring.calibrated` (SKAB's per-device calibration), :mod:`~models.scoring.methods` (by name),
and :mod:`~models.scoring.state` (how each part's per-device state is exported and restored).
The names below are the public interface; import them from here.
"""

from models.scoring.calibrated import CalibratedThreshold, slow_features
from models.scoring.core import EPS, ErrorStats, ScoreBatch, ScoringConfig, Status, Units, score_errors, update_stats
from models.scoring.ensemble import EnsembleConfig, LikelihoodThreshold, ensemble_threshold
from models.scoring.likelihood import AnomalyLikelihood, erfc, log10_tail, log_likelihood, tail_probability, tail_score
from models.scoring.members import (
    LEVEL_SCALE_FLOOR,
    ReferenceDeviation,
    SeasonalDeviation,
    SpreadDeviation,
    WeeklySeasonalDeviation,
    seasonal_bin,
)
from models.scoring.methods import make_threshold
from models.scoring.recurrence import DailyRecurrence
from models.scoring.thresholds import AdaptiveThreshold, StaticThreshold, Threshold

__all__ = [
    "EPS",
    "LEVEL_SCALE_FLOOR",
    "AdaptiveThreshold",
    "AnomalyLikelihood",
    "CalibratedThreshold",
    "DailyRecurrence",
    "EnsembleConfig",
    "ErrorStats",
    "LikelihoodThreshold",
    "ReferenceDeviation",
    "ScoreBatch",
    "ScoringConfig",
    "SeasonalDeviation",
    "SpreadDeviation",
    "StaticThreshold",
    "Status",
    "Threshold",
    "Units",
    "WeeklySeasonalDeviation",
    "ensemble_threshold",
    "erfc",
    "log10_tail",
    "log_likelihood",
    "make_threshold",
    "score_errors",
    "seasonal_bin",
    "slow_features",
    "tail_probability",
    "tail_score",
    "update_stats",
]
