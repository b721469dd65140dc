"""slitter against its peers in the standard library (a benchmark, not a test: it asserts nothing).

Three workloads.  Each runs against every peer that can do it, in worker
processes forked from this one (``multiprocessing.get_context("fork")``).
Each result has a rate and the CPU time per record or operation. The CPU
time counts every process involved, all threads included:

- each worker's ``time.process_time()`` over its own timed window;
- any server process over the same window (``/proc/PID/stat`` utime + stime):
  slitterd for slitter, the manager process for ``Manager`` and
  ``SharedMemoryManager``, and the ``multiprocessing`` resource tracker for
  everything built on ``SharedMemory``;
- this process, which only waits, over the same window.

Workers do their setup first (connect, attach, warm up, cache views). Then
they all wait on one barrier, and the timed windows start there.

1. Shared objects, 64 B each.  A producer allocates an object, writes it
   and passes it on.  A consumer in another process reads it, checks it and
   releases it.  Two ways to touch an object, each a run of its own:
   - whole object: the producer writes a 64 B template, then the sequence
     number; the consumer takes a CRC-32 of the whole object and checks the
     number. Every peer runs this one.
   - one field: the producer writes the sequence number (8 bytes) alone,
     and the consumer reads it back and checks it: the least a user does
     with an object. It goes through the buffer cast to 8-byte words
     (``buf.cast("Q")[off >> 3]``), as a user with a hot field would.
     Every peer but SharedMemoryManager runs it.
   The loops over a batch are the touch's own, so every peer runs the
   same lines, with no Python call per object. (Until 2026-11-26 each
   object was touched through a call, and one field through
   ``struct.pack_into``/``unpack_from``: 25-70 ns more an object on
   each side, for every peer.)
   Objects travel in batches of 64, at most 4 batches in flight (written
   or being written, and not yet consumed). How a batch travels is each
   peer's best way:
   - slitter, and the control: through a slitter channel
     (``heap.channel(128)``, ``send_many`` / ``recv_many``), the library's
     way to pass handles (``doc/design.md`` (f)). Its 2 batches, the one
     being read and the one being written make the 4.
   - every other peer: ``send_bytes`` of the batch's 64 names or wrappers
     on a Pipe, with a semaphore the consumer releases per batch holding
     the window. Their handles are not 8-byte integers, so a channel
     cannot carry them.
   - slitter, over a Pipe: slitter's code with the Pipe and semaphore of
     the peers instead of the channel, as the workload ran until
     2026-11-26: what the channel is worth.
   The peers:
   - slitter: ``allocate_many(64)``; the producer writes each object
     through ``heap.arena`` at its handle. The consumer checks the batch
     with ``cls.check`` (one native call: every handle a live object of
     the class), reads each object through ``heap.arena`` and calls
     ``release_many``.
   - slitter, view per object: the same, with ``heap.view(handle)`` for
     every write and every read (one checked native call each) instead of
     ``check`` and the arena.
   - SharedMemory: one ``SharedMemory(create=True, size=64)`` per object,
     closed by the producer. The consumer attaches, reads, closes and unlinks
     it. All processes share this process's resource tracker: the create and
     the attach each register the name, and the unlink unregisters it, so
     nothing leaks and nothing is reported at exit.
   - SharedMemoryManager: ``smm.SharedMemory(64)`` per object (the library
     opens a new authenticated connection to the manager for each call). The
     consumer attaches, reads and closes the object, then asks the manager to
     ``release_segment`` it (the manager unlinks it). The manager serves one
     request per connection, so that is a new connection per object too.
   - RawArray (``multiprocessing.heap``): ``RawArray('B', 64)`` per object.
     A RawArray refuses to be pickled outside process creation. Its
     ``BufferWrapper`` (arena, offset) does not, so the batch sends those.
     Pickling an arena hands its file descriptor to the consumer through
     ``multiprocessing.resource_sharer``: one connection per batch and arena.
     The consumer maps the arena, reads the object and closes the descriptor,
     which the library would otherwise leak. The producer frees the 64 blocks
     when the batch is acked, since only the creating process can free them.
   - Slots, no allocator: a control rather than a peer. The producer writes
     into fixed slots of one SharedMemory, taken in turn (five batches'
     worth: the four in flight and one to spare),
     and passes their offsets through a channel as slitter passes handles. Nothing is
     allocated, checked or released: what the control costs is the
     workers' own Python and the hand-off. It runs right after slitter in
     each repetition, and the tables' "no allocator ÷" column gives its
     rate against each peer's. It is a control, not a strict floor: the
     distance at which it reuses its slots moves it by about 10 %.

2. Shared mutable table: 100,000 records of 64 B. 4 worker processes each
   update random records in place. An update writes two 8-byte fields
   (worker id, sequence number) with ``struct.pack_into``. Every peer uses
   the same pregenerated random record indices.
   - slitter, view per update: 100,000 objects of one class, allocated by
     this process. Their handles are known to all workers, and each update
     calls ``heap.view(handle)``.
   - slitter, cached views: the same objects, but each worker takes the
     100,000 views once, before the timed window.
   - slitter, arena: the same objects. Each worker checks all 100,000
     handles once with ``cls.check`` before the timed window, then updates
     ``heap.arena`` at the handle, as the hand-rolled table does at 64·k.
   - Manager dict and Manager list: ``d[k] = record`` / ``l[k] = record``.
     A proxy cannot change part of a value, so each update sends a whole
     64 B record: one round trip.
   - Hand-rolled table: one ``SharedMemory`` of 100,000 × 64 B, attached by
     name, with record k at offset 64·k.

3. Streaming: 1, 2 or 4 producers send records of 64 B, 1 KiB or 64 KiB to
   one consumer, in batches of 64. The consumer takes the CRC-32 of every
   record and checks the sequence number of each batch's first record.
   - slitter: the producer calls ``allocate_many(64)``, writes each record
     through ``heap.arena`` at its handle, and sends the 64 handles through
     its own slitter channel (``send_many``; 128 slots, so that with the
     batch being written and the one being read at most 4 are in flight,
     as the ring's window allows). The consumer waits on every producer's
     channel at once (``Channel.wait_any``; with one producer, a plain
     blocking ``recv_many``), takes a batch (``recv_many``), checks it (``cls.check``), checksums each
     record through ``heap.arena`` and calls ``release_many``: the objects
     pass to the consumer with their handles, and come back to producers
     through the shelf. (Until 2026-11-26 the handles went through handle
     slots in one slitter object, synchronised as the ring below, with its
     semaphores; before 2026-11-25, over a Pipe per producer.)
   - slitter, producer releases: the same, except that the consumer only
     checks and reads, then sends the batch back through a second channel
     per producer, and the producer releases what comes back before it
     allocates its next batch. The objects stay in the producer's
     magazines.
   - Queue: one ``multiprocessing.Queue(maxsize=4 × producers)``. Each put is
     a list of 64 records (``bytearray``).
   - Pipe: one Pipe per producer; ``send_bytes`` of a 64-record batch buffer.
   - Ring: one ``SharedMemory`` holding a ring of 256 slots (4 batches) per
     producer. Each producer publishes its head in shared memory (an aligned
     8-byte store). A shared "items" semaphore wakes the consumer, and a
     per-producer "space" semaphore holds the producer back when its ring is
     full. Producers write records straight into their slots.
   - Channels, no allocator, a control rather than a peer: slitter's
     producer and consumer, line for line, with the records in ring slots
     of one SharedMemory (4 batches per producer, taken in turn) instead
     of slitter objects: ``allocate_many`` hands out the next batch's
     offsets, ``check`` and ``release_many`` do nothing, and the offsets
     travel through the same channels. What separates it from slitter is
     the allocator alone; what separates it from the ring is the hand-off
     (channels against semaphores). (Until 2026-11-26 the control was
     "ring + handles": the ring's semaphores with offsets in handle slots.)

Streaming runs seven repetitions, the rest three: the streaming ratios
moved by up to 0.11 between runs of three, and a point's median of five
still missed 0.9 by 0.1 when the control with no allocator did too.

Every repetition runs all peers of a configuration one after another, so
they share the machine's noise. Streaming runs slitter next to the ring,
and reverses the order every other repetition (STREAM_ORDER). The tables
give medians over repetitions. Ratios are slitter ÷ peer, taken per
repetition; the table shows their median.

Run it:

    cd bench && ../.venv/bin/python peers.py            # about 4 minutes on 2 cores
    cd bench && ../.venv/bin/python peers.py --quick    # about 20 s
    cd bench && ../.venv/bin/python peers.py --json     # the full result as JSON on stdout

It writes bench/results/peers.json and bench/results/streaming.png
(peers-quick.json and streaming-quick.png with ``--quick``). The PNG needs
matplotlib.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import pickle
import random
import statistics
import struct
import sys
import time
import zlib
from array import array
from collections.abc import Iterable
from functools import partial
from multiprocessing import resource_tracker, shared_memory
from multiprocessing.connection import wait as mp_wait
from multiprocessing.managers import SharedMemoryManager, dispatch
from multiprocessing.reduction import ForkingPickler
from multiprocessing.sharedctypes import RawArray
from pathlib import Path
from typing import Any, Callable, NamedTuple

import slitter
from benchlib import CTX, cli, machine, machine_line, trial

perf = time.perf_counter
RESULTS = Path(__file__).resolve().parent / "results"

BATCH = 64
WINDOW = 4  # batches in flight per producer
OBJECT_SIZE = 64
TABLE_RECORDS = 100_000
TABLE_RECORD = 64
TABLE_WORKERS = 4
STREAM_SIZES = (64, 1024, 65536)
WORKLOADS = ("objects", "table", "streaming")

SIZES = {
    #           reps  objects-s  table reps  table-s  stream reps  stream-s  producers
    "default": (3,    1.0,       5,          1.0,     7,           0.6,      (1, 2, 4)),
    "quick":   (1,    0.3,       1,          0.3,     1,           0.3,      (1, 4)),
}

TARGETS = {
    "objects": {"SharedMemory": 300.0, "RawArray": 50.0, "SharedMemoryManager": 1000.0},
    "table": {"Manager dict": 100.0, "Manager list": 100.0, "hand-rolled table": 0.8},
    "streaming_ring_rate": 0.9,
}

# A channel peer's ring holds WINDOW - 2 batches: with the one its consumer is reading and the one its
# producer is writing, WINDOW in flight, as the semaphore of the Pipe and ring peers allows.
CHANNEL_WINDOW = (WINDOW - 2) * BATCH

HEAD = struct.Struct("<QQ")  # sequence number, producer id: the first 16 bytes of every record


def template(size: int) -> bytes:
    return bytes((i * 7 + 3) & 0xFF for i in range(size))


def abba(order: tuple[str, ...], rep: int) -> tuple[str, ...]:
    """A repetition's trial order: as given in even repetitions, reversed in odd ones, so that a drift of the
    host's speed over a repetition falls on both sides of a ratio in turn."""
    return order if rep % 2 == 0 else order[::-1]


