"""The checkpoint cadence: what a worker writes once per interval, and what it releases only after."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.cadence import SERIALISE_CHUNK, CheckpointCadence, serialise


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_devices_advanced_within_an_interval_are_checkpointed_once_with_what_waited_for_them() -> None:
    clock = Clock()
    cadence: CheckpointCadence[str, str] = CheckpointCadence(1.0, clock)
    cadence.hold(["m1", "m2"])
    cadence.add({"a", "b"}, ["hole1"])
    clock.now += 0.4
    assert not cadence.due()
    cadence.hold(["m3"])
    cadence.add({"b", "c"})
    clock.now += 0.6
    assert cadence.due()
    pending = cadence.take()
    assert pending.devices == {"a", "b", "c"}
    assert pending.acks == ["m1", "m2", "m3"]  # in the order they were taken
    assert pending.holes == ["hole1"]
    # The interval restarts at the checkpoint; nothing is handed over twice.
    assert not cadence.pending and not cadence.due()
    cadence.add({"a"})
    clock.now += 0.9
    assert not cadence.due()
    clock.now += 0.1
    assert cadence.take().devices == {"a"}


def test_nothing_pending_is_never_due_and_a_zero_interval_is_every_micro_batch() -> None:
    clock = Clock()
    idle: CheckpointCadence[str, str] = CheckpointCadence(1.0, clock)
    clock.now += 10
    assert not idle.due()
    # A message that advanced no device (a dead letter, a replay) still waits for the checkpoint.
    idle.hold(["dead-letter"])
    assert idle.due()
    every: CheckpointCadence[str, str] = CheckpointCadence(0.0, clock)
    assert not every.due()
    every.add({"a"})
    assert every.due()
    assert every.take().devices == {"a"}
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
