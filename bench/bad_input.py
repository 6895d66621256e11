"""Bad input at volume, on the real local stack: ``iotad bench bad-input [--json]``.

Two runs on fresh :class:`~pipeline.stack.PipelineStack` s (Tansu, InfluxDB, one ``iotad worker``):

``clean``
    ``devices x steps`` valid single readings (a simulated fleet, on the step grid, ending now) are
    pre-loaded into the readings topic, then a worker drains the backlog.
``mixed``
    The same valid readings with ``malformed`` (default 10,000) bad messages interleaved at random
    positions: every kind of :data:`connectors.simulator.MALFORMED_KINDS` (random bytes, truncated JSON,
    wrong types, NaN/Infinity literals, huge numbers and strings, missing fields, unknown sensors, key
    mismatch, absurd timestamps, empty objects, bad device ids, and ``oversized`` messages just over
    1 MiB, half a padded reading and half random bytes, capped at ``oversized`` of them because each one
    crosses Tansu and the dead-letter topic at full size), plus ``late_duplicate`` (an exact copy of a
    device's newest reading), ``late_out_of_order`` (a reading for a step the device has already closed)
    and ``clock_skew`` (stamped 1 hour to 1 day ahead, beyond ``IOTAD_MAX_FUTURE_SKEW_MS``). Each names a
    device of the fleet, so it must not disturb its state. An unknown device id is *not* bad input here: a
    valid reading from a device never seen before simply starts a new device.

Readings/s = valid readings scored / time from the worker's first consumed message until every valid
reading is scored (and, mixed, every bad message dead-lettered), from its metrics polled every 0.1 s.
The dead-letter topic is read back: each record is matched to the message it came from by its bytes.

The last line of stdout (with ``--json``) is one JSON object: ``malformed_sent``, ``dead_lettered`` (bad
messages found on the DLQ), ``dlq_share`` (their share, must be 1.0), ``valid_dead_lettered`` (must be 0),
``crashes`` (worker exits plus crash/traceback lines in the worker logs, must be 0),
``clean_readings_per_s``, ``mixed_readings_per_s``, ``ratio`` (mixed / clean, target >= 0.9), the same
from the worker's CPU time (``cpu_ratio``, far less sensitive to other load on a shared machine), the extra
cost per bad message, the reasons per kind, and each run's figures under ``runs``. The exit status is 0
when ``ok``: every bad message dead-lettered, no valid reading lost or dead-lettered, no crash.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from connectors.influx import count_points
from connectors.kafka_admin import read_all
from connectors.simulator import MALFORMED_KINDS, FleetSimulator, aligned_now_ms, malformed
from pipeline.schema import encode_reading
from pipeline.settings import Settings
from pipeline.stack import BUSY_POLL_S, IDLE_POLL_S, PipelineStack, WorkerProcess

EXTRA_KINDS = ("late_duplicate", "late_out_of_order", "clock_skew")
ALL_KINDS = (*MALFORMED_KINDS, *EXTRA_KINDS)
TARGET_RATIO = 0.9
CRASH_LINE = re.compile(r"Traceback \(most recent call last\)|[Cc]rashed|CRITICAL|[Ss]topped unexpectedly")

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class BadInputConfig:
    devices: int = 200
    steps: int = 500
    malformed: int = 10_000
    oversized: int = 8
    repeats: int = 2
    seed: int = 0
    step_ms: int = 1000
    timeout_s: float = 300.0
    torch_threads: int = 1  # IOTAD_TORCH_THREADS of the workers

    @property
    def readings(self) -> int:
        return self.devices * self.steps


@dataclass
class Message:
    key: bytes | None
    value: bytes
    kind: str  # "valid" or a bad kind


@dataclass
class RunResult:
    mode: str
    readings: int
    messages: int
    malformed_sent: int = 0
    send_errors: dict[str, int] = field(default_factory=dict)
    preload_s: float = 0.0
    drain_s: float = 0.0
    readings_per_s: float = 0.0
    scored: float = 0.0
    influx_points: int = 0
    dead_lettered: int = 0
    valid_dead_lettered: int = 0
    dlq_records: int = 0
    reasons_by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    worker_exits: int = 0
    crash_lines: list[str] = field(default_factory=list)
    timed_out: bool = False
    worker_cpu_s: float = 0.0  # the worker process's CPU time while draining (user + system, all threads)
    micro_batches: float = 0.0  # iotad_batch_messages_count: per-batch costs (checkpoints, writes) scale with it
    longest_stall_s: float = 0.0  # longest time without a consumed message while draining
    timeline: list[tuple[float, float, float]] = field(default_factory=list)  # (s, consumed, scored) per 0.5 s


def _digest(value: bytes) -> bytes:
    return hashlib.blake2b(value, digest_size=16).digest()


def _kind_counts(cfg: BadInputConfig) -> dict[str, int]:
    """How many of each bad kind: ``oversized`` capped, the rest spread evenly."""
    counts = {"oversized": min(cfg.oversized, cfg.malformed)}
    others = [k for k in ALL_KINDS if k != "oversized"]
    rest = cfg.malformed - counts["oversized"]
    for i, k in enumerate(others):
        counts[k] = rest // len(others) + (1 if i < rest % len(others) else 0)
    return counts


def build_messages(cfg: BadInputConfig, *, mixed: bool, now_ms: int | None = None) -> list[Message]:
    """The fleet's valid readings (ending now), with the bad messages interleaved when ``mixed``."""
    sim = FleetSimulator(cfg.devices, seed=cfg.seed, step_ms=cfg.step_ms, anomaly_rate=0)
    last = aligned_now_ms(cfg.step_ms) if now_ms is None else now_ms
    sim.align_to(last - (cfg.steps - 1) * cfg.step_ms)
    names = list(sim.sensors)
    ids, keys = sim.device_ids, [d.encode() for d in sim.device_ids]
    valid: list[Message] = []
    step_ts: list[int] = []
    for _ in range(cfg.steps):
        ts, values, _ = sim.step_arrays()
        step_ts.append(ts)
        rows = values.tolist()
        for d, dev in enumerate(ids):
            valid.append(Message(keys[d], encode_reading(dev, ts, dict(zip(names, rows[d], strict=True))), "valid"))
    if not mixed:
        return valid
    rng = np.random.default_rng([cfg.seed, 17])
    kinds = [k for k, n in _kind_counts(cfg).items() for _ in range(n)]
    rng.shuffle(kinds)
    D = cfg.devices
    # Positions (number of valid messages before it) from the third step on, so every device has
    # sent at least two steps when a late reading of it comes.
    positions = np.sort(rng.integers(min(2 * D, len(valid)), len(valid) + 1, size=len(kinds)))
    by_position: dict[int, list[str]] = defaultdict(list)
    for pos, kind in zip(positions.tolist(), kinds, strict=True):
        by_position[pos].append(kind)
    wall_now = int(time.time() * 1000)
    out: list[Message] = []
    for i in range(len(valid) + 1):
        for kind in by_position.get(i, ()):
            d = int(rng.integers(D))
            newest = i // D if d < i % D else i // D - 1  # newest step device d has sent
            step = max(newest, 0)
            if kind == "late_duplicate":
                out.append(Message(valid[step * D + d].key, valid[step * D + d].value, kind))
            elif kind == "late_out_of_order":
                back = int(rng.integers(1, min(3, step) + 1)) if step else 0
                vals = {s: round(float(rng.normal(10, 3)), 3) for s in names}
                out.append(Message(keys[d], encode_reading(ids[d], step_ts[step - back], vals), kind))
            elif kind == "clock_skew":
                ahead = int(rng.integers(3_600_000, 86_400_000))
                vals = {s: round(float(rng.normal(10, 3)), 3) for s in names}
                out.append(Message(keys[d], encode_reading(ids[d], wall_now + ahead, vals), kind))
            else:
                key, value, _ = malformed(rng, kind, sensors=names, device_id=ids[d], now_ms=step_ts[step])
                out.append(Message(key, value, kind))
        if i < len(valid):
            out.append(valid[i])
    return out


