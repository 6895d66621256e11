"""Replay a recorded CSV series (NAB, SKAB, or any ``time + numeric columns`` CSV) as one device.

:func:`load_csv_series` is pure parsing; :func:`replay` is the thin Kafka shell around it, sending the
rows as readings in the wire format of :mod:`pipeline.schema`, keyed by the device id.

Supported layouts (auto-detected):

* NAB: ``timestamp,value`` with ``YYYY-MM-DD HH:MM:SS`` times;
* SKAB: ``datetime;<sensor columns>;anomaly;changepoint`` (semicolons, CRLF line ends);
* generally: a delimiter among ``, ; TAB |``; a time column named like ``timestamp``/``datetime``/
  ``time``/``date``/``ts`` (else the first column whose first value parses as a time), holding ISO
  times (naive = UTC) or epoch seconds / milliseconds; label columns (``anomaly``, ``changepoint``,
  ``label``, ``is_anomaly``, ...) are dropped, and so are non-numeric columns.
"""

from __future__ import annotations

import csv
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from connectors.simulator import Producer
from pipeline.schema import encode_reading

__all__ = ["LABEL_COLUMNS", "TIME_COLUMNS", "ReplayStats", "load_csv_series", "replay"]

TIME_COLUMNS = ("timestamp", "datetime", "time", "date", "ts", "time_stamp", "date_time")
LABEL_COLUMNS = frozenset(
    {
        "anomaly",
        "anomalies",
        "changepoint",
        "label",
        "labels",
        "is_anomaly",
        "anomaly_label",
        "outlier",
        "target",
    }
)
_DELIMITERS = (",", ";", "\t", "|")
_MAX_ROWS = 50_000_000
_TZ_SUFFIX = re.compile(r"(?:Z|[+-]\d{2}:?\d{2})$")  # numpy's datetime64 would warn on these


def _detect_delimiter(header: str) -> str:
    counts = {d: header.count(d) for d in _DELIMITERS}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] > 0 else ","


def _parse_time_text(text: str) -> int:
    """Epoch ms from an ISO-like string (naive = UTC); raises ValueError."""
    dt = datetime.fromisoformat(text.strip())
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return round(dt.timestamp() * 1000)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _parse_times(cells: list[str]) -> np.ndarray:
    """Epoch milliseconds (int64) of a time column; raises ValueError if any cell does not parse."""
    if cells and all(_is_float(c) for c in cells):
        num = np.array([float(c) for c in cells])
        if not np.all(np.isfinite(num)):
            raise ValueError("non-finite epoch timestamp")
        # epoch seconds until ~year 5138 are below 1e11; epoch ms of anything after 1973 are above
        scale = 1.0 if np.nanmax(np.abs(num)) >= 1e11 else 1000.0
        return np.round(num * scale).astype(np.int64)
    stripped = [c.strip() for c in cells]
    if not any(_TZ_SUFFIX.search(c) for c in stripped):
        try:  # fast path: numpy parses naive 'YYYY-MM-DD[ HH:MM:SS[.fff]]' (taken as UTC)
            return np.array(stripped, dtype="datetime64[ms]").astype(np.int64)
        except ValueError:
            pass
    return np.array([_parse_time_text(c) for c in stripped], dtype=np.int64)


