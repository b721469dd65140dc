"""Requests per second through slitterd against a bare pyzmq ROUTER echo loop.

Both servers get the same clients (processes with a DEALER socket each) and
the same request frames; the echo server answers every frame with itself,
so it is the floor of what any ZeroMQ + Python server can do here.  Two
request mixes for slitterd: `ping` (dispatch only) and `refill+flush`, the
slow path's two ops with their validation, client and token check, thread
slot and class lookups, counters and replies, but no objects: after the
first refill the magazines stay full (refill) and empty (flush), since
nothing allocates or releases between the frames.

What moving objects adds is measured apart, with no sockets: the daemon's
time per refill+flush cycle that moves a whole magazine, by object size
(``service_times``).

    cd bench && ../.venv/bin/python daemon.py [--clients 1,2,4] [--seconds 0.7] [--quick] [--json]

Other benchmarks call ``measure()`` and ``print_table()`` (fastpath.py does).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import timeit
from typing import Any, Callable

import zmq

import slitter
from benchlib import cli, echo_server, machine
from slitter import protocol
from slitter.protocol import Op

SECONDS, REPEATS = 0.7, 5      # default run
QUICK_SECONDS, QUICK_REPEATS = 0.4, 3  # --quick (overrides --seconds and --repeats)


def client(endpoint: str, frames: list[bytes], seconds: float, pipelined: int, barrier, out) -> None:
    """Send the frames round-robin, `pipelined` in flight, for `seconds`; report replies/s."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    barrier.wait()
    done = 0
    i = 0
    start = time.perf_counter()
    end = start + seconds
    for _ in range(pipelined):
        sock.send(frames[i % len(frames)])
        i += 1
    while time.perf_counter() < end:
        sock.recv()
        done += 1
        sock.send(frames[i % len(frames)])
        i += 1
    elapsed = time.perf_counter() - start
    out.put(done / elapsed)
    sock.close(0)
    ctx.term()


def run_clients(endpoint: str, frames_per_client: list[list[bytes]], seconds: float, pipelined: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(frames_per_client))
    out = ctx.Queue()
    procs = [ctx.Process(target=client, args=(endpoint, f, seconds, pipelined, barrier, out))
             for f in frames_per_client]
    for p in procs:
        p.start()
    total = sum(out.get(timeout=seconds + 60) for _ in procs)
    for p in procs:
        p.join(30)
    return total


def ping_frames(n_clients: int) -> list[list[bytes]]:
    """Per client: one PING frame (no client needs to attach for it)."""
    return [[protocol.pack(protocol.request(Op.PING, 1))]] * n_clients


def refill_flush_frames(address: str, n_clients: int) -> tuple[list[list[bytes]], list[slitter.Heap]]:
    """Per client: a REFILL and a FLUSH frame for an attached client of its own; and those heaps, to close."""
    per_client = []
    heaps = []
    for i in range(n_clients):
        heap = slitter.connect(address, name=f"bench{i}")
        heaps.append(heap)
        # The refill finds its magazines full and the flush its magazine empty after the first
        # pair: this mix measures what every refill and flush pays before and after moving objects.
        _slot, refill, flush = slow_path_frames(heap, heap.register_class("bench", size=64))
        per_client.append([refill, flush])
    return per_client, heaps


def slow_path_frames(heap: slitter.Heap, cls: slitter.Class) -> tuple[int, bytes, bytes]:
    """This thread's slot of ``cls`` (bound here), and a REFILL and a FLUSH frame of that slot."""
    cls.release(cls.allocate())  # binds the thread and class
    slot = slitter._native.lib.slitter_bind(heap._client, cls.id)
    args = {"client": heap._client_id, "token": heap._token, "thread": slot, "class_id": cls.id}
    return (slot, protocol.pack(protocol.request(Op.REFILL, 1, **args)),
            protocol.pack(protocol.request(Op.FLUSH, 1, **args)))


SERVICE_SIZES = (64, 4096, 65536)


