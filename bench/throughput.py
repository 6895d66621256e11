"""End-to-end throughput of the Faust worker against its ceiling, on the embedded local stack.

For each fleet size N (``iotad bench throughput --devices 100,10000 --json``):

1. ``readings`` grid-aligned readings of N devices (single readings, or envelopes of ``envelope``
   readings per device) are pre-loaded into a fresh readings topic.
2. Faust: a real ``iotad worker`` process drains the backlog; readings/s = scores written / time from
   its first consumed message to its last score (metrics polled every 0.1 s).
3. Ceiling: bench.lean does the same work (decode, validate, window, batched step, InfluxDB, scores,
   checkpoints) on the same broker and backlog with aiokafka and no Faust.
4. Latency (single-reading runs): a paced run (one reading per device per step, on the step's grid
   point, as many devices as make half the Faust rate; ``step_ms`` 1000 by default) measures upload ->
   score emitted on the scores topic, p50/p99: once with every device uploading at the grid point
   (a synchronised burst each step), once with the same fleet uploading in ``STAGGER_SLICES`` slots
   spread over the step (``staggered_p50_ms``/``staggered_p99_ms``). The InfluxDB points are written
   behind the scores; ``influx_p50_le_ms``/``influx_p99_le_ms`` are the upper bounds of the worker's
   ``iotad_influx_latency_seconds`` buckets holding those quantiles over the synchronised run (the
   histogram counts from the reading's timestamp, which a staggered upload slot is later than).
5. The batched model step alone (B = min(N, 8192)) vs one call per reading.

With ``--repeats R`` each fleet size runs R such pairs on fresh stacks, alternately Faust first and the
lean loop first, and reports the medians (and each pair under ``pairs``); latency is measured in the first.

The last line of stdout (with ``--json``) is one JSON object: the largest fleet's figures at top level
and every fleet's under ``runs``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.faults import rss_kib
from bench.lean import run_lean
from connectors.kafka_admin import create_topics, end_offsets, make_producer, read_all
from connectors.simulator import FleetSimulator, run_simulation, upload_offset_ms
from pipeline.app import build_detector, build_processor
from pipeline.processor import Inbound
from pipeline.schema import encode_envelope, encode_reading
from pipeline.settings import Settings
from pipeline.stack import BUSY_POLL_S, IDLE_POLL_S, PipelineStack, WorkerProcess

INFLUX_LATENCY = "iotad_influx_latency_seconds"
STAGGER_SLICES = 20  # upload slots per step of the staggered latency fleet (50 ms apart with 1 s steps)


def _preload(bootstrap: str, topic: str, n_devices: int, steps: int, envelope: int, step_ms: int) -> int:
    """Write ``steps`` steps of the fleet, ending now, into ``topic``; returns readings written."""
    sim = FleetSimulator(n_devices, seed=11, step_ms=step_ms, anomaly_rate=0)
    sim.align_to(-(-int(time.time() * 1000) // step_ms) * step_ms - steps * step_ms)
    producer = make_producer(bootstrap, acks=1, linger_ms=20, batch_size=512 * 1024)
    names = list(sim.sensors)
    written = 0
    buffer: list[tuple[int, np.ndarray]] = []
    for _ in range(steps):
        buffer.append(sim.step_arrays()[:2])
        if len(buffer) < envelope:
            continue
        for d, dev in enumerate(sim.device_ids):
            key = dev.encode()
            if envelope == 1:
                ts, v = buffer[0]
                value = encode_reading(dev, ts, dict(zip(names, v[d].tolist(), strict=True)))
            else:
                value = encode_envelope(dev, [(ts, dict(zip(names, v[d].tolist(), strict=True))) for ts, v in buffer])
            producer.send(topic, key=key, value=value)
        written += len(buffer) * n_devices
        buffer.clear()
    producer.flush()
    producer.close()
    return written


def _drain_rate(stack: PipelineStack, expected: int, timeout_s: float) -> float:
    """Readings/s from the worker's first consumed message (polled) to its last output (its own timestamp)."""
    worker = stack.procs[0]
    t0 = None
    deadline = time.monotonic() + timeout_s
    scored = 0.0
    while time.monotonic() < deadline:
        m = worker.metric_values(
            "iotad_messages_consumed_total", "iotad_readings_scored_total", "iotad_last_output_timestamp_seconds"
        )
        if t0 is None and m["iotad_messages_consumed_total"] > 0:
            t0 = time.time()
        scored = m["iotad_readings_scored_total"]
        if t0 is not None and scored >= expected:
            return scored / max(m["iotad_last_output_timestamp_seconds"] - t0, 1e-9)
        time.sleep(IDLE_POLL_S if t0 is None else BUSY_POLL_S)
    raise TimeoutError(f"Faust worker scored {scored} of {expected} in {timeout_s}s")


