"""Requests per second through slitterd against a bare pyzmq ROUTER echo loop.

Both servers get the same clients (processes with a DEALER socket each) and
the same request frames; the echo server answers every frame with itself,
so it is the floor of what any ZeroMQ + Python server can do here.  Two
request mixes for slitterd: `ping` (dispatch only) and `refill+flush`
(a real slow-path pair that moves a magazine through the depot and audit).

    cd bench && ../.venv/bin/python daemon.py [--clients 1,2,4] [--seconds 0.7] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time

import zmq

import slitter
from benchlib import echo_server
from slitter import protocol
from slitter.protocol import Op


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


def slitter_frames(address: str, mix: str, n_clients: int) -> list[list[bytes]]:
    """Per client: valid request frames of the mix, for an attached client of its own."""
    per_client = []
    heaps = []
    for i in range(n_clients):
        heap = slitter.connect(address, name=f"bench{i}")
        heaps.append(heap)
        if mix == "ping":
            per_client.append([protocol.pack(protocol.request(Op.PING, 1))])
            continue
        cls = heap.register_class("bench", size=64)
        cls.release(cls.allocate())  # binds the thread and class
        slot = slitter._native.lib.slitter_bind(heap._client, cls.id)
        args = {"client": heap._client_id, "token": heap._token, "thread": slot, "class_id": cls.id}
        # refill fills the empty magazine from the depot; flush returns nothing (the release
        # magazine is empty), so each pair moves a magazine out and back through the audit.
        per_client.append([protocol.pack(protocol.request(Op.REFILL, 1, **args)),
                           protocol.pack(protocol.request(Op.FLUSH, 1, **args))])
    return per_client, heaps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,2,4", help="comma-separated client counts (default 1,2,4)")
    ap.add_argument("--seconds", type=float, default=0.7)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ns = ap.parse_args()
    counts = [int(c) for c in ns.clients.split(",")]
    if ns.quick:
        ns.seconds, ns.repeats = 0.4, 3
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
                ping = [[protocol.pack(protocol.request(Op.PING, 1))]] * n
                mixes = {mix: slitter_frames(address, mix, n) for mix in ("ping", "refill+flush")}
                try:
                    # Every repetition runs each slitterd mix right next to the
                    # echo server with the same clients, so both sides of a ratio
                    # share the machine's noise; ratios are medians of per-repetition ratios.
                    for _ in range(ns.repeats):
                        for pipelined in (1, 8):
                            echo = run_clients(echo_endpoint, ping, ns.seconds, pipelined)
                            results.setdefault(f"{n} clients: echo x{pipelined}", []).append(echo)
                            for mix, (frames, _heaps) in mixes.items():
                                rate = run_clients("ipc://" + address, frames, ns.seconds, pipelined)
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
    med = {k: statistics.median(v) for k, v in results.items()}
    med_ratios = {k: statistics.median(v) for k, v in ratios.items()}
    if ns.json:
        print(json.dumps({"clients": counts, "requests_per_s": med, "ratios": med_ratios, "raw": results,
                          "raw_ratios": ratios}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"requests/s: medians of {ns.repeats} x {ns.seconds:g} s, slitterd and echo interleaved",
                  title_justify="left")
    table.add_column("clients, server, mix, in flight per client")
    table.add_column("requests/s", justify="right")
    table.add_column("min–max", justify="right")
    for n in counts:
        if n != counts[0]:
            table.add_section()
        for k, v in med.items():
            if k.startswith(f"{n} clients:"):
                table.add_row(k, f"{v:,.0f}", f"{min(results[k]):,.0f}–{max(results[k]):,.0f}")
        for k, v in med_ratios.items():
            if k.startswith(f"{n} clients:"):
                table.add_row(f"  ratio {k.split(': ', 1)[1]}",
                              f"{v:.2f}" + ("  (target >= 0.8)" if ": ping" in k else ""),
                              f"{min(ratios[k]):.2f}–{max(ratios[k]):.2f}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
