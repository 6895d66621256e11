"""Wire-schema validation: every malformed kind gets its reason, valid readings parse, nothing raises."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.schema import (
    MAX_ABS_VALUE,
    MAX_DEVICE_ID_LEN,
    MAX_MESSAGE_BYTES,
    MAX_READINGS_PER_ENVELOPE,
    Limits,
    Reading,
    Reason,
    Rejection,
    _validate_exact,
    encode_envelope,
    encode_reading,
    parse_ts,
    validate,
)

SENSORS = ("pressure", "temp", "vibration")
NOW_MS = 1_795_341_600_000  # 2026-11-22T10:00:00Z
MIN_TS_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
SKEW_MS = 300_000
LIMITS = Limits(sensors=SENSORS, min_ts_ms=MIN_TS_MS, max_future_skew_ms=SKEW_MS)
GOOD = {"pressure": 1.5, "temp": 41.0, "vibration": -0.25}
GOOD_VEC = (1.5, 41.0, -0.25)


def run(raw: bytes, key: bytes | None = b"pump-17") -> list[Reading | Rejection]:
    out = validate(raw, key, LIMITS, NOW_MS)
    assert isinstance(out, list)
    return out


def one(raw: bytes, key: bytes | None = b"pump-17") -> Reading | Rejection:
    out = run(raw, key)
    assert len(out) == 1, out
    return out[0]


def reason_of(raw: bytes, key: bytes | None = b"pump-17") -> Reason:
    item = one(raw, key)
    assert isinstance(item, Rejection), item
    assert item.index == -1
    assert isinstance(item.detail, str) and item.detail
    return item.reason


_DROP = object()  # msg(field=_DROP) leaves the field out


def msg(**fields: Any) -> bytes:
    body: dict[str, Any] = {"device_id": "pump-17", "ts": NOW_MS, "values": dict(GOOD)}
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not _DROP}).encode()


# -- valid readings ----------------------------------------------------------------------------------


def test_valid_epoch_ms_reading():
    item = one(encode_reading("pump-17", NOW_MS - 1234, GOOD))
    assert item == Reading("pump-17", NOW_MS - 1234, GOOD_VEC, -1)


def test_values_are_returned_in_model_sensor_order_whatever_the_json_order():
    shuffled = {"vibration": -0.25, "pressure": 1.5, "temp": 41.0}
    item = one(encode_reading("pump-17", NOW_MS, shuffled))
    assert isinstance(item, Reading)
    assert item.values == GOOD_VEC


def test_integer_values_are_accepted_as_floats():
    item = one(msg(values={"pressure": 1, "temp": 41, "vibration": 0}))
    assert isinstance(item, Reading)
    assert item.values == (1.0, 41.0, 0.0)
    assert all(type(v) is float for v in item.values)


def test_key_none_skips_the_key_check():
    assert isinstance(one(encode_reading("pump-17", NOW_MS, GOOD), key=None), Reading)


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2026-11-22T10:00:00.123Z", NOW_MS + 123),
        ("2026-11-22T10:00:00Z", NOW_MS),
        ("2026-11-22T11:00:00.123+01:00", NOW_MS + 123),
        ("2026-11-22T05:30:00-04:30", NOW_MS),
        ("2026-11-22T10:00:00.123", NOW_MS + 123),  # naive means UTC
        ("2026-11-22T09:59:59.999000+00:00", NOW_MS - 1),
        ("2026-11-22T10:05:00Z", NOW_MS + SKEW_MS),  # exactly at the future bound: accepted
        ("2000-01-01T00:00:00Z", MIN_TS_MS),  # exactly at the lower bound: accepted
    ],
)
def test_valid_iso_timestamps(ts, expected):
    item = one(msg(ts=ts))
    assert isinstance(item, Reading), item
    assert item.ts_ms == expected


@pytest.fixture
def non_utc_local_zone(monkeypatch):
    """Make the process's local zone differ from UTC, so that 'naive means UTC' is really tested."""
    if not hasattr(time, "tzset"):
        pytest.skip("time.tzset is not available")
    monkeypatch.setenv("TZ", "EST+05EDT,M3.2.0,M11.1.0")
    time.tzset()
    assert time.timezone != 0
    yield
    monkeypatch.undo()
    time.tzset()


