"""When device checkpoints are written: each device once per interval, not once per micro-batch, and spread
over the interval, not the whole fleet at once.

A micro-batch's outputs (dead letters, InfluxDB points, scores) are written as soon as it is processed;
the device states it advanced are only marked dirty here, with the batch that first dirtied them since
their last checkpoint. Every ``interval_s / SLICES`` the oldest batches are checkpointed: every batch that
has waited ``interval_s`` and more, oldest first, until the devices dirty since them are a ``SLICES``-th of
the dirty devices. Only once those devices are written is what depends on their state released: the acks
of the batches' messages (so that their offsets may be committed) and the offset holes repaired meanwhile.
This is Kafka Streams' commit interval with its record cache: a device touched by many micro-batches
within an interval is written about once, with its latest state. A crash replays at most an interval and
a slice of messages from the committed offsets, which the per-device offset guard and the keyed outputs
absorb exactly as they absorb a micro-batch's.

Why slices: a paced fleet touches every device every step, so one checkpoint per interval was the whole
fleet at once (7,500 devices: ~75 ms of serialising and ~9 MB to the changelog every 3 s), and every
reading that arrived meanwhile waited for it. Taking a share of the dirty devices per slice, not only those
an interval old, spreads them: devices checkpointed together are dirtied again together, so by age alone
the fleet would stay in a few lumps.

Why releases wait for the batch, not the device: a batch's messages are released once every device dirty
since a batch no newer than theirs is checkpointed. A device one of them advanced is either dirty since a
batch no newer than theirs, so in this checkpoint, or was checkpointed after they were processed.

No I/O: bookkeeping, and :func:`serialise`, which only yields to the event loop between chunks. The agent
(``pipeline/agents.py``) and the lean loop (``bench/lean.py``) write what :meth:`CheckpointCadence.take`
hands them.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

# Devices serialised between two turns of the event loop when a checkpoint is written in the background
# (~3-9 ms): a fleet's checkpoint in one go stalled every reading that arrived meanwhile.
SERIALISE_CHUNK = 256
# Checkpoints per interval, each of about this share of the dirty devices.
SLICES = 6

A = TypeVar("A")  # what to acknowledge once checkpointed (a Faust message)
H = TypeVar("H")  # an offset hole to release once checkpointed


@dataclass
class Pending(Generic[A, H]):
    """What one checkpoint covers: the devices to write, then the acks and holes to release."""

    devices: list[str] = field(default_factory=list)
    acks: list[A] = field(default_factory=list)
    holes: list[H] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.devices or self.acks or self.holes)


@dataclass
class _Batch(Generic[A, H]):
    seq: int
    at: float
    acks: list[A]
    holes: list[H]


class CheckpointCadence(Generic[A, H]):
    """Dirty devices, with the batch that first dirtied each, and the processed batches' acks and holes, in
    order; a checkpoint is due every ``interval_s / SLICES`` (0: after every micro-batch). ``clock`` is
    monotonic seconds."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if interval_s < 0:
            raise ValueError(f"checkpoint interval must be >= 0, got {interval_s}")
        self.interval_s = interval_s
        self.clock = clock
        self._dirty: OrderedDict[str, int] = OrderedDict()  # in the order first dirtied: device -> batch
        self._batches: deque[_Batch[A, H]] = deque()
        self._seq = 0
        self._last = clock()

    def add(self, devices: Iterable[str], holes: Iterable[H] = (), acks: Iterable[A] = ()) -> None:
        """A processed micro-batch: the devices it advanced, the holes it repaired and its messages, which
        are acknowledged only once the state they advanced is checkpointed."""
        self._seq += 1
        self._batches.append(_Batch(self._seq, self.clock(), list(acks), list(holes)))
        dirty = self._dirty
        for device in devices:
            if device not in dirty:
                dirty[device] = self._seq

    def __bool__(self) -> bool:
        return bool(self._batches)

    def due(self) -> bool:
        """Something is pending and a slice of the interval has passed since the last checkpoint."""
        return bool(self._batches) and self.clock() - self._last >= self.interval_s / SLICES

    def take(self, everything: bool = False) -> Pending[A, H]:
        """Hand over the oldest batches, with every device dirty since one of them, to be written, then
        released: every batch that has waited the interval, and more until the devices handed over are a
        ``SLICES``-th of those dirty (``everything``: all of them)."""
        now = self.clock()
        self._last = now
        out: Pending[A, H] = Pending()
        batches, dirty = self._batches, self._dirty
        share = len(dirty) / SLICES
        while batches and (everything or now - batches[0].at >= self.interval_s or len(out.devices) < share):
            batch = batches.popleft()
            out.acks.extend(batch.acks)
            out.holes.extend(batch.holes)
            while dirty and dirty[next(iter(dirty))] <= batch.seq:
                out.devices.append(dirty.popitem(last=False)[0])
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
