"""What the benchmarks in bench/ share: the machine they ran on and the timing loops.

Each benchmark is run from this directory (`cd bench && ../.venv/bin/python X.py`),
so `import benchlib` finds this file.
"""

from __future__ import annotations

import os
import platform
from time import perf_counter_ns as perf_ns
from typing import Any

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
    import gc

    gc_was = gc.isenabled()
    gc.disable()
    try:
        return fn(*args)
    finally:
        if gc_was:
            gc.enable()


def c_pairs(heap: slitter.Heap, cls: slitter.Class, n: int) -> float:
    """ns per allocate+release pair from a C loop on the fast path (the thread must be bound)."""
    ns = lib.slitter_bench_pairs(heap._client, cls.id, n)
    if ns < 0:
        raise RuntimeError("slitter_bench_pairs left the fast path (thread not bound, or a magazine ran dry)")
    return ns / n


def cli(doc: str, run, print_tables, quick_help: str, argv: list[str] | None = None,
        save=None) -> int:
    """The command line every benchmark shares: ``--quick``, ``--json``, progress on stderr.

    ``run(mode, progress)`` returns the result dict; ``save(result, quick)``, if
    given, writes it somewhere and returns a note for the last line.
    """
    import argparse
    import json
    import sys
    import time

    parser = argparse.ArgumentParser(description=doc.split("\n\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", action="store_true", help="print the full result as JSON instead of tables")
    args = parser.parse_args(argv)

    def progress(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr, flush=True)

    start = time.monotonic()
    result = run("quick" if args.quick else "default", progress)
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
