"""slitterd dies and comes back: nothing live is lost, nothing is handed out twice."""

from __future__ import annotations

import signal
import time

import pytest
from conftest import Forked, collect_spawned, fork_child, run_slitterd, start_spawned, thread_class

import slitter
import workers
from slitter._native import lib


def test_restart_after_sigkill_keeps_live_objects(manual_daemon):
    d = manual_daemon().start()
    with slitter.connect(d.address) as heap:
        cls = heap.register_class("keep", size=100, zero_init=True)
        live = [cls.allocate() for _ in range(3000)]
        for h in live:
            heap.view(h)[:] = workers.stamp(h, 100)
        freed = live[:1000]
        for h in freed:
            cls.release(h)
        live = live[1000:]
    d.kill(signal.SIGKILL)
    d.start()  # same name: recovers
    with slitter.connect(d.address) as heap:
        stats = heap.stats()
        assert stats["instance"]["generation"] == 2
        c = stats["classes"]["keep"]
        assert c["live"] == len(live) and c["carved"] == c["live"] + c["cached"] + c["free"]
        cls = heap.register_class("keep", size=100, zero_init=True)
        assert all(bytes(heap.view(h)) == workers.stamp(h, 100) for h in live)
        with pytest.raises(slitter.DoubleFree):
            cls.release(freed[0])  # free before the crash, free after it
        # Every object carved and not live: the depot hands all of them out before it carves more.
        fresh = {cls.allocate() for _ in range(c["carved"] - len(live))}
        assert not fresh & set(live), "a live object was handed out again"
        assert fresh & set(freed), "objects freed before the crash are reused"
        for h in live:
            cls.release(h)
        assert all(bytes(heap.view(h)) == bytes(100) for h in fresh)  # zero_init survived the restart


def test_restart_after_sigterm_recovers_classes_and_policies(manual_daemon):
    d = manual_daemon().start()
    with slitter.connect(d.address) as heap:
        a = heap.register_class("a", size=64, policy="log")
        held = [a.allocate() for _ in range(10)]
    assert d.kill(signal.SIGTERM) == 0
    d.start()
    with slitter.connect(d.address) as heap:
        a = heap.register_class("a", size=64)
        assert a.policy == "log" and a.id == 1
        with pytest.raises(slitter.ClassConflict):
            heap.register_class("a", size=65)
        stats = heap.stats()["classes"]["a"]
        assert stats["live"] == 10 and stats["allocations"] == 10
        for h in held:
            a.release(h)


def test_clients_ride_out_a_daemon_restart_under_load(manual_daemon, tmp_path):
    d = manual_daemon().start()
    stop = tmp_path / "stop"
    procs, queue = start_spawned(workers.load_until, [(d.address, seed, str(stop)) for seed in range(3)])
    time.sleep(1.5)
    for _ in range(2):
        d.kill(signal.SIGKILL)
        time.sleep(0.3)  # clients keep going on their magazines, or wait in the slow path
        d.start()
        time.sleep(1.0)
    stop.touch()
    results = collect_spawned(procs, queue, timeout=120, join_timeout=60)
    for p in procs:
        assert p.exitcode == 0
    assert all(r["bad"] == 0 for r in results), "an object's content changed"
    assert all(r["ops"] > 1000 for r in results)
    held = [h for r in results for _, h in r["held"]]
    assert len(held) == len(set(held)), "one object held by two processes"
    with slitter.connect(d.address) as heap:
        stats = heap.stats()
        counts = {"small": 0, "large": 0}
        for r in results:
            for name, _ in r["held"]:
                counts[name] += 1
        for name, n in counts.items():
            c = stats["classes"][name]
            assert c["live"] == n, (name, c)
            assert c["cached"] == 0
            assert c["carved"] == c["live"] + c["cached"] + c["free"]
        classes = {n: heap.register_class(n, size=48 if n == "small" else 2000) for n in counts}
        for r in results:
            for name, h in r["held"]:
                assert bytes(heap.view(h)) == workers.stamp(h, classes[name].size)
                classes[name].release(h)


