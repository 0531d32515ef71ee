"""OffsetBook: which offsets may be committed (pure logic)."""

from posemesh.stages.offsets import OffsetBook


def test_commit_stops_at_the_first_offset_whose_output_does_not_exist():
    book = OffsetBook()
    tp = ("rtmpose_x", 0)
    for off in range(5):
        book.add(tp, off)
    book.done(tp, 0)
    book.done(tp, 1)
    book.done(tp, 3)  # 2 is still waiting in a re-order buffer
    [c] = book.committable()
    assert (c.topic, c.partition, c.offset) == ("rtmpose_x", 0, 2)
    assert book.committable() == []  # nothing new
    book.done(tp, 2)
    [c] = book.committable()
    assert c.offset == 4  # 2 and 3 done; 4 pending
    assert book.pending() == 1


def test_partitions_are_independent_and_forgettable():
    book = OffsetBook()
    a, b = ("t", 0), ("t", 1)
    book.add(a, 10)
    book.add(b, 7)
    book.done(b, 7)
    assert [(c.partition, c.offset) for c in book.committable()] == [(1, 8)]
    book.forget(a)
    book.done(a, 10)  # ignored: the partition moved to another worker
    assert book.committable() == [] and book.pending() == 0
