"""Score and dead-letter encodings: InfluxDB line protocol, scores JSON, DLQ headers."""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest
import torch
from influxdb_client import Point, WritePrecision

from connectors.influx import format_line
from models.artifact import Artifact, Normaliser
from models.detector import Detector
from models.forecaster import Forecaster, ForecasterConfig
from models.scoring import ScoringConfig, StaticThreshold, Status
from pipeline.processor import Inbound, Processor
from pipeline.records import DeadLetter, ScoreRecord, score_json, score_line
from pipeline.schema import Limits, Reason, encode_reading
from pipeline.windowing import WindowConfig

SENSORS = ("pressure", "temp", "vibration")
TS = 1_795_341_600_000
MEASUREMENT = "anomaly_scores"


# -- a small, strict line-protocol parser ----------------------------------------------------------


def _split(text: str, sep: str, *, quotes: bool = False) -> list[str]:
    """Split on ``sep`` the way InfluxDB's scanner does: a separator right after a backslash is escaped;
    with ``quotes``, nothing inside a double-quoted string value splits (there ``\\x`` pairs are escapes)."""
    parts, start, i, inq = [], 0, 0, False
    while i < len(text):
        c = text[i]
        escaped = i > 0 and text[i - 1] == "\\"
        if inq:
            if c == "\\":
                i += 2
                continue
            if c == '"':
                inq = False
        elif quotes and c == '"' and not escaped:
            inq = True
        elif c == sep and not escaped:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    assert not inq, f"unterminated string in {text!r}"
    parts.append(text[start:])
    return parts


def _unescape(text: str) -> str:
    """Measurement, tag and field-key unescaping (backslashes not before a special character are literal)."""
    for ch in ', ="':
        text = text.replace("\\" + ch, ch)
    return text


def _unescape_string(text: str) -> str:
    out, i = "", 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in '"\\':
            out += text[i + 1]
            i += 2
        else:
            out += text[i]
            i += 1
    return out


def _field_value(text: str) -> float | int | bool | str:
    if text.startswith('"'):
        assert text.endswith('"') and len(text) >= 2, text
        return _unescape_string(text[1:-1])
    if text in ("true", "false", "t", "f", "True", "False", "T", "F"):
        return text.lower().startswith("t")
    if text.endswith("i"):
        return int(text[:-1])
    value = float(text)
    assert math.isfinite(value)
    return value


def parse_line(line: str) -> tuple[str, dict[str, str], dict[str, object], int]:
    """``measurement, tags, fields, timestamp`` of one line of InfluxDB line protocol."""
    assert "\n" not in line
    # the three sections are separated by unescaped spaces; only the field set has quoted strings
    head_rest = _split(line, " ")
    head = head_rest[0]
    rest = " ".join(head_rest[1:])
    fields_ts = _split(rest, " ", quotes=True)
    assert len(fields_ts) == 2, f"expected 'fields timestamp' in {rest!r}"
    field_text, ts_text = fields_ts
    name, *tag_parts = _split(head, ",")
    tags = {}
    for part in tag_parts:
        k, v = _split(part, "=")
        tags[_unescape(k)] = _unescape(v)
    fields: dict[str, object] = {}
    for part in _split(field_text, ",", quotes=True):
        k, *v = _split(part, "=", quotes=True)
        assert len(v) == 1, part
        key = _unescape(k)
        assert key not in fields
        fields[key] = _field_value(v[0])
    assert ts_text.isdigit() or (ts_text.startswith("-") and ts_text[1:].isdigit())
    return _unescape(name), tags, fields, int(ts_text)


def record(**overrides) -> ScoreRecord:
    base = {
        "device_id": "pump-17",
        "ts_ms": TS,
        "status": Status.OK,
        "score": 7.25,
        "threshold": 6.0,
        "is_anomaly": True,
        "top_sensor": "temp",
        "values": (1.5, 41.0, -0.125),
        "forecast": (1.25, 39.5, 0.1),
        "model_version": "t1",
        "n_readings": 3,
    }
    base.update(overrides)
    return ScoreRecord(**base)


