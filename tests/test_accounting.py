"""carved == live + cached + free, whoever comes and goes; steady state sends nothing."""

from __future__ import annotations

from conftest import fork_child, run_spawned, wait_reclaimed

import slitter
import workers


def invariant_holds(stats):
    return all(c["carved"] == c["live"] + c["cached"] + c["free"] for c in stats["classes"].values())



def test_invariant_with_several_processes(daemon, heap):
    procs, results = run_spawned(workers.churn, [(daemon.address, seed, 100 * seed) for seed in range(1, 4)],
                                 timeout=120, join_timeout=60)
    kept = [item for result in results for item in result]
    for p in procs:
        assert p.exitcode == 0
    stats = heap.stats()
    assert invariant_holds(stats), stats["classes"]
    live_expected = {"small": 0, "big": 0}
    for name, _ in kept:
        live_expected[name] += 1
    assert {n: stats["classes"][n]["live"] for n in live_expected} == live_expected
    # the clients left: nothing of theirs stays cached
    assert all(c["cached"] == 0 for c in stats["classes"].values())
    assert [c["pid"] for c in stats["clients"]] == [__import__("os").getpid()]
    # objects the dead clients allocated are still live and can be released here
    classes = {n: heap.register_class(n, size=40 if n == "small" else 5000) for n in live_expected}
    for name, h in kept:
        classes[name].release(h)
    stats = heap.stats()
    assert all(stats["classes"][n]["live"] == 0 for n in live_expected)
    assert invariant_holds(stats)


def test_close_returns_cached_objects_to_the_depot(daemon):
    with slitter.connect(daemon.address) as a:
        cls = a.register_class("c", size=64)
        hs = [cls.allocate() for _ in range(1000)]
        for h in hs:
            cls.release(h)
        assert a.stats()["classes"]["c"]["cached"] > 0
    with slitter.connect(daemon.address) as b:
        c = b.stats()["classes"]["c"]
        assert c["cached"] == 0 and c["live"] == 0 and c["free"] == c["carved"] > 0


def test_killed_client_is_reclaimed(daemon, heap):
    import os
    import signal
    import time


    def in_child(send):
        child = slitter.connect(daemon.address)
        cls = child.register_class("k", size=64)
        hs = [cls.allocate() for _ in range(700)]
        for h in hs[:600]:
            cls.release(h)
        send(b"stopping")
        os.kill(os.getpid(), signal.SIGSTOP)

    forked = fork_child(in_child)
    pid = forked.pid
    assert forked.report() == b"stopping"
    forked.wait(os.WUNTRACED)
    c = heap.stats()["classes"]["k"]
    assert c["cached"] > 0 and c["live"] == 100
    os.kill(pid, signal.SIGKILL)
    forked.wait()
    _, stats = wait_reclaimed(heap, pid, time.monotonic())
    c = stats["classes"]["k"]
    assert len(stats["clients"]) == 1
    assert c["cached"] == 0 and c["live"] == 100
    assert c["carved"] == c["live"] + c["cached"] + c["free"]


def test_steady_cycle_sends_no_message(heap):
    cls = heap.register_class("steady", size=64)
    for _ in range(10):
        cls.release(cls.allocate())
    before = heap.messages_sent
    for _ in range(200000):
        cls.release(cls.allocate())
    held = [cls.allocate() for _ in range(100)]
    for h in held:
        cls.release(h)
    assert heap.messages_sent == before


def test_objects_flushed_onto_a_stocked_depot_come_back_once_each(heap):
    """Each flush lands on top of the free objects already in the depot; none is lost or handed out twice."""
    cls = heap.register_class("once", size=65536)  # 64-handle magazines: many flushes, most onto a stocked depot
    cap = heap._classes_table[cls.id].mag_capacity
    first = [cls.allocate() for _ in range(12 * cap)]
    for h in first:
        cls.release(h)
    assert heap.stats()["classes"]["once"]["free"] >= 6 * cap  # several magazines' worth went back
    again = [cls.allocate() for _ in range(12 * cap)]
    assert len(set(again)) == len(again)  # no object twice
    cls.check(again)  # each a live object of the class
    stats = heap.stats()
    assert stats["classes"]["once"]["live"] == len(again)
    assert invariant_holds(stats)
