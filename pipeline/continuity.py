"""Per-partition offset continuity of the readings topic: finds holes in what the consumer delivered.

Faust's consumer can drop messages it re-fetches after a restart or a rebalance: its fetcher runs
before the stream partitions are seeked back to the committed offsets, and messages fetched then move
its private read offset past records it never handed to the agent ("DROPPED MESSAGE ROFF"). Nothing
is delivered for those offsets again, so without a repair they are never scored (and the partition's
committed offset stalls behind them).

The agent keeps, per assigned partition, the next offset it expects (the group's committed offset at
assignment, then one past the last offset delivered). Delivered offsets below it are replays, which the
processor's per-device offset guard absorbs; an offset above it is a hole ``[expected, offset)`` that
the agent re-reads from the broker (``connectors.kafka_ranges``) and processes before the message that
revealed it. Pure: no I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Hole:
    """Offsets ``start <= o < end`` of ``partition`` were never delivered; they belong before batch index ``before``."""

    partition: int
    start: int
    end: int
    before: int


class OffsetContinuity:
    def __init__(self) -> None:
        self._next: dict[int, int] = {}

    def expect(self, next_offsets: dict[int, int]) -> None:
        """Partitions (re)assigned: each one's next offset is where the group's committed position is."""
        self._next.update(next_offsets)

    def expected(self) -> dict[int, int]:
        """Each tracked partition's next expected offset."""
        return dict(self._next)

    def forget(self, partitions: Iterable[int]) -> None:
        for p in partitions:
            self._next.pop(p, None)

    def advance(self, delivered: Sequence[tuple[int, int]]) -> list[Hole]:
        """Take one batch's ``(partition, offset)`` in delivery order; return its holes in batch order.

        A partition not tracked (assignment not seen yet) starts at its first delivered offset.
        """
        holes: list[Hole] = []
        nxt = self._next
        for i, (partition, offset) in enumerate(delivered):
            expected = nxt.get(partition)
            if expected is not None and offset > expected:
                holes.append(Hole(partition, expected, offset, i))
            if expected is None or offset >= expected:
                nxt[partition] = offset + 1
        return holes
