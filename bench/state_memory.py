"""Memory per device of the worker's state, no I/O: ``python -m bench.state_memory --json``.

For each fleet size N and threshold method, a fresh :class:`~pipeline.processor.Processor` and
:class:`~models.detector.Detector` (as the worker builds them, CPU) receive ``steps`` single readings of
each of N devices (so every device has a window, a history ring, a recurrent state, error statistics and
threshold state), and the benchmark reports per device:

* ``traced_bytes``: Python objects and numpy arrays allocated and still held (``tracemalloc``, which
  numpy reports its buffers to), plus the detector's torch state tensors (which it does not see);
  capacity slack included: the detector's arrays grow by doubling, so at N just above a power of two
  nearly half the rows are spare;
* ``checkpoint_bytes``: the mean size of a device's checkpoint blob (what the changelog stores);
* ``rss_growth_bytes``: the process's resident memory growth over the same work (allocator overheads
  and freed-but-kept pages included; noisier).

The last line of stdout (with ``--json``) is one JSON object with every run under ``runs``.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tracemalloc
from typing import Any

import numpy as np
import torch

from pipeline.app import build_detector, build_processor
from pipeline.processor import Inbound
from pipeline.schema import encode_reading
from pipeline.settings import Settings

T0 = 1_795_341_600_000
STEP_MS = 1000
BATCH = 2000  # messages per process() call, the agent's micro-batch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(n_devices: int, method: str, steps: int = 3) -> dict[str, Any]:
    settings = Settings(device="cpu", warmup_steps=5, step_ms=STEP_MS, max_gap_steps=10, threshold_method=method)
    detector = build_detector(settings)
    features = detector.artifact.features
    messages = [
        [
            Inbound(
                f"d{i}".encode(),
                encode_reading(f"d{i}", T0 + s * STEP_MS, dict.fromkeys(features, 1.0 + 0.01 * s)),
                "t",
                0,
                s * n_devices + i,
            )
            for i in range(n_devices)
        ]
        for s in range(steps)
    ]
    gc.collect()
    rss0 = _rss_bytes()
    tracemalloc.start()
    processor = build_processor(settings, detector)
    for s, batch in enumerate(messages):
        for k in range(0, n_devices, BATCH):
            processor.process(batch[k : k + BATCH], T0 + s * STEP_MS)
    gc.collect()
    traced, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = _rss_bytes()
    tensors = sum(t.numel() * t.element_size() for t in detector.state)  # (h, c) per layer: the recurrent state
    devices = sorted(processor.devices)
    sample = devices[:: max(1, len(devices) // 1000)]
    blobs = processor.checkpoint(set(sample))
    return {
        "devices": n_devices,
        "threshold_method": method,
        "capacity": int(detector.capacity),
        "traced_bytes": round((traced + tensors) / n_devices),
        "torch_state_bytes": round(tensors / n_devices),
        "checkpoint_bytes": round(float(np.mean([len(b) for _, b in blobs.values()]))),
        "rss_growth_bytes": round((rss1 - rss0) / n_devices),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="1000,65536,100000", help="comma-separated fleet sizes")
    ap.add_argument("--methods", default="static,ensemble", help="comma-separated IOTAD_THRESHOLD_METHOD values")
    ap.add_argument("--json", action="store_true", dest="as_json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    runs = []
    for method in args.methods.split(","):
        for n in (int(d) for d in args.devices.split(",")):
            run = measure(n, method)
            print(json.dumps(run), file=sys.stderr, flush=True)
            runs.append(run)
    result = {"runs": runs}
    if args.as_json:
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
