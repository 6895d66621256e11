"""Property-based fuzzing of ``Processor.process`` (the whole pure core, not only ``validate``).

Valid readings of a small fleet (single readings and envelopes, on the step grid, every device in order)
are interleaved with malformed messages that are wrong *by construction*: arbitrary bytes, JSON that is
not a reading object, readings with exactly one structural fault (missing or mistyped fields, bad or
out-of-range timestamps, non-finite or huge values, wrong sensor sets, bad device ids, key mismatch,
extra fields, broken envelopes), oversized messages, duplicates and out-of-order readings of devices
that already sent later steps (late) and readings stamped far in the future (clock skew). Most faulty
messages name a device of the valid fleet, so they must not disturb its state either. Then, for any
interleaving and any micro-batching:

* ``process`` never raises;
* every malformed message ends in ``dead`` (one dead letter per faulty reading) with a known reason and
  a detail, and no valid message is dead-lettered;
* every valid reading produces exactly one score, equal to the score of the same readings processed
  without the malformed messages.

An unknown device id is *valid* in this pipeline (the device is simply new), so the fleet itself starts
unknown; it is not one of the malformed kinds.
"""

from __future__ import annotations

import itertools
import json
import math
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.artifact import Artifact, Normaliser
from models.detector import Detector
from models.forecaster import Forecaster, ForecasterConfig
from models.scoring import ScoringConfig, StaticThreshold
from pipeline.processor import Inbound, Processor
from pipeline.records import ScoreRecord
from pipeline.schema import MAX_DEVICE_ID_LEN, MAX_MESSAGE_BYTES, Limits, Reason
from pipeline.windowing import WindowConfig

FEATURES = ("pressure", "temp", "vibration")
MEAN = np.array([10.0, -5.0, 100.0])
STD = np.array([2.0, 0.5, 10.0])
STEP = 1000
T0 = 1_795_341_600_000
MAX_STEPS = 6
NOW = T0 + (MAX_STEPS + 2) * STEP
MIN_TS = 946_684_800_000
SKEW = 300_000
TOPIC = "iotad.readings"
PARTITIONS = 4
WINDOW = WindowConfig(step_ms=STEP, grace_ms=0, max_gap_steps=3, idle_flush_ms=2000)
LIMITS = Limits(sensors=FEATURES, min_ts_ms=MIN_TS, max_future_skew_ms=SKEW)
REASONS = {r.value for r in Reason}
OVERSIZED = b'{"device_id": "dev-0", "pad": "' + b"a" * MAX_MESSAGE_BYTES + b'"}'


@pytest.fixture(scope="module")
def artifact() -> Artifact:
    torch.manual_seed(5)
    model = Forecaster(ForecasterConfig(n_features=3, hidden=8, layers=1)).eval()
    return Artifact(model, FEATURES, Normaliser(MEAN, STD), version="fuzz")


def make_processor(artifact: Artifact) -> Processor:
    det = Detector(artifact, ScoringConfig(warmup_steps=2, burnin_steps=1), StaticThreshold(4.0), capacity=8)
    return Processor(det, WINDOW, LIMITS)


def values_of(dev: str, t: int) -> dict[str, float]:
    rng = np.random.default_rng(zlib.crc32(f"{dev}/{t}".encode()))
    return dict(zip(FEATURES, (MEAN + STD * rng.standard_normal(3)).round(4).tolist(), strict=True))


def ts_of(t: int) -> int:
    return T0 + t * STEP


@dataclass(frozen=True)
class Msg:
    key: bytes | None
    value: bytes
    valid: bool  # a valid message: every reading in it must be scored
    kind: str


def reading(dev: str, t: int, values: dict[str, float] | None = None) -> dict[str, Any]:
    return {"device_id": dev, "ts": ts_of(t), "values": values_of(dev, t) if values is None else values}


