"""Wire schema of sensor readings and their validation.

A message on ``<prefix>.readings`` is keyed by ``device_id`` (UTF-8) and its value is JSON, either
one reading::

    {"device_id": "pump-17", "ts": "2026-11-22T10:00:00.123Z", "values": {"pressure": 1.2, "temp": 41.0}}

or an envelope of several readings of one device (what gateways send; far cheaper per reading)::

    {"device_id": "pump-17", "readings": [{"ts": 1795341600123, "values": {...}}, ...]}

``ts`` is epoch milliseconds (integer) or an ISO-8601 string (``Z`` or an offset; naive means UTC).
``values`` must hold exactly the model's sensors, each a finite number.

Validation never raises: every reading becomes either a :class:`Reading` or a :class:`Rejection`
with a machine-readable reason, which the agent sends to the dead-letter topic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Any

import msgspec

MAX_MESSAGE_BYTES = 1_048_576
MAX_DEVICE_ID_LEN = 128
MAX_READINGS_PER_ENVELOPE = 10_000
MAX_ABS_VALUE = 1e12


class Reason(StrEnum):
    """Why a reading was dead-lettered (the ``iotad-reason`` header)."""

    OVERSIZED = "oversized"
    BAD_JSON = "bad_json"
    BAD_SCHEMA = "bad_schema"
    BAD_DEVICE_ID = "bad_device_id"
    KEY_MISMATCH = "key_mismatch"
    BAD_TIMESTAMP = "bad_timestamp"
    TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"
    UNKNOWN_SENSORS = "unknown_sensors"
    NON_FINITE = "non_finite_value"
    VALUE_OUT_OF_RANGE = "value_out_of_range"
    LATE = "late"


class _Item(msgspec.Struct, forbid_unknown_fields=True):
    ts: int | str
    values: dict[str, float]


class _Message(msgspec.Struct, forbid_unknown_fields=True):
    device_id: str
    ts: int | str | None = None
    values: dict[str, float] | None = None
    readings: list[_Item] | None = None


_decoder = msgspec.json.Decoder(_Message)


class Reading(msgspec.Struct, frozen=True, gc=False):
    """A validated reading; ``values`` are in the model's feature order. (A struct: one is made per
    reading on the hot path.)"""

    device_id: str
    ts_ms: int
    values: tuple[float, ...]
    index: int = -1  # position inside an envelope, -1 for a single reading


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: Reason
    detail: str
    index: int = -1  # position inside an envelope, -1 for a single reading or the whole message


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds a reading must satisfy; ``now_ms`` is supplied by the caller so validation stays pure."""

    sensors: Sequence[str]
    min_ts_ms: int
    max_future_skew_ms: int
    decoder: msgspec.json.Decoder[Any] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "decoder", _valid_message_decoder(tuple(self.sensors)))

    def __reduce__(self) -> tuple[type[Limits], tuple[Sequence[str], int, int]]:
        # A decoder cannot be pickled (or deep-copied); the copy builds its own.
        return Limits, (self.sensors, self.min_ts_ms, self.max_future_skew_ms)


# A value the bounds accept (abs(v) <= MAX_ABS_VALUE; JSON numbers decode finite or fail).
_InRange = Annotated[float, msgspec.Meta(ge=-MAX_ABS_VALUE, le=MAX_ABS_VALUE)]


@lru_cache(maxsize=16)
def _valid_message_decoder(sensors: tuple[str, ...]) -> msgspec.json.Decoder[Any] | None:
    """A decoder of ``_Message`` that only accepts exactly ``sensors``, each in range, in every reading.

    What it accepts, the strict decoder accepts too, and the sensor and value checks pass; so valid
    messages (nearly all) skip those per-reading checks in Python. Anything it refuses goes through
    the exact path, which finds the reason. None for a sensor set with duplicates (no reading can
    match it; the exact path says why).
    """
    if len(set(sensors)) != len(sensors):
        return None
    names = [f"s{i}" for i in range(len(sensors))]
    values = msgspec.defstruct(
        "Values",
        [(n, _InRange) for n in names],
        rename=dict(zip(names, sensors, strict=True)),
        forbid_unknown_fields=True,
        gc=False,
    )
    item = msgspec.defstruct("Item", [("ts", int | str), ("values", values)], forbid_unknown_fields=True, gc=False)
    message = msgspec.defstruct(
        "Message",
        [
            ("device_id", str),
            ("ts", int | str | None, None),
            ("values", values | None, None),
            ("readings", list[item] | None, None),  # type: ignore[valid-type]
        ],
        forbid_unknown_fields=True,
    )
    return msgspec.json.Decoder(message)


