"""A client SIGKILLed at a random point: slitterd notices at once and loses nothing.

Issue 5 item 1.  slitterd watches every client's pidfd in its poll loop, so
a dead client is reclaimed within a second: the objects cached in its rack
go back to the depot, and the objects it had allocated stay counted as
live (another process may hold them now), in the class totals and as its
own figure per class and pid (``stats["instance"]["departed"]``).

A victim process allocates, stamps, verifies and releases at random on two
classes, recording what it holds in a shared file (``workers.death_loop``),
and is SIGKILLed after a random delay.  The record is exact up to the one
operation under way, which the test accounts for: a release under way is
probed (released again here: it succeeds only if the object was still
live), an allocate under way may have left one object live whose handle
nobody knows.  Each run draws a seed, printed with every failure; set
SLITTER_DEATH_SEED to replay one (the kill instants still vary).
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import random
import signal
import time
from collections.abc import Callable

import pytest

from conftest import fork_child, wait_reclaimed

import slitter
import workers

SIZES = (40, 3000)
NAMES = tuple(f"death{size}" for size in SIZES)
SLOTS = 1 << 14
HEADER = 8
ROUNDS = 10
REACT_S = 1.0  # slitterd must notice a death within this


def _seed() -> int:
    return int(os.environ.get("SLITTER_DEATH_SEED", time.time_ns() % 2**32))


def _attached(stats) -> dict[int, dict]:
    return {c["pid"]: c for c in stats["clients"]}


def _survivors_cached(stats) -> dict[str, int]:
    """What the attached clients cache, per class: all the instance may cache."""
    out = dict.fromkeys(NAMES, 0)
    for client in stats["clients"]:
        for name, figures in client["classes"].items():
            if name in out:
                out[name] += figures["cached"]
    return out


def _check_invariants(stats, where: str) -> None:
    cached = _survivors_cached(stats)
    for name in NAMES:
        c = stats["classes"][name]
        assert c["carved"] == c["live"] + c["cached"] + c["free"], (where, name, c)
        # The shelf's full magazines belong to no client.
        assert c["cached"] == cached[name] + c["shelved"], (where, name, "cached by no attached client", c,
                                                             stats["clients"])


class Record:
    """The victim's shared record (layout in ``workers.death_loop``)."""

    def __init__(self, path) -> None:
        self.path = path
        with open(path, "wb") as f:
            f.truncate(8 * (HEADER + SLOTS))
        with open(path, "r+b") as f:
            self.mm = mmap.mmap(f.fileno(), 8 * (HEADER + SLOTS))
        self.rec = memoryview(self.mm).cast("Q")

    def reset(self) -> None:
        self.mm[:] = bytes(len(self.mm))

    def held(self) -> list[tuple[int, int]]:
        return [workers.death_decode(v) for v in self.rec[HEADER:] if v]

    def close(self) -> None:
        self.rec.release()
        self.mm.close()


def _kill_one(ctx, daemon, heap, record: Record, seed: int, delay: float):
    """Start a victim, let it run ``delay`` s, SIGKILL it; (pid, latency, stats after reclaim)."""
    p = ctx.Process(target=workers.death_loop, args=(daemon.address, seed, str(record.path), SLOTS, SIZES))

    def attached() -> None:
        deadline = time.monotonic() + 30
        while record.rec[0] != 1:
            assert p.is_alive(), f"victim exited with {p.exitcode}"
            assert time.monotonic() < deadline, "victim never attached"
            time.sleep(0.005)

    latency, stats = _kill_when_ready(heap, p, attached, delay)
    return p.pid, latency, stats


def _kill_when_ready(heap, p, ready: Callable[[], None], delay: float) -> tuple[float, dict]:
    """Start ``p``, wait for ``ready()``, let it run ``delay`` s, SIGKILL it; (reclaim latency, stats after).

    Reaps it whatever happens.
    """
    p.start()
    try:
        ready()
        time.sleep(delay)
        since = time.monotonic()
        os.kill(p.pid, signal.SIGKILL)
        result = wait_reclaimed(heap, p.pid, since)
    finally:
        if p.is_alive():
            p.kill()
        p.join(10)
    assert p.exitcode == -signal.SIGKILL, p.exitcode
    return result


