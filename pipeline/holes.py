"""Repairing what Faust's consumer skipped on one topic, for an agent: the I/O shell of :mod:`pipeline.continuity`.

When a topic's partitions are assigned, :meth:`HoleRepair.on_assigned` asks the broker for the group's
committed offsets. Each micro-batch then goes through :meth:`HoleRepair.fill`. A hole's records are
re-read from the broker and spliced in before the message that revealed them. :meth:`HoleRepair.release`
is called once the batch's outputs are written. It hands the holes to Faust's own "offsets needing no ack"
mechanism (``Consumer._add_gap``), so that commits move past them. A commit that passed them earlier could
lose them in a crash.

A hole at a partition's tail is revealed by no later message. :meth:`HoleRepair.tails`, called by the
agent's timer, finds those: the agent has had no batch for ``tail_grace_s``, yet the consumer's position
on a partition (the next offset it will fetch: it has handed everything before it to Faust) is past the
offset the agent expects, and was at the same place one check earlier. Records still on their way through
Faust's buffers would have reached an idle agent by then. :class:`RepairedAgent` is an agent's side of
both: batches and tail checks under one lock.

The scoring worker repairs its readings. The alerter repairs its scores and its alerts: a skipped score is
an alert that never opens or resolves, and a skipped alert is one never delivered.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Generic, Protocol, TypeVar, cast

import faust
from faust.transport.consumer import Consumer as FaustConsumer
from faust.types import TP
from prometheus_client import Counter

from connectors.kafka_ranges import PartitionReader, RangeRecord
from pipeline.continuity import Hole, OffsetContinuity

log = logging.getLogger(__name__)

HOLE_READ_TIMEOUT_S = 30.0
TAIL_GRACE_S = 5.0
POSITION_TIMEOUT_S = 2.0


class Delivered(Protocol):
    """What an agent gets per message: at least its partition and offset."""

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...


M = TypeVar("M", bound=Delivered)


class HoleRepair(Generic[M]):
    """Offset continuity of ``topic`` for one agent. ``convert`` turns a re-read record into the agent's
    message type, and ``refetched`` counts the re-read records."""

    def __init__(
        self,
        app: faust.App,
        reader: PartitionReader,
        topic: str,
        convert: Callable[[RangeRecord], M],
        refetched: Counter,
        tail_grace_s: float = TAIL_GRACE_S,
    ) -> None:
        self.app, self.reader, self.topic, self.convert, self.refetched = app, reader, topic, convert, refetched
        self.tail_grace_s = tail_grace_s
        self.continuity = OffsetContinuity()
        self._active = time.monotonic()  # the last batch's start or end
        self._checked = -math.inf  # the last tail check
        self._suspects: dict[int, tuple[int, int]] = {}  # partition -> (expected, position) at that check

    async def on_assigned(self, tps: Iterable[TP]) -> None:
        """Start tracking this topic's newly assigned partitions at the group's committed offsets."""
        partitions = {tp.partition for tp in tps if tp.topic == self.topic}
        if not partitions:
            return
        try:
            self.continuity.expect(await self.reader.next_offsets(self.topic, partitions))
        except Exception as exc:  # a failed lookup must not fail the rebalance
            log.warning(
                "cannot read committed offsets of %s %s (%s): holes before the first message go unseen",
                self.topic,
                sorted(partitions),
                exc,
            )

    def on_revoked(self, tps: Iterable[TP]) -> None:
        partitions = [tp.partition for tp in tps if tp.topic == self.topic]
        self.continuity.forget(partitions)
        for p in partitions:
            self._suspects.pop(p, None)

    async def fill(self, batch: list[M]) -> tuple[list[M], list[Hole]]:
        """The batch with each hole's records, re-read from the broker, spliced in before the message that
        revealed it, and the holes (for :meth:`release`). Retried until read: a broker that cannot serve
        them cannot serve the group either."""
        self._active = time.monotonic()
        holes = self.continuity.advance([(m.partition, m.offset) for m in batch])
        if not holes:
            return batch, holes
        return await self._splice(batch, holes), holes

    async def tails(self) -> tuple[list[M], list[Hole]]:
        """The records of holes at partitions' tails (see the module), re-read, and those holes (for
        :meth:`release`); empty unless the agent has been idle for ``tail_grace_s``. At most one check per
        ``tail_grace_s``; call it where batches are processed, under the same lock."""
        now = time.monotonic()
        if now - self._active < self.tail_grace_s or now - self._checked < self.tail_grace_s:
            return [], []
        self._checked = now
        if self.app.rebalancing:  # positions move with the seeks
            self._suspects.clear()
            return [], []
        consumer = cast(FaustConsumer, self.app.consumer)
        found: dict[int, tuple[int, int]] = {}
        for partition, expected in sorted(self.continuity.expected().items()):
            try:
                position = await asyncio.wait_for(consumer.position(TP(self.topic, partition)), POSITION_TIMEOUT_S)
            except Exception as exc:  # no position (being assigned, a seek in flight): checked next time
                log.debug("no position for %s[%d]: %r", self.topic, partition, exc)
                continue
            if position is not None and position > expected:
                found[partition] = (expected, position)
        confirmed = {p: v for p, v in found.items() if self._suspects.get(p) == v}
        self._suspects = {p: v for p, v in found.items() if p not in confirmed}
        holes = [Hole(p, start, end, 0) for p, (start, end) in confirmed.items()]
        if not holes:
            return [], []
        self.continuity.expect({h.partition: h.end for h in holes})
        self._active = time.monotonic()
        return await self._splice([], holes), holes

    async def _splice(self, batch: list[M], holes: list[Hole]) -> list[M]:
        out: list[M] = []
        done = 0
        for hole in holes:
            out.extend(batch[done : hole.before])
            done = hole.before
            delay = 0.5
            while True:
                try:
                    records = await self.reader.read(
                        self.topic, hole.partition, hole.start, hole.end, timeout_s=HOLE_READ_TIMEOUT_S
                    )
                    break
                except Exception as exc:  # retried; every failure is logged
                    log.error(
                        "re-reading %s[%d] %d..%d failed: %s", self.topic, hole.partition, hole.start, hole.end - 1, exc
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
            log.warning(
                "consumer skipped %s[%d] offsets %d..%d: re-read %d records",
                self.topic,
                hole.partition,
                hole.start,
                hole.end - 1,
                len(records),
            )
            self.refetched.inc(len(records))
            out.extend(self.convert(r) for r in records)
        out.extend(batch[done:])
        return out

    async def release(self, holes: list[Hole]) -> None:
        """Let Faust commit past the repaired holes (it never delivered them, so it will never ack them).
        Only after their results were written."""
        self._active = time.monotonic()
        consumer = cast(FaustConsumer, self.app.consumer)
        for hole in holes:
            await consumer._add_gap(TP(self.topic, hole.partition), hole.start, hole.end - 1)


class RepairedAgent(abc.ABC, Generic[M]):
    """An agent's batch handling behind a :class:`HoleRepair`: each batch with its holes filled, and the
    tail check (:meth:`sweep`, from a timer), take turns under one lock (``busy``), so that results are
    written in the order the offsets come."""

    def __init__(self, holes: HoleRepair[M]) -> None:
        self.holes = holes
        self.busy = asyncio.Lock()

    async def handle_batch(self, batch: list[M]) -> None:
        async with self.busy:
            await self.process(*await self.holes.fill(batch))

    async def sweep(self) -> None:
        """Process the records of holes at the partitions' tails, if any (:meth:`HoleRepair.tails`)."""
        async with self.busy:
            batch, holes = await self.holes.tails()
            if holes:  # even with no records left to re-read (compacted, deleted): Faust must commit past them
                await self.process(batch, holes)

    @abc.abstractmethod
    async def process(self, batch: list[M], holes: list[Hole]) -> None:
        """Process a batch and write its results, then :meth:`HoleRepair.release` its holes (the scoring
        worker: with the checkpoint that covers them, ``pipeline.cadence``)."""
