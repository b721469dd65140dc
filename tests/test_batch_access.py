"""Checked access to many objects at once: Class.check, Class.views, and the raw Heap.arena."""

from __future__ import annotations

import multiprocessing
from array import array

import pytest

import slitter
import workers


def test_views_are_the_objects(heap):
    cls = heap.register_class("rec", size=40)
    handles = cls.allocate_many(300)
    views = cls.views(handles)
    assert [len(v) for v in views] == [40] * 300 and all(not v.readonly for v in views)
    for i, v in enumerate(views):
        v[:] = bytes([i % 251]) * 40
    assert all(bytes(heap.view(h)) == bytes([i % 251]) * 40 for i, h in enumerate(handles))
    assert cls.views(list(handles)[:3]) and cls.views([]) == []
    checked = cls.check(list(handles))
    assert isinstance(checked, array) and checked.tolist() == handles.tolist()
    cls.release_many(handles)


def test_arena_offsets_are_handles(heap):
    cls = heap.register_class("rec", size=40)
    h = cls.allocate()
    arena = heap.arena
    arena[h:h + 40] = b"x" * 40
    assert bytes(heap.view(h)) == b"x" * 40 and not arena.readonly
    cls.release(h)


@pytest.mark.parametrize("verb", ["check", "views"])
@pytest.mark.parametrize("make_bad,error", [
    (lambda hs, other: other, slitter.ClassMismatch),
    (lambda hs, other: hs[3] + 8, slitter.InteriorPointer),
    (lambda hs, other: 16, slitter.ForeignAddress),
    (lambda hs, other: 1 << 70, slitter.ForeignAddress),
    (lambda hs, other: -8, slitter.ForeignAddress),
])
def test_a_bad_handle_is_named_and_nothing_changes(heap, verb, make_bad, error):
    cls = heap.register_class("b", size=32)
    other = heap.register_class("o", size=32).allocate()
    handles = list(cls.allocate_many(50))
    bad = make_bad(handles, other)
    before = heap.stats()["classes"]
    with pytest.raises(error) as info:
        getattr(cls, verb)([*handles[:20], bad, *handles[20:]])
    err = info.value
    assert err.handle == bad and err.class_name == "b"
    assert ("checked" if verb == "check" else "viewed") + " as class 'b'" in str(err)
    if error is slitter.ClassMismatch:
        assert err.expected_class == "o" and "'o'" in str(err)
    after = heap.stats()["classes"]
    for name in ("b", "o"):  # nothing released, nothing counted as a refused release
        assert after[name]["live"] == before[name]["live"]
        assert after[name]["errors"] == before[name]["errors"]
    cls.release_many(handles)


@pytest.mark.parametrize("verb", ["check", "views"])
def test_a_released_object_is_not_live(heap, verb):
    cls = heap.register_class("b", size=32)
    handles = list(cls.allocate_many(10))
    cls.release(handles[6])
    with pytest.raises(slitter.DoubleFree, match=f"{handles[6]:#x} of class 'b' is not live"):
        getattr(cls, verb)(handles)
    cls.release_many(handles[:6] + handles[7:])


def test_arena_after_close(daemon):
    heap = slitter.connect(daemon.address)
    cls = heap.register_class("late", size=16)
    h = cls.allocate()
    arena = heap.arena
    arena[h:h + 16] = b"k" * 16
    heap.close()
    assert bytes(arena[h:h + 16]) == b"k" * 16  # still mapped: a view of it is alive
    with pytest.raises(slitter.SlitterError, match="closed"):
        heap.arena
    with pytest.raises(slitter.SlitterError, match="closed"):
        cls.views([h])


def test_another_process_writes_through_the_arena(daemon, heap):
    ctx = multiprocessing.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=workers.arena_writer, args=(daemon.address, 500, queue, done))
    child.start()
    try:
        cls = heap.register_class("shared", size=48)
        handles = queue.get(timeout=60)
        views = cls.views(handles)
        assert [bytes(v) for v in views] == [i.to_bytes(8, "little") * 6 for i in range(500)]
        cls.release_many(handles)  # any process may release
        with pytest.raises(slitter.DoubleFree):
            cls.check(handles)
    finally:
        done.put(None)
        child.join(30)


def test_checking_an_array_protects_new_guard_pages_first(daemon, heap):
    """Runs another process carved after this one attached: check() of an array('Q') protects their
    guard pages here before it says the objects may be touched."""
    ctx = multiprocessing.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=workers.arena_writer, args=(daemon.address, 500, queue, done))
    child.start()
    try:
        handles = array("Q", queue.get(timeout=60))
        cls = heap.register_class("shared", size=48)
        assert heap._client.guards_applied < heap._guards.header.nruns  # carved by the writer
        assert cls.check(handles) is handles
        assert heap._client.guards_applied == heap._guards.header.nruns
        cls.release_many(handles)
    finally:
        done.put(None)
        child.join(30)
