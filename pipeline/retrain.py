"""The retraining job (``iotad retrain``): recent scored history -> candidate -> champion/challenger gate.

One run (:func:`run_once`, CronJob friendly: it runs once and exits):

1. **Champion.** The registry's champion, if any, is fetched and verified first (a broken champion
   stops the run before any training: a human must look at the registry).
2. **Data.** The last ``IOTAD_RETRAIN_HISTORY_HOURS`` of the pipeline's own output in InfluxDB
   (measurement ``anomaly_scores``: the resampled readings are its ``value_<sensor>`` fields), read
   with the v1 query API as ``SELECT /^value_/ FROM anomaly_scores WHERE <window> AND is_anomaly =
   false GROUP BY device`` — points the detector flagged as anomalous are left out, so the model is
   not taught that faults are normal. Queries go by batches of devices sized from a first ``count()``
   query, so no response is unbounded; the same absolute ``(since, until]`` window is used by all.
3. **Series.** Per device, time-ordered on the step grid (``IOTAD_STEP_MS``; duplicate steps, e.g.
   the same step scored by two model versions, are merged). Missing steps — the excluded anomalies,
   dropped readings — are handled as the live pipeline handles gaps: up to ``IOTAD_MAX_GAP_STEPS`` in a
   row become masked rows (forward-filled inputs, never a loss target nor scored); a longer gap ends
   the run, and the next run is a new series starting from a zero state. Runs with fewer than
   ``IOTAD_RETRAIN_MIN_DEVICE_POINTS`` real rows are dropped. Fewer than ``IOTAD_RETRAIN_MIN_POINTS``
   usable points in all: the run ends with an ``insufficient-data`` report and exit code 0.
4. **Candidate.** :func:`models.training.train` (seeded; the champion's architecture when there is
   one, so that a swap changes weights, not the model's shape). Every series is split in time:
   train, then validation (early stopping), then the most recent ``test_fraction`` — the **evaluation
   slice**, which neither training nor early stopping has seen.
5. **Gate.** Candidate and champion are scored on the same evaluation slice with
   :func:`models.training.evaluate_forecaster` (one-step forecast MSE, state warmed up on everything
   before the slice). Each model reads inputs normalised with its *own* normaliser, but both MSEs are
   expressed in one unit — the candidate's normalisation, i.e. the current data's scale — otherwise a
   champion fitted on data of another spread would be judged in other units. The candidate (which is
   registered either way, as ``candidate``) is promoted iff there is no champion, or
   ``candidate_mse <= champion_mse * (1 - IOTAD_RETRAIN_MARGIN)``.
6. **Report and notify.** The report (metrics of both, decision and why, data window and sizes) is
   written to the registry (``reports/``) and logged; on promotion a ``model-updated`` message goes to
   ``<prefix>.control`` (see :mod:`pipeline.control`).

:func:`run_loop` repeats runs every ``IOTAD_RETRAIN_INTERVAL_S`` and also wakes up on a
``retrain-request`` control message. Only one retrainer may run at a time (the registry has a single
writer; see :mod:`models.registry`).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from connectors.influx import InfluxQueryError, influx_v1_query, quote_ident
from models.artifact import METADATA, Artifact, ArtifactError, Normaliser, load_artifact
from models.forecaster import Forecaster, State
from models.registry import ModelRegistry, RegistryError, open_registry, utc_now
from models.training import TrainConfig, evaluate_forecaster, save_trained, train
from pipeline import control
from pipeline.settings import Settings

log = logging.getLogger(__name__)

VALUE_PREFIX = "value_"
# Rows asked for in one query at most (devices are batched by their counted points).
MAX_ROWS_PER_QUERY = 250_000

DECISION_PROMOTED = "promoted"
DECISION_KEPT = "kept-champion"
DECISION_INSUFFICIENT = "insufficient-data"
DECISION_ERROR = "error"


# --------------------------------------------------------------------------------------------- data


@dataclass
class History:
    """Training series built from the scored history; ``series[i]`` is one contiguous run of a device."""

    series: list[np.ndarray]  # each (T_i, F) float64, NaN rows where a step is missing
    mask: list[np.ndarray]  # each (T_i,) bool, True = missing step or incomplete row (not a target)
    features: list[str]
    runs: list[dict[str, Any]] = field(default_factory=list)  # per series: device, first/last ts, steps
    points: int = 0  # real rows in the kept runs
    filled_steps: int = 0  # masked rows inserted for short gaps
    dropped_points: int = 0  # real rows in runs too short to keep

    @property
    def devices(self) -> int:
        return len({r["device"] for r in self.runs})


def _merge_duplicates(ts: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort by time; rows of one step are merged, a later row's finite values winning."""
    order = np.argsort(ts, kind="stable")
    ts, values = ts[order], values[order]
    unique, first = np.unique(ts, return_index=True)
    if len(unique) == len(ts):
        return ts, values
    out = values[first].copy()
    for i in np.flatnonzero(np.diff(ts) == 0) + 1:  # rare: the same step under two tag sets
        j = np.searchsorted(unique, ts[i])
        row = values[i]
        out[j] = np.where(np.isfinite(row), row, out[j])
    return unique, out