def tracker_pid() -> int | None:
    return getattr(resource_tracker._resource_tracker, "_pid", None)


# -- 1. shared objects ---------------------------------------------------------------
#
# A peer is a pair of setups.  produce(seq) makes, writes and returns one batch
# as bytes-like; acked() runs once the consumer is done with the oldest batch;
# consume(msg, seq) reads, verifies and releases a batch and returns its errors.

class Touch(NamedTuple):
    """What the shared-objects workers do to the objects of a batch.

    ``prepare(buf)`` is the buffer as the loops index it (once per mapping,
    or per object for the peers with a buffer per object).  The producer
    calls ``write(buf, offsets, seq)``, which writes sequence numbers seq,
    seq + 1, ... into the objects at ``offsets``; the consumer calls
    ``check(buf, offsets, seq)``, which reads them and returns how many do
    not hold what was written.  The loops over a batch are the touch's own,
    so every peer runs the same lines, with no Python call per object.
    """
    name: str
    prepare: Callable[[memoryview], Any]
    write: Callable[[Any, Iterable[int], int], None]
    check: Callable[[Any, Iterable[int], int], int]


ONE = (0,)  # the offsets of a buffer that is one object


def whole_object(size: int) -> Touch:
    """All of it: a template, then the sequence number; a CRC-32 of all of it, and the number checked."""
    tmpl, crc32, pack, unpack = template(size), zlib.crc32, HEAD.pack_into, HEAD.unpack_from

    def write(buf, offsets: Iterable[int], seq: int) -> None:
        for off in offsets:
            buf[off:off + size] = tmpl
            pack(buf, off, seq, 0)
            seq += 1

    def check(buf, offsets: Iterable[int], seq: int) -> int:
        errors = 0
        for off in offsets:
            crc32(buf[off:off + size])
            if unpack(buf, off)[0] != seq:
                errors += 1
            seq += 1
        return errors

    return Touch("whole object", lambda buf: buf, write, check)


def one_field(size: int) -> Touch:
    """The least a user does: one 8-byte field (the sequence number) written, read back and checked.

    Through the buffer cast to 8-byte words, as a user with a hot field does
    (a memoryview item is cheaper than ``struct.pack_into``/``unpack_from``).
    """
    def write(words, offsets: Iterable[int], seq: int) -> None:
        for off in offsets:
            words[off >> 3] = seq
            seq += 1

    def check(words, offsets: Iterable[int], seq: int) -> int:
        errors = 0
        for off in offsets:
            if words[off >> 3] != seq:
                errors += 1
            seq += 1
        return errors

    return Touch("one field", lambda buf: buf.cast("Q"), write, check)


TOUCHES = {"whole object": whole_object, "one field": one_field}


def _objects_producer(make: Callable, conn, space, duration: float) -> tuple:
    produce, acked, cleanup = make()

    def work() -> tuple[int, int]:
        deadline = perf() + duration
        seq = inflight = 0
        while perf() < deadline:
            space.acquire()  # at most WINDOW batches unconsumed
            if inflight == WINDOW:  # so the oldest one is consumed
                acked()
                inflight -= 1
            conn.send_bytes(produce(seq))
            seq += BATCH
            inflight += 1
        conn.send_bytes(b"")
        for _ in range(WINDOW):  # every batch consumed
            space.acquire()
        while inflight:
            acked()
            inflight -= 1
        return 0, 0

    return work, cleanup


