"""The worker's per-reading Python path alone, no I/O: µs per reading, by stage.

``python -m bench.processor --json`` feeds pre-encoded messages (single readings and envelopes of 10,
100 and 10,000 devices, micro-batches of ``batch_max`` messages like the agent's ``take_events``)
through :meth:`Processor.process` and the two output encodings (``score_line`` for InfluxDB and
``score_json`` for the scores topic). Everything is deterministic (seeded fleet, fixed clock, CPU
model), so ``digest`` (SHA-256 of every line and JSON score produced, warm-up included) must not
change when the code is optimised (for the same arguments). ``--profile`` prints a cProfile of one scenario to stderr.

Stages (µs per reading, median over runs): ``validate`` is :func:`~pipeline.schema.validate` of the
batch on its own (the processor runs it inside ``process``), ``step`` the time inside
``Detector.step``, ``process`` the whole ``Processor.process`` call, ``lines``/``json`` the encodings
of its scores, ``total`` = process + lines + json, ``python`` = total - step (the part this benchmark is for).
``checkpoint`` (not in ``total``) is :meth:`Processor.checkpoint` of the batch's touched devices: what the
worker and the lean loop paid per batch before they checkpointed once per ``IOTAD_CHECKPOINT_INTERVAL_S``,
so now an upper bound (the digest covers the blobs too).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import pstats
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from connectors.simulator import FleetSimulator
from pipeline.app import build_detector, build_processor
from pipeline.processor import BatchResult, Inbound, Processor
from pipeline.records import score_json, score_line
from pipeline.schema import encode_envelope, encode_reading, validate
from pipeline.settings import Settings

T0 = 1_795_341_600_000
STEP_MS = 1000
PARTITIONS = 4
MEASUREMENT = "anomaly_scores"
# Enough warm-up steps that most timed scores are past burn-in and warm-up (scored rows with forecasts).
WARM_STEPS = 12


@dataclass(frozen=True)
class Scenario:
    devices: int
    envelope: int  # readings per message (1: single readings)


def _settings() -> Settings:
    # As the throughput benchmark runs the worker; CPU so the figures and the digest are reproducible.
    return Settings(device="cpu", warmup_steps=5, step_ms=STEP_MS, max_gap_steps=10)


def _messages(sc: Scenario, rounds: int) -> Iterator[Inbound]:
    """``rounds`` rounds of one message per device (each ``envelope`` steps), device-major per round."""
    sim = FleetSimulator(sc.devices, seed=11, step_ms=STEP_MS, start_ts_ms=T0, anomaly_rate=1.0)
    names = list(sim.sensors)
    keys = [dev.encode() for dev in sim.device_ids]
    partition = [zlib.crc32(k) % PARTITIONS for k in keys]
    offsets = [0] * PARTITIONS
    for _ in range(rounds):
        steps = [sim.step_arrays()[:2] for _ in range(sc.envelope)]
        rows = [(ts, v.tolist()) for ts, v in steps]
        for d, dev in enumerate(sim.device_ids):
            if sc.envelope == 1:
                ts, v = rows[0]
                value = encode_reading(dev, ts, dict(zip(names, v[d], strict=True)))
            else:
                value = encode_envelope(dev, [(ts, dict(zip(names, v[d], strict=True))) for ts, v in rows])
            p = partition[d]
            yield Inbound(keys[d], value, "iotad.readings", p, offsets[p])
            offsets[p] += 1


def _chunks(msgs: list[Inbound], size: int) -> list[list[Inbound]]:
    return [msgs[i : i + size] for i in range(0, len(msgs), size)]


class _Timed:
    """Wraps ``Detector.step`` to add up the time spent in it."""

    def __init__(self, step: Callable[..., Any]) -> None:
        self.step, self.seconds = step, 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return self.step(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t


def _encode(proc: Processor, res: BatchResult, now_ms: int) -> tuple[list[str], list[bytes], float, float]:
    sensors = proc.sensors
    t = time.perf_counter()
    lines = [score_line(r, sensors, MEASUREMENT) for r in res.scores]
    t_lines = time.perf_counter() - t
    t = time.perf_counter()
    docs = [score_json(r, sensors, now_ms) for r in res.scores]
    return lines, docs, t_lines, time.perf_counter() - t


def run_scenario(
    sc: Scenario, *, runs: int, run_readings: int, batch_max: int, profile: bool = False
) -> dict[str, Any]:
    settings = _settings()
    proc = build_processor(settings, build_detector(settings))
    timed = _Timed(proc.detector.step)
    proc.detector.step = timed  # type: ignore[method-assign]  # instance-level wrapper, benchmark only
    warm_rounds = -(-WARM_STEPS // sc.envelope)
    batches_per_run = max(1, run_readings // (batch_max * sc.envelope))
    needed = runs * batches_per_run * batch_max
    rounds = warm_rounds + -(-needed // sc.devices)
    msgs = list(_messages(sc, rounds))
    now_ms = T0 + rounds * sc.envelope * STEP_MS
    limits = proc.limits
    digest = hashlib.sha256()

    def feed(batch: list[Inbound]) -> dict[str, float]:
        t = time.perf_counter()
        for m in batch:
            validate(m.value, m.key, limits, now_ms)
        t_validate = time.perf_counter() - t
        step_before = timed.seconds
        t = time.perf_counter()
        res = proc.process(batch, now_ms)
        t_process = time.perf_counter() - t
        lines, docs, t_lines, t_json = _encode(proc, res, now_ms)
        t = time.perf_counter()
        checkpoints = proc.checkpoint(res.dirty)
        t_checkpoint = time.perf_counter() - t
        for dev in sorted(checkpoints):
            digest.update(checkpoints[dev][1])
        for line, doc in zip(lines, docs, strict=True):
            digest.update(line.encode())
            digest.update(doc)
        assert not res.dead and not res.replayed, "the benchmark's fleet sends only valid, fresh readings"
        return {
            "readings": res.readings,
            "scores": len(res.scores),
            "validate": t_validate,
            "step": timed.seconds - step_before,
            "process": t_process,
            "lines": t_lines,
            "json": t_json,
            "checkpoint": t_checkpoint,
            "total": t_process + t_lines + t_json,
            "python": t_process + t_lines + t_json - (timed.seconds - step_before),
        }

    split = warm_rounds * sc.devices
    for batch in _chunks(msgs[:split], batch_max):
        feed(batch)
    timed_batches = _chunks(msgs[split : split + needed], batch_max)
    per_run: list[dict[str, float]] = []
    profiler = cProfile.Profile() if profile else None
    for r in range(runs):
        if profiler is not None:
            profiler.enable()
        totals: dict[str, float] = {}
        for batch in timed_batches[r * batches_per_run : (r + 1) * batches_per_run]:
            for k, v in feed(batch).items():
                totals[k] = totals.get(k, 0.0) + v
        if profiler is not None:
            profiler.disable()
        per_run.append(totals)
    if profiler is not None:
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(30)

    def median_us(stage: str) -> float:
        return round(statistics.median(1e6 * t[stage] / t["readings"] for t in per_run), 2)

    stages = {k: median_us(k) for k in per_run[0] if k not in ("readings", "scores")}
    return {
        "devices": sc.devices,
        "envelope": sc.envelope,
        "batch_max": batch_max,
        "readings_per_run": int(per_run[0]["readings"]),
        "scores_per_run": int(per_run[0]["scores"]),
        "runs": runs,
        "us_per_reading": stages,
        "readings_per_s": round(1e6 / stages["total"]),
        "digest": digest.hexdigest(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--devices", default="100,10000", help="fleet sizes, comma-separated")
    ap.add_argument("--envelopes", default="1,10", help="readings per message, comma-separated")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--run-readings", type=int, default=20_000, help="readings per timed run (at least one batch)")
    ap.add_argument("--batch-max", type=int, default=Settings().batch_max)
    ap.add_argument("--profile", action="store_true", help="cProfile the timed runs (stderr)")
    # One intra-op thread by default: on a shared 2-core machine a second torch thread spin-waits on a busy
    # core and makes the step (not the Python path this measures) dominate and jitter.
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    results = []
    for n in (int(x) for x in args.devices.split(",")):
        for e in (int(x) for x in args.envelopes.split(",")):
            r = run_scenario(
                Scenario(n, e),
                runs=args.runs,
                run_readings=args.run_readings,
                batch_max=args.batch_max,
                profile=args.profile,
            )
            print(json.dumps(r), file=sys.stderr, flush=True)
            results.append(r)
    out = {"scenarios": results}
    if args.json:
        print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