def build_series(
    rows: Mapping[str, tuple[np.ndarray, np.ndarray]],
    features: Sequence[str],
    *,
    step_ms: int,
    max_gap_steps: int,
    min_points: int,
) -> History:
    """Per-device ``(ts_ms (n,), values (n, F))`` -> time-ordered runs on the step grid (module docstring, 3)."""
    history = History([], [], list(features))
    for device in sorted(rows):
        ts_raw, values_raw = rows[device]
        if len(ts_raw) == 0:
            continue
        ts, values = _merge_duplicates(np.asarray(ts_raw, np.int64), np.asarray(values_raw, np.float64))
        steps = ts // step_ms
        if len(steps) > 1:  # two timestamps in one step (data at a finer grid): keep the later
            keep = np.append(steps[1:] != steps[:-1], True)
            ts, values, steps = ts[keep], values[keep], steps[keep]
        breaks = np.flatnonzero(np.diff(steps) - 1 > max_gap_steps) + 1
        for lo, hi in zip([0, *breaks.tolist()], [*breaks.tolist(), len(steps)], strict=True):
            run_steps, run_values = steps[lo:hi], values[lo:hi]
            real = int(np.isfinite(run_values).all(axis=1).sum())
            if real < min_points:
                history.dropped_points += hi - lo
                continue
            length = int(run_steps[-1] - run_steps[0]) + 1
            x = np.full((length, len(features)), np.nan)
            x[run_steps - run_steps[0]] = run_values
            masked = ~np.isfinite(x).all(axis=1)
            history.series.append(x)
            history.mask.append(masked)
            history.points += real
            history.filled_steps += length - (hi - lo)
            history.runs.append(
                {"device": device, "first_ts_ms": int(ts[lo]), "last_ts_ms": int(ts[hi - 1]), "steps": length}
            )
    return history


def _string_literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass
class RawHistory:
    """What the queries returned: per-device rows, the value columns seen, and counts."""

    rows: dict[str, tuple[np.ndarray, np.ndarray]]
    sensors: list[str]  # sensors with a value_<sensor> column, in the order first seen
    counts: dict[str, int]  # usable (not anomalous) points per device
    anomalous: int  # points left out because flagged
    truncated: bool  # a response held fewer rows than counted (server row limit?)