def test_naive_iso_means_utc_whatever_the_local_zone(non_utc_local_zone):
    assert parse_ts("2026-11-22T10:00:00.123") == NOW_MS + 123
    item = one(msg(ts="2026-11-22T10:00:00"))
    assert isinstance(item, Reading) and item.ts_ms == NOW_MS


def test_parse_ts_agrees_with_datetime():
    dt = datetime(2026, 11, 22, 10, 0, 0, 123000, tzinfo=UTC)
    assert parse_ts(dt.isoformat()) == NOW_MS + 123
    assert parse_ts(NOW_MS) == NOW_MS
    with pytest.raises(ValueError):
        parse_ts("not a time")


def test_valid_envelope_epoch_ms_and_iso_mixed():
    raw = msgspec.json.encode(
        {
            "device_id": "pump-17",
            "readings": [
                {"ts": NOW_MS - 2000, "values": GOOD},
                {"ts": "2026-11-22T09:59:59Z", "values": GOOD},
                {"ts": "2026-11-22T10:00:00", "values": {"temp": 1, "vibration": 2, "pressure": 3}},
            ],
        }
    )
    out = run(raw)
    assert out == [
        Reading("pump-17", NOW_MS - 2000, GOOD_VEC, 0),
        Reading("pump-17", NOW_MS - 1000, GOOD_VEC, 1),
        Reading("pump-17", NOW_MS, (3.0, 1.0, 2.0), 2),
    ]


def test_encode_envelope_round_trip():
    readings = [(NOW_MS - 1000 * i, {"pressure": float(i), "temp": 2.0 * i, "vibration": -1.0}) for i in range(5)]
    out = run(encode_envelope("pump-17", readings))
    assert [r.index for r in out] == list(range(5))
    assert all(isinstance(r, Reading) for r in out)
    assert [(r.ts_ms, r.values) for r in out if isinstance(r, Reading)] == [
        (ts, (v["pressure"], v["temp"], v["vibration"])) for ts, v in readings
    ]


def test_empty_envelope_is_dead_lettered():
    (out,) = run(encode_envelope("pump-17", []))
    assert isinstance(out, Rejection) and out.reason == Reason.BAD_SCHEMA


def test_boundary_values_accepted():
    vals = {"pressure": MAX_ABS_VALUE, "temp": -MAX_ABS_VALUE, "vibration": 0.0}
    item = one(encode_reading("pump-17", NOW_MS, vals))
    assert isinstance(item, Reading)


def test_device_id_boundaries_accepted():
    dev = "d" * MAX_DEVICE_ID_LEN
    assert isinstance(one(encode_reading(dev, NOW_MS, GOOD), key=dev.encode()), Reading)
    dev = "pompe-é°-17 β"  # non-ASCII but printable
    assert isinstance(one(encode_reading(dev, NOW_MS, GOOD), key=dev.encode()), Reading)


# -- malformed messages: reason per kind ----------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b'{"device_id": "pump-17", "ts": 1795341600000, "values": {"pressure": 1.5',  # truncated
        encode_reading("pump-17", NOW_MS, GOOD)[:-1],  # truncated by one byte
        b"not json at all",
        b"\xff\xfe\x00garbage",
        encode_reading("pump-17", NOW_MS, GOOD) + b" trailing",
        b'{"device_id": "pump-17", "ts": 1795341600000, "values": {"pressure": NaN, "temp": 1, "vibration": 1}}',
        b'{"device_id": "pump-17", "ts": 1795341600000, "values": {"pressure": Infinity, "temp": 1, "vibration": 1}}',
        b'{"device_id": "pump-17", "ts": 1795341600000, "values": {"pressure": -Infinity, "temp": 1, "vibration": 1}}',
        b"{'device_id': 'pump-17'}",
    ],
    ids=[
        "empty",
        "open-brace",
        "truncated",
        "truncated-1",
        "text",
        "binary",
        "trailing",
        "nan",
        "infinity",
        "-infinity",
        "single-quotes",
    ],
)
def test_bad_json(raw):
    assert reason_of(raw) == Reason.BAD_JSON