def encode(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


# -- malformed by construction -------------------------------------------------------------------------
not_int = st.floats(allow_nan=False, allow_infinity=False) | st.booleans() | st.none() | st.lists(st.integers())
not_number = st.text(max_size=5) | st.booleans() | st.none() | st.lists(st.integers(), max_size=2)
not_str = st.integers() | st.floats(allow_nan=False) | st.booleans() | st.none() | st.lists(st.text(max_size=3))
json_scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
bad_device_id = st.sampled_from(["", "x" * (MAX_DEVICE_ID_LEN + 1), "dev\x00null", "tab\tbed", "line\nfeed"])
far_ts = (
    st.integers(-(2**62), MIN_TS - 1)
    | st.integers(NOW + SKEW + 1, 2**62)
    | st.sampled_from(["1970-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "1999-12-31T23:59:59"])
)
non_finite = st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"])
huge = st.floats(min_value=1.01e12, max_value=1e300) | st.floats(min_value=-1e300, max_value=-1.01e12)


def _is_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except (ValueError, UnicodeDecodeError):
        return False


@st.composite
def broken_item(draw: st.DrawFn, dev: str, t: int) -> bytes:
    """One reading of an envelope, broken (returned as its JSON text)."""
    item = {"ts": ts_of(t), "values": values_of(dev, t)}
    fault = draw(st.sampled_from(["drop", "ts_type", "values_type", "sensor_type", "extra", "far_ts", "nan"]))
    if fault == "drop":
        del item[draw(st.sampled_from(["ts", "values"]))]
    elif fault == "ts_type":
        item["ts"] = draw(not_int)
    elif fault == "values_type":
        item["values"] = draw(not_number)
    elif fault == "sensor_type":
        item["values"][draw(st.sampled_from(FEATURES))] = draw(not_number)
    elif fault == "extra":
        item["unexpected"] = draw(json_value)
    elif fault == "far_ts":
        item["ts"] = draw(far_ts)
    else:
        item["values"][FEATURES[0]] = 0.5
        return encode(item).replace(b'"pressure": 0.5', b'"pressure": ' + draw(non_finite))
    return encode(item)


@st.composite
def malformed(draw: st.DrawFn, dev: str, t: int) -> Msg:
    """A message that must be dead-lettered entirely; ``dev`` is usually a device of the valid fleet."""
    key: bytes | None = dev.encode()
    kind = draw(
        st.sampled_from(
            [
                "bytes", "not_object", "drop", "device_id_type", "ts_type", "ts_text", "ts_range", "values_type",
                "sensor_type", "non_finite", "huge", "sensors", "extra_field", "bad_device_id", "key_mismatch",
                "envelope_broken", "envelope_mixed", "envelope_empty", "envelope_type", "oversized", "truncated",
            ]
        )
    )  # fmt: skip
    msg = reading(dev, t)
    if kind == "bytes":
        raw = draw(st.binary(max_size=120).filter(lambda b: not _is_json_object(b)))
        return Msg(draw(st.none() | st.binary(max_size=8)), raw, False, kind)
    if kind == "not_object":
        return Msg(key, encode(draw(json_value.filter(lambda v: not isinstance(v, dict)))), False, kind)
    if kind == "truncated":
        full = encode(msg)
        return Msg(key, full[: draw(st.integers(0, len(full) - 1))], False, kind)
    if kind == "oversized":
        return Msg(b"dev-0", OVERSIZED, False, kind)
    if kind == "drop":
        del msg[draw(st.sampled_from(["device_id", "ts", "values"]))]
    elif kind == "device_id_type":
        msg["device_id"] = draw(not_str)
    elif kind == "ts_type":
        msg["ts"] = draw(not_int.filter(lambda v: v is not None))
    elif kind == "ts_text":
        msg["ts"] = "not-a-time:" + draw(st.text(max_size=10))
    elif kind == "ts_range":
        msg["ts"] = draw(far_ts)
    elif kind == "values_type":
        msg["values"] = draw(not_number.filter(lambda v: v is not None))
    elif kind == "sensor_type":
        msg["values"][draw(st.sampled_from(FEATURES))] = draw(not_number)
    elif kind == "non_finite":
        msg["values"][FEATURES[1]] = 0.25
        raw = encode(msg).replace(b'"temp": 0.25', b'"temp": ' + draw(non_finite))
        return Msg(key, raw, False, kind)
    elif kind == "huge":
        msg["values"][draw(st.sampled_from(FEATURES))] = draw(huge)
    elif kind == "sensors":
        fault = draw(st.sampled_from(["missing", "extra", "renamed"]))
        if fault != "extra":
            value = msg["values"].pop(draw(st.sampled_from(FEATURES)))
        if fault != "missing":
            msg["values"]["humidity"] = value if fault == "renamed" else 1.0
    elif kind == "extra_field":
        msg[draw(st.sampled_from(["unit", "readings_", "Device_id", "meta"]))] = draw(json_value)
    elif kind == "bad_device_id":
        msg["device_id"] = draw(bad_device_id)
        key = msg["device_id"].encode()
    elif kind == "key_mismatch":
        key = draw(st.binary(max_size=12).filter(lambda k: k != dev.encode()))
    elif kind.startswith("envelope"):
        n = draw(st.integers(1, 3))
        if kind == "envelope_broken":  # every reading in it broken: one dead letter each
            items = [draw(broken_item(dev, t + i)) for i in range(n)]
            raw = b'{"device_id": ' + encode(dev) + b', "readings": [' + b", ".join(items) + b"]}"
            return Msg(key, raw, False, kind)
        items_obj = [{"ts": ts_of(t + i), "values": values_of(dev, t + i)} for i in range(n)]
        if kind == "envelope_mixed":
            msg = {**msg, "readings": items_obj}
        elif kind == "envelope_empty":
            msg = {"device_id": dev, "readings": []}
        else:
            msg = {"device_id": dev, "readings": draw(not_number.filter(lambda v: v is not None))}
    return Msg(key, encode(msg), False, kind)


# -- the stream --------------------------------------------------------------------------------------
@st.composite
def streams(draw: st.DrawFn) -> tuple[list[Msg], list[int]]:
    n_devices = draw(st.integers(1, 4))
    steps = draw(st.integers(1, MAX_STEPS))
    devices = [f"dev-{i}" for i in range(n_devices)]
    # Per device: its steps in order, cut into single readings and envelopes.
    plans: dict[str, list[list[int]]] = {}
    for dev in devices:
        groups: list[list[int]] = []
        t = 0
        while t < steps:
            k = draw(st.integers(1, min(3, steps - t)))
            groups.append(list(range(t, t + k)))
            t += k
        plans[dev] = groups
    out: list[Msg] = []
    sent: dict[str, int] = {}  # newest step sent per device
    pending = {d: list(g) for d, g in plans.items()}
    while any(pending.values()):
        dev = draw(st.sampled_from([d for d in devices if pending[d]]))
        group = pending[dev].pop(0)
        if len(group) == 1:
            value = encode(reading(dev, group[0]))
        else:
            items = [{"ts": ts_of(t), "values": values_of(dev, t)} for t in group]
            value = encode({"device_id": dev, "readings": items})
        out.append(Msg(dev.encode(), value, True, "valid"))
        sent[dev] = group[-1]
        for _ in range(draw(st.integers(0, 3))):
            target = draw(st.sampled_from(devices))
            what = draw(st.sampled_from(["late", "late", "clock_skew", *["malformed"] * 7]))
            if what == "late" and target in sent:  # a duplicate or an out-of-order reading of a closed step
                t = draw(st.integers(0, sent[target]))
                values = values_of(target, t) if draw(st.booleans()) else values_of(target, t + 100)
                out.append(Msg(target.encode(), encode(reading(target, t, values)), False, "late"))
            elif what == "clock_skew":  # far in the future, otherwise a valid reading
                ahead = draw(st.integers(SKEW + 1, 10 * 365 * 86_400_000))
                future = {"device_id": target, "ts": NOW + ahead, "values": values_of(target, 0)}
                out.append(Msg(target.encode(), encode(future), False, "clock_skew"))
            else:
                out.append(draw(malformed(target, draw(st.integers(0, steps - 1)))))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(out) - 1)), max_size=6))))
    return out, cuts


