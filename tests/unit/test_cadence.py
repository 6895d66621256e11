"""The checkpoint cadence: what a worker writes once per interval, and what it releases only after."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.cadence import SERIALISE_CHUNK, SLICES, CheckpointCadence, Pending, serialise


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_devices_advanced_by_many_batches_are_checkpointed_once_with_what_waited_for_them() -> None:
    cadence: CheckpointCadence[str, str] = CheckpointCadence(1.0, Clock())
    cadence.add(["a", "b"], ["hole1"], ["m1", "m2"])
    cadence.add(["b", "c"], acks=["m3"])
    cadence.add(["a"], acks=["m4"])
    pending = cadence.take(everything=True)
    assert pending.devices == ["a", "b", "c"]  # each once, in the order first dirtied
    assert pending.acks == ["m1", "m2", "m3", "m4"]  # in the order they were taken
    assert pending.holes == ["hole1"]
    assert not cadence and not cadence.take()  # nothing is handed over twice


def test_a_slice_takes_the_oldest_batches_until_a_share_of_the_dirty_devices_and_every_device_dirty_since() -> None:
    """Each checkpoint takes the oldest batches until the devices dirty since them are a SLICES-th of the dirty
    ones, with every such device, even one a later batch advanced too (its state is serialised now, further
    ahead than those messages). The messages of a batch whose devices are not all taken wait."""
    clock = Clock()
    cadence: CheckpointCadence[str, str] = CheckpointCadence(3.0, clock)
    for i in range(12):  # 12 batches of 2 new devices each; the last one advances d0 again
        cadence.add([f"d{2 * i}", f"d{2 * i + 1}", "d0"], acks=[f"m{i}"], holes=[f"h{i}"] if i == 1 else [])
    first = cadence.take()
    assert first.devices == ["d0", "d1", "d2", "d3"]  # 24 dirty / SLICES
    assert first.acks == ["m0", "m1"] and first.holes == ["h1"]
    assert not cadence.due()
    clock.now += 3.0 / SLICES
    assert cadence.due()
    # 20 dirty devices left: a share is 3.3, so two more batches.
    second = cadence.take()
    assert second.devices == ["d4", "d5", "d6", "d7"] and second.acks == ["m2", "m3"]
    # Batches that have waited the interval all go, whatever the share.
    clock.now += 3.0
    rest = cadence.take()
    assert rest.devices == [f"d{i}" for i in range(8, 24)] and rest.acks == [f"m{i}" for i in range(4, 12)]
    assert not cadence


def test_a_paced_fleet_is_checkpointed_in_even_slices_each_device_once_per_interval() -> None:
    """A fleet that uploads every device once a step, spread over the step, in batches of 50 ms: each
    checkpoint is about a SLICES-th of the fleet (one interval's checkpoint was the whole fleet), each device
    is checkpointed about once per interval, and no message waits longer than an interval and a slice."""
    clock = Clock()
    cadence: CheckpointCadence[float, str] = CheckpointCadence(3.0, clock)
    fleet, per_batch = 600, 30  # 20 batches a second
    taken: list[Pending[float, str]] = []
    waited: list[float] = []
    start = clock.now
    for step in range(30 * 20):  # 30 s
        first = (step % 20) * per_batch
        cadence.add([f"d{d}" for d in range(first, first + per_batch)], acks=[clock.now])
        if cadence.due():
            taken.append(cadence.take())
            waited.extend(clock.now - added for added in taken[-1].acks)
        clock.now += 0.05
    steady = [len(p.devices) for p in taken if p.acks and p.acks[0] - start >= 10]
    assert len(steady) >= 30
    assert max(steady) <= 2 * fleet / SLICES
    assert max(waited) <= 3.0 + 3.0 / SLICES + 0.05
    checkpoints = sum(len(p.devices) for p in taken if p.acks and p.acks[0] - start >= 10)
    span = max(p.acks[-1] for p in taken) - 10 - start
    assert 0.8 < checkpoints / (fleet * span / 3.0) < 1.5  # about once per interval per device


def test_a_checkpoint_is_due_once_per_slice_of_the_interval() -> None:
    clock = Clock()
    cadence: CheckpointCadence[str, str] = CheckpointCadence(3.0, clock)
    cadence.add(["a"])
    assert not cadence.due()  # the interval starts at creation
    clock.now += 0.5
    assert cadence.due()
    cadence.take()
    assert not cadence.due()  # nothing pending
    cadence.add(["b"])
    clock.now += 0.25
    assert not cadence.due()
    clock.now += 0.25
    assert cadence.due()


def test_nothing_pending_is_never_due_and_a_zero_interval_is_every_micro_batch() -> None:
    clock = Clock()
    idle: CheckpointCadence[str, str] = CheckpointCadence(1.0, clock)
    clock.now += 10
    assert not idle.due()
    # A message that advanced no device (a dead letter, a replay) still waits for the checkpoint.
    idle.add((), acks=["dead-letter"])
    clock.now += 1
    assert idle.due()
    assert idle.take().acks == ["dead-letter"]
    every: CheckpointCadence[str, str] = CheckpointCadence(0.0, clock)
    assert not every.due()
    every.add({"a"})
    assert every.due()
    assert every.take().devices == ["a"]
    assert not every.due()


def test_a_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="interval"):
        CheckpointCadence(-1.0)


def test_a_checkpoint_is_serialised_a_chunk_at_a_time_with_other_work_in_between() -> None:
    chunks: list[int] = []
    turns: list[int] = []

    def checkpoint(devices: list[str]) -> dict[str, tuple[int, bytes]]:
        chunks.append(len(devices))
        return {d: (int(d[1:]) % 4, d.encode()) for d in devices}

    async def other_work() -> None:
        while len(chunks) < 3:
            turns.append(len(chunks))
            await asyncio.sleep(0)

    async def main() -> dict[bytes, tuple[int, bytes]]:
        task = asyncio.ensure_future(other_work())
        await asyncio.sleep(0)
        records = await serialise(checkpoint, [f"d{i}" for i in range(2 * SERIALISE_CHUNK + 88)])
        await task
        return records

    records = asyncio.run(main())
    assert chunks == [SERIALISE_CHUNK, SERIALISE_CHUNK, 88]
    assert {1, 2} <= set(turns)  # the other task ran between the chunks
    assert len(records) == 2 * SERIALISE_CHUNK + 88
    assert records[b"d5"] == (1, b"d5")
