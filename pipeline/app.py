"""The Faust app: topics, the device-state table, and the wiring of the scoring agent.

Built by a factory from :class:`Settings` (nothing is read from the environment at import time):
``iotad worker`` calls :func:`create_app` and runs it.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import faust
from aiokafka import AIOKafkaProducer
from faust.transport.drivers.aiokafka import Producer as FaustKafkaProducer
from faust.types import ConsumerT, TableT, TransportT
from mode.utils.queues import ThrowableQueue

from connectors.influx import RetryingSink, make_writer
from connectors.kafka_batches import RECORD_BATCH_BYTES, send_checkpoints
from connectors.kafka_security import KafkaSecurity
from connectors.kafka_security import register as register_security
from models.artifact import load_artifact
from models.detector import Detector, resolve_device, set_cpu_threads
from models.scoring import ScoringConfig, make_threshold
from pipeline.delivery import RawSchema, RefillQueue, StallMonitor, Transport
from pipeline.metrics import Metrics
from pipeline.processor import Processor, StateSource
from pipeline.schema import Limits
from pipeline.settings import Settings
from pipeline.windowing import WindowConfig

log = logging.getLogger(__name__)

STATE_TABLE = "device-state"
MAX_FETCH_BYTES = 8 * 1024 * 1024


def build_detector(settings: Settings, model_dir: Path | None = None) -> Detector:
    """The detector for ``model_dir`` (default: the configured model) with the configured scoring.

    Also sets the process's torch CPU threads (``IOTAD_TORCH_THREADS``): every process that serves a
    detector builds it here.
    """
    set_cpu_threads(settings.torch_threads)
    artifact = load_artifact(model_dir or settings.model_dir, device=resolve_device(settings.device))
    scoring = ScoringConfig(
        warmup_steps=settings.warmup_steps,
        halflife_steps=settings.error_halflife_steps,
        learn_from_anomalies=settings.learn_from_anomalies,
        burnin_steps=settings.burnin_steps,
    )
    threshold = make_threshold(
        settings.threshold_method,
        value=settings.threshold,
        quantile=settings.adaptive_quantile,
        margin=settings.adaptive_margin,
        likelihood=settings.likelihood_threshold,
    )
    return Detector(artifact, scoring, threshold, device=resolve_device(settings.device))


def fetch_version(settings: Settings, registry_url: str, version: str) -> Path:
    """A verified local copy of a registry version, cached under the data dir."""
    from models.registry import open_registry

    return open_registry(registry_url).fetch(version, settings.data_dir / "model-cache")


def startup_model_dir(settings: Settings) -> Path:
    """The registry's champion when there is one, else the configured artifact (the baked-in default)."""
    from models.registry import open_registry

    try:
        registry = open_registry(settings.registry)
        champion = registry.champion()
    except (OSError, ValueError) as exc:
        log.warning("model registry %s unavailable (%s): serving %s", settings.registry, exc, settings.model_dir)
        return settings.model_dir
    if champion is None:
        return settings.model_dir
    return fetch_version(settings, settings.registry, champion)


def build_processor(settings: Settings, detector: Detector, state_source: StateSource | None = None) -> Processor:
    limits = Limits(detector.artifact.features, settings.min_timestamp_ms, settings.max_future_skew_ms)
    window = WindowConfig(settings.step_ms, settings.grace_ms, settings.max_gap_steps, settings.idle_flush_ms)
    return Processor(detector, window, limits, state_source, history_steps=settings.history_steps)


def broker_urls(bootstrap: str) -> list[str]:
    return [f"kafka://{h.strip()}" for h in bootstrap.split(",") if h.strip()]


@dataclass
class Components:
    app: App
    readings: faust.TopicT
    table: TableT
    processor: Processor
    sink: RetryingSink
    metrics: Metrics
    settings: Settings


async def write_checkpoints(app: faust.App, table: TableT, records: Mapping[bytes, tuple[int, bytes]]) -> None:
    """Checkpoint records ``key -> (partition, blob)`` to ``table``'s changelog (with the end marker, see
    :func:`connectors.kafka_batches.send_checkpoints`); the local table view is updated in place.

    Records go as record batches straight to an explicit partition: Faust's per-key table machinery costs
    several times more per record.
    """
    for key, (_, blob) in records.items():
        table.data[key] = blob
    aio: AIOKafkaProducer = cast(FaustKafkaProducer, app.producer)._ensure_producer()
    await send_checkpoints(aio, table.changelog_topic.get_topic_name(), records)


