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

from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from connectors.influx import format_line
from models.scoring import Status


@dataclass(frozen=True, slots=True)
class ScoreRecord:
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


def score_json(r: ScoreRecord, sensors: Sequence[str], emitted_at_ms: int) -> bytes:
    return _json.encode(
        {
            "device_id": r.device_id,
            "ts": r.ts_ms,
            "status": r.status.value,
            "score": r.score,
            "threshold": r.threshold,
            "is_anomaly": r.is_anomaly,
            "top_sensor": r.top_sensor,
            "values": dict(zip(sensors, r.values, strict=True)),
            "forecast": None if r.forecast is None else dict(zip(sensors, r.forecast, strict=True)),
            "model_version": r.model_version,
            "n_readings": r.n_readings,
            "emitted_at": emitted_at_ms,
        }
    )


def score_line(r: ScoreRecord, sensors: Sequence[str], measurement: str) -> str:
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