def query_history(
    settings: Settings,
    *,
    since_ms: int,
    until_ms: int,
    max_devices: int,
    timeout_s: float = 30.0,
) -> RawHistory:
    """Read the usable scored points of ``(since_ms, until_ms]`` from InfluxDB (v1 query API)."""
    url, db = settings.influx_url, settings.influx_database
    measurement = quote_ident(settings.influx_measurement)
    window = f"time > {int(since_ms)}ms AND time <= {int(until_ms)}ms"

    def per_device(where: str) -> dict[str, int]:
        q = f'SELECT count("is_anomaly") FROM {measurement} WHERE {window}{where} GROUP BY "device"'
        out: dict[str, int] = {}
        for s in influx_v1_query(url, db, q, timeout_s=timeout_s):
            device = (s.get("tags") or {}).get("device")
            if device:
                out[device] = sum(int(v[1] or 0) for v in s.get("values", []))
        return out

    counts = per_device(' AND "is_anomaly" = false')
    anomalous = sum(per_device(' AND "is_anomaly" = true').values())
    chosen = sorted(counts, key=lambda d: (-counts[d], d))[:max_devices]
    counts = {d: counts[d] for d in chosen}

    collected: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]] = {}  # device -> (ts, sensor -> column)
    sensors: list[str] = []
    truncated = False
    batches: list[list[str]] = [[]]
    batch_rows = 0
    for device in sorted(chosen):
        if batches[-1] and batch_rows + counts[device] > MAX_ROWS_PER_QUERY:
            batches.append([])
            batch_rows = 0
        batches[-1].append(device)
        batch_rows += counts[device]
    for devices in batches:
        if not devices:
            continue
        where = " OR ".join(f'"device" = {_string_literal(d)}' for d in devices)
        q = (
            f"SELECT /^{VALUE_PREFIX}/ FROM {measurement} WHERE {window} "
            f'AND "is_anomaly" = false AND ({where}) GROUP BY "device"'
        )
        for s in influx_v1_query(url, db, q, timeout_s=timeout_s):
            name = (s.get("tags") or {}).get("device")
            if not isinstance(name, str):
                continue
            columns: list[str] = s.get("columns", [])
            values = s.get("values", [])
            if not values:
                continue
            names = [c.removeprefix(VALUE_PREFIX) for c in columns[1:]]
            sensors += [n for n in names if n not in sensors]
            table = np.array(
                [[math.nan if v is None else float(v) for v in row[1:]] for row in values], dtype=np.float64
            ).reshape(len(values), len(names))
            ts = np.array([int(row[0]) for row in values], dtype=np.int64)
            collected[name] = (ts, {n: table[:, i] for i, n in enumerate(names)})
            truncated |= len(values) < counts.get(name, 0)
    # Columns by sensor name, so that batches that saw different column sets line up.
    rows = {
        device: (ts, np.column_stack([cols.get(n, np.full(len(ts), np.nan)) for n in sensors]).reshape(len(ts), -1))
        for device, (ts, cols) in collected.items()
    }
    if truncated:
        log.warning("InfluxDB returned fewer rows than counted (a max-row-limit?): training on what came back")
    return RawHistory(rows, sensors, counts, anomalous, truncated)


def choose_features(available: Sequence[str], preferred: Sequence[str] | None) -> list[str]:
    """The model's feature order: ``preferred`` (the champion's, or the served model's) when the data
    has all of them, else the sensors found in the data in the order seen."""
    if preferred and set(preferred) <= set(available):
        return list(preferred)
    return list(available)


def _served_features(settings: Settings) -> list[str] | None:
    """Features of the artifact at IOTAD_MODEL_DIR (what the workers serve when the registry is empty)."""
    try:
        meta = json.loads((Path(settings.model_dir) / METADATA).read_text())
        return [str(f) for f in meta["features"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------------------------- evaluation


class _InUnitsOf(nn.Module):
    """Presents ``model`` (trained with normaliser ``own``) as a forecaster working in ``common`` units.

    Inputs normalised with ``common`` are mapped to ``own`` units before the model reads them, and its
    forecasts mapped back, so :func:`evaluate_forecaster` with ``common`` scores the model exactly as it
    is served, with errors measured in ``common`` units. Both normalisations are per-feature affine.
    """

    def __init__(self, model: Forecaster, own: Normaliser, common: Normaliser) -> None:
        super().__init__()
        self.inner = model
        self.config = model.config
        scale = common.std / own.std
        shift = (common.mean - own.mean) / own.std
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.float32))

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        scale, shift = cast(torch.Tensor, self.scale), cast(torch.Tensor, self.shift)
        out, new = self.inner(x * scale + shift, state)
        return (out - shift) / scale, new


