"""Fast-path benchmark for slitter (a benchmark, not a test: it asserts nothing).

What it measures, in one run against a private daemon (``slitter.spawn_daemon()``):

1. Python fast path: ``cls.release(cls.allocate())`` in a loop on a 64-byte
   class, next to the floor of two empty cffi calls per iteration
   (``lib.slitter_noop_standard()`` twice: an empty function called as cffi
   calls by default, dropping and re-taking the GIL).  Ratio target: <= 1.3
   (issue 6).  slitter._native's own wrappers keep the GIL (see
   native/build_ffi.py), so the pair is also shown against two empty calls
   into that module (``lib.slitter_noop()``), for what is left.
2. C fast path: ``lib.slitter_bench_pairs(heap._client, cls.id, n)`` (the same
   allocate+release pair called from C) next to
   ``lib.slitter_bench_malloc_pairs(64, n)`` (glibc malloc+free of 64 B),
   same process, same clock.  Ratio target: <= 0.75 (issue 6).  Next to
   them, ``lib.slitter_bench_live_byte_pairs(n)``: only the live-map
   traffic every checked pair must make (one ``lock cmpxchg`` of a byte,
   then a store back), the floor of a pair that detects racing double
   frees across processes.
3. Slow path: the PING round trip over a fresh ``Transport`` (p50/p99), and
   the refill round trip: a fresh 64-byte class (magazine capacity M, read
   from the class table) gets N = M * R allocations in a row, each timed; the
   calls during which ``heap.messages_sent`` moved are the ones that sent a
   REFILL (first pass: objects carved fresh; second pass, after releasing
   them all: objects from the depot).  The releases in between time the
   FLUSH round trips the same way.
4. Steady state: 1,000,000 Python allocate+release pairs after warm-up, and
   the number of messages sent to the daemon meanwhile.  Target: 0.
5. Batches: ``release_many(allocate_many(B))`` in a loop for B = 64 and
   1024, per object, against one empty cffi call.  Target: <= 0.25.
   Views, per object over the same 64 live objects: ``heap.view(h)`` (a
   C callable: the foreign/interior checks and a slice), ``cls.views(batch)``
   (one check of the batch, then the slices) and ``arena[h:h + 64]`` in
   Python (the slice alone, unchecked), in alternating blocks.
6. Bursts: 100,000 ``allocate()`` in a row, then 100,000 ``release()``,
   with the time spent outside the fast path (the prefetch and flush-ahead
   hooks, and any waited refill or flush) measured by wrapping those
   functions; target: <= 10% of the steady pair.  Then the same objects
   released by another thread, and by another process (forked before this
   one attached; handles sent over a Pipe).
   Then a magazine passed between two clients of this process on the
   shelf: ``release_many`` of M handles by one heap, which fills its
   release magazine and puts it on the shelf, and ``allocate_many(M)`` by
   the other, which takes it, each per object next to the same call on the
   thread's own magazines, and the messages both heaps sent meanwhile.
7. Round trips, p50/p99: a bare pyzmq DEALER to a ROUTER echo server,
   PING, and a waited REFILL and FLUSH of a full magazine (the bench moves
   the spare magazine's objects into the release magazine of its own rack
   between them).
8. Daemon throughput, after the repetitions above: requests/s of slitterd
   with 1, 2 and 4 client processes (``--quick``: 1 and 4) next to a bare
   pyzmq ROUTER echo server, as ``daemon.py`` measures it (``daemon.measure``,
   its own private daemon; 3 repetitions of 0.5 s windows, ``--quick`` 1 of
   0.3 s), printed in daemon.py's table after this one.

Every repetition runs all measurements interleaved (the two sides of each
ratio in alternating blocks, so they share the machine's noise); the report
gives the median over repetitions and the min-max range.  Ratios are the
median of the per-repetition ratios, so they need not equal the ratio of the
two medians shown.  Round-trip latencies (PING, REFILL, FLUSH) are p50/p99
of all samples pooled over the repetitions.  Timed loops run with the cyclic GC
disabled.  Per-pair times are loop totals divided by the iteration count and
include the Python ``for`` loop (its empty cost is shown for reference).

Run it:

    make bench                                  # cd bench && ../.venv/bin/python fastpath.py
    cd bench && ../.venv/bin/python fastpath.py --quick   # about 10 s
    cd bench && ../.venv/bin/python fastpath.py --json    # machine-readable, on stdout

The default run takes about a minute on 2 cores, item 8 included.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
import threading
import time
from array import array
from typing import Any

import zmq

import slitter
import daemon
from benchlib import (c_pairs, cli, echo_server, loop_py_pairs, loop_two_noops, machine, machine_line,
                      medians_ranges, pct, range_cells, refill_passes, timed, warm)
from slitter import heap as heap_module
from slitter import protocol
from slitter._native import ffi, lib
from slitter._transport import Transport
from slitter.protocol import Op

perf_ns = time.perf_counter_ns

SIZES = {
    #          reps  py-iters  c-pairs     pings/rep  refills/pass/rep  steady pairs
    "default": (21,  300_000,  4_000_000,  1_000,     40,               1_000_000),
    "quick":   (5,   100_000,  1_000_000,  300,       10,               1_000_000),
}
BURST = 100_000  # objects per burst, per cross-thread and per cross-process release
TRIPS = 100      # refill+flush round-trip pairs per repetition
BLOCKS = 5  # alternating blocks per repetition
TARGET_PY_RATIO = 1.3
TARGET_C_RATIO = 0.75
TARGET_BATCH_RATIO = 0.25  # per object, against one empty cffi call
BATCHES = (64, 1024)
DAEMON = {  # daemon.measure(): client counts, seconds per window, repetitions
    "default": ([1, 2, 4], 0.5, 3),
    "quick":   ([1, 4], 0.3, 1),
}


# -- timed loops -------------------------------------------------------------


def loop_empty(n: int) -> float:
    t0 = perf_ns()
    for _ in range(n):
        pass
    return (perf_ns() - t0) / n


def loop_batch_pairs(cls: slitter.Class, batch: int, n: int) -> float:
    """ns per object of ``release_many(allocate_many(batch))`` in a loop: the batch calls in steady state."""
    allocate_many, release_many = cls.allocate_many, cls.release_many
    rounds = max(1, n // batch)
    t0 = perf_ns()
    for _ in range(rounds):
        release_many(allocate_many(batch))
    return (perf_ns() - t0) / (rounds * batch)


def view_costs(heap: slitter.Heap, cls: slitter.Class, n: int) -> dict[str, float]:
    """ns per object: heap.view(h), cls.views(batch of 64) and a Python slice of the arena, over 64 live objects."""
    batch = cls.allocate_many(64)
    view, views, arena, size = heap.view, cls.views, heap.arena, cls.size
    rounds = max(1, n // (64 * BLOCKS))
    one = many = bare = 0
    for _ in range(BLOCKS):
        t0 = perf_ns()
        for _ in range(rounds):
            for h in batch:
                view(h)
        t1 = perf_ns()
        for _ in range(rounds):
            views(batch)
        t2 = perf_ns()
        for _ in range(rounds):
            for h in batch:
                arena[h:h + size]
        t3 = perf_ns()
        one, many, bare = one + t1 - t0, many + t2 - t1, bare + t3 - t2
    cls.release_many(batch)
    per = rounds * BLOCKS * 64
    return {"view_ns": one / per, "views_ns": many / per, "arena_slice_ns": bare / per}


def c_malloc_pairs(n: int) -> float:
    return lib.slitter_bench_malloc_pairs(64, n) / n


def c_live_byte_pairs(n: int) -> float:
    return lib.slitter_bench_live_byte_pairs(n) / n


def ping_round_trips(address: str, n: int) -> list[int]:
    transport = Transport(address, 5)
    try:
        transport.call(Op.PING)  # connect outside the timed calls
        samples = []
        for _ in range(n):
            t0 = perf_ns()
            transport.call(Op.PING)
            samples.append(perf_ns() - t0)
        return samples
    finally:
        transport.close()


def refill_rep(heap: slitter.Heap, rep: int, refills: int) -> tuple[dict[str, Any], dict[str, list[int]]]:
    cls = heap.register_class(f"bench-refill-{rep}", 64)
    capacity = heap._classes_table[cls.id].mag_capacity
    n = capacity * refills
    slow, messages = refill_passes(heap, cls, n)
    fast_a = slow.pop("fast_allocate")
    counts = {"mag_capacity": capacity, "allocations": n, **messages,
              "fast_allocate_timed_p50_ns": pct(fast_a, 50)}
    return counts, slow


def bursts(heap: slitter.Heap, cls: slitter.Class, n: int) -> dict[str, float]:
    """Allocate n objects one by one, then release them all; then the same with the batch calls.

    A thread that only allocates (or only releases) reaches the slow path
    once per magazine: these per-object times include it, amortised.
    """
    allocate, release, transport = cls.allocate, cls.release, heap._transport
    slow_ns = 0

    def timing(fn):
        def timed_slow_path(*args, **kwargs):
            nonlocal slow_ns
            t0 = perf_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                slow_ns += perf_ns() - t0
        return timed_slow_path

    # Time every way out of the fast path: the prefetch and flush-ahead
    # hooks (heap._ahead) and the waiting slow paths.
    ahead = heap_module._ahead
    heap_module._ahead = timing(ahead)
    heap._allocate_slow, heap._release_slow = timing(heap._allocate_slow), timing(heap._release_slow)
    try:
        w0, m0 = transport.round_trips, transport.messages
        t0 = perf_ns()
        handles = [allocate() for _ in range(n)]
        t1 = perf_ns()
        for h in handles:
            release(h)
        t2 = perf_ns()
        w1, m1 = transport.round_trips, transport.messages
    finally:
        heap_module._ahead = ahead
        del heap._allocate_slow, heap._release_slow
    t3 = perf_ns()
    batch = cls.allocate_many(n)
    cls.release_many(batch)
    t4 = perf_ns()
    return {"burst_allocate_ns": (t1 - t0) / n, "burst_release_ns": (t2 - t1) / n,
            "burst_messages": m1 - m0, "burst_waits": w1 - w0, "burst_slow_path_ns": slow_ns / n,
            "burst_many_ns": (t4 - t3) / n}


def cross_thread(cls: slitter.Class, n: int) -> float:
    """ns per release, in another thread, of objects this thread allocated."""
    handles = cls.allocate_many(n)
    out: dict[str, float] = {}

    def other() -> None:
        release = cls.release
        release(cls.allocate())  # bind this thread first (its slow path)
        t0 = perf_ns()
        for h in handles:
            release(h)
        out["ns"] = (perf_ns() - t0) / n

    t = threading.Thread(target=other)
    t.start()
    t.join()
    return out["ns"]


def release_worker(address: str, conn) -> None:
    """Cross-process side: release every batch of handles it is sent; answer (ns per release, waits)."""
    import gc

    gc.disable()
    with slitter.connect(address) as heap:
        cls = heap.register_class("bench-cross", 64)
        cls.release_many(cls.allocate_many(64))  # bind this thread and class
        release, transport = cls.release, heap._transport
        while msg := conn.recv_bytes():
            handles = array("Q")
            handles.frombytes(msg)
            w0 = transport.round_trips
            t0 = perf_ns()
            for h in handles:
                release(h)
            conn.send(((perf_ns() - t0) / len(handles), transport.round_trips - w0))


def cross_process(cls: slitter.Class, conn, n: int) -> tuple[float, int]:
    """ns per release in another process of n objects allocated here, and the round trips it waited for."""
    conn.send_bytes(cls.allocate_many(n))
    return conn.recv()


SHELF_MAGAZINES = 10  # magazines passed through the shelf per repetition


def shelf_hand_off(putter: slitter.Class, taker: slitter.Class, n: int) -> dict[str, float]:
    """n magazines from one heap to another through the shelf, against the same calls on own magazines.

    ``putter`` and ``taker`` are one 64 B class in two heaps of this process
    (two clients, two racks).  ns per object: ``put``, a release_many of M
    handles that fills the putter's release magazine and ends in a put;
    ``take``, an allocate_many(M) that starts with a take; ``own_release``
    and ``own_allocate``, the same calls landing in and coming from the
    thread's own magazines.
    """
    heaps = (putter._heap, taker._heap)
    cap = putter._heap._classes_table[putter.id].mag_capacity
    putter.release_many(putter.allocate_many(cap))  # the putter's allocation magazine full: releases go past it
    taker.release_many(taker.allocate_many(cap))
    m0 = sum(h.messages_sent for h in heaps)
    put = take = own_release = own_allocate = 0
    for _ in range(n):
        handles = taker.allocate_many(cap)  # the taker's allocation magazine is now empty
        t0 = perf_ns()
        putter.release_many(handles)
        t1 = perf_ns()
        handles = taker.allocate_many(cap)
        t2 = perf_ns()
        taker.release_many(handles)  # back into its own allocation magazine
        put, take = put + t1 - t0, take + t2 - t1
    messages = sum(h.messages_sent for h in heaps) - m0
    own = taker.allocate_many(cap)
    for _ in range(n):
        t0 = perf_ns()
        taker.release_many(own)
        t1 = perf_ns()
        own = taker.allocate_many(cap)
        own_release, own_allocate = own_release + t1 - t0, own_allocate + perf_ns() - t1
    taker.release_many(own)
    per = n * cap
    return {"shelf_put_ns": put / per, "shelf_take_ns": take / per, "own_release_many_ns": own_release / per,
            "own_allocate_many_ns": own_allocate / per, "shelf_messages": messages}


def slow_path_trips(heap: slitter.Heap, n: int) -> dict[str, list[int]]:
    """Waited round trips of real refills and flushes: n pairs, each moving a full magazine out and back.

    The thread's spare magazine is refilled (``refill`` with ``spare``), then
    its objects are moved to the release magazine, which ``flush`` audits
    back into the depot.  The bench edits its own rack, as only a client may.
    """
    cls = heap.register_class("bench-trips", 64)
    cls.release(cls.allocate())
    slot = lib.slitter_bind(heap._client, cls.id)
    tc = ffi.cast("struct slitter_rack *", heap._rack.ptr).threads[slot].classes[cls.id]
    out: dict[str, list[int]] = {"refill_wait": [], "flush_wait": []}
    for _ in range(n):
        if tc.spare_count or tc.release_count:
            heap._call(Op.FLUSH, thread=slot, class_id=cls.id)
            tc.release_count = 0
        t0 = perf_ns()
        heap._call(Op.REFILL, thread=slot, class_id=cls.id, spare=True)
        out["refill_wait"].append(perf_ns() - t0)
        k = tc.spare_count
        ffi.memmove(tc.release, tc.spare, 8 * k)
        tc.spare_count = 0
        tc.release_count = k
        t0 = perf_ns()
        heap._call(Op.FLUSH, thread=slot, class_id=cls.id)
        out["flush_wait"].append(perf_ns() - t0)
    return out


def zmq_round_trips(endpoint: str, n: int) -> list[int]:
    """p50/p99 material: a bare pyzmq DEALER round trip to the echo server, with a PING frame."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    frame = protocol.pack(protocol.request(Op.PING, 1))
    sock.send(frame)
    sock.recv()
    samples = []
    for _ in range(n):
        t0 = perf_ns()
        sock.send(frame)
        sock.recv()
        samples.append(perf_ns() - t0)
    sock.close(0)
    ctx.term()
    return samples


