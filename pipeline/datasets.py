"""Training data sources for ``iotad train``: the fetch half of the trainer (the fit is models.training)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from connectors.replay import load_csv_series
from connectors.simulator import DEFAULT_SENSORS, FleetSimulator


@dataclass
class Dataset:
    series: list[np.ndarray]  # each (T_i, F)
    features: list[str]
    mask: list[np.ndarray] | None = None  # each (T_i,) True = exclude from the loss
    description: dict[str, Any] = field(default_factory=dict)


def simulator_dataset(
    devices: int, steps: int, *, seed: int = 1, step_ms: int = 1000, anomaly_rate: float = 1.0
) -> Dataset:
    """Simulated fleet history; injected anomalies are masked out of the loss (as flagged points
    would be in production)."""
    sim = FleetSimulator(devices, seed=seed, step_ms=step_ms, start_ts_ms=0, anomaly_rate=anomaly_rate)
    s = sim.series(steps)
    series = [s.values[:, d, :].astype(np.float64) for d in range(devices)]
    mask = [np.asarray(s.anomaly_mask[:, d, :].any(axis=1)) for d in range(devices)]
    return Dataset(
        series,
        list(DEFAULT_SENSORS),
        mask,
        {
            "source": "simulator",
            "devices": devices,
            "steps": steps,
            "seed": seed,
            "step_ms": step_ms,
            "anomaly_rate": anomaly_rate,
            "anomalies_masked": len(sim.anomalies),
        },
    )


def csv_dataset(path: Path) -> Dataset:
    """One multivariate series from a CSV file (NAB/SKAB layouts are detected)."""
    ts, values, names = load_csv_series(path)
    return Dataset(
        [values.astype(np.float64)],
        names,
        None,
        {"source": "csv", "path": str(path), "rows": len(ts), "first_ts_ms": int(ts[0]), "last_ts_ms": int(ts[-1])},
    )
