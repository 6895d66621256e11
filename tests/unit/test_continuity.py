"""Offset continuity: holes in what the consumer delivered are found where they are, replays are not holes."""

from __future__ import annotations

from pipeline.continuity import Hole, OffsetContinuity


def test_contiguous_delivery_has_no_holes() -> None:
    c = OffsetContinuity()
    c.expect({0: 10, 1: 0})
    assert c.advance([(0, 10), (1, 0), (0, 11), (1, 1)]) == []
    assert c.advance([(0, 12), (1, 2)]) == []


def test_hole_at_the_first_message_after_assignment() -> None:
    """The restart case: committed 525, the first message Faust hands over is 659."""
    c = OffsetContinuity()
    c.expect({2: 525})
    assert c.advance([(1, 7), (2, 659), (2, 660)]) == [Hole(partition=2, start=525, end=659, before=1)]
    assert c.advance([(2, 661)]) == []


def test_hole_inside_a_batch_and_on_two_partitions() -> None:
    c = OffsetContinuity()
    c.expect({0: 0, 1: 0})
    holes = c.advance([(0, 0), (0, 1), (1, 0), (0, 5), (1, 3), (0, 6)])
    assert holes == [Hole(0, 2, 5, 3), Hole(1, 1, 3, 4)]


def test_replays_below_the_expected_offset_are_not_holes_and_do_not_move_it_back() -> None:
    c = OffsetContinuity()
    c.expect({0: 100})
    assert c.advance([(0, 90), (0, 99)]) == []
    assert c.advance([(0, 100), (0, 95), (0, 101)]) == []
    assert c.advance([(0, 103)]) == [Hole(0, 102, 103, 0)]


def test_untracked_partition_starts_at_its_first_delivered_offset() -> None:
    c = OffsetContinuity()
    assert c.advance([(3, 40), (3, 41)]) == []
    assert c.advance([(3, 44)]) == [Hole(3, 42, 44, 0)]


def test_forget_then_reassign_restarts_at_the_committed_offset() -> None:
    c = OffsetContinuity()
    c.expect({0: 0})
    c.advance([(0, 0), (0, 1), (0, 2)])
    c.forget([0])
    assert c.advance([(0, 9)]) == []  # untracked again: no hole from its old position
    c.forget([0])
    c.expect({0: 1})  # committed 1: offsets 1.. are delivered again
    assert c.advance([(0, 1), (0, 2), (0, 3)]) == []