def test_sigkilled_clients_are_reclaimed_at_once_and_lose_nothing(daemon, heap, tmp_path):
    seed = _seed()
    rng = random.Random(seed)
    ctx = multiprocessing.get_context("spawn")
    classes = [heap.register_class(name, size=size) for name, size in zip(NAMES, SIZES)]
    here, there = ctx.Pipe()
    bystander = ctx.Process(target=workers.death_bystander, args=(daemon.address, seed, SIZES, there))
    bystander.start()
    record = Record(tmp_path / "record")
    unknown = dict.fromkeys(NAMES, 0)  # live objects of victims killed mid-allocate, handle unknown
    bystander_live = 0
    latencies = []
    try:
        for round_ in range(ROUNDS):
            where = f"seed {seed} round {round_}"
            here.send("burst")
            assert here.poll(60), "the bystander does not answer"
            state, bystander_live = here.recv()
            assert state == "idle"
            before = heap.stats()
            survivor = _attached(before)[bystander.pid]["classes"]
            assert sum(c["live"] for c in survivor.values()) == bystander_live
            audit_seq = heap.audit(limit=1)["next"]
            _check_invariants(before, where + " before")
            record.reset()
            delay = rng.choice((0.0, rng.uniform(0, 0.3), rng.uniform(0, 0.3)))
            pid, latency, after = _kill_one(ctx, daemon, heap, record, seed * 100 + round_, delay)
            latencies.append(latency)
            assert latency < REACT_S, f"{where}: reclaimed {latency:.3f} s after SIGKILL"

            # The dead client's cached objects are back in the depot; the others' are untouched.
            _check_invariants(after, where + " after reclaim")
            assert _attached(after)[bystander.pid]["classes"] == survivor, where
            assert record.rec[4] == 0, f"{where}: the victim saw an object's content change"
            refused = [e for e in heap.audit(audit_seq)["entries"] if e[6] == "reclaim"]
            assert not refused, f"{where}: the audit refused objects of the dead client's magazines: {refused}"

            # Everything it still held is counted live.
            pending_op, (pending_ci, pending_h) = record.rec[2], workers.death_decode(record.rec[3])
            held = record.held()
            unstamped = lost_class = None
            if pending_op == 1:
                filled = record.rec[HEADER + record.rec[5]]
                if filled:
                    unstamped = workers.death_decode(filled)[1]  # recorded; killed while stamping it
                else:
                    lost_class = NAMES[pending_ci]  # maybe allocated, never recorded
            elif pending_op == 2:
                held = [(ci, h) for ci, h in held if h != pending_h]  # live or not: probed below
            uncertain = NAMES[pending_ci] if lost_class or pending_op == 2 else None
            for ci, name in enumerate(NAMES):
                grown = after["classes"][name]["live"] - before["classes"][name]["live"]
                recorded = sum(1 for c, _ in held if c == ci)
                allowed = {recorded, recorded + 1} if name == uncertain else {recorded}
                assert grown in allowed, (where, name, "live grew by", grown, "held", recorded,
                                          "under way", pending_op, uncertain)

            # ... and as the dead client's own figure, per class and pid.
            figure = _departed(after, pid) or {}
            for name in NAMES:
                grown = after["classes"][name]["live"] - before["classes"][name]["live"]
                assert figure.get(name, 0) == grown, (where, "departed", figure, name, grown)

            # Those objects are intact, still live, and can be released here.
            for ci, h in held:
                if h != unstamped:
                    assert bytes(heap.view(h)) == workers.stamp(h, SIZES[ci]), (where, hex(h))
                classes[ci].release(h)  # DoubleFree here: a live object was lost or reused
            if pending_op == 2:
                try:
                    classes[pending_ci].release(pending_h)
                except slitter.DoubleFree:
                    pass  # the victim's release had got through
            cleaned = heap.stats()
            _check_invariants(cleaned, where + " after cleanup")
            for name in NAMES:
                extra = cleaned["classes"][name]["live"] - before["classes"][name]["live"]
                assert extra in ({0, 1} if name == lost_class else {0}), (where, name, extra)
                unknown[name] += extra

        here.send("stop")
        assert here.poll(60), "the bystander does not answer"
        state, bad = here.recv()
        assert (state, bad) == ("done", 0), "the bystander saw an object's content change"
        bystander.join(20)
        assert bystander.exitcode == 0
        final = heap.stats()
        _check_invariants(final, f"seed {seed} final")
        assert [c["pid"] for c in final["clients"]] == [os.getpid()]
        for name in NAMES:
            # All that is live now: objects of victims killed between allocate and recording it.
            assert final["classes"][name]["live"] == unknown[name], (name, final["classes"][name], unknown)
        assert sum(unknown.values()) <= ROUNDS
        print(f"seed {seed}: reclaim latency max {max(latencies) * 1000:.0f} ms, "
              f"mean {sum(latencies) / len(latencies) * 1000:.0f} ms; lost mid-allocate: {unknown}")
    finally:
        if bystander.is_alive():
            bystander.kill()
            bystander.join(10)
        record.close()


