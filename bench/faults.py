"""Fault injection on the real local stack: ``iotad bench faults [--json] [--outage-s 60]``.

Each scenario runs on a fresh :class:`~pipeline.stack.PipelineStack` (Tansu, InfluxDB, ``iotad worker``
processes) while a simulated fleet streams in from a background thread at a bounded rate for a bounded
time (:class:`Load`), injects one kind of fault, lets the pipeline settle and then checks every output:

``kill``
    The worker is SIGKILLed ``kills`` times at seeded random points mid-stream and restarted at once.
``rebalance``
    Two workers, then one (the other stopped gracefully, SIGTERM), then two again, under load.
``influx_outage``
    InfluxDB is stopped for ``outage_s`` under load and restarted on the same port (its data kept). The
    worker must hold back with bounded memory: the sink retries, commits stall at once (they wait for the
    points), and consumption stalls once the write-behind buffer is full (``IOTAD_INFLUX_MAX_PENDING_LINES``,
    here :attr:`FaultConfig.sink_buffer_s` of load, so that it fills early in the outage). The worker's
    consumed-messages counter, its group's committed offsets, its RSS (``/proc/<pid>/status``),
    ``iotad_sink_retries_total`` and ``iotad_sink_pending_points`` are sampled every second of the outage.
``model_swap``
    A freshly trained tiny artifact is announced on the control topic mid-stream; the worker swaps it in
    between two micro-batches.
``alert_receiver_down``
    With an ``iotad alerter`` beside the worker and injected spikes raising alerts, its only receiver (a
    loopback webhook) closes its port for ``receiver_down_s``; what was dead-lettered meanwhile is sent
    again with ``iotad alerts-redrive`` once it is back. Here ``lost``/``duplicated`` count alerts.

The scenarios run with ``IOTAD_GRACE_MS`` = one step (:attr:`FaultConfig.grace_steps`): a bucket closes
when the device's next reading arrives, so every checkpoint holds an open bucket and a replayed reading
applied a second time would change that step's ``n_readings`` and mean. Without it a replayed on-grid
reading only lands in a closed bucket and is dead-lettered as late, which the empty dead-letter topic
rules out too (no bad input is sent).

What is reported per scenario (:class:`Outcome`):

* ``readings_sent``: valid readings produced, each a distinct ``(device, ts)`` on the step grid.
* ``lost``: readings without an InfluxDB point or without a message on the scores topic (the two are
  also given apart: ``lost_influx``, ``lost_scores``).
* ``duplicated``: ``(device, ts)`` with more than one InfluxDB point. Points are keyed by device, model
  version and time, so a replay overwrites its point; two points means a reading scored twice (by two
  models). Must be 0. The scores topic is at-least-once by design: ``score_messages_redelivered`` counts
  its messages beyond one per ``(device, ts)`` (a consumer dedups on that key); they must carry the same
  score, which the state check below verifies for every message.
* ``state_mismatch_max``: the largest ``|score - reference|`` over every score message and every InfluxDB
  point. The reference is the same messages, read back from the readings topic, through one
  uninterrupted in-process :class:`~pipeline.processor.Processor` (for ``model_swap``: each device
  switched to the new model at the step where the worker switched it). A state advanced twice, or
  restored wrong, shows here; ``status_mismatches`` counts outputs whose status, presence of a score or
  ``n_readings`` differs from the reference.
* ``recovered_within_s``: from the fault (worker killed and restarted at once, worker stopped or added,
  InfluxDB back up, swap announced) until every device has a point in InfluxDB for the first step sent
  after it: the pipeline has caught up (partitions are consumed in order) and scores new data on all
  partitions again. The worst of the scenario's faults. (``alert_receiver_down``: until every
  alert in the outbox when the receiver came back has reached it, re-drive included.)
* ``checks``: scenario-specific evidence (no dead letters, kills landed mid-stream, partition assignment
  per phase, stall and bounded memory during the outage, one swap, ...); ``ok`` = all checks pass,
  nothing lost or duplicated and the state matches within ``tolerance``.

The last line of stdout (with ``--json``) is one JSON object: ``{"ok", "config", "scenarios": {name:
outcome}, "left_out": {name: why}}``.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec

from connectors.influx import InfluxQueryError, count_points, influx_v1_query, quote_ident
from connectors.kafka_admin import Record, read_all
from connectors.localstack import free_port
from connectors.simulator import FleetSimulator, aligned_now_ms, make_producer, run_simulation
from pipeline import control
from pipeline.app import build_detector, build_processor, startup_model_dir
from pipeline.processor import Inbound
from pipeline.records import ScoreRecord
from pipeline.settings import Settings
from pipeline.stack import PipelineStack, WorkerProcess

Log = Callable[[str], None]

SCENARIOS = ("kill", "rebalance", "influx_outage", "model_swap", "alert_receiver_down")
LEFT_OUT: dict[str, str] = {}
CANDIDATE_VERSION = "faults-candidate"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class FaultConfig:
    """Sizes and durations. Load = ``devices`` readings every ``1 / steps_per_s`` seconds."""

    devices: int = 24
    steps_per_s: float = 4.0
    stream_s: float = 40.0  # load duration of kill, rebalance and model_swap
    outage_s: float = 60.0
    before_outage_s: float = 5.0
    after_outage_s: float = 5.0
    kills: int = 3
    seed: int = 7
    # Buckets stay open this many steps after their end (IOTAD_GRACE_MS), so a device's last reading sits in
    # an open bucket in its checkpoint: a replayed reading applied again would change n_readings (and the
    # mean), which the comparison catches. With 0 a replay would only be dead-lettered as late.
    grace_steps: int = 1
    tolerance: float = 1e-4
    settle_timeout_s: float = 120.0
    ready_timeout_s: float = 60.0
    rss_growth_bound_mib: float = 64.0  # worker RSS growth allowed during the outage
    sink_buffer_s: float = 1.0  # influx_outage: the write-behind buffer holds this many seconds of load
    receiver_down_s: float = 60.0  # alert_receiver_down
    # Retry policy of the alert receiver (routes-file keys: max_attempts, base_delay_s, max_delay_s, budget_s,
    # circuit_open_s); empty = the IOTAD_ALERT_RETRY_* settings.
    receiver_policy: dict[str, float] = field(default_factory=dict)
    # Run the workers with DEVLOG=1, so that Faust logs the messages its consumer drops ("DROPPED MESSAGE
    # ROFF"); they are counted per worker in details["faust_dropped_messages"].
    faust_devlog: bool = True


@dataclass
class Outcome:
    """One scenario's figures; see the module docstring."""

    scenario: str
    readings_sent: int = 0
    influx_points: int = 0
    lost: int = 0
    lost_influx: int = 0
    lost_scores: int = 0
    duplicated: int = 0
    unexpected: int = 0  # outputs for a (device, ts) never sent
    score_messages: int = 0
    score_messages_redelivered: int = 0
    state_mismatch_max: float | None = None
    status_mismatches: int = 0
    recovered_within_s: float | None = None
    seconds: float = 0.0
    checks: dict[str, bool] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    tolerance: float = 1e-4

    @property
    def ok(self) -> bool:
        return (
            self.readings_sent > 0
            and self.lost == 0
            and self.duplicated == 0
            and self.unexpected == 0
            and self.status_mismatches == 0
            and (self.state_mismatch_max is None or self.state_mismatch_max < self.tolerance)
            and all(self.checks.values())
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("tolerance")
        out["ok"] = self.ok
        return out


# -- load ---------------------------------------------------------------------------------------------


class Load:
    """A simulated fleet streaming into ``topic`` from a background thread.

    One step of every device every ``1 / steps_per_s`` seconds until :meth:`stop`, and in any case at most
    ``steps_per_s * max_s`` steps and ``1.5 * max_s + 10`` seconds. Timestamps are on the step grid and the
    last possible one is about the start time (the first is stamped ``steps_per_s * max_s`` steps earlier),
    so the load may run faster than real time without running ahead of the wall clock. ``spikes`` spikes
    (8-12 sigma, 1-3 steps) are injected between steps ``spikes_within`` (for alerts), none by default.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        devices: int,
        steps_per_s: float,
        max_s: float,
        seed: int,
        step_ms: int,
        spikes: int = 0,
        spikes_within: tuple[int, int] = (60, 1000),
    ) -> None:
        self.bootstrap, self.topic, self.steps_per_s, self.max_s = bootstrap, topic, steps_per_s, max_s
        self.max_steps = max(1, int(steps_per_s * max_s))
        start = aligned_now_ms(step_ms) - self.max_steps * step_ms
        self.sim = FleetSimulator(
            devices,
            seed=seed,
            step_ms=step_ms,
            start_ts_ms=start,
            anomaly_rate=0,
            anomaly_count=spikes or None,
            anomaly_kinds=("spike",),
            anomalies_after_step=spikes_within[0],
            anomaly_horizon_steps=spikes_within[1],
        )
        self.timestamps: list[int] = []
        self.send_errors = 0
        self.error: BaseException | None = None
        self._sent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faults-load", daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def _run(self) -> None:
        producer = make_producer(self.bootstrap)
        try:
            t0 = time.monotonic()
            deadline = t0 + 1.5 * self.max_s + 10
            for i in range(self.max_steps):
                delay = t0 + i / self.steps_per_s - time.monotonic()
                if (delay > 0 and self._stop.wait(delay)) or self._stop.is_set() or time.monotonic() > deadline:
                    break
                ts = self.sim.next_ts_ms
                stats = run_simulation(producer, self.topic, self.sim, steps=1)
                with self._lock:
                    self._sent += stats.readings_sent
                    self.timestamps.append(ts)
                    self.send_errors += sum(stats.send_errors.values())
        except BaseException as exc:  # reported by the scenario; the thread must not die silently
            self.error = exc
        finally:
            producer.close(timeout=5)
            self._done.set()

    @property
    def running(self) -> bool:
        return not self._done.is_set()

    @property
    def readings_sent(self) -> int:
        """Readings flushed to the broker so far."""
        with self._lock:
            return self._sent

    def mark(self) -> tuple[int, int]:
        """(readings sent, steps sent) so far: where a fault happened in the stream."""
        with self._lock:
            return self._sent, len(self.timestamps)

    def step_ts(self, index: int) -> int | None:
        """Timestamp of step ``index`` of this load once it has been sent."""
        with self._lock:
            return self.timestamps[index] if index < len(self.timestamps) else None

    def sent_keys(self) -> set[tuple[str, int]]:
        with self._lock:
            return {(d, ts) for ts in self.timestamps for d in self.sim.device_ids}

    def wait(self, timeout_s: float) -> bool:
        return self._done.wait(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)


# -- polling helpers ----------------------------------------------------------------------------------


def _wait_until(pred: Callable[[], bool], timeout_s: float, interval_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def _influx_count(stack: PipelineStack, s: Settings) -> int:
    """Points in InfluxDB (all model versions; "threshold" is set on every point); -1 when unreachable."""
    try:
        return count_points(stack.influx_url, s.influx_database, s.influx_measurement, field="threshold")
    except InfluxQueryError:
        return -1


def _last_point_ts(stack: PipelineStack, s: Settings) -> dict[str, int]:
    """Device -> time of its newest point in InfluxDB (any model version); empty when unreachable."""
    q = f'SELECT last("threshold") FROM {quote_ident(s.influx_measurement)} GROUP BY "device"'
    try:
        series = influx_v1_query(stack.influx_url, s.influx_database, q)
    except InfluxQueryError:
        return {}
    return {x["tags"]["device"]: int(x["values"][0][0]) for x in series if x.get("values") and x.get("tags")}


def _wait_recovered(
    stack: PipelineStack,
    s: Settings,
    load: Load,
    mark: tuple[int, int],
    since: float,
    timeout_s: float,
    also: Callable[[], bool] | None = None,
) -> tuple[float | None, float | None]:
    """Seconds from ``since`` (monotonic) until the pipeline has caught up with the fault at ``mark``
    (:meth:`Load.mark`), and until ``also()`` holds; None for what did not happen within ``timeout_s``.

    Caught up: every device has a point in InfluxDB for the first step sent after the fault (partitions
    are consumed in order, so everything before it has been through; whether all of it arrived is what
    ``lost`` says). If the load ended before that step: InfluxDB holds every reading sent.
    """
    steps_at_fault = mark[1]
    recovered: float | None = None
    also_s: float | None = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = time.monotonic()
        if recovered is None:
            next_ts = load.step_ts(steps_at_fault)
            if next_ts is not None:
                last = _last_point_ts(stack, s)
                done = len(last) == load.sim.n_devices and min(last.values()) >= next_ts
            else:
                done = not load.running and _influx_count(stack, s) >= load.readings_sent
            if done:
                recovered = round(now - since, 2)
        if also is not None and also_s is None and also():
            also_s = round(now - since, 2)
        if recovered is not None and (also is None or also_s is not None):
            break
        time.sleep(0.2)
    return recovered, also_s


def _wait_settled(stack: PipelineStack, s: Settings, target: int, timeout_s: float, idle_s: float = 15.0) -> None:
    """Until InfluxDB holds ``target`` points, or its count has not moved for ``idle_s`` (something was
    lost: waiting longer would not bring it), or ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = _influx_count(stack, s)
        if n >= target:
            return
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= idle_s:
            return
        time.sleep(0.5)


def _live(stack: PipelineStack) -> list[WorkerProcess]:
    return [w for w in stack.procs if w.proc is not None and w.proc.poll() is None]


def _metric(w: WorkerProcess, name: str) -> float:
    """A worker's metric, 0 while its metrics endpoint does not answer (starting, or gone)."""
    value = w.metric(name)
    return 0.0 if math.isnan(value) else value


def _sample(w: WorkerProcess, name: str) -> float | None:
    """A worker's metric, None when its endpoint did not answer."""
    value = w.metric(name)
    return None if math.isnan(value) else value


def _stall(samples: Sequence[dict[str, Any]], grace_s: float) -> dict[str, float | None]:
    """Progress made while the sink was failing: consumed messages and committed offsets, from ``grace_s``
    after the first sample showing a retry to the last sample (None where samples are missing)."""
    out: dict[str, float | None] = {"consumed": None, "committed": None, "window_s": None}
    retrying = [x for x in samples if x["retries"]]
    if not retrying:
        return out
    start = retrying[0]["t"] + grace_s
    for key in ("consumed", "committed"):
        have = [x for x in samples if x["t"] >= start and x[key] is not None]
        if have:
            out[key] = have[-1][key] - have[0][key]
            if key == "consumed":
                out["window_s"] = round(have[-1]["t"] - have[0]["t"], 1)
    return out


def _assigned(stack: PipelineStack) -> list[int]:
    return [int(_metric(w, "iotad_assigned_partitions")) for w in _live(stack)]


def _worst(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def rss_kib(pid: int) -> int | None:
    """Resident set size of a process in KiB (``VmRSS`` in ``/proc/<pid>/status``); None if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class CommittedOffsets:
    """Sum of a consumer group's committed offsets on one topic (kafka-python admin; works on Tansu)."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        from kafka.admin import KafkaAdminClient

        self.group, self.topic = group, topic
        self._admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="iotad-faults")

    def total(self) -> int | None:
        try:
            offsets = self._admin.list_group_offsets({self.group: None}).get(self.group, {})
        except Exception:  # a rebalance or a broker hiccup: a missing sample, not a failure
            return None
        return sum(int(om.offset) for tp, om in offsets.items() if tp.topic == self.topic and om.offset >= 0)

    def close(self) -> None:
        self._admin.close()


# -- outputs and the reference ------------------------------------------------------------------------


def _read_scores(stack: PipelineStack, s: Settings, expected: int) -> list[dict[str, Any]]:
    """Every message of the scores topic (written right after InfluxDB, so settled with it)."""
    records = read_all(stack.bootstrap, s.scores_topic, idle_timeout_s=1.0, timeout_s=30, min_records=expected)
    return [msgspec.json.decode(r.value) for r in records if r.value]


def _influx_points(stack: PipelineStack, s: Settings, devices: Sequence[str]) -> list[dict[str, Any]]:
    """Every point, one query per device: ``{"device", "ts", "model_version", "score", "status", "n_readings"}``."""
    points = []
    for dev in devices:
        literal = "'" + dev.replace("\\", "\\\\").replace("'", "\\'") + "'"
        q = (
            f'SELECT "score", "status", "n_readings", "threshold" FROM {quote_ident(s.influx_measurement)} '
            f'WHERE "device" = {literal} GROUP BY "model_version"'
        )
        for series in influx_v1_query(stack.influx_url, s.influx_database, q):
            cols = series["columns"]
            version = series.get("tags", {}).get("model_version", "")
            for row in series.get("values", []):
                x = dict(zip(cols, row, strict=True))
                points.append(
                    {
                        "device": dev,
                        "ts": int(x["time"]),
                        "model_version": version,
                        "score": x["score"],
                        "status": x["status"],
                        "n_readings": x["n_readings"],
                    }
                )
    return points


Reference = dict[tuple[str, int], ScoreRecord]


def reference_scores(
    s: Settings,
    readings: Sequence[Record],
    *,
    switch: dict[str, int] | None = None,
    new_model: Path | None = None,
) -> Reference:
    """The same messages through one uninterrupted in-process Processor, in batches of 97.

    With ``switch`` (device -> ts of the first step the worker scored with ``new_model``), each device is run
    alone, on a processor of its own: the readings the worker applied before its swap (those before the one
    that closed that step) by the starting model, then :meth:`Processor.swap` to the new model (the device
    re-warms from its history and keeps what its threshold learnt, as in the worker), then the rest.
    Devices are independent, so this is the worker's computation whatever its micro-batches were. Open
    buckets are flushed at the end, as the worker's idle flush does once the stream stops.
    """
    now_ms = int(time.time() * 1000)
    end_ms = now_ms + s.idle_flush_ms  # the worker closes a device's last open bucket when it goes quiet
    inbound = [Inbound(r.key, r.value or b"", r.topic, r.partition, r.offset) for r in readings]
    start = startup_model_dir(s)
    proc = build_processor(s, build_detector(s, start))
    ref: Reference = {}

    def run(msgs: Sequence[Inbound]) -> None:
        for i in range(0, len(msgs), 97):
            for r in proc.process(msgs[i : i + 97], now_ms).scores:
                ref[(r.device_id, r.ts_ms)] = r

    def flush() -> None:
        for r in proc.flush_idle(end_ms).scores:
            ref[(r.device_id, r.ts_ms)] = r

    if switch is None or new_model is None:
        run(inbound)
        flush()
        return ref
    by_device: dict[bytes | None, list[Inbound]] = defaultdict(list)
    for m in inbound:
        by_device[m.key].append(m)
    for key, msgs in by_device.items():
        at = switch.get((key or b"").decode(errors="replace"))
        # Step ``at`` was closed by the reading at ``at + grace``: the first one the new model saw.
        before = [m for m in msgs if at is None or int(msgspec.json.decode(m.value)["ts"]) < at + s.grace_ms]
        # a swap hands the detector's threshold state over to the next one: fresh detectors per device
        proc = build_processor(s, build_detector(s, start))
        run(before)
        proc.swap(build_detector(s, new_model))
        run(msgs[len(before) :])
        flush()
    return ref


Output = tuple[str, int, str | None, float | None, int | None]  # device, ts, status, score, n_readings


def _compare(ref: Reference, outputs: Iterable[Output], tolerance: float) -> tuple[float, int, list[dict[str, Any]]]:
    """(max |score - reference|, mismatches of status, score presence or readings per step, the outputs
    that differ from the reference: mismatches and scores off by ``tolerance`` or more)."""
    worst, bad = 0.0, 0
    off: list[dict[str, Any]] = []
    for dev, ts, status, score, n_readings in outputs:
        r = ref.get((dev, ts))
        if r is None:
            continue  # counted as unexpected
        diff = None
        if status != r.status.value or (score is None) != (r.score is None) or n_readings != r.n_readings:
            bad += 1
        elif score is not None and r.score is not None:
            diff = abs(score - r.score)
            worst = max(worst, diff)
            if diff < tolerance:
                continue
        else:
            continue  # both without a score, same status
        off.append(
            {
                "device": dev,
                "ts": ts,
                "got": [status, score, n_readings],
                "reference": [r.status.value, r.score, r.n_readings],
                "diff": diff,
            }
        )
    return worst, bad, off


@dataclass
class Collected:
    scores: list[dict[str, Any]]
    points: list[dict[str, Any]]
    readings: list[Record]


def settle_and_verify(
    stack: PipelineStack,
    s: Settings,
    load: Load,
    out: Outcome,
    cfg: FaultConfig,
    *,
    new_model: Path | None = None,
    log: Log = _stderr,
) -> Collected:
    """Wait for the outputs of everything sent, then fill ``out``'s delivery and state figures."""
    sent = load.sent_keys()
    out.readings_sent = len(sent)
    out.details["load"] = {
        "devices": load.sim.n_devices,
        "steps": len(load.timestamps),
        "readings_per_s": round(load.sim.n_devices * load.steps_per_s, 1),
        "send_errors": load.send_errors,
    }
    if load.error is not None:
        out.checks["load_ran"] = False
        out.details["load_error"] = repr(load.error)
    t0 = time.monotonic()
    _wait_settled(stack, s, len(sent), cfg.settle_timeout_s)
    scores = _read_scores(stack, s, len(sent))
    points = _influx_points(stack, s, load.sim.device_ids)
    readings = read_all(stack.bootstrap, s.readings_topic, min_records=len(sent), timeout_s=60)
    # Only valid, on-time readings are sent: a dead letter (e.g. "late") would be a replayed reading
    # applied again instead of being skipped by the offset guard.
    dead = read_all(stack.bootstrap, s.dlq_topic, idle_timeout_s=0.5, timeout_s=10)
    out.details["dead_letters"] = len(dead)
    out.checks["no_dead_letters"] = not dead
    out.details["settle_s"] = round(time.monotonic() - t0, 1)
    consumer = consumer_log(stack)
    out.details["faust_dropped_messages"] = consumer.dropped
    out.details["offset_holes_refetched"] = consumer.refetched

    score_keys = Counter((x["device_id"], int(x["ts"])) for x in scores)
    point_keys = Counter((p["device"], p["ts"]) for p in points)
    out.score_messages = len(scores)
    out.score_messages_redelivered = len(scores) - len(score_keys)
    out.influx_points = len(points)
    out.lost_influx = len(sent - point_keys.keys())
    out.lost_scores = len(sent - score_keys.keys())
    out.lost = len(sent - (point_keys.keys() & score_keys.keys()))
    out.duplicated = sum(1 for n in point_keys.values() if n > 1)
    out.unexpected = len((point_keys.keys() | score_keys.keys()) - sent)
    out.details["readings_in_topic"] = len(readings)

    switch: dict[str, int] | None = None
    if new_model is not None:
        switch = {}
        for x in scores:
            if x["model_version"] == CANDIDATE_VERSION:
                dev, ts = x["device_id"], int(x["ts"])
                switch[dev] = min(ts, switch.get(dev, ts))
    log(f"  reference: {len(readings)} messages through an in-process processor")
    ref = reference_scores(s, readings, switch=switch, new_model=new_model)
    missing_in_ref = len(sent - ref.keys())
    if missing_in_ref:
        out.details["sent_but_not_in_reference"] = missing_in_ref  # producer-side loss: not the pipeline's
    tol = cfg.tolerance
    w1, b1, off1 = _compare(
        ref, ((x["device_id"], int(x["ts"]), x["status"], x["score"], x["n_readings"]) for x in scores), tol
    )
    w2, b2, off2 = _compare(
        ref, ((p["device"], p["ts"], p["status"], p["score"], p["n_readings"]) for p in points), tol
    )
    out.state_mismatch_max = max(w1, w2) if ref else None
    out.status_mismatches = b1 + b2
    lost = sorted(sent - (point_keys.keys() & score_keys.keys()))
    if lost:
        # Readings never scored that Faust's consumer logged as dropped in a worker (see consumer_log).
        out.details["lost_dropped_by_faust_consumer"] = len(set(lost) & consumer.dropped_readings)
    if lost or off1 or off2:
        # Evidence for a failure: a few examples here, every output of the devices concerned on disk.
        out.details["lost_examples"] = [
            {"device": d, "ts": ts, "in_influx": (d, ts) in point_keys, "in_scores": (d, ts) in score_keys}
            for d, ts in lost[:10]
        ]
        differ = [{**x, "in": "scores"} for x in off1] + [{**x, "in": "influx"} for x in off2]
        out.details["mismatch_examples"] = sorted(differ, key=lambda x: (x["device"], x["ts"]))[:10]
        devices = {d for d, _ in lost} | {x["device"] for x in off1 + off2}
        path = s.data_dir / "mismatches.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "lost": lost,
                    "differ": differ,
                    "scores": [x for x in scores if x["device_id"] in devices],
                    "points": [p for p in points if p["device"] in devices],
                    "readings": [
                        [r.partition, r.offset, r.timestamp_ms, msgspec.json.decode(r.value or b"{}")]
                        for r in readings
                        if (r.key or b"").decode(errors="replace") in devices
                    ],
                },
                default=str,
            )
        )
        out.details["evidence"] = str(path)
    return Collected(scores, points, readings)