def _histogram(worker: WorkerProcess, name: str) -> dict[float, float]:
    """A worker histogram's cumulative bucket counts by upper bound (seconds; the last is +Inf)."""
    return {
        float(sample.labels["le"]): sample.value
        for family in text_string_to_metric_families(worker.metrics())
        if family.name == name
        for sample in family.samples
        if sample.name == f"{name}_bucket"
    }


def _bucket_bound_ms(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """Upper bound (ms) of the bucket holding quantile ``q`` of what was observed between two scrapes."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    bound = next(b for b, c in zip(bounds, counts, strict=True) if c >= q * counts[-1])
    return bound * 1000 if bound != float("inf") else None  # beyond the last bucket: no bound to give


def _latency(
    stack: PipelineStack, settings: Settings, n_devices: int, seconds: int, stagger_slices: int = 1
) -> dict[str, Any]:
    """Paced fleet: one reading per device per step, stamped on the step's grid point and uploaded at once
    (``stagger_slices`` 1) or in staggered slots over the step. Latency is from the upload (grid point +
    the device's slot offset) to the score being emitted."""
    topic = f"{settings.topic_prefix}.readings"
    prefix = "lat" if stagger_slices == 1 else "stg"
    sim = FleetSimulator(n_devices, seed=12, step_ms=settings.step_ms, anomaly_rate=0, device_prefix=prefix)
    offset = {
        dev: upload_offset_ms(d, n_devices, stagger_slices, settings.step_ms) for d, dev in enumerate(sim.device_ids)
    }
    producer = make_producer(stack.bootstrap, acks=1, linger_ms=5)
    influx_before = _histogram(stack.procs[0], INFLUX_LATENCY)
    # Only the scores after the backlog's: re-reading 100,000s of backlog scores per poll never caught up.
    start = end_offsets(stack.bootstrap, settings.scores_topic)
    steps = seconds * 1000 // settings.step_ms
    stats = run_simulation(
        producer, topic, sim, steps=steps, rate_steps_per_s=1000 / settings.step_ms, stagger_slices=stagger_slices
    )
    producer.close()
    lat = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        recs = read_all(stack.bootstrap, settings.scores_topic, idle_timeout_s=1.0, start=start)
        lat = [
            x["emitted_at"] - x["ts"] - offset[x["device_id"]]
            for x in (msgspec.json.decode(r.value or b"{}") for r in recs)
            if x["device_id"] in offset
        ]
        if len(lat) >= stats.readings_sent:
            break
    arr = np.array(lat, dtype=np.float64)
    found: dict[str, Any] = {"latency_readings": stats.readings_sent, "latency_scores_found": len(lat)}
    if stagger_slices == 1:  # the histogram counts from the reading's timestamp, not a staggered upload slot
        influx_after = _histogram(stack.procs[0], INFLUX_LATENCY)
        found["influx_p50_le_ms"] = _bucket_bound_ms(influx_before, influx_after, 0.5)
        found["influx_p99_le_ms"] = _bucket_bound_ms(influx_before, influx_after, 0.99)
    if not lat:
        return {**found, "p50_ms": None, "p99_ms": None}
    return {**found, "p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99))}


def _step_rates(settings: Settings, batch: int) -> tuple[float, float, float]:
    """Batched step vs one call per reading (readings/s), and checkpoint bytes per device."""
    det = build_detector(settings)
    rng = np.random.default_rng(0)
    slots = np.array([det.slot(f"d{i}") for i in range(batch)])
    x = rng.normal(size=(batch, det.n_features)) + det.artifact.normaliser.mean
    det.step(slots, x)
    reps, t = 0, time.perf_counter()
    while time.perf_counter() - t < 2.0:
        det.step(slots, x)
        reps += 1
    batched = reps * batch / (time.perf_counter() - t)
    one, t = 0, time.perf_counter()
    while time.perf_counter() - t < 2.0:
        det.step(slots[one % batch : one % batch + 1], x[:1])
        one += 1
    single = one / (time.perf_counter() - t)
    proc = build_processor(settings, det)
    msgs = [
        Inbound(
            f"d{i}".encode(),
            encode_reading(f"d{i}", 1_795_000_000_000, dict.fromkeys(det.artifact.features, 1.0)),
            "t",
            0,
            i,
        )
        for i in range(min(batch, 1000))
    ]
    proc.process(msgs, int(time.time() * 1000))
    blobs = proc.checkpoint(proc.devices)
    per_device = float(np.mean([len(b) for _, b in blobs.values()]))
    return batched, single, per_device


def bench_fleet(
    n_devices: int,
    readings: int,
    envelope: int,
    base: Path,
    step_ms: int = 1000,
    *,
    lean_first: bool = False,
    latency_run: bool = True,
) -> dict[str, Any]:
    """One Faust/lean pair on a fresh stack and backlog; ``lean_first`` drains with the lean loop before the
    worker starts (so neither side always meets the broker and InfluxDB second)."""
    steps = max(2 * envelope, -(-readings // n_devices) // envelope * envelope)
    name = f"bench{n_devices}e{envelope}"
    settings = Settings(
        topic_prefix=name,
        app_id=f"{name}-faust",
        influx_database=name,
        data_dir=base,
        partitions=4,
        warmup_steps=5,
        step_ms=step_ms,
        max_gap_steps=10,
    )
    with PipelineStack(settings, workers=0) as stack:
        settings.kafka_bootstrap, settings.influx_url = stack.bootstrap, stack.influx_url
        create_topics(stack.bootstrap, {f"{name}-lean.scores": 1})
        t = time.perf_counter()
        total = _preload(stack.bootstrap, settings.readings_topic, n_devices, steps, envelope, settings.step_ms)
        preload_s = time.perf_counter() - t
        # The ceiling drains the same backlog with its own consumer group and scores topic.
        lean_settings = settings.model_copy(update={"topic_prefix": f"{name}-lean"})
        if lean_first:
            ceiling = asyncio.run(run_lean(lean_settings, settings.readings_topic, total))
        worker = stack.add_worker()
        rss_ready = rss_kib(worker.pid) if worker.pid else None
        faust_rate = _drain_rate(stack, total, timeout_s=600)
        rss_drained = rss_kib(worker.pid) if worker.pid else None
        if not lean_first:
            ceiling = asyncio.run(run_lean(lean_settings, settings.readings_topic, total))
        # Latency is paced single readings at half the single-reading rate: with envelopes, half the envelope
        # rate in single readings would overload the worker, and an envelope's readings wait for it anyway.
        # Each latency device sends one reading per step, all on the step's grid point (a synchronised fleet).
        per_device = 1000 / step_ms
        paced = envelope == 1 and latency_run
        lat_devices = max(10, min(n_devices, int(faust_rate * 0.5 / per_device))) if paced else 0
        latency: dict[str, Any] = {"p50_ms": None, "p99_ms": None}
        if lat_devices:
            latency = _latency(stack, settings, lat_devices, seconds=10)
            latency["latency_scored_by_worker"] = worker.metric("iotad_readings_scored_total") - total
            # The same fleet with staggered upload slots: the load spread over the step instead of a burst.
            staggered = _latency(stack, settings, lat_devices, seconds=10, stagger_slices=STAGGER_SLICES)
            latency |= {f"staggered_{k}": v for k, v in staggered.items() if k.endswith("_ms")}
    batched, single, state_bytes = _step_rates(settings, min(n_devices, 8192))
    return {
        "devices": n_devices,
        "envelope": envelope,
        "step_ms": step_ms,
        "readings": total,
        "preload_s": round(preload_s, 2),
        "readings_per_s": round(faust_rate),
        "ceiling_per_s": round(ceiling),
        "ratio": round(faust_rate / ceiling, 3) if ceiling else None,
        "lean_first": lean_first,
        "latency_devices": lat_devices,
        **latency,
        "step_batch": min(n_devices, 8192),
        "step_batched_per_s": round(batched),
        "step_per_reading_per_s": round(single),
        "state_checkpoint_bytes_per_device": round(state_bytes),
        # Worker RSS growth from ready (model loaded, no device) to backlog drained, per device tracked.
        "worker_rss_mib": round(rss_drained / 1024, 1) if rss_drained else None,
        "worker_rss_growth_bytes_per_device": (
            round((rss_drained - rss_ready) * 1024 / n_devices) if rss_ready and rss_drained else None
        ),
    }


def bench_pairs(n_devices: int, readings: int, envelope: int, base: Path, step_ms: int, repeats: int) -> dict[str, Any]:
    """``repeats`` Faust/lean pairs, each on a fresh stack, the order alternating (Faust first in the first);
    the rates and the ratio are the pairs' medians, the latency that of the first pair."""
    pairs = [
        bench_fleet(n_devices, readings, envelope, base, step_ms, lean_first=r % 2 == 1, latency_run=r == 0)
        for r in range(repeats)
    ]
    if repeats == 1:
        return pairs[0]
    ratios = [p["ratio"] for p in pairs if p["ratio"] is not None]
    return {
        **pairs[0],
        "readings_per_s": round(float(np.median([p["readings_per_s"] for p in pairs]))),
        "ceiling_per_s": round(float(np.median([p["ceiling_per_s"] for p in pairs]))),
        "ratio": round(float(np.median(ratios)), 3) if ratios else None,
        "pairs": [{k: p[k] for k in ("readings_per_s", "ceiling_per_s", "ratio", "lean_first")} for p in pairs],
    }


def main(
    devices: list[int], readings: int, envelope: int, as_json: bool, step_ms: int = 1000, repeats: int = 1
) -> dict[str, Any]:
    runs = []
    with tempfile.TemporaryDirectory(prefix="iotad-bench-") as tmp:
        for n in devices:
            run = bench_pairs(n, readings, envelope, Path(tmp), step_ms, repeats)
            print(json.dumps(run), file=sys.stderr, flush=True)
            runs.append(run)
    result = {**runs[-1], "runs": runs}
    if as_json:
        print(json.dumps(result), flush=True)
    return result