@pytest.mark.parametrize(
    "raw",
    [
        b"null",
        b"[1, 2, 3]",
        b'"pump-17"',
        b"42",
        msg(device_id=_DROP),
        msg(device_id=17),
        msg(device_id=None),
        msg(ts=_DROP),
        msg(values=_DROP),
        msg(ts=None),
        msg(ts=_DROP, values=_DROP),
        msg(ts=1795341600000.5),
        msg(ts=True),
        msg(ts=[NOW_MS]),
        msg(values=[1.5, 41.0, -0.25]),
        msg(values="1.5"),
        msg(values={"pressure": "1.5", "temp": 41.0, "vibration": -0.25}),
        msg(values={"pressure": True, "temp": 41.0, "vibration": -0.25}),
        msg(values={"pressure": None, "temp": 41.0, "vibration": -0.25}),
        msg(values={"pressure": [1.5], "temp": 41.0, "vibration": -0.25}),
        msg(extra="field"),
        msg(readings=[{"ts": NOW_MS, "values": GOOD}]),  # envelope + ts/values conflict
        msg(values=_DROP, readings=[{"ts": NOW_MS, "values": GOOD}]),  # envelope + ts conflict
        msg(ts=_DROP, readings=[{"ts": NOW_MS, "values": GOOD}]),  # envelope + values conflict
        msg(ts=_DROP, values=_DROP, readings={"ts": NOW_MS}),
    ],
)
def test_bad_schema(raw):
    assert reason_of(raw) == Reason.BAD_SCHEMA


@pytest.mark.parametrize(
    ("items", "bad_index"),
    [
        ([{"ts": NOW_MS}], 0),  # item missing values
        ([{"values": GOOD}], 0),  # item missing ts
        ([{"ts": NOW_MS, "values": GOOD, "extra": 1}], 0),
        ([{"ts": NOW_MS, "values": GOOD}, {"ts": 1.5, "values": GOOD}], 1),
    ],
)
def test_bad_item_in_envelope_rejects_only_that_item(items, bad_index):
    out = run(msg(ts=_DROP, values=_DROP, readings=items))
    assert len(out) == len(items)
    bad = out[bad_index]
    assert isinstance(bad, Rejection) and bad.reason == Reason.BAD_SCHEMA and bad.index == bad_index
    assert all(isinstance(x, Reading) for i, x in enumerate(out) if i != bad_index)


def test_envelope_and_ts_conflict_has_a_clear_detail():
    item = one(msg(values=_DROP, readings=[{"ts": NOW_MS, "values": GOOD}]))
    assert isinstance(item, Rejection)
    assert item.reason == Reason.BAD_SCHEMA
    assert "envelope" in item.detail


@pytest.mark.parametrize(
    "values",
    [
        {"pressure": 1e13, "temp": 1.0, "vibration": 1.0},
        {"pressure": 1.0, "temp": -1e13, "vibration": 1.0},
        {"pressure": 1.0, "temp": 1.0, "vibration": MAX_ABS_VALUE * 1.000001},
        {"pressure": 1.0, "temp": 1.0, "vibration": 1e300},
        {"pressure": 10**20, "temp": 1.0, "vibration": 1.0},  # a huge integer literal
    ],
)
def test_huge_values_are_out_of_range(values):
    assert reason_of(msg(values=values)) == Reason.VALUE_OUT_OF_RANGE


def test_overflowing_literal_is_rejected():
    # 1e999 is not representable as a double: whatever the reason, it must never become a Reading.
    raw = b'{"device_id": "pump-17", "ts": 1795341600000, "values": {"pressure": 1e999, "temp": 1, "vibration": 1}}'
    assert isinstance(one(raw), Rejection)
    raw = b'{"device_id": "pump-17", "ts": 1795341600000, "values": {"pressure": -1e999, "temp": 1, "vibration": 1}}'
    assert isinstance(one(raw), Rejection)


