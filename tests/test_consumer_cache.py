"""What a thread that only releases (a consumer) keeps cached: no allocation magazine it never allocates from.

A consumer's releases used to fill its allocation magazine first and leave
it full for as long as the thread lived: up to SLITTER_MAG_CAP objects per
thread and class once magazines grow.  Now a thread that allocates nothing
while a whole release magazine fills releases past the allocation magazine,
and what that magazine held goes out with the next release magazines
(native/fast.c, slitter__hand_back_unused).
"""

from __future__ import annotations

import os
import threading

from conftest import fork_child, thread_class

import slitter
import workers
from slitter._native import lib

ALL_ONES = 0xFFFFFFFF


def _magazines(tc) -> dict[str, int]:
    return {"alloc": tc.alloc_count, "release": tc.release_count, "capacity": tc.capacity,
            "releases_only": tc.releases_only}


def _release_one_by_one(release, handles) -> None:
    for h in handles:
        release(h)


def test_a_consumer_thread_hands_back_its_allocation_magazine_and_allocates_lifo_again(heap):
    cls = heap.register_class("consumer-thread", size=64)
    pool = cls.allocate_many(8 * lib.SLITTER_MAG_CAP)
    seen: dict[str, dict[str, int]] = {}
    failure: list[BaseException] = []

    def consumer() -> None:
        try:
            tc = thread_class(heap, cls)
            cls.release(cls.allocate())  # bound as the benchmark's consumers are: one allocation
            seen["bound"] = _magazines(tc)
            _release_one_by_one(cls.release, pool)
            seen["after"] = _magazines(tc)
            h = cls.allocate()  # allocates again: from what it released, and LIFO from now on
            seen["allocating"] = _magazines(tc)
            cls.release(h)
            seen["lifo"] = {"same": int(cls.allocate() == h)}
            cls.release(h)
        except BaseException as exc:  # reported below, in the test's thread
            failure.append(exc)

    t = threading.Thread(target=consumer)
    t.start()
    t.join()
    assert not failure, failure
    bound, after = seen["bound"], seen["after"]
    assert bound["alloc"] == bound["capacity"] and bound["releases_only"] == 0, bound  # full, as it was refilled
    # Eight magazines of releases later: nothing left in the allocation magazine (it held a full one before).
    assert after["alloc"] == 0 and after["releases_only"] == ALL_ONES, after
    assert after["release"] < after["capacity"], after
    assert seen["allocating"]["releases_only"] == 0, seen
    assert seen["lifo"]["same"] == 1
    stats = heap.stats()["classes"]["consumer-thread"]
    assert stats["live"] == 0 and workers.balanced(stats), stats


def test_a_consumer_process_keeps_less_than_a_magazine_cached(daemon, heap):
    """As the benchmarks' consumers run: another process, batches through release_many."""
    cls = heap.register_class("consumer-process", size=64)
    pool = cls.allocate_many(8 * lib.SLITTER_MAG_CAP)

    def consumer(send) -> None:
        with slitter.connect(daemon.address) as mine:
            theirs = mine.register_class("consumer-process", size=64)
            theirs.release_many(theirs.allocate_many(64))  # bound
            tc = thread_class(mine, theirs)
            for first in range(0, len(pool), 64):
                theirs.release_many(pool[first:first + 64])
            m = _magazines(tc)
            send(f"{m['alloc']} {m['release']} {m['capacity']} {m['releases_only']} {tc.spare_count}".encode())

    child = fork_child(consumer)
    alloc, release, capacity, releases_only, spare = map(int, child.report().split())
    assert os.waitstatus_to_exitcode(child.wait()) == 0
    # The consumer's own rack: a release magazine under way and the spare prefetched when it bound the class
    # (a full allocation magazine, SLITTER_MAG_CAP here, on top of them without the hand-back).
    assert alloc == 0 and releases_only == ALL_ONES, (alloc, releases_only)
    assert release < capacity
    assert spare <= heap._classes_table[cls.id].mag_capacity
    stats = heap.stats()["classes"]["consumer-process"]
    assert stats["live"] == 0 and workers.balanced(stats), stats


def test_a_thread_that_allocates_between_releases_keeps_its_allocation_magazine(heap):
    """Not a consumer: one allocation per release magazine is enough to keep the LIFO reuse."""
    cls = heap.register_class("mixed", size=64)
    tc = thread_class(heap, cls)
    held = cls.allocate_many(4 * lib.SLITTER_MAG_CAP)
    for first in range(0, len(held), 1024):
        cls.release_many(held[first:first + 1024])
        cls.release(cls.allocate())  # an allocation now and then
    assert tc.releases_only == 0
    assert tc.alloc_count == tc.capacity  # full of what it released, for its next allocations
    h = cls.allocate()
    cls.release(h)
    assert cls.allocate() == h
    cls.release(h)