# -- scenarios ----------------------------------------------------------------------------------------


def _child_env(cfg: FaultConfig) -> dict[str, str]:
    return {"DEVLOG": "1"} if cfg.faust_devlog else {}


_DROPPED = re.compile(r"DROPPED MESSAGE ROFF \d+: k=b'([^']*)' v=b'\{\"device_id\":\"[^\"]*\",\"ts\":(\d+)")
_REREAD = re.compile(r"consumer skipped .* re-read (\d+) records")


@dataclass
class ConsumerLog:
    """From the worker logs: messages Faust's consumer dropped (offset below its read offset; logged with
    DEVLOG=1) per worker and the (device, ts) of the readings among them, and the records the worker re-read
    to fill the offset holes that left (``pipeline.continuity``) per worker."""

    dropped: dict[str, int] = field(default_factory=dict)
    dropped_readings: set[tuple[str, int]] = field(default_factory=set)
    refetched: dict[str, int] = field(default_factory=dict)


def consumer_log(stack: PipelineStack) -> ConsumerLog:
    out = ConsumerLog()
    if stack.run_dir is not None:
        for path in sorted(stack.run_dir.glob("*.log")):
            dropped = refetched = 0
            try:
                with path.open(errors="replace") as f:
                    for line in f:
                        if "DROPPED MESSAGE ROFF" in line:
                            dropped += 1
                            if m := _DROPPED.search(line):
                                out.dropped_readings.add((m.group(1), int(m.group(2))))
                        elif m := _REREAD.search(line):
                            refetched += int(m.group(1))
            except OSError:
                continue
            if dropped:
                out.dropped[path.stem] = dropped
            if refetched:
                out.refetched[path.stem] = refetched
    return out


