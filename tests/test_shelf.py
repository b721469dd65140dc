"""The shelf: full magazines pass from the releasing process to the allocating one without the daemon.

A stream between processes sends no refill and no flush once it runs; what
is on the shelf is counted as cached; a slot is checked handle by handle
when taken, so a forged entry is refused, never handed out; the daemon
takes back the slots of a client that dies holding one, and the whole shelf
when the last client leaves or a restarted daemon adopts nobody.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import time

import pytest
from conftest import collect_spawned, settled_thread_class, start_spawned, wait_reclaimed

import slitter
import workers
from slitter._native import lib
from slitterd.shelf import kind_of, shelf_state

SIZE = 4096  # 256 handles a magazine: a stream of a few magazines stays small


def _capacity(heap, cls) -> int:
    return heap._classes_table[cls.id].mag_capacity


def _shelve_full(heap, cls) -> int:
    """SLITTER_SHELF_PER_CLASS full release magazines of ``cls`` on the shelf, the rest to the daemon.

    Returns the size of those magazines: this thread's, grown by the
    allocations' prefetches (they come close together) from the class's
    starting size up to at most SLITTER_MAG_CAP.
    """
    handles = cls.allocate_many((lib.SLITTER_SHELF_PER_CLASS + 2) * lib.SLITTER_MAG_CAP)
    cap = settled_thread_class(heap, cls).capacity
    cls.release_many(handles)  # one magazine refills ours, the next ones go on the shelf
    return cap


def _shelve_one(heap, cls) -> int:
    """One magazine of ``cls`` on the shelf; returns its slot."""
    workers.shelve_one(heap, cls)
    (index,) = workers.slots_in_state(heap, shelf_state(lib.SLITTER_SHELF_FULL, cls.id))
    return index


def test_a_stream_between_processes_sends_no_refill_and_no_flush(heap, daemon):
    cls = heap.register_class("shelf-stream", size=SIZE)
    batches_per_magazine = _capacity(heap, cls) // 64
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    procs, queue = start_spawned(workers.shelf_consumer, [(daemon.address, SIZE, there)])
    transport = heap._transport
    try:
        for round_ in range(12 * batches_per_magazine):
            if round_ == 4 * batches_per_magazine:  # warmed up: the first refill and its spare are spent
                figures = heap.stats()["classes"]["shelf-stream"]
                puts, takes = figures["shelf_puts"], figures["shelf_takes"]
                refills, waited = transport.sent["refill"], transport.round_trips  # stats() waits too
            handles = cls.allocate_many(64)
            assert len(set(handles)) == 64
            for h in handles:
                heap.view(h)[:] = workers.stamp(h, SIZE)
            here.send_bytes(handles.tobytes())
            assert here.poll(60) and here.recv_bytes() == b"ok"
        here.send_bytes(b"")
        (result,) = collect_spawned(procs, queue, timeout=60, join_timeout=30)
    finally:
        for p in procs:
            p.join(30)
    assert result["bad"] == 0, "an object's content changed between the processes"
    assert transport.sent["refill"] == refills and transport.round_trips == waited, \
        "the producer asked the daemon for objects while the consumer's came back on the shelf"
    assert result["flushes"] == 0, "the consumer flushed to the daemon instead of the shelf"
    figures = heap.stats()["classes"]["shelf-stream"]
    assert figures["shelf_puts"] - puts >= 8 and figures["shelf_takes"] - takes >= 8, figures
    assert figures["live"] == 0 and sum(figures["errors"].values()) == 0, figures
    assert workers.balanced(figures), figures


def test_a_forged_slot_entry_is_refused_never_handed_out(daemon):
    with slitter.connect(daemon.address) as putter, slitter.connect(daemon.address) as taker:
        cls = putter.register_class("shelf-forged", size=SIZE)
        index = _shelve_one(putter, cls)
        slot = workers.shelf_of(putter).slots[index]
        live = cls.allocate()  # ours, live
        count = slot.count
        # Taken from the top: a live object, an interior pointer, and a duplicate of another entry.
        slot.handles[count - 1] = live
        slot.handles[count - 2] = live + 16
        slot.handles[count - 3] = slot.handles[0]

        theirs = taker.register_class("shelf-forged", size=SIZE)
        got = list(theirs.allocate_many(count))
        assert live not in got and live + 16 not in got
        assert len(set(got)) == len(got)
        assert taker.stats()["classes"]["shelf-forged"]["errors"]["corrupt"] == 3
        assert workers.slots_in_state(putter, lib.SLITTER_SHELF_EMPTY) == list(range(lib.SLITTER_SHELF_SLOTS))
        cls.release(live)  # still live, still ours: released once
        with pytest.raises(slitter.DoubleFree):
            cls.release(live)
        theirs.release_many(got)
    # The entries the forgery overwrote were never taken: the last client's leaving gave them back.
    with slitter.connect(daemon.address) as after:
        figures = after.stats()["classes"]["shelf-forged"]
        assert figures["shelved"] == figures["cached"] == figures["live"] == 0, figures
        assert figures["free"] == figures["carved"], figures


def test_a_client_dying_with_a_slot_in_hand_gives_its_objects_back(heap, daemon):
    cls = heap.register_class("shelf-held", size=SIZE)
    procs, queue = start_spawned(workers.shelf_holder_dies, [(daemon.address, SIZE)])
    ((index, count),) = collect_spawned(procs, queue, timeout=60, join_timeout=30)
    assert procs[0].exitcode == -9
    wait_reclaimed(heap, procs[0].pid, time.monotonic())
    assert workers.shelf_of(heap).slots[index].state == lib.SLITTER_SHELF_EMPTY
    figures = heap.stats()["classes"]["shelf-held"]
    assert figures["shelved"] == figures["cached"] == figures["live"] == 0, figures
    assert figures["free"] == figures["carved"] >= 2 * count, figures
    got = cls.allocate_many(figures["carved"])  # every one can be handed out again, once
    assert len(set(got)) == len(got)
    cls.release_many(got)


def test_a_full_slot_is_counted_cached_and_goes_back_when_the_last_client_leaves(daemon):
    with slitter.connect(daemon.address) as heap:
        cls = heap.register_class("shelf-last", size=SIZE)
        index = _shelve_one(heap, cls)
        count = workers.shelf_of(heap).slots[index].count
        figures = heap.stats()["classes"]["shelf-last"]
        assert figures["shelved"] == count == _capacity(heap, cls)
        assert figures["cached"] >= count and workers.balanced(figures), figures
    with slitter.connect(daemon.address) as after:
        figures = after.stats()["classes"]["shelf-last"]
        assert figures["shelved"] == figures["cached"] == 0 and figures["free"] == figures["carved"], figures
        assert workers.slots_in_state(after, lib.SLITTER_SHELF_EMPTY) == list(range(lib.SLITTER_SHELF_SLOTS))


def test_full_slots_nobody_takes_go_back_to_the_depot():
    with slitter.spawn_daemon(arena_size="1G", args=("--shelf-idle", "0.2")) as address, \
            slitter.connect(address) as heap:
        cls = heap.register_class("shelf-idle", size=SIZE)
        index = _shelve_one(heap, cls)
        count = workers.shelf_of(heap).slots[index].count
        before = heap.stats()["classes"]["shelf-idle"]
        assert before["shelved"] == count and before["free"] == 0, before
        deadline = time.monotonic() + 20  # swept after 0.2-0.4 s of no take (--shelf-idle)
        while (after := heap.stats()["classes"]["shelf-idle"])["shelved"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert after["shelved"] == 0 and after["free"] == count and workers.balanced(after), after
        assert workers.shelf_of(heap).slots[index].state == lib.SLITTER_SHELF_EMPTY
        assert after["shelf_takes"] == before["shelf_takes"]  # the daemon's sweep is not a client's take
        got = cls.allocate_many(3 * count)  # ours, then the depot's (the swept ones among them), each once
        assert len(set(got)) == len(got)
        cls.release_many(got)


def test_a_nearly_full_shelf_gives_back_the_magazines_nobody_takes():
    per_class = lib.SLITTER_SHELF_PER_CLASS
    with slitter.spawn_daemon(arena_size="1G", args=("--shelf-idle", "3600")) as address, \
            slitter.connect(address) as heap:
        classes = [heap.register_class(f"shelf-pressed-{i}", size=64) for i in range(7)]
        caps = {}

        def shelve(cls) -> None:
            caps[cls.name] = _shelve_full(heap, cls)

        def shelved() -> int:
            return sum(c["shelved"] for c in heap.stats()["classes"].values())

        shelve(classes[0])
        time.sleep(1.0)  # plenty of empty slots: an hour's shelf_idle holds
        first = classes[0].name
        assert shelved() == per_class * caps[first]
        for cls in classes[1:]:  # 28 of 32 slots full: fewer than a quarter empty
            shelve(cls)

        def first_shelved() -> int:
            return heap.stats()["classes"][first]["shelved"]

        deadline = time.monotonic() + 20  # the class idle longest goes first, until a quarter is empty again
        while first_shelved() and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = heap.stats()["classes"]
        assert stats[first]["shelved"] == 0 and stats[first]["free"] >= per_class * caps[first], stats[first]
        assert len(workers.slots_in_state(heap, lib.SLITTER_SHELF_EMPTY)) >= lib.SLITTER_SHELF_SLOTS // 4
        assert all(workers.balanced(figures) for figures in stats.values()), stats
        time.sleep(1.0)  # a quarter empty again: the others wait for their hour
        stats = heap.stats()["classes"]
        assert [stats[c.name]["shelved"] for c in classes[1:]] == [per_class * caps[c.name] for c in classes[1:]], stats


def test_a_restarted_daemon_keeps_the_shelf_for_an_adopted_client(manual_daemon):
    d = manual_daemon().start()
    with slitter.connect(d.address) as heap:
        cls = heap.register_class("shelf-restart", size=SIZE)
        index = _shelve_one(heap, cls)
        count = workers.shelf_of(heap).slots[index].count
        d.kill()
        d.start()  # adopts our rack: we still run
        figures = heap.stats()["classes"]["shelf-restart"]
        assert figures["shelved"] == count and workers.balanced(figures), figures
        taken = workers.shelf_of(heap).takes[cls.id]
        got = cls.allocate_many(2 * count)  # our allocation magazine, then the shelf's
        assert workers.shelf_of(heap).takes[cls.id] == taken + 1
        assert len(set(got)) == len(got)
        cls.release_many(got)


def test_a_restarted_daemon_that_adopts_nobody_empties_the_shelf(manual_daemon):
    d = manual_daemon().start()
    procs, queue = start_spawned(workers.shelf_and_wait, [(d.address, SIZE)])
    try:
        count = queue.get(timeout=60)
        d.kill()
        procs[0].kill()  # dies while no daemon watches: the next one finds its rack orphaned
        procs[0].join(30)
        d.start(wait=False)  # start()'s own probe would be the last client to leave, which empties the shelf too
        with d.first_client() as heap:
            figures = heap.stats()["classes"]["shelf-restart"]
            assert figures["carved"] >= 2 * count
            assert figures["shelved"] == figures["cached"] == figures["live"] == 0, figures
            assert figures["free"] == figures["carved"], figures
            assert workers.slots_in_state(heap, lib.SLITTER_SHELF_EMPTY) == list(range(lib.SLITTER_SHELF_SLOTS))
    finally:
        for p in procs:
            p.kill()
            p.join(30)


def test_garbage_on_the_shelf_never_hands_out_a_live_or_cached_object_twice(daemon):
    rng = random.Random(0x5E1F)
    with slitter.connect(daemon.address, name="victim") as victim, \
            slitter.connect(daemon.address, name="attacker") as attacker:
        cls = victim.register_class("shelf-hostile", size=SIZE)
        theirs = attacker.register_class("shelf-hostile", size=SIZE)
        cap = _capacity(victim, cls)
        live = list(cls.allocate_many(100))
        for h in live:
            victim.view(h)[:8] = h.to_bytes(8, "little")
        mine = set(theirs.allocate_many(cap))  # the attacker's own live objects
        candidates = [*live, *mine, live[0] + 16, 0, 1 << 47, rng.randrange(1 << 64)]
        shelf = workers.shelf_of(attacker)
        for round_ in range(30):
            for i in range(lib.SLITTER_SHELF_SLOTS):
                slot = shelf.slots[i]
                slot.state = rng.choice((lib.SLITTER_SHELF_EMPTY, shelf_state(lib.SLITTER_SHELF_FULL, cls.id),
                                         shelf_state(lib.SLITTER_SHELF_FULL, rng.randrange(1 << 24)),
                                         shelf_state(lib.SLITTER_SHELF_BUSY, rng.randrange(256)),
                                         rng.randrange(1 << 32)))
                slot.count = rng.choice((0, 1, 5, cap, lib.SLITTER_MAG_CAP, (1 << 32) - 1))
                for j in rng.sample(range(lib.SLITTER_MAG_CAP), 64):
                    slot.handles[j] = rng.choice(candidates)
            stats = victim.stats()["classes"]["shelf-hostile"]  # the daemon sums the garbage, and lives
            assert stats["shelved"] <= lib.SLITTER_SHELF_SLOTS * lib.SLITTER_MAG_CAP, (round_, stats)
            got = cls.allocate_many(2 * cap)  # empties our magazines, then takes from the shelf if it can
            assert len(set(got)) == len(got), round_
            assert not set(got) & (set(live) | mine), (round_, "a live object was handed out again")
            cls.release_many(got)
        for h in live:
            assert bytes(victim.view(h)[:8]) == h.to_bytes(8, "little")
        cls.release_many(live)
        theirs.release_many(list(mine))
    with slitter.connect(daemon.address) as after:  # the last client left: whatever the slots said, all is back
        figures = after.stats()["classes"]["shelf-hostile"]
        assert figures["live"] == figures["cached"] == 0 and figures["free"] == figures["carved"], figures


# -- the daemon scans for a slot's tag only while it holds the slot ---------------
#
# A live client could claim a slot the daemon has emptied but not scanned yet,
# put a magazine in it, and see the scan free what it put.  These drive the
# daemon's Instance in this process, over real segments, and look at the shelf
# at the moment of the scan.

@pytest.fixture
def instance():
    from slitterd.arena import Arena, remove_segments
    from slitterd.instance import ClassSpec, Instance

    name = f"t{os.getpid()}-shelf-{time.monotonic_ns() % 10**9}"
    arena = Arena.create(name, 64 << 20, 8)
    try:
        inst = Instance(name, arena, 8)
        inst.register_class(ClassSpec("held", SIZE, False))
        yield inst
    finally:
        for client in list(inst.racks.clients.values()):
            inst.racks.release_rack(client)
        arena.close()
        remove_segments(name)


def _busy(who: int) -> int:
    return shelf_state(lib.SLITTER_SHELF_BUSY, who)


def test_a_reclaim_scans_only_slots_the_daemon_or_the_dead_client_holds(instance, monkeypatch):
    shelf = instance.arena.shelf
    dead = instance.racks.attach(os.getpid(), "dead", None)
    alive = instance.racks.attach(os.getpid(), "alive", None)
    shelf.slots[3].state = _busy(dead.rack_index)         # it died mid-put
    shelf.slots[5].state = shelf_state(lib.SLITTER_SHELF_FULL, 1)  # someone's full magazine
    seen = []
    scan = instance._reclaim_tags

    def watched(tags):
        seen.append({t - lib.SLITTER_SHELF_TAG_BASE: shelf.slots[t - lib.SLITTER_SHELF_TAG_BASE].state
                     for t in tags if t >= lib.SLITTER_SHELF_TAG_BASE})
        return scan(tags)

    monkeypatch.setattr(instance, "_reclaim_tags", watched)
    instance.reclaim(dead, "died")
    assert seen[-1] == {3: _busy(dead.rack_index)}  # still BUSY during the scan: nobody can claim it
    assert shelf.slots[3].state == lib.SLITTER_SHELF_EMPTY
    assert shelf.slots[5].state == shelf_state(lib.SLITTER_SHELF_FULL, 1)  # another client's: left alone
    instance.reclaim(alive, "detached")  # the last client: the whole shelf, each slot held by the daemon
    assert seen[-1] == {i: _busy(lib.SLITTER_SHELF_DAEMON) for i in range(lib.SLITTER_SHELF_SLOTS)}
    assert all(shelf.slots[i].state == lib.SLITTER_SHELF_EMPTY for i in range(lib.SLITTER_SHELF_SLOTS))


@pytest.mark.parametrize("adopt", [True, False])
def test_recovery_scans_only_slots_the_daemon_or_a_dead_client_holds(instance, monkeypatch, adopt):
    from slitterd.instance import Instance

    shelf = instance.arena.shelf
    if adopt:
        adopted = instance.racks.attach(os.getpid(), "runs on", None)  # our pid lives: the next daemon adopts it
    states = {0: lib.SLITTER_SHELF_EMPTY, 1: shelf_state(lib.SLITTER_SHELF_FULL, 1),
              2: shelf_state(lib.SLITTER_SHELF_FULL, 99),
              3: _busy(adopted.rack_index if adopt else 5), 4: _busy(7), 5: _busy(lib.SLITTER_SHELF_DAEMON),
              6: 0xDEADBEEF}
    for i, state in states.items():
        shelf.slots[i].state = state
    successor = Instance(instance.name, instance.arena, 8)
    decided = []
    scan = successor._recover_runs

    def watched(tags):
        decided.append({i: (bool(tags[lib.SLITTER_SHELF_TAG_BASE + i]), shelf.slots[i].state) for i in states})
        return scan(tags)

    monkeypatch.setattr(successor, "_recover_runs", watched)
    successor.recover()
    # At the scan, every slot either keeps its tag or is held, so no client can claim it mid-scan.
    for i, (kept, state) in decided[0].items():
        assert kept or kind_of(state) == lib.SLITTER_SHELF_BUSY, (i, kept, hex(state))
    if adopt:
        assert {i for i, (kept, _) in decided[0].items() if kept} == {0, 1, 3}
        assert decided[0][4][1] == _busy(7)  # a dead holder's slot, as it was
        for i in (2, 5, 6):
            assert decided[0][i][1] == _busy(lib.SLITTER_SHELF_DAEMON), i
    else:
        assert not any(kept for kept, _ in decided[0].values())
    after = {i: shelf.slots[i].state for i in states}
    for i, (kept, state) in decided[0].items():
        assert after[i] == (state if kept else lib.SLITTER_SHELF_EMPTY), (i, hex(after[i]))
    for client in list(successor.racks.clients.values()):
        successor.racks.release_rack(client)


def test_a_pressed_shelf_gives_back_only_as_many_classes_as_bring_a_quarter_empty():
    """Six classes idle on the shelf and a seventh arrives: of the idle ones, the longest idle goes back
    and the rest stay, since one class's slots make a quarter of the shelf empty again."""
    per_class = lib.SLITTER_SHELF_PER_CLASS
    with slitter.spawn_daemon(arena_size="1G", args=("--shelf-idle", "3600")) as address, \
            slitter.connect(address) as heap:
        classes = [heap.register_class(f"shelf-quarter-{i}", size=64) for i in range(7)]
        assert 6 * per_class == lib.SLITTER_SHELF_SLOTS * 3 // 4  # six classes leave exactly a quarter empty
        caps = {}

        def shelve(cls) -> None:
            caps[cls.name] = _shelve_full(heap, cls)

        for cls in classes[:6]:
            shelve(cls)
        time.sleep(1.0)  # all six idle past the pressed threshold; a quarter empty, so none goes back
        stats = heap.stats()["classes"]
        assert [stats[c.name]["shelved"] for c in classes[:6]] == [per_class * caps[c.name] for c in classes[:6]], stats
        shelve(classes[6])  # pressed now: fewer than a quarter of the slots empty

        def gone_back() -> list[str]:
            stats = heap.stats()["classes"]
            return [c.name for c in classes[:6] if stats[c.name]["shelved"] == 0]

        deadline = time.monotonic() + 20
        while not gone_back() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # several more sweeps
        assert len(gone_back()) == 1, heap.stats()["classes"]
        stats = heap.stats()["classes"]
        assert stats[classes[6].name]["shelved"] == per_class * caps[classes[6].name]  # not idle: it stays
        assert all(workers.balanced(figures) for figures in stats.values()), stats
