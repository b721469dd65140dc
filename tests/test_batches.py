"""allocate_many / release_many: one native call for many objects, every check still made."""

from __future__ import annotations

from array import array

import pytest

import slitter
from slitter import _fastpath
from slitter._native import lib


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
    assert info.value.handle == bad and info.value.released == 0
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
    # More than both magazines hold, however far this thread's grew while allocating.
    handles = list(cls.allocate_many(3 * lib.SLITTER_MAG_CAP))
    with pytest.raises(slitter.DoubleFree) as info:
        cls.release_many([*handles, handles[5]])  # the repeat is found only while releasing
    assert info.value.handle == handles[5] and info.value.released > 0
    stats = heap.stats()["classes"]["big"]
    assert stats["live"] == len(handles) - info.value.released
    bad = handles[-1] + 4  # an interior pointer at the end: the up-front check refuses it, none released
    rest = handles[info.value.released:]
    with pytest.raises(slitter.InteriorPointer) as info:
        cls.release_many([*rest, bad])
    assert info.value.released == 0
    assert heap.stats()["classes"]["big"]["live"] == len(rest)
    cls.release_many(rest)
    assert heap.stats()["classes"]["big"]["live"] == 0


class Handles(array):
    """A subclass of array: slitter._batch does not take it, the general path does."""


@pytest.mark.parametrize("container", [list, array, Handles])
def test_arrays_and_lists_get_the_same_checks(heap, container):
    """An array('Q') goes straight to the native call; a list or a subclass takes the general path."""
    cls = heap.register_class("both", size=32)
    handles = cls.allocate_many(40)
    cls.release(handles[17])
    batch = container(handles) if container is list else container("Q", handles)
    with pytest.raises(slitter.DoubleFree) as info:
        cls.release_many(batch)
    assert info.value.handle == handles[17] and info.value.released == 0
    assert heap.stats()["classes"]["both"]["live"] == 39
    rest = array("Q", [h for i, h in enumerate(handles) if i != 17])
    assert cls.check(rest) is rest
    cls.release_many(rest if container is array else list(rest))
    assert heap.stats()["classes"]["both"]["live"] == 0


def live_index(heap, handle):
    """The live-map index of an object (as the native checks compute it)."""
    span = heap._view.spans[handle >> lib.SLITTER_SPAN_SHIFT]
    stride = heap._classes_table[span.class_id].stride
    return span.obj_base + (handle - (span.run_first_span << lib.SLITTER_SPAN_SHIFT)) // stride


@pytest.mark.parametrize("victim", [0, 3, 7, 8, 62])
def test_a_live_map_word_is_marked_whole_or_not_at_all(heap, victim):
    """Eight objects whose live bytes fill one word are released with one compare-and-swap of the
    word; any of the eight not live must fail it, name that object, and leave all eight live."""
    cls = heap.register_class("words", size=64)
    handles = cls.allocate_many(64)
    indexes = sorted(live_index(heap, h) for h in handles)
    assert indexes == list(range(indexes[0], indexes[0] + 64)) and indexes[0] % 8 == 0  # eight whole words
    cls.release(handles[victim])
    shuffled = array("Q", handles[::-1])  # any order inside a word
    with pytest.raises(slitter.DoubleFree) as info:
        cls.release_many(shuffled)
    assert info.value.handle == handles[victim] and info.value.released == 0
    assert heap.stats()["classes"]["words"]["live"] == 63
    rest = array("Q", [h for i, h in enumerate(handles) if i != victim])
    assert cls.check(rest) is rest  # every other live byte is LIVE again
    with pytest.raises(slitter.DoubleFree) as info:  # the word around the victim was not marked either
        cls.release_many(array("Q", [handles[victim ^ 1], handles[victim]]))
    assert info.value.handle == handles[victim]
    cls.release_many(rest)
    assert heap.stats()["classes"]["words"]["live"] == 0


@pytest.mark.parametrize("first,second,error", [
    (5, 20, slitter.DoubleFree),       # released before, then an interior pointer later on
    (2, 5, slitter.InteriorPointer),   # an interior pointer, then one released before
])
def test_the_first_bad_handle_in_the_batch_is_named(heap, first, second, error):
    cls = heap.register_class("order", size=64)
    handles = cls.allocate_many(64)
    released, interior = (handles[first], handles[second]) if error is slitter.DoubleFree else \
        (handles[second], handles[first])
    cls.release(released)
    batch = array("Q", handles)
    batch[first if error is slitter.InteriorPointer else second] = interior + 8
    with pytest.raises(error) as info:
        cls.release_many(batch)
    assert info.value.handle == batch[first] and info.value.released == 0
    assert heap.stats()["classes"]["order"]["live"] == 63
    cls.release_many(array("Q", [h for h in handles if h != released]))