def scenario_settings(base: Settings, name: str, data_dir: Path, cfg: FaultConfig) -> Settings:
    """``base`` with this scenario's topics, consumer group, database, data directory and grace."""
    prefix = f"faults-{name.replace('_', '-')}"
    return base.model_copy(
        update={
            "topic_prefix": prefix,
            "app_id": f"{prefix}-worker",
            "influx_database": prefix.replace("-", "_"),
            "data_dir": data_dir / name,
            "grace_ms": cfg.grace_steps * base.step_ms,
        }
    )


def _start_load(stack: PipelineStack, s: Settings, cfg: FaultConfig, planned_s: float, spikes: int = 0) -> Load:
    """Start the fleet; ``planned_s`` is how long the scenario means to stream (the bound is 2x + 60 s)."""
    steps = int(planned_s * cfg.steps_per_s)
    first = s.burnin_steps + s.warmup_steps + 5  # spikes once the devices can be flagged
    return Load(
        stack.bootstrap,
        s.readings_topic,
        devices=cfg.devices,
        steps_per_s=cfg.steps_per_s,
        max_s=2 * planned_s + 60,
        seed=cfg.seed,
        step_ms=s.step_ms,
        spikes=spikes,
        spikes_within=(first, max(first + 10, steps - 5)),
    ).start()


