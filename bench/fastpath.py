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
   same process, same clock.  Ratio target: <= 0.75 (issue 6).
3. Slow path: the PING round trip over a fresh ``Transport`` (p50/p99), and
   the refill round trip: a fresh 64-byte class (magazine capacity M, read
   from the class table) gets N = M * R allocations in a row, each timed; the
   calls during which ``heap.messages_sent`` moved are the ones that sent a
   REFILL (first pass: objects carved fresh; second pass, after releasing
   them all: objects from the depot).  The releases in between time the
   FLUSH round trips the same way.
4. Steady state: 1,000,000 Python allocate+release pairs after warm-up, and
   the number of messages sent to the daemon meanwhile.  Target: 0.

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
    cd bench && ../.venv/bin/python fastpath.py --quick   # a few seconds
    cd bench && ../.venv/bin/python fastpath.py --json    # machine-readable, on stdout

The default run takes well under a minute on 2 cores.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import slitter
from benchlib import c_pairs, timed, cli, loop_py_pairs, loop_two_noops, machine
from slitter._native import lib
from slitter._transport import Transport
from slitter.protocol import Op

perf_ns = time.perf_counter_ns

SIZES = {
    #          reps  py-iters  c-pairs     pings/rep  refills/pass/rep  steady pairs
    "default": (21,  300_000,  4_000_000,  1_000,     40,               1_000_000),
    "quick":   (5,   100_000,  1_000_000,  300,       10,               1_000_000),
}
BLOCKS = 5  # alternating blocks per repetition
TARGET_PY_RATIO = 1.3
TARGET_C_RATIO = 0.75


# -- timed loops -------------------------------------------------------------


def loop_empty(n: int) -> float:
    t0 = perf_ns()
    for _ in range(n):
        pass
    return (perf_ns() - t0) / n


def c_malloc_pairs(n: int) -> float:
    return lib.slitter_bench_malloc_pairs(64, n) / n


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


def split_by_message(heap: slitter.Heap, op, items) -> tuple[list[int], list[int], list[Any]]:
    """Time ``op(item)`` per item; (fast ns, slow ns, results), slow = sent a message."""
    fast, slow, results = [], [], []
    sent = heap.messages_sent
    for item in items:
        t0 = perf_ns()
        result = op(item)
        dt = perf_ns() - t0
        now = heap.messages_sent
        (slow if now != sent else fast).append(dt)
        sent = now
        results.append(result)
    return fast, slow, results


def refill_rep(heap: slitter.Heap, rep: int, refills: int) -> tuple[dict[str, Any], dict[str, list[int]]]:
    cls = heap.register_class(f"bench-refill-{rep}", 64)
    capacity = heap._classes_table[cls.id].mag_capacity
    n = capacity * refills
    m0 = heap.messages_sent
    fast_a, carve, handles = split_by_message(heap, lambda _i: cls.allocate(), range(n))
    m1 = heap.messages_sent
    _fast_r, flush, _ = split_by_message(heap, cls.release, handles)
    m2 = heap.messages_sent
    _fast_b, depot, handles = split_by_message(heap, lambda _i: cls.allocate(), range(n))
    m3 = heap.messages_sent
    for h in handles:
        cls.release(h)
    counts = {"mag_capacity": capacity, "allocations": n, "refill_messages_carve": m1 - m0,
              "flush_messages": m2 - m1, "refill_messages_depot": m3 - m2,
              "fast_allocate_timed_p50_ns": pct(fast_a, 50)}
    return counts, {"refill_carve": carve, "refill_depot": depot, "flush": flush}


def pct(samples: list[int], p: float) -> float:
    if not samples:
        return float("nan")
    s = sorted(samples)
    return float(s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))])


# -- the run -------------------------------------------------------------------


