"""The hand-off alone: batches of 64 handles from one process to another, through a channel and its peers.

Each transport carries batches of 64 8-byte handles (512 B) from a
producer process to a consumer process, which turns each batch into an
``array('Q')``, with at most 4 batches in flight (made and not yet
consumed).  Nothing is allocated, written or read: this is what passing
handles costs, the part of every sharing workload that is neither the
allocator nor the user's own code.

- channel: a slitter channel of 128 slots (2 batches, plus the one being
  read and the one being made: 4 in flight), ``send_many`` / ``recv_many``
  (``doc/design.md`` (f));
- Pipe: ``send_bytes`` on a ``multiprocessing`` Pipe, with a Semaphore of 4
  the consumer releases per batch (the hand-off ``bench/peers.py`` gives
  the peers of slitter in shared objects);
- Queue: a ``multiprocessing.Queue(maxsize=4)`` of the batches' bytes;
- ring + semaphores: a ring of 4 handle slots in one SharedMemory, an
  "items" and a "space" semaphore (how ``bench/peers.py``'s hand-rolled
  ring synchronises).

Reported: µs and CPU µs (both processes) per batch, medians of the
repetitions, and each peer's time per batch ÷ the channel's, per
repetition (the transports of a repetition run back to back).

    cd bench && ../.venv/bin/python channels.py [--quick] [--json]
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import sys
import time
from array import array
from multiprocessing import shared_memory
from typing import Any

import slitter
from benchlib import cli, machine

CTX = mp.get_context("fork")
BATCH = 64
WINDOW = 4  # batches in flight
SECONDS, REPEATS = 1.0, 5
QUICK_SECONDS, QUICK_REPEATS = 0.3, 2
TRANSPORTS = ("channel", "Pipe", "Queue", "ring + semaphores")
BATCH_BYTES = array("Q", range(1 << 20, (1 << 20) + BATCH * 64, 64)).tobytes()


def _timed(barrier, out, role: str, loop) -> None:
    barrier.wait(60)
    c0, t0 = time.process_time(), time.perf_counter()
    batches = loop()
    out.put((role, batches, time.perf_counter() - t0, time.process_time() - c0))


def _produce(send, seconds: float) -> int:
    deadline = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < deadline:
        send()
        n += 1
    return n


# -- the producers and consumers of each transport ------------------------------------

def channel_producer(address: str, handle: int, seconds: float, barrier, out) -> None:
    with slitter.connect(address) as heap:
        link, batch = heap.open_channel(handle), array("Q", BATCH_BYTES)

        def loop() -> int:
            n = _produce(lambda: link.send_many(batch), seconds)
            link.close()
            return n

        _timed(barrier, out, "producer", loop)


def channel_consumer(address: str, handle: int, barrier, out) -> None:
    with slitter.connect(address) as heap:
        link = heap.open_channel(handle)

        def loop() -> int:
            n = 0
            while True:
                try:
                    link.recv_many(BATCH)
                except slitter.ChannelClosed:
                    return n
                n += 1

        _timed(barrier, out, "consumer", loop)


def pipe_producer(conn, space, seconds: float, barrier, out) -> None:
    def send() -> None:
        space.acquire()
        conn.send_bytes(BATCH_BYTES)

    def loop() -> int:
        n = _produce(send, seconds)
        conn.send_bytes(b"")
        return n

    _timed(barrier, out, "producer", loop)


def pipe_consumer(conn, space, barrier, out) -> None:
    def loop() -> int:
        n = 0
        while msg := conn.recv_bytes():
            array("Q").frombytes(msg)
            space.release()
            n += 1
        return n

    _timed(barrier, out, "consumer", loop)


def queue_producer(q, seconds: float, barrier, out) -> None:
    def loop() -> int:
        n = _produce(lambda: q.put(BATCH_BYTES), seconds)
        q.put(None)
        return n

    _timed(barrier, out, "producer", loop)


def queue_consumer(q, barrier, out) -> None:
    def loop() -> int:
        n = 0
        while (msg := q.get()) is not None:
            array("Q").frombytes(msg)
            n += 1
        return n

    _timed(barrier, out, "consumer", loop)


RING_HEAD = 64  # bytes: the producer's published count, then the slots


def ring_producer(name: str, items, space, seconds: float, barrier, out) -> None:
    shm = shared_memory.SharedMemory(name)
    head = shm.buf[:8].cast("Q")
    state = {"n": 0}

    def send() -> None:
        space.acquire()
        slot = RING_HEAD + state["n"] % WINDOW * len(BATCH_BYTES)
        shm.buf[slot:slot + len(BATCH_BYTES)] = BATCH_BYTES
        state["n"] += 1
        head[0] = state["n"]  # publish: one aligned 8-byte store
        items.release()

    def loop() -> int:
        n = _produce(send, seconds)
        head[0] = n | 1 << 63  # done
        items.release()
        return n

    _timed(barrier, out, "producer", loop)
    head.release()
    shm.close()


def ring_consumer(name: str, items, space, barrier, out) -> None:
    shm = shared_memory.SharedMemory(name)
    head = shm.buf[:8].cast("Q")

    def loop() -> int:
        n = 0
        while True:
            items.acquire()
            if head[0] >> 63 and n == head[0] & ~(1 << 63):
                return n
            slot = RING_HEAD + n % WINDOW * len(BATCH_BYTES)
            array("Q").frombytes(shm.buf[slot:slot + len(BATCH_BYTES)])
            n += 1
            space.release()

    _timed(barrier, out, "consumer", loop)
    head.release()
    shm.close()


# -- one trial ------------------------------------------------------------------------

def trial(transport: str, heap: slitter.Heap, address: str, seconds: float) -> dict[str, float]:
    barrier, out = CTX.Barrier(2), CTX.Queue()
    cleanup = []
    if transport == "channel":
        link = heap.channel((WINDOW - 2) * BATCH)
        cleanup.append(link.release)
        parts = [(channel_producer, (address, link.handle, seconds)), (channel_consumer, (address, link.handle))]
    elif transport == "Pipe":
        reader, writer = CTX.Pipe(duplex=False)
        space = CTX.Semaphore(WINDOW)
        cleanup += [reader.close, writer.close]
        parts = [(pipe_producer, (writer, space, seconds)), (pipe_consumer, (reader, space))]
    elif transport == "Queue":
        q = CTX.Queue(maxsize=WINDOW)
        cleanup.append(q.close)
        parts = [(queue_producer, (q, seconds)), (queue_consumer, (q,))]
    else:
        shm = shared_memory.SharedMemory(create=True, size=RING_HEAD + WINDOW * len(BATCH_BYTES))
        shm.buf[:8] = bytes(8)
        items, space = CTX.Semaphore(0), CTX.Semaphore(WINDOW)
        cleanup += [shm.close, shm.unlink]
        parts = [(ring_producer, (shm.name, items, space, seconds)), (ring_consumer, (shm.name, items, space))]
    procs = [CTX.Process(target=target, args=(*args, barrier, out), daemon=True) for target, args in parts]
    try:
        for p in procs:
            p.start()
        results = {role: (n, wall, cpu) for role, n, wall, cpu in (out.get(timeout=seconds + 60) for _ in procs)}
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        for step in cleanup:
            step()
    batches, wall, _ = results["consumer"]
    cpu = results["consumer"][2] + results["producer"][2]
    return {"batches": batches, "us_per_batch": wall / batches * 1e6, "cpu_us_per_batch": cpu / batches * 1e6}


def run(size: str, progress) -> dict[str, Any]:
    seconds, repeats = (QUICK_SECONDS, QUICK_REPEATS) if size == "quick" else (SECONDS, REPEATS)
    per_rep: list[dict[str, dict]] = []
    with slitter.spawn_daemon() as address, slitter.connect(address) as heap:
        for rep in range(repeats):
            row = {}
            for transport in TRANSPORTS:
                progress(f"hand-off, repetition {rep + 1}/{repeats}: {transport}")
                row[transport] = trial(transport, heap, address, seconds)
            per_rep.append(row)
    summary = {}
    for t in TRANSPORTS:
        summary[t] = {
            "us_per_batch": statistics.median(r[t]["us_per_batch"] for r in per_rep),
            "cpu_us_per_batch": statistics.median(r[t]["cpu_us_per_batch"] for r in per_rep),
            "vs_channel": statistics.median(r[t]["us_per_batch"] / r["channel"]["us_per_batch"] for r in per_rep),
            "range": [min(r[t]["us_per_batch"] for r in per_rep), max(r[t]["us_per_batch"] for r in per_rep)],
        }
    return {"machine": machine(), "batch": BATCH, "window": WINDOW, "seconds": seconds, "repeats": repeats,
            "transports": summary, "per_rep": per_rep}


def print_tables(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"hand-off of batches of {result['batch']} handles, {result['window']} in flight: "
                  f"medians of {result['repeats']} x {result['seconds']:g} s", title_justify="left")
    for col in ("transport", "µs / batch", "min–max", "ns / handle", "CPU µs / batch", "÷ channel"):
        table.add_column(col, justify="left" if col == "transport" else "right")
    for t, s in result["transports"].items():
        lo, hi = s["range"]
        table.add_row(t, f"{s['us_per_batch']:.2f}", f"{lo:.2f}–{hi:.2f}",
                      f"{s['us_per_batch'] * 1000 / result['batch']:.1f}", f"{s['cpu_us_per_batch']:.2f}",
                      f"{s['vs_channel']:.1f}×")
    Console(width=110).print(table)
    print("÷ channel: the transport's time per batch ÷ the channel's, per repetition; CPU: both processes")


def main(argv: list[str] | None = None) -> int:
    return cli(__doc__, run, print_tables, f"{QUICK_REPEATS} repetitions of {QUICK_SECONDS:g} s", argv)


if __name__ == "__main__":
    sys.exit(main())