def _end_load(load: Load, at: float, out: Outcome) -> None:
    """Let the load run until monotonic time ``at`` (or its own bound), then stop it."""
    load.wait(max(0.0, at - time.monotonic()))
    load.stop()
    out.checks["load_ran"] = load.error is None and load.send_errors == 0


TAIL_S = 3.0  # the load goes on at least this long after the last fault


def run_kill(cfg: FaultConfig, base: Settings, data_dir: Path, log: Log = _stderr) -> Outcome:
    """SIGKILL the worker ``cfg.kills`` times at seeded random points mid-stream; restart it each time."""
    out = Outcome("kill", tolerance=cfg.tolerance)
    s = scenario_settings(base, "kill", data_dir, cfg)
    rng = random.Random(cfg.seed)
    segment = 0.75 * cfg.stream_s / max(1, cfg.kills)
    plan = [rng.uniform(k * segment + 1.0, (k + 1) * segment) for k in range(cfg.kills)]
    kills: list[dict[str, Any]] = []
    replayed = 0.0
    with PipelineStack(s, extra_env=_child_env(cfg)) as stack:
        load = _start_load(stack, s, cfg, cfg.stream_s)
        t_start = time.monotonic()
        try:
            for planned in plan:
                at = max(t_start + planned, time.monotonic() + rng.uniform(0.2, 1.0))
                time.sleep(max(0.0, at - time.monotonic()))
                victim = _live(stack)[0]
                victim_replayed = _metric(victim, "iotad_replayed_skipped_total")
                replayed += victim_replayed
                mark = load.mark()
                scored = _sample(victim, "iotad_readings_scored_total")
                mid_stream = load.running
                victim.stop(kill=True)
                t_fault = time.monotonic()
                log(f"  kill: SIGKILL worker pid {victim.pid} at {t_fault - t_start:.1f} s ({scored} scored)")
                stack.add_worker(wait=False).wait_ready(cfg.ready_timeout_s)
                ready_s = time.monotonic() - t_fault
                recovered, _ = _wait_recovered(stack, s, load, mark, t_fault, cfg.settle_timeout_s)
                log(f"  kill: restarted, ready in {ready_s:.1f} s, caught up in {recovered} s")
                kills.append(
                    {
                        "at_s": round(t_fault - t_start, 2),
                        "mid_stream": mid_stream,
                        "scored_by_victim": scored,
                        "replayed_skipped_by_victim": victim_replayed,
                        "ready_s": round(ready_s, 2),
                        "recovered_within_s": recovered,
                    }
                )
            _end_load(load, max(t_start + cfg.stream_s, time.monotonic() + TAIL_S), out)
        finally:
            load.stop()
        settle_and_verify(stack, s, load, out, cfg, log=log)
        replayed += sum(_metric(w, "iotad_replayed_skipped_total") for w in _live(stack))
    out.recovered_within_s = _worst(k["recovered_within_s"] for k in kills) if kills else None
    out.details["kills"] = kills
    out.details["replayed_skipped"] = int(replayed)
    out.checks["all_kills_mid_stream"] = len(kills) == cfg.kills and all(k["mid_stream"] for k in kills)
    out.checks["recovered_after_each_kill"] = all(k["recovered_within_s"] is not None for k in kills)
    return out