def run(size: str, progress) -> dict[str, Any]:
    reps, py_n, c_n, pings, refills, steady_n = SIZES[size]
    per_rep: list[dict[str, Any]] = []
    samples: dict[str, list[int]] = {"ping": [], "refill_carve": [], "refill_depot": [], "flush": []}
    with slitter.spawn_daemon() as address, slitter.connect(address) as heap:
        cls = heap.register_class("bench-64", 64)
        # Bind this thread and the class (the slow path), then warm the magazines.
        cls.release(cls.allocate())
        timed(loop_py_pairs, cls, py_n // 4)
        c_pairs(heap, cls, c_n // 10)

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
            noops = kept = pairs = c = malloc = 0.0
            for _ in range(BLOCKS):
                noops += timed(loop_two_noops, py_n // BLOCKS)
                kept += timed(loop_two_noops, py_n // BLOCKS, True)
                pairs += timed(loop_py_pairs, cls, py_n // BLOCKS)
                c += c_pairs(heap, cls, c_n // BLOCKS)
                malloc += c_malloc_pairs(c_n // BLOCKS)
            r["two_noops_ns"], r["py_pair_ns"] = noops / BLOCKS, pairs / BLOCKS
            r["two_kept_noops_ns"] = kept / BLOCKS
            r["c_pair_ns"], r["malloc_pair_ns"] = c / BLOCKS, malloc / BLOCKS
            r["fast_loop_messages"] = heap.messages_sent - m0
            r["py_ratio"] = r["py_pair_ns"] / r["two_noops_ns"]
            r["py_ratio_kept"] = r["py_pair_ns"] / r["two_kept_noops_ns"]
            r["c_ratio"] = r["c_pair_ns"] / r["malloc_pair_ns"]
            samples["ping"] += timed(ping_round_trips, address, pings)
            counts, slow = timed(refill_rep, heap, rep, refills)
            r.update(counts)
            for kind, values in slow.items():
                samples[kind] += values
            per_rep.append(r)

    keys = [k for k in per_rep[0] if isinstance(per_rep[0][k], (int, float))]
    medians = {k: statistics.median(r[k] for r in per_rep) for k in keys}
    return {
        "machine": machine(),
        "size": size,
        "parameters": {"repetitions": reps, "python_iterations": py_n, "c_pairs": c_n,
                       "pings": pings, "refills_per_pass": refills, "steady_pairs": steady_n},
        "medians": medians,
        "ranges": {k: [min(r[k] for r in per_rep), max(r[k] for r in per_rep)] for k in keys},
        "round_trips_us": {k: {"samples": len(v), "p50": pct(v, 50) / 1e3, "p99": pct(v, 99) / 1e3}
                           for k, v in samples.items()},
        "steady_state": {"pairs": steady_n, "messages": steady_messages, "pair_ns": steady_ns},
        "targets": {
            "py_ratio": {"target": TARGET_PY_RATIO, "value": medians["py_ratio"],
                         "met": medians["py_ratio"] <= TARGET_PY_RATIO},
            "c_ratio": {"target": TARGET_C_RATIO, "value": medians["c_ratio"],
                        "met": medians["c_ratio"] <= TARGET_C_RATIO},
            "steady_messages": {"target": 0, "value": steady_messages, "met": steady_messages == 0},
        },
        "repetitions": per_rep,
    }


# -- output ---------------------------------------------------------------------

def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    med, rng, t = result["medians"], result["ranges"], result["targets"]
    rt, st, p, mach = result["round_trips_us"], result["steady_state"], result["parameters"], result["machine"]

    def verdict(key: str) -> str:
        return "[green]met[/green]" if t[key]["met"] else "[red]NOT met[/red]"

    def ns(key: str, digits: int = 1) -> tuple[str, str]:
        lo, hi = rng[key]
        return f"{med[key]:.{digits}f} ns", f"{lo:.{digits}f}–{hi:.{digits}f}"

    def ratio(key: str) -> tuple[str, str]:
        lo, hi = rng[key]
        return f"{med[key]:.2f}", f"{lo:.2f}–{hi:.2f}"

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
    table.add_section()
    table.add_row("C allocate+release pair", *ns("c_pair_ns", 2), "")
    table.add_row("C glibc malloc(64)+free pair", *ns("malloc_pair_ns", 2), "")
    table.add_row("  ratio slitter / glibc", *ratio("c_ratio"), f"<= {TARGET_C_RATIO} {verdict('c_ratio')}")
    table.add_section()
    table.add_row("PING round trip", *trip("ping"), "")
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
    print(f"machine: {mach['nproc']} CPUs, {mach['cpu']}, {mach['implementation']} {mach['python']}, "
          f"{mach['platform']}")


def main(argv: list[str] | None = None) -> int:
    return cli(__doc__, run, print_table, "fewer and shorter repetitions (a few seconds)", argv)


if __name__ == "__main__":
    sys.exit(main())
