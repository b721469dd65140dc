"""Overhead benchmark for slitter: metadata and guard pages, checks and counters.

A benchmark, not a test: it asserts nothing.  Two parts:

1. Space.  For 64 B, 1 KiB and 64 KiB classes holding N = 1,000,000 objects,
   a model computed from the real geometry (``slitterd.mill.ClassGeometry``
   and ``ffi.sizeof`` of the structs in native/layout.h) gives the data bytes
   (N * size), the runs needed, the metadata that belongs to the class (its
   span-table and run-table entries, its live-map bytes with each run's base
   rounded up to 64 objects, its class-table entry and its
   entry in the per-class totals table) and its guard pages (one 4 KiB page
   per run).  The share (metadata + guards) / data is compared with the goal
   of at most 3 %.  Reported separately: the tail slack of each run
   (address space between the last object and the guard page, never
   committed) and the unused slots of the last run.

   Then the model is checked by measurement.  For each size a fresh daemon
   (``slitter.spawn_daemon(arena_size="64G")``) gets one class.  The benchmark
   allocates M objects, releases them all, and reads the memory the
   segments really hold.  It counts allocated bytes per table of the meta
   segment with SEEK_DATA/SEEK_HOLE on /dev/shm/slitter.NAME.meta (tmpfs), and
   ``st_blocks`` for the data segment.  The client's own rack, in the same
   file, is counted apart.  Everything is a delta from the empty instance.
   M is 1,000,000 for 64 B and 1 KiB, and 20,000 for 64 KiB (1M of those
   would be 64 GiB).  The 64 KiB share for N comes from the model, checked at M.

2. Time.  What the checks (foreign, class, interior, double free through the
   live map) and the per-thread counters add to a pair, next to the bench
   baselines ``slitter_bench_bare_*``.  Those do the same magazine pop and push
   with no check, no live map and no counter, and must never be used on a
   real heap:

   - Python, same call shape:
     ``release_key(allocate_key(key) << 16 | key)`` against
     ``bare_release_key(bare_allocate_key(key) << 16 | key)``.  This is the
     cost of the checks and counters alone.
   - Python, API: ``cls.release(cls.allocate())`` against the same bare
     loop.  The difference adds the two ``Class`` methods (Python frames, the
     ``if handle`` test, the ``try``) to the checks.
   - C: ``slitter_bench_pairs`` against ``slitter_bench_bare_pairs``.  The
     bare C loop is one inlined pop+push per pair.  The checked loop calls the
     out-of-line ``slitter_allocate``/``slitter_release``, each finding the
     thread slot through TLS.  So that difference is an upper bound on the
     checks and counters: it also includes two calls and two slot lookups.

   Every repetition runs all variants in alternating blocks.  The table gives
   medians over repetitions.  Differences and ratios are medians of the
   per-repetition values.  Timed loops run with the cyclic GC disabled, and
   the Python figures include the ``for`` loop.

Run it:

    cd bench && ../.venv/bin/python overhead.py            # well under a minute
    cd bench && ../.venv/bin/python overhead.py --quick    # fewer objects, < 20 s
    cd bench && ../.venv/bin/python overhead.py --json     # machine-readable, on stdout
"""

from __future__ import annotations

import errno
import gc
import os
import sys
import time
from typing import Any

import slitter
from benchlib import (c_pairs, cli, fmt_bytes, loop_py_pairs, machine, machine_line, medians_ranges, range_cells,
                      timed, warm)
from slitter import address as _address
from slitter._native import ffi, lib
from slitterd.mill import ClassGeometry

perf_ns = time.perf_counter_ns

PAGE = lib.SLITTER_PAGE_SIZE
SPAN = lib.SLITTER_SPAN_SIZE
CLASS_SIZES = (64, 1024, 65536)
N_MODEL = 1_000_000
GOAL_SHARE = 0.03
ARENA = "64G"

SIZES = {
    #           reps  py-iters  c-pairs    objects measured per class size
    "default": (21,   300_000,  4_000_000, {64: 1_000_000, 1024: 1_000_000, 65536: 20_000}),
    "quick":   (5,    60_000,   1_000_000, {64: 200_000, 1024: 100_000, 65536: 2_000}),
}
BLOCKS = 5  # alternating blocks per repetition

