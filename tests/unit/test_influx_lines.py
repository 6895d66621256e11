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