async def _produce(bootstrap: str, topic: str, partitions: int, messages: list[Message]) -> Counter[str]:
    """Produce in order with aiokafka (kafka-python builds large records ~10x slower); returns refusals."""
    from aiokafka import AIOKafkaProducer

    from connectors.kafka_security import security_for

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks=1,
        linger_ms=20,
        max_batch_size=512 * 1024,
        max_request_size=8 * 1024 * 1024,
        **security_for(bootstrap).aiokafka(),
    )
    errors: Counter[str] = Counter()
    await producer.start()
    try:
        pending: list[tuple[str, asyncio.Future[Any]]] = []
        for m in messages:
            # Huge keys get an explicit partition: the default partitioner hashes keys in pure-Python
            # murmur2 (~13 ms per 100 KB). Device keys are hashed as usual, like any producer does.
            partition = zlib.crc32(m.key) % partitions if m.key and len(m.key) > 1024 else None
            try:
                pending.append((m.kind, await producer.send(topic, m.value, key=m.key, partition=partition)))
            except Exception:  # e.g. over max_request_size: counted, never fatal
                errors[m.kind] += 1
        results = await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
        errors.update(kind for (kind, _), r in zip(pending, results, strict=True) if isinstance(r, BaseException))
    finally:
        await producer.stop()
    return errors