# -- line protocol -------------------------------------------------------------------------------


def test_score_line_has_the_documented_tags_fields_and_time():
    name, tags, fields, ts = parse_line(score_line(record(), SENSORS, MEASUREMENT))
    assert name == MEASUREMENT
    assert tags == {"device": "pump-17", "model_version": "t1"}
    assert fields == {
        "score": 7.25,
        "threshold": 6.0,
        "is_anomaly": True,
        "status": "ok",
        "top_sensor": "temp",
        "n_readings": 3,
        "value_pressure": 1.5,
        "value_temp": 41.0,
        "value_vibration": -0.125,
        "forecast_pressure": 1.25,
        "forecast_temp": 39.5,
        "forecast_vibration": 0.1,
    }
    assert ts == TS  # milliseconds, the step end


def test_score_line_field_types_are_stable():
    line = score_line(record(threshold=6.0, values=(3.0, 0.0, -2.0)), SENSORS, MEASUREMENT)
    fields = parse_line(line)[2]
    # integral floats must stay floats (no "i" suffix), or InfluxDB would reject a type conflict later
    for k in ("threshold", "value_pressure", "value_temp", "value_vibration", "score"):
        assert type(fields[k]) is float, (k, line)
    assert type(fields["n_readings"]) is int
    assert type(fields["is_anomaly"]) is bool
    assert "n_readings=3i" in line


def test_warm_up_row_omits_score_top_sensor_and_forecast():
    r = record(status=Status.WARMING_UP, score=None, top_sensor=None, forecast=None, is_anomaly=False, n_readings=1)
    name, tags, fields, ts = parse_line(score_line(r, SENSORS, MEASUREMENT))
    assert name == MEASUREMENT
    assert tags == {"device": "pump-17", "model_version": "t1"}
    assert fields == {
        "threshold": 6.0,
        "is_anomaly": False,
        "status": "warming_up",
        "n_readings": 1,
        "value_pressure": 1.5,
        "value_temp": 41.0,
        "value_vibration": -0.125,
    }
    assert ts == TS


def test_score_line_escapes_awkward_device_ids_and_measurements():
    dev = 'pump 17,hall=B "north" \\ x'
    line = score_line(record(device_id=dev, model_version="v 2,x=y"), SENSORS, "anomaly scores,x")
    name, tags, fields, _ = parse_line(line)
    assert name == "anomaly scores,x"
    assert tags == {"device": dev, "model_version": "v 2,x=y"}
    assert fields["status"] == "ok"


def test_score_line_matches_influxdb_client_point():
    r = record()
    point = Point(MEASUREMENT).tag("device", r.device_id).tag("model_version", r.model_version)
    for k, v in {
        "score": r.score,
        "threshold": r.threshold,
        "is_anomaly": r.is_anomaly,
        "status": r.status.value,
        "top_sensor": r.top_sensor,
        "n_readings": r.n_readings,
        **{f"value_{s}": r.values[i] for i, s in enumerate(SENSORS)},
        **{f"forecast_{s}": r.forecast[i] for i, s in enumerate(SENSORS)},  # type: ignore[index]
    }.items():
        point.field(k, v)
    point.time(TS, WritePrecision.MS)
    assert parse_line(score_line(r, SENSORS, MEASUREMENT)) == parse_line(point.to_line_protocol())


def test_full_precision_floats_round_trip():
    vals = (0.1 + 0.2, 1e-300, -123456.789012345678)
    fields = parse_line(score_line(record(values=vals, score=math.pi), SENSORS, MEASUREMENT))[2]
    assert (fields["value_pressure"], fields["value_temp"], fields["value_vibration"]) == vals
    assert fields["score"] == math.pi