def parse_ts(ts: int | str) -> int:
    """Epoch milliseconds from an integer or an ISO-8601 string; raises ValueError."""
    if isinstance(ts, int):
        return ts
    dt = datetime.fromisoformat(ts)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return round(dt.timestamp() * 1000)


def _exact_values(values: dict[str, float], limits: Limits, index: int) -> tuple[float, ...] | Rejection:
    """The values in sensor order, or why they are refused."""
    if len(values) != len(limits.sensors) or any(s not in values for s in limits.sensors):
        extra = sorted(set(values) - set(limits.sensors))[:8]
        missing = sorted(set(limits.sensors) - set(values))
        return Rejection(Reason.UNKNOWN_SENSORS, f"missing={missing} unexpected={extra}", index)
    vec = tuple(values[s] for s in limits.sensors)
    for name, v in zip(limits.sensors, vec, strict=True):
        if not math.isfinite(v):
            return Rejection(Reason.NON_FINITE, f"{name}={v}", index)
        if abs(v) > MAX_ABS_VALUE:
            return Rejection(Reason.VALUE_OUT_OF_RANGE, f"{name}={v:.3g}", index)
    return vec


def _decoded_values(values: msgspec.Struct, limits: Limits, index: int) -> tuple[float, ...]:
    """Values that ``Limits.decoder`` accepted: already exactly the sensors, in order, in range."""
    return msgspec.structs.astuple(values)


ValuesCheck = Callable[[Any, Limits, int], tuple[float, ...] | Rejection]


def _check_item(
    device_id: str, ts: int | str, values: Any, limits: Limits, now_ms: int, index: int, check_values: ValuesCheck
) -> Reading | Rejection:
    try:
        ts_ms = ts if type(ts) is int else parse_ts(ts)
    except (ValueError, OverflowError) as exc:
        return Rejection(Reason.BAD_TIMESTAMP, f"cannot parse ts {str(ts)[:64]!r}: {exc}", index)
    if ts_ms < limits.min_ts_ms or ts_ms > now_ms + limits.max_future_skew_ms:
        return Rejection(
            Reason.TIMESTAMP_OUT_OF_RANGE,
            f"ts {ts_ms} outside [{limits.min_ts_ms}, now+{limits.max_future_skew_ms}ms]",
            index,
        )
    vec = check_values(values, limits, index)
    return vec if isinstance(vec, Rejection) else Reading(device_id, ts_ms, vec, index)


class _LenientMessage(msgspec.Struct):
    """Second-chance decode of a message whose strict decode failed: readings kept raw, so one bad
    reading in an envelope costs only that reading."""

    device_id: str
    ts: msgspec.Raw | None = None
    values: msgspec.Raw | None = None
    readings: list[msgspec.Raw] | None = None


_lenient_decoder = msgspec.json.Decoder(_LenientMessage)
_item_decoder = msgspec.json.Decoder(_Item)


def _schema_rejection(exc: msgspec.ValidationError, index: int = -1) -> Rejection:
    text = str(exc)
    reason = Reason.VALUE_OUT_OF_RANGE if "Number out of range" in text else Reason.BAD_SCHEMA
    return Rejection(reason, text[:200], index)