def _preload(bootstrap: str, topic: str, partitions: int, messages: list[Message], result: RunResult) -> None:
    result.send_errors = dict(asyncio.run(_produce(bootstrap, topic, partitions, messages)))


def _crash_lines(worker: WorkerProcess) -> list[str]:
    try:
        text = worker.log_path.read_text(errors="replace")
    except OSError:
        return []
    return [line.strip()[:300] for line in text.splitlines() if CRASH_LINE.search(line)]


def _cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process (0 when unknown)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _drain(stack: PipelineStack, expected_scored: int, expected_dead: int, result: RunResult, timeout_s: float) -> None:
    """Poll the worker until everything is scored / dead-lettered; restart it if it dies (counted)."""
    t0: float | None = None
    deadline = time.monotonic() + timeout_s
    scored = dead = 0.0
    last_consumed, last_progress, last_sample = -1.0, time.time(), 0.0
    cpu0 = {w.pid: _cpu_s(w.pid) for w in stack.procs}
    while time.monotonic() < deadline:
        live = [w for w in stack.procs if w.proc is not None and w.proc.poll() is None]
        if not live:
            result.worker_exits += 1
            if result.worker_exits > 3:
                break
            stack.add_worker()
            continue
        w = live[-1]
        m = w.metric_values(
            "iotad_messages_consumed_total",
            "iotad_readings_scored_total",
            "iotad_dead_letters_total",
            "iotad_last_output_timestamp_seconds",
            "iotad_batch_messages_count",
        )
        consumed, scored, dead = (
            m["iotad_messages_consumed_total"],
            m["iotad_readings_scored_total"],
            m["iotad_dead_letters_total"],
        )
        now = time.time()
        if t0 is None and consumed > 0:
            t0 = now
        if t0 is not None:
            if consumed != last_consumed:
                last_consumed, last_progress = consumed, now
            result.longest_stall_s = max(result.longest_stall_s, round(now - last_progress, 2))
            if now - t0 >= last_sample:
                result.timeline.append((round(now - t0, 1), consumed, scored))
                last_sample += 0.5
        if scored >= expected_scored and dead >= expected_dead:
            result.worker_cpu_s = round(sum(_cpu_s(w.pid) - cpu0.get(w.pid, 0.0) for w in stack.procs), 2)
            result.micro_batches = m["iotad_batch_messages_count"]
            result.drain_s = m["iotad_last_output_timestamp_seconds"] - (t0 or now)
            result.scored = scored
            result.readings_per_s = expected_scored / result.drain_s if result.drain_s > 0 else 0.0
            return
        time.sleep(IDLE_POLL_S if t0 is None else BUSY_POLL_S)
    result.timed_out = True
    result.scored = scored


