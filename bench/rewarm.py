"""How long a model swap's re-warm takes: N devices, each re-run through its history with the new model.

``python -m bench.rewarm --devices 10000 --json``: builds a processor with N devices that each have a
full history ring, swaps in a new detector, and times the batched re-warm of all of them (what the
first micro-batch after a swap pays when every device is in it).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from pipeline.app import build_detector, build_processor
from pipeline.processor import BatchResult
from pipeline.settings import Settings


def rewarm_seconds(n_devices: int, settings: Settings) -> dict[str, float]:
    proc = build_processor(settings, build_detector(settings))
    rng = np.random.default_rng(0)
    mean, std = proc.detector.artifact.normaliser.mean, proc.detector.artifact.normaliser.std
    ids = [f"d{i}" for i in range(n_devices)]
    for dev in ids:
        proc.history.extend(proc._device(dev).row, mean + std * rng.normal(size=(settings.history_steps, len(mean))))
    proc.swap(build_detector(settings))
    res = BatchResult()
    t = time.perf_counter()
    proc._prepare({dev: [] for dev in ids}, res)
    elapsed = time.perf_counter() - t
    return {
        "devices": n_devices,
        "history_steps": settings.history_steps,
        "rewarm_s": round(elapsed, 3),
        "rewarmed": res.rewarmed,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    out = rewarm_seconds(a.devices, Settings())
    print(json.dumps(out) if a.json else out)


if __name__ == "__main__":
    main()