def reference_line(r: ScoreRecord, sensors, measurement: str) -> str:
    """The documented line, field by field through the generic formatter."""
    fields = {
        "score": r.score,
        "threshold": r.threshold,
        "is_anomaly": r.is_anomaly,
        "status": r.status.value,
        "top_sensor": r.top_sensor,
        "n_readings": r.n_readings,
    }
    for i, s in enumerate(sensors):
        fields[f"value_{s}"] = r.values[i]
        if r.forecast is not None:
            fields[f"forecast_{s}"] = r.forecast[i]
    return format_line(measurement, {"device": r.device_id, "model_version": r.model_version}, fields, r.ts_ms)


AWKWARD = [0.0, -0.0, 1.0, 1e-5, 1e-4, 123456.0, 1e16, 1e20, 10.00001, math.nan, math.inf, 5e-324, 0.1 + 0.2]


@pytest.mark.parametrize(
    ("sensors", "measurement"),
    [(SENSORS, MEASUREMENT), (("a b", "x,=y", "p%s{0}", "é"), "m %s,{}"), (("only",), "m")],
)
def test_score_line_equals_the_field_by_field_line(sensors, measurement):
    rng = np.random.default_rng(3)
    n = len(sensors)

    def num() -> float:
        return float(rng.choice(AWKWARD)) if rng.random() < 0.1 else float(rng.normal() * 10.0 ** rng.integers(-3, 6))

    for i in range(3000):
        scored = rng.random() < 0.7
        r = record(
            device_id=["pump-17", "a b,c=d", "tail\\", "", "%s{}"][i % 5],
            model_version=["t1", "", "v 2"][i % 3],
            status=Status.OK if scored else Status.WARMING_UP,
            score=num() if scored else None,
            threshold=num(),
            is_anomaly=bool(rng.random() < 0.2),
            top_sensor=sensors[i % n] if scored else None,
            values=tuple(num() for _ in range(n)),
            forecast=tuple(num() for _ in range(n)) if scored else None,
            n_readings=int(rng.integers(0, 5)),
        )
        assert score_line(r, sensors, measurement) == reference_line(r, sensors, measurement), r


@pytest.mark.parametrize(
    "overrides",
    [
        {"is_anomaly": np.bool_(True)},
        {"n_readings": np.int64(2)},
        {"values": (1, 2, 3)},
        {"score": np.float64(1.5)},
        {"forecast": None},
        {"score": None},
        {"top_sensor": None, "score": None, "forecast": None, "threshold": math.inf},
        {"ts_ms": np.int64(TS)},
    ],
)
def test_score_line_for_unusual_records_is_the_field_by_field_line(overrides):
    r = record(**overrides)
    assert score_line(r, SENSORS, MEASUREMENT) == reference_line(r, SENSORS, MEASUREMENT)


@pytest.fixture(scope="module")
def processor_scores() -> list[ScoreRecord]:
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(n_features=3, hidden=8, layers=2)).eval()
    art = Artifact(model, SENSORS, Normaliser(np.zeros(3), np.ones(3)), version="t1")
    det = Detector(art, ScoringConfig(warmup_steps=3, burnin_steps=0), StaticThreshold(6.0), capacity=4)
    proc = Processor(det, WindowConfig(), Limits(SENSORS, 946_684_800_000, 300_000))
    rng = np.random.default_rng(0)
    scores = []
    for t in range(8):
        vals = dict(zip(SENSORS, rng.normal(size=3).tolist(), strict=True))
        if t == 6:
            vals["vibration"] = 500.0
        raw = encode_reading("pump-17", TS + 1000 * t, vals)
        scores += proc.process([Inbound(b"pump-17", raw, "iotad.readings", 0, t)], TS + 1000 * t).scores
    assert len(scores) == 8
    return scores