def evaluate_in_units(
    model: Forecaster,
    own: Normaliser,
    common: Normaliser,
    series: Sequence[np.ndarray],
    *,
    start: Sequence[int],
    mask: Sequence[np.ndarray],
) -> dict[str, float]:
    """:func:`evaluate_forecaster` of ``model`` (fed with its own normaliser), errors in ``common`` units."""
    wrapped = cast(Forecaster, _InUnitsOf(model, own, common))
    return evaluate_forecaster(wrapped, common, series, start=start, mask=mask)


# --------------------------------------------------------------------------------------------- the run


def train_config(settings: Settings, champion: Artifact | None) -> TrainConfig:
    """Training settings of a run: the champion's architecture (if any) and the IOTAD_RETRAIN_* limits."""
    arch: dict[str, Any] = {}
    if champion is not None:
        c = champion.model.config
        arch = {"cell": c.cell, "hidden": c.hidden, "layers": c.layers, "dropout": c.dropout}
    return TrainConfig(
        **arch,
        max_epochs=settings.retrain_max_epochs,
        max_batches_per_epoch=settings.retrain_max_batches or None,
        seed=settings.retrain_seed,
    )


def new_version(now: datetime | None = None) -> str:
    """``r<UTC time>-<6 hex>``: sortable, and unique even for two runs within a second."""
    now = now or datetime.now(UTC)
    return f"r{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def decide(candidate_mse: float, champion_mse: float | None, margin: float) -> tuple[bool, str]:
    """``(promote, reason)`` of the champion/challenger gate."""
    if not _finite(candidate_mse):
        return False, "the candidate's MSE on the evaluation slice is not finite (no targets?)"
    if champion_mse is None:
        return True, "no champion yet"
    if not _finite(champion_mse):
        return True, "the champion's MSE on the evaluation slice is not finite"
    bar = champion_mse * (1.0 - margin)
    if candidate_mse <= bar:
        return True, f"candidate MSE {candidate_mse:.6g} <= champion {champion_mse:.6g} x (1 - {margin:g}) = {bar:.6g}"
    return False, f"candidate MSE {candidate_mse:.6g} > champion {champion_mse:.6g} x (1 - {margin:g}) = {bar:.6g}"


def run_once(
    settings: Settings,
    *,
    config: TrainConfig | None = None,
    registry: ModelRegistry | None = None,
    until_ms: int | None = None,
    notify: bool = True,
) -> dict[str, Any]:
    """One retraining run; returns the report (also written to the registry and logged).

    ``config`` overrides :func:`train_config`; ``until_ms`` the end of the data window (default: now).
    Expected failures (InfluxDB unreachable, broken champion, bad registry, data the trainer refuses)
    give a report with decision ``error`` instead of an exception.
    """
    started = time.perf_counter()
    registry = registry or open_registry(settings.registry)
    until = int(until_ms if until_ms is not None else time.time() * 1000)
    since = until - int(settings.retrain_history_hours * 3_600_000)
    report: dict[str, Any] = {
        "type": "retrain-report",
        "version": None,
        "started_at": utc_now(),
        "registry": registry.url,
        "margin": settings.retrain_margin,
        "data": {
            "source": "influxdb",
            "url": settings.influx_url,
            "database": settings.influx_database,
            "measurement": settings.influx_measurement,
            "history_hours": settings.retrain_history_hours,
            "since_ms": since,
            "until_ms": until,
        },
        "candidate": None,
        "champion": None,
        "promoted": False,
        "notified": None,
    }
    try:
        _run(settings, registry, report, config, notify)
    except (InfluxQueryError, ArtifactError, RegistryError, OSError, ValueError) as exc:
        report["decision"] = DECISION_ERROR
        report["reason"] = f"{type(exc).__name__}: {exc}"
        log.error("retraining failed: %s", report["reason"])
    report["seconds"] = round(time.perf_counter() - started, 3)
    report["finished_at"] = utc_now()
    try:
        report["report"] = registry.write_report(report)
    except Exception as exc:  # storage down: the log still has the report
        log.error("cannot write the retraining report to %s: %s", registry.url, exc)
        report["report"] = None
    log.info("retraining report: %s", json.dumps(report, sort_keys=True, default=str))
    return report