def run_rebalance(cfg: FaultConfig, base: Settings, data_dir: Path, log: Log = _stderr) -> Outcome:
    """Two workers, one stopped gracefully (its partitions move), then a second one added back."""
    out = Outcome("rebalance", tolerance=cfg.tolerance)
    s = scenario_settings(base, "rebalance", data_dir, cfg)
    phases: list[dict[str, Any]] = []
    n = s.partitions

    def settled(count: int) -> bool:
        a = _assigned(stack)
        return len(a) == count and sum(a) == n and min(a) > 0

    with PipelineStack(s, workers=2, extra_env=_child_env(cfg)) as stack:
        _wait_until(lambda: settled(2), cfg.ready_timeout_s)
        phases.append({"phase": "two workers", "assigned": _assigned(stack)})
        load = _start_load(stack, s, cfg, cfg.stream_s)
        t_start = time.monotonic()
        try:
            for step, (when, action) in enumerate(((1 / 3, "stop one"), (2 / 3, "add one"))):
                time.sleep(max(0.0, t_start + when * cfg.stream_s - time.monotonic()))
                mark = load.mark()
                mid_stream = load.running
                t_fault = time.monotonic()
                if step == 0:
                    victim = _live(stack)[0]
                    victim.stop()  # SIGTERM: Faust leaves the group and commits
                    log(f"  rebalance: stopped worker pid {victim.pid} in {time.monotonic() - t_fault:.1f} s")
                    want = 1
                else:
                    stack.add_worker(wait=False)
                    log("  rebalance: started a second worker")
                    want = 2
                recovered, rebalance_s = _wait_recovered(
                    stack, s, load, mark, t_fault, cfg.settle_timeout_s, functools.partial(settled, want)
                )
                assigned = _assigned(stack)
                log(f"  rebalance: {action}: assigned {assigned} after {rebalance_s} s, caught up in {recovered} s")
                phases.append(
                    {
                        "phase": action,
                        "mid_stream": mid_stream,
                        "assigned": assigned,
                        "rebalanced": rebalance_s is not None,
                        "rebalance_s": rebalance_s,
                        "recovered_within_s": recovered,
                    }
                )
            _end_load(load, max(t_start + cfg.stream_s, time.monotonic() + TAIL_S), out)
        finally:
            load.stop()
        settle_and_verify(stack, s, load, out, cfg, log=log)
        tracked = [int(_metric(w, "iotad_devices_tracked")) for w in _live(stack)]
    out.recovered_within_s = _worst(p.get("recovered_within_s") for p in phases)
    out.details["phases"] = phases
    out.details["devices_tracked_per_worker"] = tracked
    out.checks["rebalanced_mid_stream"] = len(phases) == 3 and all(
        p["rebalanced"] and p["mid_stream"] for p in phases[1:]
    )
    # State follows its partitions: each device is held by exactly one worker at the end.
    out.checks["each_device_on_one_worker"] = sum(tracked) == cfg.devices
    return out