def test_slow_path_waits_for_the_daemon_then_gives_up(manual_daemon):
    d = manual_daemon().start()
    heap = slitter.connect(d.address, timeout=1.0)
    try:
        cls = heap.register_class("w", size=64)
        cls.allocate()
        d.kill(signal.SIGKILL)
        cap = heap._classes_table[cls.id].mag_capacity
        for _ in range(2 * cap - 1):  # the magazine and the prefetched spare need no daemon
            cls.allocate()
        started = time.monotonic()
        with pytest.raises(slitter.DaemonUnavailable, match=d.address):
            cls.allocate()
        assert time.monotonic() - started >= 0.9
    finally:
        heap._transport.patient = False  # nothing to wait for at close
        heap.close()


def test_another_layout_version_is_refused(manual_daemon, tmp_path):
    d = manual_daemon().start()
    d.kill(signal.SIGKILL)
    meta = slitter.address.segment_paths(d.name)[0]
    with open(meta, "r+b") as f:
        f.seek(8)
        f.write((lib.SLITTER_LAYOUT_VERSION + 1).to_bytes(4, "little"))
    r = run_slitterd("--name", d.name, "--socket", str(tmp_path / "v.sock"), cwd=tmp_path)
    assert r.returncode != 0 and "layout version" in r.stderr and "refusing to guess" in r.stderr


def test_counters_stay_exact_while_a_client_cycles_through_restarts(manual_daemon, tmp_path):
    """Regression: recovery must not 'correct' counters against a live map that moves under it."""
    import os

    d = manual_daemon().start()
    stop = tmp_path / "stop"

    def cycle(send):
        with slitter.connect(d.address, timeout=30) as heap:
            cls = heap.register_class("cycle", size=64)
            held = [cls.allocate() for _ in range(5)]
            while not stop.exists():
                for _ in range(1000):
                    cls.release(cls.allocate())
            assert len(held) == 5
        send(b"done")

    forked = fork_child(cycle)
    time.sleep(0.5)
    for _ in range(4):
        d.kill(signal.SIGKILL)
        d.start()
        time.sleep(0.3)
    stop.touch()
    assert forked.report() == b"done"  # AssertionError with the child's exception if it raised
    assert os.waitstatus_to_exitcode(forked.wait()) == 0
    with slitter.connect(d.address) as heap:
        c = heap.stats()["classes"]["cycle"]
        assert c["live"] == 5 and c["cached"] == 0
        assert c["carved"] == c["live"] + c["cached"] + c["free"]


def test_departed_figures_outlive_the_daemon(manual_daemon):
    """A client that left objects live is still reported after a restart, and so is one
    that died while the daemon was down."""
    import os

    d = manual_daemon().start()

    def leave_objects(name: str, count: int, wait_for_kill: bool) -> Forked:
        def in_child(send):
            heap = slitter.connect(d.address, name=name, timeout=30)
            cls = heap.register_class("left", size=64)
            for _ in range(count):
                cls.allocate()
            send(b"allocated")
            if wait_for_kill:
                time.sleep(60)
            heap.close()

        forked = fork_child(in_child)
        assert forked.report() == b"allocated"
        return forked

    first = leave_objects("first", 3, wait_for_kill=False)
    first.wait()
    second = leave_objects("second", 5, wait_for_kill=True)
    d.kill(signal.SIGKILL)
    os.kill(second.pid, signal.SIGKILL)  # dies while the daemon is down
    second.wait()
    d.start()
    with slitter.connect(d.address) as heap:
        departed = heap.stats()["instance"]["departed"]
        assert {"pid": first.pid, "name": "first", "live": {"left": 3}} in departed
        assert {"pid": second.pid, "name": "second", "live": {"left": 5}} in departed
        assert heap.stats()["classes"]["left"]["live"] == 8