def _run(
    settings: Settings,
    registry: ModelRegistry,
    report: dict[str, Any],
    config: TrainConfig | None,
    notify: bool,
) -> None:
    data = report["data"]
    # 1. The champion, verified before anything else.
    champion_version = registry.champion()
    champion: Artifact | None = None
    if champion_version is not None:
        cached = registry.fetch(champion_version, Path(settings.data_dir) / "model-cache")
        champion = load_artifact(cached)
        report["champion"] = {"version": champion_version, "sha256": registry.info(champion_version).sha256}

    # 2.-3. Data and series.
    raw = query_history(
        settings, since_ms=data["since_ms"], until_ms=data["until_ms"], max_devices=settings.retrain_max_devices
    )
    preferred = list(champion.features) if champion is not None else _served_features(settings)
    features = choose_features(raw.sensors, preferred)
    if champion is not None and tuple(features) != champion.features:
        raise ArtifactError(
            f"the data has sensors {raw.sensors}, not all of the champion's {list(champion.features)}; "
            "a candidate would not be a drop-in replacement"
        )
    feature_rows = {d: (ts, table[:, [raw.sensors.index(f) for f in features]]) for d, (ts, table) in raw.rows.items()}
    history = build_series(
        feature_rows,
        features,
        step_ms=settings.step_ms,
        max_gap_steps=settings.max_gap_steps,
        min_points=settings.retrain_min_device_points,
    )
    first = min((r["first_ts_ms"] for r in history.runs), default=None)
    last = max((r["last_ts_ms"] for r in history.runs), default=None)
    data.update(
        {
            "features": features,
            "devices_seen": len(raw.counts),
            "devices": history.devices,
            "series": len(history.series),
            "points": history.points,
            "points_counted": sum(raw.counts.values()),
            "anomalous_points_excluded": raw.anomalous,
            "gap_steps_masked": history.filled_steps,
            "points_in_short_runs_dropped": history.dropped_points,
            "first_ts_ms": first,
            "last_ts_ms": last,
            "truncated": raw.truncated,
        }
    )
    if history.points < settings.retrain_min_points or not history.series:
        report["decision"] = DECISION_INSUFFICIENT
        report["reason"] = (
            f"{history.points} usable points in {len(history.series)} runs; "
            f"at least {settings.retrain_min_points} needed (IOTAD_RETRAIN_MIN_POINTS)"
        )
        return

    # 4. Candidate.
    cfg = config or train_config(settings, champion)
    version = new_version()
    report["version"] = version
    result = train(history.series, features, cfg, mask=history.mask, progress=False)
    starts = [n + v for n, v in zip(result.split["train"], result.split["val"], strict=True)]
    common = result.normaliser
    cand_eval = evaluate_forecaster(result.model, common, history.series, start=starts, mask=history.mask)

    # 5. Gate.
    champ_eval: dict[str, float] | None = None
    if champion is not None:
        champ_eval = evaluate_in_units(
            champion.model, champion.normaliser, common, history.series, start=starts, mask=history.mask
        )
    promote, reason = decide(
        cand_eval["mse"], None if champ_eval is None else champ_eval["mse"], settings.retrain_margin
    )

    description = {k: v for k, v in data.items() if k != "url"}
    with tempfile.TemporaryDirectory(prefix="iotad-retrain-") as tmp:
        save_trained(result, Path(tmp) / version, version=version, data_description=description)
        registry.register(
            Path(tmp) / version,
            metrics={"eval_mse": cand_eval["mse"], "eval_persistence_mse": cand_eval["persistence_mse"]},
            source="iotad retrain",
        )
    info = registry.info(version)
    report["candidate"] = {
        "version": version,
        "sha256": info.sha256,
        "eval_mse": cand_eval["mse"],
        "eval_persistence_mse": cand_eval["persistence_mse"],
        "eval_targets": cand_eval["targets"],
        "config": {k: getattr(cfg, k) for k in ("cell", "hidden", "layers", "max_epochs", "seed")},
        "training": {k: result.metrics[k] for k in ("train_mse", "val_mse", "test_mse", "epochs", "best_epoch")},
    }
    if champ_eval is not None:
        report["champion"].update(
            {
                "eval_mse": champ_eval["mse"],
                "eval_persistence_mse": champ_eval["persistence_mse"],
                "eval_targets": champ_eval["targets"],
            }
        )
    report["evaluation"] = {
        "slice": f"the last {cfg.test_fraction:g} of every series (held out from training and early stopping)",
        "units": "MSE of the one-step forecast, in the candidate's normalised units (the current data's scale)",
        "targets": cand_eval["targets"],
    }
    report["reason"] = reason
    if not promote:
        report["decision"] = DECISION_KEPT
        return

    # 6. Promote and notify.
    registry.promote(version, reason=f"iotad retrain: {reason}")
    report["decision"] = DECISION_PROMOTED
    report["promoted"] = True
    if notify:
        local = registry.local_path(version)
        message = control.model_updated(
            version,
            registry.url,
            sha256=info.sha256,
            previous=champion_version,
            path=None if local is None else str(local),
        )
        try:
            control.publish(settings.kafka_bootstrap, settings.control_topic, message)
            report["notified"] = True
        except Exception as exc:  # the registry is updated; workers catch up on their next poll/restart
            report["notified"] = False
            report["notify_error"] = f"{type(exc).__name__}: {exc}"
            log.error("promoted %s but could not publish %s: %s", version, control.MODEL_UPDATED, exc)