def load_csv_series(path: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(timestamps_ms int64 (n,), values float64 (n, f), feature_names)`` of a CSV file.

    Rows are sorted by time (stable); rows with an empty or unparsable value are dropped. Raises
    ValueError when no time column or no numeric feature column can be found.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as fh:
        header_line = fh.readline()
        if not header_line.strip():
            raise ValueError(f"{path}: empty file")
        delim = _detect_delimiter(header_line)
        fh.seek(0)
        reader = csv.reader(fh, delimiter=delim)
        header = [h.strip() for h in next(reader)]
        rows: list[list[str]] = []
        for i, row in enumerate(reader):
            if i >= _MAX_ROWS:
                raise ValueError(f"{path}: more than {_MAX_ROWS} rows")
            if not row or all(not c.strip() for c in row):
                continue
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no data rows")
    width = len(header)
    rows = [r for r in rows if len(r) == width]
    if not rows:
        raise ValueError(f"{path}: no row has the header's {width} fields")

    lowered = [h.lower() for h in header]
    time_col = next((lowered.index(name) for name in TIME_COLUMNS if name in lowered), None)
    if time_col is None:
        for j in range(width):
            try:
                _parse_time_text(rows[0][j])
            except ValueError:
                continue
            time_col = j
            break
    if time_col is None:
        raise ValueError(f"{path}: no time column among {header}")
    ts = _parse_times([r[time_col] for r in rows])

    feature_cols = [
        j
        for j in range(width)
        if j != time_col and lowered[j] not in LABEL_COLUMNS and _is_float(rows[0][j].strip() or "nan")
    ]
    if not feature_cols:
        raise ValueError(f"{path}: no numeric feature column among {header}")
    values = np.full((len(rows), len(feature_cols)), np.nan)
    for i, r in enumerate(rows):
        for k, j in enumerate(feature_cols):
            cell = r[j].strip()
            try:
                values[i, k] = float(cell) if cell else math.nan
            except ValueError:
                values[i, k] = math.nan
    keep = np.all(np.isfinite(values), axis=1)
    ts, values = ts[keep], values[keep]
    order = np.argsort(ts, kind="stable")
    return ts[order], values[order], [header[j] for j in feature_cols]


@dataclass
class ReplayStats:
    readings_sent: int = 0
    messages_sent: int = 0
    first_ts_ms: int | None = None  # as sent (after rebasing / respacing)
    last_ts_ms: int | None = None
    shift_ms: int = 0  # added to the file's timestamps
    rows_in_file: int = 0
    elapsed_s: float = 0.0
    sensors: list[str] = field(default_factory=list)


def replay(
    producer: Producer,
    topic: str,
    path: str | Path,
    device_id: str,
    *,
    speed: float | None = None,
    rebase_to_now: bool = True,
    sensors: Mapping[str, str] | None = None,
    limit: int | None = None,
    step_ms: int | None = None,
    duration_s: float | None = None,
    progress: Callable[[int, ReplayStats], None] | None = None,
    now_ms: int | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ReplayStats:
    """Stream the CSV at ``path`` to ``topic`` as readings of ``device_id``; flush; return the stats.

    * ``sensors``: ``{csv column: sensor name}``; only the mapped columns are sent, renamed (e.g.
      ``{"value": "temp"}`` for NAB). None sends every feature column under its own name.
    * ``limit``: send only the first ``limit`` rows.
    * ``step_ms``: replace the file's timestamps by a regular grid of this period (keeping the first
      one), e.g. to play a 5-minute NAB series as a 1 Hz stream.
    * ``rebase_to_now``: shift timestamps (by a whole number of seconds) so the *last* row sent is
      stamped now (``now_ms``, default the wall clock): the pipeline rejects readings too far in the
      future but accepts the past.
    * ``speed``: None sends as fast as possible; otherwise a multiple of real time (2.0 = twice as
      fast) following the gaps between the (possibly respaced) timestamps.
    * Stops after ``duration_s`` seconds of wall time if given.
    """
    if speed is not None and speed <= 0:
        raise ValueError("speed must be > 0 (or None)")
    if step_ms is not None and step_ms < 1:
        raise ValueError("step_ms must be >= 1")
    ts, values, names = load_csv_series(path)
    stats = ReplayStats(rows_in_file=len(ts))
    if sensors is not None:
        missing = [c for c in sensors if c not in names]
        if missing:
            raise ValueError(f"columns {missing} not in {names}")
        cols = [names.index(c) for c in sensors]
        values = values[:, cols]
        names = [sensors[c] for c in sensors]
    if limit is not None:
        ts, values = ts[: max(limit, 0)], values[: max(limit, 0)]
    stats.sensors = list(names)
    if len(ts) == 0:
        producer.flush()
        return stats
    if step_ms is not None:
        ts = ts[0] + np.arange(len(ts), dtype=np.int64) * step_ms
    if rebase_to_now:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        stats.shift_ms = ((now - int(ts[-1])) // 1000) * 1000
        ts = ts + stats.shift_ms
    t_start = clock()
    deadline = None if duration_s is None else t_start + duration_s
    ts0 = int(ts[0])
    key = device_id.encode()
    rows = values.tolist()
    for i, (t, row) in enumerate(zip(ts.tolist(), rows, strict=True)):
        now_s = clock()
        if deadline is not None and now_s >= deadline:
            break
        if speed is not None:
            wait = t_start + (t - ts0) / 1000.0 / speed - now_s
            if deadline is not None and now_s + wait >= deadline:
                sleep(max(deadline - now_s, 0.0))  # the next row is due after the deadline
                break
            if wait > 0:
                sleep(wait)
        producer.send(topic, key=key, value=encode_reading(device_id, t, dict(zip(names, row, strict=True))))
        stats.readings_sent += 1
        stats.messages_sent += 1
        if stats.first_ts_ms is None:
            stats.first_ts_ms = t
        stats.last_ts_ms = t
        if progress is not None:
            progress(i, stats)
    producer.flush()
    stats.elapsed_s = clock() - t_start
    return stats
