"""InfluxDB sink: line-protocol formatting, v1/v2 writers, a retrying sink, its write-behind buffer and v1
query helpers.

Scores are formatted straight to line protocol (no influxdb_client Point per row: this is the hot path).
Writers send one batch and raise on any failure. RetryingSink turns failures into blocking retries, which is
the pipeline's backpressure: Kafka offsets are committed only after a write returns, so a batch is either
written, rejected as bad data (the caller dead-letters it) or still being retried. WriteBehindSink runs
those writes in the background, bounded: the caller goes on until its buffer is full, and waits for
``written()`` before committing.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import email.utils
import gzip
import json
import logging
import math
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from numbers import Integral, Real
from types import TracebackType
from typing import Any, Self

import aiohttp
import msgspec

log = logging.getLogger(__name__)

FieldValue = float | int | bool | str | None

_ESCAPE_MEASUREMENT = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})
_ESCAPE_KEY = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})
_ESCAPE_STRING = str.maketrans({'"': r"\"", "\\": r"\\"})
_json_encode = msgspec.json.Encoder().encode


@lru_cache(maxsize=1024)
def escape_measurement(name: str) -> str:
    """Escape commas, spaces and control characters in a measurement name."""
    return name.translate(_ESCAPE_MEASUREMENT)


@lru_cache(maxsize=65536)
def escape_tag(value: str) -> str:
    """Escape a tag key or value; cached because device ids repeat on every row."""
    escaped = value.translate(_ESCAPE_KEY)
    # A trailing backslash would escape the separator after it; influxdb-client appends a space too.
    return escaped + " " if escaped.endswith("\\") else escaped


@lru_cache(maxsize=1024)
def escape_field_key(key: str) -> str:
    """Escape commas, equals signs, spaces and control characters in a field key."""
    return key.translate(_ESCAPE_KEY)


def _format_float(value: float) -> str | None:
    if not math.isfinite(value):
        return None  # InfluxDB cannot store NaN/inf; the field is skipped like influxdb-client does.
    text = repr(value)
    return text[:-2] if text.endswith(".0") else text


def format_field_value(value: FieldValue) -> str | None:
    """Line-protocol text of a field value, or None when the field must be skipped (None, NaN, inf)."""
    if type(value) is float:
        return _format_float(value)
    if type(value) is int:
        return f"{value}i"
    if type(value) is bool:
        return "true" if value else "false"
    if type(value) is str:
        return '"' + value.translate(_ESCAPE_STRING) + '"'
    if value is None:
        return None
    # Subclasses and numpy scalars: slower checks, same rules.
    item = getattr(value, "item", None)
    if callable(item):  # numpy scalar (np.bool_ is not a bool) -> Python scalar
        return format_field_value(item())
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Integral):
        return f"{int(value)}i"
    if isinstance(value, Real):
        return _format_float(float(value))
    if isinstance(value, str):
        return '"' + value.translate(_ESCAPE_STRING) + '"'
    raise TypeError(f"unsupported field value type {type(value).__name__}")


def format_floats(values: Sequence[float]) -> list[str] | None:
    """``[format_field_value(v) for v in values]`` in one C call, or None where that is not guaranteed
    (the caller then formats value by value).

    msgspec writes the same shortest round-trip digits as ``repr`` several times faster; it differs
    only in notation outside ``1e-4 <= |v| < 1e16`` (``1e16`` vs ``1e+16``, ``0.00001`` vs ``1e-05``),
    writes ``null`` for NaN/inf, and also accepts other types. So the text must be plain positional
    numbers with one ``.`` each (ints have none; anything else leaves letters, quotes or brackets) and
    no ``0.0000`` (which also refuses a few harmless values such as 10.00001, for simplicity).
    """
    if not values:
        return []
    try:
        body = _json_encode(values)[1:-1]
    except TypeError:
        return None
    if body.translate(None, b"0123456789.,-") or body.count(b".") != len(values) or b"0.0000" in body:
        return None
    # Within a JSON array of numbers ".0," only occurs at the end of an element; line protocol drops it.
    return (body + b",").replace(b".0,", b",").decode().split(",")[:-1]


def line_head(measurement: str, tags: Mapping[str, str]) -> str:
    """The escaped measurement and tag set of a line; tags with an empty value are skipped because
    InfluxDB rejects them."""
    parts = [escape_measurement(measurement)]
    for key, value in tags.items():
        if value:
            parts.append(f",{escape_tag(key)}={escape_tag(value)}")
    return "".join(parts)


def format_line(measurement: str, tags: Mapping[str, str], fields: Mapping[str, FieldValue], ts_ms: int) -> str:
    """One line of line protocol with a millisecond timestamp; "" when no field has a value.

    Tags are written in the given order (pass them sorted by key, as InfluxDB prefers); tags with an
    empty value are skipped.
    """
    field_parts = []
    for key, raw in fields.items():
        text = format_field_value(raw)
        if text is not None:
            field_parts.append(f"{escape_field_key(key)}={text}")
    if not field_parts:
        return ""
    return f"{line_head(measurement, tags)} {','.join(field_parts)} {int(ts_ms)}"


def quote_ident(name: str) -> str:
    """Double-quote an InfluxQL identifier."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