def run_influx_outage(cfg: FaultConfig, base: Settings, data_dir: Path, log: Log = _stderr) -> Outcome:
    """Stop InfluxDB for ``cfg.outage_s`` under load; sample the worker; restart it on the same port."""
    out = Outcome("influx_outage", tolerance=cfg.tolerance)
    buffer_points = max(1, round(cfg.devices * cfg.steps_per_s * cfg.sink_buffer_s))
    s = scenario_settings(base, "influx_outage", data_dir, cfg).model_copy(
        update={"influx_max_pending_lines": buffer_points}
    )
    planned_s = cfg.before_outage_s + cfg.outage_s + cfg.after_outage_s
    samples: list[dict[str, Any]] = []
    with PipelineStack(s, extra_env=_child_env(cfg)) as stack:
        assert stack.stack is not None
        influxd = stack.stack.influxd
        worker = stack.procs[0]
        assert worker.pid is not None
        load = _start_load(stack, s, cfg, planned_s)
        offsets = CommittedOffsets(stack.bootstrap, s.app_id, s.readings_topic)
        try:
            _wait_until(lambda: _influx_count(stack, s) > 0, cfg.ready_timeout_s)
            time.sleep(cfg.before_outage_s)
            rss_before = rss_kib(worker.pid)
            sent_at_stop = load.readings_sent
            influxd.stop()
            t_down = time.monotonic()
            log(f"  influx_outage: InfluxDB stopped for {cfg.outage_s:.0f} s (worker RSS {rss_before} KiB)")
            pid = worker.pid

            def sample() -> None:
                samples.append(
                    {
                        "t": round(time.monotonic() - t_down, 1),
                        "consumed": _sample(worker, "iotad_messages_consumed_total"),
                        "committed": offsets.total(),
                        "rss_kib": rss_kib(pid),
                        "retries": _sample(worker, "iotad_sink_retries_total"),
                        "pending": _sample(worker, "iotad_sink_pending_points"),
                        "sent": load.readings_sent,
                    }
                )

            for i in range(int(cfg.outage_s)):  # one sample a second, and a last one just before the restart
                time.sleep(max(0.0, t_down + i - time.monotonic()))
                if time.monotonic() - t_down > cfg.outage_s - 0.5:
                    break
                sample()
            time.sleep(max(0.0, t_down + cfg.outage_s - 0.3 - time.monotonic()))
            sample()
            time.sleep(max(0.0, t_down + cfg.outage_s - time.monotonic()))
            mark = load.mark()
            sent_at_restart = mark[0]
            mid_stream = load.running
            influxd.start()
            t_up = time.monotonic()
            log(f"  influx_outage: InfluxDB back after {t_up - t_down:.1f} s; {sent_at_restart} readings sent so far")
            recovered, _ = _wait_recovered(stack, s, load, mark, t_up, cfg.settle_timeout_s)
            log(f"  influx_outage: all points in {recovered} s after the restart")
            _end_load(load, max(t_up + cfg.after_outage_s, time.monotonic() + TAIL_S), out)
        finally:
            load.stop()
            offsets.close()
        retries = worker.metric("iotad_sink_retries_total")
        settle_and_verify(stack, s, load, out, cfg, log=log)
    out.recovered_within_s = recovered
    # The stall starts at the first failed write; allow 2 s for the commit of the batch acked before it.
    stall = _stall(samples, grace_s=2.0)
    rss = [x["rss_kib"] for x in samples if x["rss_kib"] is not None]
    growth_mib = round((max(rss) - rss_before) / 1024, 1) if rss and rss_before else None
    out.details.update(
        outage_s=round(t_up - t_down, 1),
        readings_sent_during_outage=sent_at_restart - sent_at_stop,
        sink_retries=retries,
        consumed_after_stall=stall["consumed"],
        committed_after_stall=stall["committed"],
        stall_window_s=stall["window_s"],
        rss_mib_before=None if rss_before is None else round(rss_before / 1024, 1),
        rss_mib_max=round(max(rss) / 1024, 1) if rss else None,
        rss_growth_mib=growth_mib,
        sink_buffer_points=buffer_points,
        sink_pending_max=_worst(x["pending"] for x in samples),
        samples=[
            [x["t"], x["consumed"], x["committed"], x["rss_kib"], x["retries"], x["pending"], x["sent"]]
            for x in samples
        ],
        samples_columns=["t_s", "consumed", "committed", "rss_kib", "sink_retries", "sink_pending", "readings_sent"],
    )
    out.checks["outage_mid_stream"] = mid_stream and sent_at_restart > sent_at_stop
    out.checks["sink_retried"] = retries > 0
    out.checks["consumption_stalled"] = (
        stall["consumed"] == 0 and stall["committed"] in (0, None) and (stall["window_s"] or 0) >= cfg.outage_s / 2
    )
    out.checks["memory_bounded"] = growth_mib is not None and growth_mib < cfg.rss_growth_bound_mib
    out.checks["recovered"] = recovered is not None
    return out


