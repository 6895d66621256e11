"""``iotad evaluate nab|skab``: the detector on public labelled benchmarks, through the live scoring code.

Every series of a benchmark is one *slot* of ONE :class:`~models.detector.Detector`, and all of them are
advanced together, one batched :meth:`~models.detector.Detector.step` per time step (gather state, score
against the previous forecast, one recurrent step, scatter) -- the code path of the Faust agent, not an
offline re-implementation. What the detector sees, per benchmark, is documented in ``bench/README.md``
and in :func:`run_nab` / :func:`run_skab`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import nab as nabscore
from bench import skab as skabdata
from models.artifact import Artifact, Normaliser, load_artifact
from models.detector import Detector
from models.scoring import (
    CalibratedThreshold,
    EnsembleConfig,
    LikelihoodThreshold,
    ReferenceDeviation,
    ScoringConfig,
    ensemble_threshold,
    seasonal_bin,
    slow_features,
)
from models.training import TrainConfig, save_trained, train

# The benchmark data lives beside the checkout (../shared/datasets), never inside the repository.
DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
DEFAULT_NAB = DATASETS / "nab"
DEFAULT_SKAB = DATASETS / "skab"
DETECTOR_NAME = "iotad"


@dataclass(frozen=True)
class ModelConfig:
    """The forecaster trained per benchmark (tiny: it has to train in well under a minute on 2 cores)."""

    cell: str = "lstm"
    hidden: int = 32
    layers: int = 1
    seq_len: int = 64
    batch_size: int = 64
    max_epochs: int = 12
    patience: int = 3
    max_batches_per_epoch: int | None = 60
    seed: int = 0

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            cell="gru" if self.cell == "gru" else "lstm",
            hidden=self.hidden,
            layers=self.layers,
            dropout=0.0,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            max_epochs=self.max_epochs,
            patience=self.patience,
            lr_patience=1,
            max_batches_per_epoch=self.max_batches_per_epoch,
            seed=self.seed,
        )


@dataclass(frozen=True)
class NabConfig:
    """Scoring of the NAB run. The likelihood parameters follow Numenta's HTM detector (moving average of
    10, Gaussian tail, red/yellow suppression, log scaling, 5 % spatial tolerance)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    warmup_steps: int = 30
    halflife_steps: float = 200.0
    burnin_steps: int = 5
    learn_from_anomalies: bool = False
    # Per-file likelihood probation from the file's prefix (Numenta's split of NAB's probationary period:
    # the first half is learning, the second estimates the distribution); else ``estimation_steps`` for all.
    prefix_probation: bool = True
    # The threshold: the likelihood ensemble that ``IOTAD_THRESHOLD_METHOD=ensemble`` gives the live worker.
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)


@dataclass
class Streamed:
    """Per-series outputs of :func:`stream`, each ``(T_i,)`` (``forecast`` ``(T_i, F)``, model units)."""

    score: list[np.ndarray]
    threshold: list[np.ndarray]
    flag: list[np.ndarray]
    forecast: list[np.ndarray]
    seconds: float
    steps: int


def stream(
    detector: Detector,
    inputs: Sequence[np.ndarray],
    names: Sequence[str],
    context: Sequence[np.ndarray] | None = None,
) -> Streamed:
    """Advance every series (one slot each) through ``detector``: one batched step per time index.
    ``context`` (one ``(T_i,)`` int array per series), if given, is passed along with each row."""
    slots = np.array([detector.slot(n) for n in names], dtype=np.int64)
    lengths = np.array([len(x) for x in inputs])
    f = inputs[0].shape[1]
    score = [np.full(n, np.nan) for n in lengths]
    thr = [np.full(n, np.nan) for n in lengths]
    flag = [np.zeros(n, bool) for n in lengths]
    fc = [np.full((n, f), np.nan) for n in lengths]
    padded = np.zeros((len(inputs), int(lengths.max()), f))
    ctx = np.full((len(inputs), int(lengths.max())), -1, np.int64)
    for i, x in enumerate(inputs):
        padded[i, : len(x)] = x
        if context is not None:
            ctx[i, : len(x)] = context[i]
    started = time.perf_counter()
    for t in range(int(lengths.max())):
        active = np.flatnonzero(lengths > t)
        c = ctx[active, t] if context is not None else None
        out = detector.step(slots[active], padded[active, t], context=c)
        for j, i in enumerate(active.tolist()):
            score[i][t] = out.score[j]
            thr[i][t] = out.threshold[j]
            flag[i][t] = out.is_anomaly[j]
            fc[i][t] = out.forecast[j]
    return Streamed(score, thr, flag, fc, time.perf_counter() - started, int(lengths.max()))