def _objects_consumer(make: Callable, conn, space) -> tuple:
    consume, cleanup = make()

    def work() -> tuple[int, int]:
        seq = errors = 0
        while True:
            msg = conn.recv_bytes()
            if not msg:
                return seq, errors
            errors += consume(msg, seq)
            space.release()
            seq += BATCH

    return work, cleanup


def _channel_producer(make: Callable, address: str, channel: int, duration: float) -> tuple:
    """The producer's loop for the handle-passing peers: each batch goes through a slitter channel."""
    produce, _acked, cleanup = make()  # nothing to ack: the consumer releases
    heap = slitter.connect(address)
    link = heap.open_channel(channel)

    def send_batch(seq: int) -> None:
        link.send_many(produce(seq))  # waits while WINDOW batches are in flight: CHANNEL_WINDOW

    def close() -> None:
        cleanup()
        heap.close()

    return _produce_loop(send_batch, duration, link.close), close


def _channel_consumer(make: Callable, address: str, channel: int) -> tuple:
    consume, cleanup = make()
    heap = slitter.connect(address)
    link = heap.open_channel(channel)

    def work() -> tuple[int, int]:
        seq = errors = 0
        while True:
            try:
                handles = link.recv_many(BATCH)
            except slitter.ChannelClosed:
                return seq, errors
            errors += consume(handles, seq)
            seq += len(handles)

    def close() -> None:
        cleanup()
        heap.close()

    return work, close


def _handles(msg) -> array:
    """A batch as the consumer gets it: an array('Q') from a channel, bytes from a Pipe."""
    if type(msg) is array:
        return msg
    handles = array("Q")
    handles.frombytes(msg)
    return handles


def slitter_objects(address: str, role: str, touch: Touch):
    """Objects written and read through ``heap.arena``; the consumer checks each batch first."""
    heap = slitter.connect(address)
    cls = heap.register_class(f"objects-{OBJECT_SIZE}", OBJECT_SIZE)
    cls.release_many(cls.allocate_many(BATCH))  # bind this thread to the class
    arena, write, check = touch.prepare(heap.arena), touch.write, touch.check
    if role == "producer":
        def produce(seq: int):
            handles = cls.allocate_many(BATCH)  # fresh objects of this class: nothing to check
            write(arena, handles, seq)
            return handles

        return produce, lambda: None, heap.close

    def consume(msg, seq: int) -> int:
        handles = _handles(msg)
        cls.check(handles)  # every handle a live object of this class: one native call
        errors = check(arena, handles, seq)
        cls.release_many(handles)
        return errors

    return consume, heap.close


def slitter_view_objects(address: str, role: str, touch: Touch):
    """Objects written and read through ``heap.view(handle)``, checked one by one."""
    heap = slitter.connect(address)
    cls = heap.register_class(f"objects-{OBJECT_SIZE}", OBJECT_SIZE)
    cls.release_many(cls.allocate_many(BATCH))  # bind this thread to the class
    view, prepare, write, check_at = heap.view, touch.prepare, touch.write, touch.check
    if role == "producer":
        def produce(seq: int):
            handles = cls.allocate_many(BATCH)
            for h in handles:
                write(prepare(view(h)), ONE, seq)
                seq += 1
            return handles

        return produce, lambda: None, heap.close

    def consume(msg, seq: int) -> int:
        handles = _handles(msg)
        errors = 0
        for h in handles:
            errors += check_at(prepare(view(h)), ONE, seq)
            seq += 1
        cls.release_many(handles)
        return errors

    return consume, heap.close


def shm_objects(role: str, touch: Touch):
    size, prepare, write, check_at = OBJECT_SIZE, touch.prepare, touch.write, touch.check
    SharedMemory = shared_memory.SharedMemory
    if role == "producer":
        def produce(seq: int) -> bytes:
            names = []
            for _ in range(BATCH):
                shm = SharedMemory(create=True, size=size)
                write(prepare(shm.buf), ONE, seq)
                names.append(shm.name)
                shm.close()
                seq += 1
            return "\0".join(names).encode()

        return produce, lambda: None, lambda: None

    def consume(msg: bytes, seq: int) -> int:
        errors = 0
        for name in msg.decode().split("\0"):
            shm = SharedMemory(name)
            errors += check_at(prepare(shm.buf), ONE, seq)
            shm.close()
            shm.unlink()
            seq += 1
        return errors

    return consume, lambda: None


def smm_objects(smm: SharedMemoryManager, role: str, touch: Touch):
    size, prepare, write, check_at = OBJECT_SIZE, touch.prepare, touch.write, touch.check
    if role == "producer":
        def produce(seq: int) -> bytes:
            names = []
            for _ in range(BATCH):
                shm = smm.SharedMemory(size)
                write(prepare(shm.buf), ONE, seq)
                names.append(shm.name)
                shm.close()
                seq += 1
            return "\0".join(names).encode()

        return produce, lambda: None, lambda: None

    def consume(msg: bytes, seq: int) -> int:
        errors = 0
        for name in msg.decode().split("\0"):
            shm = shared_memory.SharedMemory(name)
            errors += check_at(prepare(shm.buf), ONE, seq)
            shm.close()
            # The manager serves one request per connection, as in smm.SharedMemory().
            with smm._Client(smm._address, authkey=smm._authkey) as conn:
                dispatch(conn, None, "release_segment", (name,))
            seq += 1
        return errors

    return consume, lambda: None


def rawarray_objects(role: str, touch: Touch):
    size, prepare, write, check_at = OBJECT_SIZE, touch.prepare, touch.write, touch.check
    if role == "producer":
        inflight: collections.deque = collections.deque()

        def produce(seq: int) -> bytes:
            batch = []
            for _ in range(BATCH):
                a = RawArray("B", size)
                write(prepare(memoryview(a).cast("B")), ONE, seq)
                batch.append(a)
                seq += 1
            inflight.append(batch)
            return ForkingPickler.dumps([a._wrapper for a in batch])

        return produce, inflight.popleft, lambda: None

    def consume(msg: bytes, seq: int) -> int:
        errors = 0
        wrappers = pickle.loads(msg)
        for w in wrappers:
            errors += check_at(prepare(w.create_memoryview()), ONE, seq)
            seq += 1
        # rebuild_arena() maps the received descriptor and never closes it.
        for fd in {w._state[0][0].fd for w in wrappers}:
            os.close(fd)
        return errors

    return consume, lambda: None


# The control's slots: WINDOW batches in flight (CHANNEL_WINDOW), and one more to spare.
SLOTS = (WINDOW + 1) * BATCH