def train_candidate(directory: Path, version: str = CANDIDATE_VERSION) -> Path:
    """A tiny artifact (LSTM, hidden 16, 2 epochs on a simulated fleet), as in the swap tests."""
    from models.training import TrainConfig, save_trained, train
    from pipeline.datasets import simulator_dataset

    data = simulator_dataset(8, 600, seed=9)
    result = train(data.series, data.features, TrainConfig(hidden=16, layers=1, max_epochs=2, seed=1), progress=False)
    return save_trained(result, directory, version=version, data_description=data.description)


def run_model_swap(cfg: FaultConfig, base: Settings, data_dir: Path, log: Log = _stderr) -> Outcome:
    """Announce a freshly trained artifact on the control topic mid-stream."""
    out = Outcome("model_swap", tolerance=cfg.tolerance)
    s = scenario_settings(base, "model_swap", data_dir, cfg)
    t_train = time.monotonic()
    candidate = train_candidate(s.data_dir / "candidate")
    out.details["train_s"] = round(time.monotonic() - t_train, 1)
    with PipelineStack(s, extra_env=_child_env(cfg)) as stack:
        old_version = build_detector(s, startup_model_dir(s)).version
        load = _start_load(stack, s, cfg, cfg.stream_s)
        t_start = time.monotonic()
        try:
            time.sleep(cfg.stream_s / 2)
            mark = load.mark()
            mid_stream = load.running
            message = {"type": control.MODEL_UPDATED, "version": CANDIDATE_VERSION, "path": str(candidate)}
            control.publish(stack.bootstrap, s.control_topic, message)
            t_pub = time.monotonic()
            swapped = _wait_until(lambda: stack.total("iotad_model_swaps_total") >= 1, cfg.ready_timeout_s, 0.1)
            swap_s = time.monotonic() - t_pub
            recovered, _ = _wait_recovered(stack, s, load, mark, t_pub, cfg.settle_timeout_s)
            log(f"  model_swap: {old_version} -> {CANDIDATE_VERSION} in {swap_s:.1f} s, caught up in {recovered} s")
            _end_load(load, max(t_start + cfg.stream_s, time.monotonic() + TAIL_S), out)
        finally:
            load.stop()
        got = settle_and_verify(stack, s, load, out, cfg, new_model=candidate, log=log)
        swaps = stack.total("iotad_model_swaps_total")
    out.recovered_within_s = recovered
    per_version = Counter(p["model_version"] for p in got.points)
    scores_per_version = Counter(x["model_version"] for x in got.scores)
    runs_ok = True
    by_dev: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for x in got.scores:
        by_dev[x["device_id"]].append((int(x["ts"]), x["model_version"]))
    for seq in by_dev.values():
        versions = [v for _, v in sorted(set(seq))]
        runs = [v for i, v in enumerate(versions) if i == 0 or versions[i - 1] != v]
        runs_ok &= runs == [old_version, CANDIDATE_VERSION]
    out.details.update(
        old_version=old_version,
        new_version=CANDIDATE_VERSION,
        swap_s=round(swap_s, 2),
        influx_points_per_version=dict(per_version),
        score_messages_per_version=dict(scores_per_version),
        model_swaps=swaps,
    )
    out.checks["swap_mid_stream"] = mid_stream and swapped and swaps == 1
    out.checks["points_per_version_add_up"] = sum(per_version.values()) == out.readings_sent
    out.checks["each_device_old_then_new"] = runs_ok and len(by_dev) == cfg.devices
    return out