def to_inbound(msgs: list[Msg]) -> list[Inbound]:
    offsets = Counter[int]()
    out = []
    for m in msgs:
        p = zlib.crc32(m.key) % PARTITIONS if m.key else 0
        out.append(Inbound(m.key, m.value, TOPIC, p, offsets[p]))
        offsets[p] += 1
    return out


def run(proc: Processor, inbound: list[Inbound], cuts: list[int]) -> tuple[list[ScoreRecord], list[Any]]:
    scores: list[ScoreRecord] = []
    dead: list[Any] = []
    bounds = [0, *cuts, len(inbound)]
    for a, b in itertools.pairwise(bounds):
        res = proc.process(inbound[a:b], NOW)
        scores.extend(res.scores)
        dead.extend(res.dead)
    return scores, dead


def n_readings(m: Msg) -> int:
    obj = json.loads(m.value)
    return len(obj["readings"]) if "readings" in obj else 1


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(stream=streams())
def test_process_survives_any_mix_and_scores_exactly_the_valid_readings(artifact: Artifact, stream) -> None:
    msgs, cuts = stream
    inbound = to_inbound(msgs)
    scores, dead = run(make_processor(artifact), inbound, cuts)

    # Every malformed message is dead-lettered with a known reason; no valid one is.
    where = {(i.partition, i.offset): m for i, m in zip(inbound, msgs, strict=True)}
    dead_at = Counter((d.partition, d.offset) for d in dead)
    for (p, off), m in where.items():
        if m.valid:
            assert dead_at[(p, off)] == 0, (m.kind, m.value[:200])
        else:
            assert dead_at[(p, off)] >= 1, (m.kind, m.value[:200])
    for d in dead:
        m = where[(d.partition, d.offset)]
        assert d.reason in REASONS and d.detail, d
        assert d.value == m.value and d.key == m.key  # the original bytes
        if m.kind in ("late", "clock_skew"):
            assert d.reason == (Reason.LATE if m.kind == "late" else Reason.TIMESTAMP_OUT_OF_RANGE)
        if m.kind == "oversized":
            assert d.reason == Reason.OVERSIZED

    # Exactly one score per valid reading, identical to a run without the malformed messages.
    valid = [m for m in msgs if m.valid]
    got = Counter((r.device_id, r.ts_ms) for r in scores)
    assert sum(got.values()) == sum(n_readings(m) for m in valid) and max(got.values()) == 1
    clean, clean_dead = run(make_processor(artifact), to_inbound(valid), [])
    assert not clean_dead
    ref = {(r.device_id, r.ts_ms): r for r in clean}
    assert set(ref) == set(got)
    for r in scores:
        c = ref[(r.device_id, r.ts_ms)]
        assert r.status == c.status and r.n_readings == c.n_readings == 1
        assert (r.score is None) == (c.score is None)
        if r.score is not None and c.score is not None:
            assert math.isclose(r.score, c.score, rel_tol=1e-4, abs_tol=1e-4)
