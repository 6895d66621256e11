"""The worker's Faust monitor (pipeline.app.StallMonitor): Faust's stall check and the lag gauge keep
their inputs, the per-message statistics nothing reads are not kept."""

from __future__ import annotations

import asyncio
from pathlib import Path
from time import monotonic
from types import SimpleNamespace
from typing import Any, cast

from faust.types import TP

from pipeline.app import StallMonitor, make_faust_app
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