def slots_objects(name: str, role: str, touch: Touch):
    """The control, no allocator: fixed slots of one SharedMemory, taken in turn, passed as offsets."""
    shm = shared_memory.SharedMemory(name)
    buf, write, check = touch.prepare(shm.buf), touch.write, touch.check
    batches = [array("Q", range(first * OBJECT_SIZE, (first + BATCH) * OBJECT_SIZE, OBJECT_SIZE))
               for first in range(0, SLOTS, BATCH)]

    def close() -> None:
        if buf is not shm.buf:
            buf.release()  # the touch's cast of the mapping, or the mapping cannot close
        shm.close()

    if role == "producer":
        turn = itertools.cycle(batches)

        def produce(seq: int):
            offsets = next(turn)
            write(buf, offsets, seq)
            return offsets

        return produce, lambda: None, close

    def consume(msg, seq: int) -> int:
        return check(buf, _handles(msg), seq)

    return consume, close


def run_objects(address: str, daemon_pid: int, reps: int, duration: float, progress) -> dict[str, Any]:
    """Both touches; every peer under the whole-object touch, the cheap peers under one field."""
    resource_tracker.ensure_running()  # one tracker, inherited by every worker
    smm = SharedMemoryManager(ctx=CTX)
    smm.start()
    slots = shared_memory.SharedMemory(create=True, size=SLOTS * OBJECT_SIZE)
    # name: (setup(role, touch), server pids, how batches travel: "channel" or "pipe")
    peers = {
        "slitter": (lambda r, t: slitter_objects(address, r, t), [daemon_pid], "channel"),
        # The control runs right after slitter, so the two share the machine's noise most.
        "slots, no allocator": (lambda r, t: slots_objects(slots.name, r, t), [daemon_pid], "channel"),
        "slitter, view per object": (lambda r, t: slitter_view_objects(address, r, t), [daemon_pid], "channel"),
        "slitter, over a Pipe": (lambda r, t: slitter_objects(address, r, t), [daemon_pid], "pipe"),
        "SharedMemory": (lambda r, t: shm_objects(r, t), [tracker_pid()], "pipe"),
        "SharedMemoryManager": (lambda r, t: smm_objects(smm, r, t), [smm._process.pid, tracker_pid()], "pipe"),
        "RawArray": (lambda r, t: rawarray_objects(r, t), [], "pipe"),
    }
    # One field takes a few seconds less without the slowest peer, which is far past its target either way.
    plans = {"whole object": list(peers), "one field": [n for n in peers if n != "SharedMemoryManager"]}
    per_rep: dict[str, list[dict[str, dict]]] = {touch: [] for touch in plans}
    heap = slitter.connect(address)  # makes each trial's channel
    try:
        for rep in range(reps):
            for touch_name, names in plans.items():
                touch = TOUCHES[touch_name](OBJECT_SIZE)
                row = {}
                for name in names:
                    make, servers, link = peers[name]
                    progress(f"shared objects ({touch_name}), repetition {rep + 1}/{reps}: {name}")
                    producer, consumer = partial(make, "producer", touch), partial(make, "consumer", touch)
                    if link == "channel":
                        channel = heap.channel(CHANNEL_WINDOW)
                        row[name] = trial([(_channel_producer, (producer, address, channel.handle, duration)),
                                           (_channel_consumer, (consumer, address, channel.handle))], servers)
                        channel.release()
                        continue
                    reader, writer = CTX.Pipe(duplex=False)
                    space = CTX.Semaphore(WINDOW)
                    row[name] = trial([(_objects_producer, (producer, writer, space, duration)),
                                       (_objects_consumer, (consumer, reader, space))], servers)
                    reader.close()
                    writer.close()
                per_rep[touch_name].append(row)
    finally:
        heap.close()
        slots.close()
        slots.unlink()
        smm.shutdown()
    out: dict[str, Any] = {}
    for touch_name, rows in per_rep.items():
        out[touch_name] = summarize(rows, "slitter")
        by_view = summarize(rows, "slitter, view per object")
        by_control = summarize(rows, "slots, no allocator")  # what no allocator reaches against each peer
        for name in out[touch_name]["peers"]:
            out[touch_name]["peers"][name]["ratio_view"] = by_view["peers"][name]["ratio"]
            out[touch_name]["peers"][name]["ratio_control"] = by_control["peers"][name]["ratio"]
    return out


# -- 2. shared mutable table ---------------------------------------------------------

RECORD_TAIL = bytes(TABLE_RECORD - HEAD.size)
CHUNK = 256  # updates between clock checks


def _indices(worker: int) -> list[list[int]]:
    rng = random.Random(1000 + worker)
    idx = [rng.randrange(TABLE_RECORDS) for _ in range(1 << 16)]
    return [idx[i:i + CHUNK] for i in range(0, len(idx), CHUNK)]


def _table_loop(update: Callable[[int, int], None], chunks: list[list[int]], duration: float) -> int:
    deadline = perf() + duration
    n = 0
    while True:
        for chunk in chunks:
            for k in chunk:
                update(k, n)
                n += 1
            if perf() >= deadline:
                return n


def table_slitter(address: str, handles: array, worker: int, duration: float, cached: bool | None):
    """``cached``: True for views taken once, False for a view per update, None for ``heap.arena``."""
    heap = slitter.connect(address)
    chunks = _indices(worker)
    pack_into = HEAD.pack_into
    if cached is None:
        cls = heap.register_class(f"table-{TABLE_RECORD}", TABLE_RECORD)
        cls.check(handles)  # all 100,000 live objects of the class: one native call
        arena = heap.arena
        chunks = [[handles[k] for k in chunk] for chunk in chunks]

        def update(h: int, i: int) -> None:
            pack_into(arena, h, worker, i)
    elif cached:
        views = [heap.view(h) for h in handles]

        def update(k: int, i: int) -> None:
            pack_into(views[k], 0, worker, i)
    else:
        view = heap.view

        def update(k: int, i: int) -> None:
            pack_into(view(handles[k]), 0, worker, i)

    def cleanup() -> None:
        nonlocal update
        if cached:
            views.clear()
        update = None  # drop the arena with the closure that holds it
        heap.close()

    return (lambda: (_table_loop(update, chunks, duration), 0)), cleanup


def table_proxy(proxy, worker: int, duration: float):
    chunks = _indices(worker)
    pack, tail = HEAD.pack, RECORD_TAIL
    proxy[0] = pack(worker, 0) + tail  # connect outside the timed window

    def update(k: int, i: int) -> None:
        proxy[k] = pack(worker, i) + tail

    return (lambda: (_table_loop(update, chunks, duration), 0)), lambda: None


def table_shm(name: str, worker: int, duration: float):
    shm = shared_memory.SharedMemory(name)
    buf = shm.buf
    chunks = [[k * TABLE_RECORD for k in chunk] for chunk in _indices(worker)]
    pack_into = HEAD.pack_into

    def update(off: int, i: int) -> None:
        pack_into(buf, off, worker, i)

    def cleanup() -> None:
        nonlocal buf
        buf = None
        shm.close()

    return (lambda: (_table_loop(update, chunks, duration), 0)), cleanup


#: The order of a repetition's table trials, reversed every other repetition (as STREAM_ORDER): the arena runs
#: next to the hand-rolled table it is compared with (the same pack_into on the same 6.4 MB, so drift of the
#: host between two trials seconds apart was the whole spread of that ratio, 0.72-1.04 in one run), and the
#: views next to the Manager proxies theirs are compared with.
TABLE_ORDER = ("slitter, arena", "hand-rolled table", "slitter, cached views", "slitter, view per update",
               "Manager dict", "Manager list")