class WebhookReceiver:
    """A loopback webhook recording the ``X-Iotad-Event-Id`` of every delivery it accepts (200).

    :meth:`down` closes its port (deliveries get "connection refused"); :meth:`up` listens on it again.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[str] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/alerts"

    def event_ids(self) -> list[str]:
        with self._lock:
            return list(self.received)

    def up(self) -> None:
        received, lock = self.received, self._lock

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    received.append(self.headers.get("X-Iotad-Event-Id") or "")
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

        for attempt in range(50):  # the port was ours a moment ago; rebinding may need a retry
            try:
                self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
                break
            except OSError:
                if attempt == 49:
                    raise
                time.sleep(0.1)
        assert self._server is not None
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


def _outbox_ids(stack: PipelineStack, s: Settings) -> set[str]:
    """Event ids of the alerts in ``<prefix>.alerts`` that are to be delivered (not storm-suppressed)."""
    out = set()
    for r in read_all(stack.bootstrap, s.alerts_topic, idle_timeout_s=0.5, timeout_s=15):
        doc = msgspec.json.decode(r.value or b"{}")
        if isinstance(doc, dict) and doc.get("event_id") and not doc.get("suppressed"):
            out.add(str(doc["event_id"]))
    return out


def _dead_ids(stack: PipelineStack, s: Settings) -> list[str]:
    records = read_all(stack.bootstrap, s.alerts_dlq_topic, idle_timeout_s=0.5, timeout_s=15)
    return [r.headers.get("iotad-event-id", b"").decode() for r in records]


def _deliver_all(stack: PipelineStack, s: Settings, hook: WebhookReceiver, ids: set[str], timeout_s: float) -> int:
    """Until every alert of ``ids`` reached the receiver: wait while deliveries are retried, re-drive the
    dead letters (``iotad alerts-redrive``) once they settle. Returns how many were re-driven."""
    from pipeline.alert_agents import redrive

    redriven = 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        received = set(hook.event_ids())
        if ids <= received:
            break
        dead = set(_dead_ids(stack, s))
        if ids <= received | dead:  # every one delivered or dead-lettered: nothing left in retries
            at = s.model_copy(update={"kafka_bootstrap": stack.bootstrap})
            redriven += redrive(at, receiver="hook", timeout_s=min(30.0, max(1.0, deadline - time.monotonic())))[
                "redriven"
            ]
            _wait_until(lambda: ids <= set(hook.event_ids()), min(15.0, max(0.0, deadline - time.monotonic())))
        else:
            time.sleep(0.5)
    return redriven


def run_alert_receiver_down(cfg: FaultConfig, base: Settings, data_dir: Path, log: Log = _stderr) -> Outcome:
    """The alerter's only receiver goes down for ``cfg.receiver_down_s`` while alerts are being raised.

    Here ``lost`` and ``duplicated`` count alert deliveries: every alert in the outbox (``<prefix>.alerts``)
    must reach the receiver, after ``iotad alerts-redrive`` of what was dead-lettered, and none twice (no
    crash here, so at-least-once allows no repeat). The scores under the alerts are checked as in the other
    scenarios (``details["scoring"]``; ``state_mismatch_max`` is theirs).
    """
    out = Outcome("alert_receiver_down", tolerance=cfg.tolerance)
    s = scenario_settings(base, "alert_receiver_down", data_dir, cfg)
    hook = WebhookReceiver()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    routes = s.data_dir / "routes.json"
    receiver = {"type": "webhook", "url": hook.url, **cfg.receiver_policy}
    routes.write_text(json.dumps({"receivers": {"hook": receiver}, "routes": [{"receivers": ["hook"]}]}))
    s = s.model_copy(
        update={
            "alert_routes": str(routes),
            "alert_open_steps": 1,  # every flagged spike opens an alert
            "alert_resolve_steps": 3,
            "alert_cooldown_ms": 5 * s.step_ms,
            "alert_storm_share": 0.0,  # storm guard off: every alert goes to the receiver
        }
    )
    planned_s = cfg.stream_s
    down_at = (s.burnin_steps + s.warmup_steps + 5) / cfg.steps_per_s + 1.0  # once spikes can raise alerts
    hook.up()
    try:
        with PipelineStack(s, alerters=1, extra_env=_child_env(cfg)) as stack:
            load = _start_load(stack, s, cfg, planned_s, spikes=cfg.devices)
            t_start = time.monotonic()
            try:
                time.sleep(max(0.0, t_start + down_at - time.monotonic()))
                before = len(set(hook.event_ids()))
                hook.down()
                t_down = time.monotonic()
                log(f"  alert_receiver_down: receiver down for {cfg.receiver_down_s:.0f} s ({before} alerts in)")
                time.sleep(max(0.0, t_down + cfg.receiver_down_s - time.monotonic()))
                mid_stream = load.running
                alerter = stack.alerter_procs[0]
                retries = _metric(alerter, "iotad_alert_delivery_retries_total")
                hook.up()
                t_up = time.monotonic()
                pending = _outbox_ids(stack, s)
                undelivered = len(pending - set(hook.event_ids()))
                redriven = _deliver_all(stack, s, hook, pending, cfg.settle_timeout_s)
                recovered = round(time.monotonic() - t_up, 2) if pending <= set(hook.event_ids()) else None
                log(
                    f"  alert_receiver_down: back up; {len(pending)} alerts in the outbox delivered in {recovered} s"
                    f" ({redriven} re-driven)"
                )
                _end_load(load, max(t_start + planned_s, time.monotonic() + TAIL_S), out)
            finally:
                load.stop()
            settle_and_verify(stack, s, load, out, cfg, log=log)
            out.details["scoring"] = {
                "lost": out.lost,
                "duplicated": out.duplicated,
                "score_messages_redelivered": out.score_messages_redelivered,
            }
            out.checks["scoring_intact"] = out.lost == 0 and out.duplicated == 0
            # Alerts raised from the last scores may still be on their way to the outbox.
            outbox = _outbox_ids(stack, s)
            _wait_until(lambda: _outbox_ids(stack, s) == outbox, 10.0, 2.0)
            outbox = _outbox_ids(stack, s)
            redriven += _deliver_all(stack, s, hook, outbox, cfg.settle_timeout_s)
            dead = _dead_ids(stack, s)
            deliveries = {
                outcome: _metric(alerter, f'iotad_alert_deliveries_total{{outcome="{outcome}",receiver="hook"}}')
                for outcome in ("ok", "failed")
            }
    finally:
        hook.down()
    received = Counter(hook.event_ids())
    out.lost = len(outbox - received.keys())
    out.duplicated = sum(1 for n in received.values() if n > 1)
    out.unexpected = len(received.keys() - outbox)
    out.recovered_within_s = recovered
    out.details.update(
        alerts_in_outbox=len(outbox),
        alerts_in_outbox_at_recovery=len(pending),
        undelivered_at_recovery=undelivered,
        delivered_before_outage=before,
        dead_lettered=len(dead),
        redriven=redriven,
        delivery_retries_during_outage=retries,
        deliveries=deliveries,
        receiver_down_s=round(t_up - t_down, 1),
    )
    out.checks["outage_mid_stream"] = mid_stream
    out.checks["alerts_raised"] = len(outbox) > before
    out.checks["receiver_was_missed"] = undelivered > 0 and (retries > 0 or bool(dead))
    out.checks["recovered"] = recovered is not None
    return out


RUNNERS: dict[str, Callable[[FaultConfig, Settings, Path, Log], Outcome]] = {
    "kill": run_kill,
    "rebalance": run_rebalance,
    "influx_outage": run_influx_outage,
    "model_swap": run_model_swap,
    "alert_receiver_down": run_alert_receiver_down,
}


def run_scenario(name: str, cfg: FaultConfig, base: Settings, data_dir: Path, log: Log = _stderr) -> Outcome:
    if name not in RUNNERS:
        raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    log(f"scenario {name}")
    t0 = time.monotonic()
    out = RUNNERS[name](cfg, base, data_dir, log)
    out.seconds = round(time.monotonic() - t0, 1)
    log(
        f"  {name}: ok={out.ok} sent={out.readings_sent} lost={out.lost} duplicated={out.duplicated} "
        f"redelivered={out.score_messages_redelivered} mismatch={out.state_mismatch_max} "
        f"recovered_within_s={out.recovered_within_s} checks={out.checks}"
    )
    return out


def main(
    cfg: FaultConfig,
    scenarios: Sequence[str] = SCENARIOS,
    *,
    as_json: bool = False,
    base: Settings | None = None,
    data_dir: Path | None = None,
    keep: bool = False,
) -> int:
    """Run ``scenarios`` one after the other; print a table (stderr) and, with ``as_json``, one JSON line.

    Returns the exit code: 0 when every scenario is ok.
    """
    base = base or Settings()
    tmp = Path(tempfile.mkdtemp(prefix="iotad-faults-")) if data_dir is None else data_dir
    results: dict[str, Any] = {}
    for name in scenarios:  # an exception leaves tmp in place, with the servers' and workers' logs
        results[name] = run_scenario(name, cfg, base, tmp).to_dict()
    ok = all(r["ok"] for r in results.values())
    if data_dir is None and not keep and ok:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        _stderr(f"logs and data kept under {tmp}")
    summary = {
        "ok": ok,
        "config": asdict(cfg),
        "scenarios": results,
        "left_out": LEFT_OUT,
    }
    keys = ("ok", "readings_sent", "lost", "duplicated", "score_messages_redelivered", "state_mismatch_max")
    for name, r in results.items():
        _stderr(f"{name:>14}: " + "  ".join(f"{k}={r[k]}" for k in (*keys, "recovered_within_s", "seconds")))
    if as_json:
        print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1