@pytest.mark.parametrize("op", ["allocate", "release"])
def test_a_client_killed_mid_operation_while_the_daemon_is_down_is_counted_exactly(manual_daemon, op):
    """reliability.md bug 2 at recovery: the rack of a client found dead is settled before the scan."""
    import os

    d = manual_daemon().start()

    def in_child(send):
        heap = slitter.connect(d.address, name="window", timeout=30)
        send(workers.leave_in_the_window(heap, op, changed=True).to_bytes(4, "little"))
        time.sleep(60)

    forked = fork_child(in_child)
    pid = forked.pid
    held = int.from_bytes(forked.report(), "little")
    d.kill(signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)  # dies while the daemon is down, in the middle of an operation
    forked.wait()
    d.start()
    with slitter.connect(d.address) as heap:
        stats = heap.stats()
    figures = stats["classes"]["window"]
    assert figures["live"] == held and workers.balanced(figures), (figures, held)
    assert {"pid": pid, "name": "window", "live": {"window": held}} in stats["instance"]["departed"]


def test_counters_out_of_step_with_the_live_map_are_reconciled_at_recovery(manual_daemon):
    """With no client left to adopt, recovery makes each class's counters agree with the live map, the
    ground truth: a dead client's rack said 5 allocations more than it made (garbage it wrote there)."""
    import os

    d = manual_daemon().start()

    def in_child(send):
        heap = slitter.connect(d.address, name="off", timeout=30)
        cls = heap.register_class("recount", size=64)
        held = [cls.allocate() for _ in range(10)]
        thread_class(heap, cls).counters.allocations += 5
        send(len(held).to_bytes(4, "little"))
        time.sleep(60)

    forked = fork_child(in_child)
    pid = forked.pid
    held = int.from_bytes(forked.report(), "little")
    d.kill(signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)
    forked.wait()
    d.start()
    with slitter.connect(d.address) as heap:
        figures = heap.stats()["classes"]["recount"]
    assert figures["live"] == held and workers.balanced(figures), (figures, held)
    assert "class 'recount': counters said 15 live, the live map says 10; reconciled" in d.log.read_text()


def test_an_adopted_client_keeps_what_its_magazines_cache(manual_daemon):
    """A client that runs on through a daemon SIGKILL is adopted with its magazines: recovery leaves
    the objects they cache out of the depot (else another client would be handed them too), and the
    client allocates exactly those objects afterwards, with no refusal."""
    d = manual_daemon().start()
    with slitter.connect(d.address, timeout=30) as heap:
        cls = heap.register_class("cached", size=64)
        first = cls.allocate()  # the refill fills this thread's allocation and spare magazines
        tc = thread_class(heap, cls)
        cached = {tc.alloc[i] for i in range(tc.alloc_count)} | {tc.spare[i] for i in range(tc.spare_count)}
        before = heap.stats()["classes"]["cached"]
        assert before["cached"] == len(cached) > 0 and before["free"] == 0, before
        released = [cls.allocate() for _ in range(3)]  # three more, given back to the depot via another client
        cached -= set(released)
        with slitter.connect(d.address, name="releaser") as other:
            other.register_class("cached", size=64).release_many(released)  # its detach reclaims them
        d.kill(signal.SIGKILL)
        d.start()
        after = heap.stats()["classes"]["cached"]  # waits for the daemon to be back; adopts this client
        assert after["cached"] == len(cached) and after["live"] == 1, after
        assert after["carved"] == after["live"] + after["cached"] + after["free"], after
        with slitter.connect(d.address, name="second") as second:
            other_cls = second.register_class("cached", size=64)
            theirs = other_cls.allocate_many(after["free"] + len(cached))
            assert not set(theirs) & cached, "an object cached by the adopted client was handed out again"
            assert set(released) <= set(theirs), "what the releaser gave back is in the recovered depot"
            mine = cls.allocate_many(len(cached))  # its allocation magazine, then its spare
            assert set(mine) == cached, "the adopted client's magazines did not hand out what they cached"
            figures = heap.stats()["classes"]["cached"]
            assert sum(figures["errors"].values()) == 0, figures
            other_cls.release_many(theirs)
        cls.release_many([*mine, first])