def run_table(address: str, daemon_pid: int, heap: slitter.Heap, reps: int, duration: float,
              progress) -> dict[str, Any]:
    cls = heap.register_class(f"table-{TABLE_RECORD}", TABLE_RECORD)
    handles = cls.allocate_many(TABLE_RECORDS)
    for h in handles:
        heap.view(h)[:] = bytes(TABLE_RECORD)
    record = bytes(TABLE_RECORD)
    mgr = CTX.Manager()
    progress("shared table: filling the Manager dict and list")
    mdict = mgr.dict(dict.fromkeys(range(TABLE_RECORDS), record))
    mlist = mgr.list([record] * TABLE_RECORDS)
    table = shared_memory.SharedMemory(create=True, size=TABLE_RECORDS * TABLE_RECORD)
    peers = {
        "slitter, view per update": (lambda w: (table_slitter, (address, handles, w, duration, False)),
                                     [daemon_pid]),
        "slitter, cached views": (lambda w: (table_slitter, (address, handles, w, duration, True)), [daemon_pid]),
        "slitter, arena": (lambda w: (table_slitter, (address, handles, w, duration, None)), [daemon_pid]),
        "Manager dict": (lambda w: (table_proxy, (mdict, w, duration)), [mgr._process.pid]),
        "Manager list": (lambda w: (table_proxy, (mlist, w, duration)), [mgr._process.pid]),
        "hand-rolled table": (lambda w: (table_shm, (table.name, w, duration)), [tracker_pid()]),
    }
    per_rep = []
    try:
        for rep in range(reps):
            row = {}
            for name in abba(TABLE_ORDER, rep):
                part, servers = peers[name]
                progress(f"shared table, repetition {rep + 1}/{reps}: {name}")
                row[name] = trial([part(w) for w in range(TABLE_WORKERS)], servers)
            per_rep.append({name: row[name] for name in peers})
    finally:
        mgr.shutdown()
        table.close()
        table.unlink()
        cls.release_many(handles)
    out = summarize(per_rep, "slitter, view per update")
    cached = summarize(per_rep, "slitter, cached views")
    arena = summarize(per_rep, "slitter, arena")
    for name in out["peers"]:
        out["peers"][name]["ratio_cached"] = cached["peers"][name]["ratio"]
        out["peers"][name]["ratio_arena"] = arena["peers"][name]["ratio"]
    return out


# -- 3. streaming --------------------------------------------------------------------

def _stream_write(buf, off: int, size: int, tmpl: bytes, seq: int, producer: int) -> None:
    buf[off:off + size] = tmpl
    HEAD.pack_into(buf, off, seq, producer)


class _Verify:
    """The consumer's check: per producer, the first record of each batch carries the next sequence number."""

    def __init__(self, producers: int) -> None:
        self.expected = [0] * producers
        self.errors = 0

    def batch(self, buf) -> None:
        seq, producer = HEAD.unpack_from(buf)
        if producer >= len(self.expected) or self.expected[producer] != seq:
            self.errors += 1
        else:
            self.expected[producer] += BATCH


def _produce_loop(send_batch: Callable[[int], None], duration: float, finish: Callable[[], None]):
    def work() -> tuple[int, int]:
        deadline = perf() + duration
        seq = 0
        while perf() < deadline:
            send_batch(seq)
            seq += BATCH
        finish()
        return 0, 0

    return work


RING_SLOTS = WINDOW * BATCH
CTL_STRIDE = 64  # bytes between producers' heads: one cache line each


