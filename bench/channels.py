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

Reported: µs and CPU µs (both processes and this one, ``benchlib.trial``) per batch, medians of the
repetitions, and each peer's time per batch ÷ the channel's, per
repetition (the transports of a repetition run back to back).

    cd bench && ../.venv/bin/python channels.py [--quick] [--json]
"""

from __future__ import annotations

import statistics
import sys
import time
from array import array
from multiprocessing import shared_memory
from typing import Any, Callable

import slitter
from benchlib import CTX, cli, machine, medians_ranges, trial

BATCH = 64
WINDOW = 4  # batches in flight
SECONDS, REPEATS = 1.0, 5
QUICK_SECONDS, QUICK_REPEATS = 0.3, 2
TRANSPORTS = ("channel", "Pipe", "Queue", "ring + semaphores")
BATCH_BYTES = array("Q", range(1 << 20, (1 << 20) + BATCH * 64, 64)).tobytes()
RING_HEAD = 64  # bytes: the producer's published count, then the slots

# Each side is a benchlib.trial setup: it returns (work, cleanup); work() returns (batches, 0).
# A producer sends for its window, then tells its consumer it is done; only consumers count batches.


def _producer(send: Callable[[], None], finish: Callable[[], None], seconds: float,
              cleanup: Callable[[], None] = lambda: None) -> tuple:
    def work() -> tuple[int, int]:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            send()
        finish()
        return 0, 0

    return work, cleanup


def _consumer(take: Callable[[], bool], cleanup: Callable[[], None] = lambda: None) -> tuple:
    def work() -> tuple[int, int]:
        n = 0
        while take():
            n += 1
        return n, 0

    return work, cleanup


def channel_producer(address: str, handle: int, seconds: float) -> tuple:
    heap = slitter.connect(address)
    link, batch = heap.open_channel(handle), array("Q", BATCH_BYTES)
    return _producer(lambda: link.send_many(batch), link.close, seconds, heap.close)


def channel_consumer(address: str, handle: int) -> tuple:
    heap = slitter.connect(address)
    link = heap.open_channel(handle)

    def take() -> bool:
        try:
            link.recv_many(BATCH)
        except slitter.ChannelClosed:
            return False
        return True

    return _consumer(take, heap.close)


def pipe_producer(conn, space, seconds: float) -> tuple:
    def send() -> None:
        space.acquire()
        conn.send_bytes(BATCH_BYTES)

    return _producer(send, lambda: conn.send_bytes(b""), seconds)


def pipe_consumer(conn, space) -> tuple:
    def take() -> bool:
        msg = conn.recv_bytes()
        if not msg:
            return False
        array("Q").frombytes(msg)
        space.release()
        return True

    return _consumer(take)


def queue_producer(q, seconds: float) -> tuple:
    return _producer(lambda: q.put(BATCH_BYTES), lambda: q.put(None), seconds)


def queue_consumer(q) -> tuple:
    def take() -> bool:
        msg = q.get()
        if msg is None:
            return False
        array("Q").frombytes(msg)
        return True

    return _consumer(take)


def _ring(name: str) -> tuple:
    shm = shared_memory.SharedMemory(name)
    head = shm.buf[:8].cast("Q")

    def close() -> None:
        head.release()
        shm.close()

    return shm.buf, head, close


def _slot(n: int) -> int:
    return RING_HEAD + n % WINDOW * len(BATCH_BYTES)


def ring_producer(name: str, items, space, seconds: float) -> tuple:
    buf, head, close = _ring(name)
    sent = [0]

    def send() -> None:
        space.acquire()
        slot = _slot(sent[0])
        buf[slot:slot + len(BATCH_BYTES)] = BATCH_BYTES
        sent[0] += 1
        head[0] = sent[0]  # publish: one aligned 8-byte store
        items.release()

    def finish() -> None:
        head[0] = sent[0] | 1 << 63  # done
        items.release()

    return _producer(send, finish, seconds, close)


def ring_consumer(name: str, items, space) -> tuple:
    buf, head, close = _ring(name)
    taken = [0]

    def take() -> bool:
        items.acquire()
        if head[0] >> 63 and taken[0] == head[0] & ~(1 << 63):
            return False
        slot = _slot(taken[0])
        array("Q").frombytes(buf[slot:slot + len(BATCH_BYTES)])
        taken[0] += 1
        space.release()
        return True

    return _consumer(take, close)


# -- one trial ------------------------------------------------------------------------

def one_trial(transport: str, heap: slitter.Heap, address: str, seconds: float) -> dict[str, float]:
    cleanup: list[Callable[[], None]] = []
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
        items, space = CTX.Semaphore(0), CTX.Semaphore(WINDOW)
        cleanup += [shm.close, shm.unlink]
        parts = [(ring_producer, (shm.name, items, space, seconds)), (ring_consumer, (shm.name, items, space))]
    try:
        r = trial(parts, [])
    finally:
        for step in cleanup:
            step()
    return {"batches": r["records"], "us_per_batch": r["seconds"] / r["records"] * 1e6,
            "cpu_us_per_batch": r["cpu_us"]}


def run(size: str, progress) -> dict[str, Any]:
    seconds, repeats = (QUICK_SECONDS, QUICK_REPEATS) if size == "quick" else (SECONDS, REPEATS)
    per_rep: list[dict[str, dict]] = []
    with slitter.spawn_daemon() as address, slitter.connect(address) as heap:
        for rep in range(repeats):
            row = {}
            for transport in TRANSPORTS:
                progress(f"hand-off, repetition {rep + 1}/{repeats}: {transport}")
                row[transport] = one_trial(transport, heap, address, seconds)
            per_rep.append(row)
    summary = {}
    for t in TRANSPORTS:
        med, rng = medians_ranges([r[t] for r in per_rep])
        summary[t] = {
            "us_per_batch": med["us_per_batch"], "cpu_us_per_batch": med["cpu_us_per_batch"],
            "vs_channel": statistics.median(r[t]["us_per_batch"] / r["channel"]["us_per_batch"] for r in per_rep),
            "range": rng["us_per_batch"],
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
