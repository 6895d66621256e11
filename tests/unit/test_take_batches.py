"""``pipeline.delivery.take_batches``: the scoring agent's micro-batches, taken from its stream's buffer in
bulk, with what Faust's stream iterator gives each event (skip a stale one, track, stamp) and no ack, not
even of a skipped one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from time import monotonic
from typing import Any, cast

import faust
import pytest
from faust.types import TP, EventT
from faust.types.tuples import ConsumerMessage

from pipeline.app import App, make_faust_app
from pipeline.delivery import RawSchema, take_batches
from pipeline.settings import Settings

TOPIC = "readings"


class _Fixture:
    def __init__(self, tmp_path: Path) -> None:
        self.app: App = make_faust_app(Settings(data_dir=tmp_path), "take-batches")
        self.topic = self.app.topic(TOPIC, schema=RawSchema())
        self.stream = cast(faust.Stream[bytes], self.topic.stream())
        self.queue = self.stream.channel.queue  # type: ignore[attr-defined]

    async def start(self) -> None:
        # What a worker has once it runs: the monitor among the sensors (App.on_init_dependencies), the
        # topic subscribed (acks on) and the flow of messages on.
        self.app.sensors.add(self.app.monitor)
        self.app.topics.add(self.stream.channel)  # type: ignore[arg-type]
        await self.app.topics._update_indices()  # type: ignore[attr-defined]
        self.app.flow_control.resume()

    async def deliver(self, offset: int, *, partition: int = 0, generation: int | None = None) -> ConsumerMessage:
        """What the conductor does with a fetched message: one reference per channel, an event in the buffer."""
        message = ConsumerMessage(
            TOPIC,
            partition,
            offset,
            0.0,
            0,
            None,
            b"dev",
            b"%d" % offset,
            None,
            tp=TP(TOPIC, partition),
            generation_id=self.app.consumer_generation_id if generation is None else generation,
        )
        message.incref()
        self.queue.force_put_nowait(await self.topic.decode(message))
        return message

    def batches(self, max_: int, within: float) -> AsyncIterator[list[EventT]]:
        return take_batches(self.stream, max_, within).__aiter__()


def _offsets(batch: list[EventT]) -> list[int]:
    return [e.message.offset for e in batch]


def test_the_buffer_is_taken_in_order_up_to_the_batch_size_tracked_and_not_acknowledged(tmp_path: Path) -> None:
    asyncio.run(_in_order(tmp_path))


async def _in_order(tmp_path: Path) -> None:
    f = _Fixture(tmp_path)
    await f.start()
    messages = [await f.deliver(i, partition=i % 2) for i in range(5)]
    batches = f.batches(3, 0.01)
    before = monotonic()
    first, second = await batches.__anext__(), await batches.__anext__()
    await batches.aclose()  # type: ignore[attr-defined]
    assert _offsets(first) == [0, 1, 2] and _offsets(second) == [3, 4]
    assert [e.value for e in first + second] == [b"0", b"1", b"2", b"3", b"4"]
    consumer = f.app.consumer
    # Tracked, so that Faust's wait for acknowledgements (a rebalance, a stop) waits for them ...
    assert set(consumer.unacked) == set(messages)
    # ... and still held: the caller acknowledges once the state they advance is checkpointed.
    assert not any(m.acked for m in messages) and all(m.refcount == 1 for m in messages)
    # Faust's stalled-stream log reads each partition's last stream time.
    for p in (0, 1):
        assert before <= f.app.monitor.stream_inbound_time[TP(TOPIC, p)] <= monotonic()
    for m in messages:
        m.ack(consumer)
    assert not consumer.unacked and sorted(consumer._acked[TP(TOPIC, 0)]) == [0, 2, 4]  # type: ignore[attr-defined]


def test_events_from_before_a_rebalance_are_skipped_and_not_acknowledged(tmp_path: Path) -> None:
    asyncio.run(_stale(tmp_path))


async def _stale(tmp_path: Path) -> None:
    f = _Fixture(tmp_path)
    await f.start()
    consumer, tp = f.app.consumer, TP(TOPIC, 0)
    stale = await f.deliver(0, generation=f.app.consumer_generation_id - 1)
    fresh = await f.deliver(1)
    batches = f.batches(10, 0.01)
    batch = await batches.__anext__()
    assert _offsets(batch) == [1]
    # Never processed, never tracked, and unlike Faust's stream does, never acknowledged: its partition
    # is read again from the committed offset, which an acknowledgement would let pass it.
    assert not stale.acked and stale not in consumer.unacked
    assert not fresh.acked and fresh in consumer.unacked
    fresh.ack(consumer)
    assert sorted(consumer._acked[tp]) == [1]  # type: ignore[attr-defined]
    # With the flow suspended (a rebalance under way) everything in the buffer is stale. Faust's commit
    # timer goes on meanwhile: an event acknowledged here was committed unprocessed (session 22's loss).
    suspended = [await f.deliver(2), await f.deliver(3, partition=1)]
    f.app.flow_control.suspend()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(batches.__anext__(), 0.2)
    assert not any(m.acked for m in suspended)
    assert sorted(consumer._acked[tp]) == [1] and not consumer._acked[TP(TOPIC, 1)]  # type: ignore[attr-defined]
    await batches.aclose()  # type: ignore[attr-defined]


@pytest.mark.parametrize(("gap_s", "expected"), [(0.005, [[0, 1]]), (0.3, [[0], [1]])])
def test_a_batch_is_topped_up_until_its_window_ends(tmp_path: Path, gap_s: float, expected: list[list[int]]) -> None:
    asyncio.run(_window(tmp_path, gap_s, expected))


async def _window(tmp_path: Path, gap_s: float, expected: list[list[int]]) -> None:
    f = _Fixture(tmp_path)
    await f.start()
    batches = f.batches(10, 0.1)

    async def late() -> None:
        await f.deliver(0)
        await asyncio.sleep(gap_s)
        await f.deliver(1)

    feeder = asyncio.ensure_future(late())
    got = [_offsets(await batches.__anext__()) for _ in expected]
    await feeder
    await batches.aclose()  # type: ignore[attr-defined]
    assert got == expected


def test_after_a_quiet_spell_the_first_event_is_handed_over_at_once(tmp_path: Path) -> None:
    asyncio.run(_quiet(tmp_path))


async def _quiet(tmp_path: Path) -> None:
    f = _Fixture(tmp_path)
    await f.start()
    batches = f.batches(10, 0.5)
    waiting = asyncio.ensure_future(batches.__anext__())
    await asyncio.sleep(0.6)  # the window of the first batch passes with nothing in the buffer
    t0 = monotonic()
    await f.deliver(0)
    batch = await asyncio.wait_for(waiting, 1)
    # Not held for another window: the stream was idle, there is nothing to wait for.
    assert _offsets(batch) == [0] and monotonic() - t0 < 0.25
    await batches.aclose()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("thrown", "raised"),
    [
        (RuntimeError("delivery failed"), RuntimeError),
        # How a stopping agent ends its channel (faust's Actor.cancel): the end of the iteration, not the
        # RuntimeError an async generator makes of it (a graceful stop logged the agent as crashed).
        (StopAsyncIteration(), StopAsyncIteration),
    ],
)
def test_what_is_thrown_into_the_buffer_is_raised(tmp_path: Path, thrown: BaseException, raised: type) -> None:
    asyncio.run(_thrown(tmp_path, thrown, raised))


async def _thrown(tmp_path: Path, thrown: BaseException, raised: type) -> None:
    f = _Fixture(tmp_path)
    await f.start()
    await f.deliver(0)
    await f.deliver(1)
    batches = f.batches(10, 0.05)
    await batches.__anext__()
    f.queue._throw(thrown)

    async def until_error() -> Any:
        return await batches.__anext__()

    with pytest.raises(raised):
        await asyncio.wait_for(until_error(), 1)
