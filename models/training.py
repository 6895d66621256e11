"""Offline training of the next-step :class:`~models.forecaster.Forecaster` on historical sensor series.

The trainer is pure: it takes numpy arrays (one ``(T_i, F)`` series per device) and returns a trained
model, the normaliser and metrics; only :func:`save_trained` touches the disk, through
:func:`~models.artifact.save_artifact`. Shapes below use ``T`` steps, ``F`` features, ``B`` lanes.

How the data is used, and why:

* **Time-ordered splits per series.** Each series is cut into its first ``1 - val - test`` fraction
  (training), then validation, then test. Nothing is shuffled across time: the detector forecasts the
  future from the past, so a random split would leak the future into training and flatter the metrics.
  The :class:`~models.artifact.Normaliser` is fitted on the training parts only, for the same reason.
* **Masked points** (``mask`` true, and any row holding a non-finite value) are treated like the gap
  steps of the live pipeline (see ``pipeline/windowing.py``): they are forward-filled from the last
  kept row (a leading run is back-filled from the first kept row), so they advance the recurrent state
  without dragging it somewhere a known anomaly would, and they are neither a loss target, nor part of
  the normaliser fit, nor scored by the metrics.
* **Truncated BPTT with carried state.** The detector runs the model one step at a time with a state
  carried for the device's whole life, so the model is trained the same way: each epoch cuts every
  training part into contiguous *lanes* (about ``batch_size`` lanes in all, boundaries re-drawn at
  random each epoch), batches up to ``batch_size`` lanes side by side, and walks them in chunks of
  ``seq_len`` steps, carrying the hidden state from one chunk to the next (detached, so gradients
  span one chunk). Only each lane's first ``warmup_steps_loss`` targets, forecast from a cold zero
  state, are left out of the loss.
* **Loss** is the MSE of the next-step forecast (``x[t+1]``) in normalised units, averaged over
  features and over the targets that count.
* **Optimisation**: Adam, gradient-norm clipping, ReduceLROnPlateau on the validation MSE and early
  stopping on the same signal, which restores the best epoch's weights. A plateau schedule is used
  rather than a cosine one because it needs no epoch count fixed in advance, which early stopping
  would cut short anyway.
* **Evaluation** (:func:`evaluate_forecaster`) runs the model over each whole series with carried
  state, exactly as it is served, and scores only the steps of the part being evaluated; the
  validation and test parts are therefore forecast with a state warmed up on everything before them.
  A persistence forecast (``x[t]`` for ``x[t+1]``) is scored on the same targets as a baseline.
* **Reproducibility**: the torch RNG is forked and seeded (the caller's global RNG state is left
  alone) and lane layout and order come from a seeded numpy ``Generator``; on CPU the same seed gives
  bit-identical weights.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from models.artifact import Normaliser, SavableModel, save_artifact
from models.forecaster import CellKind, Forecaster, ForecasterConfig

# Evaluation walks at most this many series side by side and this many steps per forward call, so its
# memory stays bounded however long or numerous the series are (the state is carried across calls).
_EVAL_SERIES = 256
_EVAL_STEPS = 4096


@dataclass(frozen=True, kw_only=True)
class OptimiserConfig:
    """The optimisation fields of every trainer here (the forecaster, the windowed autoencoder), read by
    :func:`make_optimiser` and :func:`fit_epochs`: Adam with ``lr``/``weight_decay``, gradients clipped at
    ``clip_norm``; the LR is multiplied by ``lr_factor`` after ``lr_patience`` epochs without a better
    validation MSE, and training stops after ``patience`` such epochs (or ``max_epochs``). The last
    ``val_fraction`` of each series (time-ordered) validates. ``max_batches_per_epoch`` caps the optimiser
    steps of an epoch (batches are visited in a random order, so a capped epoch sees a random subset)."""

    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    max_epochs: int = 30
    patience: int = 5
    clip_norm: float = 1.0
    lr_factor: float = 0.5
    lr_patience: int = 2
    val_fraction: float = 0.15
    seed: int = 0
    max_batches_per_epoch: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_epochs", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_batches_per_epoch is not None and self.max_batches_per_epoch < 1:
            raise ValueError("max_batches_per_epoch must be >= 1 or None")
        if self.lr_patience < 0:
            raise ValueError("lr_patience must be >= 0")
        if not (0.0 < self.val_fraction < 1.0):
            raise ValueError("val_fraction must be in (0, 1)")
        if not (0.0 < self.lr_factor < 1.0):
            raise ValueError("lr_factor must be in (0, 1)")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(OptimiserConfig):
    """Hyper-parameters of one forecaster training run; stored in the artifact's metadata.

    ``seq_len`` is the TBPTT chunk length (steps per optimiser step and per gradient path);
    ``batch_size`` the number of lanes walked side by side. ``warmup_steps_loss`` targets at the start of
    each lane are left out of the loss because they are forecast from a zero state.
    """

    cell: CellKind = "lstm"
    hidden: int = 64
    layers: int = 2
    dropout: float = 0.1
    seq_len: int = 64
    test_fraction: float = 0.15
    warmup_steps_loss: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', not {self.cell!r}")
        for name in ("hidden", "layers", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.warmup_steps_loss < 0:
            raise ValueError("warmup_steps_loss must be >= 0")
        if self.test_fraction <= 0.0 or self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction and test_fraction must be > 0 and sum to < 1")


@dataclass
class TrainResult:
    """What :func:`train` returns.

    ``model`` holds the best epoch's weights and is in eval mode. ``history`` has one dict per epoch
    (``epoch``, ``train_loss`` — the dropout-on training loss —, ``val_mse``, ``lr``, ``seconds``).
    ``metrics`` holds ``train_mse``, ``val_mse``, ``test_mse`` (normalised units, best weights, eval
    mode), ``persistence_val_mse``, ``persistence_test_mse``, ``epochs``, ``best_epoch`` (1-based; 0
    if no epoch gave a finite validation MSE, and the initial weights were kept), ``stopped_early`` and
    ``seconds``. ``split`` gives the per-series ``train``/``val``/``test`` lengths and ``excluded``
    (masked or non-finite) row counts.
    """

    model: Forecaster
    normaliser: Normaliser
    features: tuple[str, ...]
    config: TrainConfig
    history: list[dict[str, float]]
    metrics: dict[str, float]
    split: dict[str, Any]


@dataclass(frozen=True)
class _Lane:
    """Inputs ``z[series][start:end]`` forecasting targets ``z[series][start + 1 : end + 1]``."""

    series: int
    start: int
    end: int


def _prepare(
    series: Sequence[np.ndarray], n_features: int, mask: Sequence[np.ndarray] | None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Validate, and forward-fill excluded rows.

    Returns the filled series (``(T_i, F)`` float64) and the excluded-row masks (``(T_i,)`` bool: the
    caller's mask or any non-finite value in the row).
    """
    if mask is not None and len(mask) != len(series):
        raise ValueError(f"{len(mask)} masks for {len(series)} series")
    filled: list[np.ndarray] = []
    excluded: list[np.ndarray] = []
    for i, s in enumerate(series):
        x = np.asarray(s, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != n_features:
            raise ValueError(f"series {i} has shape {x.shape}; expected (T, {n_features})")
        ex = np.logical_not(np.isfinite(x).all(axis=1))
        if mask is not None:
            m = np.asarray(mask[i], dtype=bool)
            if m.shape != (len(x),):
                raise ValueError(f"mask {i} has shape {m.shape}; expected ({len(x)},)")
            ex |= m
        keep = ~ex
        if not keep.any():
            raise ValueError(f"series {i} has no unmasked finite row")
        src = np.where(keep, np.arange(len(x)), -1)
        np.maximum.accumulate(src, out=src)
        src[src < 0] = int(np.argmax(keep))
        filled.append(x[src])
        excluded.append(ex)
    return filled, excluded


def _split_lengths(length: int, config: TrainConfig) -> tuple[int, int, int]:
    """``(train, val, test)`` lengths of one series: the first, middle and last parts in time."""
    n_val = max(1, round(length * config.val_fraction))
    n_test = max(1, round(length * config.test_fraction))
    return length - n_val - n_test, n_val, n_test


def _evaluate(
    model: Forecaster, z: Sequence[np.ndarray], excluded: Sequence[np.ndarray], starts: Sequence[int]
) -> dict[str, float]:
    """One-step MSE of ``model`` and of persistence on normalised, filled series.

    Target ``j`` of series ``i`` counts when ``starts[i] <= j`` and it is not excluded; its forecast is
    the model's output after reading rows ``0..j-1`` with carried state.
    """
    model.eval()
    n_features = model.config.n_features
    sq_model = sq_persist = 0.0
    count = 0
    with torch.no_grad():
        for g in range(0, len(z), _EVAL_SERIES):
            block = z[g : g + _EVAL_SERIES]
            lengths = [len(s) for s in block]
            x = np.zeros((len(block), max(lengths), n_features), np.float32)
            weight = np.zeros((len(block), max(lengths)), bool)  # weight[:, j]: target j counts
            for b, s in enumerate(block):
                x[b, : len(s)] = s
                first = max(1, starts[g + b])
                weight[b, first : len(s)] = ~excluded[g + b][first : len(s)]
            xt = torch.from_numpy(x)
            forecast = np.empty_like(x)
            state = None
            for c in range(0, x.shape[1], _EVAL_STEPS):
                out, state = model(xt[:, c : c + _EVAL_STEPS], state)
                forecast[:, c : c + _EVAL_STEPS] = out.numpy()
            w = weight[:, 1:]
            sq_model += float(((forecast[:, :-1] - x[:, 1:]).astype(np.float64) ** 2)[w].sum())
            sq_persist += float(((x[:, :-1] - x[:, 1:]).astype(np.float64) ** 2)[w].sum())
            count += int(w.sum())
    if count == 0:
        return {"mse": math.nan, "persistence_mse": math.nan, "targets": 0}
    return {
        "mse": sq_model / (count * n_features),
        "persistence_mse": sq_persist / (count * n_features),
        "targets": count,
    }


def evaluate_forecaster(
    model: Forecaster,
    normaliser: Normaliser,
    series: Sequence[np.ndarray],
    *,
    start: int | Sequence[int] = 1,
    mask: Sequence[np.ndarray] | None = None,
) -> dict[str, float]:
    """One-step-ahead MSE, in normalised units, of ``model`` run over each whole series with carried state.

    Parameters
    ----------
    model, normaliser
        The forecaster (put in eval mode) and the normalisation it was trained with.
    series
        Raw series, each ``(T_i, F)``; each starts from a zero state, as a fresh device does.
    start
        Index of the first target scored, for all series or per series. Steps before it only warm the
        state up: pass the training length to score a validation part with the history before it.
    mask
        Optional ``(T_i,)`` bool per series; masked (and non-finite) rows are forward-filled as in
        training and not scored.

    Returns
    -------
    dict
        ``mse`` of the model, ``persistence_mse`` of forecasting ``x[t+1]`` by ``x[t]`` on the same
        targets, and the number of ``targets`` scored (the MSEs are NaN when there are none).
    """
    filled, excluded = _prepare(series, model.config.n_features, mask)
    starts = [start] * len(filled) if isinstance(start, int) else list(start)
    if len(starts) != len(filled):
        raise ValueError(f"{len(starts)} starts for {len(filled)} series")
    return _evaluate(model, [normaliser.apply(x) for x in filled], excluded, starts)


def _lanes(inputs: Sequence[int], lane_len: int, rng: np.random.Generator) -> list[_Lane]:
    """Cut each series' ``inputs[i]`` training inputs into contiguous lanes of ``lane_len``..``2 * lane_len``.

    The first cut falls at a random offset so that lane starts (and their unscored warm-up) move from
    epoch to epoch; a series shorter than two lanes is one lane.
    """
    lanes = []
    for i, n in enumerate(inputs):
        cut = lane_len + int(rng.integers(lane_len))
        starts = [0]
        while cut + lane_len <= n:
            starts.append(cut)
            cut += lane_len
        lanes += [_Lane(i, a, b) for a, b in zip(starts, [*starts[1:], n], strict=True)]
    return lanes


def _pack(
    lanes: Sequence[_Lane], z: Sequence[np.ndarray], excluded: Sequence[np.ndarray], warmup: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs ``(B, T, F)``, targets ``(B, T, F)`` and loss weights ``(B, T)`` of lanes padded alike."""
    length = max(lane.end - lane.start for lane in lanes)
    n_features = z[0].shape[1]
    x = np.zeros((len(lanes), length, n_features), np.float32)
    y = np.zeros_like(x)
    w = np.zeros((len(lanes), length), np.float32)
    for b, lane in enumerate(lanes):
        n = lane.end - lane.start
        x[b, :n] = z[lane.series][lane.start : lane.end]
        y[b, :n] = z[lane.series][lane.start + 1 : lane.end + 1]
        w[b, :n] = ~excluded[lane.series][lane.start + 1 : lane.end + 1]
        w[b, :warmup] = 0.0
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(w)


def _train_epoch(
    model: Forecaster,
    optimiser: torch.optim.Optimizer,
    z: Sequence[np.ndarray],
    excluded: Sequence[np.ndarray],
    lane_len: int,
    config: TrainConfig,
    rng: np.random.Generator,
) -> float:
    """One pass of stateful TBPTT over the training parts; returns the mean training loss."""
    model.train()
    lanes = _lanes([len(s) - 1 for s in z], lane_len, rng)
    order = rng.permutation(len(lanes))
    groups = np.array_split(order, math.ceil(len(lanes) / config.batch_size))
    cap = config.max_batches_per_epoch or math.inf
    loss_sum = weight_sum = 0.0
    steps = 0
    for group in groups:
        if steps >= cap:
            break
        x, y, w = _pack([lanes[k] for k in group], z, excluded, config.warmup_steps_loss)
        state = model.init_state(len(group))
        for c in range(0, x.shape[1], config.seq_len):
            if steps >= cap:
                break
            forecast, state = model(x[:, c : c + config.seq_len], state)
            state = tuple(s.detach() for s in state)
            wc = w[:, c : c + config.seq_len]
            total = float(wc.sum())
            if total == 0.0:
                continue  # all warm-up, masked or padding: the state advanced, nothing to learn
            loss = (((forecast - y[:, c : c + config.seq_len]) ** 2).mean(dim=-1) * wc).sum() / total
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
            optimiser.step()
            loss_sum += float(loss.detach()) * total
            weight_sum += total
            steps += 1
    return loss_sum / weight_sum if weight_sum else math.nan


def make_optimiser(
    model: torch.nn.Module, config: OptimiserConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.ReduceLROnPlateau]:
    """Adam and the ReduceLROnPlateau schedule (on the validation loss) every trainer here uses."""
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimiser, mode="min", factor=config.lr_factor, patience=config.lr_patience
    )
    return optimiser, scheduler


def fit_epochs(
    model: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
    run_epoch: Callable[[], float],
    validate: Callable[[], float],
    config: OptimiserConfig,
    *,
    progress: bool = True,
) -> tuple[list[dict[str, float]], int]:
    """The epoch loop shared by the trainers: ``run_epoch`` (returns the training loss), ``validate``
    (returns the validation loss), the LR schedule on it, and early stopping after ``config.patience``
    epochs without a better validation loss.

    The best epoch's weights are restored and the model is left in eval mode. Returns the per-epoch
    history (``epoch``, ``train_loss``, ``val_mse``, ``lr``, ``seconds``) and the best epoch (1-based; 0
    if no epoch gave a finite validation loss, and the initial weights were kept).
    """
    history: list[dict[str, float]] = []
    best_val, best_epoch, best_state = math.inf, 0, copy.deepcopy(model.state_dict())
    bar = Progress(
        TextColumn("[bold]training[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        disable=not progress,
    )
    with bar:
        task = bar.add_task("", total=config.max_epochs)
        for epoch in range(1, config.max_epochs + 1):
            epoch_start = time.perf_counter()
            lr = float(optimiser.param_groups[0]["lr"])
            train_loss = run_epoch()
            val = validate()
            scheduler.step(val)
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "val_mse": val,
                    "lr": lr,
                    "seconds": time.perf_counter() - epoch_start,
                }
            )
            if val < best_val:
                best_val, best_epoch, best_state = val, epoch, copy.deepcopy(model.state_dict())
            bar.update(
                task,
                advance=1,
                description=f"train {train_loss:.4f}  val {val:.4f} (best {best_val:.4f} @ {best_epoch})  lr {lr:.1e}",
            )
            if epoch - best_epoch >= config.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return history, best_epoch


def train(
    series: Sequence[np.ndarray],
    features: Sequence[str],
    config: TrainConfig = TrainConfig(),
    *,
    mask: Sequence[np.ndarray] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a forecaster on ``series`` (one ``(T_i, F)`` array per device, columns named by ``features``).

    ``mask`` optionally gives one ``(T_i,)`` bool array per series marking rows to exclude (e.g. known
    anomalies); see the module docstring for how they, the splits and the state are handled.
    ``progress`` shows a rich progress bar with the epoch, losses and learning rate.

    Raises ``ValueError`` when a series does not have ``len(features)`` columns or is too short to give
    every split at least one step and the training part at least one target after the warm-up.
    """
    started = time.perf_counter()
    features = tuple(features)
    filled, excluded = _prepare(series, len(features), mask)
    lengths = [_split_lengths(len(x), config) for x in filled]
    for i, (n, _, _) in enumerate(lengths):
        if n < config.warmup_steps_loss + 2:
            raise ValueError(f"series {i} ({len(filled[i])} steps) is too short for a training part")
    n_train = [n for n, _, _ in lengths]
    n_fit = [n + v for n, v, _ in lengths]
    kept = np.concatenate([x[:n][~ex[:n]] for x, ex, n in zip(filled, excluded, n_train, strict=True)])
    normaliser = Normaliser.fit(kept)
    z = [normaliser.apply(x) for x in filled]
    z_train = [s[:n] for s, n in zip(z, n_train, strict=True)]
    ex_train = [e[:n] for e, n in zip(excluded, n_train, strict=True)]
    # About batch_size lanes in all, yet never shorter than one chunk after its warm-up.
    lane_len = max(
        math.ceil(sum(n - 1 for n in n_train) / config.batch_size),
        config.seq_len + config.warmup_steps_loss,
    )
    z_fit = [s[:n] for s, n in zip(z, n_fit, strict=True)]  # validation is scored after the training part

    rng = np.random.default_rng(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = Forecaster(
            ForecasterConfig(
                n_features=len(features),
                hidden=config.hidden,
                layers=config.layers,
                dropout=config.dropout,
                cell=config.cell,
            )
        )
        optimiser, scheduler = make_optimiser(model, config)
        history, best_epoch = fit_epochs(
            model,
            optimiser,
            scheduler,
            lambda: _train_epoch(model, optimiser, z_train, ex_train, lane_len, config, rng),
            lambda: _evaluate(model, z_fit, excluded, n_train)["mse"],
            config,
            progress=progress,
        )
    train_eval = _evaluate(model, z_train, ex_train, [config.warmup_steps_loss + 1] * len(z))
    val_eval = _evaluate(model, z_fit, excluded, n_train)
    test_eval = _evaluate(model, z, excluded, n_fit)
    metrics: dict[str, float] = {
        "train_mse": train_eval["mse"],
        "val_mse": val_eval["mse"],
        "test_mse": test_eval["mse"],
        "persistence_val_mse": val_eval["persistence_mse"],
        "persistence_test_mse": test_eval["persistence_mse"],
        "epochs": len(history),
        "best_epoch": best_epoch,
        "stopped_early": len(history) < config.max_epochs,
        "seconds": time.perf_counter() - started,
    }
    split = {
        "order": "time-ordered per series: train, then val, then test",
        "series": len(filled),
        "train": n_train,
        "val": [v for _, v, _ in lengths],
        "test": [t for _, _, t in lengths],
        "excluded": [int(e.sum()) for e in excluded],
    }
    return TrainResult(model, normaliser, features, config, history, metrics, split)


def _compact(value: Any) -> Any:
    """Floats rounded to 6 significant digits, recursively, to keep the metadata JSON short."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_compact(v) for v in value]
    return value


class Trained(Protocol):
    """What :func:`save_trained` writes: a :class:`TrainResult`, or another trainer's result of the same
    shape (:class:`models.autoencoder.AutoencoderResult`); ``config`` is a dataclass."""

    @property
    def model(self) -> SavableModel: ...
    @property
    def normaliser(self) -> Normaliser: ...
    @property
    def features(self) -> tuple[str, ...]: ...
    @property
    def config(self) -> Any: ...
    @property
    def history(self) -> list[dict[str, float]]: ...
    @property
    def metrics(self) -> dict[str, float]: ...
    @property
    def split(self) -> dict[str, Any]: ...


def save_trained(
    result: Trained,
    directory: Path,
    *,
    version: str,
    data_description: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``result`` as an artifact whose metadata records how it was trained.

    ``extra["training"]`` holds the config, the metrics, the per-epoch history (rounded), the caller's
    ``data_description`` (where the series came from, time range, devices...) and the split lengths, so
    that an artifact can be traced back to its data and compared with others. ``extra`` adds top-level
    metadata keys (a windowed scorer declares itself there).
    """
    training = {
        "config": asdict(result.config),
        "metrics": result.metrics,
        "history": _compact(result.history),
        "data": data_description,
        "split": result.split,
    }
    return save_artifact(
        Path(directory),
        result.model,
        result.features,
        result.normaliser,
        version=version,
        extra={**(extra or {}), "training": training},
    )