def _published_batches(items, heads, producers: int):
    """(producer, its tail) of each batch published in a ring, round-robin, until every producer is done.

    One ``items`` token per published batch, and one more per producer when it is done.
    """
    tails = [0] * producers
    finished = rr = 0
    while finished < producers:
        items.acquire()
        for _ in range(producers):
            p, rr = rr, (rr + 1) % producers
            if heads[p * CTL_STRIDE // 8] != tails[p]:
                break
        else:
            finished += 1  # every published batch is consumed: this token was a "done"
            continue
        yield p, tails[p]
        tails[p] += BATCH


# slitter

RETURN_CAPACITY = 1024  # the consumer's returns to a releasing producer: never full


class _RingSlots:
    """The control's records: slots of a ring in one SharedMemory, per producer, instead of slitter objects.

    Stands in for the class in slitter's stream loops: ``allocate_many``
    hands out the producer's next WINDOW-th of its ring, ``check`` and
    ``release_many`` do nothing.  Safe to reuse: with CHANNEL_WINDOW
    batches in the channel, one being read and one being written, a slot
    comes round again only after the consumer has read it.
    """

    def __init__(self, name: str, producers: int, size: int, producer: int = 0) -> None:
        self.shm = shared_memory.SharedMemory(name)
        self.arena = self.shm.buf
        ring = ring_layout(producers, size)[0] + producer * RING_SLOTS * size
        self.batches = [array("Q", range(ring + w * BATCH * size, ring + (w + 1) * BATCH * size, size))
                        for w in range(WINDOW)]
        self.next = 0

    def allocate_many(self, n: int) -> array:
        self.next += 1
        return self.batches[self.next % WINDOW]

    def check(self, handles) -> None:
        pass

    def release_many(self, handles) -> None:
        pass

    def close(self) -> None:
        self.arena.release()
        self.shm.close()


def _stream_class(heap: slitter.Heap, size: int, ring: tuple[str, int] | None, producer: int = 0):
    """(the class, the buffer its handles index): slitter's stream class, bound to this thread, or the control's slots."""
    if ring is not None:
        slots = _RingSlots(*ring, size, producer)
        return slots, slots.arena
    cls = heap.register_class(f"stream-{size}", size)
    cls.release_many(cls.allocate_many(BATCH))  # bind this thread to the class
    return cls, heap.arena


def stream_slitter_producer(address: str, size: int, producer: int, channel: int, back: int | None,
                            duration: float, ring: tuple[str, int] | None = None):
    """A slitter producer: a batch's handles go through its channel; ``back``: the consumer returns them to release.

    ``ring``: (SharedMemory name, producers) for the control, which runs
    these lines with ring slots in place of slitter objects (_RingSlots).
    """
    heap = slitter.connect(address)
    cls, arena = _stream_class(heap, size, ring, producer)
    tmpl = template(size)
    link = heap.open_channel(channel)
    returned = heap.open_channel(back) if back is not None else None
    out = 0  # handles sent and not yet returned (producer releases)

    def send_batch(seq: int) -> None:
        nonlocal out
        if returned is not None and len(returned):  # what the consumer is done with
            done = returned.recv_many(RETURN_CAPACITY, timeout=0)
            cls.release_many(done)
            out -= len(done)
        handles = cls.allocate_many(BATCH)
        for h in handles:
            _stream_write(arena, h, size, tmpl, seq, producer)
            seq += 1
        link.send_many(handles)  # waits while WINDOW batches are in flight: CHANNEL_WINDOW
        if returned is not None:
            out += BATCH

    def cleanup() -> None:  # after every worker's work: the consumer has returned them all
        nonlocal out
        while out:
            done = returned.recv_many(RETURN_CAPACITY, timeout=30)
            cls.release_many(done)
            out -= len(done)
        if ring is not None:
            cls.close()
        heap.close()

    return _produce_loop(send_batch, duration, link.close), cleanup


def stream_slitter_consumer(address: str, size: int, channels: list[int], backs: list[int] | None,
                            ring: tuple[str, int] | None = None):
    """The slitter consumer: waits on every producer's channel at once; releases what it read, or returns it.

    ``ring``: as for the producer, the control.
    """
    heap = slitter.connect(address)
    cls, arena = _stream_class(heap, size, ring)
    check, crc32, wait_any = cls.check, zlib.crc32, slitter.Channel.wait_any
    links = [heap.open_channel(c) for c in channels]
    returns = {link.handle: heap.open_channel(b) for link, b in zip(links, backs)} if backs else None

    def work() -> tuple[int, int]:
        verify = _Verify(len(links))
        n = 0
        open_links = list(links)
        while open_links:
            # One producer: a plain blocking receive.  Several: wait on all, then take from the one ready
            # (wait_any takes the ready ones in turn).
            link = open_links[0] if len(open_links) == 1 else wait_any(open_links)
            try:
                handles = link.recv_many(BATCH)
            except slitter.ChannelClosed:
                open_links.remove(link)
                continue
            check(handles)  # every handle a live record of this class: one native call
            for h in handles:
                crc32(arena[h:h + size])
            verify.batch(arena[handles[0]:handles[0] + 16])
            if returns is None:
                cls.release_many(handles)
            else:
                returns[link.handle].send_many(handles)
            n += len(handles)
        return n, verify.errors

    def cleanup() -> None:
        if ring is not None:
            cls.close()
        heap.close()

    return work, cleanup


# Queue

def stream_queue_producer(q, size: int, producer: int, duration: float):
    tmpl = template(size)

    def send_batch(seq: int) -> None:
        batch = []
        for _ in range(BATCH):
            rec = bytearray(size)
            _stream_write(rec, 0, size, tmpl, seq, producer)
            batch.append(rec)
            seq += 1
        q.put(batch)

    return _produce_loop(send_batch, duration, lambda: q.put(None)), lambda: None


def stream_queue_consumer(q, producers: int):
    crc32 = zlib.crc32

    def work() -> tuple[int, int]:
        verify = _Verify(producers)
        done = n = 0
        while done < producers:
            batch = q.get()
            if batch is None:
                done += 1
                continue
            for rec in batch:
                crc32(rec)
            verify.batch(batch[0])
            n += len(batch)
        return n, verify.errors

    return work, lambda: None


# Pipe

def stream_pipe_producer(conn, size: int, producer: int, duration: float):
    tmpl = template(size)
    buf = bytearray(BATCH * size)

    def send_batch(seq: int) -> None:
        for j in range(BATCH):
            _stream_write(buf, j * size, size, tmpl, seq + j, producer)
        conn.send_bytes(buf)

    return _produce_loop(send_batch, duration, lambda: conn.send_bytes(b"")), lambda: None


def stream_pipe_consumer(conns: list, size: int):
    crc32 = zlib.crc32

    def work() -> tuple[int, int]:
        verify = _Verify(len(conns))
        live = list(conns)
        n = 0
        while live:
            ready = live if len(live) == 1 else mp_wait(live)
            for conn in ready:
                data = conn.recv_bytes()
                if not data:
                    live.remove(conn)
                    continue
                mv = memoryview(data)
                for off in range(0, len(data), size):
                    crc32(mv[off:off + size])
                verify.batch(mv)
                n += len(data) // size
        return n, verify.errors

    return work, lambda: None


# Ring in one SharedMemory



def ring_layout(producers: int, size: int) -> tuple[int, int]:
    """(offset of producer 0's ring, total bytes)."""
    base = producers * CTL_STRIDE
    base = (base + 4095) // 4096 * 4096
    return base, base + producers * RING_SLOTS * size


def stream_ring_producer(name: str, producers: int, size: int, producer: int, items, space, duration: float):
    """A ring producer: a batch into its next slots, one head store, a semaphore token for the consumer."""
    shm = shared_memory.SharedMemory(name)
    data = shm.buf
    heads = data[:producers * CTL_STRIDE].cast("Q")
    me = producer * CTL_STRIDE // 8
    ring = ring_layout(producers, size)[0] + producer * RING_SLOTS * size
    tmpl = template(size)

    def send_batch(seq: int) -> None:
        space.acquire()
        head = heads[me]
        base = ring + (head % RING_SLOTS) * size
        for j in range(BATCH):
            _stream_write(data, base + j * size, size, tmpl, seq + j, producer)
        heads[me] = head + BATCH  # publish: one aligned 8-byte store
        items.release()

    def finish() -> None:
        items.release()  # a token with no batch behind it: "I am done"

    def cleanup() -> None:
        nonlocal data, heads
        heads.release()
        data = heads = None
        shm.close()

    return _produce_loop(send_batch, duration, finish), cleanup


def stream_ring_consumer(name: str, producers: int, size: int, items, spaces: list):
    """The ring consumer: a token, then the next batch of whichever producer published one."""
    shm = shared_memory.SharedMemory(name)
    data = shm.buf
    heads = data[:producers * CTL_STRIDE].cast("Q")
    base = ring_layout(producers, size)[0]
    crc32 = zlib.crc32

    def work() -> tuple[int, int]:
        verify = _Verify(producers)
        n = 0
        for p, tail in _published_batches(items, heads, producers):
            start = base + p * RING_SLOTS * size + (tail % RING_SLOTS) * size
            for off in range(start, start + BATCH * size, size):
                crc32(data[off:off + size])
            verify.batch(data[start:start + 16])
            spaces[p].release()
            n += BATCH
        return n, verify.errors

    def cleanup() -> None:
        nonlocal data, heads
        heads.release()
        data = heads = None
        shm.close()

    return work, cleanup


def stream_trial(peer: str, address: str, daemon_pid: int, heap: slitter.Heap, size: int, producers: int,
                 duration: float) -> dict[str, Any]:
    if peer in (SLITTER, SLITTER_PRODUCER_RELEASES, CHANNEL_CONTROL):
        shm = (shared_memory.SharedMemory(create=True, size=ring_layout(producers, size)[1])
               if peer == CHANNEL_CONTROL else None)
        try:
            ring = (shm.name, producers) if shm else None
            links = [heap.channel(CHANNEL_WINDOW) for _ in range(producers)]
            backs = ([heap.channel(RETURN_CAPACITY) for _ in range(producers)]
                     if peer == SLITTER_PRODUCER_RELEASES else [])
            try:
                parts = [(stream_slitter_producer, (address, size, p, links[p].handle,
                                                    backs[p].handle if backs else None, duration, ring))
                         for p in range(producers)]
                parts.append((stream_slitter_consumer, (address, size, [c.handle for c in links],
                                                        [c.handle for c in backs] or None, ring)))
                return trial(parts, [daemon_pid] + ([tracker_pid()] if shm else []))
            finally:
                for c in links + backs:
                    c.release()
        finally:
            if shm:
                shm.close()
                shm.unlink()
    elif peer == "Queue":
        q = CTX.Queue(maxsize=WINDOW * producers)
        parts = [(stream_queue_producer, (q, size, p, duration)) for p in range(producers)]
        parts.append((stream_queue_consumer, (q, producers)))
        result = trial(parts, [])
        q.close()
        return result
    elif peer == "Pipe":
        pipes = [CTX.Pipe(duplex=False) for _ in range(producers)]
        parts = [(stream_pipe_producer, (pipes[p][1], size, p, duration)) for p in range(producers)]
        parts.append((stream_pipe_consumer, ([r for r, _ in pipes], size)))
        result = trial(parts, [])
    else:  # the ring
        shm = shared_memory.SharedMemory(create=True, size=ring_layout(producers, size)[1])
        try:
            items = CTX.Semaphore(0)
            spaces = [CTX.Semaphore(WINDOW) for _ in range(producers)]
            parts = [(stream_ring_producer, (shm.name, producers, size, p, items, spaces[p], duration))
                     for p in range(producers)]
            parts.append((stream_ring_consumer, (shm.name, producers, size, items, spaces)))
            return trial(parts, [tracker_pid()])
        finally:
            shm.close()
            shm.unlink()
    for r, w in pipes:
        r.close()
        w.close()
    return result


SLITTER = "slitter"
SLITTER_PRODUCER_RELEASES = "slitter, producer releases"
STREAM_OURS = (SLITTER, SLITTER_PRODUCER_RELEASES)
#: A control, not a peer: slitter's stream loops and channels, with ring slots for records (no allocator).
CHANNEL_CONTROL = "channels, no allocator"
STREAM_PEERS = (*STREAM_OURS, "Queue", "Pipe", "ring", CHANNEL_CONTROL)
#: The order of a repetition's trials, reversed every other repetition: each of slitter's variants runs next to
#: the ring it is compared with, and a drift of the host's speed over a repetition falls on both sides of the
#: ratio in turn (ABBA) instead of always on one.
STREAM_ORDER = (SLITTER, "ring", SLITTER_PRODUCER_RELEASES, CHANNEL_CONTROL, "Queue", "Pipe")


def run_streaming(address: str, daemon_pid: int, heap: slitter.Heap, reps: int, duration: float,
                  producer_counts: tuple, progress) -> dict[str, Any]:
    for size in STREAM_SIZES:
        heap.register_class(f"stream-{size}", size)
    configs = [(size, p) for size in STREAM_SIZES for p in producer_counts]
    per_rep: dict[tuple, list] = {c: [] for c in configs}
    for rep in range(reps):
        for size, producers in configs:
            row = {}
            for peer in abba(STREAM_ORDER, rep):
                progress(f"streaming, repetition {rep + 1}/{reps}: {size} B, {producers} producer(s), {peer}")
                row[peer] = stream_trial(peer, address, daemon_pid, heap, size, producers, duration)
            per_rep[(size, producers)].append({peer: row[peer] for peer in STREAM_PEERS})
    return {"configs": [{"size": size, "producers": p, **summarize(per_rep[(size, p)], SLITTER),
                         "by_variant": {ours: summarize(per_rep[(size, p)], ours)["peers"] for ours in STREAM_OURS}}
                        for size, p in configs]}


# -- summaries -----------------------------------------------------------------------

def summarize(per_rep: list[dict[str, dict]], ours: str) -> dict[str, Any]:
    """Medians per peer; ratio = median of per-repetition slitter/peer rates, cpu_ratio likewise for CPU."""
    names = list(per_rep[0])
    peers = {}
    for name in names:
        runs = [row[name] for row in per_rep]
        peers[name] = {
            "rate": statistics.median(r["rate"] for r in runs),
            "rate_range": [min(r["rate"] for r in runs), max(r["rate"] for r in runs)],
            "cpu_us": statistics.median(r["cpu_us"] for r in runs),
            "cpu_servers_s": statistics.median(r["cpu_servers_s"] for r in runs),
            "records": sum(r["records"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
            "ratio": statistics.median(row[ours]["rate"] / row[name]["rate"] for row in per_rep),
            "cpu_ratio": statistics.median(row[ours]["cpu_us"] / row[name]["cpu_us"] for row in per_rep),
            "repetitions": runs,
        }
    return {"peers": peers}




def targets(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for touch, measured in result.get("objects", {}).items():
        peers = measured["peers"]
        for name, target in TARGETS["objects"].items():
            if name not in peers:
                continue
            for variant, key in (("arena", "ratio"), ("view per object", "ratio_view")):
                out[f"objects, {touch} ({variant}) vs {name}"] = {
                    "target": f">= {target:g}x", "value": peers[name][key], "met": peers[name][key] >= target}
    if "table" in result:
        peers = result["table"]["peers"]
        for name, target in TARGETS["table"].items():
            for variant, key in (("view per update", "ratio"), ("cached views", "ratio_cached"),
                                 ("arena", "ratio_arena")):
                out[f"table ({variant}) vs {name}"] = {"target": f">= {target:g}x", "value": peers[name][key],
                                                       "met": peers[name][key] >= target}
    if "streaming" in result:
        for c in result["streaming"]["configs"]:
            for ours in STREAM_OURS:
                ring, queue = c["by_variant"][ours]["ring"], c["by_variant"][ours]["Queue"]
                tag = f"{c['size']} B, {c['producers']}P, {ours}"
                out[f"streaming {tag}: rate vs ring"] = {"target": f">= {TARGETS['streaming_ring_rate']}x",
                                                         "value": ring["ratio"],
                                                         "met": ring["ratio"] >= TARGETS["streaming_ring_rate"]}
                out[f"streaming {tag}: CPU/record vs Queue"] = {"target": "<= 1.0x", "value": queue["cpu_ratio"],
                                                                "met": queue["cpu_ratio"] <= 1.0}
    return out


def run(size: str, progress, only: set[str] = frozenset(WORKLOADS)) -> dict[str, Any]:
    reps, obj_s, table_reps, table_s, stream_reps, stream_s, producer_counts = SIZES[size]
    result: dict[str, Any] = {"machine": machine(), "size": size,
                              "parameters": {"repetitions": reps, "table_repetitions": table_reps,
                                             "streaming_repetitions": stream_reps,
                                             "objects_seconds": obj_s, "table_seconds": table_s,
                                             "streaming_seconds": stream_s, "producers": list(producer_counts),
                                             "batch": BATCH, "window": WINDOW, "object_size": OBJECT_SIZE,
                                             "table_records": TABLE_RECORDS, "table_workers": TABLE_WORKERS,
                                             "stream_sizes": list(STREAM_SIZES)}}
    daemon = slitter.spawn_daemon(arena_size="8G")
    address = daemon.start()
    try:
        with slitter.connect(address) as heap:
            if "objects" in only:
                result["objects"] = run_objects(address, daemon.pid, reps, obj_s, progress)
            if "table" in only:
                result["table"] = run_table(address, daemon.pid, heap, table_reps, table_s, progress)
            if "streaming" in only:
                result["streaming"] = run_streaming(address, daemon.pid, heap, stream_reps, stream_s, producer_counts,
                                                    progress)
    finally:
        daemon.stop()
    result["targets"] = targets(result)
    return result


# -- output --------------------------------------------------------------------------

def _rate(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f} M/s"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k/s"
    return f"{x:.0f} /s"


def _x(x: float) -> str:
    return f"{x:.3g}×" if x < 100 else f"{x:,.0f}×"


def print_tables(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(160, Console().width))
    reps = result["parameters"]["repetitions"]
    tg = result["targets"]

    def verdict(key: str) -> str:
        if key not in tg:
            return ""
        t = tg[key]
        return f"{t['target']} " + ("[green]met[/green]" if t["met"] else "[red]NOT met[/red]")

    for touch, measured in result.get("objects", {}).items():
        t = Table(title=f"Shared objects ({OBJECT_SIZE} B, batches of {BATCH}), {touch} written and read: "
                  f"medians of {reps} repetitions", title_justify="left",
                  caption="objects/s: allocate+write, read in another process, release; CPU: all processes; "
                  "no allocator ÷: the control's rate ÷ the peer's",
                  caption_justify="left")
        for col in ("peer", "objects/s", "CPU µs/object", "arena ÷", "target", "view per object ÷", "target ",
                    "no allocator ÷", "errors"):
            t.add_column(col, justify="left" if col.startswith(("peer", "target")) else "right")
        for name, p in measured["peers"].items():
            mine = name.startswith("slitter")
            control = name == "slots, no allocator"
            t.add_row(name, _rate(p["rate"]), f"{p['cpu_us']:.2f}", "" if mine else _x(p["ratio"]),
                      "" if mine or control else verdict(f"objects, {touch} (arena) vs {name}"),
                      "" if mine else _x(p["ratio_view"]),
                      "" if mine or control else verdict(f"objects, {touch} (view per object) vs {name}"),
                      "" if control else _x(p["ratio_control"]), str(p["errors"]))
        console.print(t)

    if "table" in result:
        t = Table(title=f"Shared mutable table ({TABLE_RECORDS:,} × {TABLE_RECORD} B, {TABLE_WORKERS} processes): "
                  f"medians of {result['parameters'].get('table_repetitions', reps)} repetitions", title_justify="left",
                  caption="ratios: slitter (view per update | cached views | arena) ÷ peer, updates/s, medians of "
                  "per-repetition ratios",
                  caption_justify="left")
        for col in ("peer", "updates/s", "CPU µs/update", "view per update ÷", "target", "cached views ÷", "target ",
                    "arena ÷", "target  "):
            t.add_column(col, justify="left" if col.startswith(("peer", "target")) else "right")
        for name, p in result["table"]["peers"].items():
            mine = name.startswith("slitter")
            cells = []
            for variant, key in (("view per update", "ratio"), ("cached views", "ratio_cached"), ("arena", "ratio_arena")):
                cells += ["" if mine else _x(p[key]), "" if mine else verdict(f"table ({variant}) vs {name}")]
            t.add_row(name, _rate(p["rate"]), f"{p['cpu_us']:.2f}", *cells)
        console.print(t)

    if "streaming" in result:
        stream_reps = result["parameters"].get("streaming_repetitions", reps)
        t = Table(title=f"Streaming (batches of {BATCH}, 1 consumer): medians of {stream_reps} repetitions",
                  title_justify="left", caption="÷: slitter ÷ peer, where the consumer releases; p.r. ÷: slitter, "
                  "producer releases ÷ peer; targets: rate >= 0.9× ring, CPU/record <= Queue's",
                  caption_justify="left")
        for col in ("size", "prod.", "peer", "records/s", "MB/s", "CPU µs/rec", "rate ÷", "CPU ÷", "target",
                    "p.r. rate ÷", "p.r. CPU ÷", "p.r. target"):
            t.add_column(col, justify="left" if col in ("peer", "target", "p.r. target") else "right")
        last = None
        for c in result["streaming"]["configs"]:
            if last is not None and c["size"] != last:
                t.add_section()
            last = c["size"]
            for name, p in c["peers"].items():
                mine = name in STREAM_OURS
                cells = []
                for ours in STREAM_OURS:
                    tag = f"{c['size']} B, {c['producers']}P, {ours}"
                    v = {"ring": verdict(f"streaming {tag}: rate vs ring"),
                         "Queue": verdict(f"streaming {tag}: CPU/record vs Queue")}.get(name, "")
                    q = c["by_variant"][ours][name]
                    cells += ["" if mine else f"{q['ratio']:.2f}", "" if mine else f"{q['cpu_ratio']:.2f}", v]
                t.add_row(f"{c['size']:,}" if name == SLITTER else "", str(c["producers"]) if name == SLITTER else "",
                          name, _rate(p["rate"]), f"{p['rate'] * c['size'] / 1e6:,.1f}", f"{p['cpu_us']:.2f}",
                          *cells)
        console.print(t)
    print(machine_line(result["machine"]))


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no PNG written", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = result["streaming"]["configs"]
    counts = sorted({c["producers"] for c in configs})
    fig, axes = plt.subplots(1, len(counts), figsize=(4.2 * len(counts), 4), sharey=True, squeeze=False)
    styles = {SLITTER: ("tab:red", "o"), SLITTER_PRODUCER_RELEASES: ("darkred", "v"), "Queue": ("tab:blue", "s"),
              "Pipe": ("tab:green", "^"), "ring": ("tab:gray", "D")}
    for ax, p in zip(axes[0], counts):
        rows = [c for c in configs if c["producers"] == p]
        sizes = [c["size"] for c in rows]
        for peer in STREAM_PEERS:
            if peer not in styles:
                continue  # the control
            color, marker = styles[peer]
            ax.plot(sizes, [c["peers"][peer]["rate"] for c in rows], marker=marker, color=color,
                    label="SharedMemory ring" if peer == "ring" else peer if peer in STREAM_OURS
                    else f"multiprocessing.{peer}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [f"{s} B" if s < 1024 else f"{s // 1024} KiB" for s in sizes])
        ax.set_title(f"{p} producer{'s' if p > 1 else ''} → 1 consumer")
        ax.set_xlabel("record size")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("records/s (median)")
    axes[0][-1].legend(fontsize="small")
    fig.suptitle(f"Streaming records in batches of {BATCH} (CRC-32 of every record), "
                 f"{result['machine']['nproc']} CPUs", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    def add_arguments(parser) -> None:
        parser.add_argument("--only", default=",".join(WORKLOADS), type=lambda v: set(v.split(",")),
                            help="comma-separated workloads to run (objects, table, streaming)")

    def save(result: dict, quick: bool) -> str:
        suffix = "-quick" if quick else ""
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"peers{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
        if "streaming" in result:
            plot(result, RESULTS / f"streaming{suffix}.png")
        return f"; results in {RESULTS}"

    return cli(__doc__, run, print_tables, "1 repetition, short windows, 1 and 4 producers", argv, save,
               add_arguments)


if __name__ == "__main__":
    sys.exit(main())