def _read_dlq(stack: PipelineStack, s: Settings, sent: list[Message], result: RunResult) -> None:
    bad: Counter[bytes] = Counter()
    kind_of: dict[bytes, str] = {}
    for m in sent:
        if m.kind != "valid":
            h = _digest(m.value)
            bad[h] += 1
            kind_of[h] = m.kind
    expected = result.malformed_sent - sum(result.send_errors.values())
    records = read_all(stack.bootstrap, s.dlq_topic, min_records=expected, idle_timeout_s=2.0, timeout_s=120)
    result.dlq_records = len(records)
    reasons: dict[str, Counter[str]] = defaultdict(Counter)
    for r in records:
        h = _digest(r.value or b"")
        reason = r.headers.get("iotad-reason", b"?").decode()
        if bad[h] > 0:
            bad[h] -= 1
            result.dead_lettered += 1
            reasons[kind_of[h]][reason] += 1
        else:
            result.valid_dead_lettered += 1
            reasons["valid"][reason] += 1
    result.reasons_by_kind = {k: dict(v) for k, v in sorted(reasons.items())}


def run_once(cfg: BadInputConfig, mode: str, base: Path, tag: str, log: Log = _stderr) -> RunResult:
    mixed = mode == "mixed"
    messages = build_messages(cfg, mixed=mixed)
    result = RunResult(mode=mode, readings=cfg.readings, messages=len(messages))
    result.malformed_sent = sum(m.kind != "valid" for m in messages)
    name = f"bad{tag}{mode}"
    s = Settings(
        topic_prefix=name,
        app_id=f"{name}-worker",
        influx_database=name,
        data_dir=base,
        partitions=4,
        step_ms=cfg.step_ms,
        warmup_steps=5,
        torch_threads=cfg.torch_threads,
    )
    with PipelineStack(s, workers=0) as stack:
        t = time.perf_counter()
        _preload(stack.bootstrap, s.readings_topic, s.partitions, messages, result)
        result.preload_s = round(time.perf_counter() - t, 2)
        expected_dead = result.malformed_sent - sum(result.send_errors.values())
        log(f"{mode}: {len(messages)} messages pre-loaded in {result.preload_s} s; starting the worker")
        stack.add_worker()
        _drain(stack, cfg.readings, expected_dead, result, cfg.timeout_s)
        log(
            f"{mode}: drained in {result.drain_s:.2f} s ({result.readings_per_s:.0f} valid readings/s, "
            f"worker CPU {result.worker_cpu_s:.1f} s)"
        )
        if mixed:
            _read_dlq(stack, s, messages, result)
        result.influx_points = count_points(stack.influx_url, s.influx_database, s.influx_measurement, "threshold")
        for w in stack.procs:
            result.crash_lines.extend(_crash_lines(w))
    return result


def _round(x: float) -> float:
    return float(round(x, 3))


