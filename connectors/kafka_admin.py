"""Kafka helpers on kafka-python: create topics, wait for a broker, produce, read a whole topic.

Used by the demo, the CLI and the tests. Written for Tansu as much as for Kafka: Tansu's high watermark is
wrong (base offset of the last batch + 1), so read_all never trusts end offsets; it reads until no new
message has arrived for a while.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaTimeoutError, TopicAlreadyExistsError, for_code

from connectors.kafka_security import KafkaSecurity, security_for

log = logging.getLogger(__name__)

CLIENT_ID = "iotad-admin"


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed message."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]


@contextmanager
def _admin(bootstrap: str, timeout_s: float, security: KafkaSecurity | None = None) -> Iterator[KafkaAdminClient]:
    timeout_ms = int(timeout_s * 1000)
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id=CLIENT_ID,
            bootstrap_timeout_ms=timeout_ms,
            request_timeout_ms=timeout_ms,
            **security_for(bootstrap, security).kafka_python(),
        )
    except KafkaTimeoutError as exc:
        raise TimeoutError(f"no Kafka broker at {bootstrap} within {timeout_s:.0f} s") from exc
    try:
        yield admin
    finally:
        admin.close()


def wait_for_broker(bootstrap: str, timeout_s: float = 10.0, *, security: KafkaSecurity | None = None) -> None:
    """Block until the broker answers a metadata request; TimeoutError otherwise."""
    with _admin(bootstrap, timeout_s, security) as admin:
        admin.list_topics()


def create_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    retention_ms: int | None = None,
    timeout_s: float = 10.0,
    security: KafkaSecurity | None = None,
) -> None:
    """Create topics (name -> partitions), replication factor 1; topics that exist already are kept.

    An existing topic with a different partition count is only logged: brokers that auto-create topics
    on first produce (Tansu: 4 partitions) may have made it before we got here.
    """
    if not topics:
        return
    configs = {"retention.ms": str(retention_ms)} if retention_ms is not None else {}
    request = {
        name: {"num_partitions": partitions, "replication_factor": 1, "configs": configs}
        for name, partitions in topics.items()
    }
    with _admin(bootstrap, timeout_s, security) as admin:
        response = admin.create_topics(request, timeout_ms=int(timeout_s * 1000), raise_errors=False)
        existing = []
        for result in response["topics"]:
            error = for_code(result["error_code"])
            if error is TopicAlreadyExistsError:
                existing.append(result["name"])
            elif result["error_code"] != 0:
                raise error(f"creating topic {result['name']!r}: {result.get('error_message')}")
        if existing:
            for desc in admin.describe_topics(existing):
                wanted = topics[desc["name"]]
                if len(desc["partitions"]) != wanted:
                    log.warning(
                        "topic %s exists with %d partitions, wanted %d",
                        desc["name"],
                        len(desc["partitions"]),
                        wanted,
                    )


def make_producer(bootstrap: str, *, security: KafkaSecurity | None = None, **overrides: Any) -> KafkaProducer:
    """A KafkaProducer for raw bytes keys/values: acks=all, 5 ms linger; overrides win."""
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "client_id": "iotad-producer",
        "acks": "all",
        "linger_ms": 5,
        "bootstrap_timeout_ms": 10_000,
        **security_for(bootstrap, security).kafka_python(),
    }
    config.update(overrides)
    return KafkaProducer(**config)


def _reader(bootstrap: str, security: KafkaSecurity | None, **overrides: Any) -> KafkaConsumer:
    """A consumer outside any group (manual assignment, nothing committed, no topic auto-created)."""
    return KafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id="iotad-reader",
        group_id=None,
        enable_auto_commit=False,
        allow_auto_create_topics=False,
        **security_for(bootstrap, security).kafka_python(),
        **overrides,
    )


def end_offsets(bootstrap: str, topic: str, *, security: KafkaSecurity | None = None) -> dict[int, int]:
    """Each partition's end offset (where the next message will go).

    Tansu 0.6 reports the base offset of a partition's last record batch + 1 instead, so there it can be
    lower: reading from it may return some earlier messages as well.
    """
    consumer = _reader(bootstrap, security)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        return {tp.partition: offset for tp, offset in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def read_all(
    bootstrap: str,
    topic: str,
    *,
    idle_timeout_s: float = 1.0,
    timeout_s: float = 30.0,
    min_records: int = 0,
    start: Mapping[int, int] | None = None,
    security: KafkaSecurity | None = None,
) -> list[Record]:
    """Every message of topic from the beginning (or from ``start``: partition -> offset, as returned by
    :func:`end_offsets` before the messages of interest were sent), sorted by (partition, offset).

    Uses manual assignment (no group, nothing committed). Stops once at least min_records were read and
    nothing new arrived for idle_timeout_s, or when timeout_s is up (returning what it has: the caller
    asserts). A topic that does not exist yet is waited for, not auto-created.
    """
    deadline = time.monotonic() + timeout_s
    consumer = _reader(bootstrap, security, auto_offset_reset="earliest", bootstrap_timeout_ms=int(timeout_s * 1000))
    records: list[Record] = []
    try:
        partitions = consumer.partitions_for_topic(topic)
        while not partitions and time.monotonic() < deadline:
            time.sleep(0.1)
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            return records
        assignment = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assignment)
        consumer.seek_to_beginning(*assignment)
        for tp in assignment:
            if start and tp.partition in start:
                consumer.seek(tp, start[tp.partition])
        last_new = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= deadline or (len(records) >= min_records and now - last_new >= idle_timeout_s):
                break
            batch = consumer.poll(timeout_ms=100)
            for messages in batch.values():
                for m in messages:
                    records.append(
                        Record(
                            topic=m.topic,
                            partition=m.partition,
                            offset=m.offset,
                            timestamp_ms=m.timestamp,
                            key=m.key,
                            value=m.value,
                            headers={k: v for k, v in (m.headers or [])},
                        )
                    )
            if batch:
                last_new = time.monotonic()
    finally:
        consumer.close()
    records.sort(key=lambda r: (r.partition, r.offset))
    return records
