"""Line-protocol formatting must match influxdb-client's Point, the reference encoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
from influxdb_client import Point, WritePrecision

from connectors.influx import (
    escape_field_key,
    escape_tag,
    format_field_value,
    format_floats,
    format_line,
    parse_retry_after,
    quote_ident,
)

CASES = [
    ("scores", {"device": "d1"}, {"score": 1.5}),
    ("anomaly scores", {"device": "dev,1"}, {"score": 0.1, "flag": True}),
    ("m,x", {"dev ice": "a=b c"}, {"fi eld": 3, "f,=g": -7}),
    ("m", {"a": "x", "b": "tail\\"}, {"s": 'say "hi" \\ there'}),
    ("m", {"a": "line\nbreak\ttab\rcr"}, {"v": 2.0, "big": 1e20, "tiny": 1.234e-7}),
    ("m", {"a": "x", "empty": ""}, {"v": 1.0, "none": None, "nan": math.nan, "inf": math.inf}),
    ("m", {}, {"ok": False, "i": 0, "neg": -0.5, "pi": math.pi}),
    ("m", {"unicode": "tempé°C"}, {"s": "ünïcode, with = signs"}),
]


@pytest.mark.parametrize(("measurement", "tags", "fields"), CASES)
def test_matches_influxdb_client_point(measurement, tags, fields):
    # Point sorts tags and fields by key; format_line keeps the caller's order, so pass both sorted.
    tags = dict(sorted(tags.items()))
    fields = dict(sorted(fields.items()))
    point = Point(measurement)
    for key, value in tags.items():
        point.tag(key, value)
    for key, value in fields.items():
        point.field(key, value)
    point.time(1_700_000_000_123, WritePrecision.MS)
    assert format_line(measurement, tags, fields, 1_700_000_000_123) == point.to_line_protocol()


def test_line_without_fields_is_empty():
    assert format_line("m", {"a": "b"}, {"x": None, "y": math.nan}, 1) == ""


def test_field_values():
    assert format_field_value(0.1) == "0.1"
    assert format_field_value(0.30000000000000004) == "0.30000000000000004"  # full repr precision
    assert format_field_value(3) == "3i"
    assert format_field_value(True) == "true"
    assert format_field_value(None) is None
    assert format_field_value(-math.inf) is None
    with pytest.raises(TypeError):
        format_field_value([1])  # type: ignore[arg-type]


def test_numpy_scalars():
    assert format_field_value(np.float32(0.5)) == "0.5"
    assert format_field_value(np.int64(7)) == "7i"
    assert format_field_value(np.bool_(True)) == "true"


def test_escape_helpers():
    assert escape_tag("a b,c=d") == r"a\ b\,c\=d"
    assert escape_field_key("x=y") == r"x\=y"
    assert quote_ident('we"ird\\') == '"we\\"ird\\\\"'


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


def _awkward_floats(rng: np.random.Generator, n: int) -> list[float]:
    """Floats across every magnitude, both notations' boundaries, float32-widened values and specials."""
    mags = 10.0 ** rng.uniform(-12, 24, n) * rng.choice([-1.0, 1.0], n)
    values = mags.tolist() + mags.astype(np.float32).astype(np.float64).tolist() + np.round(mags, 4).tolist()
    values += rng.integers(0, 2**64, n, dtype=np.uint64).view(np.float64).tolist()  # any bit pattern
    values += [0.0, -0.0, 1.0, -1.0, 1e-4, -1e-4, 9.999999999999999e-5, 1e16, 9999999999999998.0, 1e15, 10.00001]
    values += [5e-324, 1.7976931348623157e308, 0.1, 2.5e-05, 123.0, math.nan, math.inf, -math.inf]
    return values


def test_format_floats_is_format_field_value_or_declines():
    rng = np.random.default_rng(7)
    values = _awkward_floats(rng, 20_000)
    expected = [format_field_value(v) for v in values]
    taken = 0
    for i in range(0, len(values), 10):
        chunk = values[i : i + 10]
        got = format_floats(chunk)
        if got is not None:
            assert got == expected[i : i + 10], chunk
            taken += 1
    assert taken > 0
    # the fast path covers what sensors send and scores are
    typical = (rng.normal(size=1000) * 100).tolist()
    assert format_floats(typical) == [format_field_value(v) for v in typical]
    assert format_floats([]) == []


@pytest.mark.parametrize("value", [1, True, None, "1.5", [1.5], np.float32(0.5), math.nan, 1e-5, 1e20])
def test_format_floats_declines_what_it_cannot_vouch_for(value):
    assert format_floats([1.5, value, 2.0]) is None  # type: ignore[list-item]