def summarise(cfg: BadInputConfig, runs: list[RunResult]) -> dict[str, Any]:
    clean = [r for r in runs if r.mode == "clean"]
    mixed = [r for r in runs if r.mode == "mixed"]
    clean_rate = statistics.median(r.readings_per_s for r in clean) if clean else 0.0
    mixed_rate = statistics.median(r.readings_per_s for r in mixed) if mixed else 0.0
    clean_s = statistics.median(r.drain_s for r in clean) if clean else 0.0
    mixed_s = statistics.median(r.drain_s for r in mixed) if mixed else 0.0
    clean_cpu = statistics.median(r.worker_cpu_s for r in clean) if clean else 0.0
    mixed_cpu = statistics.median(r.worker_cpu_s for r in mixed) if mixed else 0.0
    sent = max((r.malformed_sent for r in mixed), default=0)  # per run (every mixed run sends the same)
    dead = min((r.dead_lettered for r in mixed), default=0)  # the worst run
    reasons: dict[str, Counter[str]] = defaultdict(Counter)
    by_kind: Counter[str] = Counter()
    for r in mixed:
        for kind, c in r.reasons_by_kind.items():
            reasons[kind].update(c)
    crash_lines = [line for r in runs for line in r.crash_lines]
    crashes = sum(r.worker_exits for r in runs) + len(crash_lines)
    for kind, n in _kind_counts(cfg).items():
        by_kind[kind] = n
    ratio = mixed_rate / clean_rate if clean_rate else 0.0
    all_scored = all(r.scored == cfg.readings and r.influx_points == cfg.readings for r in runs)
    valid_dead = sum(r.valid_dead_lettered for r in mixed)
    share = min((r.dead_lettered / r.malformed_sent for r in mixed if r.malformed_sent), default=0.0)
    return {
        # Correctness (the exit status): every bad message dead-lettered, nothing valid lost, no crash.
        "ok": bool(share == 1.0 and crashes == 0 and all_scored and valid_dead == 0),
        "ratio_meets_target": bool(ratio >= TARGET_RATIO),
        "readings": cfg.readings,
        "malformed_sent": sent,
        "malformed_by_kind": dict(by_kind),
        "send_errors": {k: v for r in mixed for k, v in r.send_errors.items()},
        "dead_lettered": dead,
        "dlq_share": _round(share),
        "valid_dead_lettered": valid_dead,
        "all_valid_scored": all_scored,
        "crashes": crashes,
        "crash_lines": crash_lines[:10],
        "clean_readings_per_s": round(clean_rate),
        "mixed_readings_per_s": round(mixed_rate),
        "ratio": _round(ratio),
        "target_ratio": TARGET_RATIO,
        "clean_drain_s": _round(clean_s),
        "mixed_drain_s": _round(mixed_s),
        # Independent of how many valid readings surround them: extra drain time per bad message.
        "extra_us_per_bad_message": round((mixed_s - clean_s) / cfg.malformed * 1e6) if cfg.malformed else None,
        # The worker's own CPU time is far less sensitive to other load on a shared machine than wall time.
        "clean_worker_cpu_s": clean_cpu,
        "mixed_worker_cpu_s": mixed_cpu,
        "cpu_ratio": _round(clean_cpu / mixed_cpu) if mixed_cpu else None,
        "worker_cpu_us_per_bad_message": round((mixed_cpu - clean_cpu) / cfg.malformed * 1e6)
        if cfg.malformed
        else None,
        "reasons_by_kind": {k: dict(v) for k, v in sorted(reasons.items())},  # summed over the mixed runs
        "clean_micro_batches": statistics.median(r.micro_batches for r in clean) if clean else None,
        "mixed_micro_batches": statistics.median(r.micro_batches for r in mixed) if mixed else None,
        "unknown_devices": "valid input: a well-formed reading of an unseen device starts a new device",
        "config": asdict(cfg),
        "runs": [asdict(r) for r in runs],
    }


def main(cfg: BadInputConfig, *, as_json: bool = False, log: Log = _stderr) -> dict[str, Any]:
    runs: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="iotad-bad-input-") as tmp:
        for i in range(cfg.repeats):
            for mode in ("clean", "mixed") if i % 2 == 0 else ("mixed", "clean"):
                runs.append(run_once(cfg, mode, Path(tmp), str(i), log))
    summary = summarise(cfg, runs)
    keys = ("dlq_share", "crashes", "clean_readings_per_s", "mixed_readings_per_s", "ratio", "cpu_ratio")
    brief = {k: summary[k] for k in keys}
    log(json.dumps(brief))
    if as_json:
        print(json.dumps(summary), flush=True)
    return summary