def exit_code(report: Mapping[str, Any]) -> int:
    """0: ran (promoted, kept or not enough data); 1: error; 2: promoted but the notification failed."""
    if report.get("decision") == DECISION_ERROR:
        return 1
    if report.get("notified") is False:
        return 2
    return 0


def run_loop(
    settings: Settings,
    *,
    interval_s: float,
    config: TrainConfig | None = None,
    max_runs: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    listen: bool = True,
    on_report: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Run every ``interval_s`` (and on a ``retrain-request``) until ``should_stop()`` or ``max_runs``.

    Returns the number of runs. A failing run is logged and the loop goes on.
    """
    listener: control.ControlListener | None = None
    if listen:
        try:
            listener = control.ControlListener(settings.kafka_bootstrap, settings.control_topic)
        except Exception as exc:
            log.warning("not listening for %s on %s: %s", control.RETRAIN_REQUEST, settings.control_topic, exc)
    runs = 0
    try:
        while not should_stop() and (max_runs is None or runs < max_runs):
            try:
                report = run_once(settings, config=config)
                if on_report is not None:
                    on_report(report)
            except Exception:
                log.exception("retraining run failed")
            runs += 1
            if max_runs is not None and runs >= max_runs:
                break
            deadline = time.monotonic() + interval_s
            while not should_stop():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if listener is None:
                    time.sleep(min(remaining, 1.0))
                    continue
                request = listener.wait((control.RETRAIN_REQUEST,), min(remaining, 1.0))
                if request is not None:
                    log.info("retrain requested: %s", request)
                    break
    finally:
        if listener is not None:
            listener.close()
    return runs