def _departed(stats, pid: int) -> dict[str, int] | None:
    """The figure slitterd keeps for a client that left: {class: live objects it left}, or None."""
    entries = [d for d in stats["instance"]["departed"] if d["pid"] == pid]
    assert len(entries) <= 1, entries
    return entries[0]["live"] if entries else None


def test_a_dead_clients_live_objects_stay_its_own_figure(daemon, heap):
    """Per class and pid, and unchanged when another process releases those objects."""

    def orphaner(send):
        child = slitter.connect(daemon.address, name="orphaner")
        a, b = child.register_class("orphan_a", size=64), child.register_class("orphan_b", size=3000)
        kept = [a.allocate() for _ in range(600)]  # past a magazine: a refill, a flush
        for h in kept[123:]:
            a.release(h)
        gone = [b.allocate() for _ in range(40)]
        for h in gone:
            b.release(h)
        send(",".join(map(str, kept[:123])).encode())
        os.kill(os.getpid(), signal.SIGSTOP)

    forked = fork_child(orphaner)
    pid = forked.pid
    handles = [int(x) for x in forked.report().decode().split(",")]
    forked.wait(os.WUNTRACED)
    assert _attached(heap.stats())[pid]["classes"]["orphan_a"]["cached"] > 0
    since = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    latency, stats = wait_reclaimed(heap, pid, since)
    forked.wait()
    assert latency < REACT_S
    assert stats["classes"]["orphan_a"]["live"] == 123 and stats["classes"]["orphan_b"]["live"] == 0
    for name in ("orphan_a", "orphan_b"):
        c = stats["classes"][name]
        assert c["cached"] == 0 and c["carved"] == c["live"] + c["cached"] + c["free"], c
    departed = [d for d in stats["instance"]["departed"] if d["pid"] == pid]
    assert departed == [{"pid": pid, "name": "orphaner", "live": {"orphan_a": 123}}]
    a = heap.register_class("orphan_a", size=64)
    for h in handles:  # another process takes them over and releases them
        a.release(h)
    stats = heap.stats()
    assert stats["classes"]["orphan_a"]["live"] == 0
    assert _departed(stats, pid) == {"orphan_a": 123}, "the figure is what the client left, not what is left"


@pytest.mark.parametrize("changed", [True, False], ids=["after the byte", "before the byte"])
@pytest.mark.parametrize("op", ["allocate", "release", "allocate_many", "release_many", "release_many split"])
def test_a_kill_between_an_objects_byte_and_its_count_is_counted_exactly(daemon, heap, op, changed):
    """reliability.md bug 2: the counting bit tells the reclaim an operation was under way, its bytes what happened.

    For a batch, the kill comes after some of its objects' bytes changed
    (or none), and a released batch's slots also hold objects this thread
    and another thread of the client cache, which must not be counted.
    """
    from conftest import start_spawned

    (victim,), queue = start_spawned(workers.killed_between_byte_and_count, [(daemon.address, op, changed)])
    held = queue.get(timeout=60)
    victim.join(30)
    assert victim.exitcode == -signal.SIGKILL, victim.exitcode
    _latency, stats = wait_reclaimed(heap, victim.pid, time.monotonic())
    figures = stats["classes"]["window"]
    assert figures["carved"] == figures["live"] + figures["cached"] + figures["free"], figures
    assert figures["live"] == held, (figures, held)


def test_clients_killed_inside_batches_leave_exact_counters(daemon, heap):
    """A client SIGKILLed anywhere in allocate_many / release_many, a refused one included: carved = live + cached + free.

    Kills land inside a batch's byte loops often enough: before batches
    set the counting bit, this test broke the invariant by its second kill.
    The reclaim must count exactly the objects whose bytes changed.
    """
    seed = _seed()
    rng = random.Random(seed)
    ctx = multiprocessing.get_context("spawn")
    heap.register_class("batches", size=64)
    for round_ in range(8):
        where = f"seed {seed} round {round_}"
        before = heap.stats()["classes"]["batches"]
        ready = ctx.Queue()
        victim = ctx.Process(target=workers.batch_victim, args=(daemon.address, seed * 100 + round_, ready))
        _latency, stats = _kill_when_ready(heap, victim, lambda: ready.get(timeout=60), rng.uniform(0.01, 0.2))
        c = stats["classes"]["batches"]
        assert c["cached"] == c["shelved"], (where, c)
        assert c["carved"] == c["live"] + c["cached"] + c["free"], (where, c)
        # What it left live, at most one batch, is its own figure.
        assert 0 <= c["live"] - before["live"] <= workers.BATCH_VICTIM_MAX, (where, before, c)
        assert (_departed(stats, victim.pid) or {}).get("batches", 0) == c["live"] - before["live"], where
