"""The per-message savings of pipeline.delivery: the monitor (``StallMonitor``) keeps what Faust's stall check
and the lag gauge read and no per-message statistics; ``RawSchema`` events carry the messages' own bytes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from time import monotonic
from types import SimpleNamespace
from typing import Any, cast

import pytest
from faust.serializers.schemas import Schema
from faust.types import TP, EventT
from faust.types.tuples import Message

from pipeline.app import make_faust_app
from pipeline.delivery import RawSchema, StallMonitor
from pipeline.lag import sample_lag
from pipeline.settings import Settings


def test_every_iotad_faust_app_gets_the_stall_monitor(tmp_path: Path) -> None:
    app = make_faust_app(Settings(data_dir=tmp_path), "monitor-test")
    assert isinstance(app.monitor, StallMonitor)


def test_a_stream_event_stamps_its_partition_and_messages_are_not_counted() -> None:
    monitor = StallMonitor()
    tp, message, stream = TP("readings", 3), SimpleNamespace(time_in=None), cast(Any, object())
    before = monotonic()
    monitor.on_message_in(tp, 7, cast(Any, message))
    monitor.on_stream_event_in(tp, 7, stream, cast(Any, None))
    monitor.on_stream_event_out(tp, 7, stream, cast(Any, None))
    monitor.on_message_out(tp, 7, cast(Any, message))
    # Faust's consumer logs a partition whose stream took no event for a while: the stamp must move.
    assert before <= monitor.stream_inbound_time[tp] <= monotonic()
    assert monitor.messages_received_total == 0 and monitor.events_total == 0
    assert not monitor.tp_read_offsets and message.time_in is None


class _Consumer:
    """The two things ``sample_lag`` asks a Faust consumer besides the committed offsets."""

    def __init__(self, tp: TP, highwater: int, position: int) -> None:
        self.tp, self._highwater, self._position = tp, highwater, position

    def assignment(self) -> set[TP]:
        return {self.tp}

    def highwater(self, tp: TP) -> int:
        return self._highwater

    async def position(self, tp: TP) -> int:
        return self._position


def test_the_lag_gauge_reads_the_offsets_faust_commits_through_the_monitor(tmp_path: Path) -> None:
    app = make_faust_app(Settings(data_dir=tmp_path), "monitor-lag")
    tp = TP("readings", 1)
    app.consumer = cast(Any, _Consumer(tp, highwater=50, position=10))
    app.monitor.on_tp_commit({tp: 42})  # what Faust's Consumer.commit calls once offsets are committed
    lags = asyncio.run(sample_lag(app, {"readings"}))
    assert lags == {("readings", 1): 8}  # 50 - 42, not 50 - 10 (the position before any commit)


@pytest.mark.parametrize(
    ("key", "value"), [(b"pump-17", b'{"v": 1}'), (b"", b""), (None, None), (b"\xff", b"\x00\xfe")]
)
def test_raw_schema_events_carry_what_the_raw_codec_gives(
    tmp_path: Path, key: bytes | None, value: bytes | None
) -> None:
    app = make_faust_app(Settings(data_dir=tmp_path), "schema-test")
    codec: Schema = Schema(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    message = Message("readings", 0, 5, 0.0, 0, None, key, value, None, None, tp=TP("readings", 0))
    by_codec, by_raw = asyncio.run(_decode(app, message, codec)), asyncio.run(_decode(app, message, RawSchema()))
    assert (by_raw.key, by_raw.value) == (by_codec.key, by_codec.value) == (key, value)
    assert by_raw.key is key and by_raw.value is value and by_raw.message is message


async def _decode(app: Any, message: Message, schema: Schema) -> EventT:
    """The event Faust's conductor makes of ``message`` for a topic with ``schema``."""
    return await schema.compile(app)(message)