@pytest.mark.parametrize("literal", [b"1e999", b"-1e999", b"1" + b"0" * 400])
def test_overflowing_literal_gets_a_value_reason(literal):
    raw = b'{"device_id": "pump-17", "ts": 1795341600000, "values": {"pressure": %s, "temp": 1, "vibration": 1}}'
    assert reason_of(raw % literal) in (Reason.NON_FINITE, Reason.VALUE_OUT_OF_RANGE)


def test_overflowing_literal_in_envelope_rejects_only_that_reading():
    good = json.dumps({"ts": NOW_MS, "values": GOOD}).encode()
    bad = b'{"ts": 1795341600000, "values": {"pressure": 1e999, "temp": 1, "vibration": 1}}'
    raw = b'{"device_id": "pump-17", "readings": [' + good + b"," + bad + b"," + good + b"]}"
    out = run(raw)
    assert [type(x) for x in out] == [Reading, Rejection, Reading]
    assert out[1].index == 1
    assert out[1].reason in (Reason.NON_FINITE, Reason.VALUE_OUT_OF_RANGE)


@pytest.mark.parametrize(
    "values",
    [
        {"pressure": 1.5, "temp": 41.0},  # missing one
        {},  # missing all
        {"pressure": 1.5, "temp": 41.0, "vibration": 0.0, "humidity": 3.0},  # one extra
        {"pressure": 1.5, "temp": 41.0, "vibraton": 0.0},  # misspelt
        {"Pressure": 1.5, "temp": 41.0, "vibration": 0.0},  # case matters
    ],
)
def test_unknown_or_missing_sensors(values):
    item = one(msg(values=values))
    assert isinstance(item, Rejection)
    assert item.reason == Reason.UNKNOWN_SENSORS


def test_unknown_sensors_detail_names_them():
    item = one(msg(values={"pressure": 1.5, "temp": 41.0, "humidity": 3.0}))
    assert isinstance(item, Rejection)
    assert "vibration" in item.detail and "humidity" in item.detail


@pytest.mark.parametrize(
    "ts",
    [
        "not-a-time",
        "",
        "2026-13-01T00:00:00Z",
        "2026-11-31T00:00:00Z",
        "2026-11-22T25:00:00Z",
        "2026-11-22T10:00:00+25:00",
        "1795341600000",  # epoch ms as a string is not ISO-8601
        "22/11/2026 10:00",
        "\x00",
    ],
)
def test_unparsable_timestamp(ts):
    assert reason_of(msg(ts=ts)) == Reason.BAD_TIMESTAMP