class App(faust.App):
    """Faust's app with the cheaper hand-over of messages to its streams (pipeline.delivery: its consumer,
    stream buffers and, unless given another, its monitor), and a hook for agents that hold
    acknowledgements (``pipeline.cadence``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("monitor", StallMonitor())
        super().__init__(*args, **kwargs)
        # Awaited before Faust waits for every delivered message to be acknowledged (a rebalance, a stop):
        # there an agent that holds acknowledgements must release them, or the wait never ends.
        self.before_wait_empty: list[Callable[[], Awaitable[None]]] = []

    async def _consumer_wait_empty(self, consumer: ConsumerT, logger: Any) -> None:
        for release in self.before_wait_empty:
            await release()
        await super()._consumer_wait_empty(consumer, logger)

    def _new_transport(self) -> TransportT:
        return Transport(self.conf.broker_consumer, self)

    def FlowControlQueue(self, maxsize: int | None = None, *, clear_on_resume: bool = False) -> ThrowableQueue:
        return RefillQueue(maxsize=maxsize, flow_control=self.flow_control, clear_on_resume=clear_on_resume)


def make_faust_app(settings: Settings, app_id: str) -> App:
    """A Faust app configured the way every iotad worker needs it (scoring worker, alerter)."""
    security = KafkaSecurity.from_settings(settings)
    register_security(settings.kafka_bootstrap, security)  # the process's other Kafka clients use it too
    log.info("Kafka %s: %s", settings.kafka_bootstrap, security.describe())
    app = App(
        app_id,
        broker=broker_urls(settings.kafka_bootstrap),
        # TLS / SASL from IOTAD_KAFKA_SECURITY_PROTOCOL etc. (None = PLAINTEXT)
        broker_credentials=security.faust_credentials(),
        store="memory://",
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=settings.partitions,
        broker_session_timeout=settings.broker_session_timeout_s,
        broker_heartbeat_interval=max(0.5, settings.broker_session_timeout_s / 6),
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        web_enabled=False,
        # Larger than any message a producer may send, so an oversized message reaches validation
        # (and the dead-letter topic, original bytes included) instead of stalling its partition.
        consumer_max_fetch_size=MAX_FETCH_BYTES,
        producer_max_request_size=MAX_FETCH_BYTES,
        producer_max_batch_size=RECORD_BATCH_BYTES,
        # Tansu does not implement idempotent/transactional producers; at-least-once + the
        # per-device offset guard give exactly-once state (see ARCHITECTURE.md).
        processing_guarantee="at_least_once",
    )

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]  # mode's signal stubs reject async
    async def fetch_wait(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        set_fetch_max_wait(app, settings.kafka_fetch_max_wait_ms)

    return app


def set_fetch_max_wait(app: faust.App, ms: int) -> None:
    """How long the broker may hold a fetch that has no data yet. Faust builds its consumer with a fixed
    1,500 ms. Kafka answers as soon as data arrives whatever the wait; Tansu 0.6, under a steady stream,
    holds a fetch for a good part of it (`python -m bench.fetch_wait`: median delivery 144 ms with 500 ms,
    19 ms with 100 ms). aiokafka reads the value per fetch request, so it can be set on the live consumer."""
    fetcher = getattr(getattr(getattr(app.consumer, "_thread", None), "_consumer", None), "_fetcher", None)
    if fetcher is not None and hasattr(fetcher, "_fetch_max_wait_ms"):
        fetcher._fetch_max_wait_ms = ms
        log.info("consumer fetch_max_wait_ms = %d", ms)
    else:
        log.warning("cannot set the consumer's fetch_max_wait_ms (Faust internals changed): it stays at Faust's")


def freeze_startup_objects() -> None:
    """Move every object alive now out of the cyclic GC's scans, once a long-running process has started.

    The imports alone (torch, Faust, numpy) leave ~220,000 GC-tracked objects that live as long as the
    process, and every full collection walked them all: 150-170 ms stalls of the event loop every few
    seconds under load, the tail of the end-to-end latency. Objects frozen here are still freed by
    reference counting when they go; only a cycle among them would never be collected.
    """
    gc.collect()
    gc.freeze()


def create_app(settings: Settings, metrics: Metrics | None = None) -> Components:
    app = make_faust_app(settings, settings.app_id)
    readings = app.topic(
        settings.readings_topic,
        schema=RawSchema(),
        partitions=settings.partitions,
    )
    # Device checkpoints, keyed by device id. The agent writes each one to the changelog partition
    # numbered like the device's readings partition, so Faust recovers it on whichever worker is
    # assigned that partition (see ScoringService._write).
    table = app.Table(
        STATE_TABLE,
        default=None,
        key_type=bytes,  # bytes -> the raw codec: changelog keys are the device id as produced
        value_type=bytes,
        partitions=settings.partitions,
    )
    metrics = metrics or Metrics()
    detector = build_detector(settings, startup_model_dir(settings))
    metrics.model_info.labels(detector.version).set(1)
    processor = build_processor(settings, detector, lambda device_id: table.get(device_id.encode()))
    if settings.shadow_model_dir is not None:
        shadow = build_detector(settings, settings.shadow_model_dir)
        processor.set_shadow(shadow)
        metrics.shadow_info.labels(shadow.version).set(1)
    writer = make_writer(
        settings.influx_version,
        settings.influx_url,
        settings.influx_database,
        settings.influx_org,
        settings.influx_token.get_secret_value(),
    )
    sink = RetryingSink(
        writer,
        on_retry=lambda exc: metrics.sink_retries.labels("influxdb").inc(),
        on_error=lambda exc: metrics.sink_errors.labels("influxdb").inc(),
        on_success=lambda n, s: metrics.sink_writes.labels("influxdb").inc(),
    )
    comp = Components(app, readings, table, processor, sink, metrics, settings)
    from pipeline.agents import register
    from pipeline.lag import install_lag_monitor

    register(comp)
    install_lag_monitor(app, metrics.consumer_lag, {settings.readings_topic})
    return comp