def _model_summary(artifact: Artifact, metrics: dict[str, float], model: ModelConfig) -> dict[str, Any]:
    return {
        "version": artifact.version,
        "cell": model.cell,
        "seed": model.seed,
        "val_mse": metrics["val_mse"],
        "persistence_val_mse": metrics["persistence_val_mse"],
    }


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def fit_model(
    series: Sequence[np.ndarray],
    features: Sequence[str],
    model: ModelConfig,
    directory: Path,
    description: dict[str, Any],
) -> tuple[Artifact, dict[str, float]]:
    """Train one forecaster on ``series`` (already normalised per series), save it as an artifact under
    ``directory`` and load it back through the verifying loader (as the worker would)."""
    result = train(series, features, model.train_config(), progress=False)
    version = f"eval-{_digest([description, asdict(model)])}"
    save_trained(result, directory, version=version, data_description=description)
    return load_artifact(directory, expected_features=features), dict(result.metrics)


def prefix_normaliser(prefix: np.ndarray) -> Normaliser:
    """Mean/std of a series' own calibration prefix, the std floored so a flat prefix cannot blow up."""
    mean = prefix.mean(axis=0)
    std = prefix.std(axis=0)
    floor = np.maximum(1e-3 * np.abs(mean), 1e-6)
    return Normaliser(mean, np.maximum(std, floor))


def hour_of_day(timestamps: Sequence[str], bins: int = 24, weekly: bool = False) -> np.ndarray:
    """The seasonal bin of each timestamp (:func:`models.scoring.seasonal_bin`): its time of day in
    ``bins`` equal parts (24: the hour), or with ``weekly`` its time of the week in ``7 x bins`` parts."""
    t = np.array([ts.strip().replace(" ", "T") for ts in timestamps], dtype="datetime64[s]").astype(np.int64)
    return seasonal_bin(t, bins, weekly)