@pytest.mark.parametrize(
    "ts",
    [
        NOW_MS // 1000,  # epoch SECONDS: 1970
        (NOW_MS // 1000) * 1_000_000,  # epoch microseconds: far future
        0,
        -1,
        MIN_TS_MS - 1,
        NOW_MS + SKEW_MS + 1,
        NOW_MS + 86_400_000,
        10**30,  # bigger than int64
        "1970-01-01T00:00:00Z",
        "1999-12-31T23:59:59.999Z",
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00",
        "2026-11-22T10:05:00.001Z",  # 1 ms beyond max_future_skew
    ],
)
def test_timestamp_out_of_range(ts):
    assert reason_of(msg(ts=ts)) == Reason.TIMESTAMP_OUT_OF_RANGE


def test_future_skew_is_relative_to_the_callers_now():
    raw = msg(ts=NOW_MS + SKEW_MS + 10)
    assert isinstance(one(raw), Rejection)
    assert isinstance(validate(raw, None, LIMITS, NOW_MS + 10)[0], Reading)


@pytest.mark.parametrize(
    ("key", "device_id"),
    [
        (b"pump-18", "pump-17"),
        (b"", "pump-17"),
        (b"PUMP-17", "pump-17"),
        (b"pump-17 ", "pump-17"),
        (b"\xff", "pump-17"),
    ],
)
def test_key_mismatch(key, device_id):
    assert reason_of(encode_reading(device_id, NOW_MS, GOOD), key=key) == Reason.KEY_MISMATCH


@pytest.mark.parametrize(
    "device_id",
    [
        "",
        "d" * (MAX_DEVICE_ID_LEN + 1),
        "pump\n17",
        "pump\x0017",
        "pump\t17",
        "\x7f",
        "pump\u202817",  # line separator
        "pump\u200b17",  # zero-width space (Cf)
    ],
)
def test_bad_device_id(device_id):
    # the device id check runs before the key check, so even a matching key cannot rescue it
    raw = encode_reading(device_id, NOW_MS, GOOD)
    assert reason_of(raw, key=device_id.encode()) == Reason.BAD_DEVICE_ID
    assert reason_of(raw, key=None) == Reason.BAD_DEVICE_ID


def test_oversized_message():
    raw = msg(pad="x" * MAX_MESSAGE_BYTES)
    assert len(raw) > MAX_MESSAGE_BYTES
    assert reason_of(raw) == Reason.OVERSIZED
    # the size check comes first: even non-JSON is oversized, not bad JSON
    assert reason_of(b"\x00" * (MAX_MESSAGE_BYTES + 1)) == Reason.OVERSIZED


def test_message_at_the_size_limit_is_not_oversized():
    raw = msg(values=GOOD)
    raw = raw[:-1] + b" " * (MAX_MESSAGE_BYTES - len(raw)) + b"}"
    assert len(raw) == MAX_MESSAGE_BYTES
    assert isinstance(one(raw), Reading)


def test_envelope_with_too_many_readings_is_oversized():
    item = b'{"ts":1795341600000,"values":{"pressure":1,"temp":2,"vibration":3}}'
    raw = b'{"device_id":"pump-17","readings":[' + b",".join([item] * (MAX_READINGS_PER_ENVELOPE + 1)) + b"]}"
    assert len(raw) <= MAX_MESSAGE_BYTES
    assert reason_of(raw) == Reason.OVERSIZED
    raw = b'{"device_id":"pump-17","readings":[' + b",".join([item] * MAX_READINGS_PER_ENVELOPE) + b"]}"
    out = run(raw)
    assert len(out) == MAX_READINGS_PER_ENVELOPE
    assert all(isinstance(r, Reading) for r in out)


def test_envelope_mixing_good_and_bad_readings_keeps_order_and_index():
    readings = [
        {"ts": NOW_MS - 5000, "values": GOOD},  # 0 ok
        {"ts": "yesterday", "values": GOOD},  # 1 bad timestamp
        {"ts": NOW_MS - 4000, "values": {"pressure": 1.0}},  # 2 missing sensors
        {"ts": 1_000, "values": GOOD},  # 3 out of range
        {"ts": "2026-11-22T09:59:57Z", "values": GOOD},  # 4 ok
        {"ts": NOW_MS - 2000, "values": {**GOOD, "vibration": 5e12}},  # 5 value out of range
        {"ts": NOW_MS - 1000, "values": {**GOOD, "extra": 1.0}},  # 6 unexpected sensor
        {"ts": NOW_MS + SKEW_MS + 1, "values": GOOD},  # 7 too far in the future
        {"ts": NOW_MS, "values": GOOD},  # 8 ok
    ]
    out = run(msgspec.json.encode({"device_id": "pump-17", "readings": readings}))
    assert [x.index for x in out] == list(range(len(readings)))
    kinds = [x.reason if isinstance(x, Rejection) else "ok" for x in out]
    assert kinds == [
        "ok",
        Reason.BAD_TIMESTAMP,
        Reason.UNKNOWN_SENSORS,
        Reason.TIMESTAMP_OUT_OF_RANGE,
        "ok",
        Reason.VALUE_OUT_OF_RANGE,
        Reason.UNKNOWN_SENSORS,
        Reason.TIMESTAMP_OUT_OF_RANGE,
        "ok",
    ]
    good = [x for x in out if isinstance(x, Reading)]
    assert [x.ts_ms for x in good] == [NOW_MS - 5000, NOW_MS - 3000, NOW_MS]
    assert all(x.device_id == "pump-17" and x.values == GOOD_VEC for x in good)


def test_envelope_level_errors_reject_the_whole_message():
    env = encode_envelope("pump-17", [(NOW_MS, GOOD)])
    assert reason_of(env, key=b"other") == Reason.KEY_MISMATCH
    bad_id = encode_envelope("", [(NOW_MS, GOOD)])
    assert reason_of(bad_id, key=None) == Reason.BAD_DEVICE_ID


_VALS = b'"values": {"pressure": 1, "temp": 1, "vibration": 1}'


@pytest.mark.parametrize(
    "raw",
    [
        b'{"device_id": "\xff", "ts": 1795341600000, ' + _VALS + b"}",
        b'{"device_id": "pump\xc3", "ts": 1795341600000, ' + _VALS + b"}",  # truncated sequence
        b'{"device_id": "\xed\xa0\x80", "ts": 1795341600000, ' + _VALS + b"}",  # encoded surrogate
        b'{"device_id": "\xc0\xaf", "ts": 1795341600000, ' + _VALS + b"}",  # overlong
        b'{"device_id": "pump-17", "ts": "2026\x80", ' + _VALS + b"}",
        b'{"device_id": "pump-17", "ts": 1795341600000, "values": {"\xff": 1, "temp": 1, "vibration": 1}}',
        b'{"device_id": "pump-17", "\xff": 1}',
    ],
    ids=["device_id", "truncated", "surrogate", "overlong", "ts", "sensor", "field-name"],
)
def test_invalid_utf8_inside_a_string_is_bad_json(raw):
    assert reason_of(raw) == Reason.BAD_JSON


def test_invalid_utf8_outside_strings_is_bad_json():
    assert reason_of(b"\xff" + encode_reading("pump-17", NOW_MS, GOOD)) == Reason.BAD_JSON
    assert reason_of(encode_reading("pump-17", NOW_MS, GOOD)[:-1] + b"\xff}") == Reason.BAD_JSON


# -- validate never raises ------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
json_like = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
ts_like = (
    st.integers()
    | st.integers(min_value=MIN_TS_MS - 10, max_value=NOW_MS + 2 * SKEW_MS)
    | st.datetimes().map(lambda d: d.isoformat())
    | st.text(max_size=40)
    | json_like
)
values_like = st.dictionaries(
    st.sampled_from([*SENSORS, "other"]) | st.text(max_size=8),
    st.floats() | st.integers() | json_like,
    max_size=5,
) | st.fixed_dictionaries({s: st.floats() | st.integers() for s in SENSORS})
item_like = st.fixed_dictionaries({"ts": ts_like, "values": values_like}, optional={"extra": json_like})
message_like = st.fixed_dictionaries(
    {},
    optional={
        "device_id": st.text(max_size=140) | json_like,
        "ts": ts_like,
        "values": values_like,
        "readings": st.lists(item_like, max_size=4) | json_like,
        "extra": json_like,
    },
)


def _check_result(out: object) -> None:
    assert isinstance(out, list)
    for x in out:
        assert isinstance(x, Reading | Rejection)
        if isinstance(x, Rejection):
            assert isinstance(x.reason, Reason)
        else:
            assert len(x.values) == len(SENSORS)
            assert MIN_TS_MS <= x.ts_ms <= NOW_MS + SKEW_MS


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=300), key=st.none() | st.binary(max_size=20))
def test_validate_never_raises_on_arbitrary_bytes(raw, key):
    _check_result(validate(raw, key, LIMITS, NOW_MS))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inner=st.binary(max_size=40), where=st.sampled_from(["device_id", "ts", "key"]))
