"""The stepped ``wait_first`` of the worker's Faust consumer (pipeline.delivery): same outcomes as mode's."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from faust.types import TP
from mode import Service
from mode.services import WaitResults
from mode.utils.queues import FlowControlEvent, ThrowableQueue

from pipeline.app import App
from pipeline.delivery import REFETCH_S, Consumer, RefillQueue, SteppedWaitFirst, Transport


class _Plain(Service):
    pass


class _Stepped(SteppedWaitFirst, Service):
    pass


async def _tasks_made_by(coro_fn: Callable[[], Awaitable[WaitResults]]) -> tuple[WaitResults, int]:
    """Run ``coro_fn()`` and count the tasks created meanwhile."""
    made = 0
    loop = asyncio.get_running_loop()
    factory = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        nonlocal made
        made += 1
        return asyncio.Task(coro, loop=loop, **kw)

    loop.set_task_factory(counting)
    try:
        return await coro_fn(), made
    finally:
        loop.set_task_factory(factory)


def test_a_delivery_that_does_not_suspend_completes_inline_and_closes_the_race() -> None:
    asyncio.run(_a_delivery_that_does_not_suspend_completes_inline_and_closes_the_race())


async def _a_delivery_that_does_not_suspend_completes_inline_and_closes_the_race() -> None:
    suspend = asyncio.Event()
    delivered: list[int] = []

    async def deliver(n: int) -> int:
        delivered.append(n)
        return n * 2

    svc = _Stepped()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unawaited suspend.wait() would warn "never awaited"
        res, made = await _tasks_made_by(lambda: svc.wait_first(deliver(3), suspend.wait()))
    assert (res.results, res.stopped, delivered, made) == ([6], False, [3], 0)
    # mode's own makes four tasks for the same call, with the same result
    plain, made_plain = await _tasks_made_by(lambda: _Plain().wait_first(deliver(4), suspend.wait()))
    assert (plain.results, plain.stopped, made_plain) == ([8], False, 4)


@pytest.mark.parametrize("service", [_Plain, _Stepped])
def test_a_blocked_delivery_is_abandoned_when_the_flow_is_suspended(service: type[Service]) -> None:
    asyncio.run(_a_blocked_delivery_is_abandoned_when_the_flow_is_suspended(service))


async def _a_blocked_delivery_is_abandoned_when_the_flow_is_suspended(service: type[Service]) -> None:
    room, suspend = asyncio.Event(), asyncio.Event()
    steps: list[str] = []

    async def deliver() -> str:
        steps.append("started")
        try:
            await room.wait()  # a full stream buffer
        except asyncio.CancelledError:
            steps.append("cancelled")
            raise
        steps.append("delivered")
        return "ok"

    race = asyncio.ensure_future(service().wait_first(deliver(), suspend.wait()))
    await asyncio.sleep(0.01)
    assert steps == ["started"] and not race.done()
    suspend.set()
    res = await asyncio.wait_for(race, 1)
    await asyncio.sleep(0)  # let the cancelled delivery run its handler
    assert res.results == [True] and steps == ["started", "cancelled"]
    room.set()
    await asyncio.sleep(0.01)
    assert steps == ["started", "cancelled"]


@pytest.mark.parametrize("service", [_Plain, _Stepped])
def test_a_blocked_delivery_goes_on_from_where_it_stopped(service: type[Service]) -> None:
    asyncio.run(_a_blocked_delivery_goes_on_from_where_it_stopped(service))


async def _a_blocked_delivery_goes_on_from_where_it_stopped(service: type[Service]) -> None:
    room, suspend = asyncio.Event(), asyncio.Event()
    steps: list[str] = []

    async def deliver() -> str:
        steps.append("a")
        await room.wait()
        steps.append("b")
        await asyncio.sleep(0)  # a bare yield to the loop on the way
        steps.append("c")
        value = await asyncio.get_running_loop().run_in_executor(None, lambda: 41)
        return f"{value + 1}"

    race = asyncio.ensure_future(service().wait_first(deliver(), suspend.wait()))
    await asyncio.sleep(0.01)
    room.set()
    res = await asyncio.wait_for(race, 1)
    assert res.results == ["42"] and not res.stopped and steps == ["a", "b", "c"]


@pytest.mark.parametrize("suspends", [False, True])
def test_a_failing_delivery_raises_its_error(suspends: bool) -> None:
    asyncio.run(_a_failing_delivery_raises_its_error(suspends))


async def _a_failing_delivery_raises_its_error(suspends: bool) -> None:
    async def deliver() -> None:
        if suspends:
            await asyncio.sleep(0)
        raise ValueError("bad message")

    suspend = asyncio.Event()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="bad message"):
            await _Stepped().wait_first(deliver(), suspend.wait())


def test_a_stopped_service_keeps_modes_answer() -> None:
    asyncio.run(_a_stopped_service_keeps_modes_answer())


async def _a_stopped_service_keeps_modes_answer() -> None:
    svc = _Stepped()
    await svc.stop()

    async def deliver() -> int:
        return 1

    res = await svc.wait_first(deliver())
    assert res.stopped and res.results == []


def test_the_worker_app_uses_the_stepped_consumer() -> None:
    app = App("delivery-test", broker="kafka://127.0.0.1:9", web_enabled=False)
    assert isinstance(app.transport, Transport)
    assert issubclass(app.transport.Consumer, Consumer)


def test_a_full_buffer_lets_its_producer_in_again_only_at_the_pressure_drop_size() -> None:
    asyncio.run(_refill(RefillQueue, expect_release_at=40))  # pressure_drop_size of 100 = 40
    asyncio.run(_refill(ThrowableQueue, expect_release_at=99))  # a plain queue: at the first free slot


async def _refill(queue_type: type[ThrowableQueue[Any]], expect_release_at: int) -> None:
    q = queue_type(maxsize=100, flow_control=FlowControlEvent(initially_suspended=False))
    for i in range(100):
        q.put_nowait(i)
    blocked = asyncio.ensure_future(q.put(100))
    await asyncio.sleep(0)
    released_at = None
    while q.qsize() and released_at is None:
        q.get_nowait()
        await asyncio.sleep(0)
        if blocked.done():
            released_at = q.qsize() - 1  # the size when it was let in
        assert q.qsize() <= 100
    assert released_at == expect_release_at
    # what came in is still in order behind the rest
    rest = [q.get_nowait() for _ in range(q.qsize())]
    assert rest == list(range(100 - expect_release_at, 101))


def test_a_cleared_buffer_cancels_its_blocked_producers() -> None:
    async def go() -> None:
        q = RefillQueue(maxsize=2, flow_control=FlowControlEvent(initially_suspended=False))
        q.put_nowait(1)
        q.put_nowait(2)
        blocked = asyncio.ensure_future(q.put(3))
        await asyncio.sleep(0)
        q.clear()  # a rebalance: Faust clears the stream buffers on resume
        with pytest.raises(asyncio.CancelledError):
            await blocked
        assert q.qsize() == 0

    asyncio.run(go())


def test_no_stepping_while_the_consumer_says_not_to() -> None:
    class Rebalancing(_Stepped):
        def may_step(self) -> bool:
            return False

    async def deliver() -> int:
        return 5

    async def go() -> None:
        suspend = asyncio.Event()
        res, made = await _tasks_made_by(lambda: Rebalancing().wait_first(deliver(), suspend.wait()))
        assert (res.results, made) == ([5], 4)  # mode's own race

    asyncio.run(go())


def test_the_worker_consumer_does_not_step_during_a_rebalance() -> None:
    app = App("delivery-test", broker="kafka://127.0.0.1:9", web_enabled=False)
    consumer = app.consumer  # built by Faust, through the app's transport
    assert isinstance(consumer, Consumer) and consumer.may_step()
    app.on_rebalance_start()
    assert not consumer.may_step()
    app.on_rebalance_end()
    assert consumer.may_step()


class _FetchedRecords:
    """The consumer thread's side of a wait, on a virtual clock: records come back at once for the
    partitions asked for that hold some, otherwise the wait runs out its whole timeout."""

    def __init__(self, held: dict[TP, list[str]], on_first_wait: Callable[[], None]) -> None:
        self.held, self.on_first_wait = held, on_first_wait
        self.waited_s, self.calls = 0.0, 0

    async def __call__(self, active_partitions: set[TP] | None, timeout: float) -> dict[TP, list[str]]:
        active = None if active_partitions is None else set(active_partitions)  # aiokafka takes them as they are now
        self.calls += 1
        if self.calls == 1:
            self.on_first_wait()  # the stream drains its buffer while the wait is under way
        got = {tp: self.held.pop(tp) for tp in list(self.held) if active is None or tp in active}
        if not got:
            self.waited_s += timeout
        return got


def _fetching(
    assigned: set[TP], left_out: set[TP], held: dict[TP, list[str]], *, drain_during_first_wait: bool = False
) -> tuple[Consumer, _FetchedRecords]:
    """The worker's consumer with ``assigned`` partitions, ``left_out`` of them with a full stream buffer,
    and the virtual consumer thread holding ``held``; optionally the buffers drain during the first wait."""
    consumer = App("delivery-test", broker="kafka://127.0.0.1:9", web_enabled=False).consumer
    assert isinstance(consumer, Consumer)
    consumer._set_active_tps(assigned)
    for tp in left_out:
        consumer.on_buffer_full(tp)

    def drain() -> None:
        for tp in left_out if drain_during_first_wait else ():
            consumer.on_buffer_drop(tp)

    fetched = _FetchedRecords(held, on_first_wait=drain)
    consumer._getmany = fetched  # type: ignore[method-assign]
    return consumer, fetched


def test_a_partition_reenabled_during_a_wait_is_fetched_by_the_next_one() -> None:
    """Faust's fetch loop waits up to 1 s on the partitions active when the wait began; a partition whose
    buffer drained meanwhile waited that out with its records already fetched (the end of a backlog)."""

    async def go() -> None:
        full, other = TP("readings", 2), TP("readings", 0)
        consumer, fetched = _fetching({full, other}, {full}, {full: ["r1", "r2"]}, drain_during_first_wait=True)
        for _ in range(10):
            records, _active = await consumer._wait_next_records(1.0)
            if records:
                break
        assert records == {full: ["r1", "r2"]}
        assert fetched.calls == 2 and fetched.waited_s <= REFETCH_S < 1.0

    asyncio.run(go())


def test_a_consumer_with_every_partition_left_out_sleeps_briefly_not_a_second() -> None:
    async def go() -> None:
        only = TP("readings", 1)
        consumer, fetched = _fetching({only}, {only}, {only: ["r"]})
        slept: list[float] = []

        async def sleep(s: float) -> None:
            slept.append(s)

        consumer.sleep = sleep  # type: ignore[method-assign,assignment]
        assert await consumer._wait_next_records(1.0) == ({}, set())
        assert slept == [REFETCH_S] and fetched.calls == 0  # nothing is fetched for a partition left out
        consumer.on_buffer_drop(only)
        assert await consumer._wait_next_records(1.0) == ({only: ["r"]}, {only})

    asyncio.run(go())


def test_with_no_partition_left_out_the_wait_is_fausts_own() -> None:
    """An idle worker is not made to poll: only a partition left out of a wait can be re-enabled during it."""

    async def go() -> None:
        tp = TP("readings", 3)
        consumer, fetched = _fetching({tp}, set(), {})
        assert await consumer._wait_next_records(1.0) == ({}, {tp})
        assert fetched.waited_s == 1.0

    asyncio.run(go())
