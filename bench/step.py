"""The batched detector step alone, per device (cpu, cuda) and fleet size: readings/s.

``python -m bench.step --devices cpu,cuda --batches 1024,10000,100000,1000000 --json``

Each timing is one full :meth:`Detector.step` (gather state, score, one recurrent step, scatter,
results back on the host) for B distinct devices, the median of repeated runs after a warm-up. It
also checks that the CUDA step agrees with the CPU step on the same inputs (max abs difference of
the forecasts), so the GPU path is verified where it is measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np
import torch

from models import DEFAULT_MODEL_DIR
from models.artifact import load_artifact
from models.detector import Detector
from models.scoring import ScoringConfig, StaticThreshold


def _detector(device: str, batch: int) -> tuple[Detector, np.ndarray]:
    det = Detector(
        load_artifact(DEFAULT_MODEL_DIR, device=device),
        ScoringConfig(),
        StaticThreshold(5.0),
        device=device,
        capacity=batch,
    )
    for i in range(batch):
        det.slot(f"d{i}")
    return det, np.arange(batch, dtype=np.int64)


def measure(device: str, batch: int, seconds: float = 2.0) -> dict[str, Any]:
    det, slots = _detector(device, batch)
    rng = np.random.default_rng(0)
    xs = [
        rng.normal(size=(batch, det.n_features)) * det.artifact.normaliser.std + det.artifact.normaliser.mean
        for _ in range(4)
    ]
    for x in xs:  # warm-up (CUDA context, allocator, kernels)
        det.step(slots, x)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline or len(times) < 3:
        t = time.perf_counter()
        det.step(slots, xs[i % 4])
        times.append(time.perf_counter() - t)
        i += 1
    med = statistics.median(times)
    return {"device": device, "batch": batch, "step_ms": round(med * 1000, 3), "readings_per_s": round(batch / med)}


def agreement(batch: int = 4096, steps: int = 20) -> float:
    """Max |forecast_cuda - forecast_cpu| over ``steps`` steps of ``batch`` devices."""
    cpu, slots = _detector("cpu", batch)
    gpu, _ = _detector("cuda", batch)
    rng = np.random.default_rng(1)
    worst = 0.0
    for _ in range(steps):
        x = rng.normal(size=(batch, cpu.n_features)) * cpu.artifact.normaliser.std + cpu.artifact.normaliser.mean
        a, b = cpu.step(slots, x), gpu.step(slots, x)
        diff = np.nan_to_num(np.abs(a.forecast - b.forecast))
        worst = max(worst, float(diff.max()))
    return worst


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", default="cpu,cuda")
    p.add_argument("--batches", default="1024,10000,100000")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    devices = [d for d in a.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    runs = [measure(d, int(b)) for d in devices for b in a.batches.split(",")]
    out: dict[str, Any] = {"torch": torch.__version__, "runs": runs}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cuda_vs_cpu_max_abs_diff"] = agreement()
    for r in runs:
        print(
            f"{r['device']:>5} B={r['batch']:>8}: {r['step_ms']:>9.3f} ms/step  {r['readings_per_s']:>12,} readings/s"
        )
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
