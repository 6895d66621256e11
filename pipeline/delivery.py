"""The hand-over of fetched messages to Faust's streams, made cheaper per message; semantics unchanged.

Faust's fetch loop (``Consumer._drain_messages``) delivers every message with
``await self.wait_first(callback(message), self.suspend_flow.wait())``: the delivery races a rebalance, so
that a delivery blocked on a full stream buffer is abandoned when the flow is suspended. ``wait_first``
makes four tasks and an ``asyncio.wait`` for it (~24 us), and a delivery into a full buffer adds a task of
its own. Two changes take that off the common path:

- :class:`Consumer` (:class:`SteppedWaitFirst`) first steps the delivery by hand. One that finishes without
  suspending ends exactly as it would have in ``wait_first``, where its task, created first, also finished
  in its first step. One that suspends (flow control, a full buffer, a busy producer) goes on, from where
  it stopped, inside the unchanged ``wait_first``: the rebalance still interrupts it.
- :class:`RefillQueue`, the streams' buffer, lets a fetch loop blocked on it in again only once it has
  drained to its pressure-drop size, so that a backlog refills it by whole batches on the fast path
  instead of one blocked delivery per freed slot.

Measured (``iotad bench throughput --devices 100``, single readings): 13,400-14,000 readings/s against
9,800-10,400 without them, same machine, alternating runs.

And one change that is about latency, not cost: while a partition is left out of fetching because its
stream buffer is full, :class:`Consumer` waits at most :data:`REFETCH_S` for records (Faust asks for 1 s).
A wait only fetches the partitions that were active when it began, so a partition re-enabled during it
(its buffer drained) sat out the rest of the second with its records already fetched: at the end of a
backlog, and after every burst that filled the buffer (a synchronised fleet), the worker idled for up to
a second. When every assigned partition is left out, Faust sleeps a whole second instead of waiting;
this consumer sleeps :data:`REFETCH_S`. With no partition left out (an idle or a paced worker) Faust's
wait is kept, so an idle worker does not poll.

Two smaller per-message costs go too (microbenchmarks, this 2-core machine): :class:`StallMonitor` keeps
none of the per-message statistics of Faust's monitor, which nothing here reads (~2.3 us), and
:class:`RawSchema` hands the readings' bytes to their events without the codec registry (~1.5 us).

And the scoring agent takes its micro-batches with :func:`take_batches` instead of ``Stream.take_events``:
from the stream's buffer in bulk, with what the stream's iterator gives each event but without a turn of
the event loop, a processor call and an acknowledgement per event. Worker CPU per single reading, medians
of alternating drains of 100,000 readings: 81 -> 69 us at 100 devices (9 pairs), 73 -> 70 us at 10,000 (5).
The alerter's agents take theirs the same way, and :func:`acknowledge` them once they are handled: unlike
``take_events``, :func:`take_batches` never acknowledges an event it skips in a rebalance, which would let
Faust commit past it unprocessed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine, Generator, Iterable
from time import monotonic
from typing import Any, cast

import faust
from faust.sensors.monitor import Monitor
from faust.serializers.schemas import Schema
from faust.transport.consumer import RecordMap
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, AppT, ChannelT, EventT, Message, StreamT
from mode import Service
from mode.services import WaitArgT, WaitResults
from mode.utils.queues import ThrowableQueue
from mode.utils.times import Seconds


class _Started:
    """A coroutine already stepped once by hand, awaitable from where it stopped: the part of
    ``yield from`` that comes after its first ``send``. Values sent and exceptions thrown in (a
    cancellation included) go through to the coroutine."""

    __slots__ = ("coro", "yielded")

    def __init__(self, coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
        self.coro, self.yielded = coro, yielded

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, yielded = self.coro, self.yielded
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # re-raised in the coroutine, where it belongs
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


class SteppedWaitFirst(Service):
    """``wait_first`` that steps its first coroutine by hand before racing it (see the module)."""

    # ``Seconds | None``: mode annotates ``Seconds`` but its default, "wait forever", is None.
    async def wait_first(self, *coros: WaitArgT, timeout: Seconds | None = None) -> WaitResults:
        first = coros[0] if coros else None
        if (
            timeout is not None
            or not asyncio.iscoroutine(first)
            or self._stopped.is_set()
            or self._crashed.is_set()
            or not self.may_step()
        ):
            return await super().wait_first(*coros, timeout=cast(Seconds, timeout))
        try:
            yielded = first.send(None)
        except StopIteration as done:
            _close(coros[1:])
            return WaitResults([first], [done.value], False)
        except BaseException:
            _close(coros[1:])
            raise
        return await super().wait_first(_Started(first, yielded), *coros[1:], timeout=cast(Seconds, timeout))

    def may_step(self) -> bool:
        """Whether to step by hand now (mode's own ``wait_first`` otherwise)."""
        return True


def _close(waitables: tuple[WaitArgT, ...]) -> None:
    """Close the coroutines the race no longer needs (never started: closing them runs nothing)."""
    for w in waitables:
        if asyncio.iscoroutine(w):
            w.close()


REFETCH_S = 0.02
"""Longest wait for records while a partition is left out of it (see the module): about the most that
partition waits once its buffer has drained."""


class Consumer(SteppedWaitFirst, faust_aiokafka.Consumer):
    async def _wait_next_records(self, timeout: float) -> tuple[RecordMap | None, set[TP] | None]:
        if self._buffered_partitions:
            timeout = min(timeout, REFETCH_S)
            if self.flow_active and not self.app.client_only and not self._get_active_partitions():
                await self.sleep(timeout)
                return {}, set()
        return await super()._wait_next_records(timeout)

    def may_step(self) -> bool:
        # Not during a rebalance: Faust resumes the stream partitions before it seeks them back to the
        # committed offsets, and deliveries of records fetched in between move its read offset past
        # records it then never delivers (pipeline/continuity.py repairs such holes). Delivered inline,
        # a whole fetched chunk got through in that window (holes of ~150 records per partition after
        # each restart in `iotad bench faults --scenarios kill`); at mode's pace, rarely one record.
        return not self.app.rebalancing


class RefillQueue(ThrowableQueue[Any]):
    """A stream buffer that, once full, lets blocked producers in again only when it has drained to its
    pressure-drop size (where Faust also resumes fetching), not one slot at a time.

    Draining a backlog keeps the buffer full. With a plain queue every slot the stream frees wakes the
    fetch loop for one message, whose delivery then blocks again: each message pays the blocked path
    (a task for the ``put`` and the race in ``wait_first``, six tasks in all). Here the loop blocks once
    and then refills the buffer by a whole batch, on the fast path. The bound is unchanged.
    """

    def _wakeup_next(self, waiters: Any) -> None:
        if waiters is self._putters and self.qsize() > self.pressure_drop_size:
            return
        super()._wakeup_next(waiters)  # type: ignore[misc]


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer


class StallMonitor(Monitor):
    """Faust's monitor without its per-message statistics, which nothing here reads (Faust's web views
    are off; iotad's metrics are its own): ~2.3 us less per message through the sensor hooks (3.6 -> 1.3).

    Kept: the time each partition's stream last took an event, which Faust's consumer reads to log a
    stream that stopped processing (``verify_event_path``), and what Faust writes into the monitor
    directly, not through the hooks: committed offsets (``pipeline.lag`` reads them) and end offsets.
    """

    def on_message_in(self, tp: TP, offset: int, message: Message) -> None:
        pass

    def on_stream_event_in(self, tp: TP, offset: int, stream: StreamT, event: EventT) -> None:
        self.stream_inbound_time[tp] = monotonic()

    def on_stream_event_out(
        self, tp: TP, offset: int, stream: StreamT, event: EventT, state: dict[str, Any] | None = None
    ) -> None:
        pass

    def on_message_out(self, tp: TP, offset: int, message: Message) -> None:
        pass


class RawSchema(Schema):
    """Keys and values handed over as the message's own bytes, without the codec registry (~1.5 us a
    message: 3.3 -> 1.8 us to decode one into an event). What Faust's ``raw`` serializer gives for
    ``bytes`` keys and values, the same objects (None stays None), for topics whose agents read the bytes."""

    def __init__(self) -> None:
        super().__init__(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    def loads_key(self, app: AppT, message: Message, **_: Any) -> bytes | None:
        return message.key

    def loads_value(self, app: AppT, message: Message, **_: Any) -> bytes | None:
        return message.value


async def take_batches(stream: faust.Stream[Any], max_: int, within: float) -> AsyncIterator[list[EventT]]:
    """Micro-batches of the events delivered to ``stream``'s channel, taken from its buffer in bulk.

    What ``Stream.take_events`` yields, without its per-event machinery: there every event goes through
    the stream's iterator (a turn of the event loop, a processor that copies it into the batch, task-local
    ``current_event`` bookkeeping) and is acknowledged by the stream once the next batch is asked for.
    Here a batch is whatever the buffer holds, topped up until ``within`` seconds after the previous batch
    was handed over, up to ``max_``; each event gets what the stream's iterator gives it before it is
    processed:

    - an event delivered before a rebalance (an older consumer generation, or while the flow is
      suspended) is skipped, and, unlike the stream, not acknowledged: its partition is read again from
      the committed offset, and an acknowledgement would let that offset pass it. Faust's commit timer
      goes on during the rebalance, so a batch being topped up when the partitions were revoked was
      committed unprocessed, and the partition's next owner started after it (7 readings lost in a
      ``bench.faults`` rebalance, session 22);
    - each message is tracked as unacknowledged (Faust waits for those on a rebalance or stop);
    - each partition's stream time is stamped (Faust's log of a stalled stream reads it).

    Events are *not* acknowledged here: the conductor's one reference to each message is held by the
    caller, who acknowledges it (``message.ack``) once it has done what it must before the offset may be
    committed.
    """
    app, channel = stream.app, cast(ChannelT, stream.channel)
    queue = channel.queue
    consumer = app.consumer
    on_event_in = stream._on_stream_event_in
    started = await stream.maybe_start()
    try:
        while not stream.should_stop:
            # The window opens when the last batch is done, as take_events' does: after a quiet spell the
            # first event goes at once, and each event waits at most ``within``.
            deadline = monotonic() + within
            events = [await queue.get()]
            while len(events) < max_:
                if not queue.empty():
                    events.append(queue.get_nowait())
                    continue
                remaining = deadline - monotonic()
                if remaining <= 0:
                    break
                try:
                    events.append(await asyncio.wait_for(queue.get(), remaining))
                except TimeoutError:
                    break
            batch = _admit(app, consumer, events)
            if batch:
                stamped: dict[TP, EventT] = {e.message.tp: e for e in batch}
                for tp, event in stamped.items():
                    on_event_in(tp, event.message.offset, stream, event)
                stream.events_total += len(batch)
                yield batch
    except StopAsyncIteration:  # how a stopping agent ends its channel; raised on, it would be a RuntimeError
        return
    finally:
        stream._channel_stop_iteration(channel)
        if started:
            await stream.stop()


def acknowledge(app: AppT, events: Iterable[EventT]) -> None:
    """Acknowledge events :func:`take_batches` handed out, once what they cause is written: Faust may then
    commit their offsets."""
    consumer = app.consumer
    for event in events:
        event.message.ack(consumer)


def _admit(app: AppT, consumer: Any, events: list[EventT]) -> list[EventT]:
    """The events of the current consumer generation, tracked as unacknowledged; the others dropped, neither
    tracked nor acknowledged (read again from the committed offset)."""
    if not app.flow_control.is_active():
        return []
    generation = app.consumer_generation_id
    acking = app.topics.acking_topics
    admitted = []
    for event in events:
        message = event.message
        if message.generation_id != generation:
            continue
        if not message.tracked and message.topic in acking:
            message.tracked = True
            consumer.track_message(message)
        admitted.append(event)
    return admitted
