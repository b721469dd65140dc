"""slitter demo: objects passed around a ring of processes through shared memory.

A private, ephemeral slitterd is started; WORKERS processes attach to it
(freshly, with the "spawn" start method), each registers two classes and,
round after round, allocates objects, fills them with a verifiable payload
through ``heap.view`` and hands the bare handles to the next worker in the
ring through a slitter channel (a ring of handles in the arena itself).
The handle is all that travels: the receiver reads the object's header to
learn its class and sequence number, checks every byte and releases the
handle with its class's ``release``.  The parent then prints the daemon's per-class
figures, checks ``carved == live + cached + free``, stops the daemon and
checks that its shared-memory segments are gone.

Run with ``make demo``.  Exits 1 if any check fails.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import random
import struct
import sys
import time
import zlib

from rich.console import Console
from rich.table import Table

import slitter
import slitterd.ctl
from slitter import address as slitter_address

WORKERS = 4
ROUNDS = 12
# Objects per class a worker sends in a round: big and small rounds alternate,
# and out of phase with the neighbour, so a worker's magazines swing by more
# than a magazine holds; they refill from and flush to the daemon all the time.
BIG, SMALL = 1024, 96


def batch_size(worker: int, round_: int) -> int:
    return BIG if (worker + round_) % 2 == 0 else SMALL


def per_class(worker: int) -> int:
    """Objects of each class ``worker`` sends in the whole run."""
    return sum(batch_size(worker, r) for r in range(ROUNDS))

CLASSES = {  # name: (size, zero_init, tag)
    "order": (64, True, 1),
    "trade": (1024, False, 2),
}
TIMEOUT = 30.0  # seconds a worker waits for its neighbour before giving up
# Each channel holds every handle a worker sends in the whole run (a power of two), so no send ever waits
# and the ring of workers cannot deadlock, each sending to a neighbour that is itself sending.
CHANNEL_CAPACITY = 1 << (max(per_class(w) for w in range(WORKERS)) * len(CLASSES) - 1).bit_length()

# Payload: header | pattern | crc32(header + pattern).
HEADER = struct.Struct("<4sBBHI")  # magic, class tag, sender, 0, sequence number
MAGIC = b"SLTR"
_BASE = random.Random(0x511773).randbytes(4096)


def payload(tag: int, sender: int, seq: int, size: int) -> bytes:
    """The exact bytes object number ``seq`` of ``sender`` in class ``tag`` must hold."""
    head = HEADER.pack(MAGIC, tag, sender, 0, seq)
    start = (seq * 131 + sender * 1009 + tag * 17) % 2048
    body = head + _BASE[start:start + size - HEADER.size - 4]
    return body + struct.pack("<I", zlib.crc32(body))


def worker(i: int, address: str, inbox_handle: int, outbox_handle: int, results: mp.Queue) -> None:
    counts = {"worker": i, "sent": 0, "received": 0, "verified": 0, "mismatches": 0,
              "not_zeroed": 0, "error": None}
    sender = (i - 1) % WORKERS
    expect_seq = dict.fromkeys(CLASSES, 0)
    by_tag = {tag: name for name, (_size, _zi, tag) in CLASSES.items()}
    outbox = None
    try:
        with slitter.connect(address, name=f"worker-{i}") as heap:
            classes = {name: heap.register_class(name, size, zero_init=zi)
                       for name, (size, zi, _tag) in CLASSES.items()}
            inbox, outbox = heap.open_channel(inbox_handle), heap.open_channel(outbox_handle)

            def verify(handle: int) -> None:
                """Check one object from the previous worker by its own header, then release it."""
                counts["received"] += 1
                view = heap.view(handle)
                magic, tag, from_, _zero, seq = HEADER.unpack_from(view)
                name = by_tag.get(tag) if magic == MAGIC else None
                ok = name is not None and from_ == sender and seq == expect_seq[name]
                if name is not None:
                    size = CLASSES[name][0]
                    expect_seq[name] = seq + 1
                    ok = ok and len(view) == size and view.tobytes() == payload(tag, sender, seq, size)
                view.release()
                counts["verified" if ok else "mismatches"] += 1
                if name is not None:
                    classes[name].release(handle)

            def receive(count: int) -> None:
                """Verify and release the next ``count`` objects from the previous worker."""
                while count:
                    for handle in inbox.recv_many(count, timeout=TIMEOUT):
                        verify(handle)
                        count -= 1

            seq = dict.fromkeys(CLASSES, 0)
            for round_ in range(ROUNDS):
                batch = []
                for name, cls in classes.items():
                    size, zero_init, tag = CLASSES[name]
                    for _ in range(batch_size(i, round_)):
                        handle = cls.allocate()
                        view = heap.view(handle)
                        if zero_init and view.tobytes() != bytes(size):
                            counts["not_zeroed"] += 1
                        view[:] = payload(tag, i, seq[name], size)
                        view.release()
                        batch.append(handle)
                        seq[name] += 1
                outbox.send_many(batch, timeout=TIMEOUT)
                counts["sent"] += len(batch)
                receive(batch_size(sender, round_) * len(CLASSES))  # the previous worker's round
            outbox.close()
            try:  # the previous worker closed its end after its last round: nothing more may come
                inbox.recv(timeout=TIMEOUT)
                counts["mismatches"] += 1
            except slitter.ChannelClosed:
                pass
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the run
        counts["error"] = f"{type(exc).__name__}: {exc}"
        if outbox is not None:
            outbox.close()  # let the next worker finish instead of waiting for its timeout
    results.put(counts)


def run_workers(address: str) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with slitter.connect(address, name="demo-channels") as heap:
        # Channel i carries worker i-1's objects to worker i.
        rings = [heap.channel(CHANNEL_CAPACITY) for _ in range(WORKERS)]
        procs = [ctx.Process(target=worker, name=f"worker-{i}",
                             args=(i, address, rings[i].handle, rings[(i + 1) % WORKERS].handle, results))
                 for i in range(WORKERS)]
        for p in procs:
            p.start()
        reports = []
        deadline = time.monotonic() + 2 * TIMEOUT + 30
        while len(reports) < WORKERS and time.monotonic() < deadline:
            try:
                reports.append(results.get(timeout=1.0))
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join()
        for ring in rings:
            ring.release()
    seen = {r["worker"] for r in reports}
    for i, p in enumerate(procs):
        if i not in seen:
            reports.append({"worker": i, "sent": 0, "received": 0, "verified": 0, "mismatches": 0,
                            "not_zeroed": 0, "error": f"no report (exit code {p.exitcode})"})
    return sorted(reports, key=lambda r: r["worker"])


def workers_table(reports: list[dict]) -> Table:
    table = Table(title=f"{WORKERS} workers in a ring, {ROUNDS} rounds of {BIG} or {SMALL} objects per class")
    for col in ("worker", "sent", "received", "verified", "mismatches", "not zeroed", "error"):
        table.add_column(col, justify="left" if col in ("worker", "error") else "right")
    for r in reports:
        table.add_row(f"worker-{r['worker']}", *(f"{r[k]:,}" for k in
                      ("sent", "received", "verified", "mismatches", "not_zeroed")), r["error"] or "-")
    return table


def main() -> int:
    console = Console()
    if not console.is_terminal:  # piped: rich would assume 80 columns and squeeze the stats table
        console = Console(width=140)
    failures: list[str] = []

    daemon = slitter.spawn_daemon()
    address = daemon.start()
    console.print(f"slitterd pid {daemon.pid}, instance '{daemon.name}', address {address}")
    try:
        t0 = time.monotonic()
        reports = run_workers(address)
        elapsed = time.monotonic() - t0
        console.print(workers_table(reports))
        total = sum(r["verified"] for r in reports)
        console.print(f"{total:,} objects passed and verified byte for byte in {elapsed:.2f} s")
        for r in reports:
            w = f"worker-{r['worker']}"
            if r["error"]:
                failures.append(f"{w}: {r['error']}")
            sent = per_class(r["worker"]) * len(CLASSES)
            received = per_class((r["worker"] - 1) % WORKERS) * len(CLASSES)
            for key, expected in (("sent", sent), ("received", received), ("verified", received)):
                if r[key] != expected:
                    failures.append(f"{w}: {key} {r[key]:,}, expected {expected:,}")
            if r["mismatches"] or r["not_zeroed"]:
                failures.append(f"{w}: {r['mismatches']} mismatches, {r['not_zeroed']} objects not zeroed")

        # Every worker, and the connection that made the channels, has closed its heap; this
        # connection allocates nothing, so caches nothing.
        with slitter.connect(address, name="demo-parent") as heap:
            stats = heap.stats()
        console.print(slitterd.ctl.stats_table(stats, title=f"slitter instance '{stats['instance']['name']}'"))
        for name in CLASSES:
            c = stats["classes"].get(name)
            if c is None:
                failures.append(f"class '{name}' missing from the stats")
                continue
            holds = c["carved"] == c["live"] + c["cached"] + c["free"]
            console.print(f"class {name!r}: carved {c['carved']:,} == live {c['live']:,} + cached "
                          f"{c['cached']:,} + free {c['free']:,}: {'ok' if holds else 'FAILED'}")
            if not holds:
                failures.append(f"class '{name}': carved != live + cached + free")
            if c["live"] != 0:
                failures.append(f"class '{name}': {c['live']} objects still live after every release")
            total = sum(per_class(i) for i in range(WORKERS))
            if c["allocations"] != total or c["releases"] != total:
                failures.append(f"class '{name}': {c['allocations']:,} allocations, {c['releases']:,} releases, "
                                f"expected {total:,} each")
            if any(c["errors"].values()):
                failures.append(f"class '{name}': release errors {c['errors']}")
    finally:
        code = daemon.stop()
    console.print(f"slitterd stopped (exit code {code})")
    if code != 0:
        failures.append(f"slitterd exited with {code}")

    # What the daemon itself left behind when it exited: stop() records it, then removes it,
    # so a look at /dev/shm now could never find anything.
    left = daemon.left_segments
    if left:
        failures.append(f"segments left in {slitter_address.SHM_DIR}: {', '.join(map(str, left))}")
    else:
        console.print(f"no slitter.{daemon.name}.* segment left in {slitter_address.SHM_DIR}")

    if failures:
        console.print("[bold red]FAILED[/]")
        for f in failures:
            console.print(f"  - {f}")
        return 1
    console.print("[bold green]all checks passed[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