def _serve_while(server, work: Callable[[], Any]) -> Any:
    """Run ``work()`` in a thread while ``server`` serves in this one; stop serving when it ends."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = work()
        except BaseException as exc:  # re-raised in this thread
            out["error"] = exc
        finally:
            server.stop()

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # serve() takes them
    thread = threading.Thread(target=run)
    thread.start()
    try:
        server.serve()
    finally:
        thread.join()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if "error" in out:
        raise out["error"]
    return out["value"]


def service_times(sizes: tuple[int, ...], repeats: int, progress) -> dict[str, Any]:
    """The daemon's time per refill+flush cycle that moves a whole magazine, by object size.

    An instance of the daemon's own classes (``Arena``, ``Instance``,
    ``Server``) runs in this process.  Its loop serves a client thread while
    the client attaches, registers one class per size and binds; then the
    loop stops and this thread hands ``Server.handle`` that client's REFILL
    and FLUSH frames, encoding each reply as the loop does.  Between them it
    moves the allocation magazine into the release magazine, as allocating
    and releasing every object would: each flush audits a full magazine and
    each refill hands one out.  No socket: the figure is the daemon's own
    Python and C per magazine; sockets and the clients' side are the tables
    above.  Medians of ``repeats`` timings of at least 0.2 s.
    """
    from slitterd.arena import Arena, remove_segments
    from slitterd.instance import Instance
    from slitterd.server import Server

    name = f"bench-service-{os.getpid()}"
    arena = Arena.create(name, 1 << 30, 4)
    server = None
    try:
        instance = Instance(name, arena, 4)
        sock = os.path.join(tempfile.gettempdir(), f"{name}.sock")
        server = Server(instance, "ipc://" + sock)
        heap: list[slitter.Heap] = []

        def setup() -> list[tuple[int, int, int, bytes, bytes]]:
            h = slitter.connect(sock, name="service")
            heap.append(h)
            out = []
            for size in sizes:
                cls = h.register_class(f"service-{size}", size=size)
                out.append((size, cls.id, *slow_path_frames(h, cls)))
            return out

        frames = _serve_while(server, setup)
        handle, pack = server.handle, server._pack
        client = instance.racks.clients[heap[0]._client_id]
        ffi = slitter._native.ffi
        result: dict[str, Any] = {"sizes": list(sizes), "repeats": repeats, "us_per_cycle": {},
                                  "ns_per_object": {}, "magazine": {}, "raw_us": {}}
        for size, class_id, slot, refill, flush in frames:
            progress(f"daemon service time, {size} B objects")
            tc = instance.racks.thread_class(client, slot, class_id)

            def cycle() -> int:
                reply = handle(refill)
                if not reply["ok"]:
                    raise RuntimeError(f"refill refused: {reply}")
                pack(reply)
                n = tc.alloc_count
                ffi.memmove(tc.release, tc.alloc, 8 * n)  # every object allocated, then released
                tc.alloc_count, tc.release_count = 0, n
                reply = handle(flush)
                if not reply["ok"] or reply["accepted"] != n:
                    raise RuntimeError(f"flush did not take back the {n} handles: {reply}")
                pack(reply)
                return n

            n = cycle()
            loops = max(1, int(0.2 / max(timeit.timeit(cycle, number=3) / 3, 1e-6)))
            samples = [timeit.timeit(cycle, number=loops) / loops * 1e6 for _ in range(repeats)]
            key = f"{size} B"
            med = statistics.median(samples)
            result["us_per_cycle"][key], result["ns_per_object"][key] = med, med / n * 1e3
            result["magazine"][key], result["raw_us"][key] = n, samples
        _serve_while(server, heap[0].close)
        return result
    finally:
        if server is not None:
            server.close()
            os.unlink(sock)
        arena.close()
        remove_segments(name)


def measure(counts: list[int], seconds: float, repeats: int, progress) -> dict[str, Any]:
    """requests/s of slitterd (both mixes) and of the echo server, for each client count.

    Runs its own private daemon and echo server.  Medians over ``repeats``
    windows of ``seconds``; ratios are medians of per-repetition ratios.
    """
    results: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    ctx = multiprocessing.get_context("spawn")
    with slitter.spawn_daemon() as address:
        echo_endpoint = "ipc://" + address + ".echo"
        ready, stop = ctx.Event(), ctx.Event()
        server = ctx.Process(target=echo_server, args=(echo_endpoint, ready, stop))
        server.start()
        ready.wait(10)
        try:
            for n in counts:
                ping = ping_frames(n)
                mixes = {"ping": (ping, []), "refill+flush": refill_flush_frames(address, n)}
                try:
                    # Every repetition runs each slitterd mix right next to the
                    # echo server with the same clients, so both sides of a ratio
                    # share the machine's noise; ratios are medians of per-repetition ratios.
                    for rep in range(repeats):
                        progress(f"daemon requests/s, {n} clients: repetition {rep + 1}/{repeats}")
                        for pipelined in (1, 8):
                            echo = run_clients(echo_endpoint, ping, seconds, pipelined)
                            results.setdefault(f"{n} clients: echo x{pipelined}", []).append(echo)
                            for mix, (frames, _heaps) in mixes.items():
                                rate = run_clients("ipc://" + address, frames, seconds, pipelined)
                                results.setdefault(f"{n} clients: slitterd {mix} x{pipelined}", []).append(rate)
                                ratios.setdefault(f"{n} clients: {mix} x{pipelined} / echo x{pipelined}",
                                                  []).append(rate / echo)
                finally:
                    for _frames, heaps in mixes.values():
                        for heap in heaps:
                            heap.close()
        finally:
            stop.set()
            server.join(10)
    return {"clients": counts, "seconds": seconds, "repeats": repeats,
            "requests_per_s": {k: statistics.median(v) for k, v in results.items()},
            "ratios": {k: statistics.median(v) for k, v in ratios.items()},
            "raw": results, "raw_ratios": ratios}


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    counts, med, med_ratios = result["clients"], result["requests_per_s"], result["ratios"]
    raw, raw_ratios = result["raw"], result["raw_ratios"]
    table = Table(title=f"requests/s: medians of {result['repeats']} x {result['seconds']:g} s, "
                  "slitterd and echo interleaved", title_justify="left")
    table.add_column("clients, server, mix, in flight per client")
    table.add_column("requests/s", justify="right")
    table.add_column("min–max", justify="right")
    for n in counts:
        if n != counts[0]:
            table.add_section()
        for k, v in med.items():
            if k.startswith(f"{n} clients:"):
                table.add_row(k, f"{v:,.0f}", f"{min(raw[k]):,.0f}–{max(raw[k]):,.0f}")
        for k, v in med_ratios.items():
            if k.startswith(f"{n} clients:"):
                table.add_row(f"  ratio {k.split(': ', 1)[1]}",
                              f"{v:.2f}" + ("  (target >= 0.8)" if ": ping" in k else ""),
                              f"{min(raw_ratios[k]):.2f}–{max(raw_ratios[k]):.2f}")
    Console().print(table)
    if "service" in result:
        print_service_table(result["service"])


def print_service_table(service: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"daemon time per refill+flush cycle moving a whole magazine, no sockets: "
                  f"medians of {service['repeats']}", title_justify="left")
    for column in ("objects", "magazine (handles)", "µs per cycle", "min–max", "ns per object"):
        table.add_column(column, justify="left" if column == "objects" else "right")
    for key, us in service["us_per_cycle"].items():
        raw = service["raw_us"][key]
        table.add_row(key, f"{service['magazine'][key]:,}", f"{us:.1f}", f"{min(raw):.1f}–{max(raw):.1f}",
                      f"{service['ns_per_object'][key]:.1f}")
    Console().print(table)


def run(size: str, progress, clients: str, seconds: float, repeats: int) -> dict[str, Any]:
    if size == "quick":
        seconds, repeats = QUICK_SECONDS, QUICK_REPEATS
    result = measure([int(c) for c in clients.split(",")], seconds, repeats, progress)
    return {"machine": machine(), **result, "service": service_times(SERVICE_SIZES, repeats, progress)}


def add_arguments(parser) -> None:
    parser.add_argument("--clients", default="1,2,4", help="comma-separated client counts (default 1,2,4)")
    parser.add_argument("--seconds", type=float, default=SECONDS,
                        help=f"seconds per measurement window (default {SECONDS:g})")
    parser.add_argument("--repeats", type=int, default=REPEATS, help=f"repetitions (default {REPEATS})")


def main(argv: list[str] | None = None) -> int:
    return cli(__doc__, run, print_table, f"{QUICK_REPEATS} repetitions of {QUICK_SECONDS:g} s "
               "(overrides --seconds and --repeats)", argv, add_arguments=add_arguments)


if __name__ == "__main__":
    sys.exit(main())