def test_processor_records_encode_to_valid_lines(processor_scores):
    for i, r in enumerate(processor_scores):
        _, tags, fields, ts = parse_line(score_line(r, SENSORS, MEASUREMENT))
        assert ts == TS + 1000 * i
        assert tags == {"device": "pump-17", "model_version": "t1"}
        assert type(fields["threshold"]) is float and type(fields["n_readings"]) is int
        assert all(type(fields[f"value_{s}"]) is float for s in SENSORS)
        if i == 0:
            assert "score" not in fields and "forecast_temp" not in fields and "top_sensor" not in fields
        else:
            assert type(fields["score"]) is float
            assert all(type(fields[f"forecast_{s}"]) is float for s in SENSORS)
            assert fields["top_sensor"] in SENSORS
        assert fields["status"] == ("warming_up" if i <= 3 else "ok")
    last = parse_line(score_line(processor_scores[6], SENSORS, MEASUREMENT))[2]
    assert last["is_anomaly"] is True and last["top_sensor"] == "vibration"


# -- scores JSON ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "r",
    [record(), record(status=Status.WARMING_UP, score=None, top_sensor=None, forecast=None, is_anomaly=False)],
    ids=["scored", "warming-up"],
)
def test_score_json_round_trips(r):
    doc = msgspec.json.decode(score_json(r, SENSORS, emitted_at_ms=TS + 42))
    assert doc == {
        "device_id": r.device_id,
        "ts": r.ts_ms,
        "status": r.status.value,
        "score": r.score,
        "threshold": r.threshold,
        "is_anomaly": r.is_anomaly,
        "top_sensor": r.top_sensor,
        "values": dict(zip(SENSORS, r.values, strict=True)),
        "forecast": None if r.forecast is None else dict(zip(SENSORS, r.forecast, strict=True)),
        "model_version": r.model_version,
        "n_readings": r.n_readings,
        "emitted_at": TS + 42,
    }
    back = ScoreRecord(
        device_id=doc["device_id"],
        ts_ms=doc["ts"],
        status=Status(doc["status"]),
        score=doc["score"],
        threshold=doc["threshold"],
        is_anomaly=doc["is_anomaly"],
        top_sensor=doc["top_sensor"],
        values=tuple(doc["values"][s] for s in SENSORS),
        forecast=None if doc["forecast"] is None else tuple(doc["forecast"][s] for s in SENSORS),
        model_version=doc["model_version"],
        n_readings=doc["n_readings"],
    )
    assert back == r


def test_score_json_is_plain_json(processor_scores):
    import json

    for r in processor_scores:
        doc = json.loads(score_json(r, SENSORS, 1))  # the standard library can read it: no NaN literals
        assert doc["device_id"] == "pump-17" and set(doc["values"]) == set(SENSORS)


# -- dead letters --------------------------------------------------------------------------------


def test_dead_letter_headers():
    dl = DeadLetter(b"pump-17", b"{bad", Reason.BAD_JSON, "JSON is malformed", "iotad.readings", 3, 12345)
    assert dl.headers() == [
        ("iotad-reason", b"bad_json"),
        ("iotad-detail", b"JSON is malformed"),
        ("iotad-topic", b"iotad.readings"),
        ("iotad-partition", b"3"),
        ("iotad-offset", b"12345"),
    ]


def test_dead_letter_headers_for_one_reading_of_an_envelope():
    dl = DeadLetter(None, b"{}", Reason.LATE, "ts 1 falls in a closed bucket", "t", 0, 0, index=0)
    h = dict(dl.headers())
    assert h["iotad-index"] == b"0"
    assert h["iotad-reason"] == b"late"
    assert (h["iotad-partition"], h["iotad-offset"]) == (b"0", b"0")
    assert [k for k, _ in dl.headers()] == [
        "iotad-reason",
        "iotad-detail",
        "iotad-topic",
        "iotad-partition",
        "iotad-offset",
        "iotad-index",
    ]
    assert all(isinstance(v, bytes) for _, v in dl.headers())


def test_dead_letter_detail_is_utf8_even_with_unencodable_text():
    dl = DeadLetter(None, b"x", "bad_device_id", "device_id 'caf\u00e9\ud800'", "t", 1, 2)
    detail = dict(dl.headers())["iotad-detail"]
    assert detail.decode("utf-8") == "device_id 'caf\u00e9?'"
