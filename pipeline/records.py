"""Records the pipeline emits: scores and dead letters, and their wire encodings.

Scores topic (``<prefix>.scores``): key = device id, value = JSON of :class:`ScoreRecord` plus
``emitted_at`` (epoch ms when the score was produced, after its InfluxDB point was written).

Dead-letter topic (``<prefix>.dlq``): key and value are the ORIGINAL message bytes, untouched;
the reason and the source coordinates travel in headers (the Kafka Connect convention):
``iotad-reason``, ``iotad-detail``, ``iotad-topic``, ``iotad-partition``, ``iotad-offset`` and,
for one bad reading inside an envelope, ``iotad-index``.

InfluxDB: one point per scored step in measurement ``anomaly_scores`` (``IOTAD_INFLUX_MEASUREMENT``)
— tags ``device``, ``model_version``; fields ``score``, ``threshold``, ``is_anomaly``, ``status``,
``top_sensor``, ``n_readings``, ``value_<sensor>`` and ``forecast_<sensor>``; time = step end (ms).
The tag set is fixed per device and model, so a replayed step overwrites its point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from operator import itemgetter

import msgspec

from connectors.influx import escape_field_key, format_field_value, format_floats, format_line, line_head
from models.scoring import Status


class ScoreRecord(msgspec.Struct, frozen=True, gc=False):
    """One scored step. A struct, not a dataclass: one is built per reading on the hot path (and it
    holds no reference cycles, so the cyclic GC need not track it)."""

    device_id: str
    ts_ms: int
    status: Status
    score: float | None
    threshold: float
    is_anomaly: bool
    top_sensor: str | None
    values: tuple[float, ...]
    forecast: tuple[float, ...] | None
    model_version: str
    n_readings: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    key: bytes | None
    value: bytes
    reason: str
    detail: str
    topic: str
    partition: int
    offset: int
    index: int = -1

    def headers(self) -> list[tuple[str, bytes]]:
        h = [
            ("iotad-reason", self.reason.encode()),
            ("iotad-detail", self.detail.encode("utf-8", "replace")),
            ("iotad-topic", self.topic.encode()),
            ("iotad-partition", str(self.partition).encode()),
            ("iotad-offset", str(self.offset).encode()),
        ]
        if self.index >= 0:
            h.append(("iotad-index", str(self.index).encode()))
        return h


_json = msgspec.json.Encoder()


@lru_cache(maxsize=16)
def _json_type(sensors: tuple[str, ...]) -> tuple[type[msgspec.Struct], type[msgspec.Struct]]:
    """The scores-topic document as structs for ``sensors``: encoding them gives the same bytes as the
    equivalent dicts (same key order) at a fraction of the cost of building the dicts."""
    names = [f"s{i}" for i in range(len(sensors))]
    values = msgspec.defstruct(
        "Values", [(n, float) for n in names], rename=dict(zip(names, sensors, strict=True)), gc=False
    )
    doc = msgspec.defstruct(
        "ScoreDoc",
        [
            ("device_id", str),
            ("ts", int),
            ("status", str),
            ("score", float | None),
            ("threshold", float),
            ("is_anomaly", bool),
            ("top_sensor", str | None),
            ("values", values),
            ("forecast", values | None),
            ("model_version", str),
            ("n_readings", int),
            ("emitted_at", int),
        ],
        gc=False,
    )
    return doc, values


def score_json(r: ScoreRecord, sensors: Sequence[str], emitted_at_ms: int) -> bytes:
    """The scores-topic value: the record with ``values``/``forecast`` keyed by sensor, and ``emitted_at``."""
    doc, values = _json_type(tuple(sensors))
    return _json.encode(
        doc(
            r.device_id,
            r.ts_ms,
            r.status.value,
            r.score,
            r.threshold,
            r.is_anomaly,
            r.top_sensor,
            values(*r.values),
            None if r.forecast is None else values(*r.forecast),
            r.model_version,
            r.n_readings,
            emitted_at_ms,
        )
    )


def _template_key(key: str) -> str:
    """A field key as literal text of a %-template."""
    return escape_field_key(key).replace("%", "%%")


@dataclass(frozen=True, slots=True)
class _LineTemplates:
    """%-templates of a score line (fields in the order of the field-by-field path) for the two shapes
    every processor record has: ``scored`` (score, top sensor and forecast present) and ``unscored``
    (warming up without a forecast). Arguments: head, [score,] threshold, is_anomaly, status,
    [top_sensor,] n_readings, then value (and forecast) per sensor, then the time."""

    scored: str
    unscored: str
    # format_floats((score, threshold, *values, *forecast)) -> value/forecast pairs in line order
    pairs: Callable[[list[str]], tuple[str, ...]]
    top_sensor: dict[str, str | None]  # field value text of each sensor's name


@lru_cache(maxsize=16)
def _line_templates(sensors: tuple[str, ...]) -> _LineTemplates:
    n = len(sensors)
    values = [_template_key(f"value_{s}") + "=%s" for s in sensors]
    forecasts = [_template_key(f"forecast_{s}") + "=%s" for s in sensors]
    score, threshold = _template_key("score") + "=%s", _template_key("threshold") + "=%s"
    flags = [_template_key("is_anomaly") + "=%s", _template_key("status") + "=%s"]
    top, count = _template_key("top_sensor") + "=%s", _template_key("n_readings") + "=%si"
    scored = [score, threshold, *flags, top, count, *(f for pair in zip(values, forecasts, strict=True) for f in pair)]
    unscored = [threshold, *flags, count, *values]
    pairs = itemgetter(*(2 + i + k * n for i in range(n) for k in (0, 1)))
    tops = {s: format_field_value(s) for s in sensors}
    return _LineTemplates("%s " + ",".join(scored) + " %s", "%s " + ",".join(unscored) + " %s", pairs, tops)


@lru_cache(maxsize=65536)
def _score_head(measurement: str, device_id: str, model_version: str) -> str:
    return line_head(measurement, {"device": device_id, "model_version": model_version})


_STATUS_TEXT = {s: format_field_value(s.value) for s in Status}


def _fast_line(r: ScoreRecord, sensors: tuple[str, ...], measurement: str) -> str | None:
    """:func:`score_line` for the records the processor makes (plain types, finite floats in the range
    :func:`format_floats` covers), from a template; None for anything else."""
    status = _STATUS_TEXT.get(r.status)
    n = len(sensors)
    if (
        status is None
        or n == 0
        or type(r.is_anomaly) is not bool
        or type(r.n_readings) is not int
        or type(r.ts_ms) is not int
        or len(r.values) != n
    ):
        return None
    t = _line_templates(sensors)
    flag = "true" if r.is_anomaly else "false"
    forecast = r.forecast
    if r.score is not None and type(r.top_sensor) is str and forecast is not None and len(forecast) == n:
        texts = format_floats((r.score, r.threshold, *r.values, *forecast))
        if texts is None:
            return None
        head = _score_head(measurement, r.device_id, r.model_version)
        top = t.top_sensor.get(r.top_sensor) or format_field_value(r.top_sensor)
        return t.scored % (head, texts[0], texts[1], flag, status, top, r.n_readings, *t.pairs(texts), r.ts_ms)
    if r.score is None and r.top_sensor is None and forecast is None:
        texts = format_floats((r.threshold, *r.values))
        if texts is None:
            return None
        head = _score_head(measurement, r.device_id, r.model_version)
        return t.unscored % (head, texts[0], flag, status, r.n_readings, *texts[1:], r.ts_ms)
    return None


def score_line(r: ScoreRecord, sensors: Sequence[str], measurement: str) -> str:
    """The InfluxDB line of a score (module docstring); fields that are None or not finite are left out."""
    sensors = tuple(sensors)
    line = _fast_line(r, sensors, measurement)
    if line is not None:
        return line
    fields: dict[str, float | int | bool | str | None] = {
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