@example(inner=b"\xff", where="device_id")  # always tried first: the test fails deterministically
def test_validate_never_raises_on_arbitrary_bytes_inside_json_strings(inner, where):
    inner = inner.replace(b"\\", b"").replace(b'"', b"")
    if where == "device_id":
        raw = b'{"device_id": "' + inner + b'", "ts": 1795341600000, "values": {}}'
    elif where == "ts":
        raw = b'{"device_id": "pump-17", "ts": "' + inner + b'", "values": {}}'
    else:
        raw = b'{"device_id": "pump-17", "ts": 1795341600000, "values": {"' + inner + b'": 1.0}}'
    _check_result(validate(raw, None, LIMITS, NOW_MS))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=json_like | message_like, key=st.none() | st.sampled_from([b"pump-17", b"x"]))
def test_validate_never_raises_on_arbitrary_json(obj, key):
    raw = json.dumps(obj, allow_nan=True).encode()  # allow_nan: NaN/Infinity literals too
    _check_result(validate(raw, key, LIMITS, NOW_MS))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=message_like, cut=st.integers(min_value=0, max_value=400))
def test_validate_never_raises_on_truncated_json(obj, cut):
    raw = json.dumps(obj, allow_nan=True).encode()
    _check_result(validate(raw[:cut], None, LIMITS, NOW_MS))


