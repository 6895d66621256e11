"""The thresholding methods selectable by configuration (``IOTAD_THRESHOLD_METHOD``)."""

from __future__ import annotations

from models.scoring.ensemble import EnsembleConfig, LikelihoodThreshold, ensemble_threshold
from models.scoring.likelihood import AnomalyLikelihood
from models.scoring.thresholds import AdaptiveThreshold, StaticThreshold, Threshold


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
