"""Processes and threads as they really behave: fork, threads, handles passed around."""

from __future__ import annotations

import os
import threading

import pytest

import slitter
import workers
from conftest import fork_child


def test_forked_child_gets_fresh_racks(heap):
    cls = heap.register_class("fork", size=48)
    warm = [cls.allocate() for _ in range(10)]
    for h in warm:
        cls.release(h)  # the parent now caches objects in its magazines

    def in_child(send):
        send(",".join(str(cls.allocate()) for _ in range(300)).encode())
        heap.close()

    forked = fork_child(in_child)
    parent = [cls.allocate() for _ in range(300)]
    child = [int(x) for x in forked.report().decode().split(",")]
    assert os.waitstatus_to_exitcode(forked.wait()) == 0
    assert len(child) == 300
    assert not set(child) & set(parent), "an object was cached in two processes"
    assert not set(child) & set(warm), "the child used the parent's magazine"
    for h in parent:
        cls.release(h)
    for h in child:
        cls.release(h)  # allocated by the child, released here: handles are global


def test_four_threads_allocate_and_release_at_once(heap):
    cls = heap.register_class("threads", size=64)
    results: dict[int, set[int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work(i: int) -> None:
        try:
            barrier.wait()
            mine: set[int] = set()
            held: list[int] = []
            for n in range(20000):
                h = cls.allocate()
                if n % 64 == 0:
                    heap.view(h)[:8] = i.to_bytes(8, "little")
                held.append(h)
                if len(held) > 700:
                    for x in held[:350]:
                        cls.release(x)
                    del held[:350]
            mine.update(held)
            results[i] = mine
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    live = [h for s in results.values() for h in s]
    assert len(live) == len(set(live)), "one object live in two threads"
    stats = heap.stats()["classes"]["threads"]
    assert stats["live"] == len(live)
    assert stats["allocations"] == 4 * 20000
    for h in live:
        cls.release(h)
    stats = heap.stats()["classes"]["threads"]
    assert stats["live"] == 0
    assert stats["carved"] == stats["live"] + stats["cached"] + stats["free"]


def test_thread_exit_frees_its_slot_for_reuse(heap):
    cls = heap.register_class("slots", size=16)

    def one() -> None:
        cls.release(cls.allocate())

    for _ in range(3 * slitter._native.lib.SLITTER_MAX_THREADS):
        t = threading.Thread(target=one)
        t.start()
        t.join()
    stats = heap.stats()["classes"]["slots"]
    assert stats["allocations"] == stats["releases"] == 3 * slitter._native.lib.SLITTER_MAX_THREADS



def test_objects_written_in_one_process_read_and_released_in_another(daemon, heap):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=workers.writer, args=(daemon.address, queue))
    p.start()
    cls = heap.register_class("msg", size=128)
    i = 0
    while (h := queue.get(timeout=60)) is not None:
        assert bytes(heap.view(h)) == i.to_bytes(4, "little") * 32
        cls.release(h)
        i += 1
    p.join(30)
    assert i == 2000 and p.exitcode == 0
    c = heap.stats()["classes"]["msg"]
    assert c["live"] == 0 and c["allocations"] == 2000 and c["releases"] == 2000
    assert c["carved"] == c["live"] + c["cached"] + c["free"]


@pytest.mark.parametrize("count", [1, 513, 10000])
def test_no_handle_given_twice(heap, count):
    cls = heap.register_class(f"uniq{count}", size=16)
    hs = [cls.allocate() for _ in range(count)]
    assert len(set(hs)) == count
