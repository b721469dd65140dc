"""Per-class counters are exact: the daemon's sums equal what the clients themselves counted."""

from __future__ import annotations

import pytest
from conftest import run_spawned, thread_class

import slitter
import workers
from slitter._native import lib
from workers import KINDS


def test_counters_match_the_clients_own_counts(daemon, heap):
    procs, results = run_spawned(workers.counted_mix, [(daemon.address, seed) for seed in range(3)],
                                 timeout=120, join_timeout=60)
    for p in procs:
        assert p.exitcode == 0
    stats = heap.stats()["classes"]
    held = {"a": 0, "b": 0}
    refills = flushes = 0
    for name in ("a", "b"):
        expected = {key: sum(r[0][name][key] for r in results) for key in ("allocations", "releases", *KINDS)}
        got = stats[name]
        assert got["allocations"] == expected["allocations"]
        assert got["releases"] == expected["releases"]
        for kind in KINDS:
            assert got["errors"][kind] == expected[kind], (name, kind)
        assert got["errors"]["corrupt"] == 0
        assert any(expected[k] for k in KINDS), "the mix made no bad releases"
    for mine, live, sent in results:
        for name, _ in live:
            held[name] += 1
        refills += sent.get("refill", 0)
        flushes += sent.get("flush", 0)
    for name in ("a", "b"):
        c = stats[name]
        assert c["live"] == held[name]
        assert c["cached"] == 0  # every client left
        assert c["carved"] == c["live"] + c["cached"] + c["free"]
    assert stats["a"]["refills"] + stats["b"]["refills"] == refills
    assert stats["a"]["flushes"] + stats["b"]["flushes"] == flushes
    entries, since = [], 0
    while page := heap.audit(since=since, limit=1000)["entries"]:
        entries += page
        since = page[-1][0]
    assert len(entries) == sum(sum(r[0][n][k] for k in KINDS) for r in results for n in ("a", "b"))
    assert heap.audit()["dropped"] == 0


def test_a_first_refill_fills_whole_magazines_and_runs_are_counted(heap):
    cls = heap.register_class("first", size=4096)
    entry = heap._classes_table[cls.id]
    cap, per_run = entry.mag_capacity, entry.objects_per_run
    h = cls.allocate()
    stats = heap.stats()["classes"]["first"]
    assert (stats["live"], stats["cached"]) == (1, 2 * cap - 1)  # the allocation magazine and the spare
    handles = [h] + [cls.allocate() for _ in range(2 * per_run)]  # through a second and a third run
    stats = heap.stats()["classes"]["first"]
    assert stats["runs"] == -(-stats["carved"] // per_run) >= 3
    assert stats["reserved_bytes"] == stats["runs"] * entry.spans_per_run * lib.SLITTER_SPAN_SIZE
    cls.release_many(handles)


def test_rack_counts_a_client_writes_are_not_trusted_past_the_magazines(heap):
    """Stats read the rack a client writes: a count past a magazine's size is clamped to it."""
    cls = heap.register_class("clamped", size=64)
    cls.release(cls.allocate())
    tc = thread_class(heap, cls)
    saved = tc.alloc_count
    tc.alloc_count = 2**32 - 1
    try:
        cached = heap.stats()["classes"]["clamped"]["cached"]
    finally:
        tc.alloc_count = saved
    assert cached <= 4 * lib.SLITTER_MAG_CAP


def test_an_operation_under_way_is_not_counted_as_a_huge_number(heap):
    """The counting bit (set across an operation's live-byte change) is no part of the count."""
    cls = heap.register_class("under-way", size=64)
    cls.release(cls.allocate())
    before = heap.stats()["classes"]["under-way"]
    tc = thread_class(heap, cls)
    counters = tc.counters
    counters.allocations |= lib.SLITTER_COUNTING
    counters.releases |= lib.SLITTER_COUNTING
    try:
        during = heap.stats()["classes"]["under-way"]
    finally:
        counters.allocations &= ~lib.SLITTER_COUNTING
        counters.releases &= ~lib.SLITTER_COUNTING
    assert (during["allocations"], during["releases"]) == (before["allocations"], before["releases"])


def test_a_refused_double_free_leaves_no_operation_under_way(heap):
    """The counting bit is cleared again when the live byte says double free: a client that then dies
    is not settled for an operation it never made."""
    cls = heap.register_class("refused-twice", size=64)
    h = cls.allocate()
    cls.release(h)
    with pytest.raises(slitter.DoubleFree):
        cls.release(h)
    tc = thread_class(heap, cls)
    assert not tc.counters.releases & lib.SLITTER_COUNTING
    assert not tc.counters.allocations & lib.SLITTER_COUNTING
    assert tc.counters.errors[lib.SLITTER_ERR_DOUBLE_FREE] == 1
