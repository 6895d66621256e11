"""How long the local broker holds a consumer's fetch under a steady stream: ``python -m bench.fetch_wait``.

A producer thread sends ``rate`` small records/s (in 100 ms ticks) to a 4-partition topic of a fresh
embedded broker (Tansu) while an aiokafka consumer, assigned every partition at its end, reads them with
each ``fetch_max_wait_ms``; delivery delay = consume time - record timestamp (set by the producer at
send). Kafka answers a fetch as soon as data arrives, whatever the wait; this measures what the wait
costs on the embedded stack, and why ``IOTAD_KAFKA_FETCH_MAX_WAIT_MS`` defaults to 20.

The last line of stdout (with ``--json``) is one JSON object: ``{"waits": {"<ms>": {"records", "p50_ms",
"p99_ms"}}, "rate", "seconds"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition

from connectors.kafka_admin import create_topics, make_producer
from pipeline.settings import Settings
from pipeline.stack import PipelineStack

TICK_S = 0.1
PARTITIONS = 4


def _produce(bootstrap: str, topic: str, seconds: float, rate: int) -> None:
    producer = make_producer(bootstrap, acks=1, linger_ms=5)
    per_tick = max(1, int(rate * TICK_S))
    end, i = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        t = time.monotonic()
        for _ in range(per_tick):
            producer.send(topic, key=b"d%d" % (i % 997), value=b"v" * 150)
            i += 1
        time.sleep(max(0.0, TICK_S - (time.monotonic() - t)))
    producer.flush()
    producer.close()


async def _measure(bootstrap: str, topic: str, wait_ms: int, seconds: float, rate: int) -> dict[str, Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=wait_ms, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(parts)
        await consumer.seek_to_end(*parts)
        producer = threading.Thread(target=_produce, args=(bootstrap, topic, seconds, rate))
        producer.start()
        delays: list[float] = []
        deadline = time.monotonic() + seconds + 2.0
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            now_ms = time.time() * 1000
            for records in batches.values():
                delays.extend(now_ms - r.timestamp for r in records)
        producer.join()
    finally:
        await consumer.stop()
    arr = np.array(delays or [np.nan])
    return {
        "records": len(delays),
        "p50_ms": round(float(np.percentile(arr, 50)), 1),
        "p99_ms": round(float(np.percentile(arr, 99)), 1),
    }


def main(waits: list[int], seconds: float, rate: int, as_json: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="iotad-fetch-") as tmp:
        settings = Settings(
            topic_prefix="fetchwait", app_id="fetchwait", influx_database="fetchwait", data_dir=Path(tmp)
        )
        with PipelineStack(settings, workers=0) as stack:
            result: dict[str, Any] = {"rate": rate, "seconds": seconds, "waits": {}}
            for wait in waits:
                topic = f"fetchwait.{wait}"
                create_topics(stack.bootstrap, {topic: PARTITIONS})
                result["waits"][str(wait)] = asyncio.run(_measure(stack.bootstrap, topic, wait, seconds, rate))
                if not as_json:
                    print(wait, result["waits"][str(wait)], flush=True)
    if as_json:
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--waits", default="500,100,20", help="fetch_max_wait_ms values, comma-separated")
    ap.add_argument("--seconds", type=float, default=8.0, help="load per wait (bounded)")
    ap.add_argument("--rate", type=int, default=2000, help="records/s")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    main([int(w) for w in a.waits.split(",")], min(a.seconds, 60.0), a.rate, a.json)
