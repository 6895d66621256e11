"""InfluxDB writers and the retrying sink against a real InfluxDB 1.x (and a recording v2 endpoint)."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from connectors.influx import (
    InfluxQueryError,
    InfluxRejectedError,
    InfluxV1Writer,
    InfluxV2Writer,
    InfluxWriteError,
    RetryingSink,
    WriteBehindSink,
    count_points,
    format_line,
    influx_v1_query,
    influx_v1_query_async,
    make_writer,
)
from connectors.localstack import InfluxD, ServerStartError
from tests.conftest import TEST_DATABASE
from tests.servers import unavailable

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000


def _lines(measurement: str, n: int, start: int = 0) -> list[str]:
    return [
        format_line(measurement, {"device": f"d{i % 7}"}, {"score": i / 10, "n": i, "ok": True}, T0 + i)
        for i in range(start, start + n)
    ]


@pytest.fixture
def own_influxd(tmp_path: Path) -> Iterator[InfluxD]:
    """A private InfluxDB with database ``db``, which a test may stop and start again on the same port."""
    server = InfluxD(tmp_path / "influx")
    try:
        server.start()
    except ServerStartError as exc:
        unavailable("InfluxDB", exc)
    try:
        server.create_database("db")
        yield server
    finally:
        server.stop()


async def _until(predicate: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("gzip_body", [False, True])
def test_v1_writer_round_trip(influxd, unique_name, gzip_body):
    measurement = unique_name("scores")

    async def scenario() -> None:
        async with InfluxV1Writer(influxd.url, TEST_DATABASE, gzip_body=gzip_body) as writer:
            await writer.write(_lines(measurement, 250))
        series = await influx_v1_query_async(
            influxd.url, TEST_DATABASE, f"SELECT score, n, ok FROM \"{measurement}\" WHERE device = 'd3'"
        )
        assert series[0]["columns"] == ["time", "score", "n", "ok"]
        first = series[0]["values"][0]
        assert first == [T0 + 3, 0.3, 3, True]  # epoch=ms, float/int/bool kept

    asyncio.run(scenario())
    assert count_points(influxd.url, TEST_DATABASE, measurement) == 250
    assert count_points(influxd.url, TEST_DATABASE, measurement, field="n") == 250


def test_v1_writer_reports_status_and_missing_server(influxd, unique_name):
    async def scenario() -> None:
        async with InfluxV1Writer(influxd.url, "no_such_db") as writer:
            with pytest.raises(InfluxWriteError) as info:
                await writer.write(_lines(unique_name("m"), 1))
        assert info.value.status == 404 and "database not found" in info.value.body
        async with InfluxV1Writer("http://127.0.0.1:9", TEST_DATABASE, timeout_s=2) as writer:
            with pytest.raises(InfluxWriteError) as info:
                await writer.write(_lines("m", 1))
        assert info.value.status is None

    asyncio.run(scenario())


def test_sink_splits_batches_in_order(influxd, unique_name):
    measurement = unique_name("chunks")
    written: list[int] = []

    async def scenario() -> None:
        sink = RetryingSink(
            InfluxV1Writer(influxd.url, TEST_DATABASE),
            max_batch_lines=100,
            on_success=lambda n, seconds: written.append(n),
        )
        try:
            await sink.write(_lines(measurement, 250))
        finally:
            await sink.close()

    asyncio.run(scenario())
    assert written == [100, 100, 50]
    assert count_points(influxd.url, TEST_DATABASE, measurement) == 250


def test_sink_blocks_while_influx_is_down_and_loses_nothing(own_influxd, unique_name):
    """Stop InfluxDB, start a write, restart InfluxDB on the same port: the write retries and completes."""
    server = own_influxd
    measurement = unique_name("outage")
    retries: list[InfluxWriteError] = []
    successes: list[int] = []

    async def scenario() -> None:
        sink = RetryingSink(
            InfluxV1Writer(server.url, "db", timeout_s=2),
            base_delay_s=0.05,
            max_delay_s=0.2,
            on_retry=retries.append,
            on_success=lambda n, seconds: successes.append(n),
        )
        try:
            await sink.write(_lines(measurement, 100))  # keeps a pooled connection that the restart breaks
            await asyncio.to_thread(server.stop)
            task = asyncio.create_task(sink.write(_lines(measurement, 500, start=100)))
            await _until(lambda: len(retries) >= 3, timeout_s=10)
            assert not task.done(), "the write must block while InfluxDB is down"
            await asyncio.to_thread(server.start)
            await asyncio.wait_for(task, timeout=15)
        finally:
            await sink.close()

    asyncio.run(scenario())
    assert all(exc.status is None for exc in retries)  # connection refused, not an HTTP error
    assert successes == [100, 500]
    assert count_points(server.url, "db", measurement) == 600


def test_sink_rejects_bad_lines_quickly(influxd, unique_name):
    measurement = unique_name("bad")
    errors: list[InfluxWriteError] = []
    retries: list[InfluxWriteError] = []
    good = _lines(measurement, 4)
    bad = [f"{measurement},device=x this-is-not-a-field 1"]

    async def scenario() -> None:
        sink = RetryingSink(
            InfluxV1Writer(influxd.url, TEST_DATABASE),
            max_batch_lines=2,
            on_error=errors.append,
            on_retry=retries.append,
        )
        try:
            with pytest.raises(InfluxRejectedError) as info:
                await asyncio.wait_for(sink.write([*good[:2], *bad, good[2], good[3]]), timeout=5)
        finally:
            await sink.close()
        assert info.value.status == 400 and "unable to parse" in info.value.body
        # Only the rejected chunk (the bad line and its chunk mate) is handed back for dead-lettering.
        assert info.value.lines == [*bad, good[2]]

    started = time.monotonic()
    asyncio.run(scenario())
    assert time.monotonic() - started < 3
    assert len(errors) == 1 and not retries
    # The good chunks before and after the rejected one were written; InfluxDB 1.x also keeps the valid
    # lines of a partially bad chunk.
    assert count_points(influxd.url, TEST_DATABASE, measurement) == 4


def test_sink_gives_up_after_max_attempts():
    errors: list[InfluxWriteError] = []

    async def scenario() -> None:
        sink = RetryingSink(
            InfluxV1Writer("http://127.0.0.1:9", "db", timeout_s=1),
            base_delay_s=0.01,
            max_attempts=3,
            on_error=errors.append,
        )
        try:
            with pytest.raises(InfluxWriteError):
                await sink.write(["m v=1 1"])
        finally:
            await sink.close()

    asyncio.run(scenario())
    assert len(errors) == 1


def test_backoff_is_capped_full_jitter():
    sink = RetryingSink(InfluxV1Writer("http://127.0.0.1:9", "db"), base_delay_s=0.2, max_delay_s=5.0)
    assert all(0 <= sink.backoff_s(1) <= 0.2 for _ in range(100))
    assert all(0 <= sink.backoff_s(50) <= 5.0 for _ in range(100))
    assert max(sink.backoff_s(50) for _ in range(200)) > 2.5  # jitter spans the range
    assert sink.backoff_s(3, retry_after=1.5) == 1.5
    assert sink.backoff_s(3, retry_after=999) == 60.0


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _serve(handler: Handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/api/v2/write", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def test_v2_writer_against_recording_endpoint():
    """No InfluxDB 2.x here: check the request influxdb-client sends, and Retry-After handling."""
    requests: list[dict[str, object]] = []
    retries: list[InfluxWriteError] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        requests.append(
            {"query": dict(request.query), "auth": request.headers.get("Authorization"), "body": body.decode()}
        )
        if len(requests) == 1:
            return web.Response(status=503, headers={"Retry-After": "1"}, text='{"message":"busy"}')
        return web.Response(status=204)

    async def scenario() -> float:
        runner, url = await _serve(handler)
        try:
            writer = make_writer(2, url, "bucket-a", "org-a", "tok-123")
            assert isinstance(writer, InfluxV2Writer)
            sink = RetryingSink(writer, on_retry=retries.append)
            try:
                started = time.monotonic()
                await asyncio.wait_for(sink.write(_lines("m", 3)), timeout=10)
                return time.monotonic() - started
            finally:
                await sink.close()
        finally:
            await runner.cleanup()

    elapsed = asyncio.run(scenario())
    assert len(requests) == 2
    assert len(retries) == 1 and retries[0].status == 503 and retries[0].retry_after == 1.0
    assert elapsed >= 0.95  # Retry-After honoured
    last = requests[-1]
    assert last["query"] == {"org": "org-a", "bucket": "bucket-a", "precision": "ms"}
    assert last["auth"] == "Token tok-123"
    assert last["body"] == "\n".join(_lines("m", 3))


def test_v2_writer_maps_rejection():
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"code": "invalid", "message": "unable to parse"}, status=400)

    async def scenario() -> None:
        runner, url = await _serve(handler)
        try:
            sink = RetryingSink(InfluxV2Writer(url, "t", "o", "b"))
            try:
                with pytest.raises(InfluxRejectedError) as info:
                    await asyncio.wait_for(sink.write(["m v=1 1"]), timeout=5)
            finally:
                await sink.close()
        finally:
            await runner.cleanup()
        assert info.value.status == 400 and "unable to parse" in info.value.body

    asyncio.run(scenario())


def test_query_errors_are_raised(influxd):
    with pytest.raises(InfluxQueryError):
        influx_v1_query(influxd.url, TEST_DATABASE, "SELEKT nonsense")


def test_write_behind_returns_at_once_coalesces_and_waits_for_room_while_influx_is_down(own_influxd, unique_name):
    """InfluxDB stopped: submissions return at once until the buffer is full, then wait (backpressure);
    restarted: everything is written, what accumulated meanwhile in fewer requests, and ``written()``
    completes only then."""
    server = own_influxd
    measurement = unique_name("behind")
    requests: list[int] = []
    retries: list[InfluxWriteError] = []

    async def scenario() -> None:
        sink = WriteBehindSink(
            RetryingSink(
                InfluxV1Writer(server.url, "db", timeout_s=2),
                base_delay_s=0.05,
                max_delay_s=0.2,
                on_retry=retries.append,
                on_success=lambda n, seconds: requests.append(n),
            ),
            max_pending_lines=300,
        )
        try:
            await (await sink.submit(_lines(measurement, 100)))
            await asyncio.to_thread(server.stop)
            futures = [await sink.submit(_lines(measurement, 100, start=100 * k)) for k in (1, 2, 3)]
            assert sink.pending_lines == 300 and not any(f.done() for f in futures)
            fourth = asyncio.create_task(sink.submit(_lines(measurement, 100, start=400)))
            await _until(lambda: len(retries) >= 3, timeout_s=10)
            assert not fourth.done(), "a full buffer must make the caller wait"
            before_restart = sink.written()
            await asyncio.to_thread(server.start)
            futures.append(await asyncio.wait_for(fourth, timeout=15))
            await asyncio.wait_for(before_restart, timeout=15)
            assert all(f.done() for f in futures[:3])
            await asyncio.wait_for(sink.written(), timeout=15)
            assert sink.pending_lines == 0
        finally:
            await sink.close()

    asyncio.run(scenario())
    assert count_points(server.url, "db", measurement) == 500
    assert sum(requests) == 500
    # The three batches queued during the outage went out together.
    assert 300 in requests and len(requests) <= 3


def test_write_behind_hands_rejected_lines_over_and_writes_the_rest(influxd, unique_name):
    measurement = unique_name("behind_bad")
    rejected: list[str] = []
    good = _lines(measurement, 4)
    bad = [f"{measurement},device=x this-is-not-a-field 1"]

    async def on_rejected(exc: InfluxRejectedError) -> None:
        await asyncio.sleep(0.05)  # the submissions complete only after the dead letters are handled
        rejected.extend(exc.lines)

    async def scenario() -> None:
        sink = WriteBehindSink(RetryingSink(InfluxV1Writer(influxd.url, TEST_DATABASE)), on_rejected=on_rejected)
        try:
            first = await sink.submit(good[:2])
            second = await sink.submit([*bad, *good[2:]])
            await asyncio.wait_for(asyncio.gather(first, second), timeout=5)
            # Both submissions went out in one request, whose lines InfluxDB refused as a whole.
            assert rejected == [*good[:2], *bad, *good[2:]]
        finally:
            await sink.close()

    asyncio.run(scenario())
    assert count_points(influxd.url, TEST_DATABASE, measurement) == 4


def test_write_behind_fails_its_futures_and_later_submissions_when_a_write_fails_for_good():
    async def scenario() -> None:
        sink = WriteBehindSink(
            RetryingSink(InfluxV1Writer("http://127.0.0.1:9", "db", timeout_s=1), base_delay_s=0.01, max_attempts=2)
        )
        done = await sink.submit(["m v=1 1"])
        with pytest.raises(InfluxWriteError):
            await asyncio.wait_for(done, timeout=10)
        with pytest.raises(InfluxWriteError):
            await sink.written()
        with pytest.raises(InfluxWriteError):
            await sink.submit(["m v=2 2"])
        await sink.close()  # nothing left to write: it does not raise again

    asyncio.run(scenario())