# -- the decoder specialised to the sensor set is an optimisation only ---------------------------------

near_valid_values = st.fixed_dictionaries(
    {s: st.floats(-2e12, 2e12) | st.integers(-(10**13), 10**13) for s in SENSORS},
    optional={"other": st.floats()},
)
near_valid_item = st.fixed_dictionaries(
    {"ts": st.integers(min_value=MIN_TS_MS - 10, max_value=NOW_MS + 2 * SKEW_MS), "values": near_valid_values}
)
near_valid = st.fixed_dictionaries({"device_id": st.sampled_from(["pump-17", "x", ""])}) | st.fixed_dictionaries(
    {"device_id": st.just("pump-17")},
    optional={"ts": ts_like, "values": near_valid_values, "readings": st.lists(near_valid_item, max_size=4)},
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=near_valid | message_like, key=st.none() | st.sampled_from([b"pump-17", b"x"]))
@example(obj={"device_id": "pump-17", "ts": NOW_MS, "values": {**GOOD, "temp": 2e12}}, key=None)
@example(obj={"device_id": "pump-17", "readings": [{"ts": NOW_MS, "values": GOOD}] * 3}, key=b"pump-17")
def test_fast_validation_equals_the_exact_path(obj, key):
    raw = json.dumps(obj, allow_nan=True).encode()
    assert validate(raw, key, LIMITS, NOW_MS) == _validate_exact(raw, key, LIMITS, NOW_MS)


def test_fast_validation_keeps_the_last_of_duplicate_keys_like_a_dict():
    values = b'{"pressure": 1e13, "pressure": 1, "temp": 2, "vibration": 3}'
    raw = b'{"device_id": "p", "ts": 1795341600000, "values": ' + values + b"}"
    assert validate(raw, None, LIMITS, NOW_MS) == [Reading("p", NOW_MS, (1.0, 2.0, 3.0))]
    assert validate(raw, None, LIMITS, NOW_MS) == _validate_exact(raw, None, LIMITS, NOW_MS)


def test_a_sensor_set_with_duplicates_refuses_every_reading_as_before():
    limits = Limits(sensors=("temp", "temp"), min_ts_ms=MIN_TS_MS, max_future_skew_ms=SKEW_MS)
    raw = encode_reading("p", NOW_MS, {"temp": 1.0})
    assert [r.reason for r in validate(raw, None, limits, NOW_MS)] == [Reason.UNKNOWN_SENSORS]


def test_limits_pickle_and_copy_as_plain_values():
    import copy
    import pickle

    for twin in (pickle.loads(pickle.dumps(LIMITS)), copy.deepcopy(LIMITS)):
        assert twin == LIMITS
        assert validate(encode_reading("p", NOW_MS, GOOD), None, twin, NOW_MS) == [Reading("p", NOW_MS, GOOD_VEC)]