@pytest.mark.parametrize("extra", [-1, 0, 1, 10])
def test_a_batch_past_one_native_call(heap, extra):
    """Batches of BATCH_LIMIT handles or more do not fit one packed call: they take the general path."""
    cls = heap.register_class("huge", size=16)
    n = _fastpath.BATCH_LIMIT + extra
    handles = cls.allocate_many(n)
    assert len(handles) == n and len(set(handles)) == n
    assert cls.check(handles) is handles
    with pytest.raises(slitter.InteriorPointer):  # the last handle is checked too
        cls.check(array("Q", [*handles[:-1], handles[-1] + 1]))
    cls.release_many(handles)
    assert heap.stats()["classes"]["huge"]["live"] == 0


@pytest.mark.parametrize("bad", [0, 63, 64, 150, 199])
def test_a_refusal_past_the_first_chunk_undoes_every_chunk(heap, bad):
    """The all-or-none call marks live bytes 64 handles at a time: a refusal in a later chunk
    restores the chunks before it."""
    cls = heap.register_class("chunks", size=64)
    handles = cls.allocate_many(200)
    cls.release(handles[bad])
    with pytest.raises(slitter.DoubleFree) as info:
        cls.release_many(handles)
    assert info.value.handle == handles[bad] and info.value.released == 0
    rest = array("Q", [h for i, h in enumerate(handles) if i != bad])
    assert cls.check(rest) is rest  # all 199 still live
    assert heap.stats()["classes"]["chunks"]["live"] == 199
    cls.release_many(rest)
    assert heap.stats()["classes"]["chunks"]["live"] == 0


def rising_by_stride(handles, stride: int) -> bool:
    return all(b - a == stride for a, b in zip(handles, handles[1:]))


def test_a_fresh_run_is_handed_out_in_rising_order(heap):
    cls = heap.register_class("rising", size=1024)
    assert rising_by_stride(cls.allocate_many(64), cls.stride)
    singles = [cls.allocate() for _ in range(8)]
    assert rising_by_stride(singles, cls.stride)


def test_a_released_batch_comes_back_in_its_order(heap):
    cls = heap.register_class("again", size=64)
    batch = cls.allocate_many(64)
    cls.release_many(batch)
    assert list(cls.allocate_many(64)) == list(batch)  # not reversed: what the prefetcher follows stays so


def test_a_batch_split_between_the_magazines_keeps_each_part_in_order(heap):
    cls = heap.register_class("split", size=64)
    cap = heap._classes_table[cls.id].mag_capacity
    held = cls.allocate_many(cap - 32)  # 32 left in the allocation magazine; the spare is full
    batch = cls.allocate_many(64)  # the last 32, then 32 of the spare
    cls.release_many(batch)  # 32 fit the allocation magazine's room, 32 go to the release magazine
    assert list(cls.allocate_many(32)) == list(batch[:32])
    held.extend(cls.allocate_many(cap - 32))  # the allocation magazine is empty again
    assert list(cls.allocate_many(32)) == list(batch[32:])  # the release magazine, moved over
    cls.release_many(held)


def test_reclaimed_objects_are_handed_out_in_rising_order(daemon, heap):
    with slitter.connect(daemon.address) as other:
        other.register_class("reclaimed", size=1024).allocate()  # its magazines keep the rest of the run
    cls = heap.register_class("reclaimed", size=1024)
    assert heap.stats()["classes"]["reclaimed"]["free"] > 64  # the other client's cache, back in the depot
    assert rising_by_stride(cls.allocate_many(64), cls.stride)


def test_only_an_exact_array_of_uint64_goes_to_the_native_batch_call(heap):
    """slitter._batch takes array('Q') itself; anything else gets None and the general path, with every check."""
    from slitter import _batch

    cls = heap.register_class("adapter", size=64)
    handles = cls.allocate_many(8)
    assert _fastpath.check_array(cls._key, handles) == _fastpath.OK
    empty, other_typecode = array("Q"), array("L", handles)
    for other in (list(handles), Handles("Q", handles), other_typecode, memoryview(handles), empty):
        for call in (_fastpath.check_array, _fastpath.release_array, _fastpath.allocate_into):
            assert call(cls._key, other) is None, (call, type(other))
    for arr in (handles, empty, other_typecode):  # taken or not, the array is not left exported
        arr.append(0)
        arr.pop()
    checked = cls.check(memoryview(handles))  # a view of someone's memory: checked as a copy of its own
    assert type(checked) is array and list(checked) == list(handles)
    cls.release_many(Handles("Q", handles))  # the general path releases it
    assert heap.stats()["classes"]["adapter"]["live"] == 0
    with pytest.raises(slitter.DoubleFree):  # and refuses as the native call does
        cls.check(Handles("Q", handles))
    with pytest.raises(TypeError):
        _batch.check(cls._key)
    with pytest.raises(OverflowError):
        _batch.check(1 << 40, handles)
    with pytest.raises(RuntimeError):  # bound once, by slitter._fastpath
        _batch.bind(array, 1, 1, 1)
