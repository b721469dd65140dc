"""allocate_many / release_many: one native call for many objects, every check still made."""

from __future__ import annotations

from array import array

import pytest

import slitter


def test_allocate_many_and_release_many(heap):
    cls = heap.register_class("batch", size=64, zero_init=True)
    handles = cls.allocate_many(5000)  # crosses several refills
    assert isinstance(handles, array) and len(handles) == 5000 and len(set(handles)) == 5000
    assert all(bytes(heap.view(h)) == bytes(64) for h in handles[:100])
    assert heap.stats()["classes"]["batch"]["live"] == 5000
    cls.release_many(handles)  # crosses several flushes
    stats = heap.stats()["classes"]["batch"]
    assert stats["live"] == 0 and stats["releases"] == 5000
    assert stats["carved"] == stats["live"] + stats["cached"] + stats["free"]
    assert len(cls.allocate_many(0)) == 0
    cls.release_many([])


@pytest.mark.parametrize("make_bad,error", [
    (lambda hs, other: other, slitter.ClassMismatch),
    (lambda hs, other: hs[3] + 8, slitter.InteriorPointer),
    (lambda hs, other: 16, slitter.ForeignAddress),
    (lambda hs, other: 1 << 70, slitter.ForeignAddress),
])
def test_a_bad_handle_releases_none_of_the_batch(heap, make_bad, error):
    cls = heap.register_class("b", size=32)
    other = heap.register_class("o", size=32).allocate()
    handles = list(cls.allocate_many(100))
    bad = make_bad(handles, other)
    with pytest.raises(error) as info:
        cls.release_many([*handles[:50], bad, *handles[50:]])
    assert info.value.handle == bad
    assert heap.stats()["classes"]["b"]["live"] == 100  # none released
    cls.release_many(handles)  # all still live, all releasable


def test_double_free_in_a_batch_releases_none(heap):
    cls = heap.register_class("d", size=32)
    handles = list(cls.allocate_many(10))
    cls.release(handles[4])
    with pytest.raises(slitter.DoubleFree) as info:
        cls.release_many(handles)
    assert info.value.handle == handles[4]
    assert heap.stats()["classes"]["d"]["live"] == 9
    del handles[4]
    cls.release_many(handles)


def test_duplicate_inside_a_batch(heap):
    cls = heap.register_class("dup", size=32)
    handles = list(cls.allocate_many(10))
    with pytest.raises(slitter.DoubleFree) as info:
        cls.release_many([*handles, handles[2]])
    assert info.value.handle == handles[2] and info.value.released == 0
    assert heap.stats()["classes"]["dup"]["live"] == 10  # one chunk: all or none
    cls.release_many(handles)


def test_batch_refusals_are_counted_and_audited(heap):
    cls = heap.register_class("count", size=32)
    with pytest.raises(slitter.ForeignAddress):
        cls.release_many([16])
    assert heap.stats()["classes"]["count"]["errors"]["foreign_address"] == 1
    assert heap.audit()["entries"][-1][5] == "foreign_address"


@pytest.mark.parametrize("n", [-1, -64])
def test_allocate_many_refuses_a_negative_count(heap, n):
    cls = heap.register_class("neg", size=32)
    with pytest.raises(ValueError, match="'neg'.*n >= 0"):
        cls.allocate_many(n)
    assert heap.stats()["classes"]["neg"]["live"] == 0


def test_a_batch_bigger_than_the_magazines_is_checked_whole(heap):
    """Past the room of both magazines the batch goes in chunks, after a check of all of it."""
    cls = heap.register_class("big", size=16)
    cap = heap._classes_table[cls.id].mag_capacity
    handles = list(cls.allocate_many(3 * cap))
    with pytest.raises(slitter.DoubleFree) as info:
        cls.release_many([*handles, handles[5]])  # the repeat is found only while releasing
    assert info.value.handle == handles[5] and info.value.released > 0
    stats = heap.stats()["classes"]["big"]
    assert stats["live"] == 3 * cap - info.value.released
    bad = handles[-1] + 4  # an interior pointer at the end: the up-front check refuses it, none released
    rest = handles[info.value.released:]
    with pytest.raises(slitter.InteriorPointer):
        cls.release_many([*rest, bad])
    assert heap.stats()["classes"]["big"]["live"] == len(rest)
    cls.release_many(rest)
    assert heap.stats()["classes"]["big"]["live"] == 0
