"""CSV parsing (NAB, SKAB, generic) and replaying a series as one device's readings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from connectors.replay import load_csv_series, replay
from pipeline.schema import Limits, Reading, validate

DATASETS = Path(__file__).parents[2].parent / "shared" / "datasets"
NAB_FILE = DATASETS / "nab" / "data" / "realKnownCause" / "machine_temperature_system_failure.csv"
SKAB_FILE = DATASETS / "skab" / "data" / "valve1" / "0.csv"
SKAB_COLUMNS = [
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume Flow RateRMS",
]
NOW_MS = 1_795_341_600_000


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self.flushed = 0

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> None:
        assert value is not None
        self.sent.append((topic, key, value))

    def flush(self, timeout: float | None = None) -> None:
        self.flushed += 1


def _utc_ms(text: str) -> int:
    return int(np.datetime64(text, "ms").astype(np.int64))


@pytest.mark.skipif(not NAB_FILE.exists(), reason="shared NAB data set not present")
def test_load_nab_file() -> None:
    ts, values, names = load_csv_series(NAB_FILE)
    assert names == ["value"]
    assert values.shape == (len(ts), 1) and len(ts) > 20_000
    assert ts.dtype == np.int64 and values.dtype == np.float64
    assert ts[0] == _utc_ms("2013-12-02T21:15:00")
    assert ts[1] - ts[0] == 300_000
    assert np.all(np.diff(ts) >= 0)  # sorted; the file has a few duplicated timestamps
    assert np.mean(np.diff(ts) == 300_000) > 0.99
    assert values[0, 0] == pytest.approx(73.96732207)


@pytest.mark.skipif(not SKAB_FILE.exists(), reason="shared SKAB data set not present")
def test_load_skab_file() -> None:
    ts, values, names = load_csv_series(SKAB_FILE)
    assert names == SKAB_COLUMNS  # datetime, anomaly and changepoint are not features
    assert values.shape == (len(ts), 8) and len(ts) > 1000
    assert ts[0] == _utc_ms("2020-03-09T10:14:33")
    assert np.all(np.diff(ts) >= 0)
    assert values[0, 4] == pytest.approx(79.3366)
    assert np.isfinite(values).all()


@pytest.mark.skipif(not DATASETS.exists(), reason="shared data sets not present")
def test_every_shared_csv_parses() -> None:
    files = sorted(DATASETS.glob("nab/data/*/*.csv")) + sorted(DATASETS.glob("skab/data/*/*.csv"))
    assert files
    for path in files:
        ts, values, names = load_csv_series(path)
        assert len(ts) > 0 and values.shape == (len(ts), len(names)), path
        assert not {"anomaly", "changepoint", "timestamp", "datetime"} & {n.lower() for n in names}, path


def test_generic_csv_variants(tmp_path: Path) -> None:
    nab = tmp_path / "nab.csv"
    nab.write_text("timestamp,value\n2014-07-01 00:30:00,8127\n2014-07-01 00:00:00,10844\n")
    ts, values, names = load_csv_series(nab)
    assert names == ["value"]
    assert list(ts) == [_utc_ms("2014-07-01T00:00:00"), _utc_ms("2014-07-01T00:30:00")]  # sorted
    assert list(values[:, 0]) == [10844.0, 8127.0]

    skab = tmp_path / "skab.csv"
    skab.write_bytes(
        b"\xef\xbb\xbfdatetime;A;B C;anomaly;changepoint\r\n"
        b"2020-03-09 10:14:33;1.5;2;0.0;0.0\r\n"
        b"2020-03-09 10:14:34;;3;1.0;0.0\r\n"  # an empty cell: the row is dropped
        b"2020-03-09 10:14:35;1.7;4;1.0;1.0\r\n"
    )
    ts, values, names = load_csv_series(skab)
    assert names == ["A", "B C"]
    assert list(ts) == [_utc_ms("2020-03-09T10:14:33"), _utc_ms("2020-03-09T10:14:35")]
    assert values.tolist() == [[1.5, 2.0], [1.7, 4.0]]

    epoch = tmp_path / "epoch.tsv"
    epoch.write_text("ts\tx\tlabel\tname\n1700000000\t1\t0\tfoo\n1700000001\t2\t1\tbar\n")
    ts, values, names = load_csv_series(epoch)
    assert names == ["x"] and list(ts) == [1_700_000_000_000, 1_700_000_001_000]

    epoch_ms = tmp_path / "epoch_ms.csv"
    epoch_ms.write_text("time,x\n1700000000123,1\n")
    assert list(load_csv_series(epoch_ms)[0]) == [1_700_000_000_123]

    iso = tmp_path / "iso.csv"
    iso.write_text("when,y\n2026-01-01T00:00:00Z,1\n2026-01-01T02:00:00+01:00,2\n")
    ts, _, names = load_csv_series(iso)
    assert names == ["y"]
    assert list(ts) == [_utc_ms("2026-01-01T00:00:00"), _utc_ms("2026-01-01T01:00:00")]

    for bad in ("a,b\n1,2\n", "timestamp,label\n2020-01-01,1\n", ""):
        path = tmp_path / "bad.csv"
        path.write_text(bad)
        with pytest.raises(ValueError):
            load_csv_series(path)


def _series_csv(tmp_path: Path, n: int = 30) -> Path:
    path = tmp_path / "s.csv"
    lines = ["timestamp,value,other,anomaly"]
    for i in range(n):
        lines.append(f"2014-07-01 00:{i // 2:02d}:{(i % 2) * 30:02d},{i * 1.5},{-i},0")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_replay_rebased_renamed_and_valid(tmp_path: Path) -> None:
    path = _series_csv(tmp_path)
    prod = FakeProducer()
    stats = replay(
        prod, "t.readings", path, "nab-1", sensors={"value": "temp"}, rebase_to_now=True, now_ms=NOW_MS + 400
    )
    assert stats.readings_sent == stats.messages_sent == len(prod.sent) == 30 and prod.flushed == 1
    assert stats.sensors == ["temp"] and stats.rows_in_file == 30
    assert stats.last_ts_ms == NOW_MS  # rebased to now, whole seconds
    assert stats.first_ts_ms == NOW_MS - 29 * 30_000
    limits = Limits(sensors=("temp",), min_ts_ms=946_684_800_000, max_future_skew_ms=300_000)
    readings = []
    for topic, key, value in prod.sent:
        assert topic == "t.readings" and key == b"nab-1"
        [r] = validate(value, key, limits, NOW_MS)
        assert isinstance(r, Reading)
        readings.append(r)
    assert [r.values[0] for r in readings] == [i * 1.5 for i in range(30)]
    assert [r.ts_ms for r in readings] == [NOW_MS - (29 - i) * 30_000 for i in range(30)]


def test_replay_limit_respace_and_original_times(tmp_path: Path) -> None:
    path = _series_csv(tmp_path)
    prod = FakeProducer()
    stats = replay(prod, "t", path, "d", rebase_to_now=False, limit=5, step_ms=1000)
    assert stats.readings_sent == 5 and stats.shift_ms == 0
    first = _utc_ms("2014-07-01T00:00:00")
    assert (stats.first_ts_ms, stats.last_ts_ms) == (first, first + 4000)
    assert stats.sensors == ["value", "other"]
    with pytest.raises(ValueError):
        replay(prod, "t", path, "d", sensors={"missing": "x"})


def test_replay_paced(tmp_path: Path) -> None:
    path = _series_csv(tmp_path, n=4)  # 30 s apart
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    stats = replay(FakeProducer(), "t", path, "d", speed=60.0, clock=lambda: now[0], sleep=sleep)
    assert stats.readings_sent == 4
    assert sum(slept) == pytest.approx(1.5)  # 90 s of data at 60x
    now[0] = 0.0
    stats = replay(FakeProducer(), "t", path, "d", speed=1.0, duration_s=45.0, clock=lambda: now[0], sleep=sleep)
    assert stats.readings_sent == 2  # t=0 and t=30 s; the third is due at 60 s > 45 s
