"""Control messages on ``<prefix>.control`` (``IOTAD_CONTROL_TOPIC_SUFFIX``): model lifecycle events.

The topic has one partition, so messages keep their order. Values are JSON objects with a ``type``;
the key is the type. Consumers must ignore types and fields they do not know.

* ``{"type": "model-updated", "version": V, "registry": URL, "at": ISO-8601, "sha256": ..., "previous": ...,
  "path": DIR | null}`` — published after the registry's champion changed (promotion by
  ``iotad retrain``, or ``iotad model promote/rollback``). Workers should fetch ``V`` with
  ``open_registry(URL).fetch(V, cache_dir)`` (verified against the registry's hashes) and swap it in;
  ``path`` is the version's directory when the registry is a local directory (null otherwise), for
  consumers that load an artifact directory directly.
* ``{"type": "shadow", "path": DIR | null}`` — run the artifact in ``DIR`` beside the champion
  (its scores go to the ``<measurement>_shadow`` InfluxDB measurement only); ``null`` stops it.
* ``{"type": "retrain-request", "at": ..., "reason": ...}`` — asks a running ``iotad retrain --loop`` to
  run now instead of at its next interval (the CronJob deployment ignores it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka import TopicPartition as AioTopicPartition
from kafka import KafkaConsumer, TopicPartition

from connectors.kafka_admin import create_topics, make_producer
from connectors.kafka_security import KafkaSecurity, security_for
from models.registry import utc_now

log = logging.getLogger(__name__)

MODEL_UPDATED = "model-updated"
RETRAIN_REQUEST = "retrain-request"
CONTROL_PARTITIONS = 1


def model_updated(
    version: str,
    registry: str,
    *,
    sha256: str | None = None,
    previous: str | None = None,
    path: str | None = None,
) -> dict[str, Any]:
    """The ``model-updated`` message announcing ``version`` as the champion of ``registry``."""
    return {
        "path": path,
        "type": MODEL_UPDATED,
        "version": version,
        "registry": registry,
        "at": utc_now(),
        "sha256": sha256,
        "previous": previous,
    }


def retrain_request(reason: str = "") -> dict[str, Any]:
    return {"type": RETRAIN_REQUEST, "at": utc_now(), "reason": reason}


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, sort_keys=True).encode()


def decode(value: bytes | None) -> dict[str, Any] | None:
    """The message, or None when the value is not a JSON object with a string ``type``."""
    if not value:
        return None
    try:
        message = json.loads(value)
    except ValueError:
        return None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return None
    return message


def publish(
    bootstrap: str,
    topic: str,
    message: dict[str, Any],
    *,
    timeout_s: float = 10.0,
    security: KafkaSecurity | None = None,
) -> int:
    """Send one control message and wait for the broker's acknowledgement; returns its offset.

    Creates the topic (one partition) when it does not exist. Raises on failure (KafkaError,
    TimeoutError): the caller decides whether that is fatal.
    """
    create_topics(bootstrap, {topic: CONTROL_PARTITIONS}, timeout_s=timeout_s, security=security)
    producer = make_producer(
        bootstrap,
        security=security,
        client_id="iotad-control",
        bootstrap_timeout_ms=int(timeout_s * 1000),
        max_block_ms=int(timeout_s * 1000),
    )
    try:
        future = producer.send(topic, key=str(message["type"]).encode(), value=encode(message), partition=0)
        metadata = future.get(timeout=timeout_s)
        producer.flush(timeout=timeout_s)
    finally:
        producer.close(timeout=timeout_s)
    log.info("published %s to %s@%d: %s", message["type"], topic, metadata.offset, message)
    return int(metadata.offset)


class ControlListener:
    """Reads control messages published from now on (no consumer group, nothing committed).

    ``wait(types, timeout_s)`` returns the first message of one of ``types`` that arrives within
    ``timeout_s``, or None. Used by ``iotad retrain --loop`` to wake up on ``retrain-request``.
    """

    def __init__(
        self, bootstrap: str, topic: str, *, timeout_s: float = 10.0, security: KafkaSecurity | None = None
    ) -> None:
        create_topics(bootstrap, {topic: CONTROL_PARTITIONS}, timeout_s=timeout_s, security=security)
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            client_id="iotad-control-listener",
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            bootstrap_timeout_ms=int(timeout_s * 1000),
            **security_for(bootstrap, security).kafka_python(),
        )
        deadline = time.monotonic() + timeout_s
        partitions = self._consumer.partitions_for_topic(topic)
        while not partitions and time.monotonic() < deadline:
            time.sleep(0.1)
            partitions = self._consumer.partitions_for_topic(topic)
        assignment = [TopicPartition(topic, p) for p in sorted(partitions or {0})]
        self._consumer.assign(assignment)
        self._consumer.seek_to_end(*assignment)
        for tp in assignment:  # resolve the end offsets now, so "from now on" means now
            self._consumer.position(tp)

    def wait(self, types: tuple[str, ...], timeout_s: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            batch = self._consumer.poll(timeout_ms=int(min(remaining, 1.0) * 1000) or 1)
            for records in batch.values():
                for record in records:
                    message = decode(record.value)
                    if message is not None and message["type"] in types:
                        return message

    def close(self) -> None:
        self._consumer.close()


async def follow(
    bootstrap: str,
    topic: str,
    handler: Callable[[dict[str, Any]], Awaitable[None]],
    *,
    poll_s: float = 1.0,
    security: KafkaSecurity | None = None,
) -> None:
    """Call ``handler`` with each control message published from now on; runs until cancelled.

    Every worker must see every message, so this consumer has no group: it is assigned all partitions
    and starts at their end. Brokers whose end offsets lag (Tansu) may replay the last few messages at
    start, so handlers must be idempotent (they compare versions).
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        **security_for(bootstrap, security).aiokafka(),
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        while not partitions:  # the topic may be created after the worker starts
            await asyncio.sleep(poll_s)
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic)
        tps = [AioTopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        while True:
            batches = await consumer.getmany(timeout_ms=int(poll_s * 1000))
            for records in batches.values():
                for record in records:
                    message = decode(record.value)
                    if message is None:
                        log.warning("control: skipping a message that is not a typed JSON object")
                    else:
                        await handler(message)
    finally:
        await consumer.stop()