# -- the run -------------------------------------------------------------------


def run(size: str, progress) -> dict[str, Any]:
    per_rep: list[dict[str, Any]] = []
    samples: dict[str, list[int]] = {"ping": [], "zmq": [], "refill_wait": [], "flush_wait": [],
                                     "refill_carve": [], "refill_depot": [], "flush": []}
    fork = multiprocessing.get_context("fork")
    with slitter.spawn_daemon() as address:
        # Forked before this process attaches, so the child starts with no heap of ours.
        here, there = fork.Pipe()
        releaser = fork.Process(target=release_worker, args=(address, there), daemon=True)
        releaser.start()
        echo_endpoint = "ipc://" + address + ".echo"
        echo_ready, echo_stop = fork.Event(), fork.Event()
        echo = fork.Process(target=echo_server, args=(echo_endpoint, echo_ready, echo_stop), daemon=True)
        echo.start()
        echo_ready.wait(10)
        try:
            steady = _run(address, size, progress, per_rep, samples, here, echo_endpoint)
        finally:
            here.send_bytes(b"")
            releaser.join(30)
            echo_stop.set()
            echo.join(10)
    result = _summary(size, per_rep, samples, steady)
    # 8. the daemon's requests/s next to a bare pyzmq echo server (daemon.py), with its own daemon.
    counts, seconds, repeats = DAEMON[size]
    result["daemon"] = daemon.measure(counts, seconds, repeats, progress)
    return result


