"""When device checkpoints are written: once per interval, not once per micro-batch.

A micro-batch's outputs (dead letters, InfluxDB points, scores) are written as soon as it is processed;
the device states it advanced are only marked dirty here. Once ``interval_s`` has passed since the last
checkpoint, the dirty devices are checkpointed together, and only then is what depends on their state
released: the consumed messages' acks (so that their offsets may be committed) and the offset holes
repaired meanwhile. This is Kafka Streams' commit interval with its record cache: a device touched by
many micro-batches within an interval is written once, with its latest state. A crash replays at most
an interval's messages from the committed offsets, which the per-device offset guard and the keyed
outputs absorb exactly as they absorb a micro-batch's.

No I/O: bookkeeping, and :func:`serialise`, which only yields to the event loop between chunks. The agent
(``pipeline/agents.py``) and the lean loop (``bench/lean.py``) write what :meth:`CheckpointCadence.take`
hands them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

# Devices serialised between two turns of the event loop when a checkpoint is written in the background
# (~3-9 ms): a fleet's checkpoint in one go stalled every reading that arrived meanwhile.
SERIALISE_CHUNK = 256

A = TypeVar("A")  # what to acknowledge once checkpointed (a Faust message)
H = TypeVar("H")  # an offset hole to release once checkpointed


@dataclass
class Pending(Generic[A, H]):
    """What one checkpoint covers: the devices to write, then the acks and holes to release."""

    devices: set[str] = field(default_factory=set)
    acks: list[A] = field(default_factory=list)
    holes: list[H] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.devices or self.acks or self.holes)


class CheckpointCadence(Generic[A, H]):
    """Dirty devices, held acks and held holes since the last checkpoint; due every ``interval_s``
    (0: after every micro-batch). ``clock`` is monotonic seconds."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if interval_s < 0:
            raise ValueError(f"checkpoint interval must be >= 0, got {interval_s}")
        self.interval_s = interval_s
        self.clock = clock
        self.pending: Pending[A, H] = Pending()
        self._last = clock()

    def hold(self, acks: Iterable[A]) -> None:
        """Messages taken for processing: acknowledged only once the state they advance is checkpointed."""
        self.pending.acks.extend(acks)

    def add(self, devices: Iterable[str], holes: Iterable[H] = ()) -> None:
        """A processed micro-batch: the devices it advanced and the holes it repaired."""
        self.pending.devices.update(devices)
        self.pending.holes.extend(holes)

    def due(self) -> bool:
        """Something is pending and the interval since the last checkpoint has passed."""
        return bool(self.pending) and self.clock() - self._last >= self.interval_s

    def take(self) -> Pending[A, H]:
        """Hand over everything pending (to be written, then released) and restart the interval."""
        out, self.pending = self.pending, Pending()
        self._last = self.clock()
        return out


async def serialise(
    checkpoint: Callable[[list[str]], Mapping[str, tuple[int, bytes]]], devices: Iterable[str]
) -> dict[bytes, tuple[int, bytes]]:
    """``checkpoint`` (``Processor.checkpoint``: device -> (partition, state)) of ``devices``, keyed for the
    changelog, ``SERIALISE_CHUNK`` devices per turn of the event loop, so that batches waiting to be
    processed run in between."""
    todo = list(devices)
    records: dict[bytes, tuple[int, bytes]] = {}
    for start in range(0, len(todo), SERIALISE_CHUNK):
        if start:
            await asyncio.sleep(0)
        records.update((dev.encode(), item) for dev, item in checkpoint(todo[start : start + SERIALISE_CHUNK]).items())
    return records
