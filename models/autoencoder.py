"""A bidirectional LSTM autoencoder over windows: a *windowed, offline* scorer, never a streaming one.

The issue allows a bidirectional model only as a windowed scorer, and this module is one: the score of
row ``t`` is the reconstruction error of the window of the ``W`` rows ending at ``t`` (rows ``t - W + 1
.. t``), so it uses rows ``<= t`` only (causal, by trailing windows), but every row needs a whole window
run through both directions of the encoder (``W`` recurrent steps per row, not one carried step). There is
no state to carry from reading to reading, so the streaming :class:`~models.detector.Detector` cannot serve
it: its artifact says so (``"streaming": false`` in the metadata) and
:func:`~models.artifact.load_artifact`, the worker's loader, refuses it; :func:`load_autoencoder` loads it.

Shapes: ``T`` rows, ``F`` features, ``W`` rows per window, ``B`` windows, ``H`` hidden units, ``Z`` latent.

* Model: encoder ``nn.LSTM`` (bidirectional) over the window -> the last layer's final forward and
  backward states ``(B, 2H)`` -> linear -> latent ``(B, Z)`` -> dropout -> the latent repeated ``W``
  times through a decoder ``nn.LSTM`` -> linear -> reconstruction ``(B, W, F)``.
* ``centre="window"`` (the default): each window is reconstructed after subtracting its own per-feature
  mean, so the model learns the *shape* of a window (its movements and its noise) and not where its level
  sits. A lasting level shift then disturbs the score only while the step is inside the window (``W``
  rows), instead of for as long as the level stays off a reference. ``centre="none"`` reconstructs the
  normalised window as it is.
* Normalisation (a :class:`~models.artifact.Normaliser`, fitted on the training parts only): with
  ``centre="window"`` the scale of each feature is its RMS deviation from the window mean over the
  training windows, the unit of the quantity the model reconstructs; otherwise mean and std.
* Training (:func:`train_autoencoder`): each series is cut in time into a training part and a validation
  part (the last ``val_fraction``); windows lie wholly inside one part, so no validation row is trained
  on; windows holding a masked or non-finite row are left out. MSE loss, Adam, dropout, gradient-norm
  clipping, ReduceLROnPlateau and early stopping on the validation MSE with the best weights restored,
  through the loop :mod:`models.training` uses (:func:`~models.training.fit_epochs`). Seeded: forked
  torch RNG and a numpy ``Generator`` for the window order; on CPU the same seed gives the same weights.
* Scores (:func:`window_errors`): the mean absolute reconstruction error over the window's rows, per
  feature, of the window ending at each row (SKAB's Conv-AE residual); rows before the first full window
  are NaN. :func:`window_scores` averages it over the features.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from models.artifact import (
    FORMAT,
    WEIGHTS,
    ArtifactError,
    Normaliser,
    normaliser_of,
    read_metadata,
    verify_weights,
)
from models.training import OptimiserConfig, _prepare, fit_epochs, make_optimiser, save_trained

Centre = Literal["window", "none"]
SCORER_KIND = "windowed"


@dataclass(frozen=True)
class AutoencoderConfig:
    n_features: int
    window: int = 60
    hidden: int = 32
    latent: int = 16
    layers: int = 1
    dropout: float = 0.1
    centre: Centre = "window"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class BiLstmAutoencoder(nn.Module):
    """Window ``(B, W, F)`` -> reconstruction ``(B, W, F)`` of :meth:`target` (the window, centred on its
    own mean with ``centre="window"``)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        between = config.dropout if config.layers > 1 else 0.0
        self.encoder = nn.LSTM(
            config.n_features, config.hidden, config.layers, batch_first=True, bidirectional=True, dropout=between
        )
        self.to_latent = nn.Linear(2 * config.hidden, config.latent)
        self.dropout = nn.Dropout(config.dropout)
        self.decoder = nn.LSTM(config.latent, config.hidden, config.layers, batch_first=True, dropout=between)
        self.head = nn.Linear(config.hidden, config.n_features)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """What the model reconstructs from window ``x``."""
        return x - x.mean(dim=1, keepdim=True) if self.config.centre == "window" else x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent ``(B, Z)`` of windows ``x`` ``(B, W, F)``."""
        _, (h, _) = self.encoder(self.target(x))
        return self.to_latent(torch.cat([h[-2], h[-1]], dim=1))  # last layer: forward, backward direction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latent = self.dropout(self.encode(x))
        out, _ = self.decoder(latent.unsqueeze(1).expand(-1, x.shape[1], -1))
        return self.head(out)


@dataclass(frozen=True, kw_only=True)
class AutoencoderTrainConfig(OptimiserConfig):
    """Hyper-parameters of one autoencoder run (the model's, then the optimisation fields of
    :class:`~models.training.OptimiserConfig`); stored in the artifact's metadata. Batches are of windows,
    shuffled."""

    window: int = 60
    hidden: int = 32
    latent: int = 16
    layers: int = 1
    dropout: float = 0.1
    centre: Centre = "window"
    batch_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("window", "hidden", "latent", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.centre not in ("window", "none"):
            raise ValueError(f"centre must be 'window' or 'none', not {self.centre!r}")

    def model_config(self, n_features: int) -> AutoencoderConfig:
        return AutoencoderConfig(
            n_features, self.window, self.hidden, self.latent, self.layers, self.dropout, self.centre
        )


@dataclass
class AutoencoderResult:
    """What :func:`train_autoencoder` returns; the same shape as :class:`~models.training.TrainResult`, so
    :func:`~models.training.save_trained` writes it. ``metrics``: ``train_mse``, ``val_mse`` (normalised
    units, best weights, eval mode), ``train_windows``, ``val_windows``, ``epochs``, ``best_epoch``,
    ``stopped_early``, ``seconds``."""

    model: BiLstmAutoencoder
    normaliser: Normaliser
    features: tuple[str, ...]
    config: AutoencoderTrainConfig
    history: list[dict[str, float]]
    metrics: dict[str, float]
    split: dict[str, Any] = field(default_factory=dict)


def window_starts(length: int, window: int, excluded: np.ndarray | None = None) -> np.ndarray:
    """Start rows of the windows of ``window`` rows inside ``length`` rows, without an excluded row."""
    n = length - window + 1
    if n <= 0:
        return np.zeros(0, np.int64)
    starts = np.arange(n, dtype=np.int64)
    if excluded is None or not excluded.any():
        return starts
    bad = np.concatenate([[0], np.cumsum(excluded, dtype=np.int64)])
    return starts[bad[starts + window] - bad[starts] == 0]


def _gather(z: np.ndarray, starts: np.ndarray, window: int) -> torch.Tensor:
    """Windows ``z[s : s + window]`` for each start, ``(len(starts), window, F)`` float32."""
    return torch.from_numpy(np.ascontiguousarray(z[starts[:, None] + np.arange(window)], dtype=np.float32))


def _fit_normaliser(parts: Sequence[np.ndarray], window: int, centre: Centre) -> Normaliser:
    """Mean/std of the kept training rows; with ``centre="window"`` the scale is the RMS deviation of a
    feature from its window mean over the training windows instead."""
    base = Normaliser.fit(np.concatenate(parts))
    if centre != "window":
        return base
    sq = np.zeros(base.mean.shape)
    count = 0
    for p in parts:
        if len(p) < window:
            continue
        w = np.lib.stride_tricks.sliding_window_view(p, window, axis=0)  # (n, F, W)
        sq += ((w - w.mean(axis=2, keepdims=True)) ** 2).sum(axis=(0, 2))
        count += w.shape[0] * window
    if count == 0:
        return base
    rms = np.sqrt(sq / count)
    return Normaliser(base.mean, np.where(rms > 1e-9, rms, 1.0))


def _mse(model: BiLstmAutoencoder, z: np.ndarray, starts: np.ndarray, window: int, batch: int = 1024) -> float:
    """Mean squared reconstruction error over the windows at ``starts`` of the concatenated rows ``z``."""
    if len(starts) == 0:
        return math.nan
    model.eval()
    total = 0.0
    with torch.no_grad():
        for b in range(0, len(starts), batch):
            x = _gather(z, starts[b : b + batch], window)
            total += float(((model(x) - model.target(x)) ** 2).mean(dim=(1, 2)).sum())
    return total / len(starts)


def train_autoencoder(
    series: Sequence[np.ndarray],
    features: Sequence[str],
    config: AutoencoderTrainConfig = AutoencoderTrainConfig(),
    *,
    mask: Sequence[np.ndarray] | None = None,
    progress: bool = True,
) -> AutoencoderResult:
    """Train the autoencoder on the windows of ``series`` (one ``(T_i, F)`` array per device).

    ``mask`` optionally marks rows (``(T_i,)`` bool per series) whose windows are left out, as non-finite
    rows are. Raises ``ValueError`` when no series gives a training window or none a validation window.
    """
    started = time.perf_counter()
    features = tuple(features)
    w = config.window
    filled, excluded = _prepare(series, len(features), mask)
    n_val = [max(1, round(len(x) * config.val_fraction)) for x in filled]
    n_train = [len(x) - v for x, v in zip(filled, n_val, strict=True)]
    normaliser = _fit_normaliser(
        [x[:n][~e[:n]] for x, e, n in zip(filled, excluded, n_train, strict=True)], w, config.centre
    )
    z = np.concatenate([normaliser.apply(x) for x in filled])
    ex = np.concatenate(excluded)
    offsets = np.cumsum([0, *[len(x) for x in filled]])
    train_starts, val_starts = [], []
    for i, n in enumerate(n_train):
        a, b, e = int(offsets[i]), int(offsets[i]) + n, int(offsets[i + 1])
        train_starts.append(a + window_starts(b - a, w, ex[a:b]))
        val_starts.append(b + window_starts(e - b, w, ex[b:e]))
    tr, va = np.concatenate(train_starts), np.concatenate(val_starts)
    if len(tr) == 0 or len(va) == 0:
        raise ValueError(f"{len(tr)} training and {len(va)} validation windows of {w} rows: series too short")

    rng = np.random.default_rng(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = BiLstmAutoencoder(config.model_config(len(features)))
        optimiser, scheduler = make_optimiser(model, config)

        def epoch() -> float:
            model.train()
            order = tr[rng.permutation(len(tr))]
            batches = range(0, len(order), config.batch_size)
            cap = config.max_batches_per_epoch or len(batches)
            loss_sum = 0.0
            for b in list(batches)[:cap]:
                x = _gather(z, order[b : b + config.batch_size], w)
                loss = ((model(x) - model.target(x)) ** 2).mean()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
                optimiser.step()
                loss_sum += float(loss.detach()) * len(x)
            return loss_sum / min(len(order), cap * config.batch_size)

        history, best_epoch = fit_epochs(
            model, optimiser, scheduler, epoch, lambda: _mse(model, z, va, w), config, progress=progress
        )
    metrics: dict[str, float] = {
        "train_mse": _mse(model, z, tr, w),
        "val_mse": _mse(model, z, va, w),
        "train_windows": len(tr),
        "val_windows": len(va),
        "epochs": len(history),
        "best_epoch": best_epoch,
        "stopped_early": len(history) < config.max_epochs,
        "seconds": time.perf_counter() - started,
    }
    split = {
        "order": "time-ordered per series: train, then val; windows lie wholly inside one part",
        "series": len(filled),
        "train": n_train,
        "val": n_val,
        "excluded": [int(e.sum()) for e in excluded],
    }
    return AutoencoderResult(model, normaliser, features, config, history, metrics, split)


def window_errors(model: BiLstmAutoencoder, normaliser: Normaliser, x: np.ndarray, *, batch: int = 1024) -> np.ndarray:
    """Per-feature reconstruction error ``(T, F)`` of the raw series ``x`` ``(T, F)``.

    Row ``t`` holds the mean absolute error, over the window's rows, of the window of rows
    ``t - W + 1 .. t`` (normalised units): it depends on rows ``<= t`` only. Rows ``t < W - 1`` have no
    full window and are NaN.
    """
    w = model.config.window
    z = normaliser.apply(np.asarray(x, dtype=np.float64))
    out = np.full(z.shape, np.nan)
    starts = np.arange(max(len(z) - w + 1, 0), dtype=np.int64)
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for b in range(0, len(starts), batch):
            s = starts[b : b + batch]
            win = _gather(z, s, w).to(device)
            out[s + w - 1] = (model(win) - model.target(win)).abs().mean(dim=1).cpu().numpy()
    return out


def window_scores(model: BiLstmAutoencoder, normaliser: Normaliser, x: np.ndarray) -> np.ndarray:
    """Score ``(T,)`` of each row: :func:`window_errors` averaged over the features (NaN before the first
    full window). Causal: the score of row ``t`` uses rows ``<= t`` only."""
    return window_errors(model, normaliser, x).mean(axis=1)


def scorer_metadata(config: AutoencoderConfig) -> dict[str, Any]:
    """Metadata that marks the artifact as a windowed, non-streaming scorer (the streaming loader reads it)."""
    return {
        "streaming": False,
        "scorer": {
            "kind": SCORER_KIND,
            "window": config.window,
            "description": (
                f"windowed offline scorer: the score of row t is the reconstruction error of the window of the "
                f"{config.window} rows ending at t (rows <= t only), recomputed for every row; no carried state"
            ),
        },
    }


def save_autoencoder(
    result: AutoencoderResult, directory: Path, *, version: str, data_description: dict[str, Any]
) -> Path:
    """Write the artifact (safetensors weights + metadata JSON, like the forecaster's), marked windowed."""
    return save_trained(
        result,
        directory,
        version=version,
        data_description=data_description,
        extra=scorer_metadata(result.model.config),
    )


@dataclass
class WindowedArtifact:
    model: BiLstmAutoencoder
    features: tuple[str, ...]
    normaliser: Normaliser
    version: str
    metadata: dict[str, Any] = field(default_factory=dict)


def load_autoencoder(
    directory: Path, *, expected_features: Sequence[str] | None = None, device: str = "cpu"
) -> WindowedArtifact:
    """Load and verify (hash, features, model class) an autoencoder artifact; raises
    :class:`~models.artifact.ArtifactError` with the reason."""
    directory = Path(directory)
    meta = read_metadata(directory)
    if meta.get("format") != FORMAT or meta.get("model_class") != BiLstmAutoencoder.__name__:
        raise ArtifactError(f"{directory}: not a {BiLstmAutoencoder.__name__} artifact ({meta.get('model_class')})")
    features = verify_weights(directory, meta, expected_features)
    model = BiLstmAutoencoder(AutoencoderConfig(**meta["config"]))
    try:
        model.load_state_dict(load_file(str(directory / WEIGHTS)))
    except (RuntimeError, OSError) as exc:
        raise ArtifactError(f"{directory / WEIGHTS}: cannot load weights: {exc}") from exc
    model.to(device).eval()
    return WindowedArtifact(model, features, normaliser_of(meta), str(meta["version"]), meta)