def _run(address: str, size: str, progress, per_rep: list, samples: dict, releaser,
         echo_endpoint: str) -> dict[str, Any]:
    """Every repetition, in this process's heap; fills per_rep and samples, returns the steady state."""
    reps, py_n, c_n, pings, refills, steady_n = SIZES[size]
    with contextlib.ExitStack() as stack:
        heap = stack.enter_context(slitter.connect(address))
        cls = heap.register_class("bench-64", 64)
        burst_cls = heap.register_class("bench-burst", 64)
        cross_cls = heap.register_class("bench-cross", 64)
        burst_cls.release_many(burst_cls.allocate_many(64))
        cross_cls.release_many(cross_cls.allocate_many(64))
        other = stack.enter_context(slitter.connect(address))  # a second client, for the shelf
        putter, taker = heap.register_class("bench-shelf", 64), other.register_class("bench-shelf", 64)
        warm(heap, cls, py_n, c_n)

        # 4. steady state: messages during 1,000,000 pairs after warm-up.
        m0 = heap.messages_sent
        steady_ns = timed(loop_py_pairs, cls, steady_n)
        steady_messages = heap.messages_sent - m0

        for rep in range(reps):
            progress(f"repetition {rep + 1}/{reps}")
            r: dict[str, Any] = {}
            m0 = heap.messages_sent
            r["empty_loop_ns"] = timed(loop_empty, py_n)
            # Each side of a ratio runs in BLOCKS alternating blocks, so a
            # slow phase of the machine lands on both sides alike.
            noops = kept = pairs = c = malloc = live = 0.0
            for _ in range(BLOCKS):
                noops += timed(loop_two_noops, py_n // BLOCKS)
                kept += timed(loop_two_noops, py_n // BLOCKS, True)
                pairs += timed(loop_py_pairs, cls, py_n // BLOCKS)
                c += c_pairs(heap, cls, c_n // BLOCKS)
                malloc += c_malloc_pairs(c_n // BLOCKS)
                live += c_live_byte_pairs(c_n // BLOCKS)
            r["two_noops_ns"], r["py_pair_ns"] = noops / BLOCKS, pairs / BLOCKS
            r["two_kept_noops_ns"] = kept / BLOCKS
            r["c_pair_ns"], r["malloc_pair_ns"] = c / BLOCKS, malloc / BLOCKS
            r["live_byte_pair_ns"] = live / BLOCKS
            r["fast_loop_messages"] = heap.messages_sent - m0
            r["py_ratio"] = r["py_pair_ns"] / r["two_noops_ns"]
            r["py_ratio_kept"] = r["py_pair_ns"] / r["two_kept_noops_ns"]
            r["c_ratio"] = r["c_pair_ns"] / r["malloc_pair_ns"]
            r["live_byte_ratio"] = r["live_byte_pair_ns"] / r["malloc_pair_ns"]
            for b in BATCHES:
                r[f"batch{b}_ns"] = timed(loop_batch_pairs, cls, b, py_n)
                r[f"batch{b}_ratio"] = r[f"batch{b}_ns"] / (r["two_noops_ns"] / 2)
            r.update(timed(view_costs, heap, cls, py_n))
            samples["ping"] += timed(ping_round_trips, address, pings)
            samples["zmq"] += timed(zmq_round_trips, echo_endpoint, pings)
            for kind, values in timed(slow_path_trips, heap, TRIPS).items():
                samples[kind] += values
            counts, slow = timed(refill_rep, heap, rep, refills)
            r.update(counts)
            for kind, values in slow.items():
                samples[kind] += values
            r.update(timed(bursts, heap, burst_cls, BURST))
            r["cross_thread_release_ns"] = timed(cross_thread, cross_cls, BURST)
            r["cross_process_release_ns"], r["cross_process_waits"] = timed(cross_process, cross_cls, releaser,
                                                                            BURST)
            r.update(timed(shelf_hand_off, putter, taker, SHELF_MAGAZINES))
            r["burst_slow_path_share"] = r["burst_slow_path_ns"] / r["py_pair_ns"]
            per_rep.append(r)
    return {"pairs": steady_n, "messages": steady_messages, "pair_ns": steady_ns}


def _summary(size: str, per_rep: list, samples: dict, steady: dict[str, Any]) -> dict[str, Any]:
    reps, py_n, c_n, pings, refills, steady_n = SIZES[size]
    medians, ranges = medians_ranges(per_rep)
    steady_messages = steady["messages"]
    return {
        "machine": machine(),
        "size": size,
        "parameters": {"repetitions": reps, "python_iterations": py_n, "c_pairs": c_n,
                       "pings": pings, "refills_per_pass": refills, "steady_pairs": steady_n},
        "medians": medians,
        "ranges": ranges,
        "round_trips_us": {k: {"samples": len(v), "p50": pct(v, 50) / 1e3, "p99": pct(v, 99) / 1e3}
                           for k, v in samples.items()},
        "steady_state": steady,
        "targets": {
            "py_ratio": {"target": TARGET_PY_RATIO, "value": medians["py_ratio"],
                         "met": medians["py_ratio"] <= TARGET_PY_RATIO},
            "c_ratio": {"target": TARGET_C_RATIO, "value": medians["c_ratio"],
                        "met": medians["c_ratio"] <= TARGET_C_RATIO},
            "steady_messages": {"target": 0, "value": steady_messages, "met": steady_messages == 0},
            **{f"batch{b}_ratio": {"target": TARGET_BATCH_RATIO, "value": medians[f"batch{b}_ratio"],
                                   "met": medians[f"batch{b}_ratio"] <= TARGET_BATCH_RATIO} for b in BATCHES},
            "slow_path_share": {"target": 0.10, "value": medians["burst_slow_path_share"],
                                "met": medians["burst_slow_path_share"] <= 0.10},
        },
        "repetitions": per_rep,
    }


# -- output ---------------------------------------------------------------------

def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    med, rng, t = result["medians"], result["ranges"], result["targets"]
    rt, st, p = result["round_trips_us"], result["steady_state"], result["parameters"]

    def verdict(key: str) -> str:
        return "[green]met[/green]" if t[key]["met"] else "[red]NOT met[/red]"

    ns, ratio = range_cells(med, rng)

    def trip(key: str) -> tuple[str, str]:
        r = rt[key]
        return f"{r['p50']:.0f} / {r['p99']:.0f} µs", f"n={r['samples']}"

    table = Table(title=f"slitter fast path: medians of {p['repetitions']} repetitions",
                  title_justify="left", caption="round trips: p50 / p99 of all samples pooled over repetitions",
                  caption_justify="left")
    table.add_column("measurement")
    table.add_column("median", justify="right")
    table.add_column("min–max / n", justify="right")
    table.add_column("target")
    table.add_row("Python empty for-loop, per iteration", *ns("empty_loop_ns"), "")
    table.add_row("Python 2 empty cffi calls (floor)", *ns("two_noops_ns"), "")
    table.add_row("Python 2 empty calls, GIL kept", *ns("two_kept_noops_ns"), "")
    table.add_row("Python release(allocate()) pair", *ns("py_pair_ns"), "")
    table.add_row("  ratio pair / 2 empty cffi calls", *ratio("py_ratio"), f"<= {TARGET_PY_RATIO} {verdict('py_ratio')}")
    table.add_row("  ratio pair / 2 calls, GIL kept", *ratio("py_ratio_kept"), "")
    for b in BATCHES:
        table.add_row(f"release_many(allocate_many({b})), per object", *ns(f"batch{b}_ns"), "")
        table.add_row("  ratio per object / 1 empty cffi call", *ratio(f"batch{b}_ratio"),
                      f"<= {TARGET_BATCH_RATIO} {verdict(f'batch{b}_ratio')}")
    table.add_row("heap.view(h), per object", *ns("view_ns"), "")
    table.add_row("cls.views(64 handles), per object", *ns("views_ns"), "")
    table.add_row("  heap.arena sliced in Python (unchecked), per obj.", *ns("arena_slice_ns"), "")
    table.add_section()
    table.add_row("C allocate+release pair", *ns("c_pair_ns", 2), "")
    table.add_row("C glibc malloc(64)+free pair", *ns("malloc_pair_ns", 2), "")
    table.add_row("  ratio slitter / glibc", *ratio("c_ratio"), f"<= {TARGET_C_RATIO} {verdict('c_ratio')}")
    table.add_row("C live-map byte alone: cmpxchg + store", *ns("live_byte_pair_ns", 2), "")
    table.add_row("  ratio that floor / glibc", *ratio("live_byte_ratio"), "")
    table.add_section()
    table.add_row(f"burst: {BURST:,} allocate() in a row, per object", *ns("burst_allocate_ns"), "")
    table.add_row(f"burst: then {BURST:,} release(), per object", *ns("burst_release_ns"), "")
    table.add_row("  of which slow path (hooks, refills, flushes) per pair", *ns("burst_slow_path_ns"), "")
    table.add_row("  as a share of the steady pair", *ratio("burst_slow_path_share"),
                  f"<= 0.10 {verdict('slow_path_share')}")
    table.add_row(f"  messages / waited round trips per burst", f"{med['burst_messages']:.0f} / "
                  f"{med['burst_waits']:.0f}", "", "")
    table.add_row(f"burst: allocate_many + release_many, per object", *ns("burst_many_ns"), "")
    table.add_row("release() in another thread, per object", *ns("cross_thread_release_ns"), "")
    table.add_row("release() in another process, per object", *ns("cross_process_release_ns"), "")
    table.add_row("  its waited round trips per burst", f"{med['cross_process_waits']:.0f}", "", "")
    table.add_row("shelf: release_many(M) ending in a put, per obj.", *ns("shelf_put_ns"), "")
    table.add_row("  the same into the thread's own magazines", *ns("own_release_many_ns"), "")
    table.add_row("shelf: allocate_many(M) taking one, per obj.", *ns("shelf_take_ns"), "")
    table.add_row("  the same from the thread's own magazine", *ns("own_allocate_many_ns"), "")
    table.add_row(f"  messages while {SHELF_MAGAZINES} magazines pass", f"{med['shelf_messages']:.0f}", "", "")
    table.add_section()
    table.add_row("bare pyzmq round trip (echo server)", *trip("zmq"), "")
    table.add_row("PING round trip", *trip("ping"), "")
    table.add_row("REFILL of a full magazine, waited", *trip("refill_wait"), "")
    table.add_row("FLUSH of a full magazine, waited", *trip("flush_wait"), "")
    table.add_row("allocate that sent REFILL (carve)", *trip("refill_carve"), "")
    table.add_row("allocate that sent REFILL (depot)", *trip("refill_depot"), "")
    table.add_row("release that sent FLUSH", *trip("flush"), "")
    table.add_row("allocate without message, p50", *ns("fast_allocate_timed_p50_ns", 0), "")
    table.add_row("  magazine capacity M", f"{med['mag_capacity']:.0f}", "", "")
    table.add_row("  allocations / REFILLs per pass",
                  f"{med['allocations']:.0f} / {med['refill_messages_carve']:.0f}", "", "")
    table.add_section()
    table.add_row(f"messages in {st['pairs']:,} steady pairs", f"{st['messages']}", "",
                  f"0 {verdict('steady_messages')}")
    table.add_row("  per pair, that loop", f"{st['pair_ns']:.1f} ns", "", "")

    console = Console(width=max(100, Console().width))
    console.print(table)
    if "daemon" in result:
        daemon.print_table(result["daemon"])
    print(machine_line(result["machine"]))


def main(argv: list[str] | None = None) -> int:
    return cli(__doc__, run, print_table, "fewer and shorter repetitions (a few seconds)", argv)


if __name__ == "__main__":
    sys.exit(main())