SIZEOF = {name: ffi.sizeof(f"struct slitter_{name}")
          for name in ("header", "span", "run", "class", "rack", "class_totals")}
MODEL_CLASS_ID = 1  # the only class of a fresh daemon


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def page_round(n: int) -> int:
    return ceil_div(n, PAGE) * PAGE


# -- 1. space: the model ---------------------------------------------------------

def space_model(size: int, n: int) -> dict[str, Any]:
    """The bytes that ``n`` objects of a ``size``-byte class take, from the real geometry."""
    g = ClassGeometry.for_size(size)
    runs = ceil_div(n, g.objects_per_run)
    live_per_run = ceil_div(g.objects_per_run, 64) * 64  # obj_base rounds up to 64 entries
    spans = runs * g.spans_per_run
    parts = {
        "span_table": spans * SIZEOF["span"],
        "run_table": runs * SIZEOF["run"],
        "live_map": runs * live_per_run,          # one byte per object
        "class_table": SIZEOF["class"] + SIZEOF["class_totals"],  # and its per-class totals entry
    }
    metadata = sum(parts.values())
    guards = runs * PAGE
    data = n * size
    object_bytes = g.objects_per_run * g.stride
    committed_per_run = page_round(object_bytes)  # what the mill fallocates per run
    slack_per_run = g.spans_per_run * SPAN - PAGE - object_bytes
    return {
        "size": size, "objects": n, "stride": g.stride, "objects_per_run": g.objects_per_run,
        "spans_per_run": g.spans_per_run, "mag_capacity": g.mag_capacity, "runs": runs, "spans": spans,
        "data_bytes": data, "metadata": parts, "metadata_bytes": metadata, "guard_bytes": guards,
        "metadata_share": metadata / data, "guard_share": guards / data,
        "share": (metadata + guards) / data, "goal": GOAL_SHARE, "goal_met": (metadata + guards) / data <= GOAL_SHARE,
        "tail_slack_per_run": slack_per_run, "tail_slack_bytes": runs * slack_per_run,
        "tail_slack_share": runs * slack_per_run / data,
        "tail_slack_committed_per_run": committed_per_run - object_bytes,
        "stride_padding_bytes": n * (g.stride - size),
        "last_run_unused_slots": runs * g.objects_per_run - n,
        "last_run_unused_bytes": (runs * g.objects_per_run - n) * g.stride,
        "data_committed_bytes": runs * committed_per_run,
        # The daemon's free list (slitterd.depot: array("Q")) holds 8 B per free
        # object in its private heap: nothing while objects are live.
        "depot_free_list_bytes_all_free": n * 8,
        # Pages of meta the class makes resident (each table page-rounded; the
        # span table starts at span 1: span 0 is the guard span).
        "metadata_pages_bytes": (page_round((1 + spans) * SIZEOF["span"]) + page_round(parts["run_table"])
                                 + page_round(parts["live_map"])
                                 + len(class_table_pages(MODEL_CLASS_ID)) * PAGE),
    }


