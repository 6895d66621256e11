"""Consumer lag of a Faust app's partitions as a Prometheus gauge (``iotad_consumer_lag{topic,partition}``).

Lag = the partition's high watermark (from the consumer's latest fetch) - the app's committed offset (or
its position before the first commit). Sampled by a timer, so it costs nothing on the hot path.

On Tansu the high watermark is wrong (base offset of the last record batch + 1, see INFRA.md), so there the
lag reads low (it is clamped at 0); on Kafka it is exact to within one sampling interval.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import faust
from prometheus_client import Gauge

log = logging.getLogger(__name__)


async def sample_lag(app: faust.App, topics: Collection[str]) -> dict[tuple[str, int], int]:
    """(topic, partition) -> lag for the app's assigned partitions of ``topics``."""
    consumer = app.consumer
    committed = app.monitor.tp_committed_offsets
    out: dict[tuple[str, int], int] = {}
    for tp in consumer.assignment():
        if tp.topic not in topics:
            continue
        highwater = consumer.highwater(tp)
        if highwater is None:
            continue
        offset = committed.get(tp)
        if offset is None:
            offset = await consumer.position(tp)
        if offset is None:
            continue
        out[(tp.topic, tp.partition)] = max(0, int(highwater) - int(offset))
    return out


def install_lag_monitor(app: faust.App, gauge: Gauge, topics: Collection[str], interval_s: float = 5.0) -> None:
    """Register a timer that sets ``gauge`` (labels topic, partition) every ``interval_s``."""
    wanted = set(topics)
    shown: set[tuple[str, int]] = set()

    @app.timer(interval=interval_s)
    async def consumer_lag() -> None:
        try:
            lags = await sample_lag(app, wanted)
        except Exception as exc:  # consumer not started yet, rebalancing, ...
            log.debug("consumer lag not sampled: %s", exc)
            return
        for topic, partition in shown - set(lags):
            gauge.remove(topic, str(partition))
        for (topic, partition), lag in lags.items():
            gauge.labels(topic, str(partition)).set(lag)
        shown.clear()
        shown.update(lags)