def set_prefix_probation(det: Detector, names: Sequence[str], prefixes: Sequence[int], cfg: NabConfig) -> None:
    """Allocate the slots of ``names`` and give each likelihood the probation of its file's prefix: rows up
    to half the prefix are not learnt, the rest of the prefix estimates the distribution, so scoring starts
    where NAB starts scoring. The likelihood sees a row only once the error statistics are warm (row
    ``1 + burnin + warmup``), so the learning part is counted from there."""
    thr = det.threshold
    if not isinstance(thr, LikelihoodThreshold):
        raise TypeError("prefix probation needs the likelihood threshold")
    first_seen = 1 + cfg.burnin_steps + cfg.warmup_steps
    slots = np.array([det.slot(n) for n in names], np.int64)
    p = np.asarray(prefixes, np.int64)
    learning = np.maximum(p // 2 - first_seen, 0)
    estimation = np.maximum(p - np.maximum(p // 2, first_seen), 1)
    thr.likelihood.set_probation(slots, learning, estimation)
    if thr.spread_likelihood is not None and thr.spread is not None:
        # it sees a row once the spread's reference is set: it estimates over the rest of the prefix, at
        # least the likelihood's default period (short prefixes then start scoring it a little later)
        rest = p - first_seen - thr.spread.calibration_steps
        thr.spread_likelihood.set_probation(slots, np.zeros_like(p), np.maximum(rest, cfg.ensemble.estimation_steps))


def run_nab(
    data: Path = DEFAULT_NAB,
    cfg: NabConfig | None = None,
    *,
    out: Path | None = None,
    export: Path | None = None,
    plots: bool = True,
    only: Sequence[str] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Score NAB with the streaming detector.

    What the detector sees: each file's values, row by row, as one device (one slot). Per file, the
    values are divided into the file's *probationary prefix* (NAB's first ``min(15 %, 750)`` rows) and
    the rest. The prefix alone fixes the file's input normalisation (its mean and std) and is the only
    data the forecaster is trained on: ONE small LSTM for the whole corpus, trained on all the prefixes
    (each normalised by its own statistics). Every row is then streamed causally: the score of row ``t``
    uses rows ``<= t`` only. The detector learns online (error statistics, likelihood distribution,
    spatial range) as it streams, as it would in production. Labels are read only by the scorer, and
    only one global threshold per profile is chosen from them (NAB's sweep).
    """
    cfg = cfg or NabConfig()
    started = time.perf_counter()
    series, missing = nabscore.load_corpus(Path(data))
    if only:
        series = [s for s in series if any(o in s.name for o in only)]
    if not series:
        raise ValueError(f"no NAB series under {data}")
    profiles_path = Path(data) / "config" / "profiles.json"
    profiles = nabscore.load_profiles(profiles_path) if profiles_path.is_file() else nabscore.DEFAULT_PROFILES
    log(f"NAB: {len(series)} series ({len(missing)} skipped: CSV missing)")

    norms = [prefix_normaliser(s.values[: s.probation, None]) for s in series]
    z = [n.apply(s.values[:, None]).astype(np.float64) for n, s in zip(norms, series, strict=True)]
    prefixes = [x[: s.probation] for x, s in zip(z, series, strict=True)]
    out_dir = Path(out) if out is not None else None
    model_dir = (out_dir or Path(".iotad/evaluate")) / "nab-model"
    t0 = time.perf_counter()
    artifact, metrics = fit_model(
        prefixes,
        ("value",),
        cfg.model,
        model_dir,
        {"source": "NAB probationary prefixes", "series": len(series), "rows": sum(len(p) for p in prefixes)},
    )
    train_s = time.perf_counter() - t0
    log(f"trained on {sum(len(p) for p in prefixes)} prefix rows in {train_s:.1f}s (val mse {metrics['val_mse']:.4f})")

    scoring = ScoringConfig(
        warmup_steps=cfg.warmup_steps,
        halflife_steps=cfg.halflife_steps,
        learn_from_anomalies=cfg.learn_from_anomalies,
        burnin_steps=cfg.burnin_steps,
    )
    det = Detector(artifact, scoring, ensemble_threshold(cfg.ensemble), device="cpu", capacity=len(series))
    if cfg.prefix_probation:
        set_prefix_probation(det, [s.name for s in series], [s.probation for s in series], cfg)
    ens = cfg.ensemble
    context = [hour_of_day(s.timestamps, ens.seasonal_bins, ens.weekly) for s in series] if ens.seasonal else None
    streamed = stream(det, z, [s.name for s in series], context)
    log(f"streamed {streamed.steps} batched steps in {streamed.seconds:.1f}s")
    scores = [np.nan_to_num(sc, nan=0.0) for sc in streamed.score]

    results = nabscore.score_corpus(series, scores, profiles)
    if export is not None:
        for s, sc in zip(series, scores, strict=True):
            nabscore.write_results(Path(export), DETECTOR_NAME, s, sc)
    if out_dir is not None and plots:
        std_thr = results[profiles[0].name].threshold
        for s, sc, x, fc in zip(series, scores, z, streamed.forecast, strict=True):
            _plot_nab(out_dir / "nab" / f"{s.category}__{s.stem}.png", s, sc, std_thr, fc[:, 0], x[:, 0])
    summary: dict[str, Any] = {"dataset": "nab", "series": len(series)}
    for name, r in results.items():
        summary[name] = None if r.score is None else round(r.score, 2)
    summary["thresholds"] = {name: r.threshold for name, r in results.items()}
    summary["windows"] = {name: {"tp": r.tp, "fn": r.fn, "fp": r.fp} for name, r in results.items()}
    summary["categories"] = {
        cat: {
            name: (None if r.categories[cat]["score"] is None else round(r.categories[cat]["score"], 2))
            for name, r in results.items()
        }
        for cat in next(iter(results.values())).categories
    }
    summary["skipped"] = missing
    summary["seconds"] = {
        "train": round(train_s, 1),
        "stream": round(streamed.seconds, 1),
        "total": round(time.perf_counter() - started, 1),
    }
    summary["model"] = _model_summary(artifact, metrics, cfg.model)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        per_file = {name: {f: asdict(fs) for f, fs in r.files.items()} for name, r in results.items()}
        (out_dir / "nab.json").write_text(
            json.dumps({**summary, "files": per_file, "config": asdict(cfg)}, indent=1, default=str)
        )
    return summary


def _plot_nab(
    path: Path, s: nabscore.NabSeries, score: np.ndarray, thr: float, forecast: np.ndarray, z: np.ndarray
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(len(s.values))
    det = (score >= thr) & (t >= s.probation)
    fig, (a, b) = plt.subplots(2, 1, figsize=(14, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    a.plot(t, s.values, lw=0.6, color="tab:blue", label="value")
    for k, (lo, hi) in enumerate(s.windows):
        for ax in (a, b):
            ax.axvspan(lo, hi, color="gold", alpha=0.35, label="labelled window" if (k == 0 and ax is a) else None)
    for ax in (a, b):
        ax.axvspan(0, s.probation, color="grey", alpha=0.15, label="probation" if ax is a else None)
    a.scatter(t[det], s.values[det], color="red", s=14, zorder=3, label="detection")
    a.set_title(s.name)
    a.legend(loc="upper left", fontsize=7)
    b.plot(t, score, lw=0.6, color="black", label="anomaly score")
    b.axhline(thr, color="red", ls="--", lw=0.8, label=f"threshold {thr:.4f} (standard)")
    b.set_ylim(-0.02, 1.05)
    b.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


@dataclass(frozen=True)
class SkabConfig:
    """Scoring of the SKAB run: the LSTM's forecast-error score in an ensemble (max) with a reference
    deviation of the smoothed inputs, thresholded per file at ``margin`` x the ``quantile`` of its scores
    over the end of its training part (SKAB's own convention for its baselines: 1.5 x the 99th
    percentile); the detections reported are the score beyond one global alarm level times that threshold
    (``alarm_grid``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    warmup_steps: int = 30
    halflife_steps: float = 200.0
    burnin_steps: int = 5
    learn_from_anomalies: bool = False
    use_forecast: bool = True
    use_reference: bool = True
    span: float = 10.0
    reference_skip: int = 20
    reference_halflife: float = 100.0
    quantile: float = 0.99
    margin: float = 1.5
    # A flagged step holds the reference level only of the sensors beyond the threshold (no lock-in on a
    # sensor that drifts normally during another sensor's anomaly).
    hold_features: bool = True
    # Each member (the forecast score, each sensor's reference score) calibrated on its own: a sensor that
    # wanders widely in the training part (a slow temperature) no longer sets every sensor's threshold.
    per_member: bool = True
    # Sensors whose training part has an autocorrelation above this at ``slow_lag`` rows are slow: while
    # every fast member is back within its threshold, a slow sensor's lasting offset is re-anchored instead
    # of held (CalibratedThreshold.set_slow). None: no sensor is slow.
    slow_autocorrelation: float | None = 0.5
    slow_lag: int = 10
    # The reported detections: one global alarm level per scoreboard, in units of each file's calibrated
    # threshold, chosen on the labels from ``alarm_grid`` as NAB thresholds every detector (the only values
    # chosen on labels; bench.skab.choose_alarms): outliers at the best F1 within a false-alarm budget of
    # ``far_budget`` %, changepoints at the best NAB standard score. An empty grid: both at 1 (the calibrated
    # threshold, where the detector's own flags are).
    alarm_grid: tuple[float, ...] = skabdata.ALARM_GRID
    far_budget: float | None = skabdata.FAR_BUDGET


def skab_threshold(cfg: SkabConfig, n_features: int) -> CalibratedThreshold:
    """Split the training part's scored rows: the first half sets the reference, the second the threshold."""
    first_seen = 1 + cfg.burnin_steps + cfg.warmup_steps  # first row with a warm error score
    avail = skabdata.TRAIN_ROWS - first_seen
    if avail < 2 * (cfg.reference_skip + 10):
        raise ValueError("the training part is too short for this warm-up")
    ref_total = avail // 2
    reference = ReferenceDeviation(
        span=cfg.span,
        skip_steps=cfg.reference_skip,
        reference_steps=ref_total - cfg.reference_skip,
        halflife_steps=cfg.reference_halflife,
    )
    return CalibratedThreshold(
        skip_steps=ref_total,
        calibration_steps=avail - ref_total,
        quantile=cfg.quantile,
        margin=cfg.margin,
        reference=reference if cfg.use_reference else None,
        forecast_weight=1.0 if cfg.use_forecast else 0.0,
        hold_features=cfg.hold_features,
        per_member=cfg.per_member,
    )


def run_skab(
    data: Path = DEFAULT_SKAB,
    cfg: SkabConfig | None = None,
    *,
    out: Path | None = None,
    export: Path | None = None,
    plots: bool = True,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Score SKAB (outliers and changepoints) with the streaming detector.

    What the detector sees: each labelled file row by row (its 8 sensors) as one device (one slot),
    all files batched. Only the anomaly-free file and the first 400 rows (the training part) of each
    file are used to fit anything: each file is centred on the mean of its own first 400 rows and scaled
    by the per-sensor std of the anomaly-free file; ONE LSTM is trained on the anomaly-free file and the
    30 training parts; within its training part each file's reference level and its threshold are
    calibrated (first half / second half of the rows that have a warm score). Rows 400+ are scored
    causally and online; predictions for the training rows are 0 and are not scored.
    """
    cfg = cfg or SkabConfig()
    started = time.perf_counter()
    sensors, files, free = skabdata.load_skab(Path(data))
    if free is None:
        raise ValueError(f"{data}: anomaly-free/anomaly-free.csv is missing")
    log(f"SKAB: {len(files)} files, {len(sensors)} sensors, anomaly-free file of {len(free)} rows")
    tr = skabdata.TRAIN_ROWS
    scale = np.maximum(free.std(axis=0), 1e-9)
    z = [(f.values - f.values[:tr].mean(axis=0)) / scale for f in files]
    free_z = (free - free[:tr].mean(axis=0)) / scale
    out_dir = Path(out) if out is not None else None
    model_dir = (out_dir or Path(".iotad/evaluate")) / "skab-model"
    t0 = time.perf_counter()
    artifact, metrics = fit_model(
        [free_z, *[x[:tr] for x in z]],
        tuple(sensors),
        cfg.model,
        model_dir,
        {"source": "SKAB anomaly-free file + first 400 rows of each file", "files": len(files) + 1},
    )
    train_s = time.perf_counter() - t0
    log(
        f"trained in {train_s:.1f}s (val mse {metrics['val_mse']:.4f}, "
        f"persistence {metrics['persistence_val_mse']:.4f})"
    )
    scoring = ScoringConfig(
        warmup_steps=cfg.warmup_steps,
        halflife_steps=cfg.halflife_steps,
        learn_from_anomalies=cfg.learn_from_anomalies,
        burnin_steps=cfg.burnin_steps,
    )
    threshold = skab_threshold(cfg, len(sensors))
    det = Detector(artifact, scoring, threshold, device="cpu", capacity=len(files))
    if cfg.slow_autocorrelation is not None:
        slots = np.array([det.slot(f.name) for f in files], np.int64)
        slow = np.array([slow_features(x[:tr], cfg.slow_lag, cfg.slow_autocorrelation) for x in z])
        threshold.set_slow(slots, slow)
        log(f"slow sensors (files): {dict(zip(sensors, slow.sum(axis=0).tolist(), strict=True))}")
    streamed = stream(det, z, [f.name for f in files])
    log(f"streamed {streamed.steps} batched steps in {streamed.seconds:.1f}s")
    found = skabdata.detect(files, streamed.score, streamed.threshold, cfg.alarm_grid, cfg.far_budget)
    log(f"alarm levels: outliers {found.alarms.outlier}, changepoints {found.alarms.changepoint}")
    if export is not None:
        found.export(Path(export), files)
    if out_dir is not None and plots:
        for f, x, sc, th, p in zip(files, z, streamed.score, streamed.threshold, found.outliers, strict=True):
            path = out_dir / "skab" / f"{f.name.replace('/', '__')}.png"
            _plot_skab(path, f, sensors, x, sc, found.alarms.outlier * th, p)
    summary: dict[str, Any] = {
        "dataset": "skab",
        "files": len(files),
        **found.summary(files),
        "seconds": {
            "train": round(train_s, 1),
            "stream": round(streamed.seconds, 1),
            "total": round(time.perf_counter() - started, 1),
        },
        "model": _model_summary(artifact, metrics, cfg.model),
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "skab.json").write_text(json.dumps({**summary, "config": asdict(cfg)}, indent=1, default=str))
    return summary


def _plot_skab(
    path: Path,
    f: skabdata.SkabFile,
    sensors: Sequence[str],
    z: np.ndarray,
    score: np.ndarray,
    thr: np.ndarray,
    pred: np.ndarray,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(len(z))
    fig, (a, b) = plt.subplots(2, 1, figsize=(14, 6), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for j, name in enumerate(sensors):
        a.plot(t, z[:, j], lw=0.6, label=name)
    lab = f.anomaly == 1
    for ax in (a, b):
        ax.fill_between(t, 0, 1, where=lab, transform=ax.get_xaxis_transform(), color="gold", alpha=0.3)
        ax.axvspan(0, skabdata.TRAIN_ROWS, color="grey", alpha=0.15)
        for c in np.flatnonzero(f.changepoint == 1):
            ax.axvline(c, color="orange", lw=0.8)
    a.scatter(
        t[pred == 1],
        np.full(int(pred.sum()), float(np.nanmin(z)) if len(z) else 0.0),
        color="red",
        s=4,
        label="detection",
    )
    a.set_title(f"SKAB {f.name}: sensors (centred, anomaly-free std units); yellow = labelled anomaly")
    a.legend(loc="upper left", fontsize=6, ncol=3)
    b.plot(t, score, lw=0.6, color="black", label="score")
    b.plot(t, np.where(np.isfinite(thr), thr, np.nan), color="red", ls="--", lw=0.8, label="threshold")
    finite = score[np.isfinite(score)]
    if len(finite):
        b.set_ylim(0, float(np.quantile(finite, 0.995)) * 1.3 + 1e-9)
    b.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


NAB_PUBLISHED = {  # standard / low-FP / low-FN on the same 53 files, as quoted in the issue
    "ARTime": (78.7, 70.0, 84.0),
    "Numenta HTM": (74.0, 68.2, 77.9),
    "CAD OSE": (73.8, 71.4, 77.1),
    "windowed Gaussian": (43.7, 24.6, 52.0),
}
NAB_PROFILE_NAMES = ("standard", "reward_low_FP_rate", "reward_low_FN_rate")
# The headline figures of each benchmark, as summarised over training seeds by :func:`seed_spread`.
SEED_FIGURES = {"nab": NAB_PROFILE_NAMES, "skab": ("f1", "far", "mar", "nab_standard")}
CELLS = ("lstm", "gru")


def seed_spread(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Headline figures of runs that differ only in the forecaster's training seed (the harness's one
    random choice): per figure, and for the forecaster's validation MSE, the values in run order, their
    median, min and max."""
    spread: dict[str, Any] = {"seeds": [s["model"]["seed"] for s in summaries]}
    columns = {key: [s[key] for s in summaries] for key in SEED_FIGURES[summaries[0]["dataset"]]}
    columns["val_mse"] = [s["model"]["val_mse"] for s in summaries]
    for key, values in columns.items():
        spread[key] = {"values": values, "median": float(np.median(values)), "min": min(values), "max": max(values)}
    return spread


def evaluate_streaming(
    dataset: str,
    data: Path,
    *,
    cell: str = "lstm",
    seeds: int = 1,
    out: Path,
    export: Path | None = None,
    plots: bool = True,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """:func:`run_nab` or :func:`run_skab` with the forecaster ``cell``, trained with seed 0. With ``seeds``
    > 1 the whole run is repeated with seeds 1, 2, ... (their models under ``out/seed-<k>``, no plots or
    exports) and the summary of seed 0 gains ``seed_spread``: how much of a figure is the seed's."""
    if dataset not in SEED_FIGURES:
        raise ValueError(f"dataset must be nab or skab, not {dataset!r}")
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, not {cell!r}")
    summaries = []
    for seed in range(max(1, seeds)):
        model = ModelConfig(cell=cell, seed=seed)
        first = seed == 0
        run_out = out if first else out / f"seed-{seed}"
        kwargs: dict[str, Any] = {
            "out": run_out,
            "export": export if first else None,
            "plots": plots and first,
            "log": log if first else lambda _: None,
        }
        if dataset == "nab":
            summary = run_nab(data, NabConfig(model=model), **kwargs)
        else:
            summary = run_skab(data, SkabConfig(model=model), **kwargs)
        if not first:
            log(f"seed {seed}: " + ", ".join(f"{k} {summary[k]}" for k in SEED_FIGURES[dataset]))
        summaries.append(summary)
    if len(summaries) > 1:
        summaries[0]["seed_spread"] = seed_spread(summaries)
    return summaries[0]


def summary_table(summary: dict[str, Any]) -> Any:
    """A rich table of a :func:`run_nab` / :func:`run_skab` summary, with the published figures."""
    from rich.table import Table

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    spread = summary.get("seed_spread")

    def seed_rows(table: Any, spread: dict[str, Any], keys: Sequence[str], pad: int = 0) -> None:
        seeds = f"{spread['seeds'][0]}-{spread['seeds'][-1]}"
        table.add_row(
            f"[dim]seeds {seeds}: median[/]", *(f"[dim]{fmt(spread[k]['median'])}[/]" for k in keys), *[""] * pad
        )
        half = ((spread[k]["max"] - spread[k]["min"]) / 2 for k in keys)
        table.add_row("[dim]  half-range[/]", *(f"[dim]±{h:.2g}[/]" for h in half), *[""] * pad)

    if summary["dataset"] == "nab":
        table = Table(title=f"NAB, {summary['series']} series (normalised scores, one threshold per profile)")
        table.add_column("")
        for name in NAB_PROFILE_NAMES:
            table.add_column(name, justify="right")
        for cat, scores in summary["categories"].items():
            table.add_row(cat, *[fmt(scores.get(n)) for n in NAB_PROFILE_NAMES])
        table.add_row("[bold]all (iotad)[/]", *[f"[bold]{fmt(summary.get(n))}[/]" for n in NAB_PROFILE_NAMES])
        if spread:
            seed_rows(table, spread, NAB_PROFILE_NAMES)
        table.add_row("threshold", *[f"{summary['thresholds'][n]:.5f}" for n in NAB_PROFILE_NAMES])
        table.add_row(
            "windows tp/fn, fp",
            *[f"{w['tp']}/{w['fn']}, {w['fp']}" for w in (summary["windows"][n] for n in NAB_PROFILE_NAMES)],
        )
        for det, vals in NAB_PUBLISHED.items():
            table.add_row(f"[dim]{det} (published)[/]", *[f"[dim]{v:.1f}[/]" for v in vals])
        return table
    table = Table(title=f"SKAB, {summary['files']} files (rows 400+ of each file scored)")
    table.add_column("")
    table.add_column("F1", justify="right")
    table.add_column("FAR %", justify="right")
    table.add_column("MAR %", justify="right")
    table.add_column("CP std", justify="right")
    table.add_column("CP lowFP", justify="right")
    table.add_column("CP lowFN", justify="right")
    table.caption = "CP: NAB changepoint score (60 s windows); pub.: published on the same 30 files"
    table.add_row(
        "[bold]iotad[/]",
        *[fmt(summary[k]) for k in ("f1", "far", "mar", "nab_standard", "nab_low_fp", "nab_low_fn")],
    )
    if spread:
        seed_rows(table, spread, SEED_FIGURES["skab"], pad=2)
    if "alarms" in summary:
        a = summary["alarms"]
        table.caption += f"; alarm levels x the calibrated threshold: outliers {a['outlier']}, CP {a['changepoint']}"
    table.add_row("[dim]Conv-AE pub.[/]", "[dim]0.79[/]", "[dim]13.09[/]", "[dim]27.86[/]", "", "", "")
    table.add_row("[dim]MSET pub.[/]", "[dim]0.78[/]", "", "", "", "", "")
    table.add_row("[dim]LSTM-AE pub.[/]", "[dim]0.74[/]", "", "", "", "", "")
    table.add_row("[dim]MSCRED pub.[/]", "", "", "", "[dim]31.9[/]", "", "")
    return table


__all__ = [
    "ModelConfig",
    "NabConfig",
    "SkabConfig",
    "evaluate_streaming",
    "run_nab",
    "run_skab",
    "seed_spread",
    "stream",
    "summary_table",
]