def class_table_pages(class_id: int) -> set[int]:
    """Pages (relative to the page-aligned class table) holding the entries of ``class_id``."""
    totals_off = lib.SLITTER_MAX_CLASSES * SIZEOF["class"]  # the totals table follows the class table
    entries = [(class_id * SIZEOF["class"], SIZEOF["class"]),
               (totals_off + class_id * SIZEOF["class_totals"], SIZEOF["class_totals"])]
    return {p for off, n in entries for p in range(off // PAGE, (off + n - 1) // PAGE + 1)}


# -- 1. space: the measurement -----------------------------------------------------

def allocated_bytes(fd: int, start: int, end: int) -> int:
    """Bytes of ``fd`` in [start, end) that hold pages (SEEK_DATA/SEEK_HOLE)."""
    total, pos = 0, start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        if data >= end:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        total += min(hole, end) - data
        pos = hole
    return total


class Segments:
    """The two /dev/shm files of a daemon, opened read-only, with the meta segment's regions."""

    def __init__(self, instance: str) -> None:
        meta_path, data_path = _address.segment_paths(instance)
        self.meta_fd = os.open(meta_path, os.O_RDONLY)
        self.data_fd = os.open(data_path, os.O_RDONLY)
        buf = os.pread(self.meta_fd, SIZEOF["header"], 0)
        h = ffi.cast("struct slitter_header *", ffi.from_buffer(buf))
        self.rack_area_off, self.meta_size = h.rack_area_off, h.meta_size
        self.regions = {
            "header": (0, h.span_table_off),
            "span_table": (h.span_table_off, h.run_table_off),
            "run_table": (h.run_table_off, h.class_table_off),
            "class_table": (h.class_table_off, h.tables_end),  # and the totals table
            "live_map": (h.live_map_off, h.live_map_off + h.live_map_bytes),
        }

    def measure(self) -> dict[str, int]:
        out = {name: allocated_bytes(self.meta_fd, a, b) for name, (a, b) in self.regions.items()}
        out["meta_below_racks"] = allocated_bytes(self.meta_fd, 0, self.rack_area_off)
        out["racks"] = allocated_bytes(self.meta_fd, self.rack_area_off, self.meta_size)
        out["meta_st_blocks"] = os.fstat(self.meta_fd).st_blocks * 512
        out["data_st_blocks"] = os.fstat(self.data_fd).st_blocks * 512
        return out

    def close(self) -> None:
        os.close(self.meta_fd)
        os.close(self.data_fd)


def measure_class_in(daemon: slitter.spawn_daemon, size: int, m: int, progress) -> dict[str, Any]:
    """Allocate ``m`` objects of ``size`` bytes in ``daemon`` (fresh); committed bytes before and after."""
    segs = Segments(daemon.name)
    try:
        with slitter.connect(daemon.address) as heap:
            base = segs.measure()
            cls = heap.register_class(f"overhead-{size}", size)
            t0 = time.monotonic()
            allocate, release = cls.allocate, cls.release
            gc.disable()
            try:
                handles = [allocate() for _ in range(m)]
                live = segs.measure()
                stats_live = heap.stats()["classes"][cls.name]
                for h in handles:
                    release(h)
            finally:
                gc.enable()
            del handles
            released = segs.measure()
            stats = heap.stats()["classes"][cls.name]
            seconds = time.monotonic() - t0
        progress(f"  {size} B: {m:,} objects in {seconds:.1f} s")
    finally:
        segs.close()

    def delta(after: dict[str, int]) -> dict[str, int]:
        return {k: after[k] - base[k] for k in after}

    d_live, d_rel = delta(live), delta(released)
    meta_keys = ("span_table", "run_table", "live_map", "class_table")
    measured_meta = sum(d_rel[k] for k in meta_keys)
    model = space_model(size, m)
    return {
        "size": size, "objects": m, "runs": stats["runs"], "model_runs": model["runs"],
        "live_at_peak": stats_live["live"], "live_at_end": stats["live"],
        "errors": sum(stats["errors"].values()), "seconds": round(seconds, 2),
        "baseline": base, "delta_all_live": d_live, "delta_after_release": d_rel,
        "meta_committed_bytes": measured_meta, "model_meta_pages_bytes": model["metadata_pages_bytes"],
        "model_meta_exact_bytes": model["metadata_bytes"],
        "data_committed_bytes": d_rel["data_st_blocks"], "model_data_committed_bytes": model["data_committed_bytes"],
        "data_bytes": m * size,
        "meta_share": measured_meta / (m * size),
        "guard_share_model": model["guard_share"],
        "rack_committed_bytes": d_rel["racks"],
        "other_meta_bytes": d_rel["header"],
        "extrapolated": m < N_MODEL,
    }


# -- 2. time: checks and counters -----------------------------------------------------


# (allocate, release) of the key-level pair: checked, and the bench's bare baseline.
CHECKED_KEY = (lib.slitter_allocate_key, lib.slitter_release_key)
BARE_KEY = (lib.slitter_bench_bare_allocate_key, lib.slitter_bench_bare_release_key)


def loop_key_pairs(allocate, release, key: int, n: int) -> float:
    """ns per ``release(allocate(key) << 16 | key)``, with CHECKED_KEY or BARE_KEY."""
    t0 = perf_ns()
    for _ in range(n):
        release(allocate(key) << 16 | key)
    return (perf_ns() - t0) / n


def time_checks(reps: int, py_n: int, c_n: int, progress) -> dict[str, Any]:
    per_rep: list[dict[str, float]] = []
    with slitter.spawn_daemon() as address, slitter.connect(address) as heap:
        cls = heap.register_class("overhead-time-64", 64)
        key = cls._key
        warm(heap, cls, py_n, c_n)  # binds the thread and the class; fills the magazine
        # The bare pop must find an object, or its push would store handle 0.
        h = lib.slitter_bench_bare_allocate_key(key)
        if not h:
            raise RuntimeError("the allocation magazine is empty after a refill")
        lib.slitter_bench_bare_release_key(h << 16 | key)
        # Warm-up of the other loops.
        timed(loop_key_pairs, *CHECKED_KEY, key, py_n // 4)
        timed(loop_key_pairs, *BARE_KEY, key, py_n // 4)
        c_pairs(heap, cls, c_n // 10, lib.slitter_bench_bare_pairs)
        m0 = heap.messages_sent
        for rep in range(reps):
            progress(f"timing: repetition {rep + 1}/{reps}")
            api = key_ = bare = c = cb = 0.0
            for _ in range(BLOCKS):
                api += timed(loop_py_pairs, cls, py_n // BLOCKS)
                key_ += timed(loop_key_pairs, *CHECKED_KEY, key, py_n // BLOCKS)
                bare += timed(loop_key_pairs, *BARE_KEY, key, py_n // BLOCKS)
                c += c_pairs(heap, cls, c_n // BLOCKS)
                cb += c_pairs(heap, cls, c_n // BLOCKS, lib.slitter_bench_bare_pairs)
            r = {"py_api_pair_ns": api / BLOCKS, "py_key_pair_ns": key_ / BLOCKS,
                 "py_bare_pair_ns": bare / BLOCKS, "c_pair_ns": c / BLOCKS, "c_bare_pair_ns": cb / BLOCKS}
            r["py_key_minus_bare_ns"] = r["py_key_pair_ns"] - r["py_bare_pair_ns"]
            r["py_key_over_bare"] = r["py_key_pair_ns"] / r["py_bare_pair_ns"]
            r["py_api_minus_bare_ns"] = r["py_api_pair_ns"] - r["py_bare_pair_ns"]
            r["py_api_over_bare"] = r["py_api_pair_ns"] / r["py_bare_pair_ns"]
            r["c_minus_bare_ns"] = r["c_pair_ns"] - r["c_bare_pair_ns"]
            r["c_over_bare"] = r["c_pair_ns"] / r["c_bare_pair_ns"]
            per_rep.append(r)
        messages = heap.messages_sent - m0
        cls.release(cls.allocate())  # the checked path still accepts the magazine's objects
        stats = heap.stats()["classes"][cls.name]
    medians, ranges = medians_ranges(per_rep)
    return {
        "parameters": {"repetitions": reps, "python_pairs": py_n, "c_pairs": c_n, "blocks": BLOCKS},
        "medians": medians,
        "ranges": ranges,
        "messages_during_timed_loops": messages,
        "errors_counted": sum(stats["errors"].values()),
        "repetitions": per_rep,
    }


# -- the run ------------------------------------------------------------------------


def run(size: str, progress) -> dict[str, Any]:
    reps, py_n, c_n, counts = SIZES[size]
    model = {str(s): space_model(s, N_MODEL) for s in CLASS_SIZES}
    measured = {}
    progress(f"space: one daemon per class size, arena {ARENA}")
    for s in CLASS_SIZES:
        daemon = slitter.spawn_daemon(arena_size=ARENA)
        daemon.start()
        try:
            measured[str(s)] = measure_class_in(daemon, s, counts[s], progress)
        finally:
            daemon.stop()
        if daemon.left_segments:
            progress(f"  warning: segments left behind: {daemon.left_segments}")
    timing = time_checks(reps, py_n, c_n, progress)
    return {"machine": machine(), "size": size, "n_model": N_MODEL, "goal_share": GOAL_SHARE,
            "sizeof": SIZEOF, "model": model, "measured": measured, "timing": timing}


# -- output ---------------------------------------------------------------------------

def _kib(n: int) -> str:
    """Bytes in KiB: committed metadata is counted in whole pages."""
    return f"{n / 1024:,.0f} KiB"


def _pct(x: float) -> str:
    return f"{100 * x:.3f} %"


def print_tables(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(120, Console().width))
    sizes = [str(s) for s in CLASS_SIZES]
    mo, me = result["model"], result["measured"]
    label = {"64": "64 B", "1024": "1 KiB", "65536": "64 KiB"}

    t = Table(title=f"Space model: {result['n_model']:,} objects per class (from ClassGeometry and ffi.sizeof)",
              title_justify="left", caption="share = bytes / data bytes (N × size); guard pages and tail slack "
              "are address space, never committed", caption_justify="left")
    t.add_column("", no_wrap=True)
    for s in sizes:
        t.add_column(label[s], justify="right")

    def row(name: str, fn) -> None:
        t.add_row(name, *(fn(mo[s]) for s in sizes))

    row("stride / objects per run", lambda m: f"{m['stride']} / {m['objects_per_run']:,}")
    row("spans per run (64 KiB each)", lambda m: f"{m['spans_per_run']}")
    row("runs needed", lambda m: f"{m['runs']:,}")
    row("data bytes (N × size)", lambda m: fmt_bytes(m["data_bytes"]))
    t.add_section()
    sz = result["sizeof"]
    row(f"span-table entries ({sz['span']} B/span)", lambda m: fmt_bytes(m["metadata"]["span_table"]))
    row(f"run-table entries ({sz['run']} B/run)", lambda m: fmt_bytes(m["metadata"]["run_table"]))
    row("live map (1 B/object, 64-rounded)", lambda m: fmt_bytes(m["metadata"]["live_map"]))
    row(f"class + totals entries ({sz['class']}+{sz['class_totals']} B)",
        lambda m: fmt_bytes(m["metadata"]["class_table"]))
    row("metadata total", lambda m: f"{fmt_bytes(m['metadata_bytes'])}  {_pct(m['metadata_share'])}")
    row("guard pages (4 KiB/run)", lambda m: f"{fmt_bytes(m['guard_bytes'])}  {_pct(m['guard_share'])}")
    t.add_section()
    t.add_row("[bold](metadata + guards) / data[/bold]",
              *(f"[bold]{_pct(mo[s]['share'])}[/bold]" for s in sizes))
    t.add_row(f"  goal <= {100 * result['goal_share']:.0f} %",
              *("[green]met[/green]" if mo[s]["goal_met"] else "[red]NOT met[/red]" for s in sizes))
    t.add_section()
    row("tail slack per run (VA, not committed)", lambda m: fmt_bytes(m["tail_slack_per_run"]))
    row("tail slack, all runs (share)",
        lambda m: f"{fmt_bytes(m['tail_slack_bytes'])}  {_pct(m['tail_slack_share'])}")
    row("unused slots in the last run",
        lambda m: f"{m['last_run_unused_slots']:,} ({fmt_bytes(m['last_run_unused_bytes'])})")
    row("daemon free list if all N are free", lambda m: f"{fmt_bytes(m['depot_free_list_bytes_all_free'])}  "
        f"{_pct(m['depot_free_list_bytes_all_free'] / m['data_bytes'])}")
    console.print(t)

    v = Table(title="Space measured: committed bytes after allocating M objects and releasing them "
              "(delta from the empty instance)", title_justify="left",
              caption="meta: SEEK_DATA/SEEK_HOLE per table on /dev/shm/slitter.NAME.meta; data: st_blocks; "
              "model = page-rounded tables for M objects", caption_justify="left")
    v.add_column("", no_wrap=True)
    for s in sizes:
        v.add_column(label[s], justify="right")

    def vrow(name: str, fn) -> None:
        v.add_row(name, *(fn(me[s]) for s in sizes))

    vrow("objects measured (M)", lambda r: f"{r['objects']:,}" + (" *" if r["extrapolated"] else ""))
    vrow("runs carved (daemon) / model", lambda r: f"{r['runs']:,} / {r['model_runs']:,}")
    vrow("data committed / model",
         lambda r: f"{fmt_bytes(r['data_committed_bytes'])} / {fmt_bytes(r['model_data_committed_bytes'])}")
    for k in ("span_table", "run_table", "live_map", "class_table"):
        name = "class table + totals" if k == "class_table" else k.replace("_", " ")
        vrow(f"  {name}", lambda r, k=k: _kib(r["delta_after_release"][k]))
    vrow("meta committed / model (pages)",
         lambda r: f"{_kib(r['meta_committed_bytes'])} / {_kib(r['model_meta_pages_bytes'])}")
    vrow("meta committed / data (M × size)", lambda r: _pct(r["meta_share"]))
    vrow("+ guard pages (model, VA)", lambda r: _pct(r["guard_share_model"]))
    vrow("[bold]= measured share[/bold]", lambda r: f"[bold]{_pct(r['meta_share'] + r['guard_share_model'])}[/bold]")
    v.add_section()
    vrow("client rack committed (not per class)", lambda r: fmt_bytes(r["rack_committed_bytes"]))
    vrow("meta committed, objects all live", lambda r: _kib(sum(r["delta_all_live"][k] for k in
                                                          ("span_table", "run_table", "live_map",
                                                           "class_table"))))
    vrow("seconds (allocate + release)", lambda r: f"{r['seconds']:.1f}")
    console.print(v)
    if any(me[s]["extrapolated"] for s in sizes):
        console.print(f"* fewer than N = {result['n_model']:,} objects measured; the share for N is the model's, "
                      "checked at M")

    tm = result["timing"]
    med, rng, p = tm["medians"], tm["ranges"], tm["parameters"]
    tt = Table(title=f"Checks and counters: a 64 B class, medians of {p['repetitions']} repetitions",
               title_justify="left", caption="bare = slitter_bench_bare_*: the same magazine pop and push "
               "with no check, no live map, no counter (bench baselines only)", caption_justify="left")
    tt.add_column("per pair")
    tt.add_column("median", justify="right")
    tt.add_column("min–max", justify="right")

    ns, ratio = range_cells(med, rng)

    tt.add_row("Python bare: bare_release_key(bare_allocate_key(k) << 16 | k)", *ns("py_bare_pair_ns"))
    tt.add_row("Python checked: release_key(allocate_key(k) << 16 | k)", *ns("py_key_pair_ns"))
    tt.add_row("  checks + counters (checked − bare)", *ns("py_key_minus_bare_ns"))
    tt.add_row("  ratio checked / bare", *ratio("py_key_over_bare"))
    tt.add_row("Python API: cls.release(cls.allocate())", *ns("py_api_pair_ns"))
    tt.add_row("  checks + counters + Class methods (API − bare)", *ns("py_api_minus_bare_ns"))
    tt.add_row("  ratio API / bare", *ratio("py_api_over_bare"))
    tt.add_section()
    tt.add_row("C bare: slitter_bench_bare_pairs", *ns("c_bare_pair_ns", 2))
    tt.add_row("C checked: slitter_bench_pairs", *ns("c_pair_ns", 2))
    tt.add_row("  checks + counters + 2 calls (checked − bare)", *ns("c_minus_bare_ns", 2))
    tt.add_row("  ratio checked / bare", *ratio("c_over_bare"))
    tt.add_section()
    tt.add_row("messages during timed loops / errors counted",
               f"{tm['messages_during_timed_loops']} / {tm['errors_counted']}", "")
    console.print(tt)
    print(machine_line(result["machine"]))


def main(argv: list[str] | None = None) -> int:
    return cli(__doc__, run, print_tables, "fewer objects and repetitions (< 20 s)", argv)


if __name__ == "__main__":
    sys.exit(main())
