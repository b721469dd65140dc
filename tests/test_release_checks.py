"""Every release check: refused, reported with handle and class, nothing changed."""

from __future__ import annotations

import multiprocessing
from array import array

import pytest
from conftest import run_spawned, settled_thread_class

import slitter
import workers
from slitter._native import lib


@pytest.fixture
def classes(heap):
    return heap.register_class("order", size=64), heap.register_class("trade", size=1000)


def errors_of(heap, name):
    return heap.stats()["classes"][name]["errors"]


def test_class_mismatch(heap, classes):
    order, trade = classes
    h = trade.allocate()
    with pytest.raises(slitter.ClassMismatch) as info:
        order.release(h)
    err = info.value
    assert err.handle == h and err.class_name == "order" and err.expected_class == "trade"
    assert hex(h) in str(err) and "'order'" in str(err) and "'trade'" in str(err)
    assert isinstance(err, slitter.ReleaseError)
    trade.release(h)  # refused means unchanged: still live, the right release works
    assert errors_of(heap, "order")["class_mismatch"] == 1


def test_interior_pointer(heap, classes):
    _, trade = classes
    h = trade.allocate()
    for delta in (1, 8, 999):
        with pytest.raises(slitter.InteriorPointer, match=f"{h + delta:#x}.*'trade'"):
            trade.release(h + delta)
    trade.release(h)
    assert errors_of(heap, "trade")["interior_pointer"] == 3


@pytest.mark.parametrize("bad", [
    0,                       # NULL
    12345,                   # the guard span before the first run
    1 << 40,                 # inside the arena, in a span no class owns
    (1 << 48) - 16,          # beyond the arena
    1 << 48,                 # another segment index
    (1 << 64) - 1,           # largest u64
    1 << 70,                 # not a u64 at all
    -16,                     # negative
])
def test_foreign_address(heap, classes, bad):
    order, _ = classes
    order.allocate()
    with pytest.raises(slitter.ForeignAddress) as info:
        order.release(bad)
    assert info.value.class_name == "order" and "'order'" in str(info.value)


def test_guard_page_and_run_tail_are_foreign(heap, classes):
    order, _ = classes
    h = order.allocate()
    cls = heap._classes_table[order.id]
    run_start = h & ~(lib.SLITTER_SPAN_SIZE - 1)  # the first run starts at span 1
    run_end = run_start + cls.spans_per_run * lib.SLITTER_SPAN_SIZE
    first_after_objects = run_start + cls.objects_per_run * cls.stride
    for bad in (first_after_objects, run_end - lib.SLITTER_PAGE_SIZE, run_end - 64):
        with pytest.raises(slitter.ForeignAddress):
            order.release(bad)


def test_double_free_back_to_back(heap, classes):
    order, _ = classes
    h = order.allocate()
    order.release(h)
    with pytest.raises(slitter.DoubleFree) as info:
        order.release(h)
    assert info.value.handle == h and hex(h) in str(info.value) and "'order'" in str(info.value)
    assert errors_of(heap, "order")["double_free"] == 1


def test_double_free_after_many_other_releases_shelved_and_flushed(heap, classes):
    order, _ = classes
    handles = [order.allocate() for _ in range(lib.SLITTER_MAG_CAP * (lib.SLITTER_SHELF_PER_CLASS + 3))]
    tc = settled_thread_class(heap, order)
    capacity, room = tc.capacity, tc.capacity - tc.alloc_count  # the thread's magazines, grown as it allocated
    # Released in order: the first `room` fill the allocation magazine, the next
    # SLITTER_SHELF_PER_CLASS magazines go on the shelf, the rest to the daemon.
    on_shelf, in_depot = handles[room], handles[room + capacity * lib.SLITTER_SHELF_PER_CLASS + 1]
    for h in handles:
        order.release(h)
    figures = heap.stats()["classes"]["order"]
    assert figures["flushes"] > 0 and figures["shelf_puts"] == lib.SLITTER_SHELF_PER_CLASS, figures
    assert figures["shelved"] == capacity * lib.SLITTER_SHELF_PER_CLASS
    for victim in (on_shelf, in_depot):
        with pytest.raises(slitter.DoubleFree):
            order.release(victim)
    assert errors_of(heap, "order")["double_free"] == 2
    # and each victim is handed out exactly once afterwards: allocate until every object released above came
    # back, none twice.  Not just `carved` allocations: a spare prefetched meanwhile may be filled from a run
    # carved ahead while older objects still wait in the depot (under load, 5 runs in 12 failed that way).
    missing, seen = set(handles), set()
    for _ in range(heap.stats()["classes"]["order"]["carved"] + 2 * lib.SLITTER_MAG_CAP):
        h = order.allocate()
        assert h not in seen, f"{h:#x} handed out twice"
        seen.add(h)
        missing.discard(h)
        if not missing:
            break
    assert not missing, f"{len(missing)} released objects never handed out again"