def _check_device(device_id: str, key: bytes | None) -> Rejection | None:
    if not device_id or len(device_id) > MAX_DEVICE_ID_LEN or not device_id.isprintable():
        return Rejection(Reason.BAD_DEVICE_ID, f"device_id {device_id[:64]!r}")
    if key is not None and key != device_id.encode():
        return Rejection(Reason.KEY_MISMATCH, f"key {key[:64]!r} != device_id {device_id[:64]!r}")
    return None


def _envelope(
    device_id: str, readings: Sequence[Any], limits: Limits, now_ms: int, check_values: ValuesCheck
) -> list[Reading | Rejection]:
    if not readings:
        return [Rejection(Reason.BAD_SCHEMA, "empty envelope")]
    if len(readings) > MAX_READINGS_PER_ENVELOPE:
        return [Rejection(Reason.OVERSIZED, f"{len(readings)} readings in one envelope")]
    out: list[Reading | Rejection] = []
    for i, item in enumerate(readings):
        if isinstance(item, msgspec.Raw):
            try:
                item = _item_decoder.decode(item)
            except msgspec.ValidationError as exc:
                out.append(_schema_rejection(exc, i))
                continue
        out.append(_check_item(device_id, item.ts, item.values, limits, now_ms, i, check_values))
    return out


def _message(
    msg: Any, key: bytes | None, limits: Limits, now_ms: int, check_values: ValuesCheck
) -> list[Reading | Rejection]:
    """Readings and rejections of a message the strict schema accepted."""
    bad = _check_device(msg.device_id, key)
    if bad:
        return [bad]
    if msg.readings is not None:
        if msg.ts is not None or msg.values is not None:
            return [Rejection(Reason.BAD_SCHEMA, "envelope must not also carry ts/values")]
        return _envelope(msg.device_id, msg.readings, limits, now_ms, check_values)
    if msg.ts is None or msg.values is None:
        return [Rejection(Reason.BAD_SCHEMA, "a reading needs ts and values (or an envelope: readings)")]
    return [_check_item(msg.device_id, msg.ts, msg.values, limits, now_ms, -1, check_values)]


def _validate_exact(raw: bytes, key: bytes | None, limits: Limits, now_ms: int) -> list[Reading | Rejection]:
    """validate() for a message ``Limits.decoder`` refused: find each reading's reason."""
    try:
        msg = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        try:
            lenient = _lenient_decoder.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError):
            return [_schema_rejection(exc)]
        if lenient.readings is None or lenient.ts is not None or lenient.values is not None:
            return [_schema_rejection(exc)]
        bad = _check_device(lenient.device_id, key)
        return [bad] if bad else _envelope(lenient.device_id, lenient.readings, limits, now_ms, _exact_values)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # Invalid UTF-8 inside a JSON string surfaces as UnicodeDecodeError, not a DecodeError.
        return [Rejection(Reason.BAD_JSON, str(exc)[:200])]
    return _message(msg, key, limits, now_ms, _exact_values)


def validate(raw: bytes, key: bytes | None, limits: Limits, now_ms: int) -> list[Reading | Rejection]:
    """Decode one Kafka message into readings and rejections, in message order. Never raises."""
    if len(raw) > MAX_MESSAGE_BYTES:
        return [Rejection(Reason.OVERSIZED, f"{len(raw)} bytes > {MAX_MESSAGE_BYTES}")]
    if limits.decoder is None:
        return _validate_exact(raw, key, limits, now_ms)
    try:
        msg = limits.decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):  # ValidationError is a DecodeError
        return _validate_exact(raw, key, limits, now_ms)
    return _message(msg, key, limits, now_ms, _decoded_values)


def encode_reading(device_id: str, ts_ms: int, values: dict[str, float]) -> bytes:
    """Encode one reading the way producers should (used by the simulator and replay)."""
    return msgspec.json.encode({"device_id": device_id, "ts": ts_ms, "values": values})


def encode_envelope(device_id: str, readings: Sequence[tuple[int, dict[str, float]]]) -> bytes:
    return msgspec.json.encode({"device_id": device_id, "readings": [{"ts": ts, "values": v} for ts, v in readings]})
