"""``iotad demo``: the whole pipeline on the embedded stack, with an accounting of every reading.

Starts the local stack and a worker, streams a simulated fleet (one reading per device per step,
grid-aligned, some malformed messages, injected labelled anomalies) in real time, waits until the
worker has drained, then reconciles what was sent with what came out of the scores topic, the
dead-letter topic and InfluxDB, and plots a few devices.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from connectors.influx import count_points
from connectors.kafka_admin import Record, read_all
from connectors.simulator import Anomaly, FleetSimulator, kinds_fitting, make_producer, run_simulation
from pipeline.settings import Settings
from pipeline.stack import PipelineStack


@dataclass(frozen=True)
class DemoConfig:
    duration_s: float = 60.0
    devices: int = 100
    anomalies: int = 12
    malformed_every: int = 200
    seed: int = 7
    out_dir: Path = Path("out")
    drain_timeout_s: float = 60.0


def _wait_drained(stack: PipelineStack, expected: int, timeout_s: float) -> float:
    """Until the worker has scored ``expected`` steps or stopped making progress."""
    deadline = time.monotonic() + timeout_s
    last, last_change = -1.0, time.monotonic()
    while time.monotonic() < deadline:
        scored = stack.total("iotad_readings_scored_total")
        if scored >= expected:
            return scored
        if scored != last:
            last, last_change = scored, time.monotonic()
        elif time.monotonic() - last_change > 15:
            break
        time.sleep(0.5)
    return stack.total("iotad_readings_scored_total")


def _flagged(anomalies: list[Anomaly], scores: list[dict[str, Any]], step_ms: int, slack_steps: int = 5) -> int:
    """Injected anomalies with at least one flagged step inside their window (+ slack)."""
    flagged_ts: dict[str, list[int]] = defaultdict(list)
    for s in scores:
        if s["is_anomaly"]:
            flagged_ts[s["device_id"]].append(s["ts"])
    hit = 0
    for a in anomalies:
        end = a.end_ts_ms + slack_steps * step_ms
        if any(a.start_ts_ms <= t < end for t in flagged_ts.get(a.device_id, ())):
            hit += 1
    return hit


def run_demo(settings: Settings, cfg: DemoConfig) -> dict[str, Any]:
    steps = int(cfg.duration_s * 1000 / settings.step_ms)
    after = max(settings.warmup_steps + 10, steps // 3)
    horizon = max(steps - 5, after + 10)
    # Long anomalies (level shifts, drifts: up to 240 steps) only fit in long demos.
    kinds = kinds_fitting(horizon - after) or ("spike",)
    sim = FleetSimulator(
        cfg.devices,
        seed=cfg.seed,
        step_ms=settings.step_ms,
        anomaly_count=cfg.anomalies,
        anomalies_after_step=after,
        anomaly_horizon_steps=horizon,
        anomaly_kinds=kinds,
    )
    with PipelineStack(settings) as stack:
        producer = make_producer(stack.bootstrap)
        try:
            stats = run_simulation(
                producer,
                settings.readings_topic,
                sim,
                steps=steps,
                rate_steps_per_s=1000 / settings.step_ms,
                malformed_every=cfg.malformed_every,
                duration_s=cfg.duration_s + 5,
            )
        finally:
            producer.close()
        _wait_drained(stack, stats.readings_sent, cfg.drain_timeout_s)
        scores_raw = read_all(stack.bootstrap, settings.scores_topic, min_records=stats.readings_sent, timeout_s=30)
        dlq = read_all(stack.bootstrap, settings.dlq_topic, min_records=stats.malformed_sent, timeout_s=15)
        influx_points = count_points(
            stack.influx_url, settings.influx_database, settings.influx_measurement, field="threshold"
        )
        metrics_text = stack.procs[0].metrics()
    scores = [msgspec.json.decode(r.value or b"null") for r in scores_raw]
    unique = {(s["device_id"], s["ts"]): s for s in scores}
    latency = np.array([s["emitted_at"] - s["ts"] for s in unique.values()], dtype=np.float64)
    summary = {
        "devices": cfg.devices,
        "steps": stats.steps,
        "readings_sent": stats.readings_sent,
        "malformed_sent": stats.malformed_sent,
        "readings_scored": len(unique),
        "score_messages": len(scores),
        "dead_lettered": len(dlq),
        "dead_letter_reasons": _reasons(dlq),
        "influx_points": influx_points,
        "anomalies_injected": len(stats.anomalies),
        "anomalies_flagged": _flagged(stats.anomalies, list(unique.values()), settings.step_ms),
        "flagged_steps": sum(1 for s in unique.values() if s["is_anomaly"]),
        "p50_latency_ms": float(np.percentile(latency, 50)) if len(latency) else None,
        "p99_latency_ms": float(np.percentile(latency, 99)) if len(latency) else None,
        "metrics_served": "iotad_readings_scored_total" in metrics_text,
        "model_version": scores[0]["model_version"] if scores else None,
    }
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    summary["plot"] = str(plot_devices(list(unique.values()), stats.anomalies, cfg.out_dir / "demo.png"))
    return summary


def _reasons(dlq: list[Record]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for r in dlq:
        out[r.headers.get("iotad-reason", b"?").decode()] += 1
    return dict(out)


def plot_devices(scores: list[dict[str, Any]], anomalies: list[Anomaly], path: Path, n: int = 4) -> Path:
    """Values, forecasts, score vs threshold and flagged points of a few devices (anomalous first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_dev: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in scores:
        by_dev[s["device_id"]].append(s)
    chosen = list(dict.fromkeys([a.device_id for a in anomalies if a.device_id in by_dev] + sorted(by_dev)))[:n]
    fig, axes = plt.subplots(len(chosen), 2, figsize=(14, 3.2 * max(1, len(chosen))), squeeze=False)
    for row, dev in zip(axes, chosen, strict=False):
        rows = sorted(by_dev[dev], key=lambda s: s["ts"])
        t = np.array([(s["ts"] - rows[0]["ts"]) / 1000 for s in rows])
        t0 = rows[0]["ts"]
        sensors = list(rows[0]["values"])
        for sensor in sensors:
            v = np.array([s["values"][sensor] for s in rows])
            mu, sd = v.mean(), v.std() or 1.0
            (line,) = row[0].plot(t, (v - mu) / sd, lw=1, label=sensor)
            f = np.array([np.nan if s["forecast"] is None else s["forecast"][sensor] for s in rows])
            row[0].plot(t, (f - mu) / sd, lw=1, ls="--", color=line.get_color(), alpha=0.7)
        score = np.array([np.nan if s["score"] is None else s["score"] for s in rows])
        row[1].plot(t, score, lw=1, color="tab:blue", label="score")
        row[1].plot(t, [s["threshold"] for s in rows], lw=1, color="tab:red", ls="--", label="threshold")
        warming = [i for i, s in enumerate(rows) if s["status"] == "warming_up"]
        if warming:
            row[1].axvspan(t[0], t[warming[-1]], color="grey", alpha=0.15, label="warming up")
        flagged = [i for i, s in enumerate(rows) if s["is_anomaly"]]
        row[1].scatter(t[flagged], score[flagged], color="tab:red", s=14, zorder=3, label="flagged")
        for a in anomalies:
            if a.device_id == dev:
                for ax in row:
                    ax.axvspan((a.start_ts_ms - t0) / 1000, (a.end_ts_ms - t0) / 1000, color="orange", alpha=0.25)
                row[0].text(
                    (a.start_ts_ms - t0) / 1000,
                    0.95,
                    f"{a.kind}:{a.sensor}",
                    transform=row[0].get_xaxis_transform(),
                    fontsize=8,
                )
        row[0].set_title(f"{dev}: values (solid) and forecasts (dashed), z-scored per sensor", fontsize=9)
        row[1].set_title(f"{dev}: anomaly score vs threshold (orange = injected anomaly)", fontsize=9)
        row[1].set_yscale("symlog")
        row[0].legend(fontsize=7, loc="upper left")
        row[1].legend(fontsize=7, loc="upper left")
        row[1].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