class InfluxWriteError(Exception):
    """A write failed: status is the HTTP status, or None when no response came (connection, timeout)."""

    def __init__(self, status: int | None, body: str, retry_after: float | None = None) -> None:
        super().__init__(f"InfluxDB write failed ({status if status is not None else 'no response'}): {body}")
        self.status = status
        self.body = body
        self.retry_after = retry_after


class InfluxRejectedError(InfluxWriteError):
    """InfluxDB refused the data itself (400/422); retrying cannot help, lines holds what to dead-letter."""

    def __init__(self, status: int | None, body: str, lines: Sequence[str]) -> None:
        super().__init__(status, body)
        self.lines = list(lines)


class InfluxQueryError(RuntimeError):
    """An InfluxQL query failed."""


def parse_retry_after(header: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent/invalid."""
    if not header:
        return None
    header = header.strip()
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _short(body: str | bytes | None, limit: int = 500) -> str:
    if body is None:
        return ""
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    return text.strip()[:limit]


class InfluxWriter(abc.ABC):
    """Sends one batch of lines; raises InfluxWriteError on any failure, never retries."""

    @abc.abstractmethod
    async def write(self, lines: Sequence[str]) -> None:
        """Write the lines (millisecond timestamps) or raise InfluxWriteError."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class InfluxV1Writer(InfluxWriter):
    """InfluxDB 1.x ``/write`` API (also the v1-compatibility API of 2.x/3.x when given a token)."""

    def __init__(
        self,
        url: str,
        database: str,
        *,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        timeout_s: float = 10.0,
        gzip_body: bool = False,
    ) -> None:
        self._url = url.rstrip("/") + "/write"
        self._params = {"db": database, "precision": "ms"}
        self._auth = aiohttp.BasicAuth(username, password or "") if username else None
        self._headers = {"Content-Type": "text/plain; charset=utf-8"}
        if token:
            self._headers["Authorization"] = f"Token {token}"
        if gzip_body:
            self._headers["Content-Encoding"] = "gzip"
        self._gzip = gzip_body
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        # Created lazily: a ClientSession belongs to the event loop that is running when it is made.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout, auth=self._auth)
        return self._session

    async def write(self, lines: Sequence[str]) -> None:
        body = "\n".join(lines).encode()
        if self._gzip:
            body = gzip.compress(body, compresslevel=1)
        session = self._get_session()
        try:
            async with session.post(self._url, params=self._params, data=body, headers=self._headers) as resp:
                if 200 <= resp.status < 300:
                    return
                text = await resp.text(errors="replace")
                raise InfluxWriteError(resp.status, _short(text), parse_retry_after(resp.headers.get("Retry-After")))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise InfluxWriteError(None, f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class InfluxV2Writer(InfluxWriter):
    """InfluxDB 2.x/3.x ``/api/v2/write`` through influxdb-client's async API, millisecond precision."""

    def __init__(
        self,
        url: str,
        token: str,
        org: str,
        bucket: str,
        *,
        timeout_s: float = 10.0,
        gzip_body: bool = False,
    ) -> None:
        self._url = url
        self._token = token
        self._org = org
        self._bucket = bucket
        self._timeout_ms = int(timeout_s * 1000)
        self._gzip = gzip_body
        self._client: Any = None
        self._write_api: Any = None

    async def write(self, lines: Sequence[str]) -> None:
        from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
        from influxdb_client.domain.write_precision import WritePrecision
        from influxdb_client.rest import ApiException

        if self._client is None:
            # Created lazily, inside the running event loop (it owns an aiohttp session).
            self._client = InfluxDBClientAsync(
                url=self._url, token=self._token, org=self._org, timeout=self._timeout_ms, enable_gzip=self._gzip
            )
            self._write_api = self._client.write_api()
        try:
            await self._write_api.write(
                bucket=self._bucket, org=self._org, record="\n".join(lines), write_precision=WritePrecision.MS
            )
        except ApiException as exc:
            raise InfluxWriteError(
                exc.status or None, _short(exc.body or exc.reason), parse_retry_after(exc.retry_after)
            ) from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise InfluxWriteError(None, f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
            self._write_api = None


def make_writer(
    version: int, url: str, database: str, org: str, token: str, *, timeout_s: float = 10.0
) -> InfluxWriter:
    """The writer for an InfluxDB API version: 1 = /write (database), 2 = /api/v2/write (bucket = database)."""
    if version == 1:
        return InfluxV1Writer(url, database, token=token or None, timeout_s=timeout_s)
    if version == 2:
        return InfluxV2Writer(url, token, org, database, timeout_s=timeout_s)
    raise ValueError(f"unsupported InfluxDB API version {version} (expected 1 or 2)")


# Statuses meaning the data itself is bad: retrying the same lines cannot succeed.
REJECTED_STATUSES = frozenset({400, 422})


class RetryingSink:
    """Writes batches in chunks, retrying each chunk until it is written; never drops a batch.

    Transient failures (no response, 5xx, 408, 429, and other 4xx such as auth or missing database,
    which an operator can fix) are retried with capped exponential backoff and full jitter, or after
    Retry-After when the server sends it; forever unless max_attempts is given. Chunks are written in
    order. Chunks InfluxDB rejects as bad data (400/422) are collected, the remaining chunks are still
    written, and then InfluxRejectedError carrying the rejected lines is raised.

    Callbacks: on_retry(exc) before each retry, on_error(exc) when a chunk is given up (rejected or out
    of attempts), on_success(n_lines, seconds) per written chunk with the duration of the request that
    succeeded.
    """

    def __init__(
        self,
        writer: InfluxWriter,
        *,
        max_batch_lines: int = 5000,
        base_delay_s: float = 0.2,
        max_delay_s: float = 5.0,
        max_retry_after_s: float = 60.0,
        max_attempts: int | None = None,
        on_retry: Callable[[InfluxWriteError], None] | None = None,
        on_error: Callable[[InfluxWriteError], None] | None = None,
        on_success: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch_lines < 1:
            raise ValueError("max_batch_lines must be >= 1")
        self.writer = writer
        self.max_batch_lines = max_batch_lines
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.max_retry_after_s = max_retry_after_s
        self.max_attempts = max_attempts
        self.on_retry = on_retry
        self.on_error = on_error
        self.on_success = on_success

    def backoff_s(self, attempt: int, retry_after: float | None = None) -> float:
        """Delay before retry number `attempt` (1-based): Retry-After if given, else full jitter."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after_s)
        ceiling = min(self.max_delay_s, self.base_delay_s * 2.0 ** min(attempt - 1, 30))
        return random.uniform(0.0, ceiling)

    async def write(self, lines: Sequence[str]) -> None:
        """Write all lines; returns only when every chunk is written or rejected (then raises)."""
        rejected: list[str] = []
        last_rejection: InfluxRejectedError | None = None
        step = self.max_batch_lines
        for start in range(0, len(lines), step):
            chunk = [line for line in lines[start : start + step] if line]
            if not chunk:
                continue
            try:
                await self._write_chunk(chunk)
            except InfluxRejectedError as exc:
                rejected.extend(exc.lines)
                last_rejection = exc
        if last_rejection is not None:
            raise InfluxRejectedError(last_rejection.status, last_rejection.body, rejected)

    async def _write_chunk(self, chunk: list[str]) -> None:
        attempt = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                await self.writer.write(chunk)
            except InfluxWriteError as exc:
                if exc.status in REJECTED_STATUSES:
                    log.error("InfluxDB rejected %d lines (%s): %s", len(chunk), exc.status, exc.body)
                    rejection = InfluxRejectedError(exc.status, exc.body, chunk)
                    if self.on_error is not None:
                        self.on_error(rejection)
                    raise rejection from exc
                if self.max_attempts is not None and attempt >= self.max_attempts:
                    log.error("InfluxDB write of %d lines failed after %d attempts: %s", len(chunk), attempt, exc)
                    if self.on_error is not None:
                        self.on_error(exc)
                    raise
                delay = self.backoff_s(attempt, exc.retry_after)
                level = logging.WARNING if attempt == 1 or attempt % 10 == 0 else logging.DEBUG
                log.log(level, "InfluxDB write attempt %d failed, retrying in %.2f s: %s", attempt, delay, exc)
                if self.on_retry is not None:
                    self.on_retry(exc)
                await asyncio.sleep(delay)
                continue
            if attempt > 1:
                log.info("InfluxDB write succeeded after %d attempts", attempt)
            if self.on_success is not None:
                self.on_success(len(chunk), time.perf_counter() - started)
            return

    async def close(self) -> None:
        await self.writer.close()


class WriteBehindSink:
    """A bounded write-behind buffer in front of a :class:`RetryingSink`, so that InfluxDB's latency (a
    slow request, a server busy snapshotting its cache) is not every reading's latency.

    :meth:`submit` queues lines and returns at once with a future that completes once they are written
    (their rejected lines, if any, handed to ``on_rejected`` first). One background task writes the
    queue in order, what has accumulated meanwhile in one request of up to ``max_batch_lines``: a slow
    InfluxDB gets fewer, larger writes. Backpressure stays: :meth:`submit` waits while
    ``max_pending_lines`` are queued or being written (memory is bounded), and a write that fails for
    good fails its futures and every later :meth:`submit`. :meth:`written` waits for everything
    submitted so far, which is what a caller awaits before committing the offsets those lines came from.
    """

    def __init__(
        self,
        sink: RetryingSink,
        *,
        max_pending_lines: int = 50_000,
        on_rejected: Callable[[InfluxRejectedError], Awaitable[None]] | None = None,
    ) -> None:
        if max_pending_lines < 1:
            raise ValueError("max_pending_lines must be >= 1")
        self.sink = sink
        self.max_pending_lines = max_pending_lines
        self.on_rejected = on_rejected
        self.pending_lines = 0  # queued or being written
        self._queue: collections.deque[tuple[list[str], asyncio.Future[None]]] = collections.deque()
        self._last: asyncio.Future[None] | None = None
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None

    async def submit(self, lines: Sequence[str]) -> asyncio.Future[None]:
        """Queue ``lines``; waits only while the buffer is full. The future completes once they are written."""
        while self.pending_lines >= self.max_pending_lines and self._failed is None:
            self._room.clear()
            await self._room.wait()
        if self._failed is not None:
            raise self._failed
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((list(lines), done))
        self.pending_lines += len(lines)
        self._last = done
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="influx-write-behind")
        self._wake.set()
        return done

    def written(self) -> Awaitable[None]:
        """An awaitable for every line submitted so far, not later ones (raises the failure that stopped
        the writer): what a caller awaits before committing the offsets those lines came from."""
        last = self._last
        if last is None:
            last = asyncio.get_running_loop().create_future()
            last.set_result(None)
        return asyncio.shield(last)

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            taken: list[tuple[list[str], asyncio.Future[None]]] = [self._queue.popleft()]
            size = len(taken[0][0])
            while self._queue and size + len(self._queue[0][0]) <= self.sink.max_batch_lines:
                taken.append(self._queue.popleft())
                size += len(taken[-1][0])
            try:
                try:
                    await self.sink.write([line for lines, _ in taken for line in lines])
                except InfluxRejectedError as exc:
                    if self.on_rejected is None:
                        raise
                    await self.on_rejected(exc)
            except BaseException as exc:
                self._fail(exc, taken)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            for _, done in taken:
                if not done.done():
                    done.set_result(None)
            self.pending_lines -= size
            self._room.set()

    def _fail(self, exc: BaseException, taken: list[tuple[list[str], asyncio.Future[None]]]) -> None:
        self._failed = exc if not isinstance(exc, asyncio.CancelledError) else InfluxWriteError(None, "sink closed")
        for _, done in [*taken, *self._queue]:
            if not done.done():
                done.set_exception(self._failed)
                done.exception()  # retrieved here: a caller that never awaits it must not log it as lost
        self._queue.clear()
        self._room.set()

    async def close(self) -> None:
        """Write what is queued (unless the writer has failed), then stop it and close the sink."""
        try:
            if self._failed is None:
                await self.written()
        finally:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, InfluxWriteError):
                    await self._task
            await self.sink.close()


def _parse_query_response(raw: bytes) -> list[dict[str, Any]]:
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise InfluxQueryError(f"not a JSON query response: {_short(raw)}") from exc
    if "error" in doc:
        raise InfluxQueryError(doc["error"])
    series: list[dict[str, Any]] = []
    for result in doc.get("results", []):
        if "error" in result:
            raise InfluxQueryError(result["error"])
        series.extend(result.get("series", []))
    return series


def _query_form(database: str, q: str) -> dict[str, str]:
    form = {"q": q, "epoch": "ms"}
    if database:
        form["db"] = database
    return form


def influx_v1_query(url: str, database: str, q: str, *, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Run InfluxQL (POST /query, epoch=ms) and return the series: dicts with name, tags, columns, values."""
    data = urllib.parse.urlencode(_query_form(database, q)).encode()
    request = urllib.request.Request(url.rstrip("/") + "/query", data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        raw = exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise InfluxQueryError(f"cannot reach {url}: {exc}") from exc
    return _parse_query_response(raw)


async def influx_v1_query_async(url: str, database: str, q: str, *, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Async influx_v1_query."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(url.rstrip("/") + "/query", data=_query_form(database, q)) as resp,
        ):
            raw = await resp.read()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise InfluxQueryError(f"cannot reach {url}: {exc}") from exc
    return _parse_query_response(raw)


def count_points(url: str, database: str, measurement: str, field: str = "score") -> int:
    """Number of points in measurement with a value for field (0 when the measurement does not exist)."""
    series = influx_v1_query(url, database, f"SELECT count({quote_ident(field)}) FROM {quote_ident(measurement)}")
    return sum(int(row[1]) for s in series for row in s.get("values", []))