def test_refused_release_changes_nothing(heap, classes):
    order, trade = classes
    h = order.allocate()
    before = heap.stats()["classes"]["order"]
    for bad_call in (lambda: trade.release(h), lambda: order.release(h + 16)):
        with pytest.raises(slitter.ReleaseError):
            bad_call()
    after = heap.stats()["classes"]["order"]
    for key in ("live", "cached", "free", "carved", "releases"):
        assert before[key] == after[key], key
    order.release(h)



def test_every_check_for_early_and_late_class_keys(daemon):
    """The first class keys of a process and keys past 256: the same checks."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=workers.checks_per_class_key, args=(daemon.address, queue))
    child.start()
    results = queue.get(timeout=60)
    child.join(30)
    assert results["early"]["key"] < 256 <= results["late"]["key"]
    for label in ("early", "late"):
        r = results[label]
        assert r["mismatch"] == "ClassMismatch", label
        assert r["interior"] == "InteriorPointer", label
        assert r["foreign"] == ["ForeignAddress"] * 5, label
        assert (r["release"], r["double free"], r["many"], r["cleanup"]) == ("ok", "DoubleFree", "ok", "ok"), label
        assert (r["batch"], r["batch mismatch"], r["batch double free"]) == ("ok", "ClassMismatch", "DoubleFree"), label


def test_double_free_across_processes(daemon, heap, classes):
    order, _ = classes
    h = order.allocate()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    first = ctx.Process(target=workers.release_in_child, args=(daemon.address, h, queue))
    first.start()
    assert queue.get(timeout=30) == "released"
    first.join(30)
    # the same handle again: from this process, and from yet another one
    with pytest.raises(slitter.DoubleFree):
        order.release(h)
    second = ctx.Process(target=workers.release_in_child, args=(daemon.address, h, queue))
    second.start()
    result = queue.get(timeout=30)
    second.join(30)
    assert result.startswith("DoubleFree:") and hex(h) in result


def test_racing_releases_of_one_object_succeed_once(daemon, heap):
    """Two processes release the same objects at once: exactly one wins each."""
    cls = heap.register_class("race", size=32)
    handles = [cls.allocate() for _ in range(3000)]
    _, results = run_spawned(workers.release_all, [(daemon.address, handles)] * 2, timeout=60, join_timeout=30)
    assert sum(r[0] for r in results) == len(handles)
    assert sum(r[1] for r in results) == len(handles)


def test_a_u64_beyond_any_handle_is_refused_and_counted(heap):
    """Handles are below 2**48; a larger u64 still reaches the fast path and is counted there."""
    order = heap.register_class("order", size=64)
    for bad in (1 << 48, 1 << 50, 2**64 - 1):
        with pytest.raises(slitter.ForeignAddress) as info:
            order.release(bad)
        assert info.value.handle == bad
    for call in (order.release_many, order.check):  # the batch calls take such a u64 too
        with pytest.raises(slitter.ForeignAddress) as info:
            call(array("Q", [1 << 50]))
        assert info.value.handle == 1 << 50
    assert heap.stats()["classes"]["order"]["errors"]["foreign_address"] == 4  # check() counts nothing
    assert [e[4] for e in heap.audit()["entries"]] == [1 << 48, 1 << 50, 2**64 - 1, 1 << 50]


def test_a_handle_that_is_no_plain_int_and_wrong_arguments(heap):
    """``release`` takes an int in [0, 2**64) on its fast path (slitter._entry); a bool or an int
    subclass is taken as its value, reported to the audit log as a plain int; anything else, and a
    wrong number of arguments to either call, is a TypeError that changes and counts nothing."""
    class Handle(int):
        pass

    order = heap.register_class("order", size=64)
    live = order.allocate()
    for bad in (True, Handle(8)):
        with pytest.raises(slitter.ForeignAddress) as info:
            order.release(bad)
        assert info.value.handle == int(bad) and type(info.value.handle) is int
    order.release(Handle(live))  # an int subclass of a live handle releases it
    with pytest.raises(slitter.DoubleFree):
        order.release(live)
    for call in (lambda: order.release(1.5), lambda: order.release("x"), lambda: order.release(None),
                 lambda: order.allocate(1), lambda: order.allocate(key=1), lambda: order.release(),
                 lambda: order.release(live, live), lambda: order.release(handle=live)):
        with pytest.raises(TypeError):
            call()
    figures = heap.stats()["classes"]["order"]
    assert figures["errors"]["foreign_address"] == 2 and figures["errors"]["double_free"] == 1, figures
    assert (figures["allocations"], figures["releases"]) == (1, 1), figures
    handles = [e[4] for e in heap.audit()["entries"]]
    assert handles == [1, 8, live] and all(type(h) is int for h in handles), handles
