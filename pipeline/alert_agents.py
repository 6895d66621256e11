"""The alerter: its own Faust app and consumer group (``iotad alerter``), so the scoring worker stays lean.

Two agents, both at-least-once:

1. ``iotad-alert-lifecycle``: ``<prefix>.scores`` -> :class:`~pipeline.alerting.AlertEngine` -> alert
   records on ``<prefix>.alerts`` (the outbox, key = dedup key) -> checkpoints of the touched devices (and
   the storm state) to the ``alert-state`` table's changelog, closed with end markers (Tansu's
   high-watermark bug, as in :mod:`pipeline.agents`). Faust commits the scores' offsets only after the
   batch's records are flushed, so a crash replays scores; the engine skips scores not newer than a
   device's checkpointed ts, and a replayed batch that had not been checkpointed re-emits the same events
   (same event_id and dedup key): the outbox is at-least-once.
2. ``iotad-alert-deliver``: ``<prefix>.alerts`` -> routes -> receivers (connectors/alert_delivery.py), each
   receiver's alerts delivered in order, receivers in parallel; deliveries that fail past their retry
   budget (or are rejected) go to ``<prefix>.alerts.dlq`` (value = the alert record, key = dedup key,
   headers ``iotad-reason``, ``iotad-receiver``, ``iotad-detail``, ``iotad-attempts``, ``iotad-status``,
   ``iotad-event-id`` and the source ``iotad-topic``/``-partition``/``-offset``). Records that are not valid
   alerts go there too (reason ``invalid_alert``), as do undecodable scores (reason ``invalid_score``).
   Suppressed records (storm guard) are not delivered. A record with header ``iotad-redrive-receiver``
   (written by :func:`redrive`) is delivered to that receiver only.

The storm guard needs the whole fleet: run one alerter worker (a second one splits the partitions, and
each then guards its own share of the fleet). The state's storm record is written to changelog partition
0. See ALERTING.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import faust
import msgspec
from faust.types import TP, EventT, StreamT, TableT

from connectors.alert_delivery import DeliveryResult, ReceiverDefaults, RetryPolicy, Router, load_router
from connectors.kafka_ranges import PartitionReader
from connectors.kafka_security import KafkaSecurity, security_for
from pipeline.alerting import STORM_KEY, AlertEngine, AlertEvent, decode_score, encode_event, policy_from
from pipeline.app import make_faust_app, write_checkpoints
from pipeline.continuity import Hole
from pipeline.delivery import RawSchema, acknowledge, take_batches
from pipeline.holes import TAIL_GRACE_S, HoleRepair, RepairedAgent
from pipeline.lag import install_lag_monitor
from pipeline.metrics import Metrics
from pipeline.settings import Settings

log = logging.getLogger(__name__)

ALERT_STATE_TABLE = "alert-state"
REDRIVE_HEADER = "iotad-redrive-receiver"
TAIL_CHECK_S = TAIL_GRACE_S / 2  # HoleRepair.tails checks at most once per grace period


def _headers(message: Any) -> dict[str, bytes]:
    raw = message.headers or []
    items = raw.items() if isinstance(raw, Mapping) else raw
    return {str(k): (v if isinstance(v, bytes) else str(v).encode()) for k, v in items}


def receiver_defaults(s: Settings) -> ReceiverDefaults:
    retry = RetryPolicy(
        max_attempts=s.alert_retry_max_attempts,
        base_delay_s=s.alert_retry_base_s,
        max_delay_s=s.alert_retry_max_delay_s,
        max_retry_after_s=max(s.alert_retry_max_delay_s, s.alert_retry_budget_s),
        budget_s=s.alert_retry_budget_s,
        circuit_open_s=s.alert_retry_budget_s,
    )
    return ReceiverDefaults(retry=retry, timeout_s=s.alert_timeout_s)


def load_settings_router(s: Settings, environ: Mapping[str, str]) -> Router:
    """The routes of IOTAD_ALERT_ROUTES (an empty router, i.e. outbox only, when unset)."""
    if not s.alert_routes:
        log.warning("IOTAD_ALERT_ROUTES is not set: alerts are written to %s but delivered nowhere", s.alerts_topic)
        return Router()
    return load_router(Path(s.alert_routes), environ, receiver_defaults(s))


@dataclass
class AlerterComponents:
    app: faust.App
    scores: faust.TopicT
    alerts: faust.TopicT
    table: TableT
    engine: AlertEngine
    router: Router
    metrics: Metrics
    settings: Settings
    lifecycle: LifecycleService = field(init=False)
    delivery: DeliveryService = field(init=False)


class LifecycleService(RepairedAgent[Any]):
    """Scores -> alert lifecycles -> outbox + checkpoints."""

    def __init__(self, c: AlerterComponents, holes: HoleRepair[Any]) -> None:
        super().__init__(holes)
        self.c = c
        self.reload = True
        s = c.settings
        self.alerts_topic, self.dlq_topic = s.alerts_topic, s.alerts_dlq_topic

    async def handle(self, events: Sequence[EventT]) -> None:
        await self.handle_batch([e.message for e in events])

    async def process(self, batch: list[Any], holes: list[Hole]) -> None:
        try:
            await self._process(batch, holes)
        except BaseException:
            self.reload = True  # the engine may be ahead of the outbox: back to the last checkpoint
            raise

    async def _process(self, batch: list[Any], holes: list[Hole]) -> None:
        c, engine, m = self.c, self.c.engine, self.c.metrics
        if self.reload:
            engine.load(list(c.table.data.items()))
            self.reload = False
            log.info("alert state loaded: %d devices, %d storm scopes", len(engine.devices), len(engine.storms))
        producer = c.app.producer
        pending: list[Awaitable[Any]] = []
        now_ms = int(time.time() * 1000)
        m.messages.inc(len(batch))
        for msg in batch:
            try:
                score = decode_score(msg.value or b"")
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                headers = _dlq_headers("invalid_score", str(exc), msg)
                pending.append(await producer.send(self.dlq_topic, msg.key, msg.value or b"", None, None, headers))
                m.alert_dead_letters.labels("invalid_score").inc()
                continue
            for ev in engine.process(score, msg.partition):
                ev.emitted_at = now_ms
                pending.append(
                    await producer.send(self.alerts_topic, ev.dedup_key.encode(), encode_event(ev), None, None, None)
                )
                self._count(ev)
        if pending:
            await asyncio.gather(*pending)
        await self._checkpoint()
        await self.holes.release(holes)
        _, _, firing = engine.counts()
        m.alerts_firing.set(firing)
        for scope, storm in engine.storms.items():
            m.alert_storm.labels(scope).set(1 if storm.active else 0)

    def _count(self, ev: AlertEvent) -> None:
        m = self.c.metrics
        if ev.action == "trigger":
            if not ev.repeat:
                m.alerts_opened.labels(ev.kind, ev.severity).inc()
        else:
            m.alerts_resolved.labels(ev.kind).inc()
        if ev.suppressed:
            m.alerts_suppressed.inc()

    async def _checkpoint(self) -> None:
        """Touched devices (and the storm state) to the changelog, then one end marker per partition."""
        c = self.c
        devices, storms = c.engine.take_dirty()
        if not devices and not storms:
            return
        records = {device.encode(): item for device, item in c.engine.checkpoint(devices).items()}
        if storms:
            records[STORM_KEY] = (0, c.engine.storm_blob())
        await write_checkpoints(c.app, c.table, records)


def _dlq_headers(reason: str, detail: str, msg: Any, extra: Mapping[str, str] | None = None) -> list[tuple[str, bytes]]:
    h = [
        ("iotad-reason", reason.encode()),
        ("iotad-detail", detail[:1000].encode("utf-8", "replace")),
        ("iotad-topic", str(msg.topic).encode()),
        ("iotad-partition", str(msg.partition).encode()),
        ("iotad-offset", str(msg.offset).encode()),
    ]
    h.extend((k, v.encode()) for k, v in (extra or {}).items())
    return h


@dataclass
class _Item:
    msg: Any
    raw: bytes
    alert: dict[str, Any]


class DeliveryService(RepairedAgent[Any]):
    """Outbox -> receivers, retried; failures past the budget -> the alerts dead-letter topic."""

    def __init__(self, c: AlerterComponents, holes: HoleRepair[Any]) -> None:
        super().__init__(holes)
        self.c = c
        self.dlq_topic = c.settings.alerts_dlq_topic
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def handle(self, events: Sequence[EventT]) -> None:
        await self.handle_batch([e.message for e in events])

    async def process(self, batch: list[Any], holes: list[Hole]) -> None:
        c, m = self.c, self.c.metrics
        producer = c.app.producer
        pending: list[Awaitable[Any]] = []
        queues: dict[str, list[_Item]] = {}
        for msg in batch:
            raw = msg.value or b""
            try:
                alert = msgspec.json.decode(raw)
                if not isinstance(alert, dict) or not {"event_id", "action", "dedup_key", "kind"} <= alert.keys():
                    raise ValueError("not an alert record")
            except (msgspec.DecodeError, ValueError) as exc:
                pending.append(
                    await producer.send(
                        self.dlq_topic, msg.key, raw, None, None, _dlq_headers("invalid_alert", str(exc), msg)
                    )
                )
                m.alert_dead_letters.labels("invalid_alert").inc()
                continue
            only = _headers(msg).get(REDRIVE_HEADER)
            if alert.get("suppressed") and only is None:
                continue
            receivers = c.router.route(alert)
            if only is not None:
                receivers = [r for r in c.router.receivers.values() if r.name == only.decode()]
            if not receivers:
                log.debug("alert %s matches no route", alert.get("event_id"))
            for r in receivers:
                queues.setdefault(r.name, []).append(_Item(msg, raw, alert))
        results = await asyncio.gather(*(self._deliver_all(name, items) for name, items in queues.items()))
        for name, outcome in zip(queues, results, strict=True):
            for item, res in outcome:
                if res.ok:
                    m.alert_deliveries.labels(name, "ok").inc()
                    emitted = item.alert.get("emitted_at")
                    if isinstance(emitted, int) and emitted > 0:
                        m.alert_latency.observe(max(0.0, time.time() - emitted / 1000))
                    continue
                m.alert_deliveries.labels(name, "failed").inc()
                m.alert_dead_letters.labels(res.reason).inc()
                extra = {
                    "iotad-receiver": name,
                    "iotad-attempts": str(res.attempts),
                    "iotad-status": "" if res.status is None else str(res.status),
                    "iotad-event-id": str(item.alert.get("event_id", "")),
                }
                headers = _dlq_headers(res.reason, res.detail, item.msg, extra)
                key = str(item.alert.get("dedup_key", "")).encode()
                pending.append(await producer.send(self.dlq_topic, key, item.raw, None, None, headers))
        if pending:
            await asyncio.gather(*pending)
        await self.holes.release(holes)

    async def _deliver_all(self, name: str, items: list[_Item]) -> list[tuple[_Item, DeliveryResult]]:
        receiver = self.c.router.receivers[name]
        retries = self.c.metrics.alert_retries.labels(name)
        out = []
        for item in items:  # in order: a trigger reaches a receiver before its resolve
            res = await receiver.deliver(self.session(), item.alert, item.raw, on_retry=lambda _r: retries.inc())
            out.append((item, res))
        return out


def create_alerter(
    settings: Settings,
    *,
    environ: Mapping[str, str] | None = None,
    metrics: Metrics | None = None,
    router: Router | None = None,
) -> AlerterComponents:
    """The alerter's Faust app with both agents registered."""
    s = settings
    app = make_faust_app(s, s.alert_app_id)
    scores = app.topic(s.scores_topic, schema=RawSchema(), partitions=s.partitions)
    alerts = app.topic(s.alerts_topic, schema=RawSchema(), partitions=1)
    table = app.Table(ALERT_STATE_TABLE, default=None, key_type=bytes, value_type=bytes, partitions=s.partitions)
    metrics = metrics or Metrics()
    if router is None:
        router = load_settings_router(s, environ or {})
    comp = AlerterComponents(app, scores, alerts, table, AlertEngine(policy_from(s)), router, metrics, s)
    register(comp)
    install_lag_monitor(app, metrics.consumer_lag, {s.scores_topic, s.alerts_topic})
    return comp


