"""What the benchmarks in bench/ share: the machine they ran on and the timing loops.

Each benchmark is run from this directory (`cd bench && ../.venv/bin/python X.py`),
so `import benchlib` finds this file.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import platform
import statistics
import time
import traceback
from time import perf_counter_ns as perf_ns
from typing import Any, Callable

import slitter
from slitter._native import lib


def machine() -> dict[str, Any]:
    """Cores, CPU model, Python and platform, for the record next to every figure."""
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "implementation": platform.python_implementation(), "platform": platform.platform()}


def loop_two_noops(n: int, kept_gil: bool = False) -> float:
    """ns per iteration of two empty calls: the floor of a Python pair.

    By default an empty call as cffi makes it (the GIL dropped and re-taken),
    the floor issue 6's target names; ``kept_gil`` calls slitter._native's
    own empty function, whose wrapper keeps the GIL as all of that module's do.
    """
    noop = lib.slitter_noop if kept_gil else lib.slitter_noop_standard
    t0 = perf_ns()
    for _ in range(n):
        noop()
        noop()
    return (perf_ns() - t0) / n


def loop_py_pairs(cls: slitter.Class, n: int) -> float:
    """ns per ``release(allocate())`` from Python."""
    allocate, release = cls.allocate, cls.release
    t0 = perf_ns()
    for _ in range(n):
        release(allocate())
    return (perf_ns() - t0) / n


def timed(fn, *args) -> Any:
    """``fn(*args)`` with the garbage collector paused, so no collection lands in a timed loop."""
    gc_was = gc.isenabled()
    gc.disable()
    try:
        return fn(*args)
    finally:
        if gc_was:
            gc.enable()


def c_pairs(heap: slitter.Heap, cls: slitter.Class, n: int, fn=lib.slitter_bench_pairs) -> float:
    """ns per allocate+release pair from a C loop on the fast path (the thread must be bound).

    ``fn`` is the C loop: ``slitter_bench_pairs`` (the checked pair) by
    default, or ``slitter_bench_bare_pairs`` (overhead.py's bare baseline).
    """
    ns = fn(heap._client, cls.id, n)
    if ns < 0:
        raise RuntimeError(f"{fn.__name__} left the fast path (thread not bound, or a magazine ran dry)")
    return ns / n


def warm(heap: slitter.Heap, cls: slitter.Class, py_n: int, c_n: int) -> None:
    """Bind this thread and ``cls`` (the slow path), then warm its magazines from Python and from C."""
    cls.release(cls.allocate())
    timed(loop_py_pairs, cls, py_n // 4)
    c_pairs(heap, cls, c_n // 10)


def pct(samples: list[int], p: float) -> float:
    """The p-th percentile of samples: the sorted sample at rank round(p% of n - 1); NaN if there are none."""
    if not samples:
        return float("nan")
    s = sorted(samples)
    return float(s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))])


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


def refill_passes(heap: slitter.Heap, cls: slitter.Class, n: int) -> tuple[dict[str, list[int]], dict[str, int]]:
    """n single allocations, each timed; then their releases; then n allocations again.

    The first pass carves fresh objects (or takes what the depot has), the
    second refills from the depot; everything is released at the end.
    Returns the ns of the calls that sent a message (``refill_carve``,
    ``flush``, ``refill_depot``) and of the first pass's calls that did not
    (``fast_allocate``), and the messages each pass sent.
    """
    m0 = heap.messages_sent
    fast, carve, handles = split_by_message(heap, lambda _i: cls.allocate(), range(n))
    m1 = heap.messages_sent
    _fast, flush, _ = split_by_message(heap, cls.release, handles)
    m2 = heap.messages_sent
    _fast, depot, handles = split_by_message(heap, lambda _i: cls.allocate(), range(n))
    m3 = heap.messages_sent
    for h in handles:
        cls.release(h)
    samples = {"fast_allocate": fast, "refill_carve": carve, "refill_depot": depot, "flush": flush}
    return samples, {"refill_messages_carve": m1 - m0, "flush_messages": m2 - m1, "refill_messages_depot": m3 - m2}


def medians_ranges(per_rep: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Per numeric key of the repetitions: the median, and the [min, max] range."""
    keys = [k for k in per_rep[0] if isinstance(per_rep[0][k], (int, float))]
    return ({k: statistics.median(r[k] for r in per_rep) for k in keys},
            {k: [min(r[k] for r in per_rep), max(r[k] for r in per_rep)] for k in keys})


# -- output --------------------------------------------------------------------


def machine_line(m: dict[str, Any]) -> str:
    """The last line of every benchmark's tables: what ``machine()`` found."""
    return f"machine: {m['nproc']} CPUs, {m['cpu']}, {m['implementation']} {m['python']}, {m['platform']}"


def range_cells(medians: dict[str, float], ranges: dict[str, list[float]]):
    """Table cell formatters (median, min–max): ``ns(key, digits=1)`` and ``ratio(key)``."""

    def ns(key: str, digits: int = 1) -> tuple[str, str]:
        lo, hi = ranges[key]
        return f"{medians[key]:.{digits}f} ns", f"{lo:.{digits}f}–{hi:.{digits}f}"

    def ratio(key: str) -> tuple[str, str]:
        lo, hi = ranges[key]
        return f"{medians[key]:.2f}", f"{lo:.2f}–{hi:.2f}"

    return ns, ratio


def fmt_bytes(n: float) -> str:
    """Bytes, human-readable (binary units)."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def cli(doc: str, run, print_tables, quick_help: str, argv: list[str] | None = None,
        save=None, add_arguments=None) -> int:
    """The command line every benchmark shares: ``--quick``, ``--json``, progress on stderr.

    ``run(mode, progress, **extra)`` returns the result dict; ``save(result,
    quick)``, if given, writes it somewhere and returns a note for the last
    line.  ``add_arguments(parser)``, if given, adds a benchmark's own
    options; their parsed values are ``extra``, by destination name.
    """
    import argparse
    import json
    import sys
    import time

    parser = argparse.ArgumentParser(description=doc.split("\n\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", action="store_true", help="print the full result as JSON instead of tables")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    extra = {k: v for k, v in vars(args).items() if k not in ("quick", "json")}

    def progress(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr, flush=True)

    start = time.monotonic()
    result = run("quick" if args.quick else "default", progress, **extra)
    result["wall_seconds"] = round(time.monotonic() - start, 2)
    note = save(result, args.quick) if save is not None else ""
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print_tables(result)
        print(f"wall time: {result['wall_seconds']} s{note}")
    return 0


def echo_server(endpoint: str, ready, stop) -> None:
    """A bare pyzmq ROUTER that answers every frame with itself: the floor of any ZeroMQ + Python server."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    ready.set()
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while not stop.is_set():
        if poller.poll(100):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                sock.send_multipart(frames)
    sock.close(0)
    ctx.term()


CTX = mp.get_context("fork")
TRIAL_TIMEOUT = 300  # seconds to wait for each worker's result in a trial

# -- worker trials: forked workers, one timed window, CPU of every process -----------

_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """utime + stime of a process, all threads, in seconds (10 ms resolution)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK



Setup = Callable[..., tuple[Callable[[], tuple[int, int]], Callable[[], None]]]


def _child(index: int, setup: Setup, args: tuple, barrier, results, done) -> None:
    try:
        work, cleanup = setup(*args)
        gc.collect()
        gc.disable()
        barrier.wait(120)
        c0, t0 = time.process_time(), time.perf_counter()
        records, errors = work()
        t1, c1 = time.perf_counter(), time.process_time()
        results.put((index, {"records": records, "errors": errors, "cpu": c1 - c0, "t0": t0, "t1": t1}))
    except BaseException:
        results.put((index, {"error": traceback.format_exc()}))
        barrier.abort()
        return
    done.wait(300)
    cleanup()


def trial(parts: list[tuple[Setup, tuple]], servers: list[int | None]) -> dict[str, Any]:
    """Run each (setup, args) in a forked worker; one timed window for all of them.

    ``setup(*args)`` returns ``(work, cleanup)``; ``work()`` returns
    ``(records, errors)``.  The window runs from the first worker's start
    to the last one's end; CPU counts every worker, every ``servers`` pid
    and this process over it.
    """
    servers = [pid for pid in servers if pid]
    barrier = CTX.Barrier(len(parts) + 1)
    results = CTX.Queue()
    done = CTX.Event()
    procs = [CTX.Process(target=_child, args=(i, setup, args, barrier, results, done), daemon=True)
             for i, (setup, args) in enumerate(parts)]
    for p in procs:
        p.start()
    out: dict[int, dict] = {}
    try:
        try:
            barrier.wait(120)
        except Exception:
            pass  # a worker failed during setup: its traceback is in the queue
        s0, p0 = sum(proc_cpu(pid) for pid in servers), time.process_time()
        while len(out) < len(parts):
            i, r = results.get(timeout=TRIAL_TIMEOUT)
            if "error" in r:
                raise RuntimeError(f"worker {i} ({parts[i][0].__name__}) failed:\n{r['error']}")
            out[i] = r
        s1, p1 = sum(proc_cpu(pid) for pid in servers), time.process_time()
    finally:
        done.set()
        for p in procs:
            p.join(30)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    rs = list(out.values())
    records = sum(r["records"] for r in rs)
    seconds = max(r["t1"] for r in rs) - min(r["t0"] for r in rs)
    cpu_workers = sum(r["cpu"] for r in rs)
    cpu_servers, cpu_parent = s1 - s0, p1 - p0
    cpu = cpu_workers + cpu_servers + cpu_parent
    return {"records": records, "errors": sum(r["errors"] for r in rs), "seconds": seconds,
            "rate": records / seconds, "cpu_us": cpu / records * 1e6 if records else float("nan"),
            "cpu_workers_s": cpu_workers, "cpu_servers_s": cpu_servers, "cpu_parent_s": cpu_parent}