def register(comp: AlerterComponents) -> None:
    s = comp.settings
    app = comp.app
    # Faust's consumer can skip records after a restart or a rebalance (pipeline.holes): a skipped score is
    # an alert that never opens or resolves, a skipped alert one never delivered. A re-read record has the
    # attributes of a consumed message, so the agents take it as one.
    reader = PartitionReader(s.kafka_bootstrap, s.alert_app_id, security=KafkaSecurity.from_settings(s))
    scores_holes = HoleRepair[Any](app, reader, comp.scores.get_topic_name(), lambda r: r, comp.metrics.refetched)
    alerts_holes = HoleRepair[Any](app, reader, comp.alerts.get_topic_name(), lambda r: r, comp.metrics.refetched)
    lifecycle = comp.lifecycle = LifecycleService(comp, scores_holes)
    delivery = comp.delivery = DeliveryService(comp, alerts_holes)

    # Batches as the scoring worker takes them (pipeline.delivery), each acknowledged once handled, i.e.
    # once its outputs are flushed: Faust's take_events acknowledges the events it skips in a rebalance,
    # and its commit timer, which goes on during the rebalance, then committed them unprocessed.
    @app.agent(comp.scores, name="iotad-alert-lifecycle")
    async def lifecycle_agent(stream: StreamT[bytes]) -> None:
        async for events in take_batches(cast(faust.Stream[bytes], stream), s.batch_max, s.batch_within_s):
            await lifecycle.handle(events)
            acknowledge(app, events)

    @app.agent(comp.alerts, name="iotad-alert-deliver")
    async def deliver_agent(stream: StreamT[bytes]) -> None:
        async for events in take_batches(cast(faust.Stream[bytes], stream), 100, s.batch_within_s):
            await delivery.handle(events)
            acknowledge(app, events)

    @app.timer(interval=TAIL_CHECK_S)
    async def sweep_tails() -> None:
        await lifecycle.sweep()
        await delivery.sweep()

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]  # mode's signal stubs reject async
    async def on_assigned(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        assigned: set[TP] = args[0] if args else kwargs.get("assigned", set())
        comp.metrics.assigned.set(sum(1 for tp in assigned if tp.topic == comp.scores.get_topic_name()))
        lifecycle.reload = True  # the recovered table is complete when the agent gets its next batch
        await scores_holes.on_assigned(assigned)
        await alerts_holes.on_assigned(assigned)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        revoked: set[TP] = args[0] if args else kwargs.get("revoked", set())
        lifecycle.reload = True
        scores_holes.on_revoked(revoked)
        alerts_holes.on_revoked(revoked)

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def on_shutdown(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        await delivery.close()
        await reader.stop()


def ensure_topics(s: Settings) -> None:
    """Create the alerts topics (1 partition each: alerts are few, and one partition keeps their order)."""
    from connectors.kafka_admin import create_topics

    create_topics(s.kafka_bootstrap, {s.alerts_topic: 1, s.alerts_dlq_topic: 1})


def redrive(
    s: Settings, *, receiver: str | None = None, limit: int = 10_000, timeout_s: float = 30.0, idle_s: float = 2.0
) -> dict[str, int]:
    """Re-deliver dead-lettered alerts: each failed delivery goes back to ``<prefix>.alerts`` for its receiver.

    Reads ``<prefix>.alerts.dlq`` with the consumer group ``<alert app id>-redrive`` (so each dead letter is
    re-driven once) and commits after the records are produced; stops when nothing new came for ``idle_s``
    (or at ``limit`` records, or after ``timeout_s``). Records without a receiver (invalid scores or alerts)
    and, with ``receiver``, those of other receivers are skipped (and consumed).
    """
    from kafka import KafkaConsumer

    from connectors.kafka_admin import make_producer

    consumer = KafkaConsumer(
        s.alerts_dlq_topic,
        **security_for(s.kafka_bootstrap).kafka_python(),
        bootstrap_servers=s.kafka_bootstrap,
        group_id=f"{s.alert_app_id}-redrive",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    producer = make_producer(s.kafka_bootstrap)
    counts = {"redriven": 0, "skipped": 0}
    deadline = time.monotonic() + timeout_s
    idle_since: float | None = None  # set once partitions are assigned (joining the group takes a while)
    try:
        while time.monotonic() < deadline and counts["redriven"] + counts["skipped"] < limit:
            batch = consumer.poll(timeout_ms=200, max_records=min(500, limit))
            if not batch:
                if idle_since is None and consumer.assignment():
                    idle_since = time.monotonic()
                if idle_since is not None and time.monotonic() - idle_since > idle_s:
                    break
                continue
            idle_since = time.monotonic()
            for records in batch.values():
                for r in records:
                    headers = dict(r.headers or [])
                    name = headers.get("iotad-receiver", b"").decode()
                    if not name or (receiver is not None and name != receiver):
                        counts["skipped"] += 1
                        continue
                    producer.send(s.alerts_topic, key=r.key, value=r.value, headers=[(REDRIVE_HEADER, name.encode())])
                    counts["redriven"] += 1
            producer.flush()
            consumer.commit()
    finally:
        producer.close()
        consumer.close()
    return counts
